//! Uplink handling: what nodes send up (registrations, heartbeats, status reports) and how the
//! engine applies it to the node cache.

use crate::cache::{CacheError, HeartbeatUpdate, NameHash, NameLookup, NodeCache, PROBE_GROUP, RegistrationRef, Slot};
use crate::model::{DesiredDigest, NodeName, NodePhase, Timestamp};
use crate::protocol::{self, CommandKind, Heartbeat, Message, RegisterAck, RegisterOutcome, RejectCode, UplinkKind};
use crate::transport::{Destination, Inbound};

use super::{Core, Outputs, Reject};

// The wire format knows nothing of the cache; the engine, which feeds heartbeats to the cache,
// owns the conversion.
impl From<&Heartbeat> for HeartbeatUpdate {
    fn from(hb: &Heartbeat) -> Self {
        HeartbeatUpdate { boot_id: hb.boot_id, seq: hb.seq, applied: hb.applied, health: Some(hb.health) }
    }
}

impl From<Heartbeat> for HeartbeatUpdate {
    fn from(hb: Heartbeat) -> Self {
        Self::from(&hb)
    }
}

/// The last [`REGISTRATION_MEMORY`](super::REGISTRATION_MEMORY) accepted registrations: slot and
/// time (ms). A fixed ring rather than a per-node map, so the engine's per-node memory stays as it
/// is; a node looping is found as long as fewer than that many other registrations came between.
#[derive(Debug)]
pub(super) struct RecentRegistrations {
    slots: Box<[Slot]>,
    at_ms: Box<[u64]>,
    next: usize,
}

impl Default for RecentRegistrations {
    fn default() -> Self {
        Self {
            slots: vec![Slot::MAX; super::REGISTRATION_MEMORY].into_boxed_slice(),
            at_ms: vec![0; super::REGISTRATION_MEMORY].into_boxed_slice(),
            next: 0,
        }
    }
}

impl RecentRegistrations {
    pub(super) fn push(&mut self, slot: Slot, at_ms: u64) {
        let i = self.next % self.slots.len();
        self.slots[i] = slot;
        self.at_ms[i] = at_ms;
        self.next = i + 1;
    }

    /// When `slot` last registered, if the ring still holds it.
    pub(super) fn last(&self, slot: Slot) -> Option<u64> {
        // A plain pass (no index arithmetic) the compiler can vectorise; time only grows, so the
        // largest is the newest.
        self.slots.iter().zip(self.at_ms.iter()).filter(|(s, _)| **s == slot).map(|(_, at)| *at).max()
    }
}

/// Per-node uplink rate limit ([`EngineConfig::max_uplink_per_node_per_s`](super::EngineConfig)):
/// the generic cell rate algorithm, whose whole state per node is one time, the "theoretical
/// arrival time" of its next message, kept as milliseconds modulo 2³² in a `Vec` indexed by slot
/// (4 bytes a node; no per-node map). A node may be at most `tolerance_ms` ahead of the sustained
/// rate; each admitted message moves its time one `interval_ms` on.
#[derive(Debug)]
pub(super) struct UplinkLimiter {
    tat: Vec<u32>,
    interval_ms: u32,
    tolerance_ms: u32,
}

impl UplinkLimiter {
    pub(super) fn new(per_s: u32, burst: u32) -> Self {
        let interval_ms = 1000u32.checked_div(per_s).map_or(0, |i| i.max(1));
        Self { tat: Vec::new(), interval_ms, tolerance_ms: burst.saturating_sub(1).saturating_mul(interval_ms) }
    }

    pub(super) fn enabled(&self) -> bool {
        self.interval_ms > 0
    }

    /// What [`UplinkLimiter::admit`] will read for `slot` (to warm it ahead).
    fn peek(&self, slot: Slot) -> u32 {
        self.tat.get(slot as usize).copied().unwrap_or(0)
    }

    /// Whether `slot` may send one more message at `now_ms`; if so, it is charged for it.
    #[inline]
    pub(super) fn admit(&mut self, slot: Slot, now_ms: u64) -> bool {
        // Modulo 2³²: only differences matter, and a node's time is never more than
        // `tolerance + interval` ahead of now.
        let now = now_ms as u32;
        let i = slot as usize;
        if i >= self.tat.len() {
            self.tat.resize(i + 1, now);
        }
        let ahead = self.tat[i].wrapping_sub(now);
        // Further ahead than a node can get means its time is behind now (or, after about 49 days
        // of silence, wrapped): it starts afresh with its whole burst.
        let ahead = if ahead > self.tolerance_ms.saturating_add(self.interval_ms) { 0 } else { ahead };
        if ahead > self.tolerance_ms {
            return false;
        }
        self.tat[i] = now.wrapping_add(ahead + self.interval_ms);
        true
    }
}

