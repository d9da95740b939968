//! What goes into and comes out of [`super::Agent::handle`], and the agent's settings.

use std::sync::Arc;

use crate::model::{Labels, NodeInfo, NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};
use crate::protocol::{DecodeLimits, GroupName, Message, RejectCode};
use crate::transport::{Destination, NodeDelivery, NodePublish};

use super::store::PersistedState;
use crate::backoff::Backoff;

/// Agent settings. Every interval is a field with a documented default. Share one `Arc` of it
/// among all agents of a process (a simulator holds a million).
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// Backoff between registration attempts until an ack arrives. Default 10 s doubling to 5 min
    /// (jittered into `[d/2, d]`): a registration is only lost with the controller's connection,
    /// while a short first retry turns a fleet registering at once into a storm of duplicates
    /// (measured: 1 s here doubled the messages of 1,000,000 nodes registering over Mosquitto).
    pub register_retry: Backoff,
    /// Lower bound on the heartbeat interval an ack may set, in milliseconds (protects the
    /// broker from a misconfigured controller). Default 1,000.
    pub min_heartbeat_interval_ms: u32,
    /// How often the runtime is polled for state changes, in milliseconds; 0 polls only when the
    /// agent wakes for other reasons (heartbeats). Default 1,000.
    pub runtime_poll_ms: u32,
    /// Limits for decoding downlink payloads.
    pub decode_limits: DecodeLimits,
    /// The longest a controller message may make the agent wait, in milliseconds: a rejected
    /// registration's `retry_after_ms` and an ack's heartbeat interval are capped here, so one
    /// message cannot silence a node for days. Default 900,000 (15 min).
    pub max_controller_delay_ms: u32,
    /// The controller keys this agent trusts. `Some`: every downlink delivery must be signed by
    /// one of them ([`crate::protocol::seal`]) and newer than what the agent already accepted about
    /// the same workload (replays and rollbacks by replay are refused); an empty retained spec no
    /// longer removes a workload (it cannot be signed; the signed `WorkloadRemoved` does).
    /// `None` (the default, for tests and simulations): signed and unsigned messages are both
    /// decoded without verification. Pre-decoded inputs ([`AgentInput::Message`],
    /// [`AgentInput::SharedSpec`]) are never verified: they are for callers that decode themselves.
    pub trust: Option<Arc<crate::protocol::seal::TrustedKeys>>,
    /// Whether a change of the desired set fills [`AgentOutputs::persist`]. Default true; a
    /// simulator that keeps no agent state turns it off rather than build and drop a copy of every
    /// agent's desired set on every change.
    pub persist: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            register_retry: Backoff::new(10_000, 300_000, 2.0),
            min_heartbeat_interval_ms: 1_000,
            runtime_poll_ms: 1_000,
            decode_limits: DecodeLimits::default(),
            max_controller_delay_ms: 900_000,
            trust: None,
            persist: true,
        }
    }
}

/// Who the agent is: its name, labels and static facts. Labels and info are shared (`Arc`), as
/// a million simulated nodes share a few hundred label sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The node's name (also its MQTT identity).
    pub name: NodeName,
    /// The node's labels.
    pub labels: Arc<Labels>,
    /// Static facts about the node.
    pub info: Arc<NodeInfo>,
}

/// What the agent is told.
#[derive(Clone, Copy, Debug)]
pub enum AgentInput<'a> {
    /// The transport connected (a clean session: no group subscriptions).
    Connected,
    /// The transport is gone; workloads keep running.
    Disconnected,
    /// Time passed: registration retries, heartbeats, runtime polling. Call at (or after)
    /// [`AgentOutputs::next_wake`].
    Tick,
    /// A raw downlink delivery; decoded here under [`AgentConfig::decode_limits`]. An empty payload
    /// on a spec topic removes that workload (the retained spec was deleted).
    Delivery(&'a NodeDelivery),
    /// An already decoded downlink message and the destination it arrived on.
    Message {
        /// The message.
        message: &'a Message,
        /// Where it was published.
        from: &'a Destination,
    },
    /// A [`crate::protocol::WorkloadSpec`] decoded once and shared: a simulator that fans one spec
    /// out to many agents hands each the same `Arc`, so they share its memory
    /// ([`super::SpecCache`] decodes it once).
    SharedSpec {
        /// The workload.
        workload: &'a Arc<Workload>,
        /// The spec's wave threshold.
        wave_threshold: u16,
        /// Where it was published.
        from: &'a Destination,
    },
}

/// A subscription change for the driver to carry out, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupChange {
    /// Subscribe to the group's topics.
    Subscribe(GroupName),
    /// Unsubscribe from the group's topics.
    Unsubscribe(GroupName),
}

/// Something noteworthy, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// The cloud accepted the registration.
    Registered {
        /// Heartbeat interval now in use, in milliseconds.
        heartbeat_interval_ms: u32,
    },
    /// The cloud refused the registration; the agent retries later.
    RegisterRejected {
        /// Why.
        code: RejectCode,
        /// The controller's explanation.
        message: String,
        /// When the agent retries.
        retry_at: Timestamp,
    },
    /// A workload version was handed to the runtime.
    Applied {
        /// The workload.
        id: WorkloadId,
        /// The version.
        version: u64,
        /// Its phase right after.
        phase: WorkloadPhase,
    },
    /// A workload was removed from the runtime.
    Removed {
        /// The workload.
        id: WorkloadId,
    },
    /// A signed-downlink agent refused a delivery: unsigned, an untrusted or revoked key, a bad
    /// signature, or `replayed` (older than what it accepted). Nothing changed. Worth a warning:
    /// unlike [`AgentEvent::Ignored`], it can be an attack.
    Refused {
        /// Stable reason code (`unsigned`, `unknown_key`, `revoked_key`, `bad_signature`,
        /// `replayed`, or a decode error's).
        reason: &'static str,
        /// What was refused, for the log.
        detail: String,
    },
    /// A downlink input was ignored; nothing changed.
    Ignored {
        /// Stable reason code: a [`crate::protocol::DecodeError::reason`], `stale_ack`,
        /// `not_connected`, `uplink_kind`, `wrong_topic` (a kind its topic may not carry),
        /// `spec_topic_mismatch`, `empty_payload`, `replayed` (signed before what the agent already
        /// accepted about that workload), `unsigned_removal`,
        /// `duplicate_command`.
        reason: &'static str,
    },
}

/// What the agent wants done. Reuse one value across calls; [`super::Agent::handle`] appends to
/// the lists, replaces `persist` and sets `next_wake`; the driver drains it.
#[derive(Clone, Debug, Default)]
pub struct AgentOutputs {
    /// Uplink messages to publish, in order.
    pub publish: Vec<NodePublish>,
    /// Subscription changes, in order.
    pub groups: Vec<GroupChange>,
    /// The state to persist (the latest wins if several changes happened before a drain).
    pub persist: Option<PersistedState>,
    /// Events.
    pub events: Vec<AgentEvent>,
    /// When to call [`super::Agent::handle`] with [`AgentInput::Tick`] next; `None`: nothing is
    /// scheduled (wait for input).
    pub next_wake: Option<Timestamp>,
}

impl AgentOutputs {
    /// Empties every field, keeping allocations.
    pub fn clear(&mut self) {
        self.publish.clear();
        self.groups.clear();
        self.persist = None;
        self.events.clear();
        self.next_wake = None;
    }
}
