//! Engine tests: one state machine, messages built by hand, time passed in.

use proptest::prelude::*;

use super::*;
use crate::cache::StateCache;
use crate::model::{
    DeliveryMode, LabelSelector, Labels, NodeInfo, RolloutStrategy, Selector, WorkloadPhase, WorkloadState,
};
use crate::protocol::{
    CommandKind, GroupName, Heartbeat, NodeHealth, Register, RegisterAck, RegisterOutcome, RejectCode, StatusReport,
    UplinkKind,
};

const T0: u64 = 1_790_000_000_000;

fn t(s: u64) -> Timestamp {
    Timestamp::from_millis(T0 + s * 1000)
}

fn name(n: &str) -> NodeName {
    NodeName::new(n).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::from_pairs(pairs.iter().copied()).unwrap()
}

fn register(node: &str, l: &Labels, boot: u32, applied: DesiredDigest) -> Inbound {
    let msg = Message::Register(Register {
        name: name(node),
        boot_id: boot,
        labels: l.clone(),
        info: NodeInfo {
            arch: "arm64".into(),
            os: "linux-6.1".into(),
            agent_version: "1.5.1".into(),
            addresses: vec![],
        },
        applied,
        workloads: vec![],
    });
    Inbound { node: name(node), kind: UplinkKind::Register, payload: protocol::encode(&msg).into() }
}

fn heartbeat(node: &str, seq: u32, boot: u32, applied: DesiredDigest) -> Inbound {
    let msg = Message::Heartbeat(Heartbeat { seq, boot_id: boot, applied, health: NodeHealth::OK });
    Inbound { node: name(node), kind: UplinkKind::Heartbeat, payload: protocol::encode(&msg).into() }
}

fn status(node: &str, seq: u32, boot: u32, applied: DesiredDigest, states: &[(&Workload, WorkloadPhase)]) -> Inbound {
    let msg = Message::StatusReport(StatusReport {
        seq,
        boot_id: boot,
        applied,
        workloads: states
            .iter()
            .map(|(w, p)| WorkloadState { workload: w.id.clone(), version: w.version, phase: *p })
            .collect(),
        reasons: vec![],
    });
    Inbound { node: name(node), kind: UplinkKind::Status, payload: protocol::encode(&msg).into() }
}

fn workload(id: &str, version: u64, selector: &str, waves: &[u8]) -> Workload {
    Workload {
        id: WorkloadId::new(id).unwrap(),
        version,
        spec: format!("image: {id}:{version}").into_bytes(),
        selector: Selector::parse(selector).unwrap(),
        delivery: DeliveryMode::Broadcast,
        rollout: RolloutStrategy { waves: waves.to_vec(), ..Default::default() },
    }
}

fn decode_all(out: &Outputs) -> Vec<(Destination, Message)> {
    out.messages
        .iter()
        .filter(|m| !m.payload.is_empty())
        .map(|m| (m.to.clone(), protocol::decode_downlink(&m.payload, &DecodeLimits::default()).unwrap()))
        .collect()
}

fn apply(engine: &mut Engine, w: &Workload, now: Timestamp) -> Outputs {
    let mut out = Outputs::default();
    engine.handle(Input::Workload(&WorkloadCommand::Apply { workload: w.clone(), progress: None }), now, &mut out);
    out
}

fn uplink(engine: &mut Engine, batch: &[Inbound], now: Timestamp) -> Outputs {
    let mut out = Outputs::default();
    engine.handle(Input::Uplink(batch), now, &mut out);
    out
}

fn digest_of(ws: &[&Workload]) -> DesiredDigest {
    DesiredDigest::of_workloads(ws.iter().copied())
}

#[test]
fn registration_is_acknowledged_at_once_with_interval_groups_and_digest() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let w = workload("default/cdn", 3, "tier=cdn", &[100]);
    apply(&mut e, &w, t(0));
    let l = labels(&[("tier", "cdn"), ("topology.kubernetes.io/region", "cn-hangzhou")]);
    let out = uplink(&mut e, &[register("n1", &l, 7, DesiredDigest::EMPTY)], t(1));
    let msgs = decode_all(&out);
    let (to, Message::RegisterAck(ack)) = &msgs[0] else { panic!("expected an ack, got {msgs:?}") };
    assert_eq!(*to, Destination::Node(name("n1")));
    assert_eq!(ack.outcome, RegisterOutcome::Accepted);
    assert_eq!(ack.boot_id, 7);
    assert_eq!(ack.heartbeat_interval_ms, 30_000);
    assert_eq!(ack.groups, vec![GroupName::new("region.cn-hangzhou").unwrap()]);
    assert_eq!(ack.desired, digest_of(&[&w]));
    assert_eq!(e.stats().registered_new, 1);
    // Broadcast delivery: no per-node spec message goes with the ack.
    assert_eq!(msgs.len(), 1);
}

#[test]
fn bad_input_is_counted_and_changes_nothing() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(&mut e, &[register("n1", &l, 7, DesiredDigest::EMPTY)], t(1));
    let before = e.store().read().get("n1");

    // Identity mismatch: n2's credentials, a registration claiming n1.
    let mut spoof = register("n1", &labels(&[("tier", "evil")]), 9, DesiredDigest::EMPTY);
    spoof.node = name("n2");
    // Garbage, oversize, a downlink kind on an uplink topic, a heartbeat on the register topic.
    let garbage =
        Inbound { node: name("n1"), kind: UplinkKind::Heartbeat, payload: vec![1, 2, 0xff, 0xff, 0xff].into() };
    let oversize = Inbound { node: name("n1"), kind: UplinkKind::Register, payload: vec![1; 1 << 20].into() };
    let mut wrong_topic = heartbeat("n1", 5, 7, DesiredDigest::EMPTY);
    wrong_topic.kind = UplinkKind::Register;
    let empty = Inbound { node: name("n1"), kind: UplinkKind::Heartbeat, payload: vec![].into() };
    let out = uplink(&mut e, &[spoof, garbage, oversize, wrong_topic, empty], t(2));

    assert_eq!(e.stats().decode_errors, 5);
    assert_eq!(e.stats().identity_mismatch, 1);
    assert_eq!(out.rejects.len(), 5);
    assert!(out.rejects.iter().any(|r| r.reason == "identity_mismatch"));
    assert_eq!(e.store().read().len(), 1);
    assert_eq!(e.store().read().get("n1"), before);
    assert!(e.store().read().get("n2").is_none());
    // The spoofer is told it was refused, on its own topic only.
    let msgs = decode_all(&out);
    assert_eq!(msgs.len(), 1);
    assert!(matches!(&msgs[0], (Destination::Node(n), Message::RegisterAck(a))
        if n.as_str() == "n2" && matches!(a.outcome, RegisterOutcome::Rejected { code: RejectCode::IdentityMismatch, .. })));
}

