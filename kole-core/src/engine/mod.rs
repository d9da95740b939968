//! The controller engine: a deterministic state machine, `handle(input, now) -> outputs`.
//!
//! The engine owns the node cache (through a [`CacheWriter`]; readers come from
//! [`Engine::store`]) and the workloads. It registers nodes and acknowledges them at once, applies
//! heartbeats in batches, derives every node's desired state from the workloads' selectors and
//! rollout waves, sends a per-node catch-up only when a node's applied digest stays different from
//! its desired digest, publishes specs once per workload on retained broadcast or group topics,
//! advances, pauses, halts and rolls back rollouts, aggregates per-workload status from interned
//! state, and says when a snapshot is due. It does no I/O and reads no clock: a driver feeds it
//! transport batches, ticks and workload commands, and carries its [`Outputs`] out.
//!
//! ```
//! use kole_core::cache::NodeCache;
//! use kole_core::engine::{Engine, EngineConfig, Input, Outputs};
//! use kole_core::model::Timestamp;
//!
//! let mut engine = Engine::new(EngineConfig::default(), NodeCache::new(), Timestamp::from_secs(1));
//! let mut out = Outputs::default();
//! engine.handle(Input::Tick, Timestamp::from_secs(2), &mut out);
//! assert!(out.messages.is_empty());
//! ```

mod commands;
mod desired;
#[cfg(feature = "tokio-driver")]
pub mod driver;
mod failures;
mod health;
mod rollout;
mod status;
#[cfg(test)]
mod tests;
mod uplink;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

pub use failures::FailureSummary;
pub use rollout::{RolloutPhase, RolloutProgress};
pub use status::WorkloadStatus;

use crate::cache::{CacheStore, CacheWriter, NodeCache, Slot, shared};
use crate::model::{DesiredDigest, NodeName, Timestamp, Workload, WorkloadId};
use crate::protocol::{self, DecodeLimits, Message};
use crate::transport::{Destination, Inbound, Outbound};
use desired::SetTargets;
use rollout::WorkloadEntry;

