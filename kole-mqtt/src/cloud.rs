//! The controller's side: [`MqttCloud`], a pool of MQTT connections to every broker of the fleet.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kole_core::model::{mix64, stable_hash};
use kole_core::protocol::{MessageKind, UplinkKind};
use kole_core::rng::SplitMix64;
use kole_core::transport::{CloudTransport, Destination, Inbound, MessageTransport, Outbound, TransportError};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeFilter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::{CloudConfig, broker_for};
use crate::inbox::{Inbox, InboxSender};
use crate::topics::Topics;
use crate::{Error, Result, conn};

/// The QoS of a downlink message, by the kind in its envelope (`docs/protocol.md` §4): QoS 0 for
/// a `RegisterAck` (the agent retries its registration until one arrives, so a broker-level ack
/// would only repeat that, at two more packets per node through the broker), QoS 1 for everything
/// else, so a connected node gets it unless its session ends (the heartbeat digest repairs the
/// rest).
pub fn downlink_qos(payload: &[u8]) -> QoS {
    match payload {
        [kole_core::protocol::PROTOCOL_VERSION, kind, ..]
            if MessageKind::from_u8(*kind) == Some(MessageKind::RegisterAck) =>
        {
            QoS::AtMostOnce
        }
        _ => QoS::AtLeastOnce,
    }
}

/// Counters of an [`MqttCloud`], since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloudStats {
    /// Successful (re)connections over all connections.
    pub connects: u64,
    /// Lost connections and failed connection attempts.
    pub connection_errors: u64,
    /// Connections up now.
    pub connected: usize,
    /// Uplink messages handed to `recv`'s inbox.
    pub received: u64,
    /// Uplink messages dropped because the inbox was full ([`CloudConfig::inbox_capacity`]
    /// messages or [`CloudConfig::inbox_max_bytes`] bytes).
    pub dropped_full: u64,
    /// Messages received on a topic outside the uplink layout (ignored, never reach the engine).
    pub bad_topic: u64,
    /// Downlink publishes handed to the MQTT clients (a fan-out counts once per broker).
    pub published: u64,
    /// Downlink messages dropped by `send` because their PUBLISH packet (payload, topic and header)
    /// would exceed `ConnectionConfig::max_packet_bytes`; the rest of their batch was sent.
    pub oversize_dropped: u64,
    /// Uplink messages delivered with the retain flag (a node published them retained, or the
    /// broker replayed them on subscribe): ignored, never reach the engine. A node's retained
    /// publish would otherwise be replayed to the controller after every reconnect.
    pub retained_uplink_dropped: u64,
    /// Batches of uplink messages handed to the inbox, over all connections: each is what one
    /// `poll` of a connection decoded from its read buffer (rumqttc decodes up to 10 packets per
    /// pass), so `received / uplink_batches` is how many messages a pass carried on average.
    pub uplink_batches: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connects: AtomicU64,
    connection_errors: AtomicU64,
    received: AtomicU64,
    bad_topic: AtomicU64,
    published: AtomicU64,
    oversize_dropped: AtomicU64,
    retained_uplink_dropped: AtomicU64,
    uplink_batches: AtomicU64,
}

struct Publish {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
}

struct Chunk {
    msgs: Vec<Publish>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
struct Connection {
    outbox: mpsc::UnboundedSender<Chunk>,
    permits: Arc<Semaphore>,
    up: Arc<AtomicBool>,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk").field("msgs", &self.msgs.len()).finish()
    }
}

/// The controller's MQTT transport: `connections_per_broker` clean-session connections to each
/// broker of [`CloudConfig::brokers`], all reconnecting on their own with jittered exponential
/// backoff and subscribing again after every reconnect.
///
/// - **Receive**: each broker's connections subscribe to the uplink filters (heartbeats on a
///   connection of their own when [`CloudConfig::split_heartbeats`]); every message is stamped
///   with the node of its topic ([`Topics::parse_uplink`]) and queued in one bounded inbox.
/// - **Send**: a message for one node goes to the node's broker ([`broker_for`]), on the connection
///   its name hashes to (so one node's messages stay in order); a fan-out (fleet, group, spec) goes
///   to connection 0 of every broker. Bounded outboxes give back-pressure: `send` waits for room up
///   to [`CloudConfig::send_timeout`], then returns [`TransportError::Full`].
#[derive(Debug)]
pub struct MqttCloud {
    topics: Topics,
    brokers: Vec<Vec<Connection>>,
    inbox: Inbox<Inbound>,
    closed: CancellationToken,
    counters: Arc<Counters>,
    /// `ConnectionConfig::max_packet_bytes`: the largest PUBLISH packet sent.
    max_packet: usize,
    send_timeout: Duration,
    outbox_capacity: usize,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The configuration, for the short-lived connections of [`CloudTransport::retained_specs`].
    cfg: CloudConfig,
}

