//! `kole-controller`: the kole controller. Kubernetes (CRDs, snapshots, a Lease) + the engine + the
//! MQTT transport to the fleet's brokers.
//!
//! ```text
//! kole-controller --broker mqtts://broker.example:8883 --tls-ca /etc/kole/ca.crt \
//!     --mqtt-user kole-controller --mqtt-password-file /etc/kole/mqtt/password
//! kole-controller credentials --nodes-file nodes.txt --out ./fleet-credentials
//! ```
//!
//! `kole-controller --help` lists every flag and its environment variable (a flag wins).
//!
//! # Lifecycle
//!
//! Every replica campaigns for the Lease; the one that holds it restores the cache from the latest
//! snapshot, connects to the brokers (retrying with backoff while they are down: never fatal), and
//! runs the engine and the workload and query controllers. SIGTERM or SIGINT stops it taking work:
//! the controllers stop, the engine writes a final snapshot, the Lease is released (so a standby
//! takes over within about a second), and the process exits 0.
//!
//! A leader keeps leading through apiserver errors and timeouts until its renew deadline (10 s
//! without a successful renewal; the Lease lasts 15 s), then steps down. A term that ends because
//! the Lease was lost writes no final snapshot, and every snapshot write carries the term's
//! fencing token (the Lease's `leaseTransitions`), so the snapshot store refuses a deposed
//! leader's writes once the next term has written.
//!
//! # Health endpoints (`--listen`)
//!
//! - `/healthz`: 200 unless the engine driver or a controller task died unexpectedly; then 503
//!   (the replica has stepped down and released the Lease; restart it).
//! - `/readyz`: 200 when this replica does its job: a **leader** has restored, runs its controllers
//!   and has every MQTT connection up; a **standby** reached the apiserver in its last Lease round
//!   (so it can take over). 503 otherwise, and while shutting down. The body says why.
//! - `/metrics`: OpenMetrics text: leadership, engine and transport counters, nodes by phase.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kole_core::agent::driver::{AgentDriverConfig, run_agent};
use kole_core::agent::{Agent, AgentConfig, AgentIdentity, MemoryAgentStore, RecordingRuntime};
use kole_core::cache::{CacheStore, NodeCache, StateCache};
use kole_core::engine::EngineConfig;
use kole_core::engine::driver::{DriverEvent, EngineDriver, EngineDriverConfig, restore_engine, system_clock};
use kole_core::model::{Labels, NodeInfo, NodeName, NodePhase, Selector};
use kole_core::snapshot::{RestoreLimits, SnapshotOptions, SnapshotStore};
use kole_core::transport::memory::{MemoryConfig, MemoryHub};
use kole_core::transport::{CloudTransport, NodeTransport, TransportError};
use kole_examples::{BrokerArgs, ControllerLoginArgs, LogArgs, TlsArgs};
use kole_kube::controller::ControllerConfig;
use kole_kube::edgenodes::{
    EdgeNodeApiConfig, EdgeNodeServer, FrontProxyConfig, NodeSource, ServingCert, SnapshotView, Staleness,
    SubjectAccessReviewer,
};
use kole_kube::lease::{LeaderElector, LeaseConfig};
use kole_kube::snapshot::{KubeSnapshotConfig, KubeSnapshotStore};
use kole_mqtt::{CloudConfig, CloudStats, ConnectionConfig, MqttCloud, TlsSettings};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