#[test]
fn unknown_and_foreign_boot_heartbeats_ask_to_reregister_and_stale_ones_are_dropped() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(&mut e, &[register("n1", &l, 7, DesiredDigest::EMPTY)], t(1));
    let out = uplink(
        &mut e,
        &[
            heartbeat("ghost", 1, 1, DesiredDigest::EMPTY),
            heartbeat("n1", 1, 8, DesiredDigest::EMPTY),
            heartbeat("n1", 2, 7, DesiredDigest::EMPTY),
            heartbeat("n1", 2, 7, DesiredDigest::EMPTY),
            heartbeat("n1", 1, 7, DesiredDigest::EMPTY),
        ],
        t(2),
    );
    let s = e.stats();
    assert_eq!((s.unknown_node, s.boot_mismatch, s.heartbeats, s.stale), (1, 1, 1, 2));
    let cmds: Vec<_> = decode_all(&out)
        .into_iter()
        .filter_map(|(to, m)| match m {
            Message::Command(c) => Some((to, c.kind)),
            _ => None,
        })
        .collect();
    assert_eq!(
        cmds,
        vec![
            (Destination::Node(name("ghost")), CommandKind::Reregister),
            (Destination::Node(name("n1")), CommandKind::Reregister)
        ]
    );
}

#[test]
fn catchup_only_for_mismatch_and_only_after_the_grace_period() {
    let cfg = EngineConfig { convergence_grace_ms: 60_000, ..Default::default() };
    let mut e = Engine::new(cfg, NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(&mut e, &[register("ok", &l, 1, DesiredDigest::EMPTY), register("late", &l, 2, DesiredDigest::EMPTY)], t(1));
    let w = workload("default/cdn", 1, "tier=cdn", &[100]);
    let out = apply(&mut e, &w, t(10));
    assert_eq!(decode_all(&out).len(), 1, "one broadcast, not one message per node");
    let want = digest_of(&[&w]);

    // Within the grace period nobody gets a per-node message. ("ok" reports its change, as an agent
    // does before it heartbeats the new digest; a heartbeat alone would draw a resync command.)
    let ok = status("ok", 1, 1, want, &[(&w, WorkloadPhase::Running)]);
    let out = uplink(&mut e, &[ok, heartbeat("late", 1, 2, DesiredDigest::EMPTY)], t(30));
    assert!(out.messages.is_empty());
    // After it, only the node that is still wrong gets its desired state, once per grace period.
    let out = uplink(&mut e, &[heartbeat("ok", 2, 1, want), heartbeat("late", 2, 2, DesiredDigest::EMPTY)], t(75));
    let msgs = decode_all(&out);
    assert_eq!(msgs.len(), 1);
    let (Destination::Node(n), Message::DesiredState(d)) = &msgs[0] else { panic!("{msgs:?}") };
    assert_eq!(n.as_str(), "late");
    assert_eq!(d.digest, want);
    assert_eq!(d.workloads, vec![w.clone()]);
    let out = uplink(&mut e, &[heartbeat("late", 3, 2, DesiredDigest::EMPTY)], t(100));
    assert!(out.messages.is_empty(), "rate-limited per node");
    let out = uplink(&mut e, &[heartbeat("late", 4, 2, DesiredDigest::EMPTY)], t(140));
    assert_eq!(decode_all(&out).len(), 1);
    assert_eq!(e.stats().catchups, 2);
}

#[test]
fn a_restarted_engine_does_not_resend_to_converged_nodes() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    let w = workload("default/cdn", 1, "tier=cdn", &[100]);
    apply(&mut e, &w, t(0));
    let want = digest_of(&[&w]);
    let regs: Vec<Inbound> = (0..50).map(|i| register(&format!("n{i}"), &l, i + 1, want)).collect();
    uplink(&mut e, &regs, t(1));
    let progress = e.progress(&w.id).unwrap();
    let saved = e.store().read().clone();

    let mut e2 = Engine::new(EngineConfig::default(), saved, t(500));
    let mut out = Outputs::default();
    e2.handle(
        Input::Workload(&WorkloadCommand::Apply { workload: w.clone(), progress: Some(progress) }),
        t(500),
        &mut out,
    );
    assert!(out.messages.is_empty(), "spec was already published and retained");
    let hbs: Vec<Inbound> = (0..50).map(|i| heartbeat(&format!("n{i}"), 1, i + 1, want)).collect();
    let out = uplink(&mut e2, &hbs, t(600));
    assert!(out.messages.is_empty());
    assert_eq!(e2.stats().heartbeats, 50);
    // …but a node that is wrong is caught up.
    let out = uplink(&mut e2, &[heartbeat("n3", 2, 4, DesiredDigest::EMPTY)], t(601));
    assert_eq!(e2.stats().catchups, 1, "{:?}", decode_all(&out));
}

