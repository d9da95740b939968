//! A synchronous, deterministic, virtual-time network that plays the MQTT broker for up to millions
//! of simulated nodes in one process.
//!
//! [`SimNetwork`] is what a simulator drives instead of [`MemoryHub`](kole_core::transport::memory::MemoryHub)
//! when the nodes are state machines rather than tasks: no async, no locks, no threads, no clock.
//! Every call takes the virtual time `now`; messages become due at `now` plus the
//! [`FaultPlan`]'s delay and are handed out by [`take_uplink`](SimNetwork::take_uplink) and
//! [`take_downlink`](SimNetwork::take_downlink) in due order (ties in send order). With the same
//! plan (seed included) and the same calls, every run delivers the same messages in the same order.
//!
//! Broker semantics are those of `docs/protocol.md` and of the in-memory hub:
//!
//! - A node is a dense [`NodeId`], added once and disconnected at first. [`connect`](SimNetwork::connect)
//!   opens a clean session subscribed to the node's own topic, the fleet topic and every fleet-wide spec
//!   topic, and replays their retained messages (`retained: true`); [`subscribe`](SimNetwork::subscribe)
//!   adds a group (its topic and spec topics) and replays the group's retained messages.
//!   [`disconnect`](SimNetwork::disconnect) drops the session: its subscriptions and everything still
//!   queued for it.
//! - A retained [`Outbound`] replaces the destination's retained message; one with an empty payload
//!   deletes it (and, as in MQTT, is still delivered to the current subscribers).
//! - Uplink messages reach the cloud as [`Inbound`]s stamped with the sender's name: the identity comes
//!   from the "topic", as the broker ACL guarantees.
//!
//! Faults, in the style of raft-rs's test network: per-message drop, duplicate and delay from the
//! [`FaultPlan`]; [`partition`](SimNetwork::partition) cuts nodes off while they believe they are
//! connected (messages to and from them vanish) until [`heal`](SimNetwork::heal);
//! [`isolate_cloud`](SimNetwork::isolate_cloud) cuts the controller off the broker;
//! [`restart_cloud`](SimNetwork::restart_cloud) and [`restart_broker`](SimNetwork::restart_broker) lose
//! what is in flight.
//!
//! Costs: a fan-out shares one payload (`Arc`) among its deliveries; without delays it is queued as one
//! batch of `(node, session)` pairs (8 bytes per node reached), with delays as one heap entry per
//! delivery. A node's fixed overhead is its name, a slot in an open-addressing name index, and 24 bytes
//! of state (session epoch, flags, up to three group subscriptions inline);
//! [`node_memory_bytes`](SimNetwork::node_memory_bytes) reports it.
//!
//! ```
//! use kole_core::model::{NodeName, Timestamp, WorkloadId};
//! use kole_core::transport::fault::FaultPlan;
//! use kole_sim::net::SimNetwork;
//! use kole_core::transport::{Destination, NodePublish, Outbound, UplinkKind};
//!
//! let mut net = SimNetwork::new(FaultPlan::default());
//! let a = net.add_node(NodeName::new("edge-a")?)?;
//! let b = net.add_node(NodeName::new("edge-b")?)?;
//! let t0 = Timestamp::from_millis(0);
//!
//! // A retained spec published before anyone connects reaches every node on connect...
//! let spec = Destination::WorkloadSpec(WorkloadId::new("default/app")?);
//! net.cloud_send(vec![Outbound { to: spec.clone(), payload: vec![1, 2, 3], retain: true }], t0);
//! net.connect(a, t0)?;
//! net.connect(b, t0)?;
//! // ...unless the node is cut off.
//! net.partition(&[b]);
//! let mut got = Vec::new();
//! net.take_downlink(t0, usize::MAX, |node, d| got.push((node, d.from, d.retained)));
//! assert_eq!(got, [(a, spec, true)]);
//!
//! net.node_publish(a, NodePublish { kind: UplinkKind::Heartbeat, payload: vec![9] }, t0)?;
//! let up = net.take_uplink(t0, 16);
//! assert_eq!((up[0].node.as_str(), &up[0].payload[..]), ("edge-a", &[9][..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::mem::size_of;
use std::sync::Arc;

use kole_core::model::{NodeName, Timestamp, stable_hash};
use kole_core::protocol::Direction;
use kole_core::transport::fault::{Fate, FaultPlan, Timed};
use kole_core::transport::{Bytes, Destination, GroupName, Inbound, NodeDelivery, NodePublish, Outbound, UplinkKind};

/// A node of a [`SimNetwork`]: a dense index, `0..len`, in the order nodes were added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The id as an index into the simulator's own per-node arrays.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// A call a [`SimNetwork`] refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The id was not returned by this network's [`SimNetwork::add_node`].
    #[error("node id {id} is not in this simulated network ({len} nodes); use an id from add_node")]
    UnknownNode {
        /// The id.
        id: u32,
        /// How many nodes the network has.
        len: usize,
    },
    /// The node has no session: connect it before publishing or subscribing.
    #[error("node {node} is not connected; connect it before publishing or subscribing")]
    NotConnected {
        /// The node.
        node: NodeName,
    },
    /// The network is full (ids are `u32`).
    #[error("the simulated network holds at most {max} nodes")]
    TooManyNodes {
        /// The limit.
        max: usize,
    },
}

/// Counters of a [`SimNetwork`], since it was created (`retained`, `*_in_flight` and `nodes*` are
/// current values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Uplink messages connected nodes published.
    pub uplink_sent: u64,
    /// Uplink messages handed to the cloud (duplicates included).
    pub uplink_delivered: u64,
    /// Downlink messages the cloud sent (one per [`Outbound`], before fan-out).
    pub downlink_sent: u64,
    /// Downlink deliveries handed to nodes (one per node reached; retained replays and duplicates
    /// included).
    pub downlink_delivered: u64,
    /// Uplink messages lost to the plan's `drop_uplink`.
    pub dropped_uplink_fault: u64,
    /// Downlink deliveries lost to the plan's `drop_downlink`.
    pub dropped_downlink_fault: u64,
    /// Messages and deliveries lost to a partition (at send or, when queued before the cut, at
    /// delivery).
    pub dropped_partition: u64,
    /// Messages lost because the cloud was isolated: its sends, uplink meant for it, and uplink in
    /// flight when it was cut off.
    pub dropped_cloud_isolated: u64,
    /// Uplink messages in flight when the cloud restarted.
    pub dropped_cloud_restart: u64,
    /// Messages in flight (both directions) when the broker restarted.
    pub dropped_broker_restart: u64,
    /// Deliveries discarded because their node disconnected (or reconnected) after they were queued.
    pub dropped_disconnected: u64,
    /// Non-retained downlink messages that no node was subscribed to.
    pub dropped_no_subscriber: u64,
    /// Extra copies made by the plan's `duplicate`.
    pub duplicated: u64,
    /// Retained messages held now.
    pub retained: usize,
    /// Uplink messages queued now.
    pub uplink_in_flight: usize,
    /// Downlink deliveries queued now (including stale ones for nodes that disconnected since, which
    /// are discarded when their turn comes).
    pub downlink_in_flight: usize,
    /// Nodes added.
    pub nodes: usize,
    /// Nodes with a session now.
    pub nodes_connected: usize,
    /// Nodes partitioned now.
    pub nodes_partitioned: usize,
}

/// A downlink message as published.
#[derive(Debug)]
struct DownMsg {
    from: Destination,
    payload: Bytes,
}

/// A queued message: shared by every delivery of a fan-out and by the retained store, or owned by
/// the one delivery of a reply to a single node (an ack, a catch-up), which then costs no
/// allocation of its own and is handed over without a copy.
#[derive(Debug)]
enum Queued {
    Shared(Arc<DownMsg>),
    Own(DownMsg),
}

impl Queued {
    fn msg(&self) -> &DownMsg {
        match self {
            Queued::Shared(m) => m,
            Queued::Own(m) => m,
        }
    }
}

/// Group subscriptions of one node: up to three inline, more on the heap.
#[derive(Debug)]
enum GroupSet {
    Inline { len: u8, ids: [u32; GroupSet::INLINE] },
    Spilled(Box<SpilledGroups>),
}

/// The boxed form of [`GroupSet`] (a newtype keeps the enum at 16 bytes).
#[derive(Debug)]
struct SpilledGroups(Vec<u32>);

impl Default for GroupSet {
    fn default() -> Self {
        GroupSet::Inline { len: 0, ids: [0; GroupSet::INLINE] }
    }
}