// mimalloc: the controller allocates per MQTT message, and glibc's malloc cost it 27% of
// its heartbeat CPU (docs/benchmarks.md). Libraries leave the choice to the binary; so does kole.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The kole controller: Kubernetes (CRDs, snapshots, Lease) + the engine + the MQTT transport.
///
/// Every flag falls back to its environment variable (a flag wins). The MQTT password comes from
/// `--mqtt-password-file` or the environment variable KOLE_MQTT_PASSWORD, never from the command
/// line.
#[derive(Debug, Parser)]
#[command(name = "kole-controller", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes MQTT credentials for a fleet: a random password per node and for the controller,
    /// Mosquitto password files for the brokers' two listeners (`nodes.passwd`,
    /// `controller.passwd`: `$7$` hashes, as `mosquitto_passwd` writes; see
    /// deploy/mqtt/mosquitto.conf), the ACL, one password file per agent and the downlink signing
    /// key. Existing password files and keys are kept, so re-running adds nodes.
    Credentials(CredentialsArgs),
    /// Writes a new downlink signing key (Ed25519) to FILE (0600; an existing file is never
    /// overwritten) and prints its public key line for the agents' `--trusted-keys` file. To rotate:
    /// add the new public key to every agent's file, then switch `--signing-key`, then remove the
    /// old key (or mark it `revoked:<key id>`).
    Keygen {
        /// Where to write the secret key.
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct CredentialsArgs {
    /// File of node names, one per line (`#` starts a comment).
    #[arg(long, value_name = "FILE")]
    nodes_file: std::path::PathBuf,
    /// Directory to write into (created 0700; every file in it 0600).
    #[arg(long, value_name = "DIR")]
    out: std::path::PathBuf,
    /// The controller's MQTT user name.
    #[arg(long, value_name = "USER", default_value = "kole-controller")]
    controller_user: String,
    /// Fleet name in the topic layout (for the ACL).
    #[arg(long, value_name = "NAME", default_value = "default")]
    fleet: String,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
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
    /// How long a shutdown may take (final snapshot, Lease release), in seconds; keep it below the
    /// pod's terminationGracePeriodSeconds.
    #[arg(long, value_name = "SECS", env = "KOLE_SHUTDOWN_TIMEOUT", default_value_t = 20)]
    shutdown_timeout: u64,
    /// The downlink signing key (`ed25519-secret:<hex>`, as `credentials` or `keygen` write it;
    /// mount it from a Kubernetes Secret). Every message to the agents is signed with it; agents
    /// with `--trusted-keys` refuse anything else. Without it the downlink is unsigned (a warning
    /// says so).
    #[arg(long, value_name = "FILE", env = "KOLE_SIGNING_KEY")]
    signing_key: Option<std::path::PathBuf>,
    /// Serve the `edgenodes` aggregated API (`kubectl get edgenodes`) on this address, e.g.
    /// `0.0.0.0:6443` (deploy/edgenodes.yaml registers it). The leader answers from its cache; a
    /// standby from its newest restored snapshot, with a Warning saying how old. Off by default.
    #[arg(long, value_name = "ADDR", env = "KOLE_EDGENODES_LISTEN")]
    edgenodes_listen: Option<std::net::SocketAddr>,
    /// The edgenodes API's serving certificate (PEM chain) [default: self-signed at start].
    #[arg(long, value_name = "FILE", env = "KOLE_EDGENODES_TLS_CERT", requires = "edgenodes_tls_key")]
    edgenodes_tls_cert: Option<std::path::PathBuf>,
    /// The serving certificate's private key (PEM).
    #[arg(long, value_name = "FILE", env = "KOLE_EDGENODES_TLS_KEY", requires = "edgenodes_tls_cert")]
    edgenodes_tls_key: Option<std::path::PathBuf>,
    /// DNS name of the edgenodes Service, for the self-signed certificate.
    #[arg(long, value_name = "NAME", env = "KOLE_EDGENODES_SERVICE", default_value = "kole-edgenodes.kole-system.svc")]
    edgenodes_service: String,
    /// How often a standby restores the newest snapshot for the edgenodes API, in seconds.
    #[arg(long, value_name = "SECS", env = "KOLE_EDGENODES_STANDBY_REFRESH", default_value_t = 30)]
    edgenodes_standby_refresh: u64,
    /// In-process agents on the in-memory hub (without `--broker`), to try the controller out.
    #[arg(long, value_name = "N", env = "KOLE_SIMULATE_NODES", default_value_t = 0)]
    simulate_nodes: usize,
    // With `--broker`, the transport is MQTT; without it, the in-memory hub.
    #[command(flatten)]
    mqtt: BrokerArgs,
    #[command(flatten)]
    login: ControllerLoginArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// The default Lease identity: the hostname, else one made of the process id.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("kole-{}", std::process::id()))
}

/// What the health endpoints and the metrics read: shared by the main loop and the HTTP server.
#[derive(Debug)]
struct State {
    /// False once the engine driver or a controller task died.
    healthy: AtomicBool,
    /// Why it is not healthy.
    failure: Mutex<Option<String>>,
    /// True once shutdown began.
    stopping: AtomicBool,
    /// Leading and serving: restored, transport up, controllers running.
    serving: AtomicBool,
    /// Whether the last Lease round reached the apiserver.
    lease_reachable: watch::Receiver<bool>,
    /// Whether this replica holds the Lease (serving or still taking over).
    leading: watch::Receiver<bool>,
    /// What a leader that is not serving yet is doing.
    takeover: Mutex<&'static str>,
    /// The MQTT transport of the current term (none with the in-memory hub or while standing by).
    cloud: Mutex<Option<Arc<MqttCloud>>>,
    /// Transport counters of earlier terms (each term's transport counts from zero).
    cloud_base: Mutex<CloudStats>,
    /// The cache of the current term.
    cache: Mutex<Option<CacheStore<NodeCache>>>,
    leader_terms: AtomicU64,
    restored_nodes: AtomicU64,
    restored_generation: AtomicU64,
    status_events: AtomicU64,
    snapshots_written: AtomicU64,
    snapshots_failed: AtomicU64,
    rejects: AtomicU64,
    send_failures: AtomicU64,
    broker_connect_failures: AtomicU64,
}

impl State {
    fn new(lease_reachable: watch::Receiver<bool>, leading: watch::Receiver<bool>) -> Self {
        Self {
            healthy: AtomicBool::new(true),
            failure: Mutex::new(None),
            stopping: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            lease_reachable,
            leading,
            takeover: Mutex::new("restoring"),
            cloud: Mutex::new(None),
            cloud_base: Mutex::new(CloudStats::default()),
            cache: Mutex::new(None),
            leader_terms: AtomicU64::new(0),
            restored_nodes: AtomicU64::new(0),
            restored_generation: AtomicU64::new(0),
            status_events: AtomicU64::new(0),
            snapshots_written: AtomicU64::new(0),
            snapshots_failed: AtomicU64::new(0),
            rejects: AtomicU64::new(0),
            send_failures: AtomicU64::new(0),
            broker_connect_failures: AtomicU64::new(0),
        }
    }

    fn fail(&self, why: String) {
        tracing::error!(reason = %why, "unhealthy: stepping down; restart this replica");
        self.healthy.store(false, Ordering::Relaxed);
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
        }
    }

    fn cloud(&self) -> Option<Arc<MqttCloud>> {
        self.cloud.lock().ok().and_then(|c| c.clone())
    }

    /// The transport counters since the process started.
    fn cloud_totals(&self) -> CloudStats {
        let mut s = self.cloud_base.lock().map(|b| *b).unwrap_or_default();
        if let Some(c) = self.cloud() {
            let now = c.stats();
            s.connects += now.connects;
            s.connection_errors += now.connection_errors;
            s.received += now.received;
            s.dropped_full += now.dropped_full;
            s.bad_topic += now.bad_topic;
            s.published += now.published;
            s.oversize_dropped += now.oversize_dropped;
            s.retained_uplink_dropped += now.retained_uplink_dropped;
            s.uplink_batches += now.uplink_batches;
            s.connected = now.connected;
        }
        s
    }

    /// Ends a term: its transport's counters join the base.
    fn end_term(&self) {
        self.serving.store(false, Ordering::Relaxed);
        let total = self.cloud_totals();
        if let Ok(mut base) = self.cloud_base.lock() {
            *base = CloudStats { connected: 0, ..total };
        }
        if let Ok(mut c) = self.cloud.lock() {
            *c = None;
        }
    }

    fn set_takeover(&self, doing: &'static str) {
        if let Ok(mut t) = self.takeover.lock() {
            *t = doing;
        }
    }

    /// `/healthz`: status line and body.
    fn health(&self) -> (bool, String) {
        if self.healthy.load(Ordering::Relaxed) {
            (true, "ok\n".into())
        } else {
            let why = self.failure.lock().ok().and_then(|f| f.clone()).unwrap_or_default();
            (false, format!("unhealthy: {why}\n"))
        }
    }

    /// `/readyz`: see the program's documentation.
    fn readiness(&self, expected_connections: usize) -> (bool, String) {
        if !self.healthy.load(Ordering::Relaxed) {
            return (false, "not ready: unhealthy\n".into());
        }
        if self.stopping.load(Ordering::Relaxed) {
            return (false, "not ready: shutting down\n".into());
        }
        if self.serving.load(Ordering::Relaxed) {
            return match self.cloud() {
                None => (true, "ready: leading (in-memory transport)\n".into()),
                Some(c) => {
                    let up = c.stats().connected;
                    let msg = format!("leading, {up}/{expected_connections} MQTT connections up\n");
                    if up >= expected_connections {
                        (true, format!("ready: {msg}"))
                    } else {
                        (false, format!("not ready: {msg}"))
                    }
                }
            };
        }
        if *self.leading.borrow() {
            let doing = self.takeover.lock().map(|t| *t).unwrap_or("taking over");
            return (false, format!("not ready: leading, {doing}\n"));
        }
        if *self.lease_reachable.borrow() {
            (true, "ready: standing by (the apiserver is reachable; takes over when the Lease is free)\n".into())
        } else {
            (false, "not ready: cannot reach the apiserver for the Lease, or taking over\n".into())
        }
    }
}

