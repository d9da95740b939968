//! The assembled kole controller: Kubernetes (CRDs, snapshots, Lease) + the engine + a transport.
//!
//! ```text
//! cargo run -p kole-examples --example kole-controller -- --simulate-nodes 1000
//! ```
//!
//! Configuration by flags or environment (flag wins; `--help` lists them):
//!
//! | flag | env | default | meaning |
//! |---|---|---|---|
//! | `--kubeconfig PATH` | `KUBECONFIG` | in-cluster, then `~/.kube/config` | which cluster |
//! | `--namespace-snapshots NS` | `KOLE_NAMESPACE` | `kole-system` | namespace of snapshots and the Lease |
//! | `--watch-namespace NS` | `KOLE_WATCH_NAMESPACE` | all | where EdgeWorkloads and NodeQueries are watched |
//! | `--lease NAME` | `KOLE_LEASE` | `kole-fleet` | the Lease (one per fleet) |
//! | `--identity ID` | `KOLE_IDENTITY` | hostname | this replica's Lease identity |
//! | `--listen ADDR` | `KOLE_LISTEN` | `127.0.0.1:8080` | `/healthz`, `/readyz`, `/metrics` |
//! | `--heartbeat-ms N` | `KOLE_HEARTBEAT_MS` | `30000` | node heartbeat interval |
//! | `--snapshot-interval-ms N` | `KOLE_SNAPSHOT_INTERVAL_MS` | `60000` | snapshot period |
//! | `--status-interval-ms N` | `KOLE_STATUS_INTERVAL_MS` | `2000` | least time between status writes of one workload |
//! | `--simulate-nodes N` | `KOLE_SIMULATE_NODES` | `0` | in-process agents on the in-memory hub |
//! | `--broker URL[,URL…]` (repeatable) | `KOLE_MQTT_BROKERS` | none | MQTT broker(s) (`mqtt://host:port`); nodes are spread over a set by a stable hash of their name |
//! | `--fleet NAME` | `KOLE_FLEET` | `default` | fleet name in the topic layout |
//! | `--mqtt-user U` / `--mqtt-password P` | `KOLE_MQTT_USER` / `KOLE_MQTT_PASSWORD` | none | the controller's broker credentials |
//!
//! With `--broker`, the transport is `kole-mqtt`'s `MqttCloud` (edge agents connect to the same
//! brokers, e.g. `cargo run -p kole-examples --example mqtt_agent`); without it, kole-core's
//! in-memory hub (with `--simulate-nodes` agents on it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kole_core::agent::driver::{AgentDriverConfig, run_agent};
use kole_core::agent::{Agent, AgentConfig, AgentIdentity, MemoryAgentStore, RecordingRuntime};
use kole_core::cache::{CacheStore, NodeCache, StateCache};
use kole_core::engine::EngineConfig;
use kole_core::engine::driver::{DriverEvent, EngineDriver, EngineDriverConfig, restore_engine, system_clock};
use kole_core::model::{Labels, NodeInfo, NodeName, NodePhase, Selector};
use kole_core::snapshot::{RestoreLimits, SnapshotOptions, SnapshotStore};
use kole_core::transport::memory::{MemoryConfig, MemoryHub};
use kole_core::transport::{CloudTransport, NodeTransport, TransportError};
use kole_examples::{BrokerArgs, ControllerLoginArgs};
use kole_kube::controller::ControllerConfig;
use kole_kube::lease::{LeaderElector, LeaseConfig};
use kole_kube::snapshot::{KubeSnapshotConfig, KubeSnapshotStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// The assembled kole controller: Kubernetes (CRDs, snapshots, Lease) + the engine + a transport.
///
/// Every flag falls back to its environment variable (a flag wins).
#[derive(Debug, Parser)]
#[command(name = "kole-controller")]
struct Options {
    /// The kubeconfig of the cluster [default: in-cluster, then `~/.kube/config`].
    #[arg(long, value_name = "PATH", env = "KUBECONFIG")]
    kubeconfig: Option<String>,
    /// Namespace of the snapshots and the Lease.
    #[arg(long = "namespace-snapshots", value_name = "NS", env = "KOLE_NAMESPACE", default_value = "kole-system")]
    namespace: String,
    /// Where EdgeWorkloads and NodeQueries are watched [default: all namespaces].
    #[arg(long, value_name = "NS", env = "KOLE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The Lease (one per fleet).
    #[arg(long, value_name = "NAME", env = "KOLE_LEASE", default_value = "kole-fleet")]
    lease: String,
    /// This replica's Lease identity [default: the hostname].
    #[arg(long, value_name = "ID", env = "KOLE_IDENTITY", default_value_t = hostname(), hide_default_value = true)]
    identity: String,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, value_name = "ADDR", env = "KOLE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Node heartbeat interval, in milliseconds.
    #[arg(long, value_name = "N", env = "KOLE_HEARTBEAT_MS", default_value_t = 30_000)]
    heartbeat_ms: u32,
    /// Snapshot period, in milliseconds.
    #[arg(long, value_name = "N", env = "KOLE_SNAPSHOT_INTERVAL_MS", default_value_t = 60_000)]
    snapshot_interval_ms: u64,
    /// Least time between status writes of one workload, in milliseconds.
    #[arg(long, value_name = "N", env = "KOLE_STATUS_INTERVAL_MS", default_value_t = 2_000)]
    status_interval_ms: u64,
    /// In-process agents on the in-memory hub (without `--broker`).
    #[arg(long, value_name = "N", env = "KOLE_SIMULATE_NODES", default_value_t = 0)]
    simulate_nodes: usize,
    // With `--broker`, the transport is MQTT; without it, the in-memory hub.
    #[command(flatten)]
    mqtt: BrokerArgs,
    #[command(flatten)]
    login: ControllerLoginArgs,
}

/// The default Lease identity: the hostname, else one made of the process id.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| format!("kole-{}", std::process::id()))
}