impl GroupSet {
    const INLINE: usize = 3;

    fn as_slice(&self) -> &[u32] {
        match self {
            GroupSet::Inline { len, ids } => ids.get(..usize::from(*len)).unwrap_or(&[]),
            GroupSet::Spilled(s) => &s.0,
        }
    }

    fn insert(&mut self, group: u32) -> bool {
        if self.as_slice().contains(&group) {
            return false;
        }
        match self {
            GroupSet::Inline { len, ids } if usize::from(*len) < GroupSet::INLINE => {
                ids[usize::from(*len)] = group;
                *len += 1;
            }
            GroupSet::Inline { .. } => {
                let mut all = self.as_slice().to_vec();
                all.push(group);
                *self = GroupSet::Spilled(Box::new(SpilledGroups(all)));
            }
            GroupSet::Spilled(s) => s.0.push(group),
        }
        true
    }

    fn remove(&mut self, group: u32) -> bool {
        let Some(pos) = self.as_slice().iter().position(|&g| g == group) else {
            return false;
        };
        match self {
            GroupSet::Inline { len, ids } => {
                ids.copy_within(pos + 1..usize::from(*len), pos);
                *len -= 1;
            }
            GroupSet::Spilled(s) => {
                s.0.remove(pos);
            }
        }
        true
    }

    fn heap_bytes(&self) -> usize {
        match self {
            GroupSet::Inline { .. } => 0,
            GroupSet::Spilled(s) => size_of::<SpilledGroups>() + s.0.capacity() * size_of::<u32>(),
        }
    }
}

/// Per-node state (40 bytes), the name beside the session: a message's route reads both, so they
/// share a cache line instead of being two misses in two arrays.
#[derive(Debug)]
struct NodeState {
    name: NodeName,
    /// Bumped on every connect and disconnect; a queued delivery carries the epoch it was queued in
    /// and is discarded when the node's epoch moved on (its session ended).
    epoch: u32,
    connected: bool,
    partitioned: bool,
    groups: GroupSet,
}

/// Destinations whose lookups [`SimNetwork::cloud_send`] warms together.
const WARM_GROUP: usize = 16;

/// Name → id, open addressing with linear probing over the node states (no second copy of names).
/// Each slot packs 32 bits of the name's hash above the id, so a probe that meets another name
/// rejects it without loading that name (two cache misses saved per collision).
#[derive(Debug, Default)]
struct NameIndex {
    /// `(hash << 32) | id` words, [`NameIndex::EMPTY`] for a free slot; the length is zero or a
    /// power of two.
    slots: Vec<u64>,
}

impl NameIndex {
    const EMPTY: u64 = u64::MAX;
    const SEED: u64 = 0x6b6f_6c65_2d73_696d;

    fn hash(name: &str) -> u64 {
        stable_hash(Self::SEED, name.as_bytes())
    }

    /// The tag kept beside the id: the hash's upper half (the lower bits pick the slot).
    fn tag(hash: u64) -> u64 {
        hash >> 32
    }

    /// Slots for `n` names at a load of at most 3/4.
    fn slots_for(n: usize) -> usize {
        (n.saturating_mul(4) / 3 + 1).next_power_of_two().max(16)
    }

    fn find(&self, nodes: &[NodeState], name: &str) -> Option<u32> {
        self.find_by(nodes, Self::hash(name), |n| n.as_str() == name)
    }

    /// [`NameIndex::find`] of a name that may be one this network handed out (a message's sender,
    /// echoed back as a reply's destination): the same allocation compares equal without reading
    /// the characters, a cache miss saved ([`NodeName`]'s equality tries the pointer first).
    fn find_name(&self, nodes: &[NodeState], name: &NodeName) -> Option<u32> {
        self.find_by(nodes, Self::hash(name.as_str()), |n| n == name)
    }