/// The OpenMetrics view of [`State`], computed at each scrape.
#[derive(Debug)]
struct StateMetrics(Arc<State>);

impl Collector for StateMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut gauge = |name: &str, help: &str, v: i64| -> Result<(), std::fmt::Error> {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge("kole_leader", "1 while this replica leads and serves", i64::from(s.serving.load(Ordering::Relaxed)))?;
        gauge(
            "kole_healthy",
            "0 once the engine driver or a controller task died",
            i64::from(s.healthy.load(Ordering::Relaxed)),
        )?;
        gauge(
            "kole_restored_nodes",
            "Nodes restored from the snapshot at the latest takeover",
            load(&s.restored_nodes) as i64,
        )?;
        gauge(
            "kole_restored_generation",
            "Snapshot generation restored at the latest takeover (0: none)",
            load(&s.restored_generation) as i64,
        )?;
        let t = s.cloud_totals();
        gauge("kole_mqtt_connections_up", "MQTT connections up now", t.connected as i64)?;
        let counters: [(&str, &str, u64); 15] = [
            ("kole_leader_terms", "Times this replica took the lead", load(&s.leader_terms)),
            ("kole_status_events", "Workload status changes from the engine", load(&s.status_events)),
            ("kole_snapshots_written", "Snapshot generations committed", load(&s.snapshots_written)),
            ("kole_snapshots_failed", "Snapshot writes that failed", load(&s.snapshots_failed)),
            ("kole_rejects", "Inputs refused by the engine", load(&s.rejects)),
            ("kole_send_failures", "Downlink batches that could not be sent", load(&s.send_failures)),
            (
                "kole_broker_connect_failures",
                "Failed attempts to connect to the brokers at takeover",
                load(&s.broker_connect_failures),
            ),
            ("kole_mqtt_connects", "MQTT (re)connections", t.connects),
            (
                "kole_mqtt_connection_errors",
                "Lost MQTT connections and failed connection attempts",
                t.connection_errors,
            ),
            ("kole_mqtt_received", "Uplink messages received", t.received),
            ("kole_mqtt_dropped_full", "Uplink messages dropped because the inbox was full", t.dropped_full),
            ("kole_mqtt_bad_topic", "Messages on a topic outside the uplink layout", t.bad_topic),
            ("kole_mqtt_published", "Downlink publishes", t.published),
            (
                "kole_mqtt_oversize_dropped",
                "Downlink messages over the broker's packet limit, dropped from their batch",
                t.oversize_dropped,
            ),
            (
                "kole_mqtt_retained_uplink_dropped",
                "Uplink messages a node published retained, ignored",
                t.retained_uplink_dropped,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let cache = s.cache.lock().ok().and_then(|c| c.clone());
        let counts = cache.map(|c| c.read().counts(&Selector::everything())).unwrap_or_default();
        let mut family = encoder.encode_descriptor(
            "kole_nodes",
            "Nodes in the cache by phase",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for p in NodePhase::ALL {
            let labels = [("phase", p.as_str())];
            ConstGauge::new(counts.get(p) as i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `/healthz`, `/readyz` and `/metrics` on a plain tokio listener (one request per connection:
/// probes and scrapes do not need more).
async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    registry: Arc<prometheus_client::registry::Registry>,
    expected_connections: usize,
) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let (state, registry) = (state.clone(), registry.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let mut content_type = "text/plain; charset=utf-8";
            let (ok, body) = match path {
                "/healthz" => state.health(),
                "/readyz" => state.readiness(expected_connections),
                "/metrics" => {
                    let mut body = String::new();
                    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (true, body),
                        Err(_) => (false, "encoding the metrics failed\n".into()),
                    }
                }
                _ => {
                    let resp = "HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\nconnection: close\r\n\r\nnot found\n";
                    let _ = sock.write_all(resp.as_bytes()).await;
                    return;
                }
            };
            let code = if ok { "200 OK" } else { "503 Service Unavailable" };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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
            AgentIdentity { name: name.clone(), labels: Arc::new(labels), info: Arc::new(simulated_info(i)) };
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

/// Errors are logged once, with their causes, and give exit status 1.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Credentials(args)) => credentials(args).inspect_err(|e| eprintln!("error: {e:#}")),
        Some(Command::Keygen { out }) => keygen(&out).inspect_err(|e| eprintln!("error: {e:#}")),
        None => match cli.run.log.init() {
            Err(e) => {
                eprintln!("error: {e:#}");
                Err(e)
            }
            Ok(()) => {
                let result = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| {
                        let result = rt.block_on(run(cli.run));
                        // Abandoned tasks (an HTTP request, a simulated agent) must not hold the exit up.
                        rt.shutdown_timeout(Duration::from_secs(1));
                        result
                    });
                result.inspect_err(|e| tracing::error!("{e:#}"))
            }
        },
    };
    if result.is_ok() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}

fn credentials(args: CredentialsArgs) -> anyhow::Result<()> {
    use kole_examples::credentials::{read_nodes_file, write_fleet_credentials};
    // The ACL is written after the passwords, into the directory they created (0700).
    let nodes = read_nodes_file(&args.nodes_file)?;
    let topics = kole_mqtt::Topics::new(&args.fleet)?;
    let acl = topics.mosquitto_acl(&args.controller_user)?;
    let written = write_fleet_credentials(&args.out, &args.controller_user, &nodes)?;
    let acl_path = args.out.join("mosquitto.acl");
    kole_examples::credentials::write_private(&acl_path, acl.as_bytes())?;
    let (signer, kept_key) = kole_examples::credentials::write_signing_key(&args.out)?;
    println!(
        "{} node(s) ({} kept their password), controller user {}:",
        nodes.len(),
        written.kept,
        args.controller_user
    );
    println!("  {}  password_file of the brokers' nodes' listener (every node)", written.nodes_passwd.display());
    println!("  {}  password_file of the brokers' controller listener", written.controller_passwd.display());
    println!("  {}  Mosquitto acl_file (fleet {})", acl_path.display(), args.fleet);
    println!("  {}  the controller's password (--mqtt-password-file)", written.controller.display());
    println!("  {}/nodes/NODE.password  each agent's password (--password-file)", args.out.display());
    println!(
        "  {}/signing.key  the downlink signing key, key id {} (--signing-key){}",
        args.out.display(),
        signer.key_id(),
        if kept_key { ", kept" } else { "" }
    );
    println!("  {}/trusted-keys  its public key, for every agent (--trusted-keys)", args.out.display());
    Ok(())
}

fn keygen(out: &std::path::Path) -> anyhow::Result<()> {
    if out.exists() {
        anyhow::bail!("{} exists; keygen never overwrites a key (choose another file)", out.display());
    }
    let signer = kole_examples::credentials::new_signing_key()?;
    kole_examples::credentials::write_private(out, signer.to_text().as_bytes())?;
    eprintln!(
        "wrote {} (key id {}); the public key for the agents' --trusted-keys file:",
        out.display(),
        signer.key_id()
    );
    println!("{}", signer.public_text());
    Ok(())
}

/// How a leadership term ended.
enum TermEnd {
    /// Shutdown was asked for.
    Stop,
    /// The Lease was lost: stand by again.
    LostLease,
}

/// What every term needs.
struct Term<'a> {
    opts: &'a RunArgs,
    signer: Option<Arc<kole_core::protocol::seal::DownlinkSigner>>,
    client: kube::Client,
    state: Arc<State>,
    hub: MemoryHub,
    tls: Option<TlsSettings>,
    credentials: Option<kole_mqtt::Credentials>,
    /// The elector's fencing token: the current term's while leading.
    fencing: watch::Receiver<Option<u64>>,
    /// What the edgenodes API serves (set live while leading).
    edgenodes: Option<NodeSource>,
}

/// Waits until `rx` holds `want` (or its sender is gone).
async fn until(mut rx: watch::Receiver<bool>, want: bool) {
    let _ = rx.wait_for(|v| *v == want).await;
}

async fn run(opts: RunArgs) -> anyhow::Result<()> {
    // This program's rustls crypto provider, for the Kubernetes client (an `Err` means one is set).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let brokers = opts.mqtt.brokers();
    let tls = opts.tls.settings(&brokers)?;
    let credentials = match (&opts.login.mqtt_user, opts.mqtt.password()?) {
        (Some(u), Some(p)) => Some(kole_mqtt::Credentials { username: u.clone(), password: p }),
        (Some(u), None) => {
            tracing::warn!(user = %u, "no MQTT password (--mqtt-password-file or KOLE_MQTT_PASSWORD)");
            Some(kole_mqtt::Credentials { username: u.clone(), password: String::new() })
        }
        (None, _) => None,
    };
    let signer = match &opts.signing_key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the signing key {} (--signing-key)", path.display()))?;
            let s = kole_core::protocol::seal::DownlinkSigner::from_text(&text)
                .map_err(|e| anyhow::anyhow!("{} (--signing-key): {e}", path.display()))?;
            tracing::info!(key_id = %s.key_id(), "signing the downlink");
            Some(Arc::new(s))
        }
        None => {
            tracing::warn!(
                "no --signing-key: the downlink is unsigned, so whoever can publish on the brokers' down/ \
                 topics controls the fleet (write a key with `kole-controller credentials` or `keygen`)"
            );
            None
        }
    };
    let client = match &opts.kubeconfig {
        Some(path) => {
            let kc =
                kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading --kubeconfig {path}"))?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("the kubeconfig {path}"))?;
            kube::Client::try_from(cfg)?
        }
        None => kube::Client::try_default()
            .await
            .context("no in-cluster config and no ~/.kube/config: give --kubeconfig")?,
    };

