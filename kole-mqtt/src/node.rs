//! The node's side: [`MqttNode`], one MQTT session of one edge node, and [`MqttConnector`], which
//! opens them for the agent driver.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use kole_core::model::NodeName;
use kole_core::protocol::{GroupName, UplinkKind};
use kole_core::transport::{Connector, MessageTransport, NodeDelivery, NodePublish, NodeTransport, TransportError};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::config::{NodeConfig, broker_for};
use crate::inbox::{Inbox, InboxSender};
use crate::topics::Topics;
use crate::{Error, Result, conn};

/// The QoS of each uplink kind (`docs/protocol.md` §4): status reports must arrive (QoS 1);
/// heartbeats are superseded by the next one and registrations are retried by the agent until
/// acknowledged (QoS 0: a broker-level ack would only repeat the protocol's own).
pub fn uplink_qos(kind: UplinkKind) -> QoS {
    match kind {
        UplinkKind::Heartbeat | UplinkKind::Register => QoS::AtMostOnce,
        UplinkKind::Status => QoS::AtLeastOnce,
    }
}

/// Counters of one [`MqttNode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Deliveries dropped because the inbox was full.
    pub dropped_full: u64,
    /// Messages received on a topic outside the layout (ignored).
    pub bad_topic: u64,
}

/// One MQTT session of one node (clean session, client id = user name = node name).
///
/// The session ends at the first connection error: [`recv`](NodeTransport::recv) then drains what
/// was received and returns [`TransportError::Closed`], and the agent driver reconnects through the
/// [`MqttConnector`] with its jittered exponential backoff. A new session subscribes again to the
/// node's own topic, the fleet topic and the spec topics; the agent subscribes again to its groups
/// after its next registration.
#[derive(Debug)]
pub struct MqttNode {
    name: NodeName,
    topics: Topics,
    client: AsyncClient,
    inbox: Inbox<NodeDelivery>,
    closed: CancellationToken,
    bad_topic: Arc<AtomicU64>,
    /// `ConnectionConfig::max_packet_bytes`: the largest PUBLISH packet sent.
    max_packet: usize,
    request_channel: usize,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl MqttNode {
    /// Connects `name` to its broker (`cfg.brokers[broker_for(name)]`), waits for the CONNACK and
    /// subscribes to the node's filters. Fails when the broker refuses (bad credentials) or cannot
    /// be reached within the connect timeout.
    pub async fn connect(topics: Topics, name: NodeName, cfg: &NodeConfig) -> Result<Self> {
        // NodeName already excludes wildcards; checked again because it becomes the client id.
        conn::check_client_id("node name", name.as_str())?;
        if cfg.brokers.is_empty() {
            return Err(Error::Config("NodeConfig::brokers is empty".into()));
        }
        let broker = &cfg.brokers[broker_for(name.as_str(), cfg.brokers.len())];
        let creds = cfg.password.as_deref().map(|p| (name.as_str(), p));
        let opts = conn::options(broker, name.as_str(), creds, &cfg.connection)?;
        let (client, mut eventloop) = conn::client(opts, &cfg.connection);
        let connect_err = |reason: String| Error::Connect { broker: broker.to_string(), reason };
        match tokio::time::timeout(cfg.connection.connect_timeout, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {}
            Ok(Ok(other)) => return Err(connect_err(format!("unexpected first event {other:?}"))),
            Ok(Err(e)) => return Err(connect_err(e.to_string())),
            Err(_) => return Err(connect_err("no CONNACK within the connect timeout".into())),
        }
        let filters = topics.node_filters(&name).map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
        client.try_subscribe_many(filters).map_err(|e| connect_err(e.to_string()))?;
        let (tx, inbox) = Inbox::new(cfg.inbox_capacity);
        let closed = CancellationToken::new();
        let bad_topic = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(session(eventloop, topics.clone(), tx, closed.clone(), bad_topic.clone()));
        Ok(Self {
            name,
            topics,
            client,
            inbox,
            closed,
            bad_topic,
            max_packet: cfg.connection.max_packet_bytes,
            request_channel: cfg.connection.request_channel,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// This endpoint's counters.
    pub fn stats(&self) -> NodeStats {
        NodeStats { dropped_full: self.inbox.dropped(), bad_topic: self.bad_topic.load(Ordering::Relaxed) }
    }

    fn full(&self) -> TransportError {
        TransportError::Full { queue: "MQTT request channel", capacity: self.request_channel }
    }
}

/// Drives one session's event loop until the first error or `closed`.
async fn session(
    mut eventloop: EventLoop,
    topics: Topics,
    tx: InboxSender<NodeDelivery>,
    closed: CancellationToken,
    bad_topic: Arc<AtomicU64>,
) {
    loop {
        let event = tokio::select! {
            () = closed.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => match topics.parse_downlink(&p.topic) {
                Ok(from) => tx.push(NodeDelivery { from, payload: p.payload, retained: p.retain }),
                Err(_) => {
                    bad_topic.fetch_add(1, Ordering::Relaxed);
                }
            },
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // Dropping `tx` lets `recv` drain and then report `Closed`.
    drop(tx);
    closed.cancel();
}

impl MessageTransport for MqttNode {
    fn close(&self) {
        let _ = self.client.try_disconnect();
        self.closed.cancel();
        if let Ok(mut t) = self.task.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

impl Drop for MqttNode {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl NodeTransport for MqttNode {
    fn node(&self) -> &NodeName {
        &self.name
    }

    async fn publish(&self, batch: Vec<NodePublish>) -> Result<(), TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        // Checked on the real packet (topic included): rumqttc refuses an oversize packet by
        // dropping the connection.
        for p in &batch {
            let topic_len = self.topics.uplink(&self.name, p.kind).len();
            if crate::conn::publish_packet_size(topic_len, p.payload.len()) > self.max_packet {
                let max = crate::conn::max_payload(topic_len, self.max_packet);
                return Err(TransportError::PayloadTooLarge { len: p.payload.len(), max });
            }
        }
        for p in batch {
            let topic = self.topics.uplink(&self.name, p.kind);
            match self.client.try_publish(topic, uplink_qos(p.kind), false, p.payload) {
                Ok(()) => {}
                Err(rumqttc::ClientError::TryRequest(_)) if !self.closed.is_cancelled() => return Err(self.full()),
                Err(_) => return Err(TransportError::Closed),
            }
        }
        Ok(())
    }

    async fn recv(&self, max: usize) -> Result<Vec<NodeDelivery>, TransportError> {
        self.inbox.recv(max, &self.closed).await
    }

    async fn subscribe(&self, group: &GroupName) -> Result<(), TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        match self.client.try_subscribe(self.topics.group_filter(group), QoS::AtLeastOnce) {
            Ok(()) => Ok(()),
            Err(rumqttc::ClientError::TryRequest(_)) if !self.closed.is_cancelled() => Err(self.full()),
            Err(_) => Err(TransportError::Closed),
        }
    }

    async fn unsubscribe(&self, group: &GroupName) -> Result<(), TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        match self.client.try_unsubscribe(self.topics.group_filter(group)) {
            Ok(()) => Ok(()),
            Err(rumqttc::ClientError::TryRequest(_)) if !self.closed.is_cancelled() => Err(self.full()),
            Err(_) => Err(TransportError::Closed),
        }
    }
}

/// Opens [`MqttNode`] sessions for [`run_agent`](kole_core::agent::driver::run_agent): the agent
/// driver calls it on start and after every lost connection (after its jittered backoff).
#[derive(Clone, Debug)]
pub struct MqttConnector {
    topics: Topics,
    name: NodeName,
    config: NodeConfig,
}

impl MqttConnector {
    /// A connector for node `name` of the fleet `topics`.
    pub fn new(topics: Topics, name: NodeName, config: NodeConfig) -> Result<Self> {
        conn::check_client_id("node name", name.as_str())?;
        Ok(Self { topics, name, config })
    }
}

#[async_trait]
impl Connector for MqttConnector {
    async fn connect(&self) -> Result<Arc<dyn NodeTransport>, TransportError> {
        let node = MqttNode::connect(self.topics.clone(), self.name.clone(), &self.config).await?;
        Ok(Arc::new(node))
    }
}