#[derive(Default)]
struct Metrics {
    leader: AtomicBool,
    ready: AtomicBool,
    status_events: AtomicU64,
    snapshots_written: AtomicU64,
    snapshots_failed: AtomicU64,
    rejects: AtomicU64,
    cache: std::sync::Mutex<Option<CacheStore<NodeCache>>>,
}

impl Metrics {
    fn render(&self) -> String {
        let counts = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.read().counts(&Selector::everything())))
            .unwrap_or_default();
        let mut s = String::new();
        let mut line = |name: &str, help: &str, kind: &str, value: String| {
            s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        line(
            "kole_leader",
            "1 when this replica holds the Lease",
            "gauge",
            u8::from(self.leader.load(Ordering::Relaxed)).to_string(),
        );
        line(
            "kole_status_events_total",
            "Workload status changes from the engine",
            "counter",
            self.status_events.load(Ordering::Relaxed).to_string(),
        );
        line(
            "kole_snapshots_written_total",
            "Snapshot generations committed",
            "counter",
            self.snapshots_written.load(Ordering::Relaxed).to_string(),
        );
        line(
            "kole_snapshots_failed_total",
            "Snapshot writes that failed",
            "counter",
            self.snapshots_failed.load(Ordering::Relaxed).to_string(),
        );
        line(
            "kole_rejects_total",
            "Inputs refused by the engine",
            "counter",
            self.rejects.load(Ordering::Relaxed).to_string(),
        );
        s.push_str("# HELP kole_nodes Nodes in the cache by phase\n# TYPE kole_nodes gauge\n");
        for p in NodePhase::ALL {
            s.push_str(&format!("kole_nodes{{phase=\"{}\"}} {}\n", p.as_str(), counts.get(p)));
        }
        s
    }
}

