//! Where the served nodes come from: the leader's live cache, or a standby's restored snapshot.
//!
//! A standby replica answers from the newest snapshot it has restored and says how stale it is (a
//! `Warning` header on every answer, which `kubectl` prints), rather than forwarding to the leader:
//! the `Service` in front of the replicas routes to any of them, a standby has no route to the
//! leader's pod, and the standby is exactly the replica that must still answer while the leader
//! is gone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kole_core::cache::{CacheStore, NodeCache};
use kole_core::model::Timestamp;

/// How old a standby's answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staleness {
    /// The snapshot generation served.
    pub generation: u64,
    /// When the leader took that snapshot.
    pub taken_at: Timestamp,
}

/// A standby's restored snapshot.
#[derive(Debug)]
pub struct SnapshotView {
    /// The restored cache.
    pub cache: NodeCache,
    /// Its generation and age.
    pub staleness: Staleness,
}

#[derive(Clone)]
enum Inner {
    Unavailable(Arc<str>),
    Live(CacheStore<NodeCache>),
    Snapshot(Arc<SnapshotView>),
}

struct State {
    inner: RwLock<Inner>,
    /// Bumped whenever the served cache is replaced: slots of one cache mean nothing in another.
    epoch: AtomicU64,
}

/// The cache the API serves; cheap to clone, switched as the replica's role changes.
#[derive(Clone)]
pub struct NodeSource {
    state: Arc<State>,
}

/// One read of the source.
pub(crate) struct Read<R> {
    pub(crate) value: R,
    pub(crate) staleness: Option<Staleness>,
    pub(crate) epoch: u64,
}

impl Default for NodeSource {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeSource {
    /// A source with nothing to serve yet (answers `503` until set).
    pub fn new() -> Self {
        Self {
            state: Arc::new(State {
                inner: RwLock::new(Inner::Unavailable(Arc::from("this replica has no node cache yet (starting)"))),
                epoch: AtomicU64::new(1),
            }),
        }
    }

    /// Serve the leader's live cache.
    pub fn set_live(&self, store: CacheStore<NodeCache>) {
        self.replace(Inner::Live(store));
    }

    /// Serve a restored snapshot (a standby).
    pub fn set_snapshot(&self, view: SnapshotView) {
        self.replace(Inner::Snapshot(Arc::new(view)));
    }

    /// Serve nothing: every request gets `503` with `why`.
    pub fn set_unavailable(&self, why: &str) {
        self.replace(Inner::Unavailable(Arc::from(why)));
    }

    /// The snapshot generation served, if this source serves a snapshot.
    pub fn snapshot_generation(&self) -> Option<u64> {
        match &*self.state.inner.read().unwrap_or_else(|p| p.into_inner()) {
            Inner::Snapshot(v) => Some(v.staleness.generation),
            _ => None,
        }
    }

    /// Changes whenever the served cache is replaced.
    pub(crate) fn epoch(&self) -> u64 {
        self.state.epoch.load(Ordering::Acquire)
    }

    fn replace(&self, inner: Inner) {
        *self.state.inner.write().unwrap_or_else(|p| p.into_inner()) = inner;
        self.state.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Runs `f` over the served cache (holding the live cache's read lock while it runs).
    pub(crate) fn read<R>(&self, f: impl FnOnce(&NodeCache) -> R) -> Result<Read<R>, Arc<str>> {
        let (inner, epoch) = {
            let g = self.state.inner.read().unwrap_or_else(|p| p.into_inner());
            (g.clone(), self.state.epoch.load(Ordering::Acquire))
        };
        match inner {
            Inner::Unavailable(why) => Err(why),
            Inner::Live(store) => Ok(Read { value: f(&store.read()), staleness: None, epoch }),
            Inner::Snapshot(v) => Ok(Read { value: f(&v.cache), staleness: Some(v.staleness), epoch }),
        }
    }
}
