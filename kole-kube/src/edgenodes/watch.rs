//! Watching `edgenodes`: changes found by a periodic pass over the cache, numbered, kept in a
//! bounded history and fanned out to every open watch.
//!
//! # What is watched
//! A node's phase, labels and workload states. `lastSeen` is not: it moves on every heartbeat,
//! and a million nodes would make a million events every heartbeat interval. An event's object
//! carries the node's current `lastSeen` all the same.
//!
//! # `resourceVersion` semantics
//! - Versions are numbers, unique to one serving process: the first is the process's start time in
//!   microseconds since the epoch, and every change adds one. They are not etcd's and are only
//!   compared with each other.
//! - A list's first page runs a pass and returns its version; a watch from it receives every change
//!   after it. The list's items are read just after the pass, so they may already show a change a
//!   watch from that version will also deliver (applied twice, with no effect the second time).
//! - A watch from an older version replays the changes it missed if they are still in the history
//!   (`watch_history` events); otherwise, or from another process's version, it ends at once with
//!   `410 Gone` (reason `Expired`), and clients list again, as after an etcd compaction.
//! - A watch without a version (or `0`) starts with one `ADDED` per matching node, then changes.
//! - A pass that finds more than `max_changes_per_pass` changes (a broker outage takes the fleet
//!   offline at once) records none: every open watch ends with `410 Gone` and clients list again,
//!   instead of the history holding a million events.
//! - When the served cache is replaced (a standby restores a newer snapshot, or the replica becomes
//!   the leader), every open watch ends with `410 Gone` and versions continue from a new floor.
//! - With `allowWatchBookmarks=true`, a `BOOKMARK` with the latest version passed comes every
//!   `bookmark_interval`.
//! - A node that stops matching a watch's selectors (relabelled, or out of a `status.phase`
//!   filter) is sent as `DELETED`, one that starts matching as `ADDED`, as Kubernetes does.
//!
//! # Cost
//! One pass reads every slot and no string (milliseconds at 1M nodes) and keeps each node's name
//! and watched state from the previous pass (about 50 B per node, once per process, not per
//! watch). Each open watch costs a task, a subscription to the shared history and a 64-event
//! output queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kole_core::cache::{NodeCache, Slot, WatchKey};
use kole_core::model::{Labels, NodePhase, NodeRecord};
use tokio::sync::broadcast;

use super::source::{NodeSource, Staleness};

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// A node's watched state before a change, as far as it is still known.
#[derive(Clone, Debug)]
pub(crate) struct OldState {
    pub(crate) phase: NodePhase,
    /// `None`: the old label set is no longer interned (then selectors are assumed to match).
    pub(crate) labels: Option<Labels>,
}

/// One numbered change.
#[derive(Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: ChangeKind,
    pub(crate) name: Box<str>,
    /// The node now (`None` when deleted).
    pub(crate) record: Option<NodeRecord>,
    /// Before (`None` when added).
    pub(crate) old: Option<OldState>,
}

/// What the hub tells watches.
#[derive(Clone, Debug)]
pub(crate) enum HubMsg {
    Change(Arc<Change>),
    /// A pass finished; everything up to `rv` has been sent.
    Progress(u64),
    /// History lost (too many changes at once, or the cache was replaced): end with `410 Gone`.
    Reset,
}

struct Prev {
    name: Box<str>,
    key: WatchKey,
}

struct HubState {
    /// The served cache's epoch the previous pass saw (`0`: none yet).
    epoch: u64,
    prev: Vec<Option<Prev>>,
    history: VecDeque<Arc<Change>>,
    /// The oldest version a watch may resume from.
    floor: u64,
}

/// Why a watch cannot start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StartError {
    /// The version is older than the history, or from another process.
    Expired(String),
}

/// A watch started from the current state.
pub(crate) struct Started<R> {
    /// What the initial read returned.
    pub(crate) value: R,
    pub(crate) staleness: Option<Staleness>,
    /// The version the initial read stands for.
    pub(crate) rv: u64,
    pub(crate) rx: broadcast::Receiver<HubMsg>,
}