/// Engine settings. Every limit and interval is a field with a documented default.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Heartbeat interval told to nodes in the registration ACK. Default 30 s.
    pub heartbeat_interval_ms: u32,
    /// A node is marked offline after this many intervals without a message. Default 3.
    pub offline_after_missed: u32,
    /// How long a node may show a wrong applied digest before it gets a per-node catch-up, after a
    /// spec was published, after it registered, or after its last catch-up. It must cover the
    /// broadcast's delivery and one heartbeat. Default 2 heartbeat intervals (60 s).
    pub convergence_grace_ms: u64,
    /// How often [`Outputs::snapshot_due`] is raised. Default 60 s.
    pub snapshot_interval_ms: u64,
    /// Least time between two rounds of workload status. Default 1 s.
    pub status_interval_ms: u64,
    /// Label keys whose values name the groups a node joins (`{key name}.{value}`).
    /// Default: `topology.kubernetes.io/region`.
    pub group_label_keys: Vec<String>,
    /// Limits for decoding uplink payloads.
    pub decode_limits: DecodeLimits,
    /// Most rejected inputs described individually per [`Engine::handle`] call (the rest are only
    /// counted). Default 64.
    pub max_rejects_reported: usize,
    /// Most failed nodes whose failure reason is kept per workload (the status's `failures` list
    /// counts among them; `failed` counts every node). Bounds the memory a fleet failing at once
    /// costs. Default 10,000.
    pub max_failed_nodes_tracked: usize,
    /// The limits the agents decode downlink messages with. A workload whose spec message they
    /// could not decode (too large, too many selector terms, …) is refused at apply with
    /// [`EngineEvent::CommandRejected`]. Default: [`DecodeLimits::default`] (64 KiB messages), what
    /// the agents use unless configured otherwise.
    pub agent_decode_limits: DecodeLimits,
    /// The transport's (broker's) largest payload, in bytes: a workload whose spec message is larger
    /// is refused at apply. Set it to the transport's limit (e.g. `kole-mqtt`'s `max_payload`).
    /// Default 256 KiB, the in-memory hub's and `kole-mqtt`'s default.
    pub max_payload_bytes: usize,
    /// Least time between two accepted registrations of one node. A node registering again sooner is
    /// answered with a rejection (`Overloaded`) whose `retry_after_ms` is the time left, and counted
    /// in [`EngineStats::registrations_throttled`]; it costs no cache update and no catch-up. The
    /// engine remembers the last [`REGISTRATION_MEMORY`] registrations (a fixed ring, not a
    /// per-node map), so the limit holds for a node looping while the fleet is otherwise quiet.
    /// 0 disables it. Default 5 s.
    pub min_register_interval_ms: u32,
    /// The least share of a wave's reached nodes (percent, 0–100) that must be online and ready
    /// at the new version before the wave advances or the rollout completes; at least one node is
    /// always required when the wave reaches any. Offline nodes are no evidence: a wave whose
    /// reached nodes are all offline holds (and passes its progress deadline). Default 0 (one
    /// node).
    pub min_ready_percent: u8,
    /// Most uplink messages (of any kind) one registered node may send per second, sustained. A
    /// message over the limit is counted in [`EngineStats::uplink_rate_limited`] and otherwise
    /// ignored: it is not decoded (only its topic's node name is looked up), writes nothing to the
    /// cache, draws no catch-up and no answer. An honest node sends a heartbeat every
    /// [`heartbeat_interval_ms`](Self::heartbeat_interval_ms) (30 s), a status report when a
    /// workload changes (an agent polls its runtime once a second) and a registration when it
    /// restarts, so it stays far below 5 per second. The state is one `u32` per node slot (4 bytes
    /// a node, in a `Vec` beside the cache), checked with the generic cell rate algorithm.
    /// Senders the cache does not know have no slot: they are bounded by the registration throttle
    /// ([`min_register_interval_ms`](Self::min_register_interval_ms)) and the transport's queues,
    /// not by this limit. At most 1,000 (the state counts milliseconds). 0 disables it. Default 5.
    pub max_uplink_per_node_per_s: u32,
    /// How many uplink messages one node may send at once above
    /// [`max_uplink_per_node_per_s`](Self::max_uplink_per_node_per_s), e.g. a status report for
    /// each of many workloads that changed together. Default 100.
    pub uplink_burst_per_node: u32,
}

/// How many recent registrations the engine remembers for
/// [`EngineConfig::min_register_interval_ms`] (8 bytes each).
pub const REGISTRATION_MEMORY: usize = 1024;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 30_000,
            offline_after_missed: 3,
            convergence_grace_ms: 60_000,
            snapshot_interval_ms: 60_000,
            status_interval_ms: 1_000,
            group_label_keys: vec!["topology.kubernetes.io/region".to_owned()],
            decode_limits: DecodeLimits::default(),
            max_rejects_reported: 64,
            max_failed_nodes_tracked: 10_000,
            agent_decode_limits: DecodeLimits::default(),
            max_payload_bytes: 256 * 1024,
            min_register_interval_ms: 5_000,
            min_ready_percent: 0,
            max_uplink_per_node_per_s: 5,
            uplink_burst_per_node: 100,
        }
    }
}

