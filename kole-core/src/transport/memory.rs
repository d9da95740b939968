//! The in-memory transport: a hub that behaves like an MQTT broker for one fleet, in one process.
//!
//! [`MemoryHub`] holds one cloud endpoint ([`MemoryHub::cloud`]) and any number of node endpoints
//! ([`MemoryHub::connect`]). It keeps MQTT's semantics where kole relies on them:
//!
//! - **Retained messages**: a message sent with `retain` is kept per destination and replayed to a
//!   node that connects (node, fleet and spec topics) or subscribes to a group later; a retained
//!   message with an empty payload deletes the retained one (and, as in MQTT, is still delivered to
//!   the current subscribers).
//! - **Sessions**: connecting a node name that is already connected takes the session over (the old
//!   endpoint is closed); subscriptions belong to a session and do not survive it.
//! - **Bounded queues**: every inbox has a capacity in messages and one in payload bytes
//!   ([`MemoryConfig`]). A node publishing into a full cloud inbox gets [`TransportError::Full`]
//!   (nothing of its batch is enqueued: the newest is refused, and the node may send it again); a
//!   downlink message for a node whose inbox is full is dropped for that node, as a broker drops
//!   for a slow subscriber — the protocol's digests repair the loss. Both are counted in
//!   [`HubStats::dropped_full`].
//! - **Payload limit**: a node's batch with a payload over [`MemoryConfig::max_payload_bytes`] is
//!   refused whole ([`TransportError::PayloadTooLarge`]); the cloud's oversize messages are dropped
//!   alone and the rest of the batch is sent ([`TransportError::OversizeDropped`]).
//!
//! Every message passes through one routing function per direction (`HubState::route_up` and
//! `HubState::route_down`), where fault injection attaches: [`MemoryHub::set_faults`] applies a
//! [`FaultPlan`] (drop, duplicate, delay; decided from the plan's seed, the message's sequence number
//! and the receiving node, so a replay of the same calls loses the same messages), and
//! [`MemoryHub::partition`] cuts nodes off while their endpoints stay open. Delayed messages wait in
//! their receiver's inbox until due on the hub's clock ([`MemoryHub::set_clock`]; by default
//! milliseconds since the hub was created) and are released by `recv` in due order; a receiver that
//! has only undue messages yields to the runtime and polls again, so no timer is needed.
//!
//! No async runtime is needed: waiting receivers park their [`Waker`]s under the hub's lock, and
//! every enqueue wakes them after the lock is released.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::Instant;

use async_trait::async_trait;

use crate::model::{NodeName, Timestamp, stable_hash};

use super::fault::{Fate, FaultPlan, Timed};
use super::{
    Bytes, CloudTransport, Destination, GroupName, Inbound, MessageTransport, NodeDelivery, NodePublish, NodeTransport,
    Outbound, TransportError,
};
use crate::protocol::Direction;

/// Capacities of a [`MemoryHub`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MemoryConfig {
    /// Uplink messages waiting for the cloud to receive them. Default 65,536.
    pub cloud_inbox_capacity: usize,
    /// Downlink messages waiting for one node to receive them. Default 256 (a node that connects to a
    /// fleet with more retained specs than this loses the excess; size it above the workload count).
    pub node_inbox_capacity: usize,
    /// Payload bytes waiting for the cloud to receive them, at most. Default 64 MiB (the count alone
    /// would let 65,536 messages of 256 KiB hold 16 GiB).
    pub cloud_inbox_max_bytes: usize,
    /// Payload bytes waiting for one node to receive them, at most. Default 16 MiB: 256 messages of
    /// the agents' 64 KiB decode limit.
    pub node_inbox_max_bytes: usize,
    /// Retained messages the hub keeps. Default 65,536.
    pub max_retained: usize,
    /// Largest payload accepted, like a broker's maximum packet size. Default 256 KiB.
    pub max_payload_bytes: usize,
}

impl MemoryConfig {
    fn cloud_bound(&self) -> Bound {
        Bound { count: self.cloud_inbox_capacity, bytes: self.cloud_inbox_max_bytes }
    }

    fn node_bound(&self) -> Bound {
        Bound { count: self.node_inbox_capacity, bytes: self.node_inbox_max_bytes }
    }
}

/// An inbox's limits: messages and payload bytes.
#[derive(Clone, Copy, Debug)]
struct Bound {
    count: usize,
    bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            cloud_inbox_capacity: 65_536,
            node_inbox_capacity: 256,
            cloud_inbox_max_bytes: 64 * 1024 * 1024,
            node_inbox_max_bytes: 16 * 1024 * 1024,
            max_retained: 65_536,
            max_payload_bytes: 256 * 1024,
        }
    }
}

/// Counters of a [`MemoryHub`], since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Uplink messages enqueued for the cloud.
    pub uplink_delivered: u64,
    /// Downlink deliveries enqueued for nodes (one per node reached).
    pub downlink_delivered: u64,
    /// Deliveries dropped, and uplink messages refused ([`TransportError::Full`]), because the
    /// receiver's inbox was full: [`MemoryConfig`]'s message or byte capacity.
    pub dropped_full: u64,
    /// Messages dropped because nobody was subscribed (and they were not retained).
    pub dropped_no_subscriber: u64,
    /// Retained messages held now.
    pub retained: usize,
    /// Node endpoints connected now.
    pub nodes_connected: usize,
    /// Messages (uplink) and deliveries (downlink) lost to the fault plan's drop probabilities.
    pub dropped_fault: u64,
    /// Messages and deliveries lost to a partition.
    pub dropped_partition: u64,
    /// Extra copies made by the fault plan's `duplicate`.
    pub duplicated: u64,
    /// Messages held back by the fault plan's delay now, not yet due.
    pub delayed: usize,
    /// Downlink messages the cloud sent over [`MemoryConfig::max_payload_bytes`], dropped alone
    /// (the rest of their batch was delivered).
    pub dropped_too_large: u64,
}

/// An in-memory broker for one fleet. Cheap to clone (all clones are the same hub).
#[derive(Clone, Debug)]
pub struct MemoryHub {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: MemoryConfig,
    state: Mutex<HubState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that matters
        // more than losing the hub, so keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a queued message weighs against its inbox's byte bound: its payload.
trait Weigh {
    fn bytes(&self) -> usize;
}

impl Weigh for Inbound {
    fn bytes(&self) -> usize {
        self.payload.len()
    }
}

impl Weigh for NodeDelivery {
    fn bytes(&self) -> usize {
        self.payload.len()
    }
}

#[derive(Debug)]
struct Inbox<T> {
    queue: VecDeque<T>,
    /// Messages a fault plan delays, by (due, sequence); they count against the inbox capacity.
    delayed: BinaryHeap<Timed<T>>,
    /// Payload bytes of `queue` and `delayed`.
    bytes: usize,
    wakers: Vec<Waker>,
}

impl<T: Weigh> Inbox<T> {
    fn new() -> Self {
        Self { queue: VecDeque::new(), delayed: BinaryHeap::new(), bytes: 0, wakers: Vec::new() }
    }

