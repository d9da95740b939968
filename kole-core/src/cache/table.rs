//! [`NodeCache`]: the compact, slot-based, in-memory node table.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::ControlFlow;

use super::index::NameIndex;
use super::intern::{FxHashMap, Interner};
use super::{
    CacheError, CacheQuery, HeartbeatIn, HeartbeatOutcome, HeartbeatUpdate, PhaseCounts, QueryPage, Registered,
    StateCache,
};
use crate::model::{
    DesiredDigest, LabelLookup, Labels, LabelsView, NodeHealth, NodeInfo, NodeName, NodePhase, NodeRecord,
    NodeRegistration, Selector, Timestamp, WorkloadId, WorkloadPhase, WorkloadState, encode_pairs, stable_hash,
};

/// Dense index of a node in a [`NodeCache`]. Stable while the node exists; reused after removal.
pub type Slot = u32;

/// Id of an interned string.
pub(crate) type StrId = u32;
/// Id of an interned label set.
pub(crate) type LabelSetId = u32;
/// Id of an interned (arch, os, agent version) triple.
pub(crate) type PlatformId = u32;
/// Id of an interned per-node workload state list.
pub(crate) type WorkloadSetId = u32;

/// Marks a vacant slot in [`NodeSlot::label_set`].
const VACANT: u32 = u32::MAX;
/// Seed of the name index hash (any constant; the index is never persisted).
const NAME_SEED: u64 = 0x6e61_6d65_5f69_6478;

/// The hot, fixed-size part of a node: one cache line holds it, so a heartbeat touches one line.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NodeSlot {
    pub(crate) applied: u64,
    pub(crate) name_off: u32,
    pub(crate) label_set: LabelSetId,
    pub(crate) platform: PlatformId,
    pub(crate) workloads: WorkloadSetId,
    /// Primary IPv4 address; `0` with `has_ipv4 == false` means none.
    pub(crate) ipv4: u32,
    /// Last heard from, seconds since the epoch.
    pub(crate) last_seen: u32,
    /// Boot id of the node's current registration (`0`: unknown, e.g. after a restore).
    pub(crate) boot_id: u32,
    /// Highest heartbeat sequence accepted in this boot.
    pub(crate) seq: u32,
    /// Position of this slot in its label set's member list.
    pub(crate) pos_in_set: u32,
    pub(crate) name_len: u8,
    pub(crate) phase: u8,
    pub(crate) flags: u8,
    /// [`NodeHealth`] of the last heartbeat; fits the padding, the slot stays 48 bytes.
    pub(crate) health: u8,
}

// The hot slot is one 48-byte record; a field that grows it costs every node.
const _: () = assert!(size_of::<NodeSlot>() == 48);

const FLAG_IPV4: u8 = 1;
const FLAG_EXTRA_ADDRS: u8 = 2;

/// A label set: `(key, value)` string ids sorted by key string.
pub(crate) type LabelPairs = Box<[(StrId, StrId)]>;
/// A workload state list: `(workload id string, version, phase)` sorted by workload string.
pub(crate) type WorkloadItems = Box<[(StrId, u64, u8)]>;

/// Per label set: the slots carrying it and how many are in each phase.
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelSetMembers {
    pub(crate) slots: Vec<Slot>,
    pub(crate) phases: [u32; 3],
    /// Changes whenever the id is (re)allocated to a label set, so users caching per-set
    /// derivations (the engine's targeting) notice a recycled id.
    pub(crate) epoch: u32,
}

/// The compact in-memory node table: the engine's cache, and an implementation of the
/// [`StateCache`] read/query seam.
///
/// The engine and the snapshot format use it directly (through crate-private accessors, see
/// `engine_view.rs`), not through [`StateCache`]: their batch paths depend on this layout.
///
/// A node is a 48-byte `NodeSlot` plus its name in a shared byte arena. Everything that repeats
/// across nodes — label sets, label strings, platform triples, workload state lists — is interned
/// and shared, and each label set keeps the list of its member slots, so a selector is evaluated once
/// per distinct label set, never once per node.
#[derive(Debug, Clone, Default)]
pub struct NodeCache {
    pub(crate) slots: Vec<NodeSlot>,
    pub(crate) free: Vec<Slot>,
    names: Vec<u8>,
    name_garbage: usize,
    index: NameIndex,
    pub(crate) strings: Interner<Box<str>>,
    pub(crate) label_sets: Interner<LabelPairs>,
    pub(crate) members: Vec<LabelSetMembers>,
    pub(crate) platforms: Interner<[StrId; 3]>,
    pub(crate) workload_sets: Interner<WorkloadItems>,
    pub(crate) extra_addrs: HashMap<Slot, Box<[IpAddr]>>,
    phase_totals: [u32; 3],
    live: usize,
    set_epoch: u32,
    /// A lower bound of the last-seen time of every online node (see `mark_offline_before`).
    online_floor: u32,
    /// Label sets by a hash of their wire form (a hint, verified on use), each with that form (see
    /// [`LabelsView::wire`]): a registration's label block is found by one hash and one comparison
    /// of bytes, with no string parsed or looked up.
    label_by_content: FxHashMap<u64, (LabelSetId, Box<[u8]>)>,
    /// Platforms by a hash of their three strings (a hint, verified on use): a registration finds
    /// its platform by one probe of a map as small as the fleet's platforms, instead of four
    /// probes of the string and platform interners.
    platform_by_content: FxHashMap<u64, PlatformId>,
}

/// A registration borrowed from where it was decoded (the engine's zero-copy path): interned
/// straight from the payload's strings, with no owned copy per node.
///
/// Crate-private because the cache trusts it: `labels` are valid (Kubernetes rules) and sorted
/// strictly by key, as the protocol decoder and [`Labels`] guarantee for a [`LabelsView`].
pub(crate) struct RegistrationRef<'a> {
    pub(crate) name: &'a str,
    pub(crate) labels: LabelsView<'a>,
    pub(crate) arch: &'a str,
    pub(crate) os: &'a str,
    pub(crate) agent_version: &'a str,
    pub(crate) addresses: &'a [IpAddr],
    pub(crate) applied: DesiredDigest,
    pub(crate) workloads: &'a [WorkloadState],
    /// The interned set equal to `labels`, when the caller found it ([`NodeCache::find_label_set`]).
    pub(crate) label_set: Option<LabelSetId>,
}

/// A label set resolved against the string table, for selector evaluation.
pub(crate) struct LabelSetView<'a> {
    pub(crate) cache: &'a NodeCache,
    pub(crate) pairs: &'a [(StrId, StrId)],
}

impl LabelLookup for LabelSetView<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        // Sorted by key string; sets are small, so a binary search over resolved keys is plenty.
        let s = &self.cache.strings;
        self.pairs.binary_search_by(|&(k, _)| (**s.get(k)).cmp(key)).ok().map(|i| &**s.get(self.pairs[i].1))
    }
}

