//! `kole-sim demo`: the quickstart, all in one process on embedded defaults.
//!
//! Part 1 runs the controller and a fleet of agents over MQTT through the embedded broker
//! (`kole_mqtt::EmbeddedBroker` on 127.0.0.1): registration, a heartbeat from every node, one
//! workload to every node. Part 2 runs a larger simulated fleet over the in-process network: it
//! registers, a workload rolls out in waves, a new version starts rolling out, the controller
//! crashes mid-rollout and restarts from the directory snapshot store, and the fleet converges.

use std::path::PathBuf;
use std::time::Instant;

use kole_core::engine::{Engine, RolloutPhase, WorkloadCommand};
use kole_core::model::{FailureThreshold, RolloutStrategy, Selector, Workload, WorkloadId};
use kole_core::snapshot::{DirSnapshotStore, RestoreLimits, SnapshotOptions, restore_latest, write_snapshot};

use crate::mqtt_bench::MqttBenchConfig;
use crate::progress::Progress;
use crate::report::{Table, bytes, thousands};
use crate::sim::{SimConfig, Simulation};

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Fleet size. Default 100,000.
    pub nodes: usize,
    /// Seed of the reference fleet.
    pub seed: u64,
    /// Directory of the snapshot store; a fresh temporary directory when `None`.
    pub dir: Option<PathBuf>,
    /// Agents of part 1, over MQTT through the embedded broker; 0 skips it. Default 10,000.
    pub mqtt_nodes: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self { nodes: 100_000, seed: 42, dir: None, mqtt_nodes: 10_000 }
    }
}

/// A demo step failed (the fleet did not do what it should).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A step did not finish within its virtual-time budget.
    #[error("{0}")]
    Stuck(String),
    /// The snapshot store failed.
    #[error(transparent)]
    Snapshot(#[from] kole_core::snapshot::SnapshotError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn workload(version: u64, image: &str, waves: &[u8]) -> Result<Workload, DemoError> {
    Ok(Workload {
        id: WorkloadId::new("edge-system/node-exporter").map_err(|e| DemoError::Other(e.to_string()))?,
        version,
        spec: format!("image: registry.local/node-exporter:{image}").into_bytes(),
        selector: Selector::parse("kole.dev/tier in (edge, far-edge)").map_err(|e| DemoError::Other(e.to_string()))?,
        delivery: Default::default(),
        rollout: RolloutStrategy {
            waves: waves.to_vec(),
            paused: false,
            failure_threshold: FailureThreshold::Percent(2),
            ..Default::default()
        },
    })
}

/// Rolls `w` out with a progress bar, stopping early when `stop_at_wave` is reached.
fn roll_out(sim: &mut Simulation, w: &Workload, label: &str, stop_at_wave: Option<usize>) -> Result<f64, DemoError> {
    let interval = u64::from(sim.engine().config().heartbeat_interval_ms);
    let targeted = sim.engine_mut().workload_status(&w.id).map_or(1, |s| u64::from(s.targeted));
    let mut bar = Progress::new(label, targeted);
    let virtual_start = sim.now().as_millis();
    let deadline = virtual_start + 40 * interval;
    loop {
        sim.run_for(1_000);
        sim.take_events();
        let st = sim.engine_mut().workload_status(&w.id).ok_or_else(|| DemoError::Other("workload vanished".into()))?;
        bar.set(u64::from(st.ready));
        let fleet_s = (sim.now().as_millis() - virtual_start) / 1000;
        if stop_at_wave.is_some_and(|s| st.wave as usize >= s) {
            return Ok(bar.finish(&format!(
                "wave {} of {} reached after {fleet_s} s of fleet time",
                st.wave + 1,
                st.waves
            )));
        }
        if st.phase == RolloutPhase::Complete && st.ready == st.targeted {
            return Ok(bar.finish(&format!(
                "{} of {} nodes run v{} after {fleet_s} s of fleet time",
                thousands(st.ready.into()),
                thousands(st.targeted.into()),
                st.version
            )));
        }
        if st.phase == RolloutPhase::Halted {
            return Err(DemoError::Stuck(format!("rollout halted: {st:?}")));
        }
        if sim.now().as_millis() > deadline {
            return Err(DemoError::Stuck(format!("rollout did not finish: {st:?}")));
        }
    }
}