    fn len(&self) -> usize {
        self.queue.len() + self.delayed.len()
    }

    /// Whether `n` more messages of `bytes` payload bytes in all fit under `bound`.
    fn fits(&self, bound: Bound, n: usize, bytes: usize) -> bool {
        self.len() + n <= bound.count && self.bytes.saturating_add(bytes) <= bound.bytes
    }

    /// Drops the delayed messages (a partition cut them off).
    fn clear_delayed(&mut self) -> usize {
        let n = self.delayed.len();
        self.bytes -= self.delayed.drain().map(|t| t.item.bytes()).sum::<usize>();
        n
    }

    /// Moves the delayed messages due by `now` into the queue, in due order.
    fn release(&mut self, now: u64) {
        while self.delayed.peek().is_some_and(|t| t.due <= now) {
            if let Some(t) = self.delayed.pop() {
                self.queue.push_back(t.item);
            }
        }
    }

    fn poll_take(&mut self, max: usize, waker: &Waker) -> Poll<Vec<T>> {
        if max == 0 {
            return Poll::Ready(Vec::new());
        }
        if self.queue.is_empty() {
            if !self.wakers.iter().any(|w| w.will_wake(waker)) {
                self.wakers.push(waker.clone());
            }
            if !self.delayed.is_empty() {
                // No timer: come back when the runtime next gets to this task.
                waker.wake_by_ref();
            }
            return Poll::Pending;
        }
        let n = max.min(self.queue.len());
        let taken: Vec<T> = self.queue.drain(..n).collect();
        self.bytes -= taken.iter().map(Weigh::bytes).sum::<usize>();
        Poll::Ready(taken)
    }
}

#[derive(Debug)]
struct CloudSession {
    id: u64,
    inbox: Inbox<Inbound>,
}

#[derive(Debug)]
struct NodeSession {
    id: u64,
    inbox: Inbox<NodeDelivery>,
    groups: BTreeSet<GroupName>,
}

#[derive(Debug, Default)]
struct HubState {
    shut_down: bool,
    next_session: u64,
    cloud: Option<CloudSession>,
    nodes: HashMap<NodeName, NodeSession>,
    /// Group → subscribed nodes.
    groups: HashMap<GroupName, HashSet<NodeName>>,
    retained: BTreeMap<Destination, Bytes>,
    stats: HubStats,
    faults: HubFaults,
}

/// The hub's clock for delays: milliseconds.
#[derive(Clone)]
struct HubClock {
    origin: Instant,
    custom: Option<Arc<dyn Fn() -> Timestamp + Send + Sync>>,
}

impl HubClock {
    fn now(&self) -> u64 {
        match &self.custom {
            Some(clock) => clock().as_millis(),
            None => u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl Default for HubClock {
    fn default() -> Self {
        Self { origin: Instant::now(), custom: None }
    }
}

impl fmt::Debug for HubClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubClock").field("custom", &self.custom.is_some()).finish()
    }
}

/// Fault injection state.
#[derive(Debug, Default)]
struct HubFaults {
    plan: FaultPlan,
    partitioned: BTreeSet<NodeName>,
    clock: HubClock,
    /// Numbers every routed message (and retained replay): the fault plan's key.
    msg_seq: u64,
    /// Orders delayed messages with the same due time.
    delay_seq: u64,
    /// The clock, read once per routing operation while the plan has delays.
    now: u64,
}

impl HubFaults {
    fn next_msg(&mut self) -> u64 {
        self.msg_seq += 1;
        self.msg_seq
    }

    /// Reads the clock if delays need it.
    fn tick(&mut self) {
        if self.plan.has_delay() {
            self.now = self.clock.now();
        }
    }

    /// The fate of one delivery of message `msg` to `node` (hashing the name keeps it independent
    /// of the order the hub visits subscribers in).
    fn fate(&self, direction: Direction, msg: u64, node: &NodeName) -> Fate {
        if self.plan.is_off() {
            return Fate::CLEAN;
        }
        let node = stable_hash(0x6875_622d_6661_756c, node.as_str().as_bytes());
        self.plan.fate(direction, msg.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ node)
    }

    /// Queues the copies `fate` lets through into `inbox` (or its delay heap); returns how many.
    fn enqueue<T: Clone + Weigh>(&mut self, inbox: &mut Inbox<T>, item: T, fate: Fate) -> u64 {
        let mut n = 0;
        let bytes = item.bytes();
        if !self.plan.has_delay() {
            for _ in fate.copies() {
                inbox.queue.push_back(item.clone());
                inbox.bytes += bytes;
                n += 1;
            }
            return n;
        }
        for delay in fate.copies() {
            self.delay_seq += 1;
            inbox.delayed.push(Timed { due: self.now.saturating_add(delay), seq: self.delay_seq, item: item.clone() });
            inbox.bytes += bytes;
            n += 1;
        }
        n
    }
}

/// Wakers collected under the lock, woken after it is released.
type Wake = Vec<Waker>;

fn wake_all(wakers: Wake) {
    for w in wakers {
        w.wake();
    }
}

impl HubState {
    fn session_id(&mut self) -> u64 {
        self.next_session += 1;
        self.next_session
    }

    fn node(&mut self, name: &NodeName, session: u64) -> Option<&mut NodeSession> {
        self.nodes.get_mut(name).filter(|s| s.id == session)
    }

    fn cloud(&mut self, session: u64) -> Option<&mut CloudSession> {
        self.cloud.as_mut().filter(|s| s.id == session)
    }

    /// Ends a node's session: its pending receivers wake up to `Closed`, its subscriptions go.
    fn end_node(&mut self, name: &NodeName, wake: &mut Wake) {
        if let Some(session) = self.nodes.remove(name) {
            for g in &session.groups {
                if let Some(members) = self.groups.get_mut(g) {
                    members.remove(name);
                    if members.is_empty() {
                        self.groups.remove(g);
                    }
                }
            }
            wake.extend(session.inbox.wakers);
        }
    }