/// A change to the workloads, as a workload controller (e.g. a Kubernetes watcher) reports it.
// Commands are rare (one per workload change), so `Apply` carrying the workload inline costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadCommand {
    /// Create or update a workload. A new version starts a rollout from the first wave; nodes
    /// outside the reached waves keep the previous version. `progress`, when given, resumes a
    /// rollout a previous engine persisted (see [`Engine::progress`]).
    Apply {
        /// The workload.
        workload: Workload,
        /// Persisted rollout position, after a controller restart.
        progress: Option<RolloutProgress>,
    },
    /// Remove a workload from every node.
    Delete(WorkloadId),
    /// Hold the rollout at its current wave.
    Pause(WorkloadId),
    /// Continue a paused or halted rollout.
    Resume(WorkloadId),
    /// Return every node to the previous version at once.
    Rollback(WorkloadId),
    /// Clear retained specs whose workload is gone: sent once by a controller that took the lead,
    /// after it handed over the live workloads. Each destination in `found` (what
    /// [`CloudTransport::retained_specs`](crate::transport::CloudTransport::retained_specs) listed)
    /// whose workload the engine does not hold and `live` does not name is cleared, and the nodes
    /// that may run it are told it was removed. A workload deleted while no controller led would
    /// otherwise run again on every node that reconnects.
    ReconcileRetained {
        /// Spec destinations holding a retained spec on the broker.
        found: Vec<Destination>,
        /// Workloads that exist (in the controller's store) but may not have been handed over yet:
        /// their specs are left for their `Apply` to replace.
        live: Vec<WorkloadId>,
    },
}

/// What the engine is told.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// A batch of uplink messages from the transport.
    Uplink(&'a [Inbound]),
    /// Time passed: liveness, rollouts, status, snapshot schedule. Call about once a second.
    Tick,
    /// A workload change.
    Workload(&'a WorkloadCommand),
}

/// Something noteworthy that happened, for logs, events and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineEvent {
    /// A rollout moved to a new wave.
    WaveAdvanced {
        /// The workload.
        id: WorkloadId,
        /// The wave reached.
        wave: usize,
    },
    /// A rollout completed.
    RolloutComplete {
        /// The workload.
        id: WorkloadId,
    },
    /// A rollout halted on failures.
    RolloutHalted {
        /// The workload.
        id: WorkloadId,
        /// Nodes failed at the new version.
        failed: u32,
        /// Nodes in the reached waves.
        reached: u32,
    },
    /// A wave went longer than the workload's `progress_deadline_s` without settling; the
    /// rollout keeps waiting (reported once per wave).
    ProgressDeadlineExceeded {
        /// The workload.
        id: WorkloadId,
        /// The wave waiting.
        wave: usize,
    },
    /// A retained spec of a workload that no longer exists was cleared (see
    /// [`WorkloadCommand::ReconcileRetained`]).
    StaleSpecCleared {
        /// The workload the spec was for.
        id: WorkloadId,
        /// Where it was retained.
        destination: Destination,
    },
    /// A wave reached no node (the selector matches none, or none falls in the wave yet), so it
    /// advanced or completed with nothing to wait for.
    NothingReached {
        /// The workload.
        id: WorkloadId,
        /// The wave.
        wave: usize,
    },
    /// A workload command was refused; nothing changed.
    CommandRejected {
        /// The workload.
        id: WorkloadId,
        /// Why.
        reason: String,
    },
}

/// An input the engine refused; nothing changed because of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The node it came from.
    pub node: NodeName,
    /// A stable reason code (e.g. `too_large`, `identity_mismatch`, `unknown_node`, `stale`).
    pub reason: &'static str,
    /// A human-readable description.
    pub detail: String,
}

/// What the engine wants done. Reuse one value across calls; [`Engine::handle`] appends to it
/// and the driver drains it.
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    /// Messages to send.
    pub messages: Vec<Outbound>,
    /// Workload statuses that changed since last reported.
    pub statuses: Vec<WorkloadStatus>,
    /// Events.
    pub events: Vec<EngineEvent>,
    /// Refused inputs, up to [`EngineConfig::max_rejects_reported`] per call.
    pub rejects: Vec<Reject>,
    /// Refused inputs beyond that, only counted.
    pub rejects_dropped: u64,
    /// A snapshot should be written now (the driver calls [`Engine::store`] and snapshots it).
    pub snapshot_due: bool,
}

impl Outputs {
    /// Empties every field (keeping allocations).
    pub fn clear(&mut self) {
        self.messages.clear();
        self.statuses.clear();
        self.events.clear();
        self.rejects.clear();
        self.rejects_dropped = 0;
        self.snapshot_due = false;
    }
}

