//! The agent state machine: registration, heartbeats, self-selection of specs, desired-state
//! replacement, commands and status, with time and the runtime passed in.

use std::sync::Arc;

use crate::model::{
    DesiredDigest, Labels, NodeInfo, NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase, WorkloadState, mix64,
    stable_hash, wave_point,
};
use crate::protocol::{
    self, Command, CommandKind, DesiredState, FailureReason, GroupName, Heartbeat, Message, NodeHealth, RegisterAck,
    RegisterOutcome, StatusReport, UplinkKind,
};
use crate::transport::{Destination, NodeDelivery, NodePublish};

use super::io::{AgentConfig, AgentEvent, AgentIdentity, AgentInput, AgentOutputs, GroupChange};
use super::runtime::WorkloadRuntime;
use super::store::PersistedState;
use crate::rng::SplitMix64;

/// Where the agent stands with the cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// No transport.
    Disconnected,
    /// Connected, waiting for an accepting [`RegisterAck`] (retrying with backoff).
    Registering,
    /// Registered: heartbeating.
    Registered,
}

/// One desired workload and its phase as the runtime last reported it.
#[derive(Clone, Debug)]
struct Slot {
    workload: Arc<Workload>,
    phase: WorkloadPhase,
}

const STARTED: u8 = 0x01;
const STATUS_DIRTY: u8 = 0x02;
/// A delivery was refused (signature or replay) since the last heartbeat.
const REFUSED: u8 = 0x04;
const NEVER: u64 = u64::MAX;

/// The edge agent: a deterministic state machine. See the [module documentation](super).
///
/// Small on purpose (a simulator holds a million): labels, info, config and workloads are shared
/// `Arc`s; the only per-agent heap data are the name, the desired list and the group names.
///
/// Laid out in declaration order (`repr(C)`): what a timer tick and a heartbeat read comes first,
/// in 88 contiguous bytes (two cache lines at most, where the compiler's order spread them over
/// all three of the struct's), then what registration, deliveries and restarts read.
#[derive(Clone, Debug)]
#[repr(C)]
pub struct Agent {
    flags: u8,
    link: LinkState,
    attempt: u8,
    boot_id: u32,
    seq: u32,
    heartbeat_ms: u32,
    /// Next registration retry (Registering) or heartbeat (Registered), ms; `NEVER` when none.
    timer_at: u64,
    /// Next runtime poll, ms.
    poll_at: u64,
    applied: DesiredDigest,
    config: Arc<AgentConfig>,
    /// Desired = applied workloads, sorted by id.
    workloads: Vec<Slot>,
    name: NodeName,
    labels: Arc<Labels>,
    info: Arc<NodeInfo>,
    /// Groups of the last accepting ack.
    /// Shared with the other agents of this thread told the same groups (see `set_groups`).
    groups: Arc<[GroupName]>,
    jitter: SplitMix64,
    /// Id of the last `RestartWorkload` command executed (not idempotent, so de-duplicated).
    last_restart_command: u64,
    /// Issue times of the newest signed statements accepted (only with trusted keys): boxed, so an
    /// agent without keys (a simulated million) pays one pointer.
    marks: Option<Box<Marks>>,
}

/// What a signed-downlink agent has accepted, by issue time (Unix ms): per workload, the newest
/// spec, desired set or removal that concerned it; for acks and commands, the newest one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    control: u64,
    workloads: std::collections::BTreeMap<WorkloadId, u64>,
}

