//! Tier 2: deterministic whole-system simulation. One engine and thousands of agents over the
//! simulated broker in virtual time, with injected faults (drop, duplicate, delay/reorder,
//! partition, controller, agent and broker restarts), fixed seeds. Every scenario ends with every
//! node converged (agent's applied digest == engine's desired digest) and the engine's aggregated
//! workload status equal to a recount from the agents themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use kole_core::agent::{LinkState, RecordingRuntime, RuntimeOp};
use kole_core::cache::StateCache;
use kole_core::engine::{Engine, EngineEvent, RolloutPhase, WorkloadCommand, WorkloadStatus};
use kole_core::model::Workload;
use kole_core::model::{DesiredDigest, FailureThreshold, NodePhase, Selector, WorkloadId, WorkloadPhase, stable_hash};
use kole_core::snapshot::{MemorySnapshotStore, RestoreLimits, SnapshotOptions, restore_latest, write_snapshot};
use kole_core::transport::fault::FaultPlan;
use kole_sim::net::NodeId;
use kole_sim::sim::{SimConfig, Simulation};

/// Virtual-time bounds: generous, so only a real stall fails them.
const REGISTER_MS: u64 = 15 * 60_000;
const ROLLOUT_MS: u64 = 30 * 60_000;

/// The heavy plan of the fault tests: 10% loss each way, 5% duplicates, 0–2 s delays (reordering).
fn heavy_faults(seed: u64) -> FaultPlan {
    FaultPlan { drop_uplink: 0.10, drop_downlink: 0.10, duplicate: 0.05, min_delay_ms: 0, max_delay_ms: 2_000, seed }
}

fn sim(nodes: usize, seed: u64, plan: FaultPlan, keep_agent_state: bool) -> Simulation {
    Simulation::new(SimConfig { nodes, seed, plan, keep_agent_state, ..SimConfig::default() })
}

const ID: &str = "edge-system/cdn-cache";

fn workload(version: u64, waves: &[u8]) -> Workload {
    Workload {
        spec: format!("image: cdn-cache:{version}").into_bytes(),
        ..kole_tests::fixtures::workload(ID, version, "kole.dev/site-type in (cdn,retail)", waves)
    }
}

/// Applies `w`, dropping the engine events of earlier rollouts first (so [`wait_event`] sees this one's).
fn apply(sim: &mut Simulation, w: &Workload) {
    sim.take_events();
    sim.command(&WorkloadCommand::Apply { workload: w.clone(), progress: None });
}

/// Connects the fleet and runs until every agent is registered.
fn register(sim: &mut Simulation) {
    sim.connect_all();
    assert!(sim.run_until_registered(REGISTER_MS), "not every agent registered within {REGISTER_MS} ms");
    let n = sim.agents().len() as u64;
    assert_eq!(sim.engine().stats().registered_new, n);
}