    /// Every uplink message passes here (the fault-injection hook point for the uplink).
    fn route_up(
        &mut self,
        bound: Bound,
        node: &NodeName,
        batch: Vec<NodePublish>,
        wake: &mut Wake,
    ) -> Result<(), TransportError> {
        let Some(cloud) = self.cloud.as_mut() else {
            self.stats.dropped_no_subscriber += batch.len() as u64;
            return Ok(());
        };
        // The newest is refused whole: the node learns it and may send again, and what the cloud
        // already queued is older, so it tells the state sooner.
        let bytes = batch.iter().map(|p| p.payload.len()).sum();
        if !cloud.inbox.fits(bound, batch.len(), bytes) {
            self.stats.dropped_full += batch.len() as u64;
            return Err(if cloud.inbox.len() + batch.len() > bound.count {
                TransportError::Full { queue: "cloud inbox (messages)", capacity: bound.count }
            } else {
                TransportError::Full { queue: "cloud inbox (payload bytes)", capacity: bound.bytes }
            });
        }
        if self.faults.partitioned.contains(node) {
            self.stats.dropped_partition += batch.len() as u64;
            return Ok(());
        }
        if self.faults.plan.is_off() {
            self.stats.uplink_delivered += batch.len() as u64;
            cloud.inbox.bytes += bytes;
            cloud.inbox.queue.extend(batch.into_iter().map(|p| Inbound {
                node: node.clone(),
                kind: p.kind,
                payload: p.payload.into(),
            }));
        } else {
            self.faults.tick();
            for p in batch {
                let key = self.faults.next_msg();
                let fate = self.faults.fate(Direction::Uplink, key, node);
                if fate.dropped {
                    self.stats.dropped_fault += 1;
                    continue;
                }
                self.stats.duplicated += u64::from(fate.duplicated);
                let inbound = Inbound { node: node.clone(), kind: p.kind, payload: p.payload.into() };
                self.stats.uplink_delivered += self.faults.enqueue(&mut cloud.inbox, inbound, fate);
            }
        }
        wake.append(&mut cloud.inbox.wakers);
        Ok(())
    }

    /// Every downlink message passes here (the fault-injection hook point for the downlink).
    fn route_down(&mut self, bound: Bound, to: Destination, payload: Bytes, retain: bool, wake: &mut Wake) {
        if retain {
            if payload.is_empty() {
                self.retained.remove(&to);
            } else {
                self.retained.insert(to.clone(), payload.clone());
            }
        }
        let HubState { nodes, groups, stats, faults, .. } = self;
        faults.tick();
        let key = faults.next_msg();
        let mut reached = 0u64;
        let mut deliver = |name: &NodeName, session: &mut NodeSession| {
            reached += 1;
            push_delivery(
                session,
                name,
                bound,
                NodeDelivery { from: to.clone(), payload: payload.clone(), retained: false },
                key,
                faults,
                stats,
                wake,
            );
        };
        match &to {
            Destination::Node(n) => {
                if let Some(s) = nodes.get_mut(n) {
                    deliver(n, s);
                }
            }
            Destination::Group(g) | Destination::GroupWorkloadSpec(g, _) => {
                for n in groups.get(g).into_iter().flatten() {
                    if let Some(s) = nodes.get_mut(n) {
                        deliver(n, s);
                    }
                }
            }
            Destination::Fleet | Destination::WorkloadSpec(_) => nodes.iter_mut().for_each(|(n, s)| deliver(n, s)),
        }
        if reached == 0 && !retain {
            stats.dropped_no_subscriber += 1;
        }
    }

    /// Replays the retained messages `filter` selects into one node's inbox.
    fn replay(&mut self, name: &NodeName, bound: Bound, filter: impl Fn(&Destination) -> bool, wake: &mut Wake) {
        let HubState { nodes, retained, stats, faults, .. } = self;
        let Some(session) = nodes.get_mut(name) else {
            return;
        };
        faults.tick();
        for (to, payload) in retained.iter().filter(|(to, _)| filter(to)) {
            let key = faults.next_msg();
            push_delivery(
                session,
                name,
                bound,
                NodeDelivery { from: to.clone(), payload: payload.clone(), retained: true },
                key,
                faults,
                stats,
                wake,
            );
        }
    }
}

/// Queues one delivery for one node: the downlink's fault hook (partition, drop, duplicate, delay).
#[allow(clippy::too_many_arguments)] // one call site per routing path; a struct would only rename them
fn push_delivery(
    session: &mut NodeSession,
    name: &NodeName,
    bound: Bound,
    delivery: NodeDelivery,
    key: u64,
    faults: &mut HubFaults,
    stats: &mut HubStats,
    wake: &mut Wake,
) {
    if faults.partitioned.contains(name) {
        stats.dropped_partition += 1;
        return;
    }
    // The newest is dropped: a broker does the same for a slow subscriber, and the digests repair it.
    if !session.inbox.fits(bound, 1, delivery.payload.len()) {
        stats.dropped_full += 1;
        return;
    }
    let fate = faults.fate(Direction::Downlink, key, name);
    if fate.dropped {
        stats.dropped_fault += 1;
        return;
    }
    stats.duplicated += u64::from(fate.duplicated);
    stats.downlink_delivered += faults.enqueue(&mut session.inbox, delivery, fate);
    wake.append(&mut session.inbox.wakers);
}

impl MemoryHub {
    /// A hub with the given capacities and nobody connected.
    pub fn new(config: MemoryConfig) -> Self {
        Self { shared: Arc::new(Shared { config, state: Mutex::new(HubState::default()) }) }
    }

    /// The hub's capacities.
    pub fn config(&self) -> &MemoryConfig {
        &self.shared.config
    }

    /// Connects the cloud endpoint. A hub has one: connecting again takes over (the previous cloud
    /// endpoint is closed and its unreceived messages are dropped), as a restarted controller does.
    pub fn cloud(&self) -> Result<MemoryCloud, TransportError> {
        let mut wake = Wake::new();
        let mut st = self.shared.lock();
        if st.shut_down {
            return Err(TransportError::Closed);
        }
        let id = st.session_id();
        if let Some(old) = st.cloud.replace(CloudSession { id, inbox: Inbox::new() }) {
            wake.extend(old.inbox.wakers);
        }
        drop(st);
        wake_all(wake);
        Ok(MemoryCloud { shared: self.shared.clone(), session: id })
    }

    /// Connects a node endpoint with a clean session: subscribed to the node's own topic, the fleet
    /// topic and the fleet-wide spec topics, whose retained messages it receives at once. A node
    /// already connected under this name is taken over (its old endpoint is closed).
    pub fn connect(&self, node: NodeName) -> Result<MemoryNode, TransportError> {
        let bound = self.shared.config.node_bound();
        let mut wake = Wake::new();
        let mut st = self.shared.lock();
        if st.shut_down {
            return Err(TransportError::Closed);
        }
        st.end_node(&node, &mut wake);
        let id = st.session_id();
        st.nodes.insert(node.clone(), NodeSession { id, inbox: Inbox::new(), groups: BTreeSet::new() });
        st.replay(
            &node,
            bound,
            |to| match to {
                Destination::Node(n) => *n == node,
                Destination::Fleet | Destination::WorkloadSpec(_) => true,
                Destination::Group(_) | Destination::GroupWorkloadSpec(..) => false,
            },
            &mut wake,
        );
        drop(st);
        wake_all(wake);
        Ok(MemoryNode { shared: self.shared.clone(), node, session: id })
    }

    /// Closes every endpoint and refuses new ones.
    pub fn shutdown(&self) {
        let mut wake = Wake::new();
        let mut st = self.shared.lock();
        st.shut_down = true;
        if let Some(cloud) = st.cloud.take() {
            wake.extend(cloud.inbox.wakers);
        }
        for (_, session) in st.nodes.drain() {
            wake.extend(session.inbox.wakers);
        }
        st.groups.clear();
        drop(st);
        wake_all(wake);
    }

