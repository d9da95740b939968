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

#[cfg(feature = "tokio-driver")]
pub mod driver;
mod rollout;
mod status;
#[cfg(test)]
mod tests;
mod uplink;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

pub use rollout::{RolloutPhase, RolloutProgress};
pub use status::WorkloadStatus;

use crate::cache::{
    CacheError, CacheStore, CacheWriter, HeartbeatIn, HeartbeatUpdate, NodeCache, Slot, StateCache, shared,
};
use crate::model::{DesiredDigest, Labels, NodeName, NodePhase, Timestamp, ValidationError, Workload, WorkloadId};
use crate::protocol::{
    self, Command, CommandKind, DecodeLimits, DesiredState, GroupName, Message, RegisterAck, RegisterOutcome,
    RejectCode, WorkloadRemoved,
};
use crate::transport::{Destination, Inbound, Outbound};
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
}

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
}

#[derive(Clone, Debug, Default)]
struct SetTargets {
    epoch: u32,
    generation: u64,
    workloads: Vec<u32>,
    /// Groups of the label set (depend on labels only), valid for `groups_epoch`.
    groups_epoch: u32,
    groups: Vec<GroupName>,
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
    hb_results: Vec<Result<crate::cache::HeartbeatOutcome, CacheError>>,
}

impl Engine {
    /// An engine over `cache` (empty, or restored from a snapshot), starting at `now`.
    pub fn new(cfg: EngineConfig, cache: NodeCache, now: Timestamp) -> Self {
        let (cache, store) = shared(cache);
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
            hb_results: Vec::new(),
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

    /// Handles one input at time `now`, appending what to do to `out`.
    pub fn handle(&mut self, input: Input<'_>, now: Timestamp, out: &mut Outputs) {
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

    fn reject(&mut self, out: &mut Outputs, node: &NodeName, reason: &'static str, detail: impl FnOnce() -> String) {
        if out.rejects.len() < self.cfg.max_rejects_reported {
            out.rejects.push(Reject { node: node.clone(), reason, detail: detail() });
        } else {
            out.rejects_dropped += 1;
        }
    }

    fn send(&mut self, out: &mut Outputs, to: Destination, msg: &Message, retain: bool) {
        out.messages.push(Outbound { to, payload: protocol::encode(msg), retain });
    }

    /// Workload indices whose selector matches label set `set` (cached per set, per epoch).
    fn targets(&mut self, cache: &NodeCache, set: u32) -> &[u32] {
        let idx = set as usize;
        if self.set_targets.len() <= idx {
            self.set_targets.resize_with(idx + 1, SetTargets::default);
        }
        let epoch = cache.members[idx].epoch;
        let st = &mut self.set_targets[idx];
        if st.epoch != epoch || st.generation != self.generation {
            st.epoch = epoch;
            st.generation = self.generation;
            st.workloads.clear();
            let view = cache.label_set_view(set);
            for (i, e) in self.workloads.iter().enumerate() {
                if let Some(e) = e
                    && e.current.selector.matches(&view)
                {
                    st.workloads.push(i as u32);
                }
            }
        }
        &self.set_targets[idx].workloads
    }

    fn desired(&mut self, cache: &NodeCache, slot: Slot) -> DesiredDigest {
        let set = cache.slots[slot as usize].label_set;
        let name = cache.name_bytes(slot);
        let mut d = 0u64;
        let n = self.targets(cache, set).len();
        for k in 0..n {
            let w = self.set_targets[set as usize].workloads[k] as usize;
            if let Some(e) = &self.workloads[w] {
                d = d.wrapping_add(e.digest_member(name));
            }
        }
        DesiredDigest(d)
    }

    fn desired_set(&mut self, cache: &NodeCache, slot: Slot) -> Vec<Arc<Workload>> {
        let set = cache.slots[slot as usize].label_set;
        let name = cache.name_bytes(slot);
        let targets = self.targets(cache, set).to_vec();
        targets.into_iter().filter_map(|w| self.workloads[w as usize].as_ref()?.workload_for(name).cloned()).collect()
    }

    /// The groups of label set `set`, computed once per set.
    fn groups_of_set(&mut self, cache: &NodeCache, set: u32, labels: &Labels) -> Vec<GroupName> {
        let idx = set as usize;
        if self.set_targets.len() <= idx {
            self.set_targets.resize_with(idx + 1, SetTargets::default);
        }
        let epoch = cache.members[idx].epoch;
        if self.set_targets[idx].groups_epoch != epoch || epoch == 0 {
            let groups = self.groups_of(labels);
            let st = &mut self.set_targets[idx];
            st.groups = groups;
            st.groups_epoch = epoch;
        }
        self.set_targets[idx].groups.clone()
    }

    fn groups_of(&self, labels: &Labels) -> Vec<GroupName> {
        self.cfg
            .group_label_keys
            .iter()
            .filter_map(|key| {
                let value = labels.get(key).filter(|v| !v.is_empty())?;
                let short = key.rsplit('/').next().unwrap_or(key);
                GroupName::new(format!("{short}.{value}")).ok()
            })
            .collect()
    }

    fn send_catchup(&mut self, cache: &NodeCache, slot: Slot, digest: DesiredDigest, out: &mut Outputs) {
        let workloads: Vec<Workload> = self.desired_set(cache, slot).iter().map(|w| (**w).clone()).collect();
        let Some(name) = cache.name_of(slot).and_then(|n| NodeName::new(n).ok()) else { return };
        self.send(out, Destination::Node(name), &Message::DesiredState(DesiredState { digest, workloads }), false);
        self.stats.catchups += 1;
    }

    /// A node shows `applied`; decide whether it needs a catch-up now.
    fn reconcile(&mut self, cache: &NodeCache, slot: Slot, applied: DesiredDigest, now: Timestamp, out: &mut Outputs) {
        let desired = self.desired(cache, slot);
        if desired == applied {
            if !self.pending.is_empty() {
                self.pending.remove(&slot);
            }
            return;
        }
        let grace = self.cfg.convergence_grace_ms;
        if now.as_millis() < self.spec_changed_ms.saturating_add(grace) {
            return; // A broadcast is still on its way.
        }
        let now_s = now.as_secs_u32();
        if self.pending.get(&slot).is_some_and(|&deadline| now_s < deadline) {
            return;
        }
        self.pending.insert(slot, now_s.saturating_add((grace / 1000) as u32));
        self.send_catchup(cache, slot, desired, out);
    }

    fn uplink(&mut self, cache: &mut NodeCache, batch: &[Inbound], now: Timestamp, out: &mut Outputs) {
        let mut start = 0;
        // Runs of heartbeats go through the cache's batch path; anything else in between is handled
        // in order, so a node's registration always precedes its later heartbeats.
        let mut hb: Vec<(usize, protocol::Heartbeat)> = Vec::new();
        for (i, msg) in batch.iter().enumerate() {
            match msg.decode(&self.cfg.decode_limits) {
                Ok(Message::Heartbeat(h)) => hb.push((i, h)),
                Ok(other) => {
                    self.flush_heartbeats(cache, batch, &mut hb, now, out);
                    self.handle_message(cache, msg, other, now, out);
                }
                Err(e) => {
                    self.stats.decode_errors += 1;
                    if matches!(e, protocol::DecodeError::IdentityMismatch { .. }) {
                        self.stats.identity_mismatch += 1;
                        self.send_register_reject(out, &msg.node, RejectCode::IdentityMismatch, e.to_string());
                    }
                    self.reject(out, &msg.node, e.reason(), || e.to_string());
                }
            }
            start = i;
        }
        let _ = start;
        self.flush_heartbeats(cache, batch, &mut hb, now, out);
    }

    fn flush_heartbeats(
        &mut self,
        cache: &mut NodeCache,
        batch: &[Inbound],
        hbs: &mut Vec<(usize, protocol::Heartbeat)>,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        if hbs.is_empty() {
            return;
        }
        let ins: Vec<HeartbeatIn<'_>> = hbs
            .iter()
            .map(|(i, h)| HeartbeatIn { node: batch[*i].node.as_str(), update: HeartbeatUpdate::from(h) })
            .collect();
        let mut results = std::mem::take(&mut self.hb_results);
        results.clear();
        cache.heartbeat_batch(&ins, now, &mut results);
        for (k, r) in results.iter().enumerate() {
            let (i, h) = &hbs[k];
            // A status report always precedes the heartbeats of a change, so a heartbeat that changes
            // the applied digest (or follows one that did) means the report never arrived: without
            // it the workload status and the rollout's wave health would stay stale for good.
            if let Ok(o) = r
                && (o.applied_changed || (!self.unreported.is_empty() && self.unreported.contains(&o.slot)))
            {
                self.unreported.insert(o.slot);
                self.stats.resyncs += 1;
                self.send_command(out, &batch[*i].node, CommandKind::Resync);
            }
            self.after_heartbeat(cache, &batch[*i].node, r, h.applied, now, out);
        }
        self.hb_results = results;
        hbs.clear();
    }

    fn after_heartbeat(
        &mut self,
        cache: &NodeCache,
        node: &NodeName,
        r: &Result<crate::cache::HeartbeatOutcome, CacheError>,
        applied: DesiredDigest,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        match r {
            Ok(o) => {
                self.stats.heartbeats += 1;
                if o.previous == NodePhase::Offline {
                    self.stats.back_online += 1;
                }
                self.reconcile(cache, o.slot, applied, now, out);
            }
            Err(CacheError::Stale { .. }) => {
                self.stats.stale += 1;
            }
            Err(e @ (CacheError::UnknownNode | CacheError::BootMismatch { .. })) => {
                if matches!(e, CacheError::UnknownNode) {
                    self.stats.unknown_node += 1;
                } else {
                    self.stats.boot_mismatch += 1;
                }
                self.send_command(out, node, CommandKind::Reregister);
                let reason = if matches!(e, CacheError::UnknownNode) { "unknown_node" } else { "boot_mismatch" };
                self.reject(out, node, reason, || e.to_string());
            }
            Err(e) => self.reject(out, node, "cache", || e.to_string()),
        }
    }

    fn send_command(&mut self, out: &mut Outputs, node: &NodeName, kind: CommandKind) {
        let id = self.next_command_id;
        self.next_command_id += 1;
        self.send(out, Destination::Node(node.clone()), &Message::Command(Command { id, kind }), false);
    }

    fn send_register_reject(&mut self, out: &mut Outputs, node: &NodeName, code: RejectCode, message: String) {
        let ack = RegisterAck {
            boot_id: 0,
            outcome: RegisterOutcome::Rejected { code, message, retry_after_ms: self.cfg.heartbeat_interval_ms },
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            groups: Vec::new(),
            desired: DesiredDigest::EMPTY,
        };
        self.send(out, Destination::Node(node.clone()), &Message::RegisterAck(ack), false);
    }

    fn handle_message(
        &mut self,
        cache: &mut NodeCache,
        msg: &Inbound,
        decoded: Message,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        match decoded {
            Message::Register(reg) => {
                let boot = reg.boot_id;
                let (registration, _) = reg.into_registration();
                match cache.register(&registration, boot, now) {
                    Ok(r) => {
                        if r.created {
                            self.stats.registered_new += 1;
                        } else {
                            self.stats.registered_known += 1;
                        }
                        if r.restarted {
                            self.stats.restarts += 1;
                        }
                        if !self.unreported.is_empty() {
                            self.unreported.remove(&r.slot);
                        }
                        let desired = self.desired(cache, r.slot);
                        let ack = RegisterAck {
                            boot_id: boot,
                            outcome: RegisterOutcome::Accepted,
                            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
                            groups: {
                                let set = cache.slots[r.slot as usize].label_set;
                                self.groups_of_set(cache, set, &registration.labels)
                            },
                            desired,
                        };
                        self.send(out, Destination::Node(msg.node.clone()), &Message::RegisterAck(ack), false);
                        if registration.applied != desired {
                            // Retained specs reach the node as it subscribes; per-node workloads
                            // can only come from us.
                            let per_node = self
                                .desired_set(cache, r.slot)
                                .iter()
                                .any(|w| w.delivery == crate::model::DeliveryMode::PerNode);
                            if per_node {
                                self.send_catchup(cache, r.slot, desired, out);
                            }
                            let grace_s = (self.cfg.convergence_grace_ms / 1000) as u32;
                            self.pending.insert(r.slot, now.as_secs_u32().saturating_add(grace_s));
                        } else if !self.pending.is_empty() {
                            self.pending.remove(&r.slot);
                        }
                    }
                    Err(e) => {
                        self.stats.register_rejected += 1;
                        self.send_register_reject(out, &msg.node, RejectCode::Invalid, e.to_string());
                        self.reject(out, &msg.node, "register_rejected", || e.to_string());
                    }
                }
            }
            Message::StatusReport(s) => {
                let update = HeartbeatUpdate { boot_id: s.boot_id, seq: s.seq, applied: s.applied };
                let r = cache.heartbeat(msg.node.as_str(), &update, now);
                if let Ok(o) = &r {
                    if !self.unreported.is_empty() {
                        self.unreported.remove(&o.slot);
                    }
                    self.stats.status_reports += 1;
                    // The node is known (the heartbeat was accepted), so this cannot fail.
                    let _ = cache.report_workloads(msg.node.as_str(), &s.workloads);
                }
                self.after_heartbeat(cache, &msg.node, &r, s.applied, now, out);
            }
            // decode_from_node only lets uplink kinds through; heartbeats are batched by the caller.
            Message::Heartbeat(_)
            | Message::RegisterAck(_)
            | Message::WorkloadSpec(_)
            | Message::WorkloadRemoved(_)
            | Message::DesiredState(_)
            | Message::Command(_) => {}
        }
    }

    fn publish(&mut self, cache: &NodeCache, idx: usize, from_threshold: u16, now: Timestamp, out: &mut Outputs) {
        let Some(e) = &self.workloads[idx] else { return };
        let id = e.current.id.clone();
        match &e.current.delivery {
            crate::model::DeliveryMode::Broadcast => {
                let msg = Message::WorkloadSpec(e.spec_message());
                self.send(out, Destination::WorkloadSpec(id), &msg, true);
                self.stats.spec_publishes += 1;
            }
            crate::model::DeliveryMode::Group(g) => {
                let msg = Message::WorkloadSpec(e.spec_message());
                if let Ok(group) = GroupName::new(g.clone()) {
                    self.send(out, Destination::GroupWorkloadSpec(group, id), &msg, true);
                    self.stats.spec_publishes += 1;
                }
            }
            crate::model::DeliveryMode::PerNode => {
                // The fallback for specs that must not be broadcast: each node newly in the waves
                // gets its full desired state.
                let to = e.threshold();
                let seed = e.seed;
                let mut slots = Vec::new();
                for set in cache.matching_sets(&e.current.selector) {
                    for &slot in &cache.members[set as usize].slots {
                        let p = crate::model::wave_point_seeded(seed, cache.name_bytes(slot));
                        if p >= from_threshold && p < to {
                            slots.push(slot);
                        }
                    }
                }
                for slot in slots {
                    let d = self.desired(cache, slot);
                    self.send_catchup(cache, slot, d, out);
                    self.stats.catchups -= 1;
                    self.stats.per_node_deliveries += 1;
                }
            }
        }
        self.spec_changed_ms = now.as_millis();
    }

    fn workload(&mut self, cache: &NodeCache, cmd: &WorkloadCommand, now: Timestamp, out: &mut Outputs) {
        match cmd {
            WorkloadCommand::Apply { workload, progress } => {
                if let Err(e) = validate_workload(workload) {
                    out.events.push(EngineEvent::CommandRejected { id: workload.id.clone(), reason: e.to_string() });
                    return;
                }
                let existing = self.by_id.get(&workload.id).copied();
                let (idx, publish) = match existing {
                    Some(i) => {
                        let Some(old) = self.workloads[i as usize].as_ref() else { return };
                        if *old.current == *workload {
                            return; // Nothing changed (a re-list after a watch restart).
                        }
                        let previous = if old.current.version == workload.version {
                            old.previous.as_deref().cloned()
                        } else {
                            Some((*old.current).clone())
                        };
                        let entry = WorkloadEntry::new(workload.clone(), previous, 0, RolloutPhase::Progressing);
                        self.workloads[i as usize] = Some(entry);
                        (i as usize, true)
                    }
                    None => {
                        let entry = match progress {
                            Some(p) => WorkloadEntry::new(workload.clone(), p.previous.clone(), p.wave, p.phase),
                            None => WorkloadEntry::new(workload.clone(), None, 0, RolloutPhase::Progressing),
                        };
                        let i = match self.workloads.iter().position(Option::is_none) {
                            Some(free) => {
                                self.workloads[free] = Some(entry);
                                free
                            }
                            None => {
                                self.workloads.push(Some(entry));
                                self.workloads.len() - 1
                            }
                        };
                        self.by_id.insert(workload.id.clone(), i as u32);
                        (i, !progress.as_ref().is_some_and(|p| p.published))
                    }
                };
                self.generation += 1;
                if publish {
                    self.publish(cache, idx, 0, now, out);
                }
            }
            WorkloadCommand::Delete(id) => {
                let Some(i) = self.by_id.remove(id) else { return };
                let Some(e) = self.workloads[i as usize].take() else { return };
                self.generation += 1;
                self.reported.remove(id);
                let removed = Message::WorkloadRemoved(WorkloadRemoved { id: id.clone() });
                match &e.current.delivery {
                    crate::model::DeliveryMode::Group(g) => {
                        if let Ok(group) = GroupName::new(g.clone()) {
                            out.messages.push(Outbound {
                                to: Destination::GroupWorkloadSpec(group.clone(), id.clone()),
                                payload: Vec::new(),
                                retain: true,
                            });
                            self.send(out, Destination::Group(group), &removed, false);
                        }
                    }
                    _ => {
                        out.messages.push(Outbound {
                            to: Destination::WorkloadSpec(id.clone()),
                            payload: Vec::new(),
                            retain: true,
                        });
                        self.send(out, Destination::Fleet, &removed, false);
                    }
                }
                self.spec_changed_ms = now.as_millis();
            }
            WorkloadCommand::Pause(id) => {
                if let Some(e) = self.entry_mut(id)
                    && e.phase == RolloutPhase::Progressing
                {
                    e.phase = RolloutPhase::Paused;
                }
            }
            WorkloadCommand::Resume(id) => {
                if let Some(e) = self.entry_mut(id)
                    && matches!(e.phase, RolloutPhase::Paused | RolloutPhase::Halted)
                {
                    e.phase = RolloutPhase::Progressing;
                }
            }
            WorkloadCommand::Rollback(id) => {
                let Some(&i) = self.by_id.get(id) else { return };
                let Some(e) = self.workloads[i as usize].as_ref() else { return };
                let Some(prev) = e.previous.as_deref().cloned() else {
                    out.events.push(EngineEvent::CommandRejected {
                        id: id.clone(),
                        reason: "no previous version to roll back to".into(),
                    });
                    return;
                };
                let last = prev.rollout.waves.len().saturating_sub(1);
                self.workloads[i as usize] = Some(WorkloadEntry::new(prev, None, last, RolloutPhase::Complete));
                self.generation += 1;
                self.publish(cache, i as usize, 0, now, out);
            }
        }
    }

    fn entry_mut(&mut self, id: &WorkloadId) -> Option<&mut WorkloadEntry> {
        let i = *self.by_id.get(id)?;
        self.workloads[i as usize].as_mut()
    }

    fn tick(&mut self, cache: &mut NodeCache, now: Timestamp, out: &mut Outputs) {
        let window = u64::from(self.cfg.heartbeat_interval_ms) * u64::from(self.cfg.offline_after_missed);
        let now_ms = now.as_millis();
        // No node can be declared offline until a full window after this engine started: a
        // restored cache's last-seen times predate the restart.
        if now_ms >= self.started_ms.saturating_add(window) {
            let n = cache.mark_offline(Timestamp::from_millis(now_ms - window));
            self.stats.marked_offline += n as u64;
        }
        for i in 0..self.workloads.len() {
            if self.workloads[i].as_ref().is_some_and(|e| e.phase == RolloutPhase::Progressing) {
                self.evaluate_rollout(cache, i, now, out);
            }
        }
        if now_ms >= self.last_status_ms.saturating_add(self.cfg.status_interval_ms) {
            self.last_status_ms = now_ms;
            for s in self.statuses(cache) {
                if self.reported.get(&s.id) != Some(&s) {
                    self.reported.insert(s.id.clone(), s.clone());
                    out.statuses.push(s);
                }
            }
        }
        if now_ms >= self.last_snapshot_ms.saturating_add(self.cfg.snapshot_interval_ms) {
            self.last_snapshot_ms = now_ms;
            out.snapshot_due = true;
        }
        if !self.pending.is_empty() {
            let horizon = now.as_secs_u32().saturating_sub(600);
            self.pending.retain(|_, deadline| *deadline > horizon);
        }
    }

    /// Wave health of workload `idx`: (reached, online in reached waves, ready, failed) at its
    /// current version, from one pass over the targeted nodes.
    fn wave_counts(&self, cache: &NodeCache, idx: usize) -> (u32, u32, u32, u32) {
        let Some(e) = &self.workloads[idx] else { return (0, 0, 0, 0) };
        let threshold = e.threshold();
        let wl_str = cache.strings.find(e.current.id.as_str());
        let (mut reached, mut online, mut ready, mut failed) = (0u32, 0u32, 0u32, 0u32);
        // Per workload-state set: this workload's (version, phase) on nodes carrying that set.
        let mut state_of: Vec<Option<Option<(u64, u8)>>> = vec![None; cache.workload_sets.capacity_ids()];
        for set in cache.matching_sets(&e.current.selector) {
            for &slot in &cache.members[set as usize].slots {
                let n = &cache.slots[slot as usize];
                if threshold < protocol::WorkloadSpec::ALL_WAVES
                    && crate::model::wave_point_seeded(e.seed, cache.name_bytes(slot)) >= threshold
                {
                    continue;
                }
                reached += 1;
                if n.phase == NodePhase::Online as u8 {
                    online += 1;
                }
                let st = match state_of.get(n.workloads as usize).copied().flatten() {
                    Some(st) => st,
                    None => {
                        let st = wl_str.and_then(|w| {
                            cache.workload_sets.get(n.workloads).iter().find(|x| x.0 == w).map(|x| (x.1, x.2))
                        });
                        if let Some(slot) = state_of.get_mut(n.workloads as usize) {
                            *slot = Some(st);
                        }
                        st
                    }
                };
                if let Some((version, phase)) = st
                    && version == e.current.version
                {
                    match crate::model::WorkloadPhase::from_u8(phase) {
                        Some(crate::model::WorkloadPhase::Running) if n.phase == NodePhase::Online as u8 => ready += 1,
                        Some(crate::model::WorkloadPhase::Failed) => failed += 1,
                        _ => {}
                    }
                }
            }
        }
        (reached, online, ready, failed)
    }

    fn evaluate_rollout(&mut self, cache: &NodeCache, idx: usize, now: Timestamp, out: &mut Outputs) {
        let (reached, online, ready, failed) = self.wave_counts(cache, idx);
        let Some(e) = self.workloads[idx].as_mut() else { return };
        let id = e.current.id.clone();
        if e.failures_exceeded(failed, reached) {
            e.phase = RolloutPhase::Halted;
            out.events.push(EngineEvent::RolloutHalted { id, failed, reached });
            return;
        }
        if ready < online {
            return;
        }
        if e.is_last_wave() {
            e.phase = RolloutPhase::Complete;
            out.events.push(EngineEvent::RolloutComplete { id });
            return;
        }
        let from = e.threshold();
        e.wave += 1;
        let wave = e.wave;
        self.publish(cache, idx, from, now, out);
        out.events.push(EngineEvent::WaveAdvanced { id, wave });
    }

    fn statuses(&mut self, cache: &NodeCache) -> Vec<WorkloadStatus> {
        let mut targeted = vec![0u32; self.workloads.len()];
        let sets: Vec<u32> = cache.label_sets.iter().map(|(id, _, _)| id).collect();
        for set in sets {
            let members = cache.members[set as usize].slots.len() as u32;
            for &w in self.targets(cache, set) {
                targeted[w as usize] += members;
            }
        }
        let mut out = Vec::new();
        for (i, e) in self.workloads.iter().enumerate() {
            let Some(e) = e else { continue };
            let mut by_version: BTreeMap<u64, u32> = BTreeMap::new();
            let (mut updated, mut ready, mut failed) = (0, 0, 0);
            if let Some(w) = cache.strings.find(e.current.id.as_str()) {
                for (_, items, refs) in cache.workload_sets.iter() {
                    for &(wid, version, phase) in items.iter() {
                        if wid != w {
                            continue;
                        }
                        *by_version.entry(version).or_default() += refs;
                        if version == e.current.version {
                            updated += refs;
                            match crate::model::WorkloadPhase::from_u8(phase) {
                                Some(crate::model::WorkloadPhase::Running) => ready += refs,
                                Some(crate::model::WorkloadPhase::Failed) => failed += refs,
                                _ => {}
                            }
                        }
                    }
                }
            }
            out.push(WorkloadStatus {
                id: e.current.id.clone(),
                version: e.current.version,
                targeted: targeted[i],
                updated,
                ready,
                failed,
                by_version: by_version.into_iter().collect(),
                wave: e.wave as u32,
                waves: e.current.rollout.waves.len() as u32,
                phase: e.phase,
            });
        }
        out
    }
}

fn validate_workload(w: &Workload) -> Result<(), ValidationError> {
    w.rollout.validate()?;
    if let crate::model::DeliveryMode::Group(g) = &w.delivery {
        GroupName::new(g.clone())
            .map_err(|_| ValidationError::Rollout { reason: "group name is not a valid topic level" })?;
    }
    Ok(())
}