    let (leading_tx, leading_rx) = watch::channel(false);
    let (reachable_tx, reachable_rx) = watch::channel(false);
    let state = Arc::new(State::new(reachable_rx, leading_rx.clone()));
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(StateMetrics(state.clone())));
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("listening on {} (--listen)", opts.listen))?;
    let expected_connections = brokers.len() * CloudConfig::default().connections_per_broker;
    let http = tokio::spawn(serve(listener, state.clone(), Arc::new(registry), expected_connections));

    let (stop_tx, stop_rx) = watch::channel(false);
    let signals = tokio::spawn(async move {
        match kole_examples::termination_signal().await {
            Ok(sig) => tracing::info!(signal = sig, "shutting down: no new work, final snapshot, releasing the Lease"),
            Err(e) => tracing::error!("{e:#}"),
        }
        let _ = stop_tx.send(true);
    });

    let hub = MemoryHub::new(MemoryConfig::default());
    if opts.simulate_nodes > 0 {
        spawn_simulated_fleet(&hub, opts.simulate_nodes, stop_rx.clone());
    }

    // The elector stops only after the last term wrote its final snapshot: releasing the Lease
    // earlier would let the standby restore an older generation.
    let (elector_stop_tx, elector_stop_rx) = watch::channel(false);
    let elector = LeaderElector::new(client.clone(), LeaseConfig::new(&opts.namespace, &opts.lease, &opts.identity));
    let fencing = elector.subscribe_fencing_token();
    let election = tokio::spawn(elector.run_reporting(leading_tx, reachable_tx, elector_stop_rx));
    tracing::info!(identity = %opts.identity, lease = %format!("{}/{}", opts.namespace, opts.lease), listen = %opts.listen, "campaigning");

    let edgenodes = match opts.edgenodes_listen {
        Some(addr) => Some(start_edgenodes(&opts, addr, &client, leading_rx.clone(), stop_rx.clone()).await?),
        None => None,
    };
    let term = Term { opts: &opts, signer, client, state: state.clone(), hub, tls, credentials, fencing, edgenodes };
    let mut failed = false;
    loop {
        tokio::select! {
            () = until(leading_rx.clone(), true) => {}
            () = until(stop_rx.clone(), true) => break,
        }
        if *stop_rx.borrow() {
            break;
        }
        let ended = term.lead(leading_rx.clone(), stop_rx.clone()).await;
        if let Some(source) = &term.edgenodes {
            // The standby loop restores the newest snapshot next.
            source.set_unavailable("this replica stopped leading and has not restored a snapshot yet");
        }
        match ended {
            Ok(TermEnd::Stop) => break,
            Ok(TermEnd::LostLease) => tracing::warn!("lost the Lease: standing by"),
            Err(e) => {
                state.fail(format!("{e:#}"));
                failed = true;
                break;
            }
        }
    }
    state.stopping.store(!failed, Ordering::Relaxed);
    let _ = elector_stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(5), election).await {
        Ok(_) => tracing::info!("Lease released"),
        Err(_) => tracing::warn!("releasing the Lease timed out; the standby takes over when it expires"),
    }
    if failed {
        // Stay up and unhealthy until stopped, so /healthz tells the kubelet to restart us.
        until(stop_rx, true).await;
        http.abort();
        anyhow::bail!("stopped after a failure (see above)");
    }
    http.abort();
    signals.abort();
    tracing::info!("stopped");
    Ok(())
}

