//! The cloud state cache: where node state lives instead of one Kubernetes object per node.
//!
//! Two names, two roles:
//! - [`NodeCache`] is **the engine's cache**. The engine runs over it directly, not over a trait:
//!   its hot paths (targeting, reconciling, wave health, status) are batch passes over dense
//!   slots and interned label and workload-state sets, evaluated once per distinct label set.
//!   A cache generic behind a trait would give up that layout, and with it the per-node memory
//!   budget and the heartbeat rate.
//! - [`StateCache`] is **the read/query seam**: what an integrator may implement (node state kept
//!   elsewhere, a test double) or consume (query handlers, status writers, metrics, dataset
//!   loaders) without knowing the table's layout. [`NodeCache`] implements it.
//!
//! Wrap a cache with [`shared`] to get one exclusive [`CacheWriter`] (the engine) and any number of
//! cheap [`CacheStore`] readers, as kube-runtime's reflector does.

mod engine_view;
mod index;
mod intern;
mod shared;
mod table;
#[cfg(test)]
mod tests;
mod watch_keys;

use std::ops::ControlFlow;

pub use shared::{CacheStore, CacheWriter, shared};
pub(crate) use table::{LabelSetId, NodeSlot, PlatformId, StrId, WorkloadSetId};
pub(crate) use table::{NameHash, NameLookup, PROBE_GROUP, RegistrationRef};
pub use table::{NodeCache, Slot};
pub use watch_keys::WatchKey;

use crate::model::{
    DesiredDigest, NodeHealth, NodeName, NodePhase, NodeRecord, NodeRegistration, Selector, Timestamp, WorkloadState,
};

/// Why a cache update was refused. Nothing changed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The node is not in the cache; it must register first.
    #[error("node is not registered")]
    UnknownNode,
    /// The heartbeat belongs to another boot of the node than its registration.
    #[error(
        "heartbeat from boot {received:#x}, but the node registered with boot {registered:#x}; it must re-register"
    )]
    BootMismatch {
        /// Boot id of the registration.
        registered: u32,
        /// Boot id in the heartbeat.
        received: u32,
    },
    /// The heartbeat is older than (or the same as) one already applied: reordered or duplicated.
    #[error("stale heartbeat: sequence {received} is not after {last}")]
    Stale {
        /// Last sequence applied.
        last: u32,
        /// Sequence received.
        received: u32,
    },
    /// The name does not fit the cache's 255-byte name slots.
    #[error("node name longer than 255 bytes")]
    NameTooLong,
    /// The cache cannot address more nodes or name bytes (2^32 - 1 of each).
    #[error("cache is full")]
    Full,
}

/// Node counts by phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PhaseCounts {
    /// Nodes registering (known, not yet heard from in this controller's life).
    pub registering: u32,
    /// Nodes online.
    pub online: u32,
    /// Nodes offline.
    pub offline: u32,
}

impl PhaseCounts {
    pub(crate) fn from_array(a: [u32; 3]) -> Self {
        Self { registering: a[0], online: a[1], offline: a[2] }
    }

    /// All nodes counted.
    pub fn total(&self) -> u64 {
        u64::from(self.registering) + u64::from(self.online) + u64::from(self.offline)
    }

    /// The count for one phase.
    pub fn get(&self, phase: NodePhase) -> u32 {
        match phase {
            NodePhase::Registering => self.registering,
            NodePhase::Online => self.online,
            NodePhase::Offline => self.offline,
        }
    }
}

/// What a heartbeat changes in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatUpdate {
    /// The node's boot id (random per agent start).
    pub boot_id: u32,
    /// Sequence within the boot, strictly increasing.
    pub seq: u32,
    /// Digest of what the node has applied.
    pub applied: DesiredDigest,
    /// The node's health flags; `None` (a status report) keeps the last ones.
    pub health: Option<NodeHealth>,
}

/// One heartbeat of a batch: the node (authenticated by the transport) and what it reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatIn<'a> {
    /// The node's name, from the transport (e.g. the MQTT topic), not from the payload.
    pub node: &'a str,
    /// The heartbeat's content.
    pub update: HeartbeatUpdate,
}

/// The result of an accepted heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatOutcome {
    /// The node's slot.
    pub slot: Slot,
    /// Phase before the heartbeat (an `Offline` here means the node came back).
    pub previous: NodePhase,
    /// Whether the applied digest differs from the one stored before.
    pub applied_changed: bool,
}

/// The result of a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registered {
    /// The node's slot.
    pub slot: Slot,
    /// Whether the node was new to the cache.
    pub created: bool,
    /// Whether a known node came back with a different boot id (a restart, not a duplicate).
    pub restarted: bool,
    /// Phase before the registration, for known nodes.
    pub previous: Option<NodePhase>,
}