/// Counters of everything the engine did or refused, monotonic over its life.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Registrations accepted (new nodes).
    pub registered_new: u64,
    /// Registrations accepted from known nodes (same boot: duplicate; new boot: restart).
    pub registered_known: u64,
    /// Of those, restarts (new boot id).
    pub restarts: u64,
    /// Heartbeats and status reports applied.
    pub heartbeats: u64,
    /// Status reports applied.
    pub status_reports: u64,
    /// Heartbeats dropped as stale, duplicated or reordered.
    pub stale: u64,
    /// Messages from nodes the cache does not know (answered with a re-register command).
    pub unknown_node: u64,
    /// Heartbeats from another boot than registered (answered with a re-register command).
    pub boot_mismatch: u64,
    /// Payloads refused by the decoder (malformed, oversize, wrong kind, identity mismatch, …).
    pub decode_errors: u64,
    /// Of those, registrations whose claimed name differs from the topic's.
    pub identity_mismatch: u64,
    /// Registrations refused by the cache.
    pub register_rejected: u64,
    /// Per-node catch-ups (desired state) sent.
    pub catchups: u64,
    /// Broadcast or group spec publications.
    pub spec_publishes: u64,
    /// Per-node spec deliveries (per-node delivery mode).
    pub per_node_deliveries: u64,
    /// Nodes marked offline by the liveness sweep.
    pub marked_offline: u64,
    /// Nodes that came back online.
    pub back_online: u64,
    /// Resync commands sent because a heartbeat showed an applied digest whose status report
    /// never arrived (lost or overtaken).
    pub resyncs: u64,
    /// Registrations answered with `retry_after` because the node registered less than
    /// [`EngineConfig::min_register_interval_ms`] before.
    pub registrations_throttled: u64,
    /// Uplink messages ignored because their node sent more than
    /// [`EngineConfig::max_uplink_per_node_per_s`] (with its burst).
    pub uplink_rate_limited: u64,
}

/// The controller engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cache: CacheWriter<NodeCache>,
    store: CacheStore<NodeCache>,
    core: Core,
}

#[derive(Debug)]
struct Core {
    cfg: EngineConfig,
    workloads: Vec<Option<WorkloadEntry>>,
    by_id: BTreeMap<WorkloadId, u32>,
    generation: u64,
    set_targets: Vec<SetTargets>,
    /// Nodes given until a deadline (seconds) to converge by themselves.
    pending: HashMap<Slot, u32>,
    /// Nodes whose heartbeat showed an applied digest the engine never saw in a status report (the
    /// report was lost or overtaken): asked to resync on every heartbeat until a report arrives.
    unreported: HashSet<Slot>,
    spec_changed_ms: u64,
    started_ms: u64,
    last_status_ms: u64,
    last_snapshot_ms: u64,
    reported: BTreeMap<WorkloadId, WorkloadStatus>,
    stats: EngineStats,
    next_command_id: u64,
    /// Reused by the heartbeat batch path: the slot of each message of a run.
    hb_slots: Vec<Option<Slot>>,
    /// Seals every downlink message when set ([`Engine::with_signer`]).
    signer: Option<protocol::seal::SharedSigner>,
    /// The time of the input being handled: the issue time of what it sends.
    now_ms: u64,
    /// The last registrations accepted, as (slot, time in ms since `started_ms`, saturated),
    /// a ring of [`REGISTRATION_MEMORY`].
    recent_registrations: uplink::RecentRegistrations,
    /// Per-node uplink rate state ([`EngineConfig::max_uplink_per_node_per_s`]).
    uplink_limiter: uplink::UplinkLimiter,
    /// Whether any workload may keep wave health between ticks (see [`health`]): false spares
    /// every node change the lookup of the workloads targeting it. Set when a tick starts keeping
    /// one, recomputed at the end of each tick (between ticks kept health is only ever dropped).
    health_kept: bool,
}