    /// The hub's counters.
    pub fn stats(&self) -> HubStats {
        let st = self.shared.lock();
        let delayed = st.cloud.as_ref().map_or(0, |c| c.inbox.delayed.len())
            + st.nodes.values().map(|s| s.inbox.delayed.len()).sum::<usize>();
        HubStats { retained: st.retained.len(), nodes_connected: st.nodes.len(), delayed, ..st.stats }
    }

    /// The retained message of a destination, if any.
    pub fn retained(&self, to: &Destination) -> Option<Bytes> {
        self.shared.lock().retained.get(to).cloned()
    }

    /// Applies a fault plan to every message routed from now on (uplink per message, downlink per
    /// node reached, retained replays included). Messages already delayed are released when due.
    pub fn set_faults(&self, plan: FaultPlan) {
        self.shared.lock().faults.plan = plan;
    }

    /// The fault plan in force ([`FaultPlan::NONE`] unless [`set_faults`](Self::set_faults) was
    /// called).
    pub fn faults(&self) -> FaultPlan {
        self.shared.lock().faults.plan
    }

    /// Replaces the clock that delays are measured on (by default milliseconds since the hub was
    /// created). It is read only while the fault plan has delays, under the hub's lock, so it must
    /// not call into the hub. A test drives time by hand with it.
    pub fn set_clock(&self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) {
        self.shared.lock().faults.clock.custom = Some(Arc::new(clock));
    }

    /// Cuts nodes off while their endpoints stay open: what they publish and what is routed to them
    /// vanishes (counted in [`HubStats::dropped_partition`]), and so do deliveries still delayed for
    /// them. Messages already in their inboxes stay. Names need not be connected.
    pub fn partition(&self, nodes: &[NodeName]) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        for name in nodes {
            st.faults.partitioned.insert(name.clone());
            if let Some(session) = st.nodes.get_mut(name) {
                st.stats.dropped_partition += session.inbox.clear_delayed() as u64;
            }
        }
    }

    /// Heals partitions of these nodes; what vanished stays lost.
    pub fn heal(&self, nodes: &[NodeName]) {
        let mut st = self.shared.lock();
        for name in nodes {
            st.faults.partitioned.remove(name);
        }
    }

    /// Heals every partition.
    pub fn heal_all(&self) {
        self.shared.lock().faults.partitioned.clear();
    }
}

/// The cloud endpoint of a [`MemoryHub`]. Dropping it closes it.
#[derive(Debug)]
pub struct MemoryCloud {
    shared: Arc<Shared>,
    session: u64,
}

impl MessageTransport for MemoryCloud {
    fn close(&self) {
        let mut st = self.shared.lock();
        if st.cloud.as_ref().is_some_and(|c| c.id == self.session)
            && let Some(old) = st.cloud.take()
        {
            drop(st);
            wake_all(old.inbox.wakers);
        }
    }

    fn is_closed(&self) -> bool {
        self.shared.lock().cloud(self.session).is_none()
    }
}

#[async_trait]
impl CloudTransport for MemoryCloud {
    async fn send(&self, mut batch: Vec<Outbound>) -> Result<(), TransportError> {
        let config = &self.shared.config;
        let max = config.max_payload_bytes;
        let mut wake = Wake::new();
        let mut st = self.shared.lock();
        if st.cloud(self.session).is_none() {
            return Err(TransportError::Closed);
        }
        // One oversize message must not cost the batch's other messages (registration acks).
        let mut oversize: Option<TransportError> = None;
        if batch.iter().any(|o| o.payload.len() > max) {
            let (big, ok): (Vec<Outbound>, Vec<Outbound>) = batch.into_iter().partition(|o| o.payload.len() > max);
            batch = ok;
            let largest = big.iter().max_by_key(|o| o.payload.len());
            oversize = Some(TransportError::OversizeDropped {
                dropped: big.len(),
                largest: largest.map_or(0, |o| o.payload.len()),
                max,
                to: largest.map_or_else(String::new, |o| format!("{:?}", o.to)),
            });
        }
        // Conservative (a key retained twice in one batch counts twice), so a batch is all or nothing.
        let new_retained =
            batch.iter().filter(|o| o.retain && !o.payload.is_empty() && !st.retained.contains_key(&o.to)).count();
        if st.retained.len() + new_retained > config.max_retained {
            return Err(TransportError::Full { queue: "retained store", capacity: config.max_retained });
        }
        if let Some(TransportError::OversizeDropped { dropped, .. }) = &oversize {
            st.stats.dropped_too_large += *dropped as u64;
        }
        for o in batch {
            st.route_down(config.node_bound(), o.to, Bytes::from(o.payload), o.retain, &mut wake);
        }
        drop(st);
        wake_all(wake);
        oversize.map_or(Ok(()), Err)
    }

    async fn recv(&self, max: usize) -> Result<Vec<Inbound>, TransportError> {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            let st = &mut *st;
            match st.cloud.as_mut().filter(|c| c.id == self.session) {
                Some(c) => {
                    if !c.inbox.delayed.is_empty() {
                        c.inbox.release(st.faults.clock.now());
                    }
                    c.inbox.poll_take(max, cx.waker()).map(Ok)
                }
                None => Poll::Ready(Err(TransportError::Closed)),
            }
        })
        .await
    }

    async fn retained_specs(&self) -> Result<Vec<Destination>, TransportError> {
        let mut st = self.shared.lock();
        if st.cloud(self.session).is_none() {
            return Err(TransportError::Closed);
        }
        Ok(st
            .retained
            .keys()
            .filter(|d| matches!(d, Destination::WorkloadSpec(_) | Destination::GroupWorkloadSpec(..)))
            .cloned()
            .collect())
    }
}

impl Drop for MemoryCloud {
    fn drop(&mut self) {
        self.close();
    }
}

/// A node endpoint of a [`MemoryHub`]. Dropping it closes it.
#[derive(Debug)]
pub struct MemoryNode {
    shared: Arc<Shared>,
    node: NodeName,
    session: u64,
}

impl MessageTransport for MemoryNode {
    fn close(&self) {
        let mut wake = Wake::new();
        let mut st = self.shared.lock();
        if st.node(&self.node, self.session).is_some() {
            st.end_node(&self.node, &mut wake);
        }
        drop(st);
        wake_all(wake);
    }

    fn is_closed(&self) -> bool {
        self.shared.lock().node(&self.node, self.session).is_none()
    }
}

#[async_trait]
impl NodeTransport for MemoryNode {
    fn node(&self) -> &NodeName {
        &self.node
    }