    fn find_by(&self, nodes: &[NodeState], hash: u64, is: impl Fn(&NodeName) -> bool) -> Option<u32> {
        let mask = self.slots.len().checked_sub(1)?;
        let tag = Self::tag(hash);
        let mut i = hash as usize & mask;
        loop {
            let e = *self.slots.get(i)?;
            if e == Self::EMPTY {
                return None;
            }
            let id = e as u32;
            if e >> 32 == tag && nodes.get(id as usize).is_some_and(|s| is(&s.name)) {
                return Some(id);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot where a lookup of `name` starts: read for a group of names in one pass, their
    /// misses overlap instead of coming one after another. Its id is the likely answer.
    fn first_slot(&self, name: &str) -> u64 {
        let mask = self.slots.len().wrapping_sub(1);
        self.slots.get(Self::hash(name) as usize & mask).copied().unwrap_or(Self::EMPTY)
    }

    /// Indexes `nodes[id]`'s name (not yet indexed), growing first when needed.
    fn insert(&mut self, nodes: &[NodeState], id: u32) {
        if (id as usize + 1).saturating_mul(4) > self.slots.len().saturating_mul(3) {
            self.rebuild(nodes, Self::slots_for(nodes.len().max(self.slots.len())));
        }
        if let Some(node) = nodes.get(id as usize) {
            self.place(node.name.as_str(), id);
        }
    }

    fn rebuild(&mut self, nodes: &[NodeState], slots: usize) {
        self.slots = vec![Self::EMPTY; slots];
        // Only ids below the one being inserted are indexed yet; the caller places that one.
        for (id, node) in nodes.iter().enumerate().take(nodes.len().saturating_sub(1)) {
            self.place(node.name.as_str(), id as u32);
        }
    }

    fn place(&mut self, name: &str, id: u32) {
        let mask = self.slots.len() - 1;
        let hash = Self::hash(name);
        let mut i = hash as usize & mask;
        while self.slots[i] != Self::EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = (Self::tag(hash) << 32) | u64::from(id);
    }
}

/// A group's subscribers (connected nodes only), in id order so fan-out is deterministic.
#[derive(Debug)]
struct Group {
    name: GroupName,
    members: BTreeSet<u32>,
}

/// Nodes, their names and subscriptions.
#[derive(Debug, Default)]
struct Registry {
    index: NameIndex,
    nodes: Vec<NodeState>,
    groups: Vec<Group>,
    group_ids: BTreeMap<GroupName, u32>,
    partitioned: BTreeSet<u32>,
    connected: usize,
}

impl Registry {
    fn check(&self, node: NodeId) -> Result<usize, SimError> {
        if node.index() < self.nodes.len() {
            Ok(node.index())
        } else {
            Err(SimError::UnknownNode { id: node.0, len: self.nodes.len() })
        }
    }

    fn check_connected(&self, node: NodeId) -> Result<usize, SimError> {
        let i = self.check(node)?;
        match self.nodes.get(i) {
            Some(s) if s.connected => Ok(i),
            Some(s) => Err(SimError::NotConnected { node: s.name.clone() }),
            None => Err(SimError::UnknownNode { id: node.0, len: self.nodes.len() }),
        }
    }

    fn group_id(&mut self, group: &GroupName) -> u32 {
        if let Some(&g) = self.group_ids.get(group) {
            return g;
        }
        // Fewer distinct groups than u32::MAX is a given: each costs a String.
        let g = self.groups.len() as u32;
        self.groups.push(Group { name: group.clone(), members: BTreeSet::new() });
        self.group_ids.insert(group.clone(), g);
        g
    }
}

/// Retained messages, by kind of destination (so connect and subscribe replay with one lookup).
#[derive(Debug, Default)]
struct RetainedStore {
    /// `Fleet` and `WorkloadSpec` destinations.
    fleet: BTreeMap<Destination, Arc<DownMsg>>,
    /// `Group` and `GroupWorkloadSpec` destinations, by group.
    groups: BTreeMap<GroupName, BTreeMap<Destination, Arc<DownMsg>>>,
    /// `Node` destinations (also for nodes not added yet).
    nodes: BTreeMap<NodeName, Arc<DownMsg>>,
    len: usize,
}

impl RetainedStore {
    /// Stores `msg` as its destination's retained message, or deletes that when the payload is empty.
    fn update(&mut self, msg: &Arc<DownMsg>) {
        let delete = msg.payload.is_empty();
        let to = msg.from.clone();
        let changed = match to {
            Destination::Node(n) if delete => self.nodes.remove(&n).map(|_| -1),
            Destination::Node(n) => Some(i8::from(self.nodes.insert(n, msg.clone()).is_none())),
            Destination::Fleet | Destination::WorkloadSpec(_) if delete => self.fleet.remove(&to).map(|_| -1),
            Destination::Fleet | Destination::WorkloadSpec(_) => {
                Some(i8::from(self.fleet.insert(to, msg.clone()).is_none()))
            }
            Destination::Group(ref g) | Destination::GroupWorkloadSpec(ref g, _) => {
                if delete {
                    let group = self.groups.get_mut(g);
                    let removed = group.and_then(|m| m.remove(&to).map(|_| -1));
                    if self.groups.get(g).is_some_and(BTreeMap::is_empty) {
                        self.groups.remove(g);
                    }
                    removed
                } else {
                    let g = g.clone();
                    let added = self.groups.entry(g).or_default().insert(to, msg.clone()).is_none();
                    Some(i8::from(added))
                }
            }
        };
        match changed {
            Some(1) => self.len += 1,
            Some(-1) => self.len = self.len.saturating_sub(1),
            _ => {}
        }
    }

    fn get(&self, to: &Destination) -> Option<&Arc<DownMsg>> {
        match to {
            Destination::Node(n) => self.nodes.get(n),
            Destination::Fleet | Destination::WorkloadSpec(_) => self.fleet.get(to),
            Destination::Group(g) | Destination::GroupWorkloadSpec(g, _) => self.groups.get(g).and_then(|m| m.get(to)),
        }
    }
}

#[derive(Debug)]
struct UpItem {
    node: u32,
    kind: UplinkKind,
    payload: Vec<u8>,
}

/// One delivery: node, the session epoch it was queued in.
type Target = (u32, u32);

#[derive(Debug)]
struct DownItem {
    target: Target,
    retained: bool,
    msg: Arc<DownMsg>,
}

#[derive(Debug)]
enum Targets {
    One(Target),
    Many { list: Vec<Target>, next: usize },
}

/// Deliveries of one message queued without delay.
#[derive(Debug)]
struct DownBatch {
    due: u64,
    retained: bool,
    msg: Queued,
    targets: Targets,
}

/// Queues of both directions.
///
/// Invariant: a message goes to a FIFO only while its direction's heap is empty and the plan has no
/// delay, and FIFOs are drained first; so every FIFO entry precedes every heap entry in
/// `(due, seq)` order and the FIFO is in due order (time never goes backwards).
#[derive(Debug, Default)]
struct Queues {
    up_fifo: VecDeque<(u64, UpItem)>,
    up_heap: BinaryHeap<Timed<UpItem>>,
    down_fifo: VecDeque<DownBatch>,
    down_heap: BinaryHeap<Timed<DownItem>>,
    seq: u64,
    up_len: usize,
    down_len: usize,
}

impl Queues {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn push_up(&mut self, item: UpItem, due: u64, fifo: bool) {
        self.up_len += 1;
        if fifo {
            self.up_fifo.push_back((due, item));
        } else {
            let seq = self.next_seq();
            self.up_heap.push(Timed { due, seq, item });
        }
    }

    fn clear_up(&mut self) -> usize {
        self.up_fifo.clear();
        self.up_heap.clear();
        std::mem::take(&mut self.up_len)
    }

    fn clear_down(&mut self) -> usize {
        self.down_fifo.clear();
        self.down_heap.clear();
        std::mem::take(&mut self.down_len)
    }
}

/// Collects the deliveries of one message: a single target needs no allocation.
#[derive(Default)]
struct TargetList {
    first: Option<Target>,
    rest: Vec<Target>,
}

impl TargetList {
    fn push(&mut self, t: Target, hint: usize) {
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(t),
            None => self.rest.push(t),
            Some(first) => {
                self.rest.reserve(hint.max(2));
                self.rest.push(first);
                self.rest.push(t);
            }
        }
    }

    fn into_targets(self) -> Option<(Targets, usize)> {
        if let Some(first) = self.first {
            return Some((Targets::One(first), 1));
        }
        let n = self.rest.len();
        (n > 0).then_some((Targets::Many { list: self.rest, next: 0 }, n))
    }
}

/// The simulated broker and network. See the [module docs](self).
#[derive(Debug, Default)]
pub struct SimNetwork {
    plan: FaultPlan,
    reg: Registry,
    retained: RetainedStore,
    queues: Queues,
    stats: NetStats,
    cloud_isolated: bool,
    /// The latest `now` seen, in milliseconds: virtual time never goes backwards.
    clock: u64,
    /// Numbers every message (and every retained replay) for the fault plan's keys.
    msg_seq: u64,
}

/// The fault key of one delivery of message `msg` to `node`.
fn delivery_key(msg: u64, node: u32) -> u64 {
    msg.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(node)
}

impl SimNetwork {
    /// An empty network (no nodes, no retained messages) with the given faults.
    pub fn new(plan: FaultPlan) -> Self {
        Self { plan, ..Self::default() }
    }

    /// An empty network with room for `nodes` nodes, so adding them does not reallocate.
    pub fn with_capacity(plan: FaultPlan, nodes: usize) -> Self {
        let mut net = Self::new(plan);
        net.reg.nodes.reserve_exact(nodes);
        net.reg.index.slots = vec![NameIndex::EMPTY; NameIndex::slots_for(nodes)];
        net
    }

    /// The fault plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// Replaces the fault plan; it applies to messages sent from now on (queued ones keep their fate).
    pub fn set_plan(&mut self, plan: FaultPlan) {
        self.plan = plan;
    }

    /// The latest virtual time seen by any call.
    pub fn now(&self) -> Timestamp {
        Timestamp(self.clock)
    }

    fn advance(&mut self, now: Timestamp) -> u64 {
        self.clock = self.clock.max(now.0);
        self.clock
    }

    fn next_msg(&mut self) -> u64 {
        self.msg_seq += 1;
        self.msg_seq
    }

    /// Adds a node, disconnected, and returns its id (ids are dense, in order of addition). Adding a
    /// name that is already there returns its id and changes nothing.
    pub fn add_node(&mut self, name: NodeName) -> Result<NodeId, SimError> {
        if let Some(id) = self.reg.index.find(&self.reg.nodes, name.as_str()) {
            return Ok(NodeId(id));
        }
        let max = (NameIndex::EMPTY - 1) as usize;
        let id = match u32::try_from(self.reg.nodes.len()) {
            Ok(id) if (id as usize) < max => id,
            _ => return Err(SimError::TooManyNodes { max }),
        };
        self.reg.nodes.push(NodeState {
            name,
            epoch: 0,
            connected: false,
            partitioned: false,
            groups: GroupSet::default(),
        });
        self.reg.index.insert(&self.reg.nodes, id);
        Ok(NodeId(id))
    }

    /// The id of the node called `name`.
    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.reg.index.find(&self.reg.nodes, name).map(NodeId)
    }

    /// The name of a node.
    pub fn name(&self, node: NodeId) -> Option<&NodeName> {
        self.reg.nodes.get(node.index()).map(|s| &s.name)
    }

    /// How many nodes were added.
    pub fn len(&self) -> usize {
        self.reg.nodes.len()
    }

    /// Whether no node was added.
    pub fn is_empty(&self) -> bool {
        self.reg.nodes.is_empty()
    }

    /// Whether the node has a session (partitioned nodes still believe they have one).
    pub fn is_connected(&self, node: NodeId) -> bool {
        self.reg.nodes.get(node.index()).is_some_and(|s| s.connected)
    }

    /// Loads the node's session state and its name's pointer, returning a value that depends on
    /// both: for a caller that warms a batch of nodes in one pass before working on them (see
    /// `Simulation::warm`), so the misses of a random node order overlap.
    pub fn touch(&self, node: NodeId) -> u64 {
        let i = node.index();
        self.reg.nodes.get(i).map_or(0, |s| u64::from(s.epoch) ^ s.name.as_str().len() as u64)
    }

    /// Whether the node is partitioned.
    pub fn is_partitioned(&self, node: NodeId) -> bool {
        self.reg.nodes.get(node.index()).is_some_and(|s| s.partitioned)
    }

    /// The groups the node's session is subscribed to, in subscription order.
    pub fn subscriptions(&self, node: NodeId) -> Vec<&GroupName> {
        let Some(state) = self.reg.nodes.get(node.index()) else {
            return Vec::new();
        };
        state.groups.as_slice().iter().filter_map(|&g| self.reg.groups.get(g as usize).map(|g| &g.name)).collect()
    }

    /// Opens a clean session for the node at `now`: subscribed to its own topic, the fleet topic and
    /// every fleet-wide spec topic, whose retained messages are queued for it (`retained: true`). A
    /// node already connected is disconnected first (a session takeover).
    pub fn connect(&mut self, node: NodeId, now: Timestamp) -> Result<(), SimError> {
        let i = self.reg.check(node)?;
        let now = self.advance(now);
        self.end_session(i);
        let Some(state) = self.reg.nodes.get_mut(i) else {
            return Ok(());
        };
        state.epoch = state.epoch.wrapping_add(1);
        state.connected = true;
        self.reg.connected += 1;
        let own = self.reg.nodes.get(i).and_then(|s| self.retained.nodes.get(&s.name)).cloned();
        let replay: Vec<Arc<DownMsg>> = own.into_iter().chain(self.retained.fleet.values().cloned()).collect();
        for msg in replay {
            self.replay(node.0, &msg, now);
        }
        Ok(())
    }

    /// Ends the node's session: its group subscriptions go, and deliveries still queued for it are
    /// discarded (counted in [`NetStats::dropped_disconnected`] when their turn comes). Idempotent.
    pub fn disconnect(&mut self, node: NodeId) -> Result<(), SimError> {
        let i = self.reg.check(node)?;
        self.end_session(i);
        Ok(())
    }

    fn end_session(&mut self, i: usize) {
        let Some(state) = self.reg.nodes.get_mut(i) else {
            return;
        };
        if !state.connected {
            return;
        }
        state.connected = false;
        state.epoch = state.epoch.wrapping_add(1);
        let groups = std::mem::take(&mut state.groups);
        for &g in groups.as_slice() {
            if let Some(group) = self.reg.groups.get_mut(g as usize) {
                group.members.remove(&(i as u32));
            }
        }
        self.reg.connected -= 1;
    }

    /// Subscribes the node's session to a group (its topic and spec topics) at `now`, and queues the
    /// group's retained messages for it (every subscribe replays them, as MQTT 3.1.1 does).
    pub fn subscribe(&mut self, node: NodeId, group: &GroupName, now: Timestamp) -> Result<(), SimError> {
        let i = self.reg.check_connected(node)?;
        let now = self.advance(now);
        let g = self.reg.group_id(group);
        if let Some(state) = self.reg.nodes.get_mut(i) {
            state.groups.insert(g);
        }
        if let Some(group) = self.reg.groups.get_mut(g as usize) {
            group.members.insert(node.0);
        }
        let replay: Vec<Arc<DownMsg>> =
            self.retained.groups.get(group).map(|m| m.values().cloned().collect()).unwrap_or_default();
        for msg in replay {
            self.replay(node.0, &msg, now);
        }
        Ok(())
    }

    /// Unsubscribes the node's session from a group (nothing happens if it was not subscribed).
    pub fn unsubscribe(&mut self, node: NodeId, group: &GroupName) -> Result<(), SimError> {
        let i = self.reg.check_connected(node)?;
        let Some(&g) = self.reg.group_ids.get(group) else {
            return Ok(());
        };
        if let Some(state) = self.reg.nodes.get_mut(i) {
            state.groups.remove(g);
        }
        if let Some(group) = self.reg.groups.get_mut(g as usize) {
            group.members.remove(&node.0);
        }
        Ok(())
    }

    /// Cuts nodes off (raft-rs's `isolate` for nodes): everything they publish and everything for
    /// them, queued or later, silently vanishes, while they stay "connected". Unknown ids are ignored.
    pub fn partition(&mut self, nodes: &[NodeId]) {
        for &n in nodes {
            if let Some(state) = self.reg.nodes.get_mut(n.index()) {
                state.partitioned = true;
                self.reg.partitioned.insert(n.0);
            }
        }
    }

    /// Reconnects partitioned nodes to the network (raft-rs's `recover` for nodes). What vanished
    /// stays lost.
    pub fn heal(&mut self, nodes: &[NodeId]) {
        for &n in nodes {
            if let Some(state) = self.reg.nodes.get_mut(n.index()) {
                state.partitioned = false;
                self.reg.partitioned.remove(&n.0);
            }
        }
    }

    /// Heals every partition.
    pub fn heal_all(&mut self) {
        for n in std::mem::take(&mut self.reg.partitioned) {
            if let Some(state) = self.reg.nodes.get_mut(n as usize) {
                state.partitioned = false;
            }
        }
    }

    /// Cuts the cloud off the broker: uplink in flight to it is lost, and until
    /// [`recover_cloud`](Self::recover_cloud) its sends and every uplink message vanish. Deliveries
    /// the broker already has keep going to the nodes.
    pub fn isolate_cloud(&mut self) {
        self.cloud_isolated = true;
        self.stats.dropped_cloud_isolated += self.queues.clear_up() as u64;
    }

    /// Reconnects the cloud to the broker.
    pub fn recover_cloud(&mut self) {
        self.cloud_isolated = false;
    }

    /// Whether the cloud is isolated.
    pub fn is_cloud_isolated(&self) -> bool {
        self.cloud_isolated
    }

    /// The controller restarted: every uplink message in flight to it is lost. Retained messages
    /// (the broker's) and node sessions stay.
    pub fn restart_cloud(&mut self) {
        self.stats.dropped_cloud_restart += self.queues.clear_up() as u64;
    }

    /// The broker restarted: everything in flight in both directions is lost and every node's session
    /// ends (nodes must reconnect and subscribe again). Retained messages survive, as with a broker
    /// that persists them (Mosquitto `persistence true`, EMQX's default).
    pub fn restart_broker(&mut self) {
        let lost = self.queues.clear_up() + self.queues.clear_down();
        self.stats.dropped_broker_restart += lost as u64;
        for i in 0..self.reg.nodes.len() {
            self.end_session(i);
        }
    }

    /// A node publishes an uplink message at `now`. It reaches the cloud as an [`Inbound`] stamped
    /// with the node's name, after the plan's delay, unless a fault takes it. Fails only for an
    /// unknown or unconnected node (a partitioned node publishes "successfully" into the void).
    pub fn node_publish(&mut self, node: NodeId, publish: NodePublish, now: Timestamp) -> Result<(), SimError> {
        let i = self.reg.check_connected(node)?;
        let now = self.advance(now);
        self.stats.uplink_sent += 1;
        if self.reg.nodes.get(i).is_some_and(|s| s.partitioned) {
            self.stats.dropped_partition += 1;
            return Ok(());
        }
        if self.cloud_isolated {
            self.stats.dropped_cloud_isolated += 1;
            return Ok(());
        }
        let key = self.next_msg();
        let fate = self.plan.fate(Direction::Uplink, key);
        if fate.dropped {
            self.stats.dropped_uplink_fault += 1;
            return Ok(());
        }
        let fifo = self.queues.up_heap.is_empty() && !self.plan.has_delay();
        let item = |payload| UpItem { node: node.0, kind: publish.kind, payload };
        if fate.duplicated {
            self.stats.duplicated += 1;
            let copy = item(publish.payload.clone());
            self.queues.push_up(item(publish.payload), now.saturating_add(fate.delay_ms), fifo);
            self.queues.push_up(copy, now.saturating_add(fate.duplicate_delay_ms), fifo);
        } else {
            self.queues.push_up(item(publish.payload), now.saturating_add(fate.delay_ms), fifo);
        }
        Ok(())
    }

    /// Hands the cloud up to `max` uplink messages due by `now`, in due order (ties in send order).
    pub fn take_uplink(&mut self, now: Timestamp, max: usize) -> Vec<Inbound> {
        let mut out = Vec::with_capacity(max.min(self.queues.up_len));
        self.take_uplink_into(now, max, &mut out);
        out
    }

    /// [`SimNetwork::take_uplink`] into `out` (cleared first), so a caller that takes batch after
    /// batch reuses one buffer instead of allocating each batch afresh.
    pub fn take_uplink_into(&mut self, now: Timestamp, max: usize, out: &mut Vec<Inbound>) {
        out.clear();
        let now = self.advance(now);
        let q = &mut self.queues;
        while out.len() < max {
            let item = if q.up_fifo.front().is_some_and(|(due, _)| *due <= now) {
                q.up_fifo.pop_front().map(|(_, item)| item)
            } else if q.up_fifo.is_empty() && q.up_heap.peek().is_some_and(|t| t.due <= now) {
                q.up_heap.pop().map(|t| t.item)
            } else {
                None
            };
            let Some(item) = item else { break };
            q.up_len -= 1;
            if let Some(s) = self.reg.nodes.get(item.node as usize) {
                out.push(Inbound { node: s.name.clone(), kind: item.kind, payload: item.payload.into() });
            }
        }
        self.stats.uplink_delivered += out.len() as u64;
    }

    /// The cloud sends a batch of downlink messages at `now`. Each fans out by destination to every
    /// connected, subscribed, non-partitioned node (one shared payload); a retained one first updates
    /// the retained store (an empty payload deletes). While the cloud is isolated the batch vanishes.
    pub fn cloud_send(&mut self, mut batch: Vec<Outbound>, now: Timestamp) {
        self.cloud_send_drain(&mut batch, now);
    }

    /// [`SimNetwork::cloud_send`] from `batch`, left empty with its allocation, so a caller that
    /// sends batch after batch reuses one buffer.
    pub fn cloud_send_drain(&mut self, batch: &mut Vec<Outbound>, now: Timestamp) {
        let now = self.advance(now);
        let mut batch = batch.drain(..);
        loop {
            let group = batch.as_slice().len().min(WARM_GROUP);
            if group == 0 {
                break;
            }
            self.warm_destinations(&batch.as_slice()[..group]);
            for o in batch.by_ref().take(group) {
                self.send_one(o, now);
            }
        }
    }

    fn send_one(&mut self, o: Outbound, now: u64) {
        self.stats.downlink_sent += 1;
        if self.cloud_isolated {
            self.stats.dropped_cloud_isolated += 1;
            return;
        }
        let msg = DownMsg { from: o.to, payload: Bytes::from(o.payload) };
        let msg = match self.send_direct(msg, o.retain, now) {
            Ok(()) => return,
            Err(msg) => Arc::new(msg),
        };
        if o.retain {
            self.retained.update(&msg);
        }
        let subscribers = self.fan_out(&msg, now);
        if subscribers == 0 && !o.retain {
            self.stats.dropped_no_subscriber += 1;
        }
    }

    /// Queues a non-retained message to one node by value, when it goes out as one delivery without
    /// a delay: the plan leaves the downlink alone and nothing waits in the delay heap. Otherwise
    /// hands the message back to be shared as any other. (The message's number is drawn either way,
    /// so the fault keys of later messages do not depend on the path.)
    fn send_direct(&mut self, msg: DownMsg, retain: bool, now: u64) -> Result<(), DownMsg> {
        let Destination::Node(name) = &msg.from else { return Err(msg) };
        if retain
            || self.plan.has_delay()
            || !self.plan.is_clean(Direction::Downlink)
            || !self.queues.down_heap.is_empty()
        {
            return Err(msg);
        }
        self.next_msg();
        let id = self.reg.index.find_name(&self.reg.nodes, name);
        match id.and_then(|id| Some((id, self.reg.nodes.get(id as usize)?))) {
            Some((_, s)) if s.connected && s.partitioned => self.stats.dropped_partition += 1,
            Some((id, s)) if s.connected => {
                let targets = Targets::One((id, s.epoch));
                self.queues.down_fifo.push_back(DownBatch {
                    due: now,
                    retained: false,
                    msg: Queued::Own(msg),
                    targets,
                });
                self.queues.down_len += 1;
            }
            _ => self.stats.dropped_no_subscriber += 1,
        }
        Ok(())
    }

    /// Replies to single nodes (acks, catch-ups) come in random node order, and each one's route
    /// is a chain of cache misses: the index slot, then the node's name and state. Reading the
    /// slots of a group in one pass, then the names and states they point to, overlaps the misses.
    fn warm_destinations(&self, group: &[Outbound]) {
        let mut slots = [NameIndex::EMPTY; WARM_GROUP];
        for (s, o) in slots.iter_mut().zip(group) {
            if let Destination::Node(name) = &o.to {
                *s = self.reg.index.first_slot(name.as_str());
            }
        }
        let mut touch = 0;
        for &s in &slots {
            if s != NameIndex::EMPTY {
                touch ^= self.touch(NodeId(s as u32));
            }
        }
        std::hint::black_box(touch);
    }

    /// Queues one published message for its subscribers; returns how many there were (partitioned
    /// ones included).
    fn fan_out(&mut self, msg: &Arc<DownMsg>, now: u64) -> usize {
        let key = self.next_msg();
        let reg = &self.reg;
        let mut ctx = Enqueue {
            plan: &self.plan,
            queues: &mut self.queues,
            stats: &mut self.stats,
            nodes: &reg.nodes,
            msg,
            retained: false,
            key,
            now,
        };
        match &msg.from {
            Destination::Node(name) => {
                let id = reg.index.find_name(&reg.nodes, name);
                ctx.push(id.into_iter(), 1)
            }
            Destination::Group(g) | Destination::GroupWorkloadSpec(g, _) => {
                match reg.group_ids.get(g).and_then(|&g| reg.groups.get(g as usize)) {
                    Some(group) => ctx.push(group.members.iter().copied(), group.members.len()),
                    None => 0,
                }
            }
            Destination::Fleet | Destination::WorkloadSpec(_) => ctx.push(0..reg.nodes.len() as u32, reg.connected),
        }
    }

    /// Queues a retained message for one node (on connect or subscribe).
    fn replay(&mut self, node: u32, msg: &Arc<DownMsg>, now: u64) {
        let key = self.next_msg();
        Enqueue {
            plan: &self.plan,
            queues: &mut self.queues,
            stats: &mut self.stats,
            nodes: &self.reg.nodes,
            msg,
            retained: true,
            key,
            now,
        }
        .push(std::iter::once(node), 1);
    }

    /// When the earliest queued message (either direction) is due, if any. A simulator advances its
    /// virtual clock to it when it has nothing else to do. (It may be a delivery that will be
    /// discarded because its node disconnected since.)
    pub fn next_due(&self) -> Option<Timestamp> {
        let q = &self.queues;
        [
            q.up_fifo.front().map(|(due, _)| *due),
            q.up_heap.peek().map(|t| t.due),
            q.down_fifo.front().map(|b| b.due),
            q.down_heap.peek().map(|t| t.due),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(Timestamp)
    }

    /// The network's counters.
    pub fn stats(&self) -> NetStats {
        NetStats {
            retained: self.retained.len,
            uplink_in_flight: self.queues.up_len,
            downlink_in_flight: self.queues.down_len,
            nodes: self.reg.nodes.len(),
            nodes_connected: self.reg.connected,
            nodes_partitioned: self.reg.partitioned.len(),
            ..self.stats
        }
    }

    /// The retained message of a destination, if any.
    pub fn retained(&self, to: &Destination) -> Option<Bytes> {
        self.retained.get(to).map(|m| m.payload.clone())
    }

    /// Bytes held for nodes themselves, by capacity: names (inline and heap), the name index, node
    /// state, and group subscriptions (both directions, B-tree nodes estimated). Queues and retained
    /// messages are not included; neither is the allocator's own overhead per name.
    pub fn node_memory_bytes(&self) -> usize {
        let reg = &self.reg;
        let names = reg.nodes.iter().map(|s| s.name.as_str().len()).sum::<usize>();
        let index = reg.index.slots.capacity() * size_of::<u64>();
        let state = reg.nodes.capacity() * size_of::<NodeState>()
            + reg.nodes.iter().map(|s| s.groups.heap_bytes()).sum::<usize>();
        // A B-tree node of `u32` keys holds up to 11 keys in about 56 bytes (more for internal
        // nodes); count 8 bytes per member as a rough figure.
        let members = reg.groups.iter().map(|g| g.members.len() * 8).sum::<usize>();
        names + index + state + members
    }

    /// Hands nodes up to `max` downlink deliveries due by `now`, in due order (ties in send order,
    /// a fan-out in node id order), calling `deliver` for each; returns how many were delivered.
    /// Deliveries for nodes that disconnected since they were queued, or are partitioned now, are
    /// discarded on the way (and counted).
    pub fn take_downlink(
        &mut self,
        now: Timestamp,
        max: usize,
        mut deliver: impl FnMut(NodeId, NodeDelivery),
    ) -> usize {
        let now = self.advance(now);
        let Self { reg, queues, stats, .. } = self;
        let nodes = &reg.nodes;
        let mut delivered = 0;
        while delivered < max {
            if let Some(batch) = queues.down_fifo.front_mut() {
                if batch.due > now {
                    break;
                }
                if let Targets::Many { list, next } = &mut batch.targets {
                    let msg = batch.msg.msg();
                    while delivered < max {
                        let Some(&t) = list.get(*next) else { break };
                        *next += 1;
                        queues.down_len -= 1;
                        let ok = hand(nodes, stats, t, batch.retained, &mut deliver, || shared(msg));
                        delivered += usize::from(ok);
                    }
                    if *next >= list.len() {
                        queues.down_fifo.pop_front();
                    }
                    continue;
                }
                let Some(DownBatch { retained, msg, targets: Targets::One(t), .. }) = queues.down_fifo.pop_front()
                else {
                    continue;
                };
                queues.down_len -= 1;
                let ok = match msg {
                    Queued::Own(m) => hand(nodes, stats, t, retained, &mut deliver, || (m.from, m.payload)),
                    Queued::Shared(m) => hand(nodes, stats, t, retained, &mut deliver, || shared(&m)),
                };
                delivered += usize::from(ok);
                continue;
            }
            if queues.down_heap.peek().is_none_or(|t| t.due > now) {
                break;
            }
            if let Some(t) = queues.down_heap.pop() {
                queues.down_len -= 1;
                let ok = hand(nodes, stats, t.item.target, t.item.retained, &mut deliver, || shared(&t.item.msg));
                delivered += usize::from(ok);
            }
        }
        delivered
    }
}

/// A delivery's destination and payload, from a message shared with other deliveries.
fn shared(msg: &DownMsg) -> (Destination, Bytes) {
    (msg.from.clone(), msg.payload.clone())
}

/// Hands one queued delivery to its node (`msg` gives its destination and payload), or discards
/// it when the node's session ended or the node is partitioned now. Returns whether it was
/// delivered.
fn hand(
    nodes: &[NodeState],
    stats: &mut NetStats,
    (node, epoch): Target,
    retained: bool,
    deliver: &mut impl FnMut(NodeId, NodeDelivery),
    msg: impl FnOnce() -> (Destination, Bytes),
) -> bool {
    match nodes.get(node as usize) {
        Some(s) if s.connected && s.epoch == epoch => {
            if s.partitioned {
                stats.dropped_partition += 1;
                return false;
            }
            stats.downlink_delivered += 1;
            let (from, payload) = msg();
            deliver(NodeId(node), NodeDelivery { from, payload, retained });
            true
        }
        _ => {
            stats.dropped_disconnected += 1;
            false
        }
    }
}

/// Queues one message for a set of nodes, applying partitions and the fault plan.
struct Enqueue<'a> {
    plan: &'a FaultPlan,
    queues: &'a mut Queues,
    stats: &'a mut NetStats,
    nodes: &'a [NodeState],
    msg: &'a Arc<DownMsg>,
    retained: bool,
    /// The message's number, for the fault keys.
    key: u64,
    now: u64,
}

impl Enqueue<'_> {
    /// Queues the message for every connected node among `ids` (`hint`: about how many); returns how
    /// many connected nodes there were, partitioned ones included.
    fn push(&mut self, ids: impl Iterator<Item = u32>, hint: usize) -> usize {
        let fifo = self.queues.down_heap.is_empty() && !self.plan.has_delay();
        // Skips the per-delivery fate when the plan cannot touch the downlink.
        let clean = self.plan.is_clean(Direction::Downlink);
        let mut list = TargetList::default();
        let mut subscribers = 0;
        for id in ids {
            let Some(state) = self.nodes.get(id as usize) else {
                continue;
            };
            if !state.connected {
                continue;
            }
            subscribers += 1;
            if state.partitioned {
                self.stats.dropped_partition += 1;
                continue;
            }
            let fate =
                if clean { Fate::CLEAN } else { self.plan.fate(Direction::Downlink, delivery_key(self.key, id)) };
            if fate.dropped {
                self.stats.dropped_downlink_fault += 1;
                continue;
            }
            if fate.duplicated {
                self.stats.duplicated += 1;
            }
            let target = (id, state.epoch);
            for delay in fate.copies() {
                if fifo {
                    list.push(target, hint);
                } else {
                    let seq = self.queues.next_seq();
                    self.queues.down_heap.push(Timed {
                        due: self.now.saturating_add(delay),
                        seq,
                        item: DownItem { target, retained: self.retained, msg: self.msg.clone() },
                    });
                    self.queues.down_len += 1;
                }
            }
        }
        if let Some((targets, n)) = list.into_targets() {
            self.queues.down_len += n;
            self.queues.down_fifo.push_back(DownBatch {
                due: self.now,
                retained: self.retained,
                msg: Queued::Shared(self.msg.clone()),
                targets,
            });
        }
        subscribers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kole_core::model::WorkloadId;

    const T0: Timestamp = Timestamp(1_000);

    fn at(ms: u64) -> Timestamp {
        Timestamp(T0.0 + ms)
    }

    /// A realistic node name (region, site, serial), about 26 bytes.
    fn node_name(i: usize) -> NodeName {
        NodeName::new(format!("cn-hangzhou-s{:04}-{:08x}", i % 5000, i * 7919)).unwrap()
    }

    fn group(g: &str) -> GroupName {
        GroupName::new(g).unwrap()
    }

    fn spec(id: &str) -> Destination {
        Destination::WorkloadSpec(WorkloadId::new(id).unwrap())
    }

    fn out(to: Destination, payload: &[u8], retain: bool) -> Outbound {
        Outbound { to, payload: payload.to_vec(), retain }
    }

    fn hb(payload: &[u8]) -> NodePublish {
        NodePublish { kind: UplinkKind::Heartbeat, payload: payload.to_vec() }
    }

    /// A network of `n` connected nodes.
    fn network(plan: FaultPlan, n: usize) -> (SimNetwork, Vec<NodeId>) {
        let mut net = SimNetwork::with_capacity(plan, n);
        let ids: Vec<_> = (0..n).map(|i| net.add_node(node_name(i)).unwrap()).collect();
        for &id in &ids {
            net.connect(id, T0).unwrap();
        }
        (net, ids)
    }

    /// Every downlink delivery due by `now`, as (node, from, payload, retained).
    fn drain_down(net: &mut SimNetwork, now: Timestamp) -> Vec<(NodeId, Destination, Vec<u8>, bool)> {
        let mut got = Vec::new();
        net.take_downlink(now, usize::MAX, |n, d| got.push((n, d.from, d.payload.to_vec(), d.retained)));
        got
    }

    fn payloads_up(net: &mut SimNetwork, now: Timestamp) -> Vec<Vec<u8>> {
        net.take_uplink(now, usize::MAX).into_iter().map(|i| i.payload.to_vec()).collect()
    }

    /// A mixed scenario under faults; returns every delivery with its virtual time.
    fn scenario(seed: u64) -> Vec<String> {
        let plan =
            FaultPlan { drop_uplink: 0.2, drop_downlink: 0.2, duplicate: 0.2, min_delay_ms: 0, max_delay_ms: 40, seed };
        let (mut net, ids) = network(plan, 200);
        for &id in ids.iter().step_by(3) {
            net.subscribe(id, &group("site-1"), T0).unwrap();
        }
        let mut trace = Vec::new();
        for step in 0..20u64 {
            let now = at(step * 10);
            net.cloud_send(
                vec![
                    out(Destination::Fleet, &[1, step as u8], false),
                    out(Destination::Group(group("site-1")), &[2, step as u8], false),
                    out(Destination::Node(node_name(step as usize)), &[3, step as u8], false),
                ],
                now,
            );
            for &id in ids.iter().skip(step as usize).step_by(7) {
                net.node_publish(id, hb(&[step as u8, id.0 as u8]), now).unwrap();
            }
            net.take_downlink(now, usize::MAX, |n, d| trace.push(format!("{} down {} {:?}", now.0, n.0, d.payload)));
            for i in net.take_uplink(now, usize::MAX) {
                trace.push(format!("{} up {} {:?}", now.0, i.node, i.payload));
            }
        }
        while let Some(due) = net.next_due() {
            net.take_downlink(due, usize::MAX, |n, d| trace.push(format!("{} down {} {:?}", due.0, n.0, d.payload)));
            for i in net.take_uplink(due, usize::MAX) {
                trace.push(format!("{} up {} {:?}", due.0, i.node, i.payload));
            }
        }
        trace
    }

    #[test]
    fn same_seed_replays_identically_and_another_seed_differs() {
        let a = scenario(11);
        assert!(a.len() > 1000, "{}", a.len());
        assert_eq!(a, scenario(11));
        assert_ne!(a, scenario(12));
    }

    #[test]
    fn drop_probability_one_zero_and_half() {
        for (p, lo, hi) in [(1.0, 4000, 4000), (0.0, 0, 0), (0.5, 1750, 2250)] {
            let plan = FaultPlan { drop_uplink: p, drop_downlink: p, seed: 5, ..FaultPlan::default() };
            let (mut net, ids) = network(plan, 4000);
            net.cloud_send(vec![out(Destination::Fleet, b"x", false)], T0);
            let down = drain_down(&mut net, T0).len() as u64;
            for &id in &ids {
                net.node_publish(id, hb(b"h"), T0).unwrap();
            }
            let up = net.take_uplink(T0, usize::MAX).len() as u64;
            let s = net.stats();
            // Binomial(4000, 0.5): sd ≈ 32, so ±250 is about 8 sd.
            assert!((lo..=hi).contains(&s.dropped_downlink_fault), "p={p}: {s:?}");
            assert!((lo..=hi).contains(&s.dropped_uplink_fault), "p={p}: {s:?}");
            assert_eq!(down + s.dropped_downlink_fault, 4000);
            assert_eq!(up + s.dropped_uplink_fault, 4000);
            assert_eq!((s.uplink_in_flight, s.downlink_in_flight), (0, 0));
        }
    }

    #[test]
    fn duplicates_arrive_twice() {
        let plan = FaultPlan { duplicate: 1.0, ..FaultPlan::default() };
        let (mut net, ids) = network(plan, 10);
        net.cloud_send(vec![out(Destination::Fleet, b"x", false)], T0);
        let down = drain_down(&mut net, T0);
        assert_eq!(down.len(), 20);
        for &id in &ids {
            assert_eq!(down.iter().filter(|d| d.0 == id).count(), 2);
        }
        net.node_publish(ids[3], hb(b"h"), T0).unwrap();
        assert_eq!(payloads_up(&mut net, T0), [b"h".to_vec(), b"h".to_vec()]);
        assert_eq!(net.stats().duplicated, 11);
    }

    #[test]
    fn delays_reorder_and_next_due_is_exact() {
        let plan = FaultPlan { min_delay_ms: 5, max_delay_ms: 100, seed: 3, ..FaultPlan::default() };
        let (mut net, ids) = network(plan, 1);
        assert_eq!(net.next_due(), None);
        for i in 0..50u8 {
            net.node_publish(ids[0], hb(&[i]), T0).unwrap();
        }
        assert!(net.take_uplink(at(4), usize::MAX).is_empty(), "nothing due before 5 ms");
        let mut order = Vec::new();
        let mut last = at(0);
        while let Some(due) = net.next_due() {
            assert!(due >= last && due >= at(5) && due <= at(100));
            // Just before the due time nothing comes; at it, something does.
            if due > last {
                assert!(net.take_uplink(Timestamp(due.0 - 1), usize::MAX).is_empty());
            }
            let got = payloads_up(&mut net, due);
            assert!(!got.is_empty());
            order.extend(got.into_iter().map(|p| p[0]));
            last = due;
        }
        assert_eq!(order.len(), 50);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(order, sorted, "random delays reorder");
        assert_eq!(net.stats().uplink_in_flight, 0);
    }

    #[test]
    fn equal_due_times_keep_send_order_and_time_never_goes_back() {
        let plan = FaultPlan { min_delay_ms: 10, max_delay_ms: 10, ..FaultPlan::default() };
        let (mut net, ids) = network(plan, 1);
        net.cloud_send((0..20u8).map(|i| out(Destination::Fleet, &[i], false)).collect(), at(100));
        // An earlier `now` reads as the latest one.
        net.cloud_send(vec![out(Destination::Fleet, &[20], false)], at(50));
        assert_eq!(net.next_due(), Some(at(110)));
        let got: Vec<u8> = drain_down(&mut net, at(110)).iter().map(|d| d.2[0]).collect();
        assert_eq!(got, (0..=20).collect::<Vec<_>>());
        assert_eq!(net.now(), at(110));
        let _ = ids;
    }

    #[test]
    fn partition_then_heal() {
        let (mut net, ids) = network(FaultPlan::default(), 3);
        let (a, b) = (ids[0], ids[1]);
        // Queued before the cut, lost at delivery.
        net.cloud_send(vec![out(Destination::Fleet, b"1", false)], T0);
        net.partition(&[b, NodeId(99)]);
        assert!(net.is_partitioned(b) && net.is_connected(b));
        let got = drain_down(&mut net, T0);
        assert_eq!(got.iter().map(|d| d.0).collect::<Vec<_>>(), [a, ids[2]]);
        net.cloud_send(vec![out(Destination::Node(node_name(1)), b"2", false)], T0);
        net.node_publish(b, hb(b"lost"), T0).unwrap();
        net.node_publish(a, hb(b"kept"), T0).unwrap();
        assert!(drain_down(&mut net, T0).is_empty());
        assert_eq!(payloads_up(&mut net, T0), [b"kept".to_vec()]);
        assert_eq!(net.stats().dropped_partition, 3);
        assert_eq!(net.stats().nodes_partitioned, 1);

        net.heal(&[b]);
        net.node_publish(b, hb(b"back"), at(1)).unwrap();
        net.cloud_send(vec![out(Destination::Node(node_name(1)), b"3", false)], at(1));
        assert_eq!(payloads_up(&mut net, at(1)), [b"back".to_vec()]);
        assert_eq!(drain_down(&mut net, at(1))[0].2, b"3");

        net.partition(&ids);
        net.heal_all();
        assert!(ids.iter().all(|&n| !net.is_partitioned(n)));
        assert_eq!(net.stats().nodes_partitioned, 0);
    }

    #[test]
    fn retained_specs_on_connect_and_subscribe_and_deletion() {
        let mut net = SimNetwork::new(FaultPlan::default());
        let a = net.add_node(node_name(0)).unwrap();
        let b = net.add_node(node_name(1)).unwrap();
        let app = spec("default/app");
        let gspec = Destination::GroupWorkloadSpec(group("site-1"), WorkloadId::new("default/app").unwrap());
        net.cloud_send(
            vec![
                out(app.clone(), b"spec", true),
                out(gspec.clone(), b"gspec", true),
                out(Destination::Node(node_name(0)), b"mine", true),
                out(Destination::Fleet, b"not retained", false),
            ],
            T0,
        );
        assert_eq!(net.stats().retained, 3);
        assert_eq!(net.stats().dropped_no_subscriber, 1);
        assert_eq!(net.retained(&app).as_deref(), Some(&b"spec"[..]));

        net.connect(a, T0).unwrap();
        let got = drain_down(&mut net, T0);
        assert_eq!(
            got,
            [(a, Destination::Node(node_name(0)), b"mine".to_vec(), true), (a, app.clone(), b"spec".to_vec(), true),]
        );
        net.subscribe(a, &group("site-1"), T0).unwrap();
        assert_eq!(drain_down(&mut net, T0), [(a, gspec.clone(), b"gspec".to_vec(), true)]);

        // A live publish is not flagged retained; deletion reaches current subscribers, empty.
        net.cloud_send(vec![out(app.clone(), b"spec2", true)], T0);
        assert_eq!(drain_down(&mut net, T0), [(a, app.clone(), b"spec2".to_vec(), false)]);
        net.cloud_send(vec![out(app.clone(), b"", true), out(gspec.clone(), b"", true)], T0);
        assert_eq!(drain_down(&mut net, T0), [(a, app.clone(), vec![], false), (a, gspec.clone(), vec![], false)]);
        assert_eq!(net.retained(&app), None);
        assert_eq!(net.stats().retained, 1);

        // After deletion a late joiner gets nothing (edge-b has no retained message of its own).
        net.connect(b, T0).unwrap();
        net.subscribe(b, &group("site-1"), T0).unwrap();
        assert!(drain_down(&mut net, T0).is_empty());
    }

    #[test]
    fn disconnect_drops_queued_deliveries_and_subscriptions() {
        let (mut net, ids) = network(FaultPlan::default(), 2);
        let (a, b) = (ids[0], ids[1]);
        for g in ["g1", "g2", "g3", "g4", "g5"] {
            net.subscribe(a, &group(g), T0).unwrap();
        }
        net.unsubscribe(a, &group("g2")).unwrap();
        net.unsubscribe(a, &group("nope")).unwrap();
        let subs: Vec<_> = net.subscriptions(a).iter().map(|g| g.as_str()).collect();
        assert_eq!(subs, ["g1", "g3", "g4", "g5"]);
        net.cloud_send(
            vec![
                out(Destination::Group(group("g1")), b"1", false),
                out(Destination::Group(group("g2")), b"2", false),
                out(Destination::Fleet, b"3", false),
            ],
            T0,
        );
        net.disconnect(a).unwrap();
        net.disconnect(a).unwrap();
        assert!(!net.is_connected(a) && net.subscriptions(a).is_empty());
        // A reconnect is a new session: nothing of the old one arrives.
        net.connect(a, T0).unwrap();
        let got = drain_down(&mut net, T0);
        assert_eq!(got.iter().map(|d| (d.0, d.2.clone())).collect::<Vec<_>>(), [(b, b"3".to_vec())]);
        let s = net.stats();
        assert_eq!((s.dropped_disconnected, s.dropped_no_subscriber), (2, 1));
        net.cloud_send(vec![out(Destination::Group(group("g1")), b"4", false)], T0);
        assert!(drain_down(&mut net, T0).is_empty());
        assert!(matches!(net.node_publish(a, hb(b""), T0), Ok(())));
        net.disconnect(a).unwrap();
        assert!(matches!(net.node_publish(a, hb(b""), T0), Err(SimError::NotConnected { .. })));
        assert!(matches!(net.subscribe(a, &group("g1"), T0), Err(SimError::NotConnected { .. })));
    }

    #[test]
    fn restart_cloud_loses_in_flight_uplink_and_isolation_cuts_both_ways() {
        let plan = FaultPlan { min_delay_ms: 10, max_delay_ms: 10, ..FaultPlan::default() };
        let (mut net, ids) = network(plan, 2);
        net.node_publish(ids[0], hb(b"1"), T0).unwrap();
        net.node_publish(ids[1], hb(b"2"), T0).unwrap();
        assert_eq!(net.stats().uplink_in_flight, 2);
        net.restart_cloud();
        assert!(payloads_up(&mut net, at(100)).is_empty());
        assert_eq!(net.stats().dropped_cloud_restart, 2);

        net.set_plan(FaultPlan::default());
        net.cloud_send(vec![out(Destination::Fleet, b"before", false)], at(100));
        net.node_publish(ids[0], hb(b"3"), at(100)).unwrap();
        net.isolate_cloud();
        assert!(net.is_cloud_isolated());
        net.node_publish(ids[0], hb(b"4"), at(100)).unwrap();
        net.cloud_send(vec![out(spec("default/app"), b"s", true)], at(100));
        assert!(payloads_up(&mut net, at(100)).is_empty());
        assert_eq!(net.retained(&spec("default/app")), None, "never reached the broker");
        // What the broker already had still reaches the nodes.
        assert_eq!(drain_down(&mut net, at(100)).len(), 2);
        assert_eq!(net.stats().dropped_cloud_isolated, 3);
        net.recover_cloud();
        net.node_publish(ids[0], hb(b"5"), at(100)).unwrap();
        assert_eq!(payloads_up(&mut net, at(100)), [b"5".to_vec()]);
    }

    #[test]
    fn restart_broker_ends_sessions_and_keeps_retained() {
        let (mut net, ids) = network(FaultPlan::default(), 3);
        net.cloud_send(vec![out(spec("default/app"), b"s", true)], T0);
        net.node_publish(ids[0], hb(b"1"), T0).unwrap();
        net.restart_broker();
        let s = net.stats();
        assert_eq!((s.dropped_broker_restart, s.nodes_connected), (4, 0));
        assert_eq!((s.uplink_in_flight, s.downlink_in_flight), (0, 0));
        net.connect(ids[2], T0).unwrap();
        assert_eq!(drain_down(&mut net, T0), [(ids[2], spec("default/app"), b"s".to_vec(), true)]);
    }

    #[test]
    fn take_downlink_respects_max_inside_a_fan_out() {
        let (mut net, ids) = network(FaultPlan::default(), 10);
        net.cloud_send(vec![out(Destination::Fleet, b"a", false), out(Destination::Fleet, b"b", false)], T0);
        let mut got = Vec::new();
        for _ in 0..7 {
            let remaining = 20 - got.len();
            let n = net.take_downlink(T0, 3, |n, d| got.push((n, d.payload[0])));
            assert_eq!(n, remaining.min(3));
        }
        assert_eq!(got.len(), 20);
        let expected: Vec<_> = [b'a', b'b'].iter().flat_map(|&p| ids.iter().map(move |&n| (n, p))).collect();
        assert_eq!(got, expected);
        assert_eq!(net.stats().downlink_in_flight, 0);
    }

    #[test]
    fn network_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SimNetwork>();
    }