/// Reads a byte every 64 of each message's payload (a heartbeat's first only), for a warm pass
/// ahead of decoding them; returns what it read, for `black_box`.
#[inline]
fn touch_payloads(msgs: &[Inbound]) -> u8 {
    let mut touch = 0u8;
    for m in msgs {
        for b in m.payload.iter().step_by(64) {
            touch ^= b;
        }
    }
    touch
}

/// What the uplink loop already looked up for a registration: the sender's name (its slot, if
/// present, and hash) and the interned set equal to its labels.
struct Found {
    name: NameLookup,
    label_set: Option<u32>,
}

impl Core {
    pub(super) fn uplink(&mut self, cache: &mut NodeCache, batch: &[Inbound], now: Timestamp, out: &mut Outputs) {
        // Runs of heartbeats go through the batch path; anything else in between is handled in
        // order, so a node's registration always precedes its later heartbeats.
        let limit = self.uplink_limiter.enabled();
        let mut i = 0;
        // Messages before this one had their lookups warmed (see `NodeCache::warm_names`); the
        // names' hashes, from `batch[first]` on, serve their lookups.
        let mut warmed = 0;
        let mut first = 0;
        let mut hashes = [NameHash::default(); PROBE_GROUP];
        // The warmed registrations' label blocks (empty for other messages) and their hashes.
        let mut blocks: [&[u8]; PROBE_GROUP] = [&[]; PROBE_GROUP];
        let mut block_hashes = [0u64; PROBE_GROUP];
        while i < batch.len() {
            if batch[i].kind == UplinkKind::Heartbeat {
                let run = batch[i..].iter().take_while(|m| m.kind == UplinkKind::Heartbeat).count();
                self.heartbeat_run(cache, &batch[i..i + run], now, out);
                i += run;
                continue;
            }
            if i >= warmed {
                warmed = (i + PROBE_GROUP).min(batch.len());
                let mut names = [""; PROBE_GROUP];
                for (n, m) in names.iter_mut().zip(&batch[i..warmed]) {
                    *n = m.node.as_str();
                }
                // The payloads too: decoding a registration reads all of its few hundred bytes.
                std::hint::black_box(touch_payloads(&batch[i..warmed]));
                hashes = cache.warm_names(&names[..warmed - i]);
                (blocks, block_hashes) = self.warm_registrations(cache, &batch[i..warmed]);
                first = i;
            }
            let msg = &batch[i];
            i += 1;
            // Over its rate, a node's message costs one name lookup and nothing more: no decode,
            // no cache write, no catch-up, no answer (an answer per message would let it make us
            // send as fast as it sends).
            let register = msg.kind == UplinkKind::Register;
            // One lookup serves the rate limit and the cache write (and a registration's throttle).
            let k = i - 1 - first;
            let found = cache.lookup(msg.node.as_str(), hashes[k]);
            let slot = found.slot;
            if limit
                && let Some(slot) = slot
                && !self.uplink_limiter.admit(slot, now.as_millis())
            {
                self.stats.uplink_rate_limited += 1;
                continue;
            }
            if register {
                // Borrowed from the payload and interned straight into the cache: no owned copy.
                // A label set the cache holds passed the label rules when it was first registered:
                // it is found (and later interned) by one hash and compared, not checked again.
                let mut set = None;
                let (block, block_hash) = (blocks[k], block_hashes[k]);
                let decoded = protocol::decode_register_view_with(
                    &msg.payload,
                    &msg.node,
                    &self.cfg.decode_limits,
                    &mut |wire| {
                        // The block the warm pass hashed, or (never in practice) another one.
                        set = if std::ptr::eq(wire, block) {
                            cache.find_label_set_hashed(wire, block_hash)
                        } else {
                            cache.find_label_set(wire)
                        };
                        set.is_some()
                    },
                );
                match decoded {
                    Ok(reg) => self.register(cache, msg, &reg, Found { name: found, label_set: set }, now, out),
                    Err(e) => self.decode_failed(out, msg, &e),
                }
                continue;
            }
            match msg.decode(&self.cfg.decode_limits) {
                // Only the heartbeat topic carries heartbeats (decoding checks the kind).
                Ok(Message::Heartbeat(_)) => {}
                Ok(other) => self.handle_message(cache, msg, slot, other, now, out),
                Err(e) => self.decode_failed(out, msg, &e),
            }
        }
    }