    async fn publish(&self, batch: Vec<NodePublish>) -> Result<(), TransportError> {
        let config = &self.shared.config;
        if let Some(big) = batch.iter().find(|p| p.payload.len() > config.max_payload_bytes) {
            return Err(TransportError::PayloadTooLarge { len: big.payload.len(), max: config.max_payload_bytes });
        }
        let mut wake = Wake::new();
        let mut st = self.shared.lock();
        if st.node(&self.node, self.session).is_none() {
            return Err(TransportError::Closed);
        }
        let result = st.route_up(config.cloud_bound(), &self.node, batch, &mut wake);
        drop(st);
        wake_all(wake);
        result
    }

    async fn recv(&self, max: usize) -> Result<Vec<NodeDelivery>, TransportError> {
        poll_fn(|cx| {
            let mut st = self.shared.lock();
            let st = &mut *st;
            match st.nodes.get_mut(&self.node).filter(|s| s.id == self.session) {
                Some(s) => {
                    if !s.inbox.delayed.is_empty() {
                        s.inbox.release(st.faults.clock.now());
                    }
                    s.inbox.poll_take(max, cx.waker()).map(Ok)
                }
                None => Poll::Ready(Err(TransportError::Closed)),
            }
        })
        .await
    }

    async fn subscribe(&self, group: &GroupName) -> Result<(), TransportError> {
        let bound = self.shared.config.node_bound();
        let mut wake = Wake::new();
        let mut st = self.shared.lock();
        let Some(session) = st.node(&self.node, self.session) else {
            return Err(TransportError::Closed);
        };
        session.groups.insert(group.clone());
        st.groups.entry(group.clone()).or_default().insert(self.node.clone());
        // As MQTT 3.1.1: every SUBSCRIBE replays the retained messages it matches.
        st.replay(
            &self.node,
            bound,
            |to| matches!(to, Destination::Group(g) | Destination::GroupWorkloadSpec(g, _) if g == group),
            &mut wake,
        );
        drop(st);
        wake_all(wake);
        Ok(())
    }

    async fn unsubscribe(&self, group: &GroupName) -> Result<(), TransportError> {
        let mut st = self.shared.lock();
        let Some(session) = st.node(&self.node, self.session) else {
            return Err(TransportError::Closed);
        };
        session.groups.remove(group);
        if let Some(members) = st.groups.get_mut(group) {
            members.remove(&self.node);
            if members.is_empty() {
                st.groups.remove(group);
            }
        }
        Ok(())
    }
}

impl Drop for MemoryNode {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use super::*;
    use crate::model::{DesiredDigest, WorkloadId};
    use crate::protocol::{self, Command, CommandKind, DecodeLimits, Heartbeat, Message, NodeHealth, UplinkKind};
    use crate::transport::fault::FaultPlan;