#[test]
fn waves_advance_only_when_healthy_and_failures_halt() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    let nodes: Vec<String> = (0..200).map(|i| format!("n{i}")).collect();
    let regs: Vec<Inbound> =
        nodes.iter().enumerate().map(|(i, n)| register(n, &l, i as u32 + 1, DesiredDigest::EMPTY)).collect();
    uplink(&mut e, &regs, t(1));
    let mut w = workload("default/cdn", 1, "tier=cdn", &[10, 50, 100]);
    w.rollout.failure_threshold = crate::model::FailureThreshold::Count(2);
    apply(&mut e, &w, t(2));
    let in_wave = |threshold: u16| -> Vec<&String> {
        nodes.iter().filter(|n| crate::model::wave_point(n, &w.id) < threshold).collect()
    };

    let mut out = Outputs::default();
    e.handle(Input::Tick, t(3), &mut out);
    assert!(out.events.is_empty(), "nobody runs v1 yet: {:?}", out.events);
    // The first tick of the wave counted its health; the reports below move the kept counts.
    assert!(e.keeps_wave_health(&w.id));

    // Wave 1 nodes report Running → advance to wave 2 with a republished threshold.
    let first = in_wave(1000);
    let reports: Vec<Inbound> = first
        .iter()
        .map(|n| {
            let i = nodes.iter().position(|x| x == *n).unwrap() as u32;
            status(n, 1, i + 1, digest_of(&[&w]), &[(&w, WorkloadPhase::Running)])
        })
        .collect();
    uplink(&mut e, &reports, t(4));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(5), &mut out);
    assert_eq!(out.events, vec![EngineEvent::WaveAdvanced { id: w.id.clone(), wave: 1 }]);
    let msgs = decode_all(&out);
    assert!(msgs.iter().any(|(_, m)| matches!(m, Message::WorkloadSpec(s) if s.wave_threshold == 5000)));

    // Three wave-2 nodes fail → halt (threshold: more than 2).
    let second: Vec<&String> = in_wave(5000).into_iter().filter(|n| !first.contains(n)).take(3).collect();
    let reports: Vec<Inbound> = second
        .iter()
        .map(|n| {
            let i = nodes.iter().position(|x| x == *n).unwrap() as u32;
            status(n, 1, i + 1, digest_of(&[&w]), &[(&w, WorkloadPhase::Failed)])
        })
        .collect();
    uplink(&mut e, &reports, t(6));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(7), &mut out);
    assert!(matches!(out.events.as_slice(), [EngineEvent::RolloutHalted { failed: 3, .. }]), "{:?}", out.events);
    assert_eq!(e.progress(&w.id).unwrap().phase, RolloutPhase::Halted);
    let st = e.workload_status(&w.id).unwrap();
    assert_eq!((st.targeted, st.failed, st.wave), (200, 3, 1));
    assert_eq!(st.ready as usize, first.len());
}

#[test]
fn failures_within_the_threshold_settle_a_wave_and_a_stuck_wave_passes_its_deadline() {
    // Nodes stay online for the whole test (no heartbeats needed).
    let cfg = EngineConfig { offline_after_missed: 100, ..Default::default() };
    let mut e = Engine::new(cfg, NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    let nodes: Vec<String> = (0..100).map(|i| format!("n{i}")).collect();
    let regs: Vec<Inbound> =
        nodes.iter().enumerate().map(|(i, n)| register(n, &l, i as u32 + 1, DesiredDigest::EMPTY)).collect();
    uplink(&mut e, &regs, t(1));
    let mut w = workload("default/cdn", 1, "tier=cdn", &[20, 100]);
    w.rollout.failure_threshold = crate::model::FailureThreshold::Count(2);
    w.rollout.progress_deadline_s = 300;
    apply(&mut e, &w, t(2));
    let boot = |n: &str| nodes.iter().position(|x| x == n).unwrap() as u32 + 1;
    let first: Vec<&String> = nodes.iter().filter(|n| crate::model::wave_point(n, &w.id) < 2000).collect();
    assert!(first.len() > 3);
    // One node of the first wave fails (within the threshold of 2), one is still pending, the rest run.
    let reports: Vec<Inbound> = first
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let phase = match k {
                0 => WorkloadPhase::Failed,
                1 => WorkloadPhase::Pending,
                _ => WorkloadPhase::Running,
            };
            status(n, 1, boot(n), digest_of(&[&w]), &[(&w, phase)])
        })
        .collect();
    uplink(&mut e, &reports, t(3));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(4), &mut out);
    assert!(out.events.is_empty(), "a pending node holds the wave: {:?}", out.events);
    // Past the deadline (counted from the first tick that saw the wave waiting) the rollout says so, once, and keeps waiting (as a Deployment does).
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(310), &mut out);
    assert_eq!(out.events, vec![EngineEvent::ProgressDeadlineExceeded { id: w.id.clone(), wave: 0 }]);
    assert!(e.workload_status(&w.id).unwrap().progress_deadline_exceeded);
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(311), &mut out);
    assert!(out.events.is_empty());
    // The pending node comes up: the failed one is within the threshold, so the wave is settled.
    let n = first[1];
    uplink(&mut e, &[status(n, 2, boot(n), digest_of(&[&w]), &[(&w, WorkloadPhase::Running)])], t(312));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(313), &mut out);
    assert_eq!(out.events, vec![EngineEvent::WaveAdvanced { id: w.id.clone(), wave: 1 }]);
    assert!(!e.workload_status(&w.id).unwrap().progress_deadline_exceeded);
}

#[test]
fn rollback_returns_everyone_to_the_previous_version() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(&mut e, &[register("a", &l, 1, DesiredDigest::EMPTY), register("b", &l, 2, DesiredDigest::EMPTY)], t(1));
    let v1 = workload("default/cdn", 1, "tier=cdn", &[100]);
    let v2 = workload("default/cdn", 2, "tier=cdn", &[1, 100]);
    apply(&mut e, &v1, t(2));
    apply(&mut e, &v2, t(3));
    let mut out = Outputs::default();
    e.handle(Input::Workload(&WorkloadCommand::Rollback(v1.id.clone())), t(4), &mut out);
    assert_eq!(e.desired_digest("a"), Some(digest_of(&[&v1])));
    assert_eq!(e.desired_digest("b"), Some(digest_of(&[&v1])));
    let msgs = decode_all(&out);
    assert!(
        matches!(&msgs[..], [(_, Message::WorkloadSpec(s))] if s.workload.version == 1 && s.wave_threshold == 10_000)
    );
    // A second rollback has nothing to return to.
    let mut out = Outputs::default();
    e.handle(Input::Workload(&WorkloadCommand::Rollback(v1.id.clone())), t(5), &mut out);
    assert!(matches!(out.events.as_slice(), [EngineEvent::CommandRejected { .. }]));
}

#[test]
fn deleting_a_workload_clears_its_retained_spec_and_desired_state() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(&mut e, &[register("a", &l, 1, DesiredDigest::EMPTY)], t(1));
    let w = workload("default/cdn", 1, "", &[100]);
    apply(&mut e, &w, t(2));
    let mut out = Outputs::default();
    e.handle(Input::Workload(&WorkloadCommand::Delete(w.id.clone())), t(3), &mut out);
    assert!(
        out.messages
            .iter()
            .any(|m| m.retain && m.payload.is_empty() && m.to == Destination::WorkloadSpec(w.id.clone()))
    );
    assert_eq!(e.desired_digest("a"), Some(DesiredDigest::EMPTY));
    assert!(e.workloads().is_empty());
}

