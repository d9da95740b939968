//! The message transport seam between the controller / agents and a broker.
//!
//! Two object-safe traits, one per side, both batch-oriented (one boxed future per batch of
//! messages, never per message) and both extending [`MessageTransport`]:
//!
//! - [`CloudTransport`], the controller's side: [`send`](CloudTransport::send) a batch of
//!   [`Outbound`] messages to nodes, groups, the fleet or a retained spec topic, and
//!   [`recv`](CloudTransport::recv) batches of [`Inbound`] uplink messages, each stamped with the
//!   node's authenticated identity (the topic's node level, which the broker ACL ties to the node's
//!   credentials).
//! - [`NodeTransport`], an agent's side: [`publish`](NodeTransport::publish) its own uplink
//!   messages, [`recv`](NodeTransport::recv) [`NodeDelivery`]s, and subscribe to groups.
//!   A [`Connector`] opens one (again after every failure).
//!
//! Payloads are opaque bytes here; [`crate::protocol`] encodes and decodes them. The in-memory
//! implementation is [`memory`]; `kole-mqtt` implements the traits over MQTT.
//!
//! ```
//! use std::sync::Arc;
//! use kole_core::model::{DesiredDigest, NodeName};
//! use kole_core::protocol::{self, Heartbeat, Message, NodeHealth, UplinkKind};
//! use kole_core::transport::memory::{MemoryConfig, MemoryHub};
//! use kole_core::transport::{CloudTransport, NodePublish, NodeTransport};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = MemoryHub::new(MemoryConfig::default());
//! let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud()?);
//! let node: Arc<dyn NodeTransport> = Arc::new(hub.connect(NodeName::new("edge-1")?)?);
//!
//! let hb = Heartbeat { seq: 1, boot_id: 7, applied: DesiredDigest::EMPTY, health: NodeHealth::OK };
//! let payload = protocol::encode(&Message::Heartbeat(hb));
//! node.publish(vec![NodePublish { kind: UplinkKind::Heartbeat, payload }]).await?;
//!
//! let batch = cloud.recv(1024).await?;
//! assert_eq!(batch[0].node.as_str(), "edge-1");
//! assert_eq!(batch[0].decode(&Default::default())?, Message::Heartbeat(hb));
//! # Ok(())
//! # }
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(demo())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod fault;
pub mod memory;

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::NodeName;
use crate::protocol::{
    DecodeError, DecodeLimits, Heartbeat, Message, decode_downlink, decode_from_node, decode_heartbeat_from_node,
};

pub use crate::protocol::{Destination, GroupName, UplinkKind};
/// The shared byte buffer of [`Inbound::payload`] (the `bytes` crate's).
pub use bytes::Bytes;

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The endpoint was closed (by its owner, by a takeover of the same identity, or by shutdown).
    /// Reconnect to go on.
    #[error("transport endpoint is closed; reconnect to go on")]
    Closed,
    /// A bounded queue cannot take the batch; nothing of it was enqueued. Retry later (with backoff).
    #[error("{queue} is full (capacity {capacity}); nothing of the batch was sent, retry later")]
    Full {
        /// Which queue.
        queue: &'static str,
        /// Its capacity (in messages, or in bytes where `queue` says so).
        capacity: usize,
    },
    /// A payload exceeds the transport's (broker's) maximum; nothing of the batch was sent. Only a
    /// node's [`NodeTransport::publish`] refuses a whole batch this way; a cloud
    /// [`CloudTransport::send`] drops the oversize messages alone
    /// ([`TransportError::OversizeDropped`]).
    #[error("payload of {len} bytes exceeds the transport's limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`CloudTransport::send`] dropped the messages of its batch over the transport's payload
    /// limit; **every other message of the batch was sent**, so do not resend the batch. Counted by
    /// the transport (e.g. `HubStats::dropped_too_large`); the engine refuses specs over the limit at
    /// apply, so this means a message the engine built grew past it (e.g. a large desired state).
    #[error(
        "{dropped} message(s) over the transport's limit of {max} bytes were dropped (the largest \
         {largest} bytes, to {to}); the rest of the batch was sent"
    )]
    OversizeDropped {
        /// How many were dropped.
        dropped: usize,
        /// The largest payload dropped.
        largest: usize,
        /// The limit.
        max: usize,
        /// The destination of the largest one (its topic, for the log).
        to: String,
    },
    /// This transport cannot do what was asked (an optional operation it does not implement).
    #[error("{what} is not supported by this transport")]
    Unsupported {
        /// The operation.
        what: &'static str,
    },
    /// Any other failure of the underlying transport.
    #[error("{context}")]
    Other {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A downlink message the cloud sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outbound {
    /// Where it goes.
    pub to: Destination,
    /// The encoded message. With `retain`, an empty payload deletes the retained message.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it for nodes that connect or subscribe later (MQTT retain).
    pub retain: bool,
}

/// An uplink message the cloud received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// The sending node, from the topic (authenticated by the broker ACL), not from the payload.
    pub node: NodeName,
    /// The uplink topic's kind.
    pub kind: UplinkKind,
    /// The encoded message: shared bytes, so a transport can hand a slice of its read buffer
    /// without copying it (`Bytes::from(Vec<u8>)` wraps a vector without copying either).
    pub payload: Bytes,
}

