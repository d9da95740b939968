//! A fleet harness shared by the MQTT integration tests: a real engine behind `EngineDriver` over
//! `MqttCloud`, and real agents behind `run_agent` over `MqttConnector`.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kole_core::agent::driver::{AgentDriverConfig, DriverStats, run_agent};
use kole_core::agent::{Agent, AgentConfig, MemoryAgentStore, RecordingRuntime};
use kole_core::backoff::Backoff;
use kole_core::cache::{CacheStore, NodeCache, StateCache};
use kole_core::engine::driver::{DriverEvent, EngineDriver, EngineDriverConfig, restore_engine, system_clock};
use kole_core::engine::{Engine, EngineConfig, EngineStats, WorkloadCommand, WorkloadStatus};
use kole_core::model::{Timestamp, Workload, WorkloadId};
use kole_core::snapshot::{MemorySnapshotStore, RestoreLimits};
use kole_core::transport::CloudTransport;
use kole_mqtt::Topics;
use kole_mqtt::{CloudConfig, MqttCloud, MqttConnector, NodeConfig};
use kole_tests::fixtures;
use tokio::sync::{mpsc, watch};

pub async fn bounded<T>(secs: u64, f: impl Future<Output = T>) -> T {
    kole_tests::bounded(Duration::from_secs(secs), "test step", f).await
}

/// Workload `id` at `version` for the `tier=cdn` agents, all at once, spec `image:v{version}`.
pub fn workload(id: &str, version: u64) -> Workload {
    fixtures::workload(id, version, "tier=cdn", &[100])
}

/// The controller-restart scenario: `ctl` converges `n` agents on `w` and stops (writing its
/// shutdown snapshot to `snapshots`); a new controller restores from it, must know the `n` nodes,
/// re-applies `w` (as the workload watcher does on start), converges, and runs a few heartbeats.
/// The stats of the first and of the restored controller.
pub async fn restart_after_convergence(
    ctl: Controller,
    topics: &Topics,
    cloud: CloudConfig,
    snapshots: Arc<MemorySnapshotStore>,
    w: &Workload,
    n: u32,
) -> (EngineStats, EngineStats) {
    ctl.wait_nodes(n as usize).await;
    ctl.apply(w.clone()).await;
    ctl.wait_converged(w, n).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let first = ctl.stop().await; // writes the shutdown snapshot
    let ctl = Controller::start(topics, cloud, snapshots).await;
    assert_eq!(ctl.nodes(), n as usize, "restored from the snapshot");
    ctl.apply(w.clone()).await; // the workload watcher re-applies on start
    ctl.wait_converged(w, n).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await; // a few heartbeats
    (first, ctl.stop().await)
}

pub struct Controller {
    pub cloud: Arc<MqttCloud>,
    pub store: CacheStore<NodeCache>,
    pub statuses: Arc<Mutex<HashMap<WorkloadId, WorkloadStatus>>>,
    pub rejects: Arc<Mutex<u64>>,
    cmd: mpsc::Sender<WorkloadCommand>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Engine, kole_core::engine::driver::DriverError>>,
}

impl Controller {
    pub async fn start(topics: &Topics, cloud_cfg: CloudConfig, snapshots: Arc<MemorySnapshotStore>) -> Self {
        let cfg = EngineConfig {
            heartbeat_interval_ms: 1_000,
            convergence_grace_ms: 3_000,
            status_interval_ms: 100,
            ..EngineConfig::default()
        };
        let now = system_clock()();
        let (engine, _, _) = restore_engine(cfg, snapshots.as_ref(), &RestoreLimits::default(), now).await.unwrap();
        let store = engine.store();
        let cloud = Arc::new(MqttCloud::connect(topics.clone(), cloud_cfg).await.unwrap());
        let (ev_tx, mut ev_rx) = mpsc::channel(4096);
        let driver_cfg = EngineDriverConfig { tick: Duration::from_millis(100), ..EngineDriverConfig::default() };
        let transport: Arc<dyn CloudTransport> = cloud.clone();
        let driver = EngineDriver::new(driver_cfg, engine, transport, Some(snapshots), system_clock(), ev_tx);
        let (cmd, cmd_rx) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(driver.run(cmd_rx, stop_rx));
        let statuses = Arc::new(Mutex::new(HashMap::new()));
        let rejects = Arc::new(Mutex::new(0));
        let (s, r) = (statuses.clone(), rejects.clone());
        tokio::spawn(async move {
            while let Some(e) = ev_rx.recv().await {
                match e {
                    DriverEvent::Status(st) => {
                        s.lock().unwrap().insert(st.id.clone(), st);
                    }
                    DriverEvent::Reject(_) => *r.lock().unwrap() += 1,
                    _ => {}
                }
            }
        });
        Self { cloud, store, statuses, rejects, cmd, stop, task }
    }