impl MqttCloud {
    /// Opens every connection and waits until each one is connected and subscribed (up to the
    /// connect timeout; then fails and closes everything).
    pub async fn connect(topics: Topics, cfg: CloudConfig) -> Result<Self> {
        conn::check_client_id("controller client id", &cfg.client_id)?;
        if cfg.brokers.is_empty() {
            return Err(Error::Config("CloudConfig::brokers is empty".into()));
        }
        if cfg.connections_per_broker == 0 || cfg.connections_per_broker > 1024 {
            return Err(Error::Config("CloudConfig::connections_per_broker must be 1..=1024".into()));
        }
        let per = cfg.connections_per_broker;
        let (tx, inbox) =
            Inbox::with_byte_bound(cfg.inbox_capacity, cfg.inbox_max_bytes, |m: &Inbound| m.payload.len());
        let closed = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let (ready_tx, mut ready_rx) = mpsc::channel::<()>(cfg.brokers.len() * per);
        let mut tasks = Vec::new();
        let mut brokers = Vec::with_capacity(cfg.brokers.len());
        let nonce = conn::client_id_nonce()?;
        for (b, broker) in cfg.brokers.iter().enumerate() {
            let mut conns = Vec::with_capacity(per);
            for c in 0..per {
                let id = format!("{}-{nonce}-{b}-{c}", cfg.client_id);
                let creds = cfg.credentials.as_ref().map(|c| (c.username.as_str(), c.password.as_str()));
                let opts = conn::options(broker, &id, creds, &cfg.connection)?;
                let (client, eventloop) = conn::client(opts, &cfg.connection);
                let filters = uplink_filters(&topics, c, per, cfg.split_heartbeats, cfg.uplink_subscription_qos);
                let up = Arc::new(AtomicBool::new(false));
                let link = Link {
                    topics: topics.clone(),
                    client: client.clone(),
                    filters,
                    inbox: tx.clone(),
                    counters: counters.clone(),
                    closed: closed.clone(),
                    reconnect: cfg.reconnect.clone(),
                    jitter: SplitMix64::new(mix64(stable_hash(0x0063_6c6f_7564, id.as_bytes()))),
                    ready: Some(ready_tx.clone()),
                    up: up.clone(),
                    coalesce: if reads_heartbeats_only(c, per, cfg.split_heartbeats) {
                        cfg.heartbeat_read_coalesce
                    } else {
                        Duration::ZERO
                    },
                };
                tasks.push(tokio::spawn(link.run(eventloop)));
                let (outbox, rx) = mpsc::unbounded_channel();
                tasks.push(tokio::spawn(publisher(client, rx, closed.clone(), counters.clone())));
                let permits = Arc::new(Semaphore::new(cfg.outbox_capacity.clamp(1, Semaphore::MAX_PERMITS)));
                conns.push(Connection { outbox, permits, up });
            }
            brokers.push(conns);
        }
        drop(ready_tx);
        drop(tx);
        let cloud = Self {
            topics,
            brokers,
            inbox,
            closed,
            counters,
            max_packet: cfg.connection.max_packet_bytes,
            send_timeout: cfg.send_timeout,
            outbox_capacity: cfg.outbox_capacity.clamp(1, Semaphore::MAX_PERMITS),
            tasks: std::sync::Mutex::new(tasks),
            cfg: cfg.clone(),
        };
        let total = cfg.brokers.len() * per;
        let wait = async {
            for _ in 0..total {
                ready_rx.recv().await;
            }
        };
        if tokio::time::timeout(cfg.connection.connect_timeout, wait).await.is_err() {
            cloud.close();
            let down: Vec<String> = cfg
                .brokers
                .iter()
                .zip(&cloud.brokers)
                .filter(|(_, conns)| conns.iter().any(|c| !c.up.load(Ordering::Relaxed)))
                .map(|(b, _)| b.to_string())
                .collect();
            return Err(Error::Connect {
                broker: down.join(", "),
                reason: format!("not connected and subscribed within {:?}", cfg.connection.connect_timeout),
            });
        }
        Ok(cloud)
    }