/// Runs until every node is converged; panics with the stragglers otherwise.
fn converge(sim: &mut Simulation, what: &str) {
    if !sim.run_until_converged(ROLLOUT_MS) {
        let bad = sim.unconverged();
        panic!("{what}: {} nodes not converged after {ROLLOUT_MS} ms, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    }
}

/// Runs until `id`'s rollout is complete with every targeted node ready and every node converged.
fn roll_out(sim: &mut Simulation, id: &WorkloadId, what: &str) {
    let ok = sim.run_until(ROLLOUT_MS, |s| {
        s.engine_mut()
            .workload_status(id)
            .is_some_and(|st| st.phase == RolloutPhase::Complete && st.ready == st.targeted)
            && s.unconverged().is_empty()
    });
    assert!(
        ok,
        "{what}: rollout not complete: {:?}, {} unconverged",
        sim.engine_mut().workload_status(id),
        sim.unconverged().len()
    );
}

/// Waits until an engine event matching `pred` shows up; returns it. Events before it are dropped.
fn wait_event(sim: &mut Simulation, max_ms: u64, pred: impl Fn(&EngineEvent) -> bool) -> Option<EngineEvent> {
    let mut seen = None;
    sim.run_until(max_ms, |s| {
        seen = s.take_events().into_iter().find(|e| pred(e));
        seen.is_some()
    });
    seen
}

/// The status a naive count over the agents gives: targeted by label match, the rest from each
/// agent's own workload states.
fn recount(sim: &Simulation, w: &Workload) -> (u32, u32, u32, u32, Vec<(u64, u32)>) {
    let (mut targeted, mut updated, mut ready, mut failed) = (0, 0, 0, 0);
    let mut by_version: BTreeMap<u64, u32> = BTreeMap::new();
    for a in sim.agents() {
        if w.selector.matches(&**a.labels()) {
            targeted += 1;
        }
        for s in a.workload_states().iter().filter(|s| s.workload == w.id) {
            *by_version.entry(s.version).or_default() += 1;
            if s.version == w.version {
                updated += 1;
                match s.phase {
                    WorkloadPhase::Running => ready += 1,
                    WorkloadPhase::Failed => failed += 1,
                    _ => {}
                }
            }
        }
    }
    (targeted, updated, ready, failed, by_version.into_iter().collect())
}

/// The engine's aggregated status of `w` equals the recount from scratch.
fn assert_status_is_recount(sim: &mut Simulation, w: &Workload) -> WorkloadStatus {
    let st = sim.engine_mut().workload_status(&w.id).expect("workload known");
    let (targeted, updated, ready, failed, by_version) = recount(sim, w);
    assert_eq!(st.version, w.version);
    assert_eq!(
        (st.targeted, st.updated, st.ready, st.failed, &st.by_version),
        (targeted, updated, ready, failed, &by_version),
        "engine status (targeted, updated, ready, failed, by_version) differs from the recount"
    );
    st
}

fn assert_all_converged(sim: &mut Simulation) {
    let bad = sim.unconverged();
    assert!(bad.is_empty(), "{} nodes unconverged, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

fn online(sim: &Simulation) -> u32 {
    sim.engine().store().read().counts(&Selector::everything()).get(NodePhase::Online)
}

/// Every `step`-th node, starting at `offset`.
fn every(n: usize, step: usize, offset: usize) -> Vec<NodeId> {
    (offset..n).step_by(step).map(|i| NodeId(i as u32)).collect()
}

fn took(name: &str, t: Instant) {
    eprintln!("{name}: {:.2} s wall", t.elapsed().as_secs_f64());
}

/// Registration, a three-wave rollout and an update, with 10% loss each way, 5% duplicates and
/// 0–2 s reordering the whole time: agents retry registration, lost broadcasts are caught up per
/// node, and the run ends converged with the status equal to a recount. The faults stay on.
#[test]
fn faults_combined_fleet_registers_rolls_out_and_converges() {
    let t = Instant::now();
    let mut sim = sim(3_000, 11, heavy_faults(0xfa17), false);
    register(&mut sim);
    let net = sim.net().stats();
    assert!(net.dropped_uplink_fault > 0 && net.dropped_downlink_fault > 0 && net.duplicated > 0);
    assert!(sim.engine().stats().registered_known > 0, "lost acks make agents register again");

    let v1 = workload(1, &[10, 50, 100]);
    apply(&mut sim, &v1);
    roll_out(&mut sim, &v1.id, "v1 under faults");
    assert_all_converged(&mut sim);
    let st = assert_status_is_recount(&mut sim, &v1);
    assert!(st.targeted > 1_000, "{st:?}");
    assert_eq!(st.by_version, vec![(1, st.targeted)]);

    let v2 = workload(2, &[10, 50, 100]);
    apply(&mut sim, &v2);
    roll_out(&mut sim, &v2.id, "v2 under faults");
    assert_all_converged(&mut sim);
    let st = assert_status_is_recount(&mut sim, &v2);
    assert_eq!(st.by_version, vec![(2, st.targeted)]);
    assert!(sim.engine().stats().catchups > 0, "lost broadcasts were caught up per node");
    assert!(sim.net().plan().drop_downlink > 0.0, "converged with the faults still on");
    took("faults_combined", t);
}

/// Each fault alone (loss up, loss down, duplicates, reordering): the rollout completes and the
/// status equals the recount.
#[test]
fn faults_one_at_a_time() {
    let t = Instant::now();
    let plans = [
        ("drop uplink", FaultPlan { drop_uplink: 0.2, seed: 1, ..FaultPlan::NONE }),
        ("drop downlink", FaultPlan { drop_downlink: 0.2, seed: 2, ..FaultPlan::NONE }),
        ("duplicate", FaultPlan { duplicate: 0.3, seed: 3, ..FaultPlan::NONE }),
        ("reorder", FaultPlan { min_delay_ms: 0, max_delay_ms: 2_000, seed: 4, ..FaultPlan::NONE }),
    ];
    for (what, plan) in plans {
        let mut sim = sim(2_000, 5, plan, false);
        register(&mut sim);
        let v1 = workload(1, &[10, 50, 100]);
        apply(&mut sim, &v1);
        roll_out(&mut sim, &v1.id, what);
        assert_all_converged(&mut sim);
        assert_status_is_recount(&mut sim, &v1);
    }
    took("faults_one_at_a_time", t);
}

/// A fifth of the fleet is cut off while a three-wave rollout runs: the cut-off nodes go offline
/// after their missed heartbeats and stop blocking the waves, so the rollout completes for the
/// others; after the heal they come back online and catch up.
#[test]
fn partition_during_rollout_then_heal_catches_up() {
    let t = Instant::now();
    let n = 4_000;
    let mut sim = sim(n, 21, FaultPlan::NONE, false);
    register(&mut sim);
    let v1 = workload(1, &[100]);
    apply(&mut sim, &v1);
    roll_out(&mut sim, &v1.id, "v1");

    let cut = every(n, 5, 2);
    sim.net().partition(&cut);
    let v2 = workload(2, &[10, 50, 100]);
    apply(&mut sim, &v2);
    let done = sim.run_until(ROLLOUT_MS, |s| {
        s.engine_mut().workload_status(&v2.id).is_some_and(|st| st.phase == RolloutPhase::Complete)
    });
    assert!(done, "the rollout is blocked by the partition: {:?}", sim.engine_mut().workload_status(&v2.id));
    assert!(sim.engine().stats().marked_offline >= cut.len() as u64);
    assert_eq!(online(&sim), (n - cut.len()) as u32);
    let behind: BTreeSet<NodeId> = sim.unconverged().into_iter().collect();
    let cut_set: BTreeSet<NodeId> = cut.iter().copied().collect();
    assert!(!behind.is_empty() && behind.is_subset(&cut_set), "only cut-off nodes may be behind");
    let st = sim.engine_mut().workload_status(&v2.id).unwrap();
    assert!(st.updated < st.targeted && st.by_version.iter().any(|&(v, _)| v == 1), "{st:?}");

    sim.net().heal(&cut);
    converge(&mut sim, "after heal");
    assert!(sim.run_until(5 * 60_000, |s| online(s) == n as u32), "online {} of {n}", online(&sim));
    assert!(sim.engine().stats().back_online >= cut.len() as u64);
    assert_all_converged(&mut sim);
    let st = assert_status_is_recount(&mut sim, &v2);
    assert_eq!((st.ready, &st.by_version), (st.targeted, &vec![(2, st.targeted)]));
    took("partition_during_rollout", t);
}

/// Snapshots the engine's cache into a memory store, builds a new engine from the newest
/// generation, swaps it into the simulation and hands it the workloads with their persisted
/// rollout progress (as a Kubernetes status would). Returns the old engine.
fn restart_controller(sim: &mut Simulation, snapshot: &MemorySnapshotStore) -> Engine {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let limits = RestoreLimits { threads: 1, ..RestoreLimits::default() };
    let restored = rt.block_on(restore_latest(snapshot, &limits)).unwrap().expect("a snapshot was written");
    assert!(restored.faults.is_empty());
    let now = sim.now();
    let fresh = Engine::new(sim.engine().config().clone(), restored.cache, now);
    let old = sim.replace_engine(fresh);
    for w in old.workloads() {
        let progress = old.progress(&w.id);
        assert!(progress.as_ref().is_some_and(|p| p.published));
        let before = sim.net().stats().downlink_sent;
        sim.command(&WorkloadCommand::Apply { workload: (*w).clone(), progress });
        assert_eq!(sim.net().stats().downlink_sent, before, "a resumed rollout is not published again");
    }
    old
}

fn write_snapshot_of(sim: &Simulation, store: &MemorySnapshotStore) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let opts = SnapshotOptions { threads: 1, ..SnapshotOptions::default() };
    // A copy, as a driver snapshots without holding the engine's cache lock across the writes.
    let cache = sim.engine().store().read().clone();
    rt.block_on(write_snapshot(store, &cache, &opts, sim.now())).unwrap();
}

/// The controller restarts from a snapshot twice: once with the whole fleet converged (not one
/// per-node catch-up follows), once in the middle of a rollout with lost and delayed deliveries
/// (catch-ups only for nodes that were behind, at most one each); the rollout completes and everyone converges.
#[test]
fn controller_restart_from_snapshot_resumes_without_needless_catchups() {
    let t = Instant::now();
    let n = 4_000;
    let mut sim = sim(n, 31, FaultPlan::NONE, false);
    register(&mut sim);
    let v1 = workload(1, &[10, 50, 100]);
    apply(&mut sim, &v1);
    roll_out(&mut sim, &v1.id, "v1");
    sim.run_for(60_000);

    // 1. Everything converged: restart, and nobody needs a catch-up.
    let store = MemorySnapshotStore::new();
    write_snapshot_of(&sim, &store);
    let old = restart_controller(&mut sim, &store);
    assert_eq!(old.stats().registered_new, n as u64);
    sim.run_for(5 * 60_000);
    let s = sim.engine().stats().clone();
    assert_eq!((s.catchups, s.resyncs), (0, 0), "catch-ups or resyncs sent to converged nodes: {s:?}");
    assert_eq!((s.registered_new, s.registered_known), (0, 0), "nodes do not re-register with a restored cache");
    assert!(s.heartbeats >= n as u64);
    assert_eq!(online(&sim), n as u32);
    assert_all_converged(&mut sim);
    assert_status_is_recount(&mut sim, &v1);

    // 2. Mid-rollout: 10% of the wave's broadcast deliveries are lost and the rest delayed 0–2 s
    // when the controller dies; the snapshot is a second older than the restart. After the restart
    // nothing more is lost, so each node behind needs at most one catch-up and no other node any.
    let delays = FaultPlan { min_delay_ms: 0, max_delay_ms: 2_000, seed: 99, ..FaultPlan::NONE };
    sim.net().set_plan(FaultPlan { drop_downlink: 0.1, ..delays });
    let v2 = workload(2, &[10, 50, 100]);
    apply(&mut sim, &v2);
    let ev = wait_event(&mut sim, ROLLOUT_MS, |e| matches!(e, EngineEvent::WaveAdvanced { wave: 1, .. }));
    assert!(ev.is_some(), "wave 1 never reached: {:?}", sim.engine_mut().workload_status(&v2.id));
    let store = MemorySnapshotStore::new();
    write_snapshot_of(&sim, &store);
    sim.run_for(1_000);
    let behind = sim.unconverged().len() as u64;
    assert!(behind > 0, "the restart should catch deliveries in flight");
    restart_controller(&mut sim, &store);
    sim.net().set_plan(delays);
    assert_eq!(sim.engine().progress(&v2.id).unwrap().wave, 1);
    roll_out(&mut sim, &v2.id, "v2 after a mid-rollout restart");
    assert_all_converged(&mut sim);
    let st = assert_status_is_recount(&mut sim, &v2);
    assert_eq!(st.by_version, vec![(2, st.targeted)]);
    let s = sim.engine().stats().clone();
    assert!(s.catchups > 0, "nodes that lost the broadcast are caught up: {s:?}");
    assert!(s.catchups <= behind, "{} catch-ups for {behind} nodes behind at the restart: {s:?}", s.catchups);
    eprintln!("mid-rollout restart: {behind} nodes behind, {} catch-ups, {} resyncs", s.catchups, s.resyncs);
    took("controller_restart", t);
}

/// Agents restarted while cut off keep running their last desired state from their persisted
/// state before any cloud contact; after the heal they register as restarts and catch up with the
/// version rolled out meanwhile.
#[test]
fn agent_restart_while_partitioned_keeps_running_then_catches_up() {
    let t = Instant::now();
    let n = 3_000;
    let mut sim = sim(n, 41, FaultPlan::NONE, true);
    register(&mut sim);
    let v1 = workload(1, &[100]);
    apply(&mut sim, &v1);
    roll_out(&mut sim, &v1.id, "v1");

    let cut = every(n, 10, 3);
    sim.net().partition(&cut);
    let before: Vec<(DesiredDigest, Vec<(WorkloadId, u64)>)> = cut
        .iter()
        .map(|&n| {
            let a = &sim.agents()[n.index()];
            (a.applied(), a.workloads().map(|(w, _)| (w.id.clone(), w.version)).collect())
        })
        .collect();
    assert!(before.iter().filter(|(_, ws)| !ws.is_empty()).count() > cut.len() / 4);
    *sim.runtime() = RecordingRuntime::new();
    for (k, &node) in cut.iter().enumerate() {
        sim.restart_agent(node, 0x7000_0000 + 2 * k as u32);
    }
    // Edge autonomy: right after the restart, before any cloud contact, each runs what it ran.
    for (&node, (applied, ws)) in cut.iter().zip(&before) {
        let a = &sim.agents()[node.index()];
        assert_eq!(a.link(), LinkState::Disconnected);
        assert_eq!(a.applied(), *applied);
        let now: Vec<(WorkloadId, u64)> = a.workloads().map(|(w, _)| (w.id.clone(), w.version)).collect();
        assert_eq!(&now, ws);
        assert!(a.workloads().all(|(_, phase)| phase == WorkloadPhase::Running));
        let name = a.name().clone();
        let calls = sim.runtime().calls_for(&name);
        let want: Vec<RuntimeOp> =
            ws.iter().map(|(id, version)| RuntimeOp::Apply { id: id.clone(), version: *version }).collect();
        assert_eq!(calls, want, "the persisted state is re-applied through the runtime");
    }

    // They reconnect into the partition: registrations vanish, the agents keep retrying.
    let restarts = sim.engine().stats().restarts;
    for &node in &cut {
        sim.connect(node);
    }
    let v2 = workload(2, &[100]);
    apply(&mut sim, &v2);
    assert!(sim.run_until(ROLLOUT_MS, |s| {
        s.engine_mut().workload_status(&v2.id).is_some_and(|st| st.phase == RolloutPhase::Complete)
    }));
    sim.run_for(3 * 60_000);
    assert!(cut.iter().all(|&n| sim.agents()[n.index()].link() == LinkState::Registering));
    assert_eq!(sim.engine().stats().restarts, restarts);

    sim.net().heal(&cut);
    assert!(sim.run_until_registered(5 * 60_000), "restarted agents register after the heal");
    converge(&mut sim, "after the heal");
    assert_eq!(sim.engine().stats().restarts - restarts, cut.len() as u64);
    assert!(sim.run_until(5 * 60_000, |s| online(s) == n as u32));
    let st = assert_status_is_recount(&mut sim, &v2);
    assert_eq!(st.by_version, vec![(2, st.targeted)]);
    took("agent_restart", t);
}

/// The broker restarts in the middle of a rollout, with duplicates and delays on: every session
/// ends, the agents are told and reconnect over 30 s, re-register (as the same boot), and the
/// rollout completes with everyone converged.
#[test]
fn broker_restart_mid_rollout_reconnects_and_converges() {
    let t = Instant::now();
    let n = 5_000;
    let plan = FaultPlan { duplicate: 0.05, min_delay_ms: 0, max_delay_ms: 1_000, seed: 5, ..FaultPlan::NONE };
    let mut sim = sim(n, 51, plan, false);
    register(&mut sim);
    let v1 = workload(1, &[100]);
    apply(&mut sim, &v1);
    roll_out(&mut sim, &v1.id, "v1");

    let v2 = workload(2, &[10, 50, 100]);
    apply(&mut sim, &v2);
    let ev = wait_event(&mut sim, ROLLOUT_MS, |e| matches!(e, EngineEvent::WaveAdvanced { wave: 1, .. }));
    assert!(ev.is_some());
    let known = sim.engine().stats().registered_known;
    let sessions = sim.restart_broker();
    assert_eq!(sessions.len(), n);
    assert_eq!(sim.net().stats().nodes_connected, 0);
    assert!(sim.agents().iter().all(|a| a.link() == LinkState::Disconnected));
    sim.reconnect_spread(&sessions, 30_000, 0xb40c);
    assert!(sim.run_until_registered(5 * 60_000));
    roll_out(&mut sim, &v2.id, "v2 after a broker restart");
    assert_eq!(sim.net().stats().nodes_connected, n);
    let s = sim.engine().stats().clone();
    assert!(s.registered_known - known >= n as u64, "every node registered again: {s:?}");
    assert_eq!(s.restarts, 0, "a reconnect is not a restart");
    assert_all_converged(&mut sim);
    let st = assert_status_is_recount(&mut sim, &v2);
    assert_eq!(st.by_version, vec![(2, st.targeted)]);
    took("broker_restart", t);
}

/// What a run leaves behind, for comparing two runs.
#[derive(Debug, PartialEq)]
struct Outcome {
    engine: kole_core::engine::EngineStats,
    net: kole_sim::net::NetStats,
    sim: kole_sim::sim::SimStats,
    now: u64,
    nodes: Vec<(DesiredDigest, u32, u32, LinkState, Vec<kole_core::model::WorkloadState>)>,
}

fn faulty_run(plan_seed: u64) -> Outcome {
    let n = 2_000;
    let mut sim = sim(n, 61, heavy_faults(plan_seed), false);
    register(&mut sim);
    let v1 = workload(1, &[10, 50, 100]);
    apply(&mut sim, &v1);
    roll_out(&mut sim, &v1.id, "v1");
    let cut = every(n, 10, 0);
    sim.net().partition(&cut);
    apply(&mut sim, &workload(2, &[50, 100]));
    sim.run_for(3 * 60_000);
    sim.net().heal(&cut);
    converge(&mut sim, "after heal");
    let mut stats = sim.stats().clone();
    stats.engine_wall_ns = 0;
    Outcome {
        engine: sim.engine().stats().clone(),
        net: sim.net().stats(),
        sim: stats,
        now: sim.now().as_millis(),
        nodes: sim
            .agents()
            .iter()
            .map(|a| (a.applied(), a.boot_id(), a.seq(), a.link(), a.workload_states()))
            .collect(),
    }
}

/// Same seed, same plan: the same run, message for message. Another fault seed: another trace.
#[test]
fn runs_are_deterministic_per_seed() {
    let t = Instant::now();
    let a = faulty_run(7);
    let b = faulty_run(7);
    assert_eq!(a, b);
    let c = faulty_run(8);
    assert_ne!(a.net, c.net, "another seed gives other drops, duplicates and delays");
    assert_ne!(a.engine, c.engine);
    took("determinism", t);
}

/// A new version that fails on about 5% of nodes, with a 2% failure threshold, halts in its first
/// wave; the halt holds; a rollback returns every node to the previous version.
#[test]
fn failing_version_halts_early_and_rollback_converges() {
    let t = Instant::now();
    let n = 5_000;
    let mut sim = sim(n, 71, FaultPlan::NONE, false);
    register(&mut sim);
    let v1 = workload(1, &[100]);
    apply(&mut sim, &v1);
    roll_out(&mut sim, &v1.id, "v1");

    let fails = |name: &str| stable_hash(0xbad, name.as_bytes()) % 100 < 5;
    sim.runtime()
        .outcome_with(move |node, w| (w.version == 2 && fails(node.as_str())).then_some(WorkloadPhase::Failed));
    let mut v2 = workload(2, &[10, 50, 100]);
    v2.rollout.failure_threshold = FailureThreshold::Percent(2);
    apply(&mut sim, &v2);
    let ev = wait_event(&mut sim, ROLLOUT_MS, |e| matches!(e, EngineEvent::RolloutHalted { .. }));
    let Some(EngineEvent::RolloutHalted { failed, reached, .. }) = ev else { panic!("no halt: {ev:?}") };
    assert!(failed * 100 > 2 * reached, "{failed} of {reached}");
    let st = assert_status_is_recount(&mut sim, &v2);
    assert_eq!((st.phase, st.wave), (RolloutPhase::Halted, 0), "{st:?}");
    assert!(st.failed > 0 && st.updated < st.targeted / 5, "{st:?}");
    sim.run_for(5 * 60_000);
    let st = assert_status_is_recount(&mut sim, &v2);
    assert_eq!((st.phase, st.wave), (RolloutPhase::Halted, 0), "a halted rollout stays halted");

    sim.command(&WorkloadCommand::Rollback(v2.id.clone()));
    converge(&mut sim, "after the rollback");
    let st = assert_status_is_recount(&mut sim, &v1);
    assert_eq!((st.phase, st.failed, st.ready), (RolloutPhase::Complete, 0, st.targeted));
    assert_eq!(st.by_version, vec![(1, st.targeted)]);
    for a in sim.agents() {
        assert!(a.workload_states().iter().all(|s| s.version == 1 && s.phase == WorkloadPhase::Running));
    }
    took("halt_and_rollback", t);
}
