//! Tests of the agent state machine, one behaviour each; `e2e` drives hundreds of agents against
//! the real engine over the in-memory hub.

mod e2e;

use std::sync::Arc;

use super::*;
use crate::backoff::Backoff;
use crate::model::{
    DesiredDigest, Labels, NodeInfo, NodeName, Selector, Timestamp, Workload, WorkloadId, WorkloadPhase, wave_point,
};
use crate::protocol::{
    self, Command, CommandKind, DesiredState, GroupName, Heartbeat, Message, NodeHealth, RegisterAck, RegisterOutcome,
    RejectCode, StatusReport, WorkloadRemoved, WorkloadSpec,
};
use crate::transport::{Bytes, Destination, NodeDelivery};

fn name(n: &str) -> NodeName {
    NodeName::new(n).unwrap()
}

fn wid(id: &str) -> WorkloadId {
    WorkloadId::new(id).unwrap()
}

fn identity(n: &str, labels: &[(&str, &str)]) -> AgentIdentity {
    AgentIdentity {
        name: name(n),
        labels: Arc::new(Labels::from_pairs(labels.iter().copied()).unwrap()),
        info: Arc::new(NodeInfo {
            arch: "arm64".into(),
            os: "linux-6.1".into(),
            agent_version: "0.1.0".into(),
            addresses: vec![],
        }),
    }
}

fn workload(id: &str, version: u64, selector: &str) -> Workload {
    Workload {
        id: wid(id),
        version,
        spec: format!("run {id} v{version}").into_bytes(),
        selector: Selector::parse(selector).unwrap(),
        delivery: Default::default(),
        rollout: Default::default(),
    }
}

/// The digest of workloads as [`workload`] builds them.
fn digest(items: &[(&str, u64)]) -> DesiredDigest {
    DesiredDigest::of_workloads(items.iter().map(|(id, v)| workload(id, *v, "")).collect::<Vec<_>>().iter())
}

fn accepted(boot_id: u32, interval_ms: u32, groups: &[&str]) -> Message {
    Message::RegisterAck(RegisterAck {
        boot_id,
        outcome: RegisterOutcome::Accepted,
        heartbeat_interval_ms: interval_ms,
        groups: groups.iter().map(|g| GroupName::new(*g).unwrap()).collect(),
        desired: DesiredDigest::EMPTY,
    })
}

fn spec(w: &Workload, threshold: u16) -> Message {
    Message::WorkloadSpec(WorkloadSpec { workload: w.clone(), wave_threshold: threshold })
}

fn command(id: u64, kind: CommandKind) -> Message {
    Message::Command(Command { id, kind })
}

const BOOT: u32 = 0xb007;

/// One agent, a recording runtime and virtual time.
struct Harness {
    agent: Agent,
    rt: RecordingRuntime,
    out: AgentOutputs,
    now: u64,
}

impl Harness {
    fn new(n: &str, labels: &[(&str, &str)]) -> Self {
        Self::with(AgentConfig::default(), n, labels, None)
    }

    fn with(config: AgentConfig, n: &str, labels: &[(&str, &str)], persisted: Option<PersistedState>) -> Self {
        Self {
            agent: Agent::new(config, identity(n, labels), BOOT, persisted),
            rt: RecordingRuntime::new(),
            out: AgentOutputs::default(),
            now: 1_000_000,
        }
    }

    fn me(&self) -> Destination {
        Destination::Node(self.agent.name().clone())
    }

    fn input(&mut self, input: AgentInput<'_>) {
        let now = Timestamp::from_millis(self.now);
        self.agent.handle(input, now, &mut self.rt, &mut self.out);
    }

    fn msg(&mut self, m: &Message, from: &Destination) {
        self.input(AgentInput::Message { message: m, from });
    }

    fn send_me(&mut self, m: &Message) {
        let me = self.me();
        self.msg(m, &me);
    }

    fn tick_at(&mut self, at: u64) {
        self.now = at;
        self.input(AgentInput::Tick);
    }

    /// Decodes and takes everything published so far.
    fn sent(&mut self) -> Vec<Message> {
        self.out
            .publish
            .drain(..)
            .map(|p| {
                let m = protocol::decode_uplink(&p.payload, &Default::default()).unwrap();
                assert_eq!(p.kind, m.kind().uplink().unwrap(), "published on its kind's topic");
                m
            })
            .collect()
    }

    fn register(&mut self, interval_ms: u32) {
        self.input(AgentInput::Connected);
        assert!(matches!(self.sent()[..], [Message::Register(_)]));
        self.send_me(&accepted(BOOT, interval_ms, &[]));
        assert_eq!(self.agent.link(), LinkState::Registered);
        self.out.clear();
    }

    fn version_of(&self, id: &str) -> Option<u64> {
        self.agent.workloads().find(|(w, _)| w.id.as_str() == id).map(|(w, _)| w.version)
    }

    fn wake(&self) -> u64 {
        self.agent.next_wake().unwrap().as_millis()
    }
}