    #[test]
    fn ids_names_and_refusals() {
        let mut net = SimNetwork::new(FaultPlan::default());
        assert!(net.is_empty());
        let a = net.add_node(node_name(0)).unwrap();
        let b = net.add_node(node_name(1)).unwrap();
        assert_eq!((a, b), (NodeId(0), NodeId(1)));
        assert_eq!(net.add_node(node_name(0)).unwrap(), a, "adding twice returns the id");
        assert_eq!(net.len(), 2);
        assert_eq!(net.node_id(node_name(1).as_str()), Some(b));
        assert_eq!(net.node_id("edge-unknown"), None);
        assert_eq!(net.name(b), Some(&node_name(1)));
        assert_eq!(net.name(NodeId(2)), None);
        assert!(!net.is_connected(a), "nodes start disconnected");
        let unknown = NodeId(7);
        assert_eq!(net.connect(unknown, T0), Err(SimError::UnknownNode { id: 7, len: 2 }));
        assert!(net.disconnect(unknown).is_err());
        assert!(net.node_publish(unknown, hb(b""), T0).is_err());
        assert!(net.subscribe(unknown, &group("g"), T0).is_err());
        assert!(net.unsubscribe(unknown, &group("g")).is_err());
        let msg = net.connect(unknown, T0).unwrap_err().to_string();
        assert!(msg.contains("node id 7"), "{msg}");
        // Node lookups stay right across index growth.
        for i in 2..5000 {
            assert_eq!(net.add_node(node_name(i)).unwrap(), NodeId(i as u32));
        }
        assert!((0..5000).all(|i| net.node_id(node_name(i).as_str()) == Some(NodeId(i as u32))));
    }