/// Runs the demo, printing progress to standard error and the summary to standard output.
pub fn run(cfg: &DemoConfig) -> Result<(), DemoError> {
    let started = Instant::now();
    let n = cfg.nodes;
    let dir = match &cfg.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kole-demo-{}", std::process::id())),
    };
    let rt = tokio::runtime::Builder::new_current_thread().build().map_err(|e| DemoError::Other(e.to_string()))?;
    let mqtt = if cfg.mqtt_nodes > 0 {
        eprintln!(
            "kole demo, part 1: {} agents and one controller over MQTT, through the embedded broker (in this process, on 127.0.0.1)",
            thousands(cfg.mqtt_nodes as u64)
        );
        let mcfg = MqttBenchConfig {
            nodes: cfg.mqtt_nodes,
            seed: cfg.seed,
            phase_timeout: std::time::Duration::from_secs(120),
            ..MqttBenchConfig::default()
        };
        let fig = crate::mqtt_bench::run(&mcfg, &mut |step| eprintln!("  {step}"))
            .map_err(|e| DemoError::Other(format!("part 1 (MQTT): {e}")))?;
        Some(fig)
    } else {
        None
    };
    eprintln!(
        "kole demo, part 2: {} simulated edge nodes, one controller, in-process network; snapshots in {}",
        thousands(n as u64),
        dir.display()
    );

    let t = Instant::now();
    let mut sim = Simulation::new(SimConfig { nodes: n, seed: cfg.seed, ..SimConfig::default() });
    let build_s = t.elapsed().as_secs_f64();
    let interval = u64::from(sim.engine().config().heartbeat_interval_ms);

    // 1. Registration.
    let mut bar = Progress::new("nodes connect and register", n as u64);
    sim.connect_all();
    let deadline = sim.now().as_millis() + 10 * interval;
    loop {
        let done = sim.run_until(200, |s| s.stats().agent_registrations >= n as u64);
        bar.set(sim.stats().agent_registrations);
        if done {
            break;
        }
        if sim.now().as_millis() > deadline {
            return Err(DemoError::Stuck("registration did not finish".into()));
        }
    }
    let register_s = bar.finish(&format!("{} registered, each acknowledged at once", thousands(n as u64)));

    // 2. A heartbeat round.
    let bar = Progress::new("one heartbeat from every node", 1);
    sim.run_for(interval);
    let heartbeat_s = bar.finish(&format!("{} heartbeats", thousands(sim.engine().stats().heartbeats)));

    // 3. v1 in waves.
    let v1 = workload(1, "1.8.1", &[1, 10, 50, 100])?;
    let msgs_before = sim.stats().engine_messages;
    sim.command(&WorkloadCommand::Apply { workload: v1.clone(), progress: None });
    let v1_s = roll_out(&mut sim, &v1, "v1 rolls out in waves 1/10/50/100%", None)?;
    let v1_msgs = sim.stats().engine_messages - msgs_before;

    // 4. A snapshot in the directory store.
    let store = DirSnapshotStore::open(&dir)?;
    let bar = Progress::new("snapshot to the directory store", 1);
    let cache = sim.engine().store().read().clone();
    let manifest = rt.block_on(write_snapshot(&store, &cache, &SnapshotOptions::default(), sim.now()))?;
    drop(cache);
    let snapshot_s = bar.finish(&format!(
        "generation {}: {} chunks, {}",
        manifest.generation,
        manifest.chunk_count,
        bytes(manifest.total_bytes)
    ));

    // 5. v2 starts rolling out; the controller crashes after its second wave.
    let v2 = workload(2, "1.9.0", &[5, 25, 100])?;
    sim.command(&WorkloadCommand::Apply { workload: v2.clone(), progress: None });
    roll_out(&mut sim, &v2, "v2 rolls out in waves 5/25/100%", Some(1))?;
    let progress = sim.engine().progress(&v2.id);
    let cache = sim.engine().store().read().clone();
    rt.block_on(write_snapshot(&store, &cache, &SnapshotOptions::default(), sim.now()))?;
    drop(cache);
    eprintln!("controller crashes mid-rollout; a new one restores from {}", dir.display());
    let t = Instant::now();
    let restored = rt
        .block_on(restore_latest(&store, &RestoreLimits::default()))?
        .ok_or_else(|| DemoError::Other("no snapshot".into()))?;
    let restored_nodes = kole_core::cache::StateCache::len(&restored.cache);
    let engine = Engine::new(sim.engine().config().clone(), restored.cache, sim.now());
    let restore_s = t.elapsed().as_secs_f64();
    drop(sim.replace_engine(engine));
    // The workload controller re-lists workloads; the rollout position comes from their status.
    sim.command(&WorkloadCommand::Apply { workload: v2.clone(), progress });
    let v2_s = roll_out(&mut sim, &v2, "v2 resumes after the restart", None)?;
    let bar = Progress::new("fleet converges", 1);
    if !sim.run_until_converged(10 * interval) {
        return Err(DemoError::Stuck(format!("{} nodes never converged", sim.unconverged().len())));
    }
    bar.finish("every node's applied state equals its desired state");

    let st = sim.engine_mut().workload_status(&v2.id).ok_or_else(|| DemoError::Other("workload vanished".into()))?;
    let counts = kole_core::cache::StateCache::counts(&*sim.engine().store().read(), &Selector::everything());
    let e = sim.engine().stats().clone();
    let mut t = Table::new(format!("kole demo: {} nodes (reference fleet, seed {})", thousands(n as u64), cfg.seed))
        .with_header(["figure", "kole (measured)", "KOLE (paper, 1M nodes)", ""]);
    t.row("nodes registered (all acked at once)", format!("{:.2} s", register_s), "~260 s", "");
    t.row("one heartbeat from every node", format!("{:.2} s", heartbeat_s), "~9.2 s", "");
    t.row("v1 rolled out in 4 waves", format!("{:.2} s", v1_s), "~73 s, no waves", "");
    t.row("controller messages for v1", thousands(v1_msgs), "1 per node", "");
    t.row(
        "snapshot (directory store)",
        format!("{:.2} s, {} chunks", snapshot_s, manifest.chunk_count),
        "delete-all-then-create",
        "",
    );
    t.row(
        "controller restart: restore",
        format!("{:.2} s ({} nodes)", restore_s, thousands(restored_nodes as u64)),
        "~20 s",
        "",
    );
    t.row("per-node catch-ups after restart", thousands(e.catchups), "n/a", "");
    t.row("v2 completed after the restart", format!("{:.2} s", v2_s), "n/a", "");
    t.row(
        "final: online / ready v2 / targeted",
        format!(
            "{} / {} / {}",
            thousands(counts.online.into()),
            thousands(st.ready.into()),
            thousands(st.targeted.into())
        ),
        "",
        "",
    );
    if let Some(m) = &mqtt {
        let f = |k: &str| m.num(k).unwrap_or(f64::NAN);
        let label = format!("over MQTT ({} nodes, embedded broker):", thousands(f("nodes") as u64));
        t.row(&label, String::new(), "", "");
        t.row("  registered (connect, register, ack)", format!("{:.2} s", f("register_s")), "", "");
        t.row("  one heartbeat from every node", format!("{:.2} s", f("heartbeat_s")), "", "");
        t.row("  one workload, every node running", format!("{:.2} s", f("distribute_s")), "", "");
    }
    let mut s = t.render();
    s.push_str(&format!(
        "  (the paper's figures are for 1M nodes: run `kole-sim bench` for kole's; set-up {:.2} s; whole demo {:.1} s wall)\n",
        build_s,
        started.elapsed().as_secs_f64()
    ));
    println!("{s}");
    if cfg.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