impl NodeCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache with room for `nodes` nodes of about `avg_name_len` bytes of name each.
    pub fn with_capacity(nodes: usize, avg_name_len: usize) -> Self {
        Self {
            slots: Vec::with_capacity(nodes),
            names: Vec::with_capacity(nodes * avg_name_len),
            index: NameIndex::with_capacity(nodes),
            ..Self::default()
        }
    }

    /// Releases spare capacity (call after bulk loading).
    pub fn shrink_to_fit(&mut self) {
        self.slots.shrink_to_fit();
        self.names.shrink_to_fit();
        self.index.shrink_to_fit();
        for m in &mut self.members {
            m.slots.shrink_to_fit();
        }
    }

    /// The slot of `name`, if present.
    #[inline]
    pub fn slot_of(&self, name: &str) -> Option<Slot> {
        self.lookup(name, NameHash::of(name)).slot
    }

    /// [`Self::slot_of`] with the name's hash already computed (by [`Self::warm_names`]), and the
    /// hash kept for [`Self::register_ref_at`]: a registration hashes its name once.
    #[inline]
    pub(crate) fn lookup(&self, name: &str, hash: NameHash) -> NameLookup {
        debug_assert_eq!(hash, NameHash::of(name));
        let slot = self.index.find(hash.0, |s| name_at(&self.names, &self.slots[s as usize]) == name.as_bytes());
        NameLookup { slot, hash }
    }

    /// The name stored in a live slot.
    pub fn name_of(&self, slot: Slot) -> Option<&str> {
        let n = self.slots.get(slot as usize).filter(|n| n.label_set != VACANT)?;
        std::str::from_utf8(name_at(&self.names, n)).ok()
    }

    /// Number of distinct label sets in use.
    pub fn label_set_count(&self) -> usize {
        self.label_sets.len()
    }

    /// Number of distinct interned strings.
    pub fn string_count(&self) -> usize {
        self.strings.len()
    }

    /// Approximate heap bytes held, by component, for diagnostics (benchmarks measure the allocator).
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<NodeSlot>()
            + self.free.capacity() * 4
            + self.names.capacity()
            + self.index.heap_bytes()
            + self.members.iter().map(|m| m.slots.capacity() * 4 + size_of::<LabelSetMembers>()).sum::<usize>()
            + self.strings.heap_bytes(|s| s.len())
            + self.label_sets.heap_bytes(|p| p.len() * 8)
            + self.platforms.heap_bytes(|_| 0)
            + self.workload_sets.heap_bytes(|w| w.len() * 16)
            + self.label_by_content.capacity() * size_of::<(u64, (LabelSetId, Box<[u8]>))>()
            + self.label_by_content.values().map(|(_, flat)| flat.len()).sum::<usize>()
            + self.platform_by_content.capacity() * size_of::<(u64, PlatformId)>()
    }

    /// Whether `slot` holds a node.
    #[inline]
    pub(crate) fn is_live(&self, slot: Slot) -> bool {
        self.slots.get(slot as usize).is_some_and(|n| n.label_set != VACANT)
    }

    pub(crate) fn name_bytes(&self, slot: Slot) -> &[u8] {
        self.name_bytes_of(&self.slots[slot as usize])
    }

    /// The name of a node whose slot the caller has already read (a copy of it will do).
    #[inline]
    pub(crate) fn name_bytes_of(&self, node: &NodeSlot) -> &[u8] {
        name_at(&self.names, node)
    }

    pub(crate) fn str_of(&self, id: StrId) -> &str {
        self.strings.get(id)
    }

    pub(crate) fn label_set_view(&self, id: LabelSetId) -> LabelSetView<'_> {
        LabelSetView { cache: self, pairs: self.label_sets.get(id) }
    }

    fn intern_str(&mut self, s: &str) -> StrId {
        match self.strings.find(s) {
            Some(id) => {
                self.strings.retain(id);
                id
            }
            None => self.strings.acquire(&Box::from(s)).0,
        }
    }

    /// [`Self::intern_labels`], trusting the registration's `label_set` when it names one.
    fn intern_labels_hinted(&mut self, reg: &RegistrationRef<'_>) -> LabelSetId {
        match reg.label_set {
            Some(id) => {
                self.label_sets.retain(id);
                id
            }
            None => self.intern_labels(reg.labels),
        }
    }

    /// Interns a label set, taking a reference on it (and, when new, on its strings).
    fn intern_labels(&mut self, labels: LabelsView<'_>) -> LabelSetId {
        // Fastest path: one hash over the set's block finds it, and one comparison confirms it.
        let wire = labels.wire();
        let h = label_hash(wire);
        if let Some(&(id, ref stored)) = self.label_by_content.get(&h)
            && **stored == *wire
        {
            self.label_sets.retain(id);
            return id;
        }
        // Fast path: every string and the set itself already exist, so no refcount traffic and no
        // allocation beyond the probe key.
        let mut pairs = Vec::with_capacity(labels.len());
        for (k, v) in labels.iter() {
            match (self.strings.find(k), self.strings.find(v)) {
                (Some(k), Some(v)) => pairs.push((k, v)),
                _ => break,
            }
        }
        if pairs.len() == labels.len()
            && let Some(id) = self.label_sets.find(pairs.as_slice())
        {
            self.label_sets.retain(id);
            return id;
        }
        let pairs: LabelPairs = labels.iter().map(|(k, v)| (self.intern_str(k), self.intern_str(v))).collect();
        let (id, new) = self.label_sets.acquire(&pairs);
        if !new {
            for &(k, v) in pairs.iter() {
                self.strings.release(k);
                self.strings.release(v);
            }
        } else {
            self.init_members(id);
            self.label_by_content.entry(h).or_insert_with(|| (id, wire.into()));
        }
        id
    }

    /// The interned label set whose wire form ([`LabelsView::wire`]) is exactly `wire`, if any.
    pub(crate) fn find_label_set(&self, wire: &[u8]) -> Option<LabelSetId> {
        self.label_by_content.get(&label_hash(wire)).filter(|(_, stored)| **stored == *wire).map(|&(id, _)| id)
    }

    /// [`Self::find_label_set`] with the block's hash already computed (by
    /// [`Self::warm_label_sets`]): a registration hashes its label block once.
    #[inline]
    pub(crate) fn find_label_set_hashed(&self, wire: &[u8], hash: u64) -> Option<LabelSetId> {
        debug_assert_eq!(hash, label_hash(wire));
        self.label_by_content.get(&hash).filter(|(_, stored)| **stored == *wire).map(|&(id, _)| id)
    }

    /// Brings into cache what registering the label blocks `blocks` (at most [`PROBE_GROUP`]; an
    /// empty one is skipped) will read: the content map's entry, the stored form it compares with,
    /// the set's member list and its interned entry. Returns each block's hash, for
    /// [`Self::find_label_set_hashed`], and the set it found, or [`LabelSetId::MAX`], only as a
    /// hint for what else to warm: a registration in between may release a set and its id be
    /// reused, so the lookup is made again at the moment it counts.
    ///
    /// A fleet carries thousands of label sets and registers in random order, so each of these is
    /// a miss of its own, one after the other inside a registration; in passes over a group, as
    /// [`Self::warm_names`] does for names, they overlap.
    pub(crate) fn warm_label_sets(&self, blocks: &[&[u8]]) -> ([u64; PROBE_GROUP], [LabelSetId; PROBE_GROUP]) {
        let blocks = &blocks[..blocks.len().min(PROBE_GROUP)];
        let mut hashes = [0; PROBE_GROUP];
        let mut ids = [LabelSetId::MAX; PROBE_GROUP];
        let mut stored: [&[u8]; PROBE_GROUP] = [&[]; PROBE_GROUP];
        for (k, b) in blocks.iter().enumerate() {
            if !b.is_empty() {
                hashes[k] = label_hash(b);
                if let Some((id, s)) = self.label_by_content.get(&hashes[k]) {
                    ids[k] = *id;
                    stored[k] = s;
                }
            }
        }
        let mut touch = 0u64;
        for (k, s) in stored[..blocks.len()].iter().enumerate() {
            touch ^= s.iter().step_by(64).fold(0, |a, &b| a ^ u64::from(b));
            if let Some(m) = self.members.get(ids[k] as usize) {
                touch ^= m.slots.len() as u64;
            }
            touch ^= self.label_sets.try_get(ids[k]).map_or(0, |p| p.len() as u64);
        }
        for &id in &ids[..blocks.len()] {
            if let Some(m) = self.members.get(id as usize) {
                touch ^= u64::from(m.slots.last().copied().unwrap_or(0));
            }
        }
        std::hint::black_box(touch);
        (hashes, ids)
    }

    /// The wire form of an interned label set's pairs, as its content hint keeps it.
    fn wire_of(&self, pairs: &[(StrId, StrId)]) -> Box<[u8]> {
        label_wire(pairs.len(), pairs.iter().map(|&(k, v)| (&**self.strings.get(k), &**self.strings.get(v))))
    }

    fn init_members(&mut self, id: LabelSetId) {
        let idx = id as usize;
        if self.members.len() <= idx {
            self.members.resize_with(idx + 1, LabelSetMembers::default);
        }
        self.set_epoch = self.set_epoch.wrapping_add(1);
        self.members[idx] = LabelSetMembers { epoch: self.set_epoch, ..LabelSetMembers::default() };
    }

    fn release_labels(&mut self, id: LabelSetId) {
        if let Some(pairs) = self.label_sets.release(id) {
            let h = label_hash(&self.wire_of(&pairs));
            if self.label_by_content.get(&h).is_some_and(|&(found, _)| found == id) {
                self.label_by_content.remove(&h);
            }
            for &(k, v) in pairs.iter() {
                self.strings.release(k);
                self.strings.release(v);
            }
            self.members[id as usize] = LabelSetMembers::default();
        }
    }

    fn intern_platform(&mut self, arch: &str, os: &str, agent_version: &str) -> PlatformId {
        let h = platform_hash(arch, os, agent_version);
        if let Some(&id) = self.platform_by_content.get(&h)
            && self.platform_is(id, [arch, os, agent_version])
        {
            self.platforms.retain(id);
            return id;
        }
        let id = if let (Some(a), Some(o), Some(v)) =
            (self.strings.find(arch), self.strings.find(os), self.strings.find(agent_version))
            && let Some(id) = self.platforms.find(&[a, o, v])
        {
            self.platforms.retain(id);
            id
        } else {
            let triple = [self.intern_str(arch), self.intern_str(os), self.intern_str(agent_version)];
            let (id, new) = self.platforms.acquire(&triple);
            if !new {
                triple.iter().for_each(|&s| {
                    self.strings.release(s);
                });
            }
            id
        };
        self.platform_by_content.entry(h).or_insert(id);
        id
    }

    /// Whether live platform `id` is the triple `parts` (arch, os, agent version).
    fn platform_is(&self, id: PlatformId, parts: [&str; 3]) -> bool {
        self.platforms.try_get(id).is_some_and(|t| t.iter().zip(parts).all(|(&s, p)| **self.strings.get(s) == *p))
    }

    fn release_platform(&mut self, id: PlatformId) {
        if let Some(triple) = self.platforms.release(id) {
            let [a, o, v] = triple.map(|s| self.strings.get(s));
            let h = platform_hash(a, o, v);
            if self.platform_by_content.get(&h) == Some(&id) {
                self.platform_by_content.remove(&h);
            }
            triple.iter().for_each(|&s| {
                self.strings.release(s);
            });
        }
    }

    fn intern_workloads(&mut self, states: &[WorkloadState]) -> WorkloadSetId {
        // Fast path, no allocation: agents report a few workloads, sorted by id, and the same
        // list as many other nodes, so the probe fits on the stack and the set already exists.
        const SMALL: usize = 8;
        if states.len() <= SMALL && states.windows(2).all(|w| w[0].workload < w[1].workload) {
            let mut probe = [(0, 0, 0); SMALL];
            let found = states.iter().enumerate().all(|(i, w)| {
                self.strings.find(w.workload.as_str()).map(|id| probe[i] = (id, w.version, w.phase as u8)).is_some()
            });
            if found && let Some(id) = self.workload_sets.find(&probe[..states.len()]) {
                self.workload_sets.retain(id);
                return id;
            }
        }
        let mut sorted: Vec<&WorkloadState> = states.iter().collect();
        sorted.sort_by(|a, b| a.workload.cmp(&b.workload));
        sorted.dedup_by(|a, b| a.workload == b.workload);
        let mut probe = Vec::with_capacity(sorted.len());
        for w in &sorted {
            match self.strings.find(w.workload.as_str()) {
                Some(id) => probe.push((id, w.version, w.phase as u8)),
                None => break,
            }
        }
        if probe.len() == sorted.len()
            && let Some(id) = self.workload_sets.find(probe.as_slice())
        {
            self.workload_sets.retain(id);
            return id;
        }
        let items: WorkloadItems =
            sorted.iter().map(|w| (self.intern_str(w.workload.as_str()), w.version, w.phase as u8)).collect();
        let (id, new) = self.workload_sets.acquire(&items);
        if !new {
            for &(w, _, _) in items.iter() {
                self.strings.release(w);
            }
        }
        id
    }

    fn release_workloads(&mut self, id: WorkloadSetId) {
        if let Some(items) = self.workload_sets.release(id) {
            for &(w, _, _) in items.iter() {
                self.strings.release(w);
            }
        }
    }

    fn join_set(&mut self, slot: Slot, set: LabelSetId, phase: u8) {
        let m = &mut self.members[set as usize];
        self.slots[slot as usize].pos_in_set = m.slots.len() as u32;
        m.slots.push(slot);
        m.phases[usize::from(phase)] += 1;
    }

    fn leave_set(&mut self, slot: Slot) {
        let n = self.slots[slot as usize];
        let m = &mut self.members[n.label_set as usize];
        let pos = n.pos_in_set as usize;
        m.slots.swap_remove(pos);
        if let Some(&moved) = m.slots.get(pos) {
            self.slots[moved as usize].pos_in_set = pos as u32;
        }
        m.phases[usize::from(n.phase)] -= 1;
    }

    fn set_phase_at(&mut self, slot: Slot, phase: NodePhase) -> NodePhase {
        let n = &mut self.slots[slot as usize];
        let old = n.phase;
        let new = phase as u8;
        if old != new {
            n.phase = new;
            let m = &mut self.members[n.label_set as usize];
            m.phases[usize::from(old)] -= 1;
            m.phases[usize::from(new)] += 1;
            self.phase_totals[usize::from(old)] -= 1;
            self.phase_totals[usize::from(new)] += 1;
            if phase == NodePhase::Online {
                self.online_floor = self.online_floor.min(n.last_seen);
            }
        }
        NodePhase::from_u8(old).unwrap_or_default()
    }

    fn store_addresses(&mut self, slot: Slot, addrs: &[IpAddr]) {
        let n = &mut self.slots[slot as usize];
        n.flags &= !(FLAG_IPV4 | FLAG_EXTRA_ADDRS);
        n.ipv4 = 0;
        let rest = match addrs.first() {
            Some(IpAddr::V4(v4)) => {
                n.flags |= FLAG_IPV4;
                n.ipv4 = u32::from(*v4);
                &addrs[1..]
            }
            _ => addrs,
        };
        if rest.is_empty() {
            self.extra_addrs.remove(&slot);
        } else {
            n.flags |= FLAG_EXTRA_ADDRS;
            self.extra_addrs.insert(slot, rest.into());
        }
    }

    pub(crate) fn addresses_of(&self, slot: Slot) -> Vec<IpAddr> {
        let n = &self.slots[slot as usize];
        let mut out = Vec::new();
        if n.flags & FLAG_IPV4 != 0 {
            out.push(IpAddr::V4(Ipv4Addr::from(n.ipv4)));
        }
        if n.flags & FLAG_EXTRA_ADDRS != 0
            && let Some(extra) = self.extra_addrs.get(&slot)
        {
            out.extend_from_slice(extra);
        }
        out
    }

    fn push_name(&mut self, name: &str) -> Result<u32, CacheError> {
        if self.name_garbage > 1 << 20 && self.name_garbage * 2 > self.names.len() {
            self.compact_names();
        }
        let off = u32::try_from(self.names.len()).map_err(|_| CacheError::Full)?;
        if off.checked_add(name.len() as u32).is_none() {
            return Err(CacheError::Full);
        }
        self.names.extend_from_slice(name.as_bytes());
        Ok(off)
    }

    /// Rewrites the name arena without the bytes of removed nodes.
    fn compact_names(&mut self) {
        let mut names = Vec::with_capacity(self.names.len() - self.name_garbage);
        for n in self.slots.iter_mut().filter(|n| n.label_set != VACANT) {
            let off = names.len() as u32;
            names.extend_from_slice(&self.names[n.name_off as usize..n.name_off as usize + usize::from(n.name_len)]);
            n.name_off = off;
        }
        self.names = names;
        self.name_garbage = 0;
    }

    /// Inserts a brand-new node from already-interned parts, without the name index (registration
    /// and restore share it). Registration indexes the name right after; restore adds every node's
    /// [`index_entry`](Self::index_entry) through [`index_bulk`](Self::index_bulk) at the end, so
    /// the index is written a table region at a time instead of one random bucket per node.
    /// Nothing may look the name up until it is indexed.
    #[allow(clippy::too_many_arguments)] // one per column of a node; a struct would only rename them
    pub(crate) fn insert_unindexed(
        &mut self,
        name: &str,
        label_set: LabelSetId,
        platform: PlatformId,
        workloads: WorkloadSetId,
        phase: NodePhase,
        last_seen: u32,
        applied: u64,
    ) -> Result<Slot, CacheError> {
        let name_off = self.push_name(name)?;
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                let s = u32::try_from(self.slots.len()).ok().filter(|&s| s < VACANT).ok_or(CacheError::Full)?;
                self.slots.push(NodeSlot::default());
                s
            }
        };
        self.slots[slot as usize] = NodeSlot {
            applied,
            name_off,
            label_set,
            platform,
            workloads,
            last_seen,
            name_len: name.len() as u8,
            phase: phase as u8,
            ..NodeSlot::default()
        };
        self.join_set(slot, label_set, phase as u8);
        self.phase_totals[phase as usize] += 1;
        if phase == NodePhase::Online {
            self.online_floor = self.online_floor.min(last_seen);
        }
        self.live += 1;
        Ok(slot)
    }

    /// The name index's entry for a node inserted with [`insert_unindexed`](Self::insert_unindexed).
    pub(crate) fn index_entry(name: &str, slot: Slot) -> u64 {
        super::index::pack(hash_name(name.as_bytes()), slot)
    }

    /// Adds the entries of nodes inserted with [`insert_unindexed`](Self::insert_unindexed).
    pub(crate) fn index_bulk(&mut self, entries: &[u64]) {
        self.index.insert_bulk(entries);
    }

    /// Interning hooks used by snapshot restore.
    pub(crate) fn restore_label_set(&mut self, pairs: &[(&str, &str)]) -> LabelSetId {
        let mut labels: Vec<(&str, &str)> = pairs.to_vec();
        labels.sort_unstable();
        let ids: LabelPairs = labels.iter().map(|(k, v)| (self.intern_str(k), self.intern_str(v))).collect();
        let (id, new) = self.label_sets.acquire(&ids);
        if new {
            self.init_members(id);
            let wire = label_wire(labels.len(), labels.iter().copied());
            self.label_by_content.entry(label_hash(&wire)).or_insert((id, wire));
        } else {
            for &(k, v) in ids.iter() {
                self.strings.release(k);
                self.strings.release(v);
            }
        }
        id
    }

    pub(crate) fn restore_platform(&mut self, arch: &str, os: &str, version: &str) -> PlatformId {
        self.intern_platform(arch, os, version)
    }

    pub(crate) fn restore_workload_set(&mut self, items: &[(&str, u64, u8)]) -> WorkloadSetId {
        let mut sorted = items.to_vec();
        sorted.sort_unstable();
        let ids: WorkloadItems = sorted.iter().map(|&(w, v, p)| (self.intern_str(w), v, p)).collect();
        let (id, new) = self.workload_sets.acquire(&ids);
        if !new {
            for &(w, _, _) in ids.iter() {
                self.strings.release(w);
            }
        }
        id
    }

    /// Drops the references the restore's dictionaries took (each node took its own).
    pub(crate) fn release_restore_refs(
        &mut self,
        labels: &[LabelSetId],
        platforms: &[PlatformId],
        wls: &[WorkloadSetId],
    ) {
        labels.iter().for_each(|&l| self.release_labels(l));
        platforms.iter().for_each(|&p| self.release_platform(p));
        wls.iter().for_each(|&w| self.release_workloads(w));
    }

    pub(crate) fn retain_parts(&mut self, label_set: LabelSetId, platform: PlatformId, workloads: WorkloadSetId) {
        self.label_sets.retain(label_set);
        self.platforms.retain(platform);
        self.workload_sets.retain(workloads);
    }

    pub(crate) fn set_addresses_raw(&mut self, slot: Slot, addrs: &[IpAddr]) {
        self.store_addresses(slot, addrs);
    }

    /// Snapshot hook: the primary IPv4 address of a node, if it has one.
    pub(crate) fn ipv4_of_slot(&self, n: &NodeSlot) -> Option<u32> {
        (n.flags & FLAG_IPV4 != 0).then_some(n.ipv4)
    }

    /// Snapshot hook: whether a node has addresses beyond its primary IPv4 one.
    pub(crate) fn has_extra_addrs(&self, n: &NodeSlot) -> bool {
        n.flags & FLAG_EXTRA_ADDRS != 0
    }

    /// Snapshot hook: the addresses after the primary IPv4 one (all of them without one).
    pub(crate) fn extra_addrs_of(&self, slot: Slot) -> &[IpAddr] {
        if self.slots[slot as usize].flags & FLAG_EXTRA_ADDRS == 0 {
            return &[];
        }
        self.extra_addrs.get(&slot).map_or(&[], |a| &a[..])
    }

    /// Restore hook: gives a freshly inserted slot (no addresses yet) its primary IPv4 address,
    /// without the extra-address map lookup of [`Self::set_addresses_raw`].
    pub(crate) fn set_ipv4_raw(&mut self, slot: Slot, ipv4: u32) {
        let n = &mut self.slots[slot as usize];
        n.flags |= FLAG_IPV4;
        n.ipv4 = ipv4;
    }

    pub(crate) fn record_at(&self, slot: Slot) -> NodeRecord {
        let n = &self.slots[slot as usize];
        let labels = self
            .label_sets
            .get(n.label_set)
            .iter()
            .map(|&(k, v)| (self.str_of(k).to_owned(), self.str_of(v).to_owned()))
            .collect::<std::collections::BTreeMap<_, _>>();
        let [arch, os, ver] = *self.platforms.get(n.platform);
        let workloads = self
            .workload_sets
            .get(n.workloads)
            .iter()
            .filter_map(|&(w, version, phase)| {
                Some(WorkloadState {
                    workload: WorkloadId::new(self.str_of(w)).ok()?,
                    version,
                    phase: WorkloadPhase::from_u8(phase)?,
                })
            })
            .collect();
        NodeRecord {
            // Names and labels were validated on the way in.
            name: NodeName::new(String::from_utf8_lossy(self.name_bytes(slot))).unwrap_or_else(|_| unreachable_name()),
            labels: Labels::try_from(labels).unwrap_or_default(),
            info: NodeInfo {
                arch: self.str_of(arch).to_owned(),
                os: self.str_of(os).to_owned(),
                agent_version: self.str_of(ver).to_owned(),
                addresses: self.addresses_of(slot),
            },
            phase: NodePhase::from_u8(n.phase).unwrap_or_default(),
            last_seen: Timestamp::from_secs(u64::from(n.last_seen)),
            applied: DesiredDigest(n.applied),
            health: NodeHealth(n.health),
            workloads,
        }
    }

    /// Label sets matching `selector`, each evaluated once.
    pub(crate) fn matching_sets(&self, selector: &Selector) -> Vec<LabelSetId> {
        self.label_sets
            .iter()
            .filter(|&(id, _, _)| selector.is_everything() || selector.matches(&self.label_set_view(id)))
            .map(|(id, _, _)| id)
            .collect()
    }

    /// Calls `f` with every live slot matching `selector`, label set by label set.
    pub(crate) fn for_each_selected(&self, selector: &Selector, mut f: impl FnMut(Slot) -> ControlFlow<()>) {
        for set in self.matching_sets(selector) {
            for &slot in &self.members[set as usize].slots {
                if f(slot).is_break() {
                    return;
                }
            }
        }
    }

    /// Applies a heartbeat to a known slot (see [`StateCache::heartbeat`]).
    #[inline]
    fn heartbeat_at(&mut self, slot: Slot, hb: &HeartbeatUpdate, now_s: u32) -> Result<HeartbeatOutcome, CacheError> {
        let n = &mut self.slots[slot as usize];
        if n.boot_id != 0 && n.boot_id != hb.boot_id {
            return Err(CacheError::BootMismatch { registered: n.boot_id, received: hb.boot_id });
        }
        if n.boot_id == hb.boot_id && hb.seq <= n.seq {
            return Err(CacheError::Stale { last: n.seq, received: hb.seq });
        }
        n.boot_id = hb.boot_id;
        n.seq = hb.seq;
        n.last_seen = n.last_seen.max(now_s);
        let applied_changed = n.applied != hb.applied.0;
        n.applied = hb.applied.0;
        if let Some(h) = hb.health {
            n.health = h.0;
        }
        let previous = if n.phase == NodePhase::Online as u8 {
            NodePhase::Online
        } else {
            self.set_phase_at(slot, NodePhase::Online)
        };
        Ok(HeartbeatOutcome { slot, previous, applied_changed })
    }

    /// [`StateCache::register`] from a borrowed registration (see [`RegistrationRef`]).
    pub(crate) fn register_ref(
        &mut self,
        reg: &RegistrationRef<'_>,
        boot_id: u32,
        now: Timestamp,
    ) -> Result<Registered, CacheError> {
        self.register_ref_at(reg, self.lookup(reg.name, NameHash::of(reg.name)), boot_id, now)
    }

    /// [`Self::register_ref`] when the caller already looked the name up: `found` must be
    /// `self.lookup(reg.name, ..)`, made since the cache last changed.
    pub(crate) fn register_ref_at(
        &mut self,
        reg: &RegistrationRef<'_>,
        found: NameLookup,
        boot_id: u32,
        now: Timestamp,
    ) -> Result<Registered, CacheError> {
        let known = found.slot;
        if reg.name.len() > usize::from(u8::MAX) {
            return Err(CacheError::NameTooLong);
        }
        let now_s = now.as_secs_u32();
        if let Some(slot) = known {
            let old = self.slots[slot as usize];
            let restarted = old.boot_id != 0 && old.boot_id != boot_id;
            // Labels may change across registrations: move the slot between label sets.
            let new_set = self.intern_labels_hinted(reg);
            if new_set != old.label_set {
                self.leave_set(slot);
                self.slots[slot as usize].label_set = new_set;
                self.join_set(slot, new_set, old.phase);
            }
            self.release_labels(old.label_set);
            let platform = self.intern_platform(reg.arch, reg.os, reg.agent_version);
            self.release_platform(old.platform);
            let workloads = self.intern_workloads(reg.workloads);
            self.release_workloads(old.workloads);
            let previous = self.set_phase_at(slot, NodePhase::Online);
            let n = &mut self.slots[slot as usize];
            n.platform = platform;
            n.workloads = workloads;
            n.applied = reg.applied.0;
            // A new session: the next heartbeat says how the node is.
            n.health = 0;
            n.last_seen = now_s;
            self.online_floor = self.online_floor.min(now_s);
            if n.boot_id != boot_id {
                n.seq = 0;
            }
            n.boot_id = boot_id;
            self.store_addresses(slot, reg.addresses);
            return Ok(Registered { slot, created: false, restarted, previous: Some(previous) });
        }
        let label_set = self.intern_labels_hinted(reg);
        let platform = self.intern_platform(reg.arch, reg.os, reg.agent_version);
        let workloads = self.intern_workloads(reg.workloads);
        let slot = match self.insert_unindexed(
            reg.name,
            label_set,
            platform,
            workloads,
            NodePhase::Online,
            now_s,
            reg.applied.0,
        ) {
            Ok(s) => s,
            Err(e) => {
                self.release_labels(label_set);
                self.release_platform(platform);
                self.release_workloads(workloads);
                return Err(e);
            }
        };
        self.index.insert(found.hash.0, slot);
        self.slots[slot as usize].boot_id = boot_id;
        self.store_addresses(slot, reg.addresses);
        Ok(Registered { slot, created: true, restarted: false, previous: None })
    }

    /// [`StateCache::report_workloads`] for a live slot already looked up.
    pub(crate) fn report_workloads_at(&mut self, slot: Slot, states: &[WorkloadState]) {
        let id = self.intern_workloads(states);
        let old = std::mem::replace(&mut self.slots[slot as usize].workloads, id);
        self.release_workloads(old);
    }

    /// Applies a heartbeat to a slot found by [`Self::resolve_batch`] or [`Self::slot_of`] (the
    /// engine's batch path, which needs the slot before it applies: one lookup per message).
    #[inline]
    pub(crate) fn heartbeat_slot(
        &mut self,
        slot: Slot,
        hb: &HeartbeatUpdate,
        now: Timestamp,
    ) -> Result<HeartbeatOutcome, CacheError> {
        if !self.is_live(slot) {
            return Err(CacheError::UnknownNode);
        }
        self.heartbeat_at(slot, hb, now.as_secs_u32())
    }

    /// Appends the slot of each of `names`, in order (`None` for an unknown name).
    ///
    /// Random node order makes every lookup a handful of cache misses (index bucket, slot, name
    /// bytes). Resolving a group in passes, each issuing independent loads for all of its members,
    /// lets the CPU overlap those misses instead of paying them one after another.
    pub(crate) fn resolve_batch<'a>(&self, names: impl Iterator<Item = &'a str>, out: &mut Vec<Option<Slot>>) {
        let mut names = names.peekable();
        while names.peek().is_some() {
            let mut group: [&str; PROBE_GROUP] = [""; PROBE_GROUP];
            let mut len = 0;
            while len < PROBE_GROUP
                && let Some(name) = names.next()
            {
                group[len] = name;
                len += 1;
            }
            let group = &group[..len];
            let probe = self.probe_group(group);
            for (k, name) in group.iter().enumerate() {
                let c = probe.cand[k];
                out.push(if self.is_live(c) && self.name_bytes(c) == name.as_bytes() {
                    Some(c)
                } else {
                    self.index
                        .find(probe.hashes[k], |s| name_at(&self.names, &self.slots[s as usize]) == name.as_bytes())
                });
            }
        }
    }

    /// Brings into cache what looking up each of `names` (at most [`PROBE_GROUP`]) will read, in
    /// the passes of [`Self::resolve_batch`], and finds nothing: for a caller that then looks each
    /// one up with [`Self::lookup`] at the moment it needs it, because its own work in between may
    /// add or remove nodes (registration), so a slot found ahead could be out of date. Returns the
    /// names' hashes, in order, for those lookups.
    pub(crate) fn warm_names(&self, names: &[&str]) -> [NameHash; PROBE_GROUP] {
        let probe = self.probe_group(&names[..names.len().min(PROBE_GROUP)]);
        probe.hashes.map(NameHash)
    }

    /// The passes over one group of names: hash every name, find every name's candidate entry in
    /// the index, touch every candidate's slot, then every candidate's name bytes (whose place is
    /// in the slot). Each pass's loads are independent of one another, so their misses overlap.
    fn probe_group(&self, group: &[&str]) -> ProbeGroup {
        let mut probe = ProbeGroup { hashes: [0; PROBE_GROUP], cand: [u32::MAX; PROBE_GROUP] };
        for (k, name) in group.iter().enumerate() {
            probe.hashes[k] = hash_name(name.as_bytes());
        }
        for k in 0..group.len() {
            probe.cand[k] = self.index.candidate(probe.hashes[k]);
        }
        let mut touch = 0u64;
        let mut name_offs = [0u32; PROBE_GROUP];
        for (off, &c) in name_offs.iter_mut().zip(&probe.cand[..group.len()]) {
            if let Some(n) = self.slots.get(c as usize) {
                *off = n.name_off;
            }
        }
        for &off in &name_offs[..group.len()] {
            touch ^= u64::from(self.names.get(off as usize).copied().unwrap_or(0));
        }
        std::hint::black_box(touch);
        probe
    }

    /// Marks every online node not heard from since `cutoff` as offline, telling `marked` each
    /// slot it marks; returns how many changed.
    ///
    /// Cheap when nothing is due: the cache keeps a lower bound of the online nodes' last-seen
    /// times, and scans the table only when the cutoff passes it.
    pub(crate) fn mark_offline_before(&mut self, cutoff: Timestamp, mut marked: impl FnMut(Slot)) -> usize {
        let cutoff = cutoff.as_secs_u32();
        if cutoff <= self.online_floor {
            return 0;
        }
        let mut changed = 0;
        let mut floor = u32::MAX;
        for slot in 0..self.slots.len() as u32 {
            let n = self.slots[slot as usize];
            if n.label_set == VACANT || n.phase != NodePhase::Online as u8 {
                continue;
            }
            if n.last_seen < cutoff {
                self.set_phase_at(slot, NodePhase::Offline);
                marked(slot);
                changed += 1;
            } else {
                floor = floor.min(n.last_seen);
            }
        }
        self.online_floor = floor;
        changed
    }

    /// Checks every internal invariant; for tests. Returns a description of the first violation.
    // Public only for the cross-crate tests in `tests/`; not part of the API.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut live = 0;
        let mut totals = [0u32; 3];
        for (slot, n) in self.slots.iter().enumerate() {
            if n.label_set == VACANT {
                continue;
            }
            live += 1;
            totals[usize::from(n.phase)] += 1;
            let name = std::str::from_utf8(name_at(&self.names, n)).map_err(|e| e.to_string())?;
            if self.slot_of(name) != Some(slot as u32) {
                return Err(format!("index does not find {name:?} at slot {slot}"));
            }
            let m = &self.members[n.label_set as usize];
            if m.slots.get(n.pos_in_set as usize) != Some(&(slot as u32)) {
                return Err(format!("slot {slot} not at its position in label set {}", n.label_set));
            }
        }
        if live != self.live || self.index.len() != live {
            return Err(format!("live {live}, counted {}, indexed {}", self.live, self.index.len()));
        }
        if totals != self.phase_totals {
            return Err(format!("phase totals {totals:?} vs kept {:?}", self.phase_totals));
        }
        for (id, _, refs) in self.label_sets.iter() {
            let m = &self.members[id as usize];
            if m.slots.len() as u32 != refs {
                return Err(format!("label set {id}: {} members, {refs} refs", m.slots.len()));
            }
            let mut phases = [0u32; 3];
            for &s in &m.slots {
                phases[usize::from(self.slots[s as usize].phase)] += 1;
            }
            if phases != m.phases {
                return Err(format!("label set {id}: phases {phases:?} vs kept {:?}", m.phases));
            }
        }
        // The content hint names only live sets, each under the hash of its own wire form (a
        // second set whose hash collides is simply not hinted).
        for (&h, (id, wire)) in &self.label_by_content {
            let pairs = self.label_sets.try_get(*id).ok_or_else(|| format!("hint names freed label set {id}"))?;
            if self.wire_of(pairs) != *wire || label_hash(wire) != h {
                return Err(format!("hint for label set {id} holds another set's form or hash"));
            }
        }
        for (&h, &id) in &self.platform_by_content {
            let [a, o, v] = *self.platforms.try_get(id).ok_or_else(|| format!("hint names freed platform {id}"))?;
            if platform_hash(self.strings.get(a), self.strings.get(o), self.strings.get(v)) != h {
                return Err(format!("hint for platform {id} holds another platform's hash"));
            }
        }
        self.check_shared_parts()
    }

    /// The invariants of what nodes share: free slots, the name arena and every interner's counts.
    fn check_shared_parts(&self) -> Result<(), String> {
        let vacant: Vec<Slot> = (0..self.slots.len() as u32).filter(|&s| !self.is_live(s)).collect();
        let mut free = self.free.clone();
        free.sort_unstable();
        if free != vacant {
            return Err(format!("free list {free:?} vs vacant slots {vacant:?}"));
        }
        let live_name_bytes: usize =
            self.slots.iter().filter(|n| n.label_set != VACANT).map(|n| usize::from(n.name_len)).sum();
        if live_name_bytes + self.name_garbage != self.names.len() {
            let (len, garbage) = (self.names.len(), self.name_garbage);
            return Err(format!("arena holds {len} bytes, not {live_name_bytes} live + {garbage} garbage"));
        }
        for (&slot, addrs) in &self.extra_addrs {
            if !self.is_live(slot) || self.slots[slot as usize].flags & FLAG_EXTRA_ADDRS == 0 || addrs.is_empty() {
                return Err(format!("extra addresses kept for slot {slot}, which has none"));
            }
        }
        for (id, m) in self.members.iter().enumerate() {
            if !m.slots.is_empty() && self.label_sets.iter().all(|(l, _, _)| l as usize != id) {
                return Err(format!("freed label set {id} still lists members"));
            }
        }
        // Every reference to an interned value is held by a live user, and every user holds one.
        let mut platform_refs = HashMap::<PlatformId, u32>::new();
        let mut workload_refs = HashMap::<WorkloadSetId, u32>::new();
        for n in self.slots.iter().filter(|n| n.label_set != VACANT) {
            *platform_refs.entry(n.platform).or_default() += 1;
            *workload_refs.entry(n.workloads).or_default() += 1;
        }
        let platforms: HashMap<_, _> = self.platforms.iter().map(|(id, _, refs)| (id, refs)).collect();
        let workloads: HashMap<_, _> = self.workload_sets.iter().map(|(id, _, refs)| (id, refs)).collect();
        if platforms != platform_refs {
            return Err(format!("platform refs {platforms:?} vs users {platform_refs:?}"));
        }
        if workloads != workload_refs {
            return Err(format!("workload set refs {workloads:?} vs users {workload_refs:?}"));
        }
        let mut string_refs = HashMap::<StrId, u32>::new();
        let mut count = |id: StrId| *string_refs.entry(id).or_default() += 1;
        self.label_sets.iter().flat_map(|(_, pairs, _)| pairs.iter()).for_each(|&(k, v)| {
            count(k);
            count(v);
        });
        self.platforms.iter().for_each(|(_, triple, _)| triple.iter().for_each(|&s| count(s)));
        self.workload_sets.iter().flat_map(|(_, items, _)| items.iter()).for_each(|&(w, _, _)| count(w));
        let strings: HashMap<_, _> = self.strings.iter().map(|(id, _, refs)| (id, refs)).collect();
        if strings != string_refs {
            return Err(format!("string refs {strings:?} vs users {string_refs:?}"));
        }
        Ok(())
    }
}