#[test]
fn reconciling_retained_specs_clears_only_those_of_workloads_that_are_gone() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let held = workload("default/held", 1, "", &[100]);
    apply(&mut e, &held, t(1));
    let id = |s: &str| WorkloadId::new(s).unwrap();
    let group = GroupName::new("site-1").unwrap();
    let found = vec![
        Destination::WorkloadSpec(held.id.clone()),
        // Deleted while no controller led: on the broker, known to nobody.
        Destination::WorkloadSpec(id("default/gone")),
        Destination::GroupWorkloadSpec(group.clone(), id("default/gone-g")),
        // Exists in the store but not handed over yet: its Apply replaces the spec.
        Destination::WorkloadSpec(id("default/pending")),
    ];
    let cmd = WorkloadCommand::ReconcileRetained { found, live: vec![id("default/pending")] };
    let mut out = Outputs::default();
    e.handle(Input::Workload(&cmd), t(2), &mut out);
    let cleared: Vec<&Destination> =
        out.messages.iter().filter(|m| m.retain && m.payload.is_empty()).map(|m| &m.to).collect();
    assert_eq!(
        cleared,
        vec![
            &Destination::WorkloadSpec(id("default/gone")),
            &Destination::GroupWorkloadSpec(group.clone(), id("default/gone-g"))
        ]
    );
    // The nodes that may run them are told they were removed, on the fleet and the group topic.
    let removed: Vec<(Destination, Message)> = out
        .messages
        .iter()
        .filter(|m| !m.retain)
        .map(|m| (m.to.clone(), protocol::decode(&m.payload, &DecodeLimits::default()).unwrap()))
        .collect();
    assert_eq!(
        removed,
        vec![
            (Destination::Fleet, Message::WorkloadRemoved(protocol::WorkloadRemoved { id: id("default/gone") })),
            (
                Destination::Group(group),
                Message::WorkloadRemoved(protocol::WorkloadRemoved { id: id("default/gone-g") })
            ),
        ]
    );
    assert_eq!(
        out.events,
        vec![
            EngineEvent::StaleSpecCleared { id: id("default/gone"), destination: cleared[0].clone() },
            EngineEvent::StaleSpecCleared { id: id("default/gone-g"), destination: cleared[1].clone() },
        ]
    );
    assert_eq!(e.workloads().len(), 1, "the held workload is untouched");
}

#[test]
fn a_node_away_while_a_workload_was_deleted_and_recreated_gets_the_new_content() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    let old = workload("default/cdn", 1, "tier=cdn", &[100]);
    apply(&mut e, &old, t(1));
    let had = digest_of(&[&old]);
    uplink(&mut e, &[register("away", &l, 1, had)], t(2));
    // While the node is away, the workload is deleted and created again under the same name: the
    // new object starts over at generation 1, with other content.
    let mut out = Outputs::default();
    e.handle(Input::Workload(&WorkloadCommand::Delete(old.id.clone())), t(3), &mut out);
    let mut new = old.clone();
    new.spec = b"image: registry.example/cdn-cache:2.0".to_vec();
    apply(&mut e, &new, t(4));
    assert_ne!(e.desired_digest("away"), Some(had), "the digest must tell the two contents apart");
    // The node comes back still running the old content: past the grace period it is caught up.
    let out = uplink(&mut e, &[heartbeat("away", 1, 1, had)], t(200));
    let msgs = decode_all(&out);
    assert!(
        msgs.iter().any(|(_, m)| matches!(m, Message::DesiredState(d) if d.workloads == vec![new.clone()])),
        "{msgs:?}"
    );
}

#[test]
fn failure_reasons_are_aggregated_and_follow_recovery() {
    // n5 re-registers 3 s after its first registration: no registration rate limit here.
    let cfg = EngineConfig { min_register_interval_ms: 0, ..Default::default() };
    let mut e = Engine::new(cfg, NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    let nodes: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    let regs: Vec<Inbound> =
        nodes.iter().enumerate().map(|(i, n)| register(n, &l, i as u32 + 1, DesiredDigest::EMPTY)).collect();
    uplink(&mut e, &regs, t(1));
    let w = workload("default/cdn", 1, "tier=cdn", &[100]);
    apply(&mut e, &w, t(2));
    let d = digest_of(&[&w]);
    let failed = |n: &str, seq: u32, reason: &str| {
        let boot = nodes.iter().position(|x| x == n).unwrap() as u32 + 1;
        let msg = Message::StatusReport(StatusReport {
            seq,
            boot_id: boot,
            applied: d,
            workloads: vec![WorkloadState { workload: w.id.clone(), version: 1, phase: WorkloadPhase::Failed }],
            reasons: vec![protocol::FailureReason::new(0, reason)],
        });
        Inbound { node: name(n), kind: UplinkKind::Status, payload: protocol::encode(&msg).into() }
    };
    let mut batch = Vec::new();
    for (i, n) in nodes.iter().enumerate().take(7) {
        let reason = if i < 5 { "exec /bin/cdn: No such file or directory" } else { "image pull failed: timeout" };
        batch.push(failed(n, 1, reason));
    }
    uplink(&mut e, &batch, t(3));
    let st = e.workload_status(&w.id).unwrap();
    assert_eq!(st.failed, 7);
    assert_eq!(st.failures.len(), 2);
    assert_eq!(st.failures[0].reason, "exec /bin/cdn: No such file or directory");
    assert_eq!(st.failures[0].count, 5);
    let samples: Vec<&str> = st.failures[0].sample_nodes.iter().map(|n| n.as_str()).collect();
    assert_eq!(samples, ["n0", "n1", "n2"]);
    assert_eq!((st.failures[1].count, st.failures[1].sample_nodes.len()), (2, 2));

    // n0 recovers, n1 fails for another reason, n5 re-registers (a restart, no reason yet).
    let mut batch = vec![status("n0", 2, 1, d, &[(&w, WorkloadPhase::Running)]), failed("n1", 2, "OOM killed")];
    batch.push(register("n5", &l, 6, d));
    uplink(&mut e, &batch, t(4));
    let st = e.workload_status(&w.id).unwrap();
    let got: Vec<(&str, u32)> = st.failures.iter().map(|f| (f.reason.as_str(), f.count)).collect();
    assert_eq!(
        got,
        [("exec /bin/cdn: No such file or directory", 3), ("OOM killed", 1), ("image pull failed: timeout", 1)]
    );

    // A new version: the old version's failures no longer count.
    let w2 = workload("default/cdn", 2, "tier=cdn", &[100]);
    apply(&mut e, &w2, t(5));
    assert!(e.workload_status(&w.id).unwrap().failures.is_empty());
}

#[test]
fn nodes_go_offline_after_missed_intervals_and_come_back() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(&mut e, &[register("a", &l, 1, DesiredDigest::EMPTY), register("b", &l, 2, DesiredDigest::EMPTY)], t(1));
    uplink(&mut e, &[heartbeat("a", 1, 1, DesiredDigest::EMPTY)], t(80));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(95), &mut out);
    let counts = e.store().read().counts(&Selector::everything());
    assert_eq!((counts.online, counts.offline), (1, 1));
    uplink(&mut e, &[heartbeat("b", 1, 2, DesiredDigest::EMPTY)], t(96));
    assert_eq!(e.store().read().counts(&Selector::everything()).online, 2);
    assert_eq!(e.stats().back_online, 1);
}