#[test]
fn registration_retries_with_jittered_backoff_until_accepted() {
    let config =
        AgentConfig { register_retry: Backoff::new(1_000, 8_000, 2.0), runtime_poll_ms: 0, ..AgentConfig::default() };
    let mut h = Harness::with(config, "edge-1", &[], None);
    h.input(AgentInput::Connected);
    let Message::Register(reg) = &h.sent()[0] else { panic!("expected a registration") };
    assert_eq!((reg.name.as_str(), reg.boot_id), ("edge-1", BOOT));
    assert_eq!(h.agent.link(), LinkState::Registering);

    let mut waits = Vec::new();
    for _ in 0..6 {
        let start = h.now;
        let wake = h.wake();
        // Nothing before the retry time.
        h.tick_at(wake - 1);
        assert!(h.sent().is_empty());
        h.tick_at(wake);
        assert!(matches!(h.sent()[..], [Message::Register(_)]));
        waits.push(wake - start);
    }
    // Nominal 1, 2, 4, 8, 8, 8 s, each jittered into [d/2, d].
    for (w, nominal) in waits.iter().zip([1_000, 2_000, 4_000, 8_000, 8_000, 8_000]) {
        assert!((nominal / 2..=nominal).contains(w), "{waits:?}");
    }
    // A stale ack (an earlier boot) changes nothing; ours registers.
    h.send_me(&accepted(BOOT + 1, 10_000, &[]));
    assert_eq!(h.agent.link(), LinkState::Registering);
    assert!(h.out.events.contains(&AgentEvent::Ignored { reason: "stale_ack" }));
    h.send_me(&accepted(BOOT, 10_000, &[]));
    assert_eq!(h.agent.link(), LinkState::Registered);
    // No more registrations, only heartbeats.
    let wake = h.wake();
    h.tick_at(wake);
    assert!(matches!(h.sent()[..], [Message::Heartbeat(_)]));
}

#[test]
fn rejected_registration_retries_after_retry_after_with_jitter() {
    let mut h = Harness::new("edge-1", &[]);
    h.input(AgentInput::Connected);
    h.sent();
    let start = h.now;
    let reject = |boot_id| {
        Message::RegisterAck(RegisterAck {
            boot_id,
            outcome: RegisterOutcome::Rejected {
                code: RejectCode::Overloaded,
                message: "shedding load".into(),
                retry_after_ms: 20_000,
            },
            heartbeat_interval_ms: 30_000,
            groups: vec![],
            desired: DesiredDigest::EMPTY,
        })
    };
    // The controller rejects undecodable registrations with boot id 0: that is ours too.
    h.send_me(&reject(0));
    let Some(AgentEvent::RegisterRejected { code, retry_at, .. }) = h.out.events.last().cloned() else {
        panic!("{:?}", h.out.events)
    };
    assert_eq!(code, RejectCode::Overloaded);
    let wait = retry_at.as_millis() - start;
    assert!((20_000..=30_000).contains(&wait), "{wait}");
    h.tick_at(retry_at.as_millis() - 1);
    assert!(h.sent().is_empty());
    h.tick_at(retry_at.as_millis());
    assert!(matches!(h.sent()[..], [Message::Register(_)]));
}