impl Inbound {
    /// Decodes the payload, enforcing that it is an uplink message of the topic's kind and that a
    /// registration claims this node (see [`crate::protocol::decode_from_node`]).
    pub fn decode(&self, limits: &DecodeLimits) -> Result<Message, DecodeError> {
        decode_from_node(&self.payload, &self.node, self.kind, limits)
    }

    /// [`Inbound::decode`] for a message on a heartbeat topic, the heartbeat returned as it is
    /// (see [`crate::protocol::decode_heartbeat_from_node`]).
    pub fn decode_heartbeat(&self, limits: &DecodeLimits) -> Result<Heartbeat, DecodeError> {
        decode_heartbeat_from_node(&self.payload, limits)
    }
}

/// An uplink message a node publishes on its own topic of `kind`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePublish {
    /// Which uplink topic.
    pub kind: UplinkKind,
    /// The encoded message.
    pub payload: Vec<u8>,
}

/// A downlink message a node received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDelivery {
    /// The destination (topic) it was published to.
    pub from: Destination,
    /// The encoded message, shared between every node a fan-out reached (a [`Bytes`] clone is a
    /// reference count), and taken from a transport's read buffer without copying. Empty on a spec
    /// topic when the retained spec was deleted.
    pub payload: Bytes,
    /// Whether it was replayed from the retained store on connect or subscribe (MQTT's retain flag on
    /// delivery), rather than published while the node was subscribed.
    pub retained: bool,
}

impl NodeDelivery {
    /// Decodes the payload, refusing uplink kinds.
    pub fn decode(&self, limits: &DecodeLimits) -> Result<Message, DecodeError> {
        decode_downlink(&self.payload, limits)
    }
}

/// What both sides of a transport have in common.
pub trait MessageTransport: Send + Sync {
    /// Closes this endpoint: pending and later calls fail with [`TransportError::Closed`].
    /// Idempotent.
    fn close(&self);

    /// Whether this endpoint is closed.
    fn is_closed(&self) -> bool;
}

/// The controller's side of a transport. Object-safe: hold it as `Arc<dyn CloudTransport>`.
#[async_trait]
pub trait CloudTransport: MessageTransport {
    /// Sends a batch of downlink messages. Fan-out (groups, fleet, specs) is the transport's (the
    /// broker's) job: one [`Outbound`] reaches every subscriber of its destination.
    ///
    /// No message can make the batch fail for the others: a message over the transport's payload
    /// limit is dropped alone and reported with [`TransportError::OversizeDropped`] after the rest
    /// was sent. Queue capacity stays all or nothing: [`TransportError::Full`] means nothing of the
    /// batch was sent.
    async fn send(&self, batch: Vec<Outbound>) -> Result<(), TransportError>;

    /// Waits until at least one uplink message is available, then returns up to `max` of them in
    /// arrival order (`max == 0` returns an empty batch at once).
    async fn recv(&self, max: usize) -> Result<Vec<Inbound>, TransportError>;

    /// Lists the spec destinations ([`Destination::WorkloadSpec`] and
    /// [`Destination::GroupWorkloadSpec`]) that hold a retained spec now, in no particular order.
    ///
    /// A controller taking the lead compares them with the live workloads and clears the ones whose
    /// workload was deleted while no controller led (`WorkloadCommand::ReconcileRetained`);
    /// otherwise nodes would run a deleted workload again after reconnecting. The default returns
    /// [`TransportError::Unsupported`]: a transport without a retained store has nothing to list.
    async fn retained_specs(&self) -> Result<Vec<Destination>, TransportError> {
        Err(TransportError::Unsupported { what: "listing retained specs" })
    }
}

/// An edge node's side of a transport. Object-safe: hold it as `Arc<dyn NodeTransport>`.
///
/// On connect a node receives its own topic, the fleet topic and the fleet-wide spec topics
/// (including their retained messages); groups are added with [`NodeTransport::subscribe`].
/// Subscriptions do not survive a reconnect: subscribe again to every group.
#[async_trait]
pub trait NodeTransport: MessageTransport {
    /// The node this endpoint speaks for.
    fn node(&self) -> &NodeName;

    /// Publishes a batch of uplink messages on this node's own topics.
    async fn publish(&self, batch: Vec<NodePublish>) -> Result<(), TransportError>;

    /// Waits until at least one downlink message is available, then returns up to `max` of them in
    /// arrival order (`max == 0` returns an empty batch at once).
    async fn recv(&self, max: usize) -> Result<Vec<NodeDelivery>, TransportError>;

    /// Subscribes to a group's topic and spec topics; the group's retained messages are delivered.
    async fn subscribe(&self, group: &GroupName) -> Result<(), TransportError>;

    /// Unsubscribes from a group.
    async fn unsubscribe(&self, group: &GroupName) -> Result<(), TransportError>;
}

/// Opens a [`NodeTransport`]: the seam an agent driver (`agent::driver::run_agent`) connects
/// and reconnects a node through. Object-safe; any
/// `Fn() -> Result<Arc<dyn NodeTransport>, TransportError>` (e.g. around
/// [`MemoryHub::connect`](memory::MemoryHub::connect)) is one.
#[async_trait]
pub trait Connector: Send + Sync {
    /// Connects (a clean session).
    async fn connect(&self) -> Result<Arc<dyn NodeTransport>, TransportError>;
}

#[async_trait]
impl<F> Connector for F
where
    F: Fn() -> Result<Arc<dyn NodeTransport>, TransportError> + Send + Sync,
{
    async fn connect(&self) -> Result<Arc<dyn NodeTransport>, TransportError> {
        self()
    }
}