impl Agent {
    /// An agent for `identity`, in its boot `boot_id` (random per start; 0 is replaced by 1, as the
    /// cloud reads 0 as "no boot"). With `persisted`, the first [`Agent::handle`] call re-applies
    /// that desired state through the runtime before anything else, so a node restarted while cut
    /// off keeps running its last desired state.
    ///
    /// Jitter comes from a generator seeded with the boot id and the name: reproducible, and
    /// different for every node and every boot.
    pub fn new(
        config: impl Into<Arc<AgentConfig>>,
        identity: AgentIdentity,
        boot_id: u32,
        persisted: Option<PersistedState>,
    ) -> Self {
        let boot_id = boot_id.max(1);
        let seed = mix64(u64::from(boot_id) ^ stable_hash(0x0061_6765_6e74, identity.name.as_str().as_bytes()));
        let mut agent = Self {
            config: config.into(),
            name: identity.name,
            labels: identity.labels,
            info: identity.info,
            workloads: Vec::new(),
            groups: GroupName::shared_list(&[]),
            applied: DesiredDigest::EMPTY,
            jitter: SplitMix64::new(seed),
            timer_at: NEVER,
            poll_at: 0,
            last_restart_command: 0,
            boot_id,
            seq: 0,
            heartbeat_ms: 0,
            link: LinkState::Disconnected,
            attempt: 0,
            flags: 0,
            marks: None,
        };
        if agent.config.trust.is_some() {
            let mut marks = Marks::default();
            if let Some(state) = &persisted {
                marks.workloads = state.marks.iter().cloned().collect();
            }
            agent.marks = Some(Box::new(marks));
        }
        if let Some(state) = persisted {
            let state = PersistedState::new(state.workloads);
            agent.workloads =
                state.workloads.into_iter().map(|workload| Slot { workload, phase: WorkloadPhase::Pending }).collect();
            agent.applied = state.applied;
        }
        agent
    }

    /// The node's name.
    pub fn name(&self) -> &NodeName {
        &self.name
    }

    /// The node's labels.
    pub fn labels(&self) -> &Arc<Labels> {
        &self.labels
    }

    /// The node's static facts.
    pub fn info(&self) -> &Arc<NodeInfo> {
        &self.info
    }

    /// This boot's id.
    pub fn boot_id(&self) -> u32 {
        self.boot_id
    }

    /// The last sequence number used (0 before the first heartbeat or status report).
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Where the agent stands with the cloud.
    pub fn link(&self) -> LinkState {
        self.link
    }

    /// The heartbeat interval of the last accepting ack, in milliseconds (0 before any).
    pub fn heartbeat_interval_ms(&self) -> u32 {
        self.heartbeat_ms
    }

    /// The groups of the last accepting ack.
    pub fn groups(&self) -> &[GroupName] {
        &self.groups
    }

    /// Digest of the (workload, version) pairs handed to the runtime.
    pub fn applied(&self) -> DesiredDigest {
        self.applied
    }

    /// Reads the first and the last field of what a timer wake-up reads (the struct's first 88
    /// bytes, see its layout), and returns a value made of them (for `std::hint::black_box`). A
    /// simulator driving a million agents in random order calls it for a group of agents before
    /// running each, so the cache misses on their state overlap instead of coming one after another
    /// (see `kole_sim::sim`). It changes nothing.
    pub fn touch(&self) -> u64 {
        u64::from(self.flags) ^ self.name.as_str().len() as u64
    }