    /// Every async step of these tests is bounded.
    async fn bounded<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f).await.expect("timed out")
    }

    fn name(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    fn group(g: &str) -> GroupName {
        GroupName::new(g).unwrap()
    }

    fn command(id: u64) -> Vec<u8> {
        protocol::encode(&Message::Command(Command { id, kind: CommandKind::Ping }))
    }

    fn out(to: Destination, payload: Vec<u8>, retain: bool) -> Outbound {
        Outbound { to, payload, retain }
    }

    async fn ids(node: &dyn NodeTransport, max: usize) -> Vec<u64> {
        bounded(node.recv(max))
            .await
            .unwrap()
            .iter()
            .map(|d| match d.decode(&DecodeLimits::default()).unwrap() {
                Message::Command(c) => c.id,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Whether `recv` would wait (nothing queued).
    async fn is_idle(node: &dyn NodeTransport) -> bool {
        tokio::time::timeout(Duration::from_millis(20), node.recv(1)).await.is_err()
    }

    #[tokio::test]
    async fn uplink_round_trip_through_trait_objects() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud().unwrap());
        let node: Arc<dyn NodeTransport> = Arc::new(hub.connect(name("edge-a")).unwrap());
        let hbs: Vec<_> = (1..=3)
            .map(|seq| Heartbeat { seq, boot_id: 9, applied: DesiredDigest(seq.into()), health: NodeHealth::OK })
            .collect();
        let batch = hbs
            .iter()
            .map(|hb| NodePublish { kind: UplinkKind::Heartbeat, payload: protocol::encode(&Message::Heartbeat(*hb)) })
            .collect();
        bounded(node.publish(batch)).await.unwrap();
        let got = bounded(cloud.recv(2)).await.unwrap();
        assert_eq!(got.len(), 2, "recv returns at most max");
        let rest = bounded(cloud.recv(100)).await.unwrap();
        let decoded: Vec<_> = got
            .iter()
            .chain(&rest)
            .map(|i| {
                assert_eq!(i.node, name("edge-a"));
                i.decode(&DecodeLimits::default()).unwrap()
            })
            .collect();
        assert_eq!(decoded, hbs.into_iter().map(Message::Heartbeat).collect::<Vec<_>>());
        assert_eq!(hub.stats().uplink_delivered, 3);
    }

    #[tokio::test]
    async fn recv_waits_until_a_message_arrives() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = Arc::new(hub.cloud().unwrap());
        let node = hub.connect(name("edge-a")).unwrap();
        let waiter = tokio::spawn({
            let cloud = cloud.clone();
            async move { cloud.recv(10).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        bounded(node.publish(vec![NodePublish { kind: UplinkKind::Status, payload: vec![1, 2, 3] }])).await.unwrap();
        let got = bounded(waiter).await.unwrap().unwrap();
        assert_eq!(
            got,
            vec![Inbound { node: name("edge-a"), kind: UplinkKind::Status, payload: vec![1, 2, 3].into() }]
        );
        assert!(bounded(cloud.recv(0)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn downlink_reaches_exactly_its_destination() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let a = hub.connect(name("edge-a")).unwrap();
        let b = hub.connect(name("edge-b")).unwrap();
        bounded(a.subscribe(&group("site-1"))).await.unwrap();
        bounded(cloud.send(vec![
            out(Destination::Node(name("edge-a")), command(1), false),
            out(Destination::Group(group("site-1")), command(2), false),
            out(Destination::Fleet, command(3), false),
            out(Destination::Node(name("edge-c")), command(4), false),
        ]))
        .await
        .unwrap();
        assert_eq!(ids(&a, 10).await, [1, 2, 3]);
        assert_eq!(ids(&b, 10).await, [3]);
        assert_eq!(hub.stats().dropped_no_subscriber, 1, "edge-c is not connected");
        bounded(a.unsubscribe(&group("site-1"))).await.unwrap();
        bounded(cloud.send(vec![out(Destination::Group(group("site-1")), command(5), false)])).await.unwrap();
        assert!(is_idle(&a).await);
    }

    #[tokio::test]
    async fn retained_messages_reach_late_joiners_and_empty_payload_deletes() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let spec = Destination::WorkloadSpec(WorkloadId::new("default/app").unwrap());
        let gspec = Destination::GroupWorkloadSpec(group("site-1"), WorkloadId::new("default/app").unwrap());
        bounded(cloud.send(vec![
            out(spec.clone(), command(10), true),
            out(gspec.clone(), command(11), true),
            out(Destination::Node(name("edge-a")), command(12), true),
            out(Destination::Fleet, command(13), false),
        ]))
        .await
        .unwrap();
        assert_eq!(hub.stats().retained, 3);

        let a = hub.connect(name("edge-a")).unwrap();
        let got = bounded(a.recv(10)).await.unwrap();
        assert!(got.iter().all(|d| d.retained));
        let mut froms: Vec<_> = got.iter().map(|d| d.from.clone()).collect();
        froms.sort();
        assert_eq!(froms, [Destination::Node(name("edge-a")), spec.clone()]);
        bounded(a.subscribe(&group("site-1"))).await.unwrap();
        let got = bounded(a.recv(10)).await.unwrap();
        assert_eq!((got.len(), &got[0].from, got[0].retained), (1, &gspec, true));

        // Deleting: delivered (empty) to current subscribers, gone for later ones.
        bounded(cloud.send(vec![out(spec.clone(), Vec::new(), true)])).await.unwrap();
        let got = bounded(a.recv(10)).await.unwrap();
        assert_eq!((got[0].from.clone(), got[0].payload.len(), got[0].retained), (spec.clone(), 0, false));
        assert_eq!(hub.retained(&spec), None);
        let b = hub.connect(name("edge-b")).unwrap();
        assert!(is_idle(&b).await, "nothing retained for edge-b any more");
    }

    #[tokio::test]
    async fn full_cloud_inbox_refuses_whole_batches() {
        let hub = MemoryHub::new(MemoryConfig { cloud_inbox_capacity: 2, ..MemoryConfig::default() });
        let cloud = hub.cloud().unwrap();
        let node = hub.connect(name("edge-a")).unwrap();
        let hb = |n: u8| NodePublish { kind: UplinkKind::Heartbeat, payload: vec![n] };
        let err = bounded(node.publish(vec![hb(1), hb(2), hb(3)])).await.unwrap_err();
        assert!(matches!(err, TransportError::Full { capacity: 2, .. }), "{err}");
        bounded(node.publish(vec![hb(1), hb(2)])).await.unwrap();
        assert!(matches!(bounded(node.publish(vec![hb(3)])).await, Err(TransportError::Full { .. })));
        assert_eq!(bounded(cloud.recv(10)).await.unwrap().len(), 2);
        bounded(node.publish(vec![hb(3)])).await.unwrap();
    }

    #[tokio::test]
    async fn the_cloud_inbox_is_bounded_in_bytes_and_small_messages_pass_after_a_drain() {
        let cfg = MemoryConfig { cloud_inbox_max_bytes: 10_000, ..MemoryConfig::default() };
        let hub = MemoryHub::new(cfg);
        let cloud = hub.cloud().unwrap();
        let node = hub.connect(name("edge-a")).unwrap();
        let big = || NodePublish { kind: UplinkKind::Status, payload: vec![7; 3_000] };
        let queued = || hub.shared.lock().cloud.as_ref().map_or(0, |c| c.inbox.bytes);
        let mut refused = 0;
        for _ in 0..100 {
            if let Err(err) = bounded(node.publish(vec![big()])).await {
                assert!(matches!(err, TransportError::Full { capacity: 10_000, .. }), "{err}");
                assert!(err.to_string().contains("payload bytes"), "{err}");
                refused += 1;
            }
            assert!(queued() <= 10_000, "{} bytes queued", queued());
        }
        // 3 fit in 10,000 bytes though the count allows 65,536.
        assert_eq!((refused, queued()), (97, 9_000));
        assert_eq!(hub.stats().dropped_full, 97);
        // A small one still fits; after the cloud drains, large ones pass again.
        bounded(node.publish(vec![NodePublish { kind: UplinkKind::Heartbeat, payload: vec![1; 500] }])).await.unwrap();
        assert_eq!(bounded(cloud.recv(100)).await.unwrap().len(), 4);
        assert_eq!(queued(), 0);
        bounded(node.publish(vec![big(), big(), big()])).await.unwrap();
        assert_eq!(bounded(cloud.recv(100)).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_node_inbox_is_bounded_in_bytes_and_small_messages_pass_after_a_drain() {
        let cfg = MemoryConfig { node_inbox_max_bytes: 10_000, ..MemoryConfig::default() };
        let hub = MemoryHub::new(cfg);
        let cloud = hub.cloud().unwrap();
        let node = hub.connect(name("edge-a")).unwrap();
        let queued = || hub.shared.lock().nodes.get(&name("edge-a")).map_or(0, |s| s.inbox.bytes);
        for _ in 0..50 {
            let batch = (0..2).map(|_| out(Destination::Node(name("edge-a")), vec![7; 3_000], false)).collect();
            bounded(cloud.send(batch)).await.unwrap();
            assert!(queued() <= 10_000, "{} bytes queued", queued());
        }
        assert_eq!(queued(), 9_000);
        assert_eq!(hub.stats().dropped_full, 97);
        bounded(cloud.send(vec![out(Destination::Fleet, command(1), false)])).await.unwrap();
        let got = bounded(node.recv(100)).await.unwrap();
        assert_eq!(got.len(), 4, "three large ones and the small command");
        assert_eq!(queued(), 0);
        bounded(cloud.send(vec![out(Destination::Fleet, command(2), false)])).await.unwrap();
        assert_eq!(ids(&node, 10).await, [2]);
    }

    #[tokio::test]
    async fn full_node_inbox_drops_and_counts() {
        let hub = MemoryHub::new(MemoryConfig { node_inbox_capacity: 2, ..MemoryConfig::default() });
        let cloud = hub.cloud().unwrap();
        let node = hub.connect(name("edge-a")).unwrap();
        let batch = (1..=4).map(|i| out(Destination::Fleet, command(i), false)).collect();
        bounded(cloud.send(batch)).await.unwrap();
        assert_eq!(ids(&node, 10).await, [1, 2]);
        assert_eq!(hub.stats().dropped_full, 2);
    }

    #[tokio::test]
    async fn limits_on_payloads_and_retained_store() {
        let hub = MemoryHub::new(MemoryConfig { max_payload_bytes: 4, max_retained: 1, ..MemoryConfig::default() });
        let cloud = hub.cloud().unwrap();
        let node = hub.connect(name("edge-a")).unwrap();
        let big = NodePublish { kind: UplinkKind::Register, payload: vec![0; 5] };
        assert!(matches!(
            bounded(node.publish(vec![big])).await,
            Err(TransportError::PayloadTooLarge { len: 5, max: 4 })
        ));
        // An oversize message is dropped alone: the rest of its batch (an ack) still goes out.
        let batch =
            vec![out(Destination::Fleet, vec![0; 5], false), out(Destination::Node(name("edge-a")), vec![7], false)];
        let err = bounded(cloud.send(batch)).await.unwrap_err();
        assert!(matches!(err, TransportError::OversizeDropped { dropped: 1, largest: 5, max: 4, .. }), "{err}");
        assert!(err.to_string().contains("the rest of the batch was sent"), "{err}");
        let got = bounded(node.recv(8)).await.unwrap();
        assert_eq!(got.iter().map(|d| &d.payload[..]).collect::<Vec<_>>(), [&[7u8][..]]);
        assert_eq!(hub.stats().dropped_too_large, 1);
        bounded(cloud.send(vec![out(Destination::Fleet, vec![1], true)])).await.unwrap();
        // Replacing a retained message is fine; a second one is not.
        bounded(cloud.send(vec![out(Destination::Fleet, vec![2], true)])).await.unwrap();
        let err = bounded(cloud.send(vec![out(Destination::Node(name("edge-a")), vec![3], true)])).await.unwrap_err();
        assert!(matches!(err, TransportError::Full { queue: "retained store", .. }), "{err}");
    }

    #[tokio::test]
    async fn close_takeover_and_shutdown_wake_receivers() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let first = Arc::new(hub.connect(name("edge-a")).unwrap());
        bounded(first.subscribe(&group("g"))).await.unwrap();
        let waiter = tokio::spawn({
            let first = first.clone();
            async move { first.recv(1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // A second connection under the same name takes the session over.
        let second = hub.connect(name("edge-a")).unwrap();
        assert!(matches!(bounded(waiter).await.unwrap(), Err(TransportError::Closed)));
        assert!(first.is_closed() && !second.is_closed());
        assert!(matches!(bounded(first.publish(vec![])).await, Err(TransportError::Closed)));
        // The new session starts clean: no group subscription.
        bounded(cloud.send(vec![out(Destination::Group(group("g")), command(1), false)])).await.unwrap();
        assert!(is_idle(&second).await);
        // Closing the old endpoint (or dropping it) leaves the new session alone.
        drop(first);
        assert!(!second.is_closed());
        second.close();
        assert!(matches!(bounded(second.recv(1)).await, Err(TransportError::Closed)));
        assert_eq!(hub.stats().nodes_connected, 0);

        let cloud = Arc::new(cloud);
        let waiter = tokio::spawn({
            let cloud = cloud.clone();
            async move { cloud.recv(1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        hub.shutdown();
        assert!(matches!(bounded(waiter).await.unwrap(), Err(TransportError::Closed)));
        assert!(cloud.is_closed());
        assert!(matches!(hub.connect(name("edge-b")), Err(TransportError::Closed)));
        assert!(matches!(hub.cloud(), Err(TransportError::Closed)));
    }

    #[tokio::test]
    async fn uplink_without_a_cloud_is_dropped_and_counted() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let node = hub.connect(name("edge-a")).unwrap();
        bounded(node.publish(vec![NodePublish { kind: UplinkKind::Heartbeat, payload: vec![1] }])).await.unwrap();
        assert_eq!(hub.stats().dropped_no_subscriber, 1);
        // A cloud taking over starts with an empty inbox; the old one is closed.
        let c1 = hub.cloud().unwrap();
        bounded(node.publish(vec![NodePublish { kind: UplinkKind::Heartbeat, payload: vec![2] }])).await.unwrap();
        let c2 = hub.cloud().unwrap();
        assert!(c1.is_closed());
        assert!(tokio::time::timeout(Duration::from_millis(20), c2.recv(1)).await.is_err());
    }

    fn command_ids(got: &[NodeDelivery]) -> Vec<u64> {
        got.iter()
            .map(|d| match d.decode(&DecodeLimits::default()).unwrap() {
                Message::Command(c) => c.id,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn hb_publish(n: u16) -> NodePublish {
        NodePublish { kind: UplinkKind::Heartbeat, payload: n.to_be_bytes().to_vec() }
    }

    /// Receives everything queued (and due) at the cloud now.
    async fn drain_cloud(cloud: &MemoryCloud) -> Vec<Inbound> {
        let mut all = Vec::new();
        while let Ok(batch) = tokio::time::timeout(Duration::from_millis(20), cloud.recv(usize::MAX)).await {
            all.extend(batch.unwrap());
        }
        all
    }

    /// Receives everything queued (and due) for a node now.
    async fn drain_node(node: &MemoryNode) -> Vec<NodeDelivery> {
        let mut all = Vec::new();
        while let Ok(batch) = tokio::time::timeout(Duration::from_millis(20), node.recv(usize::MAX)).await {
            all.extend(batch.unwrap());
        }
        all
    }

    #[tokio::test]
    async fn faults_drop_all_none_or_about_half() {
        for (p, lo, hi) in [(1.0, 4000, 4000), (0.0, 0, 0), (0.5, 1750, 2250)] {
            let hub = MemoryHub::new(MemoryConfig { node_inbox_capacity: 8192, ..MemoryConfig::default() });
            hub.set_faults(FaultPlan { drop_uplink: p, drop_downlink: p, seed: 9, ..FaultPlan::default() });
            let cloud = hub.cloud().unwrap();
            let node = hub.connect(name("edge-a")).unwrap();
            bounded(node.publish((0..4000).map(hb_publish).collect())).await.unwrap();
            let up = drain_cloud(&cloud).await.len() as u64;
            bounded(cloud.send((0..4000).map(|i| out(Destination::Fleet, command(i), false)).collect())).await.unwrap();
            let down = drain_node(&node).await.len() as u64;
            let s = hub.stats();
            // Binomial(8000 draws, 0.5) over both directions: ±250 per direction is over 7 sd.
            assert_eq!(up + down + s.dropped_fault, 8000, "p={p}: {s:?}");
            assert!((lo..=hi).contains(&(4000 - up)), "p={p}: uplink dropped {}", 4000 - up);
            assert!((lo..=hi).contains(&(4000 - down)), "p={p}: downlink dropped {}", 4000 - down);
        }
    }

    #[tokio::test]
    async fn faults_duplicate_in_both_directions() {
        let hub = MemoryHub::new(MemoryConfig::default());
        hub.set_faults(FaultPlan { duplicate: 1.0, ..FaultPlan::default() });
        assert_eq!(hub.faults().duplicate, 1.0);
        let cloud = hub.cloud().unwrap();
        let a = hub.connect(name("edge-a")).unwrap();
        let b = hub.connect(name("edge-b")).unwrap();
        bounded(cloud.send(vec![out(Destination::Fleet, command(1), false)])).await.unwrap();
        assert_eq!(ids(&a, 10).await, [1, 1]);
        assert_eq!(ids(&b, 10).await, [1, 1]);
        bounded(a.publish(vec![hb_publish(5)])).await.unwrap();
        let got = drain_cloud(&cloud).await;
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|i| i.node == name("edge-a") && *i.payload == [0, 5]));
        assert_eq!(hub.stats().duplicated, 3);
    }

    /// Runs a fixed script under faults and returns what every node and the cloud received.
    async fn faulty_script(seed: u64) -> Vec<(String, Vec<u64>)> {
        let hub = MemoryHub::new(MemoryConfig::default());
        hub.set_faults(FaultPlan {
            drop_uplink: 0.3,
            drop_downlink: 0.3,
            duplicate: 0.3,
            seed,
            ..FaultPlan::default()
        });
        let cloud = hub.cloud().unwrap();
        let nodes: Vec<_> = (0..20).map(|i| hub.connect(name(&format!("edge-{i}"))).unwrap()).collect();
        for (i, n) in nodes.iter().enumerate().step_by(2) {
            bounded(n.subscribe(&group("even"))).await.unwrap();
            bounded(n.publish(vec![hb_publish(i as u16)])).await.unwrap();
        }
        for i in 0..40 {
            let to = if i % 2 == 0 { Destination::Fleet } else { Destination::Group(group("even")) };
            bounded(cloud.send(vec![out(to, command(i), false)])).await.unwrap();
        }
        let mut seen = Vec::new();
        for n in &nodes {
            let got = drain_node(n).await;
            seen.push((n.node().to_string(), command_ids(&got)));
        }
        let up = drain_cloud(&cloud).await;
        seen.push(("cloud".into(), up.iter().map(|i| u64::from(i.payload[1])).collect()));
        seen
    }

    #[tokio::test]
    async fn faults_replay_with_the_same_seed() {
        let a = faulty_script(1).await;
        assert_eq!(a, faulty_script(1).await);
        assert_ne!(a, faulty_script(2).await);
    }

    #[tokio::test]
    async fn faults_delay_until_due_on_the_hub_clock_in_due_order() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let hub = MemoryHub::new(MemoryConfig::default());
        let clock = Arc::new(AtomicU64::new(1_000));
        hub.set_clock({
            let clock = clock.clone();
            move || Timestamp::from_millis(clock.load(Ordering::SeqCst))
        });
        let plan = FaultPlan { min_delay_ms: 1, max_delay_ms: 100, seed: 4, ..FaultPlan::default() };
        hub.set_faults(plan);
        let cloud = hub.cloud().unwrap();
        let node = hub.connect(name("edge-a")).unwrap();
        bounded(node.publish((0..30).map(hb_publish).collect())).await.unwrap();
        assert_eq!(hub.stats().delayed, 30);
        assert!(drain_cloud(&cloud).await.is_empty(), "nothing due yet");

        // The exact order: by (delay, send order), from the same fates the hub drew.
        let faults = HubFaults { plan, ..HubFaults::default() };
        let mut expected: Vec<(u64, u16)> = (0..30u16)
            .map(|i| (faults.fate(Direction::Uplink, u64::from(i) + 1, &name("edge-a")).delay_ms, i))
            .collect();
        expected.sort();
        let half: Vec<u16> = expected.iter().filter(|(d, _)| *d <= 50).map(|(_, i)| *i).collect();
        let all: Vec<u16> = expected.iter().map(|(_, i)| *i).collect();
        assert!(!half.is_empty() && half.len() < 30);
        assert_ne!(all, (0..30).collect::<Vec<_>>(), "delays reorder");

        clock.store(1_050, Ordering::SeqCst);
        let got: Vec<u16> =
            drain_cloud(&cloud).await.iter().map(|i| u16::from_be_bytes([i.payload[0], i.payload[1]])).collect();
        assert_eq!(got, half);
        clock.store(1_100, Ordering::SeqCst);
        let rest: Vec<u16> =
            drain_cloud(&cloud).await.iter().map(|i| u16::from_be_bytes([i.payload[0], i.payload[1]])).collect();
        assert_eq!([got, rest].concat(), all);

        // Downlink too; a waiting receiver picks the message up once the clock passes its due time.
        bounded(cloud.send(vec![out(Destination::Fleet, command(7), false)])).await.unwrap();
        assert!(is_idle(&node).await);
        let node = Arc::new(node);
        let waiter = tokio::spawn({
            let node = node.clone();
            async move { node.recv(1).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        clock.store(1_200, Ordering::SeqCst);
        let got = bounded(waiter).await.unwrap().unwrap();
        assert_eq!(command_ids(&got), [7]);
        assert_eq!(hub.stats().delayed, 0);
    }

    #[tokio::test]
    async fn partition_then_heal_on_the_hub() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let a = hub.connect(name("edge-a")).unwrap();
        let b = hub.connect(name("edge-b")).unwrap();
        hub.partition(&[name("edge-a")]);
        bounded(a.publish(vec![hb_publish(1)])).await.unwrap();
        bounded(b.publish(vec![hb_publish(2)])).await.unwrap();
        bounded(cloud.send(vec![out(Destination::Fleet, command(3), false)])).await.unwrap();
        assert!(!a.is_closed(), "a partitioned node still believes it is connected");
        assert!(is_idle(&a).await);
        assert_eq!(ids(&b, 10).await, [3]);
        let up = drain_cloud(&cloud).await;
        assert_eq!(up.iter().map(|i| i.node.clone()).collect::<Vec<_>>(), [name("edge-b")]);
        assert_eq!(hub.stats().dropped_partition, 2);

        hub.heal(&[name("edge-a")]);
        bounded(a.publish(vec![hb_publish(4)])).await.unwrap();
        bounded(cloud.send(vec![out(Destination::Node(name("edge-a")), command(5), false)])).await.unwrap();
        assert_eq!(ids(&a, 10).await, [5]);
        assert_eq!(drain_cloud(&cloud).await.len(), 1);

        // Deliveries still delayed when the cut comes are lost with it.
        hub.set_clock(|| Timestamp::from_millis(0));
        hub.set_faults(FaultPlan { min_delay_ms: 10, max_delay_ms: 10, ..FaultPlan::default() });
        bounded(cloud.send(vec![out(Destination::Fleet, command(6), false)])).await.unwrap();
        hub.partition(&[name("edge-a"), name("edge-b")]);
        hub.heal_all();
        hub.set_clock(|| Timestamp::from_millis(100));
        assert!(is_idle(&a).await && is_idle(&b).await);
        assert_eq!(hub.stats().dropped_partition, 4);
    }

    #[tokio::test]
    async fn fleet_message_reaches_100k_nodes_exactly_once_through_the_hooks() {
        let n = 100_000;
        let hub = MemoryHub::new(MemoryConfig::default());
        // Uplink faults only: the downlink goes through the fault hook with clean fates.
        hub.set_faults(FaultPlan { drop_uplink: 1.0, seed: 3, ..FaultPlan::default() });
        let cloud = hub.cloud().unwrap();
        let nodes: Vec<_> = (0..n).map(|i| hub.connect(name(&format!("edge-{i}"))).unwrap()).collect();
        bounded(cloud.send(vec![out(Destination::Fleet, command(1), false)])).await.unwrap();
        for node in &nodes {
            let got = bounded(node.recv(10)).await.unwrap();
            assert_eq!(command_ids(&got), [1], "{}", node.node());
        }
        let s = hub.stats();
        assert_eq!((s.downlink_delivered, s.dropped_fault, s.duplicated), (n as u64, 0, 0));
    }
}