fn arb_labels() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    let keys = ["region", "tier", "env", "hw"];
    let values = ["a", "b", "c"];
    proptest::collection::vec((0..keys.len(), 0..values.len()), 0..4)
        .prop_map(move |v| v.into_iter().map(|(k, x)| (keys[k], values[x])).collect())
}

fn arb_selector() -> impl Strategy<Value = String> {
    let keys = ["region", "tier", "env", "hw"];
    proptest::collection::vec((0..keys.len(), 0..5usize, 0..3usize), 0..3).prop_map(move |v| {
        v.into_iter()
            .map(|(k, op, x)| {
                let (k, x) = (keys[k], ["a", "b", "c"][x]);
                match op {
                    0 => format!("{k}={x}"),
                    1 => format!("{k}!={x}"),
                    2 => format!("{k} in ({x},c)"),
                    3 => k.to_string(),
                    _ => format!("!{k}"),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The engine's targeting (per label set, cached) equals a naive evaluation over all nodes.
    #[test]
    fn targeting_equals_naive_evaluation(
        nodes in proptest::collection::vec(arb_labels(), 1..40),
        selectors in proptest::collection::vec(arb_selector(), 1..4),
        relabel in proptest::collection::vec((0..40usize, arb_labels()), 0..10),
    ) {
        // Relabelling re-registers nodes within seconds: no registration rate limit here.
        let cfg = EngineConfig { min_register_interval_ms: 0, ..Default::default() };
        let mut e = Engine::new(cfg, NodeCache::new(), t(0));
        let mut current: Vec<Labels> = nodes.iter().map(|p| labels(p)).collect();
        let regs: Vec<Inbound> = current.iter().enumerate().map(|(i, l)| register(&format!("n{i}"), l, 1, DesiredDigest::EMPTY)).collect();
        uplink(&mut e, &regs, t(1));
        let ws: Vec<Workload> = selectors.iter().enumerate().map(|(i, s)| workload(&format!("w{i}"), 1, s, &[100])).collect();
        for w in &ws {
            apply(&mut e, w, t(2));
        }
        // Relabel some nodes after the workloads exist (label sets appear and disappear).
        for (i, p) in &relabel {
            if *i < current.len() {
                current[*i] = labels(p);
                uplink(&mut e, &[register(&format!("n{i}"), &current[*i], 2, DesiredDigest::EMPTY)], t(3));
            }
        }
        for (i, l) in current.iter().enumerate() {
            let expect: Vec<&Workload> = ws.iter().filter(|w| w.selector.matches(l)).collect();
            prop_assert_eq!(e.desired_digest(&format!("n{i}")), Some(digest_of(&expect)));
        }
        for w in &ws {
            let naive = current.iter().filter(|l| w.selector.matches(*l)).count() as u32;
            prop_assert_eq!(e.workload_status(&w.id).unwrap().targeted, naive);
        }
    }
}

#[test]
fn label_selector_objects_target_like_strings() {
    let ls = LabelSelector { match_labels: [("tier".to_owned(), "cdn".to_owned())].into(), match_expressions: vec![] };
    assert_eq!(Selector::try_from(&ls).unwrap(), Selector::parse("tier=cdn").unwrap());
}

#[test]
fn a_lost_status_report_is_asked_for_again_until_it_arrives() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(&mut e, &[register("n1", &l, 1, DesiredDigest::EMPTY)], t(1));
    let w = workload("default/cdn", 1, "tier=cdn", &[100]);
    apply(&mut e, &w, t(2));
    let want = digest_of(&[&w]);
    let resyncs = |out: &Outputs| {
        let is_resync = |m: &Message| matches!(m, Message::Command(c) if c.kind == CommandKind::Resync);
        decode_all(out).into_iter().filter(|(_, m)| is_resync(m)).count()
    };
    // The node applied the spec; its status report was lost and only the heartbeat arrives.
    let out = uplink(&mut e, &[heartbeat("n1", 2, 1, want)], t(5));
    assert_eq!(resyncs(&out), 1);
    // The command may be lost too: every heartbeat asks again until a report arrives.
    let out = uplink(&mut e, &[heartbeat("n1", 3, 1, want)], t(35));
    assert_eq!(resyncs(&out), 1);
    assert_eq!(e.workload_status(&w.id).unwrap().updated, 0);
    let out = uplink(&mut e, &[status("n1", 4, 1, want, &[(&w, WorkloadPhase::Running)])], t(36));
    assert_eq!(resyncs(&out), 0);
    assert_eq!(e.workload_status(&w.id).unwrap().ready, 1);
    let out = uplink(&mut e, &[heartbeat("n1", 5, 1, want)], t(66));
    assert_eq!(resyncs(&out), 0);
    assert_eq!(e.stats().resyncs, 2);
}

#[test]
fn a_rollout_whose_targeted_nodes_are_all_offline_holds_instead_of_completing() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    let nodes: Vec<String> = (0..500).map(|i| format!("n{i}")).collect();
    let boot = |n: &str| nodes.iter().position(|x| x == n).unwrap() as u32 + 1;
    let regs: Vec<Inbound> = nodes.iter().map(|n| register(n, &l, boot(n), DesiredDigest::EMPTY)).collect();
    uplink(&mut e, &regs, t(1));
    // A broker outage longer than the offline window (3 × 30 s): every node is offline.
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(200), &mut out);
    assert_eq!(e.stats().marked_offline, 500);

    let mut one = workload("default/one", 1, "tier=cdn", &[100]);
    one.rollout.progress_deadline_s = 60;
    let waves = workload("default/waves", 1, "tier=cdn", &[10, 50, 100]);
    apply(&mut e, &one, t(201));
    apply(&mut e, &waves, t(201));
    let mut events = Vec::new();
    for s in 202..300 {
        let mut out = Outputs::default();
        e.handle(Input::Tick, t(s), &mut out);
        events.extend(out.events);
    }
    for w in [&one, &waves] {
        let p = e.progress(&w.id).unwrap();
        assert_eq!((p.phase, p.wave), (RolloutPhase::Progressing, 0), "{}: nobody is watching", w.id);
        let st = e.workload_status(&w.id).unwrap();
        assert_eq!((st.targeted, st.ready), (500, 0));
    }
    assert_eq!(
        events,
        vec![EngineEvent::ProgressDeadlineExceeded { id: one.id.clone(), wave: 0 }],
        "only the deadline is reported, no advance"
    );

    // Evidence arrives: one targeted node comes back running the new version.
    let n = nodes.iter().find(|n| crate::model::wave_point(n, &waves.id) < 1000).unwrap();
    let report = status(
        n,
        1,
        boot(n),
        digest_of(&[&one, &waves]),
        &[(&one, WorkloadPhase::Running), (&waves, WorkloadPhase::Running)],
    );
    uplink(&mut e, &[report], t(300));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(301), &mut out);
    assert!(out.events.contains(&EngineEvent::RolloutComplete { id: one.id.clone() }), "{:?}", out.events);
    assert!(out.events.contains(&EngineEvent::WaveAdvanced { id: waves.id.clone(), wave: 1 }), "{:?}", out.events);
}

#[test]
fn a_rollout_needs_the_configured_share_of_ready_nodes_and_an_empty_selection_says_so() {
    let cfg = EngineConfig { min_ready_percent: 50, ..Default::default() };
    let mut e = Engine::new(cfg, NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    let nodes: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    let regs: Vec<Inbound> =
        nodes.iter().enumerate().map(|(i, n)| register(n, &l, i as u32 + 1, DesiredDigest::EMPTY)).collect();
    uplink(&mut e, &regs, t(1));
    let w = workload("default/cdn", 1, "tier=cdn", &[100]);
    apply(&mut e, &w, t(2));
    // Four of ten come back ready after an outage; the other six stay offline: below 50 %.
    let report = |k: usize| status(&nodes[k], 1, k as u32 + 1, digest_of(&[&w]), &[(&w, WorkloadPhase::Running)]);
    uplink(&mut e, &(0..4).map(report).collect::<Vec<_>>(), t(150));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(151), &mut out);
    assert_eq!(e.stats().marked_offline, 6);
    assert!(out.events.is_empty(), "{:?}", out.events);
    uplink(&mut e, &[report(4)], t(152));
    let mut out = Outputs::default();
    e.handle(Input::Tick, t(153), &mut out);
    assert_eq!(out.events, vec![EngineEvent::RolloutComplete { id: w.id.clone() }]);

    let nobody = workload("default/nobody", 1, "tier=none", &[10, 100]);
    apply(&mut e, &nobody, t(160));
    let mut events = Vec::new();
    for s in 161..163 {
        let mut out = Outputs::default();
        e.handle(Input::Tick, t(s), &mut out);
        events.extend(out.events);
    }
    assert_eq!(
        events,
        vec![
            EngineEvent::NothingReached { id: nobody.id.clone(), wave: 0 },
            EngineEvent::WaveAdvanced { id: nobody.id.clone(), wave: 1 },
            EngineEvent::NothingReached { id: nobody.id.clone(), wave: 1 },
            EngineEvent::RolloutComplete { id: nobody.id.clone() },
        ]
    );
}

#[test]
fn a_spec_the_agents_cannot_decode_or_the_transport_cannot_carry_is_refused_at_apply() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let mut big = workload("default/big", 1, "tier=cdn", &[100]);
    big.spec = vec![b'x'; 70_000];
    let out = apply(&mut e, &big, t(1));
    let [EngineEvent::CommandRejected { id, reason }] = out.events.as_slice() else {
        panic!("expected a rejection, got {:?}", out.events)
    };
    assert_eq!(*id, big.id);
    assert!(reason.contains("65536") && reason.contains("70000") && reason.contains("smaller"), "{reason}");
    assert!(out.messages.is_empty() && e.workloads().is_empty(), "nothing is published or held");

    // Under the message limit but over the agents' runtime-spec limit (60 KiB).
    big.spec = vec![b'x'; 62 * 1024];
    let out = apply(&mut e, &big, t(2));
    assert!(matches!(out.events.as_slice(), [EngineEvent::CommandRejected { .. }]), "{:?}", out.events);
    assert!(out.messages.is_empty());

    // A transport with a smaller limit than the agents'.
    let cfg = EngineConfig { max_payload_bytes: 4096, ..Default::default() };
    let mut e = Engine::new(cfg.clone(), NodeCache::new(), t(0));
    big.spec = vec![b'x'; 5000];
    let out = apply(&mut e, &big, t(1));
    let [EngineEvent::CommandRejected { reason, .. }] = out.events.as_slice() else { panic!("{:?}", out.events) };
    assert!(reason.contains("transport's payload limit of 4096"), "{reason}");
    // Within every limit it is accepted.
    big.spec = vec![b'x'; 3000];
    let out = apply(&mut e, &big, t(2));
    assert!(out.events.is_empty() && out.messages.len() == 1, "{:?}", out.events);

    // Signed, the same message is 76 bytes longer: a spec that fits unsigned by less is refused.
    let unsigned_len = |w: &Workload| {
        protocol::encode(&Message::WorkloadSpec(protocol::WorkloadSpec { workload: w.clone(), wave_threshold: 0 }))
            .len()
    };
    big.id = WorkloadId::new("default/edge").unwrap();
    big.spec = vec![b'x'; 3000];
    big.spec.resize(3000 + 4096 - 40 - unsigned_len(&big), b'x');
    assert_eq!(unsigned_len(&big), 4096 - 40);
    let signer = Arc::new(crate::protocol::seal::DownlinkSigner::from_seed([1; 32]));
    let mut e = Engine::new(cfg.clone(), NodeCache::new(), t(0)).with_signer(signer);
    let out = apply(&mut e, &big, t(1));
    let [EngineEvent::CommandRejected { reason, .. }] = out.events.as_slice() else { panic!("{:?}", out.events) };
    assert!(reason.contains(&format!("is {} bytes", 4096 - 40 + 76)), "{reason}");
}