    #[test]
    fn fleet_wide_message_reaches_100k_nodes_exactly_once_with_a_shared_payload() {
        let n = 100_000;
        let (mut net, ids) = network(FaultPlan::default(), n);
        for &id in ids.iter().step_by(2) {
            net.subscribe(id, &group("even"), T0).unwrap();
        }
        net.cloud_send(
            vec![out(spec("default/app"), &[7; 64], true), out(Destination::Group(group("even")), b"g", false)],
            T0,
        );
        assert_eq!(net.stats().downlink_in_flight, n + n / 2);
        let mut seen = vec![0u8; n];
        let mut group_seen = vec![0u8; n];
        let mut first: Option<Bytes> = None;
        let delivered = net.take_downlink(T0, usize::MAX, |node, d| match d.from {
            Destination::Group(_) => group_seen[node.index()] += 1,
            _ => {
                seen[node.index()] += 1;
                let shared = first.get_or_insert_with(|| d.payload.clone());
                assert_eq!(shared.as_ptr(), d.payload.as_ptr(), "one payload for the whole fan-out");
            }
        });
        assert_eq!(delivered, n + n / 2);
        assert!(seen.iter().all(|&c| c == 1));
        assert!(group_seen.iter().enumerate().all(|(i, &c)| c == u8::from(i % 2 == 0)));
        let s = net.stats();
        assert_eq!((s.downlink_delivered, s.downlink_in_flight), ((n + n / 2) as u64, 0));
    }

    #[test]
    fn node_overhead_stays_under_120_bytes() {
        let n = 100_000;
        let (mut net, ids) = network(FaultPlan::default(), n);
        for &id in &ids {
            net.subscribe(id, &group("site-1"), T0).unwrap();
        }
        let per_node = net.node_memory_bytes() as f64 / n as f64;
        let name_len = ids.iter().map(|&i| net.name(i).unwrap().as_str().len()).sum::<usize>() as f64 / n as f64;
        println!(
            "SimNetwork: {per_node:.1} bytes per node (names average {name_len:.1} bytes; NodeState {} bytes, NodeName {} bytes)",
            size_of::<NodeState>(),
            size_of::<NodeName>()
        );
        assert_eq!(size_of::<NodeState>(), 40);
        assert!(per_node <= 120.0, "{per_node}");

        // Grown without a capacity hint, vectors may hold up to twice what they need.
        let mut grown = SimNetwork::new(FaultPlan::default());
        for i in 0..n {
            grown.add_node(node_name(i)).unwrap();
        }
        let per_node = grown.node_memory_bytes() as f64 / n as f64;
        println!("SimNetwork grown without a hint: {per_node:.1} bytes per node");
        assert!(per_node <= 160.0, "{per_node}");
    }
}