    /// Brings into cache what the registrations among `group` will read of their label sets (see
    /// [`NodeCache::warm_label_sets`]) and of the engine's per-set targets and groups; returns each
    /// message's label block (empty for other messages) and its hash.
    fn warm_registrations<'a>(
        &self,
        cache: &NodeCache,
        group: &'a [Inbound],
    ) -> ([&'a [u8]; PROBE_GROUP], [u64; PROBE_GROUP]) {
        let mut blocks: [&[u8]; PROBE_GROUP] = [&[]; PROBE_GROUP];
        let group = &group[..group.len().min(PROBE_GROUP)];
        for (b, m) in blocks.iter_mut().zip(group) {
            if m.kind == UplinkKind::Register {
                *b = protocol::register_label_block(&m.payload, &self.cfg.decode_limits).unwrap_or_default();
            }
        }
        if blocks.iter().all(|b| b.is_empty()) {
            return (blocks, [0; PROBE_GROUP]);
        }
        let (hashes, sets) = cache.warm_label_sets(&blocks[..group.len()]);
        let mut touch = 0u64;
        for &set in &sets[..group.len()] {
            if let Some(st) = self.set_targets.get(set as usize) {
                touch ^= st.touch();
            }
        }
        std::hint::black_box(touch);
        (blocks, hashes)
    }

    fn decode_failed(&mut self, out: &mut Outputs, msg: &Inbound, e: &protocol::DecodeError) {
        self.stats.decode_errors += 1;
        if matches!(e, protocol::DecodeError::IdentityMismatch { .. }) {
            self.stats.identity_mismatch += 1;
            self.send_register_reject(out, &msg.node, RejectCode::IdentityMismatch, e.to_string());
        }
        self.reject(out, &msg.node, e.reason(), || e.to_string());
    }

    /// A run of messages on heartbeat topics: each sender's slot is found once, in one batched
    /// lookup, and serves the rate limit and the cache write alike. A message over its sender's
    /// rate is counted and dropped before it is decoded.
    fn heartbeat_run(&mut self, cache: &mut NodeCache, run: &[Inbound], now: Timestamp, out: &mut Outputs) {
        let mut slots = std::mem::take(&mut self.hb_slots);
        let limit = self.uplink_limiter.enabled();
        // One probe group at a time: its lookups, then what its heartbeats read next, then the
        // heartbeats, so each group's lines are still in cache when it is processed.
        for group in run.chunks(PROBE_GROUP) {
            slots.clear();
            cache.resolve_batch(group.iter().map(|m| m.node.as_str()), &mut slots);
            self.warm_group(cache, group, &slots);
            self.heartbeat_group(cache, group, &slots, limit, now, out);
        }
        self.hb_slots = slots;
    }

    /// Brings into cache what a group's heartbeats read after their lookups: each payload, the
    /// node's rate-limit time, and what [`Core::reconcile`] reads for the node, its label set's
    /// epoch and cached targets. Heartbeats arrive in random node order and a fleet has thousands
    /// of label sets, so these are misses of their own; read for a whole group in one pass, they
    /// overlap. Reads nothing the heartbeats would not read anyway, and changes nothing.
    fn warm_group(&self, cache: &NodeCache, group: &[Inbound], slots: &[Option<Slot>]) {
        let mut touch = u64::from(touch_payloads(group));
        for &slot in slots.iter().flatten() {
            touch ^= u64::from(self.uplink_limiter.peek(slot));
            let set = cache.label_set_of(slot);
            touch ^= u64::from(cache.label_set_epoch(set));
            if let Some(st) = self.set_targets.get(set as usize) {
                touch ^= st.generation ^ u64::from(st.workloads.first().copied().unwrap_or(0));
            }
        }
        std::hint::black_box(touch);
    }

    fn heartbeat_group(
        &mut self,
        cache: &mut NodeCache,
        run: &[Inbound],
        slots: &[Option<Slot>],
        limit: bool,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let now_ms = now.as_millis();
        for (msg, &slot) in run.iter().zip(slots.iter()) {
            if limit
                && let Some(slot) = slot
                && !self.uplink_limiter.admit(slot, now_ms)
            {
                self.stats.uplink_rate_limited += 1;
                continue;
            }
            // Decoding checks the payload's kind against the topic's.
            let h = match msg.decode_heartbeat(&self.cfg.decode_limits) {
                Ok(h) => h,
                Err(e) => {
                    self.decode_failed(out, msg, &e);
                    continue;
                }
            };
            let update = HeartbeatUpdate::from(&h);
            let r = match slot {
                Some(slot) => cache.heartbeat_slot(slot, &update, now),
                None => Err(CacheError::UnknownNode),
            };
            if let Ok(o) = &r
                && o.previous != NodePhase::Online
            {
                self.node_liveness_changed(cache, o.slot, false);
            }
            // A status report always precedes the heartbeats of a change, so a heartbeat that changes
            // the applied digest (or follows one that did) means the report never arrived: without
            // it the workload status and the rollout's wave health would stay stale for good.
            if let Ok(o) = &r
                && (o.applied_changed || (!self.unreported.is_empty() && self.unreported.contains(&o.slot)))
            {
                self.unreported.insert(o.slot);
                self.stats.resyncs += 1;
                self.send_command(out, &msg.node, CommandKind::Resync);
            }
            self.after_heartbeat(cache, &msg.node, &r, h.applied, now, out);
        }
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

    fn handle_message(
        &mut self,
        cache: &mut NodeCache,
        msg: &Inbound,
        known: Option<Slot>,
        decoded: Message,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        match decoded {
            // Registrations are decoded borrowed and handled by `register`.
            Message::Register(_) => {}
            Message::StatusReport(s) => {
                let update = HeartbeatUpdate { boot_id: s.boot_id, seq: s.seq, applied: s.applied, health: None };
                let live = known.filter(|&slot| cache.is_live(slot));
                // The node's part in wave health comes out before the report changes it and goes
                // back in after, whether or not the report was applied.
                if let Some(slot) = live {
                    self.node_health_moved(cache, slot, cache.is_online(slot), false);
                }
                let r = match live {
                    Some(slot) => cache.heartbeat_slot(slot, &update, now),
                    None => Err(CacheError::UnknownNode),
                };
                if let Ok(o) = &r {
                    if !self.unreported.is_empty() {
                        self.unreported.remove(&o.slot);
                    }
                    self.stats.status_reports += 1;
                    cache.report_workloads_at(o.slot, &s.workloads);
                    self.record_failures(o.slot, &s);
                }
                if let Some(slot) = live {
                    self.node_health_moved(cache, slot, cache.is_online(slot), true);
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

    fn register(
        &mut self,
        cache: &mut NodeCache,
        msg: &Inbound,
        reg: &protocol::RegisterView<'_>,
        found: Found,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let registration = RegistrationRef {
            name: reg.name,
            labels: reg.labels,
            arch: reg.arch,
            os: reg.os,
            agent_version: reg.agent_version,
            addresses: &reg.addresses,
            applied: reg.applied,
            workloads: &reg.workloads,
            label_set: found.label_set,
        };
        let known = found.name.slot;
        let boot = reg.boot_id;
        let interval = u64::from(self.cfg.min_register_interval_ms);
        if interval > 0
            && let Some(slot) = known
            && let Some(at) = self.recent_registrations.last(slot)
            && now.as_millis() < at.saturating_add(interval)
        {
            // A node registering in a loop costs a cache update and maybe a full desired
            // state each time: tell it when to come back instead.
            self.stats.registrations_throttled += 1;
            let left = at.saturating_add(interval) - now.as_millis();
            let ack = RegisterAck {
                boot_id: boot,
                outcome: RegisterOutcome::Rejected {
                    code: RejectCode::Overloaded,
                    message: format!(
                        "registered again within {interval} ms of the last registration; retry after {left} ms"
                    ),
                    retry_after_ms: u32::try_from(left).unwrap_or(u32::MAX),
                },
                heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
                groups: Vec::new(),
                desired: DesiredDigest::EMPTY,
            };
            self.send(out, Destination::Node(msg.node.clone()), &Message::RegisterAck(ack), false);
            self.reject(out, &msg.node, "register_throttled", || {
                format!("registration {left} ms too soon after the previous one")
            });
            return;
        }
        let live = known.filter(|&slot| cache.is_live(slot));
        if let Some(slot) = live {
            self.node_health_moved(cache, slot, cache.is_online(slot), false);
        }
        let registered = cache.register_ref_at(&registration, found.name, boot, now);
        // The node's part in wave health, with its new labels and state (or its old ones, unchanged,
        // when the registration was refused).
        match (&registered, live) {
            (Ok(r), _) => self.node_health_moved(cache, r.slot, cache.is_online(r.slot), true),
            (Err(_), Some(slot)) => self.node_health_moved(cache, slot, cache.is_online(slot), true),
            (Err(_), None) => {}
        }
        match registered {
            Ok(r) => {
                self.recent_registrations.push(r.slot, now.as_millis());
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
                // A registration carries no reasons: the node's next report brings them.
                self.forget_failures(r.slot);
                let desired = self.desired(cache, r.slot);
                let set = cache.label_set_of(r.slot);
                self.send_accepted_ack(cache, set, Destination::Node(msg.node.clone()), boot, desired, out);
                // A node given its grace (or sent its catch-up) less than
                // `convergence_grace_ms` ago gets nothing more now, whatever it reports:
                // re-registering with a new boot id must not buy another desired state.
                // The pending entry outlives the node's convergence for the same reason.
                let now_s = now.as_secs_u32();
                let held = self.pending.get(&r.slot).is_some_and(|&deadline| now_s < deadline);
                if registration.applied != desired && !held {
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
                    self.pending.insert(r.slot, now_s.saturating_add(grace_s));
                }
            }
            Err(e) => {
                self.stats.register_rejected += 1;
                self.send_register_reject(out, &msg.node, RejectCode::Invalid, e.to_string());
                self.reject(out, &msg.node, "register_rejected", || e.to_string());
            }
        }
    }

    fn forget_failures(&mut self, slot: crate::cache::Slot) {
        for e in self.workloads.iter_mut().flatten() {
            e.failures.forget(slot);
        }
    }

    /// Replaces what the node said about failures: every workload forgets it, then each failed one
    /// with a reason records it (recomputed from the report, so recovery and moves are seen).
    fn record_failures(&mut self, slot: crate::cache::Slot, report: &protocol::StatusReport) {
        self.forget_failures(slot);
        let cap = self.cfg.max_failed_nodes_tracked;
        for r in &report.reasons {
            let Some(state) = report.workloads.get(r.index as usize) else { continue };
            if let Some(&i) = self.by_id.get(&state.workload)
                && let Some(e) = self.workloads[i as usize].as_mut()
            {
                e.failures.record(slot, state.version, &r.reason, cap);
            }
        }
    }

    fn reject(&mut self, out: &mut Outputs, node: &NodeName, reason: &'static str, detail: impl FnOnce() -> String) {
        if out.rejects.len() < self.cfg.max_rejects_reported {
            out.rejects.push(Reject { node: node.clone(), reason, detail: detail() });
        } else {
            out.rejects_dropped += 1;
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesiredDigest;
    use crate::protocol::NodeHealth;

    #[test]
    fn the_uplink_limiter_admits_the_burst_then_the_rate_across_the_clock_wrap() {
        // 10 per second (one per 100 ms), burst 3, starting just before the u32 millisecond wrap.
        let mut l = UplinkLimiter::new(10, 3);
        let t0 = u64::from(u32::MAX) - 150;
        let admitted = |l: &mut UplinkLimiter, at: u64, n: usize| (0..n).filter(|_| l.admit(5, at)).count();
        assert_eq!(admitted(&mut l, t0, 10), 3);
        assert_eq!(admitted(&mut l, t0 + 100, 10), 1, "one interval later, one more");
        assert_eq!(admitted(&mut l, t0 + 350, 10), 2, "across the wrap, 2.5 intervals refill 2");
        // Other slots have their own budget; a slot silent for days starts with its whole burst.
        assert_eq!(admitted(&mut l, t0 + 350, 10), 0, "spent");
        assert_eq!((0..10).filter(|_| l.admit(9, t0 + 350)).count(), 3);
        assert_eq!(admitted(&mut l, t0 + 30 * 86_400_000, 10), 3);
        assert!(!UplinkLimiter::new(0, 3).enabled());
    }

    #[test]
    fn heartbeat_update_is_derived_field_by_field() {
        let hb = Heartbeat { seq: 7, boot_id: 0xdead_beef, applied: DesiredDigest(42), health: NodeHealth::DEGRADED };
        assert_eq!(
            HeartbeatUpdate::from(&hb),
            HeartbeatUpdate {
                boot_id: 0xdead_beef,
                seq: 7,
                applied: DesiredDigest(42),
                health: Some(NodeHealth::DEGRADED)
            }
        );
    }
}