/// A query over the cache: by names, selector and phase, paged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheQuery {
    /// When non-empty, only these nodes (still filtered by selector and phase).
    pub names: Vec<NodeName>,
    /// Label selector; the default selects everything.
    pub selector: Selector,
    /// Only nodes in this phase.
    pub phase: Option<NodePhase>,
    /// Only nodes whose health passes this filter. Default: every node.
    pub health: HealthFilter,
    /// Page size (at least 1).
    pub limit: usize,
    /// Resume after this position (the `continue_after` of the previous page).
    pub continue_after: Option<u32>,
}

impl Default for CacheQuery {
    fn default() -> Self {
        Self {
            names: Vec::new(),
            selector: Selector::everything(),
            phase: None,
            health: HealthFilter::Any,
            limit: 500,
            continue_after: None,
        }
    }
}

/// Which nodes a [`CacheQuery`] keeps by their [`NodeHealth`] flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthFilter {
    /// Every node.
    #[default]
    Any,
    /// Nodes with no flag set.
    Healthy,
    /// Nodes with at least one of these flags set (`AnyOf(NodeHealth(0xff))`: every unhealthy node).
    AnyOf(NodeHealth),
}

impl HealthFilter {
    /// Whether `health` passes.
    pub fn matches(self, health: NodeHealth) -> bool {
        match self {
            Self::Any => true,
            Self::Healthy => health.is_ok(),
            Self::AnyOf(flags) => health.intersects(flags),
        }
    }
}

/// One page of a [`CacheQuery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryPage {
    /// Matching nodes, at most `limit`.
    pub items: Vec<NodeRecord>,
    /// Pass back as `continue_after` for the next page; `None` on the last page.
    pub continue_after: Option<u32>,
    /// Counts by phase of every node matching the names and selector (all pages, any phase).
    pub counts: PhaseCounts,
}

/// The read/query seam of node state: every node's identity, labels, liveness and applied state.
///
/// `NodeCache` is the engine's cache; `StateCache` is the read/query seam an integrator may
/// implement or consume. The engine and the snapshot format work on [`NodeCache`] itself, because
/// their batch paths rely on its dense slot layout (see the [module documentation](crate::cache)); this
/// trait is for code that reads and queries node state, or loads it, without depending on that
/// layout.
///
/// Object-safe so a consumer can hold `&dyn StateCache` or `Box<dyn StateCache>`; writes take
/// `&mut self` because a cache has one writer (wrap with [`shared`] for concurrent readers).
pub trait StateCache: Send + Sync {
    /// Number of nodes.
    fn len(&self) -> usize;

    /// Whether the cache holds no node.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A full copy of one node.
    fn get(&self, name: &str) -> Option<NodeRecord>;

    /// Counts by phase of the nodes matching `selector`.
    fn counts(&self, selector: &Selector) -> PhaseCounts;

    /// Inserts or updates a node from its registration; the node becomes online at `now`.
    /// A known node registering with a new `boot_id` is a restart and resets its heartbeat sequence.
    fn register(&mut self, reg: &NodeRegistration, boot_id: u32, now: Timestamp) -> Result<Registered, CacheError>;

    /// Applies a heartbeat: liveness, sequence, applied digest. Stale, reordered or foreign-boot
    /// heartbeats are refused without changing anything.
    fn heartbeat(&mut self, name: &str, hb: &HeartbeatUpdate, now: Timestamp) -> Result<HeartbeatOutcome, CacheError>;

    /// Applies a batch of heartbeats, appending one result per heartbeat to `out`, in order.
    /// Equivalent to calling [`StateCache::heartbeat`] for each; implementations overlap the
    /// lookups' memory accesses.
    fn heartbeat_batch(
        &mut self,
        batch: &[HeartbeatIn<'_>],
        now: Timestamp,
        out: &mut Vec<Result<HeartbeatOutcome, CacheError>>,
    ) {
        out.extend(batch.iter().map(|hb| self.heartbeat(hb.node, &hb.update, now)));
    }

    /// Replaces the node's per-workload state.
    fn report_workloads(&mut self, name: &str, states: &[WorkloadState]) -> Result<Slot, CacheError>;

    /// Sets a node's phase; returns the previous one.
    fn set_phase(&mut self, name: &str, phase: NodePhase) -> Result<NodePhase, CacheError>;

    /// Marks online nodes last seen before `cutoff` offline; returns how many changed.
    fn mark_offline(&mut self, cutoff: Timestamp) -> usize;

    /// Removes a node; returns whether it existed.
    fn remove(&mut self, name: &str) -> bool;

    /// One page of a query, with summary counts.
    fn query(&self, q: &CacheQuery) -> QueryPage;

    /// Calls `visitor` with every node matching `selector` until it breaks.
    fn visit(&self, selector: &Selector, visitor: &mut dyn FnMut(NodeRecord) -> ControlFlow<()>);
}
