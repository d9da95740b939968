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
use kole_core::model::{
    DesiredDigest, FailureThreshold, NodePhase, RolloutStrategy, Selector, WorkloadId, WorkloadPhase, stable_hash,
};
use kole_core::model::Workload;
use kole_core::snapshot::{MemorySnapshotStore, RestoreLimits, SnapshotOptions, restore_latest, write_snapshot};
use kole_core::transport::fault::FaultPlan;
use kole_core::transport::sim::NodeId;
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

fn id() -> WorkloadId {
    WorkloadId::new("edge-system/cdn-cache").unwrap()
}

fn workload(version: u64, waves: &[u8]) -> Workload {
    Workload {
        id: id(),
        version,
        spec: format!("image: cdn-cache:{version}").into_bytes(),
        selector: Selector::parse("kole.dev/site-type in (cdn,retail)").unwrap(),
        delivery: Default::default(),
        rollout: RolloutStrategy { waves: waves.to_vec(), ..Default::default() },
    }
}

fn apply(sim: &mut Simulation, w: &Workload) {
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
        s.engine_mut().workload_status(id).is_some_and(|st| st.phase == RolloutPhase::Complete && st.ready == st.targeted)
            && s.unconverged().is_empty()
    });
    assert!(ok, "{what}: rollout not complete: {:?}, {} unconverged", sim.engine_mut().workload_status(id), sim.unconverged().len());
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