#[cold]
fn unreachable_name() -> NodeName {
    // Only reachable if the arena were corrupted; keep going with a visible placeholder.
    NodeName::new("invalid-name").unwrap_or_else(|_| unreachable!())
}

/// The wire form of a label set given as `count` pairs in key order ([`LabelsView::wire`]).
fn label_wire<'a>(count: usize, pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Box<[u8]> {
    let wire = encode_pairs(count, pairs);
    if wire.is_empty() { Box::new([0]) } else { wire }
}

/// The hash [`NodeCache`] finds a platform by: of its three strings, each with its length.
fn platform_hash(arch: &str, os: &str, agent_version: &str) -> u64 {
    [arch, os, agent_version].iter().fold(0x706c_6174_666f_726d, |h, s| stable_hash(h, s.as_bytes()))
}

/// The hash [`NodeCache`] finds a label set by: of its wire form, in one pass.
fn label_hash(wire: &[u8]) -> u64 {
    stable_hash(0x6c61_6265_6c73_6574, wire)
}

#[inline]
fn name_at<'a>(names: &'a [u8], n: &NodeSlot) -> &'a [u8] {
    &names[n.name_off as usize..n.name_off as usize + usize::from(n.name_len)]
}

/// Names looked up together by [`NodeCache::resolve_batch`] and [`NodeCache::warm_names`]: enough
/// independent misses to keep the memory system busy, few enough to stay on the stack.
pub(crate) const PROBE_GROUP: usize = 16;