    /// The desired (and applied) workloads, sorted by id, with their phases.
    pub fn workloads(&self) -> impl Iterator<Item = (&Arc<Workload>, WorkloadPhase)> + '_ {
        self.workloads.iter().map(|s| (&s.workload, s.phase))
    }

    /// The per-workload states, as reported to the cloud.
    pub fn workload_states(&self) -> Vec<WorkloadState> {
        self.workloads
            .iter()
            .map(|s| WorkloadState { workload: s.workload.id.clone(), version: s.workload.version, phase: s.phase })
            .collect()
    }

    /// The state to persist now.
    pub fn persisted_state(&self) -> PersistedState {
        PersistedState {
            workloads: self.workloads.iter().map(|s| s.workload.clone()).collect(),
            applied: self.applied,
            marks: self
                .marks
                .as_ref()
                .map(|m| m.workloads.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default(),
        }
    }

    /// Heap bytes this agent owns alone (name, desired list), excluding the shared `Arc`s' targets
    /// (labels, info, the group list). With `size_of::<Agent>()` this is the agent's memory cost in
    /// a simulator.
    pub fn heap_bytes(&self) -> usize {
        self.name.as_str().len() + self.workloads.capacity() * std::mem::size_of::<Slot>()
    }

    /// When the agent next needs a [`AgentInput::Tick`]; `None` when nothing is scheduled.
    pub fn next_wake(&self) -> Option<Timestamp> {
        if self.flags & STARTED == 0 {
            return Some(Timestamp::from_millis(0));
        }
        let mut at = NEVER;
        if self.link != LinkState::Disconnected {
            at = at.min(self.timer_at);
        }
        if self.config.runtime_poll_ms > 0 && !self.workloads.is_empty() {
            at = at.min(self.poll_at);
        }
        (at != NEVER).then_some(Timestamp::from_millis(at))
    }

    /// Handles one input at time `now`, using `runtime` to run workloads, appending what to do to
    /// `out` and setting [`AgentOutputs::next_wake`].
    pub fn handle(
        &mut self,
        input: AgentInput<'_>,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) {
        if self.flags & STARTED == 0 {
            self.start(now, runtime, out);
        }
        match input {
            AgentInput::Connected => self.connected(now, out),
            AgentInput::Disconnected => {
                self.link = LinkState::Disconnected;
                self.timer_at = NEVER;
            }
            AgentInput::Tick => self.tick(now, runtime, out),
            AgentInput::Delivery(d) => self.delivery(d, now, runtime, out),
            AgentInput::Message { message, from } => self.message(message, from, now, runtime, out),
            AgentInput::SharedSpec { workload, wave_threshold, from } => {
                self.spec(workload, Some(workload), wave_threshold, from, now, runtime, out)
            }
        }
        if self.flags & STATUS_DIRTY != 0 && self.link == LinkState::Registered {
            self.send_status(now, &*runtime, out);
        }
        out.next_wake = self.next_wake();
    }

    /// Re-applies the persisted desired state (if any) through the runtime: before any cloud
    /// contact, so a node restarted while partitioned runs its last desired state at once.
    fn start(&mut self, now: Timestamp, runtime: &mut dyn WorkloadRuntime, out: &mut AgentOutputs) {
        self.flags |= STARTED;
        self.poll_at = now.as_millis();
        for slot in &mut self.workloads {
            slot.phase = runtime.apply(&self.name, &slot.workload, now);
            out.events.push(AgentEvent::Applied {
                id: slot.workload.id.clone(),
                version: slot.workload.version,
                phase: slot.phase,
            });
        }
        if !self.workloads.is_empty() {
            self.flags |= STATUS_DIRTY;
        }
    }

    fn connected(&mut self, now: Timestamp, out: &mut AgentOutputs) {
        // A new connection is a clean session: re-subscribe the groups we know at once, so group
        // specs flow even before (or without) the controller's ack.
        for g in self.groups.iter() {
            out.groups.push(GroupChange::Subscribe(g.clone()));
        }
        self.attempt = 0;
        self.send_register(now, out);
    }

    fn send_register(&mut self, now: Timestamp, out: &mut AgentOutputs) {
        self.link = LinkState::Registering;
        let workloads = self.workload_states();
        let payload = protocol::encode_register(&protocol::RegisterRef {
            name: &self.name,
            boot_id: self.boot_id,
            labels: &self.labels,
            info: &self.info,
            applied: self.applied,
            workloads: &workloads,
        });
        out.publish.push(NodePublish { kind: UplinkKind::Register, payload });
        // The registration carries every workload's state.
        self.flags &= !STATUS_DIRTY;
        let delay = self.config.register_retry.delay_ms(u32::from(self.attempt), &mut self.jitter);
        self.attempt = self.attempt.saturating_add(1);
        self.timer_at = now.as_millis().saturating_add(delay);
    }

    fn next_seq(&mut self) -> u32 {
        // Strictly increasing within a boot; a boot lasting 4 billion heartbeats wraps.
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn health(&self, runtime: &dyn WorkloadRuntime) -> NodeHealth {
        let mut h = runtime.health(&self.name);
        for s in &self.workloads {
            match s.phase {
                WorkloadPhase::Failed => h = h.with(NodeHealth::WORKLOAD_FAILED),
                WorkloadPhase::Pending => h = h.with(NodeHealth::WORKLOAD_PENDING),
                WorkloadPhase::Running | WorkloadPhase::Stopped => {}
            }
        }
        h
    }

    fn send_heartbeat(&mut self, now: Timestamp, runtime: &dyn WorkloadRuntime, out: &mut AgentOutputs) {
        let hb = Heartbeat {
            seq: self.next_seq(),
            boot_id: self.boot_id,
            applied: self.applied,
            health: if self.flags & REFUSED != 0 {
                self.health(runtime).with(NodeHealth::DOWNLINK_REFUSED)
            } else {
                self.health(runtime)
            },
        };
        self.flags &= !REFUSED;
        push(out, UplinkKind::Heartbeat, &Message::Heartbeat(hb));
        self.timer_at = now.as_millis().saturating_add(u64::from(self.heartbeat_ms));
    }

    fn send_status(&mut self, now: Timestamp, runtime: &dyn WorkloadRuntime, out: &mut AgentOutputs) {
        let reasons = self
            .workloads
            .iter()
            .enumerate()
            .filter(|(_, s)| s.phase == WorkloadPhase::Failed)
            .filter_map(|(i, s)| {
                let reason = runtime.failure_reason(&self.name, &s.workload.id)?;
                Some(FailureReason::new(u32::try_from(i).ok()?, &reason))
            })
            .collect();
        let report = StatusReport {
            seq: self.next_seq(),
            boot_id: self.boot_id,
            applied: self.applied,
            workloads: self.workload_states(),
            reasons,
        };
        push(out, UplinkKind::Status, &Message::StatusReport(report));
        self.flags &= !STATUS_DIRTY;
        // A status report counts as a heartbeat.
        self.timer_at = now.as_millis().saturating_add(u64::from(self.heartbeat_ms));
    }

    fn tick(&mut self, now: Timestamp, runtime: &mut dyn WorkloadRuntime, out: &mut AgentOutputs) {
        let now_ms = now.as_millis();
        match self.link {
            LinkState::Registering if now_ms >= self.timer_at => self.send_register(now, out),
            LinkState::Registered if now_ms >= self.timer_at => self.send_heartbeat(now, runtime, out),
            _ => {}
        }
        if now_ms >= self.poll_at {
            self.poll_at = now_ms.saturating_add(u64::from(self.config.runtime_poll_ms));
            let mut changes = Vec::new();
            runtime.poll(&self.name, now, &mut changes);
            for (id, phase) in changes {
                self.set_phase(&id, phase);
            }
        }
    }

    fn set_phase(&mut self, id: &WorkloadId, phase: WorkloadPhase) {
        if let Some(i) = self.find(id)
            && self.workloads[i].phase != phase
        {
            self.workloads[i].phase = phase;
            self.flags |= STATUS_DIRTY;
        }
    }

    fn find(&self, id: &WorkloadId) -> Option<usize> {
        self.workloads.binary_search_by(|s| s.workload.id.cmp(id)).ok()
    }

    fn delivery(
        &mut self,
        d: &NodeDelivery,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) {
        if let Some(trust) = self.config.trust.clone() {
            return self.signed_delivery(d, &trust, now, runtime, out);
        }
        if d.payload.is_empty() {
            // A deleted retained spec.
            match &d.from {
                Destination::WorkloadSpec(id) | Destination::GroupWorkloadSpec(_, id) => {
                    if self.remove(id, now, runtime, out) {
                        self.changed(out);
                    }
                }
                _ => ignore(out, "empty_payload"),
            }
            return;
        }
        match protocol::seal::decode_unverified(&d.payload, &self.config.decode_limits) {
            Ok((msg, _)) => self.message(&msg, &d.from, now, runtime, out),
            Err(e) => ignore(out, e.reason()),
        }
    }

    /// A delivery to an agent that pins keys: verified, then checked against the replay marks.
    fn signed_delivery(
        &mut self,
        d: &NodeDelivery,
        trust: &protocol::seal::TrustedKeys,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) {
        if d.payload.is_empty() {
            // A cleared retained spec cannot be signed: the signed `WorkloadRemoved` sent with it
            // (or the next desired set) removes the workload.
            return ignore(out, "unsigned_removal");
        }
        let opened = match protocol::seal::open(&d.payload, &d.from, trust, &self.config.decode_limits) {
            Ok(o) => o,
            Err(e) => {
                out.events.push(AgentEvent::Refused { reason: e.reason(), detail: e.to_string() });
                self.flags |= REFUSED;
                return;
            }
        };
        let at = opened.issued_at_ms;
        if let Err(id) = self.check_fresh(&opened.message, at) {
            out.events.push(AgentEvent::Refused {
                reason: "replayed",
                detail: format!(
                    "a {} issued at {at} ms is older than what this agent accepted about {id}",
                    opened.message.kind()
                ),
            });
            self.flags |= REFUSED;
            return;
        }
        // A desired set speaks for the workloads it drops, too.
        let prior: Vec<WorkloadId> = match &opened.message {
            Message::DesiredState(_) => self.workloads.iter().map(|s| s.workload.id.clone()).collect(),
            _ => Vec::new(),
        };
        self.message(&opened.message, &d.from, now, runtime, out);
        self.mark(&opened.message, &prior, at);
    }

    /// Whether a signed message issued at `at` is not older than anything accepted about what it
    /// concerns; `Err` names the first workload (or "acks and commands") it is older for.
    fn check_fresh(&self, msg: &Message, at: u64) -> Result<(), String> {
        let Some(marks) = self.marks.as_deref() else { return Ok(()) };
        let older = |id: &WorkloadId| marks.workloads.get(id).is_some_and(|&m| at < m);
        match msg {
            Message::WorkloadSpec(s) if older(&s.workload.id) => Err(s.workload.id.to_string()),
            Message::WorkloadRemoved(r) if older(&r.id) => Err(r.id.to_string()),
            Message::DesiredState(ds) => {
                // Every workload it sets, and every one it would drop.
                match ds
                    .workloads
                    .iter()
                    .map(|w| &w.id)
                    .chain(self.workloads.iter().map(|s| &s.workload.id))
                    .find(|id| older(id))
                {
                    Some(id) => Err(id.to_string()),
                    None => Ok(()),
                }
            }
            Message::RegisterAck(_) | Message::Command(_) if at < marks.control => Err("acks and commands".into()),
            _ => Ok(()),
        }
    }

    fn mark(&mut self, msg: &Message, held: &[WorkloadId], at: u64) {
        let Some(marks) = self.marks.as_deref_mut() else { return };
        let mut set = |id: &WorkloadId| {
            let m = marks.workloads.entry(id.clone()).or_insert(0);
            *m = (*m).max(at);
        };
        match msg {
            Message::WorkloadSpec(s) => set(&s.workload.id),
            Message::WorkloadRemoved(r) => set(&r.id),
            Message::DesiredState(ds) => {
                ds.workloads.iter().for_each(|w| set(&w.id));
                held.iter().for_each(set);
            }
            Message::RegisterAck(_) | Message::Command(_) => marks.control = marks.control.max(at),
            _ => {}
        }
    }

    fn message(
        &mut self,
        msg: &Message,
        from: &Destination,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) {
        if let Err(reason) = allowed_on(msg, from) {
            return ignore(out, reason);
        }
        match msg {
            Message::RegisterAck(ack) => self.ack(ack, now, out),
            Message::WorkloadSpec(spec) => {
                self.spec(&spec.workload, None, spec.wave_threshold, from, now, runtime, out)
            }
            Message::WorkloadRemoved(r) => {
                if self.remove(&r.id, now, runtime, out) {
                    self.changed(out);
                }
            }
            Message::DesiredState(ds) => self.replace(ds, now, runtime, out),
            Message::Command(c) => self.command(c, now, runtime, out),
            Message::Register(_) | Message::Heartbeat(_) | Message::StatusReport(_) => ignore(out, "uplink_kind"),
        }
    }

    fn ack(&mut self, ack: &RegisterAck, now: Timestamp, out: &mut AgentOutputs) {
        let rejected = matches!(ack.outcome, RegisterOutcome::Rejected { .. });
        // The controller cannot always tell which boot it rejects (e.g. an undecodable
        // registration), so a rejection for boot 0 is ours too.
        if ack.boot_id != self.boot_id && !(rejected && ack.boot_id == 0) {
            return ignore(out, "stale_ack");
        }
        if self.link == LinkState::Disconnected {
            return ignore(out, "not_connected");
        }
        match &ack.outcome {
            RegisterOutcome::Accepted => {
                let first = self.link != LinkState::Registered;
                self.link = LinkState::Registered;
                self.attempt = 0;
                self.heartbeat_ms = ack
                    .heartbeat_interval_ms
                    .min(self.config.max_controller_delay_ms)
                    .max(self.config.min_heartbeat_interval_ms)
                    .max(1);
                self.set_groups(&ack.groups, out);
                if first {
                    // Spread a fleet that registered together over the interval.
                    let offset = self.jitter.below(u64::from(self.heartbeat_ms));
                    self.timer_at = now.as_millis().saturating_add(offset);
                }
                out.events.push(AgentEvent::Registered { heartbeat_interval_ms: self.heartbeat_ms });
            }
            RegisterOutcome::Rejected { code, message, retry_after_ms } => {
                self.link = LinkState::Registering;
                let delay = if *retry_after_ms > 0 {
                    let ra = u64::from((*retry_after_ms).min(self.config.max_controller_delay_ms));
                    ra + self.jitter.below(ra / 2 + 1)
                } else {
                    self.config.register_retry.delay_ms(u32::from(self.attempt), &mut self.jitter)
                };
                self.attempt = self.attempt.saturating_add(1);
                self.timer_at = now.as_millis().saturating_add(delay);
                out.events.push(AgentEvent::RegisterRejected {
                    code: *code,
                    message: message.clone(),
                    retry_at: Timestamp::from_millis(self.timer_at),
                });
            }
        }
    }

    fn set_groups(&mut self, groups: &[GroupName], out: &mut AgentOutputs) {
        if *self.groups == *groups {
            return;
        }
        for g in self.groups.iter().filter(|g| !groups.contains(g)) {
            out.groups.push(GroupChange::Unsubscribe(g.clone()));
        }
        for g in groups.iter().filter(|g| !self.groups.contains(g)) {
            out.groups.push(GroupChange::Subscribe(g.clone()));
        }
        // One list per label set, not one per agent, in a process running many agents.
        self.groups = GroupName::shared_list(groups);
    }

    /// Self-selection of a spec. `shared` is the spec's workload as an `Arc` when the caller has
    /// one to share; otherwise the workload is copied into a new one if it is applied.
    #[allow(clippy::too_many_arguments)]
    fn spec(
        &mut self,
        w: &Workload,
        shared: Option<&Arc<Workload>>,
        wave_threshold: u16,
        from: &Destination,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) {
        if let Destination::WorkloadSpec(id) | Destination::GroupWorkloadSpec(_, id) = from
            && *id != w.id
        {
            return ignore(out, "spec_topic_mismatch");
        }
        // A spec topic carries only specs of its own delivery: a broadcast spec on the fleet's, a
        // group's on that group's.
        let on_its_topic = match (from, &w.delivery) {
            (Destination::Node(_), _) | (Destination::WorkloadSpec(_), crate::model::DeliveryMode::Broadcast) => true,
            (Destination::GroupWorkloadSpec(g, _), crate::model::DeliveryMode::Group(d)) => g.as_str() == d,
            _ => false,
        };
        if !on_its_topic {
            return ignore(out, "spec_topic_mismatch");
        }
        let changed = if !w.selector.matches(&*self.labels) {
            self.remove(&w.id, now, runtime, out)
        } else if wave_point(self.name.as_str(), &w.id) < wave_threshold {
            // Same version and same content: nothing to do. A workload deleted and created again
            // under the same name restarts at the same version with other content.
            if self.find(&w.id).is_some_and(|i| same_content(&self.workloads[i].workload, w)) {
                false
            } else {
                let arc = shared.cloned().unwrap_or_else(|| Arc::new(w.clone()));
                self.apply(arc, now, runtime, out);
                true
            }
        } else {
            // Outside the rollout's reached waves: keep whatever version runs (or nothing).
            false
        };
        if changed {
            self.changed(out);
        }
    }

    /// Hands one workload version to the runtime and records it as desired.
    fn apply(
        &mut self,
        workload: Arc<Workload>,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) {
        let phase = runtime.apply(&self.name, &workload, now);
        out.events.push(AgentEvent::Applied { id: workload.id.clone(), version: workload.version, phase });
        if self.workloads.is_empty() {
            // No poll ran while the agent had nothing to run, so the poll time is stale: the first
            // poll is one interval after this apply, which just told the workload's phase (not at
            // once, which would only ask again).
            self.poll_at = now.as_millis().saturating_add(u64::from(self.config.runtime_poll_ms));
        }
        let slot = Slot { workload, phase };
        match self.workloads.binary_search_by(|s| s.workload.id.cmp(&slot.workload.id)) {
            Ok(i) => self.workloads[i] = slot,
            Err(i) => self.workloads.insert(i, slot),
        }
    }

    /// Removes a workload; whether it was there.
    fn remove(
        &mut self,
        id: &WorkloadId,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) -> bool {
        let Some(i) = self.find(id) else {
            return false;
        };
        self.workloads.remove(i);
        runtime.remove(&self.name, id, now);
        out.events.push(AgentEvent::Removed { id: id.clone() });
        true
    }

    /// `DesiredState` is authoritative: run exactly its workloads.
    fn replace(
        &mut self,
        ds: &DesiredState,
        now: Timestamp,
        runtime: &mut dyn WorkloadRuntime,
        out: &mut AgentOutputs,
    ) {
        let mut wanted: Vec<&Workload> = ds.workloads.iter().collect();
        wanted.sort_by(|a, b| a.id.cmp(&b.id));
        wanted.dedup_by(|a, b| a.id == b.id);
        let mut changed = false;
        let dropped: Vec<WorkloadId> = self
            .workloads
            .iter()
            .filter(|s| wanted.binary_search_by(|w| w.id.cmp(&s.workload.id)).is_err())
            .map(|s| s.workload.id.clone())
            .collect();
        for id in &dropped {
            changed |= self.remove(id, now, runtime, out);
        }
        for w in wanted {
            if !self.find(&w.id).is_some_and(|i| same_content(&self.workloads[i].workload, w)) {
                self.apply(Arc::new(w.clone()), now, runtime, out);
                changed = true;
            }
        }
        if changed {
            self.changed(out);
        }
    }

    /// After any change of the desired set: new digest, status due, persist.
    fn changed(&mut self, out: &mut AgentOutputs) {
        self.applied = DesiredDigest::of_workloads(self.workloads.iter().map(|s| &*s.workload));
        self.flags |= STATUS_DIRTY;
        if self.config.persist {
            out.persist = Some(self.persisted_state());
        }
    }

    fn command(&mut self, c: &Command, now: Timestamp, runtime: &mut dyn WorkloadRuntime, out: &mut AgentOutputs) {
        match &c.kind {
            CommandKind::Reregister => {
                if self.link == LinkState::Disconnected {
                    return ignore(out, "not_connected");
                }
                self.attempt = 0;
                self.send_register(now, out);
            }
            CommandKind::Resync => {
                self.flags |= STATUS_DIRTY;
            }
            CommandKind::RestartWorkload(id) => {
                // Redelivered (QoS 1) commands carry the same id; a restart is not idempotent.
                if c.id == self.last_restart_command {
                    return ignore(out, "duplicate_command");
                }
                self.last_restart_command = c.id;
                if self.find(id).is_some()
                    && let Some(phase) = runtime.restart(&self.name, id, now)
                {
                    self.set_phase(id, phase);
                }
            }
            CommandKind::Ping => {
                if self.link == LinkState::Registered {
                    self.send_heartbeat(now, runtime, out);
                }
            }
        }
    }
}

fn push(out: &mut AgentOutputs, kind: UplinkKind, msg: &Message) {
    out.publish.push(NodePublish { kind, payload: protocol::encode(msg) });
}

/// Which downlink kinds may arrive on which destination (`docs/protocol.md`, "Topics"): the
/// node's own topic takes every downlink kind; the fleet and group topics only `WorkloadRemoved`
/// and `Command`; spec topics only `WorkloadSpec`. So a `RegisterAck` on the fleet topic cannot put
/// every node to sleep, and an empty `DesiredState` there cannot wipe every node's workloads.
fn allowed_on(msg: &Message, from: &Destination) -> Result<(), &'static str> {
    match (msg, from) {
        (Message::Register(_) | Message::Heartbeat(_) | Message::StatusReport(_), _) => Err("uplink_kind"),
        (_, Destination::Node(_))
        | (Message::WorkloadRemoved(_) | Message::Command(_), Destination::Fleet | Destination::Group(_))
        | (Message::WorkloadSpec(_), Destination::WorkloadSpec(_) | Destination::GroupWorkloadSpec(..)) => Ok(()),
        _ => Err("wrong_topic"),
    }
}

fn ignore(out: &mut AgentOutputs, reason: &'static str) {
    out.events.push(AgentEvent::Ignored { reason });
}
/// Whether two versions of a workload run the same thing (what the desired digest covers).
fn same_content(a: &Workload, b: &Workload) -> bool {
    a.version == b.version && a.spec == b.spec
}