/// The change feed behind every watch of one server.
pub struct WatchHub {
    state: Mutex<HubState>,
    rv: AtomicU64,
    tx: broadcast::Sender<HubMsg>,
    history: usize,
    max_changes: usize,
    passes: AtomicU64,
    resets: AtomicU64,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHub").field("rv", &self.rv.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl WatchHub {
    /// A hub keeping `history` events and giving up on passes with more than `max_changes`.
    pub fn new(history: usize, max_changes: usize) -> Self {
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        let (tx, _) = broadcast::channel(history.max(16));
        Self {
            state: Mutex::new(HubState { epoch: 0, prev: Vec::new(), history: VecDeque::new(), floor: start }),
            rv: AtomicU64::new(start),
            tx,
            history: history.max(1),
            max_changes,
            passes: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        }
    }

    /// The latest version.
    pub fn resource_version(&self) -> u64 {
        self.rv.load(Ordering::Acquire)
    }

    /// Passes run and watch resets so far (for metrics and tests).
    pub fn counters(&self) -> (u64, u64) {
        (self.passes.load(Ordering::Relaxed), self.resets.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One pass: compares every node with the previous pass and publishes what changed. Returns
    /// the number of changes published.
    pub fn pass(&self, source: &NodeSource) -> usize {
        let mut st = self.lock();
        let st = &mut *st;
        self.passes.fetch_add(1, Ordering::Relaxed);
        let epoch = source.epoch();
        let baseline = st.epoch != epoch;
        if baseline {
            // A new cache (the first, a standby's reload, a change of role): slots of the old one
            // mean nothing in it, and its contents are a baseline, not changes.
            if st.epoch != 0 {
                self.reset(st);
            }
            st.prev.clear();
        }
        let max = if baseline { 0 } else { self.max_changes };
        let read = source.read(|cache| diff(cache, &mut st.prev, max));
        let Ok(read) = read else {
            // Nothing served: the next cache starts a new baseline.
            st.epoch = 0;
            st.prev = Vec::new();
            return 0;
        };
        if read.epoch != epoch {
            // Replaced while this pass started: the next pass rebuilds.
            st.epoch = 0;
            st.prev.clear();
            self.reset(st);
            return 0;
        }
        st.epoch = epoch;
        if baseline {
            return 0;
        }
        let diffed = read.value;
        let Some(changes) = diffed else {
            self.reset(st);
            return 0;
        };
        let n = changes.len();
        for mut c in changes {
            c.rv = self.rv.fetch_add(1, Ordering::AcqRel) + 1;
            let c = Arc::new(c);
            if st.history.len() == self.history
                && let Some(old) = st.history.pop_front()
            {
                st.floor = old.rv;
            }
            st.history.push_back(Arc::clone(&c));
            let _ = self.tx.send(HubMsg::Change(c));
        }
        let _ = self.tx.send(HubMsg::Progress(self.resource_version()));
        n
    }

    fn reset(&self, st: &mut HubState) {
        st.history.clear();
        // Nothing before the next version can be resumed from.
        st.floor = self.rv.fetch_add(1, Ordering::AcqRel) + 1;
        self.resets.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(HubMsg::Reset);
    }

    /// Subscribes from version `from`: the changes after it still in the history, then live ones.
    pub(crate) fn resume(&self, from: u64) -> Result<(Vec<Arc<Change>>, broadcast::Receiver<HubMsg>), StartError> {
        let st = self.lock();
        let now = self.resource_version();
        if from < st.floor || from > now {
            return Err(StartError::Expired(format!(
                "too old resource version: {from} (this server can resume from {} to {now}); list again",
                st.floor
            )));
        }
        let backlog = st.history.iter().filter(|c| c.rv > from).cloned().collect();
        Ok((backlog, self.tx.subscribe()))
    }

    /// Subscribes now and runs `initial` over the served cache, with no pass in between: what
    /// `initial` sees plus the events after it is the whole story.
    pub(crate) fn start<R>(
        &self,
        source: &NodeSource,
        initial: impl FnOnce(&NodeCache) -> R,
    ) -> Result<Started<R>, Arc<str>> {
        let _st = self.lock();
        let rx = self.tx.subscribe();
        let r = source.read(initial)?;
        Ok(Started { value: r.value, staleness: r.staleness, rv: self.resource_version(), rx })
    }
}

/// Compares every node with `prev` (updated in place). `None`: more than `max` changes (`0`: no
/// limit and no changes recorded, a baseline).
fn diff(cache: &NodeCache, prev: &mut Vec<Option<Prev>>, max: usize) -> Option<Vec<Change>> {
    let mut out = Collector { changes: Vec::new(), overflow: false, max };
    let mut next: Slot = 0;
    let deleted = |p: Prev, cache: &NodeCache| Change {
        rv: 0,
        kind: ChangeKind::Deleted,
        old: Some(OldState { phase: p.key.phase, labels: cache.labels_of_key(&p.key) }),
        name: p.name,
        record: None,
    };
    cache.for_each_watch_key(|slot, name, key| {
        // Slots skipped since the last live one were vacated.
        for s in next..slot {
            if let Some(p) = prev.get_mut(s as usize).and_then(Option::take) {
                out.push(|| deleted(p, cache));
            }
        }
        next = slot + 1;
        if prev.len() <= slot as usize {
            prev.resize_with(slot as usize + 1, || None);
        }
        let entry = &mut prev[slot as usize];
        match entry {
            Some(p) if *p.name == *name => {
                if p.key != key {
                    let old_key = p.key;
                    p.key = key;
                    out.push(|| Change {
                        rv: 0,
                        kind: ChangeKind::Modified,
                        name: name.into(),
                        record: cache.record_of_slot(slot),
                        old: Some(OldState { phase: old_key.phase, labels: cache.labels_of_key(&old_key) }),
                    });
                }
            }
            _ => {
                if let Some(p) = entry.take() {
                    out.push(|| deleted(p, cache));
                }
                *entry = Some(Prev { name: name.into(), key });
                out.push(|| Change {
                    rv: 0,
                    kind: ChangeKind::Added,
                    name: name.into(),
                    record: cache.record_of_slot(slot),
                    old: None,
                });
            }
        }
    });
    for p in prev.iter_mut().skip(next as usize) {
        if let Some(p) = p.take() {
            out.push(|| deleted(p, cache));
        }
    }
    prev.truncate(next as usize);
    (!out.overflow).then_some(out.changes)
}

/// Collects changes, materializing them only while they will be published.
struct Collector {
    changes: Vec<Change>,
    overflow: bool,
    /// `0`: a baseline, nothing is collected.
    max: usize,
}

impl Collector {
    fn push(&mut self, make: impl FnOnce() -> Change) {
        if self.max == 0 || self.overflow {
            return;
        }
        if self.changes.len() == self.max {
            self.overflow = true;
            self.changes = Vec::new();
            return;
        }
        self.changes.push(make());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kole_core::cache::{StateCache, shared};
    use kole_core::model::{DesiredDigest, NodeInfo, NodeName, NodeRegistration, Timestamp};

    fn reg(name: &str, zone: &str) -> NodeRegistration {
        NodeRegistration {
            name: NodeName::new(name).unwrap(),
            labels: Labels::from_pairs([("zone", zone)]).unwrap(),
            info: NodeInfo { arch: "arm64".into(), os: "linux".into(), agent_version: "1".into(), addresses: vec![] },
            applied: DesiredDigest(0),
            workloads: vec![],
        }
    }

    fn drain(rx: &mut broadcast::Receiver<HubMsg>) -> Vec<(ChangeKind, String, u64)> {
        let mut v = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let HubMsg::Change(c) = m {
                v.push((c.kind, c.name.to_string(), c.rv));
            }
        }
        v
    }

    #[test]
    fn passes_number_changes_and_resume_replays_them() {
        let (w, r) = shared(NodeCache::new());
        let t = Timestamp::from_secs(1_000);
        for n in ["a", "b", "c"] {
            w.write().register(&reg(n, "x"), 1, t).unwrap();
        }
        let source = NodeSource::new();
        source.set_live(r);
        let hub = WatchHub::new(100, 1_000);
        assert_eq!(hub.pass(&source), 0, "the first pass is the baseline");
        let rv0 = hub.resource_version();
        let (_, mut rx) = hub.resume(rv0).unwrap();

        w.write().set_phase("b", NodePhase::Offline).unwrap();
        w.write().register(&reg("d", "y"), 1, t).unwrap();
        assert!(w.write().remove("a"));
        assert_eq!(hub.pass(&source), 3);
        let got = drain(&mut rx);
        let kinds: Vec<_> = got.iter().map(|(k, n, _)| (*k, n.as_str())).collect();
        assert!(kinds.contains(&(ChangeKind::Modified, "b")), "{got:?}");
        assert!(kinds.contains(&(ChangeKind::Deleted, "a")), "{got:?}");
        assert!(kinds.contains(&(ChangeKind::Added, "d")), "{got:?}");
        let rvs: Vec<u64> = got.iter().map(|g| g.2).collect();
        assert_eq!(rvs, (rv0 + 1..=rv0 + 3).collect::<Vec<_>>());
        // "d" reuses a's slot or takes a new one: either way the pair is a delete and an add.

        // Resuming from the middle replays only what came after.
        let (backlog, _) = hub.resume(rv0 + 1).unwrap();
        assert_eq!(backlog.len(), 2);
        // Heartbeat-only changes make no event.
        assert_eq!(hub.pass(&source), 0);
        assert!(matches!(hub.resume(rv0 - 1), Err(StartError::Expired(_))));
        assert!(matches!(hub.resume(hub.resource_version() + 1), Err(StartError::Expired(_))));
    }

    #[test]
    fn a_mass_change_resets_watches_instead_of_filling_memory() {
        let (w, r) = shared(NodeCache::new());
        let t = Timestamp::from_secs(1_000);
        for i in 0..50 {
            w.write().register(&reg(&format!("n{i}"), "x"), 1, t).unwrap();
        }
        let source = NodeSource::new();
        source.set_live(r);
        let hub = WatchHub::new(100, 10);
        hub.pass(&source);
        let rv0 = hub.resource_version();
        let (_, mut rx) = hub.resume(rv0).unwrap();
        w.write().mark_offline(Timestamp::from_secs(2_000));
        assert_eq!(hub.pass(&source), 0);
        assert!(matches!(rx.try_recv(), Ok(HubMsg::Reset)));
        assert!(matches!(hub.resume(rv0), Err(StartError::Expired(_))), "the old version is gone");
        // The baseline moved on: the next pass sees nothing new.
        assert_eq!(hub.pass(&source), 0);
        w.write().set_phase("n3", NodePhase::Online).unwrap();
        assert_eq!(hub.pass(&source), 1);
    }

    #[test]
    fn a_replaced_cache_resets_watches_and_starts_a_new_baseline() {
        let (w, r) = shared(NodeCache::new());
        w.write().register(&reg("a", "x"), 1, Timestamp::from_secs(1)).unwrap();
        let source = NodeSource::new();
        source.set_live(r);
        let hub = WatchHub::new(100, 1_000);
        hub.pass(&source);
        let (_, mut rx) = hub.resume(hub.resource_version()).unwrap();
        let (w2, r2) = shared(NodeCache::new());
        w2.write().register(&reg("z", "x"), 1, Timestamp::from_secs(1)).unwrap();
        source.set_live(r2);
        assert_eq!(hub.pass(&source), 0);
        assert!(matches!(rx.try_recv(), Ok(HubMsg::Reset)));
        w2.write().set_phase("z", NodePhase::Offline).unwrap();
        assert_eq!(hub.pass(&source), 1);
        drop(w);
    }
}