/// One group's hashes and candidate slots (`u32::MAX`: none; see [`NameIndex::candidate`]).
struct ProbeGroup {
    hashes: [u32; PROBE_GROUP],
    cand: [u32; PROBE_GROUP],
}

#[inline]
fn hash_name(name: &[u8]) -> u32 {
    let h = stable_hash(NAME_SEED, name);
    (h ^ (h >> 32)) as u32
}

/// A node name's hash in the cache's index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NameHash(u32);

impl NameHash {
    pub(crate) fn of(name: &str) -> Self {
        Self(hash_name(name.as_bytes()))
    }
}

/// A name looked up in the cache: its slot, if present, and its hash (to index it if it is added).
#[derive(Clone, Copy, Debug)]
pub(crate) struct NameLookup {
    pub(crate) slot: Option<Slot>,
    hash: NameHash,
}

impl StateCache for NodeCache {
    fn len(&self) -> usize {
        self.live
    }

    fn get(&self, name: &str) -> Option<NodeRecord> {
        self.slot_of(name).map(|s| self.record_at(s))
    }

    fn counts(&self, selector: &Selector) -> PhaseCounts {
        if selector.is_everything() {
            return PhaseCounts::from_array(self.phase_totals);
        }
        let mut c = [0u32; 3];
        for set in self.matching_sets(selector) {
            let p = self.members[set as usize].phases;
            (0..3).for_each(|i| c[i] += p[i]);
        }
        PhaseCounts::from_array(c)
    }

