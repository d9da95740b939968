//! Harness of the real-apiserver tier: a client from `KOLE_TEST_KUBECONFIG`, the CRDs installed,
//! a fresh namespace per test, and a small fleet of agents on the in-memory hub driven by the
//! real engine driver and kole-kube's controllers.

#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kole_core::agent::driver::{AgentDriverConfig, run_agent};
use kole_core::agent::{Agent, AgentConfig, AgentIdentity, MemoryAgentStore, RecordingRuntime};
use kole_core::cache::NodeCache;
use kole_core::engine::driver::{EngineDriver, EngineDriverConfig, system_clock};
use kole_core::engine::{Engine, EngineConfig};
use kole_core::snapshot::{RestoreLimits, SnapshotStore};
use kole_core::transport::memory::{MemoryConfig, MemoryHub};
use kole_core::transport::{CloudTransport, NodeTransport, TransportError};
use kole_kube::controller::ControllerConfig;
use kole_tests::fixtures;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub mod aggregated;

pub const NEEDS_APISERVER: &str = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)";

pub async fn client() -> Client {
    let path = std::env::var("KOLE_TEST_KUBECONFIG").expect("KOLE_TEST_KUBECONFIG is not set");
    let kc = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig");
    Client::try_from(cfg).expect("client")
}

/// Installs (server-side applies) every kole CRD and waits until each is established.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in kole_kube::crd::all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        api.patch(&name, &PatchParams::apply("kole-test").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
    }
    for crd in kole_kube::crd::all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        for _ in 0..100 {
            let c = api.get(&name).await.unwrap();
            let ok = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Discovery of new CRDs lags establishment by a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// A fresh namespace, unique per call.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let stamp = kole_core::clock::wall_clock_now().as_millis();
    let name = format!("{prefix}-{}-{stamp:x}", std::process::id());
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.clone());
    api.create(&PostParams::default(), &ns).await.expect("create namespace");
    name
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One controller: engine driver, workload controller (with its status writer), query controller.
pub struct ControllerUnderTest {
    pub stop: watch::Sender<bool>,
    pub tasks: Vec<JoinHandle<()>>,
    pub driver: JoinHandle<()>,
    pub cache: kole_core::cache::CacheStore<NodeCache>,
}

impl ControllerUnderTest {
    pub async fn start(client: &Client, ns: &str, hub: &MemoryHub, snapshots: Option<Arc<dyn SnapshotStore>>) -> Self {
        Self::start_with_key(client, ns, hub, snapshots, None).await
    }

    /// With `key`, the controller signs its statuses and resumes only from signed ones.
    pub async fn start_with_key(
        client: &Client,
        ns: &str,
        hub: &MemoryHub,
        snapshots: Option<Arc<dyn SnapshotStore>>,
        key: Option<Arc<kole_core::protocol::seal::DownlinkSigner>>,
    ) -> Self {
        let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud().expect("cloud side"));
        let ecfg = EngineConfig { heartbeat_interval_ms: 1_000, convergence_grace_ms: 3_000, ..Default::default() };
        let engine = match &snapshots {
            Some(s) => {
                kole_core::engine::driver::restore_engine(ecfg, s.as_ref(), &RestoreLimits::default(), kole_kube_now())
                    .await
                    .expect("restore")
                    .0
            }
            None => Engine::new(ecfg, NodeCache::new(), kole_kube_now()),
        };
        let cache = engine.store();
        let (ev_tx, ev_rx) = mpsc::channel(4096);
        let dcfg = EngineDriverConfig { tick: Duration::from_millis(200), ..Default::default() };
        let driver = EngineDriver::new(dcfg, engine, Arc::clone(&cloud), snapshots, system_clock(), ev_tx);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let driver = tokio::spawn({
            let stop_rx = stop_rx.clone();
            async move {
                let _ = driver.run(cmd_rx, stop_rx).await;
            }
        });
        let cfg = ControllerConfig {
            namespace: Some(ns.to_owned()),
            status_interval: Duration::from_millis(500),
            status_key: key,
            ..Default::default()
        };
        let shutdown = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // As kole-controller does on taking the lead.
        let reconcile = {
            let (client, ns, cmd_tx) = (client.clone(), ns.to_owned(), cmd_tx.clone());
            async move {
                kole_kube::controller::reconcile_retained_specs(&client, Some(&ns), cloud.as_ref(), &cmd_tx)
                    .await
                    .expect("reconcile retained specs");
            }
        };
        let tasks = vec![
            tokio::spawn(reconcile),
            tokio::spawn(kole_kube::controller::run_workload_controller(
                client.clone(),
                cfg.clone(),
                cmd_tx,
                ev_rx,
                None,
                shutdown(stop_rx.clone()),
            )),
            tokio::spawn(kole_kube::controller::run_query_controller(
                client.clone(),
                cfg,
                cache.clone(),
                shutdown(stop_rx),
            )),
        ];
        Self { stop, tasks, driver, cache }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(20), self.driver).await;
        for t in self.tasks {
            t.abort();
        }
    }
}

pub fn kole_kube_now() -> kole_core::model::Timestamp {
    kole_core::clock::wall_clock_now()
}

/// How many times any agent of [`spawn_agents`] applied a spec whose image names `evil`.
pub static EVIL_APPLIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `n` agents on `hub`, half `tier=cdn`, half `tier=retail`, region alternating. A workload whose
/// image names `broken` fails on every node ("exec /broken: No such file or directory"); one whose
/// image names `stuck` stays `Pending`.
pub fn spawn_agents(hub: &MemoryHub, n: usize) -> (watch::Sender<bool>, Vec<JoinHandle<()>>) {
    let (stop, stop_rx) = watch::channel(false);
    let config = Arc::new(AgentConfig::default());
    let mut tasks = Vec::new();
    for i in 0..n {
        let labels = [
            ("tier", if i % 2 == 0 { "cdn" } else { "retail" }),
            ("topology.kubernetes.io/region", if i % 3 == 0 { "east" } else { "west" }),
        ];
        let identity = AgentIdentity {
            info: Arc::new(fixtures::node_info("arm64")),
            ..fixtures::identity(&format!("edge-{i:04}"), &labels)
        };
        let name = identity.name.clone();
        let mut agent = Agent::new(config.clone(), identity, i as u32 + 1, None);
        let hub = hub.clone();
        let stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let connector = move || -> Result<Arc<dyn NodeTransport>, TransportError> {
                Ok(Arc::new(hub.connect(name.clone())?) as Arc<dyn NodeTransport>)
            };
            let mut runtime = RecordingRuntime::instant();
            runtime
                .outcome_with(|_, w| {
                    let has = |s: &[u8]| w.spec.windows(s.len()).any(|x| x == s);
                    if has(b"evil") {
                        EVIL_APPLIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    if has(b"broken") {
                        Some(kole_core::model::WorkloadPhase::Failed)
                    } else if has(b"stuck") {
                        Some(kole_core::model::WorkloadPhase::Pending)
                    } else {
                        None
                    }
                })
                .reason_with(|_, _| Some("exec /broken: No such file or directory".into()));
            let store = MemoryAgentStore::new();
            run_agent(&mut agent, &connector, &mut runtime, &store, &AgentDriverConfig::default(), stop_rx).await;
        }));
    }
    (stop, tasks)
}

pub fn hub() -> MemoryHub {
    MemoryHub::new(MemoryConfig::default())
}