/// What may arrive where: a message that would silence or wipe the whole fleet is refused on the
/// fleet and group topics, a spec only counts on its own spec topic, and a controller cannot make
/// a node wait longer than `max_controller_delay_ms`.
#[test]
fn downlink_kinds_are_bound_to_their_topics_and_controller_delays_are_bounded() {
    let mut h = Harness::new("edge-1", &[("tier", "cdn")]);
    h.input(AgentInput::Connected);
    h.tick_at(h.now);
    h.sent();
    let a = workload("default/a", 1, "tier=cdn");
    h.msg(&spec(&a, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(a.id.clone()));
    assert_eq!(h.version_of("default/a"), Some(1));
    let fleet = Destination::Fleet;
    let group = Destination::Group(GroupName::new("g1").unwrap());
    let empty = Message::DesiredState(DesiredState { digest: DesiredDigest::EMPTY, workloads: vec![] });
    let silence = Message::RegisterAck(RegisterAck {
        boot_id: BOOT,
        outcome: RegisterOutcome::Rejected {
            code: RejectCode::Overloaded,
            message: "go away".into(),
            retry_after_ms: u32::MAX,
        },
        heartbeat_interval_ms: u32::MAX,
        groups: vec![],
        desired: DesiredDigest::EMPTY,
    });
    for to in [&fleet, &group] {
        h.out.events.clear();
        h.msg(&empty, to);
        h.msg(&silence, to);
        h.msg(&spec(&workload("default/b", 1, "tier=cdn"), WorkloadSpec::ALL_WAVES), to);
        assert_eq!(h.out.events, vec![AgentEvent::Ignored { reason: "wrong_topic" }; 3], "{to:?}");
        assert_eq!(h.version_of("default/a"), Some(1), "nothing wiped via {to:?}");
        assert_eq!(h.version_of("default/b"), None);
    }
    // A group's spec on the fleet's spec topic, or on another group's, is not taken.
    let mut g = workload("default/g", 1, "tier=cdn");
    g.delivery = crate::model::DeliveryMode::Group("g1".into());
    h.msg(&spec(&g, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(g.id.clone()));
    h.msg(
        &spec(&g, WorkloadSpec::ALL_WAVES),
        &Destination::GroupWorkloadSpec(GroupName::new("g2").unwrap(), g.id.clone()),
    );
    assert_eq!(h.version_of("default/g"), None);
    h.msg(
        &spec(&g, WorkloadSpec::ALL_WAVES),
        &Destination::GroupWorkloadSpec(GroupName::new("g1").unwrap(), g.id.clone()),
    );
    assert_eq!(h.version_of("default/g"), Some(1));

    // On its own topic the same rejection is obeyed, for at most 15 minutes (plus jitter).
    let start = h.now;
    h.send_me(&silence);
    let Some(AgentEvent::RegisterRejected { retry_at, .. }) = h.out.events.last().cloned() else {
        panic!("{:?}", h.out.events)
    };
    let wait = retry_at.as_millis() - start;
    assert!((900_000..=1_350_000).contains(&wait), "{wait}");
    // An accepted ack cannot stretch the heartbeat interval past it either.
    h.send_me(&accepted(BOOT, u32::MAX, &[]));
    assert_eq!(h.out.events.last(), Some(&AgentEvent::Registered { heartbeat_interval_ms: 900_000 }));
}

#[test]
fn heartbeats_count_up_at_the_acked_interval_and_the_first_is_jittered() {
    let mut h = Harness::new("edge-1", &[]);
    let acked_at = h.now;
    h.register(10_000);
    let first = h.wake();
    assert!((acked_at..acked_at + 10_000).contains(&first), "{first}");
    let mut at = first;
    for expected_seq in 1..=5 {
        h.tick_at(at);
        let [Message::Heartbeat(hb)] = h.sent()[..] else { panic!() };
        assert_eq!((hb.seq, hb.boot_id, hb.health), (expected_seq, BOOT, NodeHealth::OK));
        assert_eq!(hb.applied, DesiredDigest::EMPTY);
        assert_eq!(h.wake(), at + 10_000, "at the acked interval");
        at += 10_000;
    }

    // A fleet that registered at the same moment spreads its first heartbeats over the interval.
    let offsets: std::collections::BTreeSet<u64> = (0..200)
        .map(|i| {
            let mut h = Harness::new(&format!("edge-{i}"), &[]);
            h.register(30_000);
            h.wake() - h.now
        })
        .collect();
    assert!(offsets.len() > 190, "{} distinct offsets", offsets.len());
    assert!(offsets.iter().any(|&o| o < 10_000) && offsets.iter().any(|&o| o > 20_000));
}

#[test]
fn groups_follow_the_ack_and_are_resubscribed_after_reconnect() {
    let mut h = Harness::new("edge-1", &[]);
    h.input(AgentInput::Connected);
    h.send_me(&accepted(BOOT, 10_000, &["region.a", "site.1"]));
    let g = |n: &str| GroupName::new(n).unwrap();
    assert_eq!(h.out.groups, [GroupChange::Subscribe(g("region.a")), GroupChange::Subscribe(g("site.1"))]);
    h.out.clear();
    // A later ack (after Reregister) replaces the set.
    h.send_me(&command(1, CommandKind::Reregister));
    h.send_me(&accepted(BOOT, 10_000, &["region.a", "site.2"]));
    assert_eq!(h.out.groups, [GroupChange::Unsubscribe(g("site.1")), GroupChange::Subscribe(g("site.2"))]);
    h.out.clear();
    // A new connection is a clean session: subscribe again at once, then register.
    h.input(AgentInput::Disconnected);
    h.input(AgentInput::Connected);
    assert_eq!(h.out.groups, [GroupChange::Subscribe(g("region.a")), GroupChange::Subscribe(g("site.2"))]);
    let [Message::Register(reg)] = &h.sent()[..] else { panic!() };
    assert_eq!(reg.boot_id, BOOT, "same boot id after a reconnect");
}

#[test]
fn specs_select_by_selector_and_wave_and_nodes_outside_the_wave_keep_their_version() {
    let v1 = workload("default/app", 1, "tier=cdn");
    let v2 = workload("default/app", 2, "tier=cdn");
    let from = Destination::WorkloadSpec(v1.id.clone());
    let mut inside = 0;
    for i in 0..200 {
        let n = format!("edge-{i}");
        let mut h = Harness::new(&n, &[("tier", "cdn")]);
        h.msg(&spec(&v1, WorkloadSpec::ALL_WAVES), &from);
        assert_eq!(h.version_of("default/app"), Some(1));
        h.msg(&spec(&v2, 3_000), &from);
        let in_wave = wave_point(&n, &v2.id) < 3_000;
        inside += usize::from(in_wave);
        assert_eq!(h.version_of("default/app"), Some(if in_wave { 2 } else { 1 }), "{n}");
        assert_eq!(h.agent.applied(), digest(&[("default/app", if in_wave { 2 } else { 1 })]));
    }
    assert!((30..90).contains(&inside), "{inside} of 200 in a 30% wave");

    // Outside the wave with nothing running: still nothing.
    let n = (0..).map(|i| format!("edge-{i}")).find(|n| wave_point(n, &v2.id) >= 3_000).unwrap();
    let mut h = Harness::new(&n, &[("tier", "cdn")]);
    h.msg(&spec(&v2, 3_000), &from);
    assert_eq!(h.version_of("default/app"), None);
    assert!(h.rt.calls().is_empty());

    // A selector that does not match: never applied, and removed when the selector changes.
    let mut h = Harness::new("edge-1", &[("tier", "retail")]);
    h.msg(&spec(&v1, WorkloadSpec::ALL_WAVES), &from);
    assert_eq!(h.version_of("default/app"), None);
    let mut h = Harness::new("edge-1", &[("tier", "cdn")]);
    h.msg(&spec(&v1, WorkloadSpec::ALL_WAVES), &from);
    h.msg(&spec(&workload("default/app", 3, "tier=retail"), WorkloadSpec::ALL_WAVES), &from);
    assert_eq!(h.version_of("default/app"), None);
    assert_eq!(
        h.rt.calls_for(h.agent.name()),
        [RuntimeOp::Apply { id: v1.id.clone(), version: 1 }, RuntimeOp::Remove { id: v1.id.clone() }]
    );
    // A spec whose topic names another workload is refused.
    h.msg(&spec(&v1, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(wid("default/other")));
    assert_eq!(h.version_of("default/app"), None);
    assert!(h.out.events.contains(&AgentEvent::Ignored { reason: "spec_topic_mismatch" }));
}

#[test]
fn a_repeated_spec_is_applied_once_and_changes_are_persisted() {
    let mut h = Harness::new("edge-1", &[]);
    let w = workload("default/app", 1, "");
    let from = Destination::WorkloadSpec(w.id.clone());
    h.msg(&spec(&w, WorkloadSpec::ALL_WAVES), &from);
    let persisted = h.out.persist.take().expect("a change is persisted");
    assert_eq!(persisted.applied, digest(&[("default/app", 1)]));
    assert_eq!(persisted.workloads.len(), 1);
    // Retained replay of the same version: nothing to do.
    h.msg(&spec(&w, WorkloadSpec::ALL_WAVES), &from);
    assert!(h.out.persist.is_none());
    assert_eq!(h.rt.calls().len(), 1);
}

#[test]
fn a_recreated_workload_with_other_content_at_the_same_version_is_applied() {
    // Deleted and created again under the same name: the version starts over at 1.
    let mut h = Harness::new("edge-1", &[]);
    let old = workload("default/app", 1, "");
    let mut new = old.clone();
    new.spec = b"run something else".to_vec();
    let from = Destination::WorkloadSpec(old.id.clone());
    h.msg(&spec(&old, WorkloadSpec::ALL_WAVES), &from);
    h.out.clear();
    h.msg(&spec(&new, WorkloadSpec::ALL_WAVES), &from);
    assert_eq!(h.rt.calls().len(), 2, "the new content reaches the runtime: {:?}", h.rt.calls());
    assert_eq!(h.agent.applied(), DesiredDigest::of_workloads([&new]));
    // The same through a catch-up.
    h.send_me(&Message::DesiredState(DesiredState {
        digest: DesiredDigest::of_workloads([&old]),
        workloads: vec![old.clone()],
    }));
    assert_eq!(h.agent.applied(), DesiredDigest::of_workloads([&old]));
}

#[test]
fn a_failed_workload_is_reported_with_its_runtimes_reason_cut_to_size() {
    let mut h = Harness::new("edge-1", &[]);
    h.register(10_000);
    let a = workload("default/a", 1, "");
    let b = workload("default/b", 1, "");
    h.rt.fail_with(b.id.clone(), 1, format!("exec /nonexistent: No such file or directory {}", "x".repeat(400)));
    h.msg(&spec(&a, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(a.id.clone()));
    h.msg(&spec(&b, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(b.id.clone()));
    let reports: Vec<StatusReport> =
        h.sent().into_iter().filter_map(|m| if let Message::StatusReport(r) = m { Some(r) } else { None }).collect();
    let last = reports.last().expect("a status report");
    assert_eq!(last.workloads[1].phase, WorkloadPhase::Failed);
    assert_eq!(last.reasons.len(), 1);
    assert_eq!(last.reasons[0].index, 1);
    assert!(last.reasons[0].reason.starts_with("exec /nonexistent: No such file or directory"));
    assert_eq!(last.reasons[0].reason.len(), protocol::MAX_REASON_BYTES);
}

#[test]
fn desired_state_replaces_the_set_exactly() {
    let mut h = Harness::new("edge-1", &[("tier", "cdn")]);
    let from = Destination::Fleet;
    let a1 = workload("default/a", 1, "tier=cdn");
    let b1 = workload("default/b", 1, "tier=cdn");
    let c1 = workload("default/c", 1, "tier=nope");
    h.msg(&spec(&a1, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(a1.id.clone()));
    h.msg(&spec(&b1, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(b1.id.clone()));
    let _ = from;
    h.rt.take_calls();
    // Authoritative: b goes, a moves to v2, c comes although its selector does not match.
    let a2 = workload("default/a", 2, "tier=cdn");
    let ds = Message::DesiredState(DesiredState {
        digest: digest(&[("default/a", 2), ("default/c", 1)]),
        workloads: vec![c1.clone(), a2.clone()],
    });
    h.send_me(&ds);
    let versions: Vec<(String, u64)> = h.agent.workloads().map(|(w, _)| (w.id.to_string(), w.version)).collect();
    assert_eq!(versions, [("default/a".to_owned(), 2), ("default/c".to_owned(), 1)]);
    assert_eq!(h.agent.applied(), digest(&[("default/a", 2), ("default/c", 1)]));
    let calls = h.rt.calls_for(h.agent.name());
    assert!(calls.contains(&RuntimeOp::Remove { id: b1.id.clone() }));
    assert!(calls.contains(&RuntimeOp::Apply { id: a2.id.clone(), version: 2 }));
    assert!(calls.contains(&RuntimeOp::Apply { id: c1.id.clone(), version: 1 }));
    assert_eq!(calls.len(), 3);
    // The same desired state again changes nothing; an empty one removes everything.
    h.rt.take_calls();
    h.send_me(&ds);
    assert!(h.rt.calls().is_empty());
    h.send_me(&Message::DesiredState(DesiredState { digest: DesiredDigest::EMPTY, workloads: vec![] }));
    assert_eq!(h.agent.workloads().count(), 0);
    assert_eq!(h.agent.applied(), DesiredDigest::EMPTY);
}

#[test]
fn workload_removed_and_an_empty_retained_spec_remove_the_workload() {
    let mut h = Harness::new("edge-1", &[]);
    let a = workload("default/a", 1, "");
    let mut b = workload("b", 1, "");
    b.delivery = crate::model::DeliveryMode::Group("region.x".into());
    let g = GroupName::new("region.x").unwrap();
    h.msg(&spec(&a, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(a.id.clone()));
    h.msg(&spec(&b, WorkloadSpec::ALL_WAVES), &Destination::GroupWorkloadSpec(g.clone(), b.id.clone()));
    assert_eq!(h.agent.workloads().count(), 2);

    h.msg(&Message::WorkloadRemoved(WorkloadRemoved { id: a.id.clone() }), &Destination::Fleet);
    assert_eq!(h.version_of("default/a"), None);
    assert!(h.out.persist.take().is_some());

    let deleted =
        NodeDelivery { from: Destination::GroupWorkloadSpec(g, b.id.clone()), payload: Bytes::new(), retained: false };
    h.input(AgentInput::Delivery(&deleted));
    assert_eq!(h.agent.workloads().count(), 0);
    assert_eq!(h.agent.applied(), DesiredDigest::EMPTY);
    assert_eq!(h.out.persist.take().map(|p| p.workloads.len()), Some(0));

    // An empty payload anywhere else is not a deletion; garbage is ignored, not fatal.
    for payload in [Vec::new(), vec![1, 0x82, 0xff]] {
        let d = NodeDelivery { from: Destination::Fleet, payload: Bytes::from(payload), retained: false };
        h.input(AgentInput::Delivery(&d));
    }
    assert!(matches!(
        h.out.events[h.out.events.len() - 2..],
        [AgentEvent::Ignored { reason: "empty_payload" }, AgentEvent::Ignored { .. }]
    ));
}

#[test]
fn runtime_state_changes_send_a_status_report_that_counts_as_a_heartbeat() {
    let config = AgentConfig { runtime_poll_ms: 0, ..AgentConfig::default() };
    let mut h = Harness::with(config, "edge-1", &[], None);
    h.register(10_000);
    let w = workload("default/a", 1, "");
    h.msg(&spec(&w, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(w.id.clone()));
    // Applying is a state change: reported at once.
    let [Message::StatusReport(r)] = &h.sent()[..] else { panic!() };
    assert_eq!(r.seq, 1);
    assert_eq!(r.applied, digest(&[("default/a", 1)]));
    assert_eq!((r.workloads[0].version, r.workloads[0].phase), (1, WorkloadPhase::Running));
    assert_eq!(h.wake(), h.now + 10_000, "the report counts as a heartbeat");

    // The runtime reports a crash: the next poll sends a report with the next seq.
    h.rt.push_phase(&name("edge-1"), w.id.clone(), WorkloadPhase::Failed);
    h.tick_at(h.now + 1_000);
    let [Message::StatusReport(r)] = &h.sent()[..] else { panic!() };
    assert_eq!((r.seq, r.workloads[0].phase), (2, WorkloadPhase::Failed));
    // The failure shows in health, not in the digest.
    h.tick_at(h.wake());
    let [Message::Heartbeat(hb)] = h.sent()[..] else { panic!() };
    assert_eq!(hb.seq, 3);
    assert!(hb.health.contains(NodeHealth::WORKLOAD_FAILED));
    assert_eq!(hb.applied, digest(&[("default/a", 1)]));
    // An unchanged phase reports nothing.
    h.rt.push_phase(&name("edge-1"), w.id.clone(), WorkloadPhase::Failed);
    h.tick_at(h.now + 1_000);
    assert!(h.sent().is_empty());
}

#[test]
fn the_first_poll_comes_one_interval_after_the_first_apply() {
    let config = AgentConfig { runtime_poll_ms: 1_000, ..AgentConfig::default() };
    let mut h = Harness::with(config, "edge-1", &[], None);
    h.register(10_000);
    // Idle for a while: no polls while there is nothing to run.
    h.tick_at(h.wake());
    h.sent();
    h.now += 4_000;
    let w = workload("default/a", 1, "");
    h.msg(&spec(&w, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(w.id.clone()));
    assert!(matches!(h.sent()[..], [Message::StatusReport(_)]));
    // The apply told the phase: the first poll is one interval later, not at once.
    assert_eq!(h.wake(), h.now + 1_000);
    // And it still finds what the runtime reports.
    h.rt.push_phase(&name("edge-1"), w.id.clone(), WorkloadPhase::Failed);
    h.tick_at(h.now + 1_000);
    let [Message::StatusReport(r)] = &h.sent()[..] else { panic!() };
    assert_eq!(r.workloads[0].phase, WorkloadPhase::Failed);
    assert_eq!(h.wake(), h.now + 1_000, "polled every interval while it runs something");
}

#[test]
fn commands_reregister_resync_restart_and_ping() {
    let mut h = Harness::new("edge-1", &[]);
    h.register(10_000);
    h.tick_at(h.wake());
    assert!(matches!(h.sent()[..], [Message::Heartbeat(_)]));

    // Reregister: a fresh registration of the same boot, heartbeats wait for the ack.
    h.send_me(&command(7, CommandKind::Reregister));
    let [Message::Register(reg)] = &h.sent()[..] else { panic!() };
    assert_eq!(reg.boot_id, BOOT);
    assert_eq!(h.agent.link(), LinkState::Registering);
    h.tick_at(h.now + 500);
    assert!(h.sent().is_empty());
    h.send_me(&accepted(BOOT, 10_000, &[]));
    h.tick_at(h.wake());
    let [Message::Heartbeat(hb)] = h.sent()[..] else { panic!() };
    assert_eq!(hb.seq, 2, "the sequence continues within a boot");

    // Ping answers with a heartbeat now; Resync with a status report.
    h.send_me(&command(8, CommandKind::Ping));
    assert!(matches!(h.sent()[..], [Message::Heartbeat(Heartbeat { seq: 3, .. })]));
    h.send_me(&command(9, CommandKind::Resync));
    assert!(matches!(h.sent()[..], [Message::StatusReport(StatusReport { seq: 4, .. })]));

    // RestartWorkload goes to the runtime once per command id.
    let w = workload("default/a", 1, "");
    h.msg(&spec(&w, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(w.id.clone()));
    h.rt.take_calls();
    let restart = command(10, CommandKind::RestartWorkload(w.id.clone()));
    h.send_me(&restart);
    h.send_me(&restart);
    assert_eq!(h.rt.calls_for(h.agent.name()), [RuntimeOp::Restart { id: w.id.clone() }]);
}

#[test]
fn disconnected_agent_keeps_its_workloads_and_reregisters_on_reconnect() {
    let mut h = Harness::new("edge-1", &[]);
    h.register(10_000);
    let w = workload("default/a", 1, "");
    h.msg(&spec(&w, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(w.id.clone()));
    h.out.clear();
    h.rt.take_calls();
    h.input(AgentInput::Disconnected);
    assert_eq!(h.agent.link(), LinkState::Disconnected);
    // Time passes: no uplink, the runtime is still polled, nothing is removed.
    for _ in 0..10 {
        h.tick_at(h.now + 5_000);
    }
    assert!(h.out.publish.is_empty());
    assert!(h.rt.calls().is_empty());
    assert_eq!(h.version_of("default/a"), Some(1));
    // Reconnect: the registration carries what runs.
    h.input(AgentInput::Connected);
    let [Message::Register(reg)] = &h.sent()[..] else { panic!() };
    assert_eq!((reg.boot_id, reg.applied), (BOOT, digest(&[("default/a", 1)])));
    assert_eq!(reg.workloads.len(), 1);
}

#[test]
fn autonomy_an_agent_restarted_while_disconnected_runs_its_last_desired_state() {
    let store = MemoryAgentStore::new();
    let w = workload("default/a", 4, "");
    {
        let mut h = Harness::new("edge-1", &[]);
        h.register(10_000);
        h.msg(&spec(&w, WorkloadSpec::ALL_WAVES), &Destination::WorkloadSpec(w.id.clone()));
        store.save(&h.out.persist.take().unwrap()).unwrap();
        // The agent dies here.
    }
    // A new boot, never connected: the first input re-applies the persisted state.
    let (persisted, err) = load_or_empty(&store);
    assert!(err.is_none());
    let mut h = Harness::with(AgentConfig::default(), "edge-1", &[], persisted);
    h.tick_at(h.now);
    assert_eq!(h.rt.calls_for(h.agent.name()), [RuntimeOp::Apply { id: w.id.clone(), version: 4 }]);
    assert_eq!(h.agent.applied(), digest(&[("default/a", 4)]));
    assert!(h.out.publish.is_empty(), "no cloud contact");
    // Once connected, the registration reports it running.
    h.input(AgentInput::Connected);
    let [Message::Register(reg)] = &h.sent()[..] else { panic!() };
    assert_eq!(reg.applied, digest(&[("default/a", 4)]));
    assert_eq!(reg.workloads[0].phase, WorkloadPhase::Running);

    // The same through the file store, across a "process restart".
    let dir = std::env::temp_dir().join(format!("kole-agent-autonomy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = FileAgentStore::new(dir.join("state"));
    file.save(&h.agent.persisted_state()).unwrap();
    let (persisted, _) = load_or_empty(&file);
    let mut again = Harness::with(AgentConfig::default(), "edge-1", &[], persisted);
    again.input(AgentInput::Tick);
    assert_eq!(again.version_of("default/a"), Some(4));
    std::fs::write(file.path(), b"garbage").unwrap();
    let (persisted, err) = load_or_empty(&file);
    assert!(persisted.is_none() && matches!(err, Some(StoreError::Corrupt { .. })));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shared_specs_share_the_workload() {
    let w = Arc::new(workload("default/a", 1, ""));
    let from = Destination::WorkloadSpec(w.id.clone());
    let mut h = Harness::new("edge-1", &[]);
    h.input(AgentInput::SharedSpec { workload: &w, wave_threshold: WorkloadSpec::ALL_WAVES, from: &from });
    let (held, _) = h.agent.workloads().next().unwrap();
    assert!(Arc::ptr_eq(held, &w));
}

/// The agent must stay small: a simulator holds a million of them.
#[test]
fn agent_is_small() {
    let size = std::mem::size_of::<Agent>();
    // A reference node: 5 labels, 3 workloads, one group; labels, info and workloads shared.
    let labels: &[(&str, &str)] = &[
        ("topology.kubernetes.io/region", "cn-hangzhou"),
        ("topology.kubernetes.io/zone", "cn-hangzhou-b"),
        ("tier", "cdn"),
        ("kole.io/site", "s0042"),
        ("kubernetes.io/arch", "arm64"),
    ];
    let mut h = Harness::new("cn-hangzhou-s0042-7k2m9q4x", labels);
    h.input(AgentInput::Connected);
    h.send_me(&accepted(BOOT, 30_000, &["region.cn-hangzhou"]));
    let shared: Vec<Arc<Workload>> = ["default/cdn-cache", "default/log-shipper", "kube-system/node-exporter"]
        .iter()
        .map(|id| Arc::new(workload(id, 3, "")))
        .collect();
    for w in &shared {
        let from = Destination::WorkloadSpec(w.id.clone());
        h.input(AgentInput::SharedSpec { workload: w, wave_threshold: WorkloadSpec::ALL_WAVES, from: &from });
    }
    assert_eq!(h.agent.workloads().count(), 3);
    let heap = h.agent.heap_bytes();
    println!("size_of::<Agent>() = {size} bytes, heap = {heap} bytes, total = {}", size + heap);
    assert!(size <= 192, "size_of::<Agent>() = {size}");
    assert!(size + heap <= 300, "{size} + {heap}");
}

mod random_inputs {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Ev {
        Connected,
        Disconnected,
        Tick(u32),
        Ack { accept: bool, own_boot: bool, interval: u32, groups: Vec<u8> },
        Spec { id: usize, version: u64, threshold: u16, selector: usize, group_topic: bool },
        DeletedSpec(usize),
        Removed(usize),
        Desired(Vec<(usize, u64)>),
        Command(u64, u8, usize),
        Phase(usize, u8),
        Garbage(Vec<u8>),
    }

    const IDS: [&str; 3] = ["a", "b", "ns/c"];
    const SELECTORS: [&str; 3] = ["", "tier=cdn", "tier=retail"];

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            1 => Just(Ev::Connected),
            1 => Just(Ev::Disconnected),
            4 => (0u32..40_000).prop_map(Ev::Tick),
            2 => (any::<bool>(), any::<bool>(), 0u32..20_000, proptest::collection::vec(0u8..4, 0..3))
                .prop_map(|(accept, own_boot, interval, groups)| Ev::Ack { accept, own_boot, interval, groups }),
            4 => (0usize..3, 1u64..4, 0u16..=10_000, 0usize..3, any::<bool>())
                .prop_map(|(id, version, threshold, selector, group_topic)| Ev::Spec { id, version, threshold, selector, group_topic }),
            1 => (0usize..3).prop_map(Ev::DeletedSpec),
            1 => (0usize..3).prop_map(Ev::Removed),
            2 => proptest::collection::vec((0usize..3, 1u64..4), 0..4).prop_map(Ev::Desired),
            2 => (0u64..4, 0u8..4, 0usize..3).prop_map(|(id, k, w)| Ev::Command(id, k, w)),
            2 => (0usize..3, 0u8..4).prop_map(|(w, p)| Ev::Phase(w, p)),
            1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Ev::Garbage),
        ]
    }

    fn wl(id: usize, version: u64, selector: usize) -> Workload {
        workload(IDS[id], version, SELECTORS[selector])
    }

    proptest! {
        /// Whatever arrives in whatever order: no panic, the digest always matches the desired set,
        /// sequence numbers strictly increase, and nothing is published while disconnected.
        #[test]
        fn agent_invariants_hold_under_random_inputs(events in proptest::collection::vec(ev(), 1..60)) {
            let mut h = Harness::new("edge-1", &[("tier", "cdn")]);
            let mut last_seq = 0u32;
            for e in events {
                let before = h.agent.link();
                match e {
                    Ev::Connected => h.input(AgentInput::Connected),
                    Ev::Disconnected => h.input(AgentInput::Disconnected),
                    Ev::Tick(dt) => h.tick_at(h.now + u64::from(dt)),
                    Ev::Ack { accept, own_boot, interval, groups } => {
                        let outcome = if accept {
                            RegisterOutcome::Accepted
                        } else {
                            RegisterOutcome::Rejected { code: RejectCode::Overloaded, message: String::new(), retry_after_ms: interval }
                        };
                        let ack = Message::RegisterAck(RegisterAck {
                            boot_id: if own_boot { BOOT } else { 3 },
                            outcome,
                            heartbeat_interval_ms: interval,
                            groups: groups.iter().map(|g| GroupName::new(format!("g{g}")).unwrap()).collect(),
                            desired: DesiredDigest::EMPTY,
                        });
                        h.send_me(&ack);
                    }
                    Ev::Spec { id, version, threshold, selector, group_topic } => {
                        let mut w = wl(id, version, selector);
                        if group_topic {
                            w.delivery = crate::model::DeliveryMode::Group("g1".into());
                        }
                        let from = if group_topic {
                            Destination::GroupWorkloadSpec(GroupName::new("g1").unwrap(), w.id.clone())
                        } else {
                            Destination::WorkloadSpec(w.id.clone())
                        };
                        h.msg(&spec(&w, threshold), &from);
                    }
                    Ev::DeletedSpec(id) => {
                        let d = NodeDelivery { from: Destination::WorkloadSpec(wid(IDS[id])), payload: Bytes::new(), retained: true };
                        h.input(AgentInput::Delivery(&d));
                    }
                    Ev::Removed(id) => h.msg(&Message::WorkloadRemoved(WorkloadRemoved { id: wid(IDS[id]) }), &Destination::Fleet),
                    Ev::Desired(items) => {
                        let workloads = items.into_iter().map(|(id, v)| wl(id, v, 0)).collect();
                        h.send_me(&Message::DesiredState(DesiredState { digest: DesiredDigest::EMPTY, workloads }));
                    }
                    Ev::Command(id, kind, w) => {
                        let kind = match kind {
                            0 => CommandKind::Reregister,
                            1 => CommandKind::Resync,
                            2 => CommandKind::RestartWorkload(wid(IDS[w])),
                            _ => CommandKind::Ping,
                        };
                        h.send_me(&command(id, kind));
                    }
                    Ev::Phase(w, p) => {
                        h.rt.push_phase(&name("edge-1"), wid(IDS[w]), WorkloadPhase::ALL[usize::from(p)]);
                    }
                    Ev::Garbage(bytes) => {
                        let d = NodeDelivery { from: Destination::Fleet, payload: Bytes::from(bytes), retained: false };
                        h.input(AgentInput::Delivery(&d));
                    }
                }
                let link = h.agent.link();
                let sent = h.sent();
                if before == LinkState::Disconnected && link == LinkState::Disconnected {
                    prop_assert!(sent.is_empty(), "published while disconnected: {sent:?}");
                }
                for m in sent {
                    let seq = match m {
                        Message::Heartbeat(hb) => Some(hb.seq),
                        Message::StatusReport(r) => Some(r.seq),
                        _ => None,
                    };
                    if let Some(seq) = seq {
                        prop_assert!(seq > last_seq, "seq {seq} after {last_seq}");
                        last_seq = seq;
                    }
                }
                h.out.clear();
                let pairs: Vec<(String, u64, Vec<u8>)> =
                    h.agent.workloads().map(|(w, _)| (w.id.to_string(), w.version, w.spec.clone())).collect();
                prop_assert!(pairs.windows(2).all(|p| p[0].0 < p[1].0), "sorted, unique: {pairs:?}");
                prop_assert_eq!(
                    h.agent.applied(),
                    DesiredDigest::of(pairs.iter().map(|(i, v, s)| (i.as_str(), *v, s.as_slice())))
                );
                if link != LinkState::Disconnected {
                    prop_assert!(h.agent.next_wake().is_some());
                }
            }
        }
    }
}

/// An agent that pins the controller's key takes only signed deliveries, and never an older
/// statement than one it accepted about the same workload: no replayed rollback, no replayed
/// removal, not even after a restart.
#[test]
fn a_signed_downlink_agent_refuses_unsigned_forged_and_replayed_messages() {
    use crate::protocol::seal::{DownlinkSigner, TrustedKeys};
    let controller = DownlinkSigner::from_seed([7; 32]);
    let mut trust = TrustedKeys::new();
    trust.trust_text(&controller.public_text()).unwrap();
    let config = AgentConfig { trust: Some(Arc::new(trust)), ..AgentConfig::default() };
    let mut h = Harness::with(config.clone(), "edge-1", &[("tier", "cdn")], None);
    let a1 = workload("default/a", 1, "tier=cdn");
    let a2 = workload("default/a", 2, "tier=cdn");
    let topic = Destination::WorkloadSpec(a1.id.clone());
    let deliver = |h: &mut Harness, from: &Destination, payload: Vec<u8>| {
        h.out.events.clear();
        let d = NodeDelivery { from: from.clone(), payload: Bytes::from(payload), retained: false };
        h.input(AgentInput::Delivery(&d));
        h.out.events.iter().find_map(|e| match e {
            AgentEvent::Refused { reason, .. } | AgentEvent::Ignored { reason } => Some(*reason),
            _ => None,
        })
    };
    let sealed = |m: &Message, to: &Destination, at: u64| controller.seal(m, to, at);

    assert_eq!(deliver(&mut h, &topic, protocol::encode(&spec(&a1, WorkloadSpec::ALL_WAVES))), Some("unsigned"));
    assert_eq!(h.version_of("default/a"), None);
    let forger = DownlinkSigner::from_seed([8; 32]);
    assert_eq!(
        deliver(&mut h, &topic, forger.seal(&spec(&a1, WorkloadSpec::ALL_WAVES), &topic, 100)),
        Some("unknown_key")
    );
    // Signed for the fleet topic, delivered on the spec topic.
    assert_eq!(
        deliver(&mut h, &topic, sealed(&spec(&a1, WorkloadSpec::ALL_WAVES), &Destination::Fleet, 100)),
        Some("bad_signature")
    );

    let v1_at_100 = sealed(&spec(&a1, WorkloadSpec::ALL_WAVES), &topic, 100);
    assert_eq!(deliver(&mut h, &topic, v1_at_100.clone()), None);
    assert_eq!(h.version_of("default/a"), Some(1));
    assert_eq!(deliver(&mut h, &topic, sealed(&spec(&a2, WorkloadSpec::ALL_WAVES), &topic, 200)), None);
    assert_eq!(h.version_of("default/a"), Some(2));
    // Replaying the old spec cannot roll the node back...
    assert_eq!(deliver(&mut h, &topic, v1_at_100), Some("replayed"));
    assert_eq!(h.version_of("default/a"), Some(2));
    // ...but a rollback the controller signs now does.
    assert_eq!(deliver(&mut h, &topic, sealed(&spec(&a1, WorkloadSpec::ALL_WAVES), &topic, 300)), None);
    assert_eq!(h.version_of("default/a"), Some(1));

    // An old (or forged-by-replay) empty desired set cannot drop it; neither can a cleared spec.
    let me = h.me();
    let empty = Message::DesiredState(DesiredState { digest: DesiredDigest::EMPTY, workloads: vec![] });
    assert_eq!(deliver(&mut h, &me, sealed(&empty, &me, 250)), Some("replayed"));
    assert_eq!(deliver(&mut h, &topic, Vec::new()), Some("unsigned_removal"));
    assert_eq!(h.version_of("default/a"), Some(1));
    let persisted = h.agent.persisted_state();
    assert_eq!(persisted.marks, vec![(a1.id.clone(), 300)]);

    // After a restart from the persisted state the marks hold: the replay is still refused.
    let mut h = Harness::with(config, "edge-1", &[("tier", "cdn")], Some(persisted));
    assert_eq!(deliver(&mut h, &topic, sealed(&spec(&a2, WorkloadSpec::ALL_WAVES), &topic, 200)), Some("replayed"));
    // A removal the controller signs now goes through.
    let removed = Message::WorkloadRemoved(WorkloadRemoved { id: a1.id.clone() });
    assert_eq!(deliver(&mut h, &Destination::Fleet, sealed(&removed, &Destination::Fleet, 400)), None);
    assert_eq!(h.version_of("default/a"), None);

    // The refusal is reported to the controller in the next heartbeat, once.
    h.input(AgentInput::Connected);
    h.tick_at(h.now);
    h.sent();
    let ack = sealed(&accepted(BOOT, 1_000, &[]), &me, 500);
    assert_eq!(deliver(&mut h, &me, ack), None);
    let beats = |h: &mut Harness| -> Vec<NodeHealth> {
        h.sent()
            .into_iter()
            .filter_map(|m| if let Message::Heartbeat(hb) = m { Some(hb.health) } else { None })
            .collect()
    };
    // The first heartbeat carries the replay refused above; the next one is clean again.
    let flagged = |h: &mut Harness| {
        let wake = h.wake();
        h.tick_at(wake);
        beats(h).last().map(|b| b.contains(NodeHealth::DOWNLINK_REFUSED))
    };
    assert_eq!(flagged(&mut h), Some(true));
    assert_eq!(flagged(&mut h), Some(false));
    assert_eq!(deliver(&mut h, &topic, v1_at_100_again(&controller, &topic, &a1)), Some("replayed"));
    assert_eq!(flagged(&mut h), Some(true));
    assert_eq!(flagged(&mut h), Some(false));
}

fn v1_at_100_again(s: &crate::protocol::seal::DownlinkSigner, topic: &Destination, w: &Workload) -> Vec<u8> {
    s.seal(&spec(w, WorkloadSpec::ALL_WAVES), topic, 100)
}