    /// The fleet's topics.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// This transport's counters.
    pub fn stats(&self) -> CloudStats {
        let c = &self.counters;
        CloudStats {
            connects: c.connects.load(Ordering::Relaxed),
            connection_errors: c.connection_errors.load(Ordering::Relaxed),
            connected: self.brokers.iter().flatten().filter(|c| c.up.load(Ordering::Relaxed)).count(),
            received: c.received.load(Ordering::Relaxed),
            dropped_full: self.inbox.dropped(),
            bad_topic: c.bad_topic.load(Ordering::Relaxed),
            published: c.published.load(Ordering::Relaxed),
            oversize_dropped: c.oversize_dropped.load(Ordering::Relaxed),
            retained_uplink_dropped: c.retained_uplink_dropped.load(Ordering::Relaxed),
            uplink_batches: c.uplink_batches.load(Ordering::Relaxed),
        }
    }

    /// The inbox capacity.
    pub fn inbox_capacity(&self) -> usize {
        self.inbox.capacity()
    }

    /// Queues `msgs` on connection `(b, c)`, waiting for outbox room until `deadline`.
    async fn enqueue(
        &self,
        b: usize,
        c: usize,
        mut msgs: Vec<Publish>,
        deadline: tokio::time::Instant,
    ) -> Result<(), TransportError> {
        let conn = &self.brokers[b][c];
        while !msgs.is_empty() {
            let rest = msgs.split_off(msgs.len().min(self.outbox_capacity));
            let n = u32::try_from(msgs.len()).unwrap_or(u32::MAX);
            let permit = match conn.permits.clone().try_acquire_many_owned(n) {
                Ok(p) => p,
                Err(_) => tokio::select! {
                    () = self.closed.cancelled() => return Err(TransportError::Closed),
                    p = tokio::time::timeout_at(deadline, conn.permits.clone().acquire_many_owned(n)) => match p {
                        Ok(Ok(p)) => p,
                        Ok(Err(_)) => return Err(TransportError::Closed),
                        Err(_) => return Err(TransportError::Full { queue: "MQTT cloud outbox", capacity: self.outbox_capacity }),
                    },
                },
            };
            conn.outbox.send(Chunk { msgs, _permit: permit }).map_err(|_| TransportError::Closed)?;
            msgs = rest;
        }
        Ok(())
    }
}

/// Whether connection `c` of a broker's `per` reads heartbeats and nothing else: the last one,
/// when heartbeats are split off and there are at least two.
fn reads_heartbeats_only(c: usize, per: usize, split: bool) -> bool {
    split && per > 1 && c == per - 1
}

/// The uplink filters of connection `c` of `per`.
fn uplink_filters(topics: &Topics, c: usize, per: usize, split: bool, qos: QoS) -> Vec<SubscribeFilter> {
    let f = |kind| SubscribeFilter::new(topics.uplink_filter(kind), qos);
    if per == 1 {
        vec![SubscribeFilter::new(topics.uplink_filter_all(), qos)]
    } else if !split {
        // Only connection 0 subscribes: two subscriptions would deliver every message twice.
        if c == 0 { vec![SubscribeFilter::new(topics.uplink_filter_all(), qos)] } else { vec![] }
    } else if reads_heartbeats_only(c, per, split) {
        vec![f(UplinkKind::Heartbeat)]
    } else if c == 0 {
        vec![f(UplinkKind::Register), f(UplinkKind::Status)]
    } else {
        vec![]
    }
}

/// One connection's event loop: reconnects with backoff, subscribes after every CONNACK.
struct Link {
    topics: Topics,
    client: AsyncClient,
    filters: Vec<SubscribeFilter>,
    inbox: InboxSender<Inbound>,
    counters: Arc<Counters>,
    closed: CancellationToken,
    reconnect: kole_core::backoff::Backoff,
    jitter: SplitMix64,
    ready: Option<mpsc::Sender<()>>,
    up: Arc<AtomicBool>,
    /// The pause after a short read ([`CloudConfig::heartbeat_read_coalesce`]); zero for none.
    coalesce: Duration,
}

/// A burst (the uplink messages a connection read before it found nothing more waiting) shorter
/// than this makes the heartbeat connection wait [`CloudConfig::heartbeat_read_coalesce`] before
/// it reads again.
pub const COALESCE_BELOW: usize = 64;