#[test]
fn a_node_registering_in_a_loop_is_throttled_and_gets_one_desired_state() {
    let mut e = Engine::new(EngineConfig::default(), NodeCache::new(), t(0));
    let mut w = workload("default/secret", 1, "tier=cdn", &[100]);
    w.delivery = DeliveryMode::PerNode;
    apply(&mut e, &w, t(0));
    let l = labels(&[("tier", "cdn")]);
    let mut accepted = 0;
    let mut desired_states = 0;
    let mut retry_after = Vec::new();
    for k in 0..50u32 {
        // Same boot or a new one each time: neither gets past the limit.
        let out = uplink(&mut e, &[register("n1", &l, 1 + k % 2, DesiredDigest::EMPTY)], t(1));
        for (_, m) in decode_all(&out) {
            match m {
                Message::RegisterAck(RegisterAck { outcome: RegisterOutcome::Accepted, .. }) => accepted += 1,
                Message::RegisterAck(RegisterAck {
                    outcome: RegisterOutcome::Rejected { code: RejectCode::Overloaded, retry_after_ms, .. },
                    ..
                }) => retry_after.push(retry_after_ms),
                Message::DesiredState(_) => desired_states += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!((accepted, desired_states, retry_after.len()), (1, 1, 49));
    assert!(retry_after.iter().all(|&r| r == 5_000), "{retry_after:?}");
    assert_eq!(e.stats().registrations_throttled, 49);
    assert_eq!(e.stats().registered_new + e.stats().registered_known, 1);
    // Once the interval passed, the node registers again.
    let out = uplink(&mut e, &[register("n1", &l, 3, DesiredDigest::EMPTY)], t(7));
    assert!(
        decode_all(&out)
            .iter()
            .any(|(_, m)| matches!(m, Message::RegisterAck(RegisterAck { outcome: RegisterOutcome::Accepted, .. })))
    );
    // Other nodes are not affected by n1's loop.
    let out = uplink(&mut e, &[register("n2", &l, 1, DesiredDigest::EMPTY)], t(7));
    assert!(
        decode_all(&out)
            .iter()
            .any(|(_, m)| matches!(m, Message::RegisterAck(RegisterAck { outcome: RegisterOutcome::Accepted, .. })))
    );
}

#[test]
fn a_node_over_its_uplink_rate_is_counted_and_not_processed() {
    let cfg = EngineConfig { max_uplink_per_node_per_s: 2, uplink_burst_per_node: 10, ..Default::default() };
    let mut e = Engine::new(cfg, NodeCache::new(), t(0));
    let l = labels(&[("tier", "cdn")]);
    uplink(
        &mut e,
        &[register("loud", &l, 1, DesiredDigest::EMPTY), register("quiet", &l, 1, DesiredDigest::EMPTY)],
        t(0),
    );
    let w = workload("default/cdn", 1, "tier=cdn", &[100]);
    apply(&mut e, &w, t(1));
    let want = digest_of(&[&w]);
    let store = e.store();
    // Well after any grace period, "loud" floods wrong-digest heartbeats (each would draw a resync
    // command or a catch-up) in one batch; "quiet" sends its one heartbeat in the same batch.
    let at = t(1000);
    let mut batch: Vec<Inbound> = (1..=1000).map(|seq| heartbeat("loud", seq, 1, DesiredDigest(seq.into()))).collect();
    batch.push(heartbeat("quiet", 1, 1, want));
    let out = uplink(&mut e, &batch, at);
    // The registration was one message of the burst, long ago: the burst is whole again.
    assert_eq!(e.stats().uplink_rate_limited, 990);
    assert_eq!(e.stats().heartbeats, 11, "10 of loud's, 1 of quiet's");
    // Only the admitted heartbeats were applied: the cache holds the digest of loud's tenth.
    let applied_of = |n: &str| store.read().get(n).map(|r| r.applied);
    assert_eq!(applied_of("loud"), Some(DesiredDigest(10)));
    assert_eq!(applied_of("quiet"), Some(want));
    // What the admitted ones drew (resyncs for a changed digest, one catch-up), nothing per drop.
    let to_loud = decode_all(&out).iter().filter(|(to, _)| *to == Destination::Node(name("loud"))).count();
    assert!(to_loud <= 11, "{to_loud} messages to loud");
    assert!(out.rejects.iter().all(|r| r.reason != "rate_limited"));
    // Half a second later one more message fits (2 per second), the next one does not.
    let out = uplink(
        &mut e,
        &[heartbeat("loud", 2000, 1, DesiredDigest(2000)), heartbeat("loud", 2001, 1, DesiredDigest(2001))],
        Timestamp::from_millis(at.as_millis() + 500),
    );
    assert_eq!(e.stats().uplink_rate_limited, 991);
    assert_eq!(applied_of("loud"), Some(DesiredDigest(2000)));
    drop(out);
    // Unknown senders have no slot: answered as before (re-register), never rate-limited here.
    let out = uplink(&mut e, &[heartbeat("stranger", 1, 1, want)], at);
    assert_eq!(e.stats().unknown_node, 1);
    assert_eq!(decode_all(&out).len(), 1);
}

/// What one node can draw by hammering every path for 10 simulated minutes: at most one
/// per-node desired state per `convergence_grace_ms` (60 s), so 11 in 600 s.
#[test]
fn a_node_hammering_every_path_gets_at_most_one_catchup_per_grace_period() {
    // The uplink rate limit is off here: the catch-up limit holds on its own.
    let cfg = EngineConfig { max_uplink_per_node_per_s: 0, ..Default::default() };
    let mut e = Engine::new(cfg.clone(), NodeCache::new(), t(0));
    let mut w = workload("default/secret", 1, "tier=cdn", &[100]);
    w.delivery = DeliveryMode::PerNode;
    apply(&mut e, &w, t(0));
    let want = digest_of(&[&w]);
    let l = labels(&[("tier", "cdn")]);
    let mut desired_states = 0;
    let mut count = |out: &Outputs| {
        desired_states += decode_all(out).iter().filter(|(_, m)| matches!(m, Message::DesiredState(_))).count();
    };
    count(&uplink(&mut e, &[register("bad", &l, 1, DesiredDigest::EMPTY)], t(1)));
    let (mut seq, mut boot) = (1u32, 1u32);
    for s in 2..=600u64 {
        seq += 1;
        // Every second: a heartbeat and a status report alternating wrong and right digests, and
        // every 6 s (past the registration throttle) a registration with a new boot id.
        let applied = if s % 2 == 0 { DesiredDigest(s) } else { want };
        let mut batch = vec![heartbeat("bad", seq, boot, applied)];
        seq += 1;
        batch.push(status("bad", seq, boot, if s % 2 == 0 { want } else { DesiredDigest(s) }, &[]));
        if s % 6 == 0 {
            boot += 1;
            batch.push(register("bad", &l, boot, if s % 12 == 0 { want } else { DesiredDigest::EMPTY }));
        }
        count(&uplink(&mut e, &batch, t(s)));
    }
    let limit = 600 / (cfg.convergence_grace_ms / 1000) + 1;
    assert!(desired_states as u64 <= limit, "{desired_states} desired states in 600 s, limit {limit}");
    assert!(desired_states >= 2, "a wrong node still gets its desired state: {desired_states}");
    assert_eq!(e.stats().catchups, desired_states as u64);
}

/// One step of the wave-health property test.
#[derive(Clone, Debug)]
enum HealthStep {
    /// Node registers (again) with label set `labels`, under a new boot.
    Register { node: usize, labels: usize },
    /// Node reports workload `w` at `version` in `phase`.
    Report { node: usize, w: usize, version: u64, phase: u8 },
    /// Node heartbeats.
    Heartbeat { node: usize },
    /// Time passes (seconds) and the engine ticks.
    Tick { secs: u64 },
    /// A new version of workload `w` is applied.
    NewVersion { w: usize },
    /// Workload `w` is paused, or resumed.
    Hold { w: usize, pause: bool },
}

fn arb_health_step() -> impl Strategy<Value = HealthStep> {
    prop_oneof![
        (0..24usize, 0..4usize).prop_map(|(node, labels)| HealthStep::Register { node, labels }),
        (0..24usize, 0..2usize, 1..4u64, 0..5u8).prop_map(|(node, w, version, phase)| HealthStep::Report {
            node,
            w,
            version,
            phase
        }),
        (0..24usize).prop_map(|node| HealthStep::Heartbeat { node }),
        (0..6u64).prop_map(|secs| HealthStep::Tick { secs }),
        (0..2usize).prop_map(|w| HealthStep::NewVersion { w }),
        (0..2usize, any::<bool>()).prop_map(|(w, pause)| HealthStep::Hold { w, pause }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The wave health a progressing rollout keeps between ticks always equals a full count over
    /// its targeted nodes, whatever registrations (relabelling included), reports, heartbeats,
    /// offline sweeps, new versions and holds come in between.
    #[test]
    fn kept_wave_health_equals_a_full_count(steps in proptest::collection::vec(arb_health_step(), 1..120)) {
        let cfg = EngineConfig {
            heartbeat_interval_ms: 1000,
            offline_after_missed: 2,
            min_register_interval_ms: 0,
            max_uplink_per_node_per_s: 0,
            // Never settle a wave on its own: the rollouts stay progressing, their health kept.
            min_ready_percent: 100,
            ..Default::default()
        };
        let label_sets = [
            labels(&[("tier", "cdn")]),
            labels(&[("tier", "cdn"), ("region", "eu")]),
            labels(&[("tier", "pos")]),
            labels(&[]),
        ];
        let mut e = Engine::new(cfg, NodeCache::new(), t(0));
        let mut ws = vec![workload("default/a", 1, "tier=cdn", &[30, 60, 100]), workload("default/b", 1, "tier", &[100])];
        for w in &ws {
            apply(&mut e, w, t(0));
        }
        let mut now = 1u64;
        let mut boot = [0u32; 24];
        let mut seq = [0u32; 24];
        for step in steps {
            match step {
                HealthStep::Register { node, labels } => {
                    boot[node] += 1;
                    seq[node] = 0;
                    uplink(&mut e, &[register(&format!("n{node}"), &label_sets[labels], boot[node], DesiredDigest::EMPTY)], t(now));
                }
                HealthStep::Report { node, w, version, phase } => {
                    seq[node] += 1;
                    let mut v = ws[w].clone();
                    v.version = version;
                    let phase = WorkloadPhase::from_u8(phase).unwrap_or(WorkloadPhase::Running);
                    uplink(&mut e, &[status(&format!("n{node}"), seq[node], boot[node].max(1), DesiredDigest::EMPTY, &[(&v, phase)])], t(now));
                }
                HealthStep::Heartbeat { node } => {
                    seq[node] += 1;
                    uplink(&mut e, &[heartbeat(&format!("n{node}"), seq[node], boot[node].max(1), DesiredDigest::EMPTY)], t(now));
                }
                HealthStep::Tick { secs } => {
                    now += secs;
                    e.handle(Input::Tick, t(now), &mut Outputs::default());
                }
                HealthStep::NewVersion { w } => {
                    ws[w].version += 1;
                    apply(&mut e, &ws[w], t(now));
                }
                HealthStep::Hold { w, pause } => {
                    let cmd = if pause { WorkloadCommand::Pause(ws[w].id.clone()) } else { WorkloadCommand::Resume(ws[w].id.clone()) };
                    e.handle(Input::Workload(&cmd), t(now), &mut Outputs::default());
                }
            }
            if let Some(drift) = e.wave_health_drift() {
                prop_assert!(false, "after {step:?}: {drift}");
            }
        }
    }
}