    fn register(&mut self, reg: &NodeRegistration, boot_id: u32, now: Timestamp) -> Result<Registered, CacheError> {
        let r = RegistrationRef {
            name: reg.name.as_str(),
            labels: reg.labels.view(),
            arch: &reg.info.arch,
            os: &reg.info.os,
            agent_version: &reg.info.agent_version,
            addresses: &reg.info.addresses,
            applied: reg.applied,
            workloads: &reg.workloads,
            label_set: None,
        };
        self.register_ref(&r, boot_id, now)
    }

    #[inline]
    fn heartbeat(&mut self, name: &str, hb: &HeartbeatUpdate, now: Timestamp) -> Result<HeartbeatOutcome, CacheError> {
        let slot = self.slot_of(name).ok_or(CacheError::UnknownNode)?;
        self.heartbeat_at(slot, hb, now.as_secs_u32())
    }

    fn heartbeat_batch(
        &mut self,
        batch: &[HeartbeatIn<'_>],
        now: Timestamp,
        out: &mut Vec<Result<HeartbeatOutcome, CacheError>>,
    ) {
        let now_s = now.as_secs_u32();
        let mut slots = Vec::with_capacity(batch.len());
        self.resolve_batch(batch.iter().map(|hb| hb.node), &mut slots);
        out.reserve(batch.len());
        for (hb, slot) in batch.iter().zip(slots) {
            out.push(match slot {
                Some(slot) => self.heartbeat_at(slot, &hb.update, now_s),
                None => Err(CacheError::UnknownNode),
            });
        }
    }

    fn report_workloads(&mut self, name: &str, states: &[WorkloadState]) -> Result<Slot, CacheError> {
        let slot = self.slot_of(name).ok_or(CacheError::UnknownNode)?;
        self.report_workloads_at(slot, states);
        Ok(slot)
    }

    fn set_phase(&mut self, name: &str, phase: NodePhase) -> Result<NodePhase, CacheError> {
        let slot = self.slot_of(name).ok_or(CacheError::UnknownNode)?;
        Ok(self.set_phase_at(slot, phase))
    }

    fn mark_offline(&mut self, cutoff: Timestamp) -> usize {
        self.mark_offline_before(cutoff, |_| {})
    }

    fn remove(&mut self, name: &str) -> bool {
        let Some(slot) = self.slot_of(name) else {
            return false;
        };
        let n = self.slots[slot as usize];
        self.leave_set(slot);
        self.index.remove(hash_name(name.as_bytes()), slot);
        self.release_labels(n.label_set);
        self.release_platform(n.platform);
        self.release_workloads(n.workloads);
        self.extra_addrs.remove(&slot);
        self.phase_totals[usize::from(n.phase)] -= 1;
        self.name_garbage += usize::from(n.name_len);
        self.slots[slot as usize] = NodeSlot { label_set: VACANT, ..NodeSlot::default() };
        self.free.push(slot);
        self.live -= 1;
        true
    }

    fn query(&self, q: &CacheQuery) -> QueryPage {
        let limit = q.limit.max(1);
        let mut items = Vec::new();
        let mut next = None;
        let phase_ok = |slot: Slot| {
            let n = &self.slots[slot as usize];
            q.phase.is_none_or(|p| n.phase == p as u8) && q.health.matches(NodeHealth(n.health))
        };
        if !q.names.is_empty() {
            // Name lookups: the page walks the requested names in order; the token is a position.
            let start = q.continue_after.map_or(0, |c| c as usize + 1);
            let mut matched = [0u32; 3];
            let mut seen = std::collections::HashSet::with_capacity(q.names.len());
            for (i, name) in q.names.iter().enumerate() {
                let Some(slot) = self.slot_of(name.as_str()) else { continue };
                // A name asked for twice is one node: count it and return it once.
                if !seen.insert(slot) {
                    continue;
                }
                if !q.selector.matches(&self.label_set_view(self.slots[slot as usize].label_set)) {
                    continue;
                }
                matched[usize::from(self.slots[slot as usize].phase)] += 1;
                if i >= start && phase_ok(slot) && next.is_none() {
                    if items.len() == limit {
                        next = Some((i - 1) as u32);
                    } else {
                        items.push(self.record_at(slot));
                    }
                }
            }
            return QueryPage { items, continue_after: next, counts: PhaseCounts::from_array(matched) };
        }
        // Selector scan in slot order, so a continue token (the last slot returned) stays valid
        // while nodes come and go; each label set is evaluated once.
        let mut selected = vec![false; self.label_sets.capacity_ids()];
        for set in self.matching_sets(&q.selector) {
            selected[set as usize] = true;
        }
        let start = q.continue_after.map_or(0, |c| c as usize + 1);
        for slot in start..self.slots.len() {
            let n = &self.slots[slot];
            if n.label_set == VACANT || !selected[n.label_set as usize] || !phase_ok(slot as u32) {
                continue;
            }
            if items.len() == limit {
                next = items.last().and_then(|r: &NodeRecord| self.slot_of(r.name.as_str()));
                break;
            }
            items.push(self.record_at(slot as u32));
        }
        QueryPage { items, continue_after: next, counts: self.counts(&q.selector) }
    }

    fn visit(&self, selector: &Selector, visitor: &mut dyn FnMut(NodeRecord) -> ControlFlow<()>) {
        self.for_each_selected(selector, |slot| visitor(self.record_at(slot)));
    }
}