    pub async fn apply(&self, w: Workload) {
        self.cmd.send(WorkloadCommand::Apply { workload: w, progress: None }).await.unwrap();
    }

    pub async fn command(&self, c: WorkloadCommand) {
        self.cmd.send(c).await.unwrap();
    }

    /// The last status the driver reported for the workload.
    pub fn status(&self, id: &WorkloadId) -> Option<WorkloadStatus> {
        self.statuses.lock().unwrap().get(id).cloned()
    }

    /// Waits until the workload's last reported status satisfies `f`.
    pub async fn wait_status(&self, id: &WorkloadId, f: impl Fn(&WorkloadStatus) -> bool) {
        while !self.status(id).is_some_and(|s| f(&s)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn nodes(&self) -> usize {
        self.store.read().len()
    }

    pub fn has_node(&self, name: &str) -> bool {
        self.store.read().slot_of(name).is_some()
    }

    /// Waits until `n` nodes are registered.
    pub async fn wait_nodes(&self, n: usize) {
        while self.nodes() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the workload's version is updated on `n` nodes.
    pub async fn wait_converged(&self, w: &Workload, n: u32) {
        loop {
            let done = self
                .statuses
                .lock()
                .unwrap()
                .get(&w.id)
                .is_some_and(|s| s.version == w.version && s.targeted == n && s.updated == n);
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the driver (writing its shutdown snapshot) and returns the engine's counters.
    pub async fn stop(self) -> EngineStats {
        self.stop.send(true).unwrap();
        let engine = self.task.await.unwrap().unwrap();
        self.cloud.close_ref();
        engine.stats().clone()
    }
}

/// Small extension so tests can close through the `Arc`.
pub trait CloseRef {
    fn close_ref(&self);
}
impl CloseRef for MqttCloud {
    fn close_ref(&self) {
        kole_core::transport::MessageTransport::close(self);
    }
}

pub struct AgentHandle {
    pub name: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<(Agent, DriverStats)>,
}

impl AgentHandle {
    pub fn start(topics: &Topics, name: &str, node_cfg: NodeConfig) -> Self {
        let identity = fixtures::identity(name, &fixtures::CDN_EAST);
        let node = identity.name.clone();
        let boot = (kole_core::model::stable_hash(7, name.as_bytes()) as u32).max(1);
        let agent_cfg = AgentConfig {
            register_retry: Backoff::new(500, 2_000, 2.0),
            runtime_poll_ms: 200,
            ..AgentConfig::default()
        };
        let mut agent = Agent::new(agent_cfg, identity, boot, None);
        let connector = MqttConnector::new(topics.clone(), node, node_cfg).unwrap();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut runtime = RecordingRuntime::new();
            let store = MemoryAgentStore::new();
            let cfg = AgentDriverConfig { reconnect: Backoff::new(200, 2_000, 2.0), max_batch: 256 };
            let stats = run_agent(&mut agent, &connector, &mut runtime, &store, &cfg, shutdown).await;
            (agent, stats)
        });
        Self { name: name.to_owned(), stop, task }
    }

    pub async fn stop(self) -> (Agent, DriverStats) {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}

pub fn now() -> Timestamp {
    system_clock()()
}