impl Engine {
    /// An engine over `cache` (empty, or restored from a snapshot), starting at `now`.
    pub fn new(cfg: EngineConfig, cache: NodeCache, now: Timestamp) -> Self {
        let (cache, store) = shared(cache);
        let uplink_limiter = uplink::UplinkLimiter::new(cfg.max_uplink_per_node_per_s, cfg.uplink_burst_per_node);
        let core = Core {
            cfg,
            workloads: Vec::new(),
            by_id: BTreeMap::new(),
            generation: 1,
            set_targets: Vec::new(),
            pending: HashMap::new(),
            unreported: HashSet::new(),
            spec_changed_ms: 0,
            started_ms: now.as_millis(),
            last_status_ms: 0,
            last_snapshot_ms: now.as_millis(),
            reported: BTreeMap::new(),
            stats: EngineStats::default(),
            next_command_id: 1,
            hb_slots: Vec::new(),
            signer: None,
            now_ms: now.as_millis(),
            recent_registrations: uplink::RecentRegistrations::default(),
            uplink_limiter,
            health_kept: false,
        };
        Self { cache, store, core }
    }

    /// A reader of the node cache (queries, snapshots, metrics).
    pub fn store(&self) -> CacheStore<NodeCache> {
        self.store.clone()
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.core.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &EngineStats {
        &self.core.stats
    }

    /// The desired digest of a node, if known.
    pub fn desired_digest(&mut self, node: &str) -> Option<DesiredDigest> {
        let cache = self.cache.write();
        let slot = cache.slot_of(node)?;
        Some(self.core.desired(&cache, slot))
    }

    /// The workloads (and versions) a node should run.
    pub fn desired_workloads(&mut self, node: &str) -> Option<Vec<Arc<Workload>>> {
        let cache = self.cache.write();
        let slot = cache.slot_of(node)?;
        Some(self.core.desired_set(&cache, slot))
    }

    /// A workload's rollout position, to persist so a restarted engine resumes it.
    pub fn progress(&self, id: &WorkloadId) -> Option<RolloutProgress> {
        self.core.entry(id).map(WorkloadEntry::progress)
    }

    /// Every workload with its current spec.
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        self.core.workloads.iter().flatten().map(|e| Arc::clone(&e.current)).collect()
    }

    /// Fresh status of one workload (computed now, not rate-limited).
    pub fn workload_status(&mut self, id: &WorkloadId) -> Option<WorkloadStatus> {
        let cache = self.cache.write();
        let idx = *self.core.by_id.get(id)?;
        self.core
            .statuses(&cache)
            .into_iter()
            .find(|s| s.id == *id)
            .filter(|_| self.core.workloads[idx as usize].is_some())
    }

    /// Signs every downlink message this engine sends with `signer` (protocol version 3, see
    /// [`protocol::seal`]): agents that pin its public key refuse anything else. A spec is signed
    /// once per publish, per-node messages one each.
    #[must_use]
    pub fn with_signer(mut self, signer: protocol::seal::SharedSigner) -> Self {
        self.core.signer = Some(signer);
        self
    }

    /// Handles one input at time `now`, appending what to do to `out`.
    pub fn handle(&mut self, input: Input<'_>, now: Timestamp, out: &mut Outputs) {
        // Never backwards within one engine's life, so agents' replay marks only move forward.
        self.core.now_ms = self.core.now_ms.max(now.as_millis());
        let mut cache = self.cache.write();
        match input {
            Input::Uplink(batch) => self.core.uplink(&mut cache, batch, now, out),
            Input::Tick => self.core.tick(&mut cache, now, out),
            Input::Workload(cmd) => self.core.workload(&cache, cmd, now, out),
        }
    }
}

impl Core {
    fn entry(&self, id: &WorkloadId) -> Option<&WorkloadEntry> {
        self.by_id.get(id).and_then(|&i| self.workloads[i as usize].as_ref())
    }

    fn send(&mut self, out: &mut Outputs, to: Destination, msg: &Message, retain: bool) {
        let payload = match &self.signer {
            Some(s) => s.seal(msg, &to, self.now_ms),
            None => protocol::encode(msg),
        };
        out.messages.push(Outbound { to, payload, retain });
    }
}