/// Starts the edgenodes API: front-proxy settings from the cluster, SubjectAccessReview
/// authorization, TLS; and the standby loop that keeps a restored snapshot to serve while not
/// leading.
async fn start_edgenodes(
    opts: &RunArgs,
    addr: std::net::SocketAddr,
    client: &kube::Client,
    leading: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<NodeSource> {
    let cfg = EdgeNodeApiConfig { listen: addr, ..EdgeNodeApiConfig::default() };
    let front_proxy = FrontProxyConfig::from_cluster(client).await.context(
        "the edgenodes API (--edgenodes-listen) needs the apiserver's front-proxy settings; grant the \
         extension-apiserver-authentication-reader Role (deploy/edgenodes.yaml) or drop --edgenodes-listen",
    )?;
    let cert = match (&opts.edgenodes_tls_cert, &opts.edgenodes_tls_key) {
        (Some(c), Some(k)) => ServingCert::from_files(c, k)?,
        _ => ServingCert::SelfSigned { names: vec![opts.edgenodes_service.clone()] },
    };
    let source = NodeSource::new();
    source.set_unavailable("standing by: no snapshot restored yet");
    let authz = Arc::new(SubjectAccessReviewer::new(client.clone(), cfg.authz_cache_ttl));
    let server = EdgeNodeServer::bind(cfg, cert, front_proxy, source.clone(), authz)
        .await
        .with_context(|| format!("the edgenodes API on {addr} (--edgenodes-listen)"))?;
    tracing::info!(listen = %server.local_addr(), self_signed = server.self_signed_pem().is_some(), "serving the edgenodes API");
    tokio::spawn(server.run(until(stop.clone(), true)));
    let store: Arc<dyn SnapshotStore> = Arc::new(KubeSnapshotStore::new(
        client.clone(),
        KubeSnapshotConfig { namespace: opts.namespace.clone(), ..Default::default() },
    ));
    let every = Duration::from_secs(opts.edgenodes_standby_refresh.max(1));
    let standby = source.clone();
    tokio::spawn(async move {
        loop {
            if !*leading.borrow() {
                refresh_standby_view(store.as_ref(), &standby).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = until(stop.clone(), true) => return,
                // Leading ended: restore at once rather than serve nothing for a period.
                _ = until(leading.clone(), false), if *leading.borrow() => {}
            }
        }
    });
    Ok(source)
}

/// What a simulated node reports: this machine's platform, as `kole-agent` reports it, and a
/// documentation-range address.
fn simulated_info(i: usize) -> NodeInfo {
    NodeInfo {
        arch: kole_examples::go_arch().into(),
        os: std::env::consts::OS.into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        addresses: vec![std::net::IpAddr::from([198, 51, 100, (i % 250) as u8 + 1])],
    }
}

/// Restores the newest snapshot into the edgenodes API's standby view, when it is newer.
async fn refresh_standby_view(store: &dyn SnapshotStore, source: &NodeSource) {
    let newest = match store.list_manifests().await {
        Ok(m) => m.first().map(|m| m.generation),
        Err(e) => {
            tracing::warn!(error = %e, "edgenodes standby view: listing snapshots failed");
            return;
        }
    };
    if newest.is_none() || newest == source.snapshot_generation() {
        return;
    }
    match kole_core::snapshot::restore_latest(store, &RestoreLimits::default()).await {
        Ok(Some(r)) => {
            tracing::info!(
                generation = r.manifest.generation,
                nodes = r.cache.len(),
                "edgenodes standby view restored"
            );
            source.set_snapshot(SnapshotView {
                cache: r.cache,
                staleness: Staleness { generation: r.manifest.generation, taken_at: r.manifest.created_at },
            });
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "edgenodes standby view: restoring the snapshot failed"),
    }
}

impl Term<'_> {
    /// One leadership term: restore, connect, serve until the Lease is lost or shutdown is asked
    /// for, then stop the controllers and the engine (final snapshot). An error means a task died.
    async fn lead(&self, leading: watch::Receiver<bool>, stop: watch::Receiver<bool>) -> anyhow::Result<TermEnd> {
        let opts = self.opts;
        let state = &self.state;
        let started = Instant::now();
        state.leader_terms.fetch_add(1, Ordering::Relaxed);
        tracing::info!(identity = %opts.identity, "leading: restoring from the latest snapshot");
        state.set_takeover("restoring from the snapshot");
        let store: Arc<dyn SnapshotStore> = Arc::new(KubeSnapshotStore::new(
            self.client.clone(),
            KubeSnapshotConfig { namespace: opts.namespace.clone(), ..Default::default() },
        ));
        let ecfg = EngineConfig {
            heartbeat_interval_ms: opts.heartbeat_ms,
            convergence_grace_ms: 2 * u64::from(opts.heartbeat_ms),
            snapshot_interval_ms: opts.snapshot_interval_ms,
            // Refuse at apply what the brokers could not carry (their packet limit, topic included).
            max_payload_bytes: ConnectionConfig::default().max_packet_bytes,
            ..Default::default()
        };
        let mut backoff = Duration::from_millis(500);
        let (engine, manifest, faults) = loop {
            match restore_engine(ecfg.clone(), store.as_ref(), &RestoreLimits::default(), system_clock()()).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "restoring from the snapshot failed; retrying");
                    if let Some(end) = self.pause(backoff, &leading, &stop).await {
                        return Ok(end);
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        for f in faults {
            tracing::warn!(fault = %f, "snapshot generation skipped");
        }
        let nodes = engine.store().read().len();
        state.restored_nodes.store(nodes as u64, Ordering::Relaxed);
        state.restored_generation.store(manifest.as_ref().map_or(0, |m| m.generation), Ordering::Relaxed);
        tracing::info!(nodes, generation = ?manifest.map(|m| m.generation), took = ?started.elapsed(), "restored");
        *state.cache.lock().map_err(|_| anyhow::anyhow!("state lock poisoned"))? = Some(engine.store());
        if let Some(source) = &self.edgenodes {
            source.set_live(engine.store());
        }
        let cache = engine.store();
        let engine = match &self.signer {
            Some(s) => engine.with_signer(Arc::clone(s)),
            None => engine,
        };

        state.set_takeover("connecting to the brokers");
        let cloud: Arc<dyn CloudTransport> = match self.connect(&leading, &stop).await? {
            Ok(Some(mqtt)) => mqtt,
            Ok(None) => Arc::new(self.hub.cloud()?),
            Err(end) => return Ok(end),
        };

        let (ev_tx, mut ev_rx) = mpsc::channel(8192);
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (term_tx, term_rx) = watch::channel(false);
        // The term's fencing token (published before `leading`): the snapshot store refuses this
        // term's writes once a newer term has written.
        let Some(token) = *self.fencing.borrow() else {
            return Ok(TermEnd::LostLease);
        };
        tracing::info!(fencing_token = token, "snapshot writes fenced by this term's token");
        let dcfg = EngineDriverConfig {
            snapshot: SnapshotOptions { fencing_token: token, ..SnapshotOptions::default() },
            ..Default::default()
        };
        // Whether the engine writes its final snapshot is known only when the term ends.
        let (final_snapshot_tx, final_snapshot_rx) = watch::channel(true);
        let reconcile_cloud = Arc::clone(&cloud);
        let reconcile_cmds = cmd_tx.clone();
        let mut driver = tokio::spawn(
            EngineDriver::new(dcfg, engine, cloud, Some(store), system_clock(), ev_tx)
                .with_final_snapshot_switch(final_snapshot_rx)
                .run(cmd_rx, term_rx.clone()),
        );
        let ccfg = ControllerConfig {
            status_key: self.signer.clone(),
            namespace: opts.watch_namespace.clone(),
            status_interval: Duration::from_millis(opts.status_interval_ms),
            ..Default::default()
        };
        let (status_tx, status_rx) = mpsc::channel(8192);
        let (other_tx, mut other_rx) = mpsc::channel(1024);
        let counters = state.clone();
        let router = tokio::spawn(async move {
            while let Some(ev) = ev_rx.recv().await {
                match &ev {
                    DriverEvent::Status(_) => {
                        counters.status_events.fetch_add(1, Ordering::Relaxed);
                    }
                    DriverEvent::SnapshotWritten(m) => {
                        counters.snapshots_written.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            generation = m.generation,
                            nodes = m.node_count,
                            bytes = m.total_bytes,
                            "snapshot written"
                        );
                    }
                    DriverEvent::SnapshotFailed(e) => {
                        counters.snapshots_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "snapshot failed; the previous generation stays");
                    }
                    DriverEvent::Reject(r) => {
                        counters.rejects.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(node = %r.node, reason = %r.reason, detail = %r.detail, "input rejected");
                    }
                    DriverEvent::SendFailed(e) => {
                        counters.send_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "downlink send failed");
                    }
                    _ => {}
                }
                if status_tx.send(ev).await.is_err() {
                    break;
                }
            }
        });
        let logger = tokio::spawn(async move {
            while let Some(ev) = other_rx.recv().await {
                if let DriverEvent::Engine(e) = ev {
                    tracing::debug!(event = ?e, "engine");
                }
            }
        });
        let mut tasks: Vec<JoinHandle<()>> = vec![
            tokio::spawn(kole_kube::controller::run_workload_controller(
                self.client.clone(),
                ccfg.clone(),
                cmd_tx,
                status_rx,
                Some(other_tx),
                until(term_rx.clone(), true),
            )),
            tokio::spawn(kole_kube::controller::run_query_controller(
                self.client.clone(),
                ccfg,
                cache,
                until(term_rx.clone(), true),
            )),
        ];
        // Specs of EdgeWorkloads deleted while no controller led are still retained on the broker.
        let reconciler = {
            let client = self.client.clone();
            let namespace = opts.watch_namespace.clone();
            tokio::spawn(async move {
                let r = kole_kube::controller::reconcile_retained_specs(
                    &client,
                    namespace.as_deref(),
                    reconcile_cloud.as_ref(),
                    &reconcile_cmds,
                )
                .await;
                match r {
                    Ok(r) if r.stale.is_empty() => {
                        tracing::info!(retained = r.found, "the retained specs on the broker match the EdgeWorkloads")
                    }
                    Ok(r) => tracing::warn!(
                        retained = r.found,
                        stale = ?r.stale,
                        "clearing the retained specs of EdgeWorkloads deleted while no controller led"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "could not reconcile the retained specs; a workload deleted while no controller led may run \
                         again on reconnecting nodes until the next leadership term"
                    ),
                }
            })
        };
        state.serving.store(true, Ordering::Relaxed);
        tracing::info!(took = ?started.elapsed(), "serving");

        let mut died = None;
        let end = tokio::select! {
            () = until(leading.clone(), false) => TermEnd::LostLease,
            () = until(stop.clone(), true) => TermEnd::Stop,
            r = &mut driver => {
                died = Some(match r {
                    Ok(Ok(_)) => "the engine driver stopped (its transport closed)".to_owned(),
                    Ok(Err(e)) => format!("the engine driver failed: {e}"),
                    Err(e) => format!("the engine driver task died: {e}"),
                });
                TermEnd::Stop
            }
            (r, i, _) = futures::future::select_all(tasks.iter_mut()) => {
                let which = ["workload controller", "query controller"][i.min(1)];
                died = Some(match r {
                    Ok(()) => format!("the {which} stopped"),
                    Err(e) => format!("the {which} task died: {e}"),
                });
                TermEnd::Stop
            }
        };
        // Stop taking work, then let the engine write its final snapshot: only on a clean stop
        // while leading. A deposed leader writes nothing; the new leader owns the snapshots.
        state.serving.store(false, Ordering::Relaxed);
        state.stopping.store(matches!(end, TermEnd::Stop), Ordering::Relaxed);
        if matches!(end, TermEnd::LostLease) {
            let _ = final_snapshot_tx.send(false);
            tracing::warn!("the Lease was lost: stopping without the final snapshot");
        }
        let _ = term_tx.send(true);
        let grace = Duration::from_secs(opts.shutdown_timeout);
        let stopped = tokio::time::timeout(grace, async {
            if !driver.is_finished() {
                match (&mut driver).await {
                    Ok(Ok(_)) if matches!(end, TermEnd::LostLease) => tracing::info!("engine stopped"),
                    Ok(Ok(_)) => tracing::info!("engine stopped (final snapshot written)"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "engine stopped with an error"),
                    Err(e) => tracing::warn!(error = %e, "engine task failed"),
                }
            }
            for t in &mut tasks {
                if !t.is_finished() {
                    let _ = t.await;
                }
            }
        })
        .await;
        if stopped.is_err() {
            tracing::warn!(?grace, "the engine and controllers did not stop in time (--shutdown-timeout)");
            driver.abort();
            tasks.iter().for_each(JoinHandle::abort);
        }
        router.abort();
        logger.abort();
        reconciler.abort();
        state.end_term();
        match died {
            Some(why) => anyhow::bail!(why),
            None => Ok(end),
        }
    }

    /// Sleeps `d` unless the Lease is lost or shutdown is asked for first (then says which).
    async fn pause(
        &self,
        d: Duration,
        leading: &watch::Receiver<bool>,
        stop: &watch::Receiver<bool>,
    ) -> Option<TermEnd> {
        tokio::select! {
            () = tokio::time::sleep(d) => None,
            () = until(leading.clone(), false) => Some(TermEnd::LostLease),
            () = until(stop.clone(), true) => Some(TermEnd::Stop),
        }
    }

    /// Connects to the brokers (none given: `Ok(Ok(None))`, the in-memory hub), retrying with
    /// backoff while they are down; `Ok(Err(end))` when the term ended first.
    async fn connect(
        &self,
        leading: &watch::Receiver<bool>,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Result<Option<Arc<dyn CloudTransport>>, TermEnd>> {
        let opts = self.opts;
        let brokers = opts.mqtt.brokers();
        if brokers.is_empty() {
            tracing::info!(simulated_nodes = opts.simulate_nodes, "no --broker: using the in-memory transport");
            return Ok(Ok(None));
        }
        let topics = kole_mqtt::Topics::new(&opts.mqtt.fleet)?;
        let connection = ConnectionConfig { tls: self.tls.clone(), ..CloudConfig::default().connection };
        let cfg = CloudConfig {
            brokers: brokers.clone(),
            credentials: self.credentials.clone(),
            connection,
            ..CloudConfig::default()
        };
        let list: Vec<String> = brokers.iter().map(ToString::to_string).collect();
        let mut backoff = Duration::from_secs(1);
        loop {
            match MqttCloud::connect(topics.clone(), cfg.clone()).await {
                Ok(cloud) => {
                    tracing::info!(brokers = %list.join(","), fleet = %opts.mqtt.fleet, "connected to the brokers");
                    let cloud = Arc::new(cloud);
                    *self.state.cloud.lock().map_err(|_| anyhow::anyhow!("state lock poisoned"))? = Some(cloud.clone());
                    return Ok(Ok(Some(cloud)));
                }
                Err(e) => {
                    self.state.broker_connect_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot connect to the brokers; retrying (check --broker, the credentials and --tls-ca)");
                    if let Some(end) = self.pause(backoff, leading, stop).await {
                        return Ok(Err(end));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kole-controller").chain(line.split_whitespace()))
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Each flag, its environment variable and its default (as `--help` and the docs list them).
    #[test]
    fn flags_env_and_defaults() {
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
            ("shutdown-timeout", "KOLE_SHUTDOWN_TIMEOUT", Some("20")),
            ("signing-key", "KOLE_SIGNING_KEY", None),
            ("edgenodes-listen", "KOLE_EDGENODES_LISTEN", None),
            ("edgenodes-tls-cert", "KOLE_EDGENODES_TLS_CERT", None),
            ("edgenodes-tls-key", "KOLE_EDGENODES_TLS_KEY", None),
            ("edgenodes-service", "KOLE_EDGENODES_SERVICE", Some("kole-edgenodes.kole-system.svc")),
            ("edgenodes-standby-refresh", "KOLE_EDGENODES_STANDBY_REFRESH", Some("30")),
            ("simulate-nodes", "KOLE_SIMULATE_NODES", Some("0")),
            ("broker", "KOLE_MQTT_BROKERS", None),
            ("fleet", "KOLE_FLEET", Some("default")),
            ("mqtt-password-file", "KOLE_MQTT_PASSWORD_FILE", None),
            ("mqtt-user", "KOLE_MQTT_USER", None),
            ("tls-ca", "KOLE_TLS_CA", None),
            ("tls-cert", "KOLE_TLS_CERT", None),
            ("tls-key", "KOLE_TLS_KEY", None),
            ("log-format", "KOLE_LOG_FORMAT", Some("text")),
            ("log-level", "KOLE_LOG_LEVEL", None),
        ]
        .map(|(flag, env, default)| (flag.to_owned(), env.to_owned(), default.map(str::to_owned)));
        let cmd = Cli::command();
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
    fn parses_brokers_and_the_subcommand_and_refuses_unknown_flags() {
        let o = parse("--simulate-nodes 1000 --broker mqtts://a:1,mqtts://b:2 --mqtt-user u --mqtt-password-file /p")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(o.command.is_none());
        assert_eq!((o.run.simulate_nodes, o.run.mqtt.brokers().len()), (1000, 2));
        assert_eq!(o.run.login.mqtt_user.as_deref(), Some("u"));
        let c = parse("credentials --nodes-file n.txt --out /tmp/c --fleet prod").unwrap();
        assert!(
            matches!(c.command, Some(Command::Credentials(ref a)) if a.fleet == "prod" && a.controller_user == "kole-controller")
        );
        assert!(parse("credentials --out /tmp/c").is_err(), "--nodes-file is required");
        assert!(parse("--simulate-nodes 1 credentials --nodes-file n --out o").is_err());
        assert!(parse("--simulate-nodes").is_err());
        assert!(parse("--heartbeat-ms 5000000000").is_err(), "out of range for u32");
        assert!(parse("--typo 1").is_err());
        assert!(parse("--mqtt-password secret").is_err(), "no password on the command line");
    }

    #[test]
    fn readiness_follows_the_role() {
        let (reach_tx, reach_rx) = watch::channel(false);
        let (lead_tx, lead_rx) = watch::channel(false);
        let s = State::new(reach_rx, lead_rx);
        assert!(!s.readiness(0).0, "a standby that has not reached the apiserver");
        reach_tx.send_replace(true);
        let (ok, body) = s.readiness(0);
        assert!(ok && body.contains("standing by"), "{body}");
        lead_tx.send_replace(true);
        let (ok, body) = s.readiness(0);
        assert!(!ok && body.contains("restoring"), "a leader taking over is not ready yet: {body}");
        s.serving.store(true, Ordering::Relaxed);
        assert!(s.readiness(2).1.contains("leading"));
        s.stopping.store(true, Ordering::Relaxed);
        assert!(!s.readiness(0).0, "shutting down");
        s.fail("the engine driver failed".into());
        let (ok, body) = s.health();
        assert!(!ok && body.contains("engine driver"), "{body}");
    }
}