impl Link {
    async fn run(mut self, mut eventloop: EventLoop) {
        let mut failures: u32 = 0;
        let mut resubscribe = false;
        // The publishes of one read, handed to the inbox together (one lock, at most one wakeup).
        let mut batch: Vec<Inbound> = Vec::new();
        // Uplink messages read since this loop last found nothing waiting.
        let mut burst = 0usize;
        loop {
            let event = {
                let mut next = std::pin::pin!(eventloop.poll());
                // Polled once first: ready means something was buffered or queued already.
                let at_once = std::future::poll_fn(|cx| std::task::Poll::Ready(next.as_mut().poll(cx))).await;
                match at_once {
                    std::task::Poll::Ready(e) => e,
                    std::task::Poll::Pending => {
                        // Nothing is waiting: the burst is over. A short one means the heartbeats
                        // trickle in, so let them gather instead of paying a read and a wakeup
                        // for every few. `next` stays pending meanwhile; nothing is lost.
                        if !self.coalesce.is_zero() && burst > 0 && burst < COALESCE_BELOW {
                            tokio::select! {
                                () = self.closed.cancelled() => break,
                                () = tokio::time::sleep(self.coalesce) => {}
                            }
                        }
                        burst = 0;
                        tokio::select! {
                            () = self.closed.cancelled() => break,
                            e = &mut next => e,
                        }
                    }
                }
            };
            match event {
                Ok(event) => {
                    self.handle(event, &mut batch, &mut failures, &mut resubscribe);
                    // `poll` decoded every packet of its read (up to rumqttc's 10) into
                    // `state.events` and returns them one per call; take the rest now, so one
                    // read costs one trip through the inbox. Nothing else happens to an event
                    // between the queue and `poll`'s return.
                    while let Some(event) = eventloop.state.events.pop_front() {
                        self.handle(event, &mut batch, &mut failures, &mut resubscribe);
                    }
                    if !batch.is_empty() {
                        burst += batch.len();
                        self.counters.uplink_batches.fetch_add(1, Ordering::Relaxed);
                        self.counters.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        self.inbox.push_batch(&mut batch);
                    }
                }
                Err(_) => {
                    resubscribe = false;
                    self.up.store(false, Ordering::Relaxed);
                    self.counters.connection_errors.fetch_add(1, Ordering::Relaxed);
                    let delay = self.reconnect.delay_ms(failures, &mut self.jitter);
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = self.closed.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(delay)) => {}
                    }
                }
            }
            // Never await the request channel here: only this loop drains it. When it is full of
            // publishes, try again after the next event.
            if resubscribe && self.client.try_subscribe_many(self.filters.clone()).is_ok() {
                resubscribe = false;
            }
        }
        self.up.store(false, Ordering::Relaxed);
    }

    /// Handles one event; an uplink message joins `batch`.
    fn handle(&mut self, event: Event, batch: &mut Vec<Inbound>, failures: &mut u32, resubscribe: &mut bool) {
        match event {
            Event::Incoming(Packet::Publish(p)) if p.retain => {
                // The ACL cannot stop a node publishing retained on its uplink; the broker would
                // replay it on every resubscribe, as if the node said it again.
                self.counters.retained_uplink_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Event::Incoming(Packet::Publish(p)) => match self.topics.parse_uplink(&p.topic) {
                Ok((node, kind)) => batch.push(Inbound { node, kind, payload: p.payload }),
                Err(_) => {
                    self.counters.bad_topic.fetch_add(1, Ordering::Relaxed);
                }
            },
            Event::Incoming(Packet::ConnAck(_)) => {
                self.counters.connects.fetch_add(1, Ordering::Relaxed);
                self.up.store(true, Ordering::Relaxed);
                *failures = 0;
                // Clean session: the broker forgot our subscriptions, make them again.
                if self.filters.is_empty() {
                    self.signal_ready();
                } else {
                    *resubscribe = true;
                }
            }
            Event::Incoming(Packet::SubAck(_)) => self.signal_ready(),
            _ => {}
        }
    }

    fn signal_ready(&mut self) {
        if let Some(r) = self.ready.take() {
            let _ = r.try_send(());
        }
    }
}