/// `/healthz`, `/readyz` and `/metrics` on a plain tokio listener (one request per connection).
async fn serve(listen: String, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listen on {listen}"))?;
    loop {
        let (mut sock, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                // Ready when leading and serving, or when standing by (a standby is healthy).
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => ("200 OK", "ok\n".to_owned()),
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_owned()),
                "/metrics" => ("200 OK", metrics.render()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

fn spawn_simulated_fleet(hub: &MemoryHub, n: usize, stop: watch::Receiver<bool>) {
    let config = Arc::new(AgentConfig::default());
    for i in 0..n {
        let Ok(name) = NodeName::new(format!("sim-{i:07}")) else { continue };
        let Ok(labels) = Labels::from_pairs([
            ("tier", if i % 2 == 0 { "cdn" } else { "retail" }),
            ("topology.kubernetes.io/region", ["east", "west", "north"][i % 3]),
        ]) else {
            continue;
        };
        let identity =
            AgentIdentity { name: name.clone(), labels: Arc::new(labels), info: Arc::new(NodeInfo::default()) };
        let mut agent = Agent::new(config.clone(), identity, u32::try_from(i).unwrap_or(0) + 1, None);
        let hub = hub.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let connector = move || -> Result<Arc<dyn NodeTransport>, TransportError> {
                Ok(Arc::new(hub.connect(name.clone())?) as Arc<dyn NodeTransport>)
            };
            let mut runtime = RecordingRuntime::instant();
            run_agent(
                &mut agent,
                &connector,
                &mut runtime,
                &MemoryAgentStore::new(),
                &AgentDriverConfig::default(),
                stop,
            )
            .await;
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Options::parse();
    // kole's libraries pick no rustls crypto provider; this program uses ring (an `Err` means one is set).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?
        }
        None => kube::Client::try_default().await?,
    };
    let metrics = Arc::new(Metrics::default());
    tokio::spawn({
        let (listen, metrics) = (opts.listen.clone(), metrics.clone());
        async move {
            if let Err(e) = serve(listen, metrics).await {
                eprintln!("http server stopped: {e:#}");
            }
        }
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop_tx.send(true);
    });

    let hub = MemoryHub::new(MemoryConfig::default());
    if opts.simulate_nodes > 0 {
        spawn_simulated_fleet(&hub, opts.simulate_nodes, stop_rx.clone());
    }

    // Campaign; serve only while leading.
    let (leading_tx, mut leading_rx) = watch::channel(false);
    let elector = LeaderElector::new(client.clone(), LeaseConfig::new(&opts.namespace, &opts.lease, &opts.identity));
    let election = tokio::spawn(elector.run(leading_tx, stop_rx.clone()));
    metrics.ready.store(true, Ordering::Relaxed);
    eprintln!("{} campaigning for Lease {}/{}", opts.identity, opts.namespace, opts.lease);
    loop {
        if *stop_rx.borrow() {
            break;
        }
        if leading_rx.wait_for(|l| *l).await.is_err() {
            break;
        }
        metrics.leader.store(true, Ordering::Relaxed);
        eprintln!("{} leads: restoring from the latest snapshot", opts.identity);
        let store: Arc<dyn SnapshotStore> = Arc::new(KubeSnapshotStore::new(
            client.clone(),
            KubeSnapshotConfig { namespace: opts.namespace.clone(), ..Default::default() },
        ));
        let ecfg = EngineConfig {
            heartbeat_interval_ms: opts.heartbeat_ms,
            convergence_grace_ms: 2 * u64::from(opts.heartbeat_ms),
            snapshot_interval_ms: opts.snapshot_interval_ms,
            ..Default::default()
        };
        let (engine, manifest, faults) =
            restore_engine(ecfg, store.as_ref(), &RestoreLimits::default(), system_clock()()).await?;
        for f in faults {
            eprintln!("snapshot skipped: {f}");
        }
        eprintln!("restored {} nodes from {:?}", engine.store().read().len(), manifest.map(|m| m.generation));
        *metrics.cache.lock().map_err(|_| anyhow::anyhow!("metrics lock poisoned"))? = Some(engine.store());
        let cache = engine.store();
        // MQTT when brokers are given (a set: nodes are spread over them by a stable hash of their
        // name), the in-memory hub (with optional simulated nodes) otherwise.
        let cloud: Arc<dyn CloudTransport> = if opts.mqtt.brokers().is_empty() {
            Arc::new(hub.cloud()?)
        } else {
            let topics = kole_mqtt::Topics::new(&opts.mqtt.fleet)?;
            let credentials = match (&opts.login.mqtt_user, &opts.mqtt.mqtt_password) {
                (Some(u), Some(p)) => Some(kole_mqtt::Credentials { username: u.clone(), password: p.clone() }),
                _ => None,
            };
            let cfg = kole_mqtt::CloudConfig {
                brokers: opts.mqtt.brokers(),
                credentials,
                ..kole_mqtt::CloudConfig::default()
            };
            eprintln!("connecting to {} MQTT broker(s) for fleet {}", opts.mqtt.brokers().len(), opts.mqtt.fleet);
            Arc::new(kole_mqtt::MqttCloud::connect(topics, cfg).await?)
        };
        let (ev_tx, mut ev_rx) = mpsc::channel(8192);
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (term_tx, term_rx) = watch::channel(false);
        let dcfg = EngineDriverConfig { snapshot: SnapshotOptions::default(), ..Default::default() };
        let driver = tokio::spawn(
            EngineDriver::new(dcfg, engine, cloud, Some(store), system_clock(), ev_tx).run(cmd_rx, term_rx.clone()),
        );
        let ccfg = ControllerConfig {
            namespace: opts.watch_namespace.clone(),
            status_interval: Duration::from_millis(opts.status_interval_ms),
            ..Default::default()
        };
        let (status_tx, status_rx) = mpsc::channel(8192);
        let (other_tx, mut other_rx) = mpsc::channel(1024);
        let m = metrics.clone();
        let router = tokio::spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                match &ev {
                    DriverEvent::Status(_) => {
                        m.status_events.fetch_add(1, Ordering::Relaxed);
                    }
                    DriverEvent::SnapshotWritten(_) => {
                        m.snapshots_written.fetch_add(1, Ordering::Relaxed);
                    }
                    DriverEvent::SnapshotFailed(e) => {
                        m.snapshots_failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("snapshot failed: {e}");
                    }
                    DriverEvent::Reject(_) => {
                        m.rejects.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                let _ = status_tx.send(ev).await;
            }
        });
        let logger = tokio::spawn(async move {
            while let Some(ev) = other_rx.recv().await {
                if let DriverEvent::Engine(e) = ev {
                    eprintln!("engine: {e:?}");
                }
            }
        });
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let tasks = vec![
            tokio::spawn(kole_kube::controller::run_workload_controller(
                client.clone(),
                ccfg.clone(),
                cmd_tx,
                status_rx,
                Some(other_tx),
                until(term_rx.clone()),
            )),
            tokio::spawn(kole_kube::controller::run_query_controller(client.clone(), ccfg, cache, until(term_rx))),
        ];
        // Serve until leadership is lost or shutdown is asked for.
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = leading_rx.wait_for(|l| !*l) => eprintln!("{} lost the lease: stepping down", opts.identity),
            _ = stop.wait_for(|s| *s) => {}
        }
        let _ = term_tx.send(true);
        let _ = driver.await;
        for t in tasks {
            let _ = t.await;
        }
        router.abort();
        logger.abort();
        metrics.leader.store(false, Ordering::Relaxed);
    }
    let _ = election.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_is_well_formed() {
        Options::command().debug_assert();
    }

    /// The table at the top of this file: each flag, its environment variable and its default.
    #[test]
    fn flags_env_and_defaults_match_the_table() {
        let table = [
            ("kubeconfig", "KUBECONFIG", None),
            ("namespace-snapshots", "KOLE_NAMESPACE", Some("kole-system")),
            ("watch-namespace", "KOLE_WATCH_NAMESPACE", None),
            ("lease", "KOLE_LEASE", Some("kole-fleet")),
            ("identity", "KOLE_IDENTITY", Some(hostname().as_str())),
            ("listen", "KOLE_LISTEN", Some("127.0.0.1:8080")),
            ("heartbeat-ms", "KOLE_HEARTBEAT_MS", Some("30000")),
            ("snapshot-interval-ms", "KOLE_SNAPSHOT_INTERVAL_MS", Some("60000")),
            ("status-interval-ms", "KOLE_STATUS_INTERVAL_MS", Some("2000")),
            ("simulate-nodes", "KOLE_SIMULATE_NODES", Some("0")),
            ("broker", "KOLE_MQTT_BROKERS", None),
            ("fleet", "KOLE_FLEET", Some("default")),
            ("mqtt-user", "KOLE_MQTT_USER", None),
            ("mqtt-password", "KOLE_MQTT_PASSWORD", None),
        ]
        .map(|(flag, env, default)| (flag.to_owned(), env.to_owned(), default.map(str::to_owned)));
        let cmd = Options::command();
        let actual: Vec<_> = cmd
            .get_arguments()
            .filter_map(|a| {
                let env = a.get_env()?.to_str()?.to_owned();
                let default = a.get_default_values().first().and_then(|d| d.to_str()).map(str::to_owned);
                Some((a.get_long()?.to_owned(), env, default))
            })
            .collect();
        for row in &table {
            assert!(actual.contains(row), "{row:?} is not in {actual:?}");
        }
        assert_eq!(actual.len(), table.len(), "a flag is missing from the table: {actual:?}");
    }

    #[test]
    fn parses_a_broker_list_and_refuses_unknown_flags() {
        let parse =
            |line: &str| Options::try_parse_from(std::iter::once("kole-controller").chain(line.split_whitespace()));
        let o = parse("--simulate-nodes 1000 --broker mqtt://a:1,mqtt://b:2 --mqtt-user u --mqtt-password p")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((o.simulate_nodes, o.mqtt.brokers().len()), (1000, 2));
        assert_eq!((o.login.mqtt_user.as_deref(), o.mqtt.mqtt_password.as_deref()), (Some("u"), Some("p")));
        assert!(parse("--simulate-nodes").is_err());
        assert!(parse("--heartbeat-ms 5000000000").is_err(), "out of range for u32");
        assert!(parse("--typo 1").is_err());
    }
}