/// Hands queued downlink messages to one connection's MQTT client, in order.
async fn publisher(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
    closed: CancellationToken,
    counters: Arc<Counters>,
) {
    loop {
        let chunk = tokio::select! {
            () = closed.cancelled() => return,
            c = rx.recv() => match c { Some(c) => c, None => return },
        };
        for m in chunk.msgs {
            let sent = tokio::select! {
                () = closed.cancelled() => return,
                r = client.publish(m.topic, downlink_qos(&m.payload), m.retain, m.payload) => r,
            };
            if sent.is_err() {
                return;
            }
            counters.published.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl MessageTransport for MqttCloud {
    fn close(&self) {
        self.closed.cancel();
        if let Ok(mut tasks) = self.tasks.lock() {
            for t in tasks.drain(..) {
                t.abort();
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }
}

impl Drop for MqttCloud {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl CloudTransport for MqttCloud {
    async fn send(&self, batch: Vec<Outbound>) -> Result<(), TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        let nb = self.brokers.len();
        let per = self.brokers.first().map_or(1, Vec::len);
        let mut queues: Vec<Vec<Publish>> = (0..nb * per).map(|_| Vec::new()).collect();
        // (count, largest payload, its topic, the payload limit on that topic)
        let mut oversize: Option<(usize, usize, String, usize)> = None;
        for m in batch {
            let topic = self.topics.downlink(&m.to);
            // rumqttc refuses a packet over its limit by dropping the connection, so the limit is
            // checked here on the real packet (topic included), per message: one oversize message
            // must not cost the batch's others.
            if conn::publish_packet_size(topic.len(), m.payload.len()) > self.max_packet {
                let max = conn::max_payload(topic.len(), self.max_packet);
                let o = oversize.get_or_insert((0, 0, String::new(), 0));
                o.0 += 1;
                if m.payload.len() > o.1 {
                    *o = (o.0, m.payload.len(), topic, max);
                }
                continue;
            }
            if let Destination::Node(n) = &m.to {
                let b = broker_for(n.as_str(), nb);
                let c = (stable_hash(0x636f_6e6e, n.as_str().as_bytes()) % per as u64) as usize;
                queues[b * per + c].push(Publish { topic, retain: m.retain, payload: m.payload });
            } else {
                // Fan-out reaches every broker (each holds its share of the fleet).
                for b in 0..nb {
                    queues[b * per].push(Publish {
                        topic: topic.clone(),
                        retain: m.retain,
                        payload: m.payload.clone(),
                    });
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.send_timeout;
        for (i, msgs) in queues.into_iter().enumerate() {
            if !msgs.is_empty() {
                self.enqueue(i / per, i % per, msgs, deadline).await?;
            }
        }
        match oversize {
            None => Ok(()),
            Some((dropped, largest, to, max)) => {
                self.counters.oversize_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
                Err(TransportError::OversizeDropped { dropped, largest, max, to })
            }
        }
    }

    async fn recv(&self, max: usize) -> Result<Vec<Inbound>, TransportError> {
        self.inbox.recv(max, &self.closed).await
    }

    /// Lists the retained specs on every broker over one short-lived connection each (client id
    /// `{client_id}-{tag}-{b}-scan`), which subscribes to the spec filters and waits for a marker message
    /// it publishes itself; see `docs/mqtt.md`. Up to 30 s per broker.
    async fn retained_specs(&self) -> Result<Vec<Destination>, TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        tokio::select! {
            () = self.closed.cancelled() => Err(TransportError::Closed),
            r = crate::scan::retained_specs(&self.topics, &self.cfg) => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kole_core::model::DesiredDigest;
    use kole_core::protocol::{self, DesiredState, Message, RegisterAck, RegisterOutcome};

    #[test]
    fn register_acks_go_at_qos_0_everything_else_at_qos_1() {
        let ack = protocol::encode(&Message::RegisterAck(RegisterAck {
            boot_id: 7,
            outcome: RegisterOutcome::Accepted,
            heartbeat_interval_ms: 30_000,
            groups: Vec::new(),
            desired: DesiredDigest::default(),
        }));
        assert_eq!(downlink_qos(&ack), QoS::AtMostOnce);
        let desired = protocol::encode(&Message::DesiredState(DesiredState {
            digest: DesiredDigest::default(),
            workloads: vec![],
        }));
        assert_eq!(downlink_qos(&desired), QoS::AtLeastOnce);
        for junk in [&b""[..], &b"\x01"[..], &[0xff, 0x81][..]] {
            assert_eq!(downlink_qos(junk), QoS::AtLeastOnce, "{junk:?}");
        }
    }
}
