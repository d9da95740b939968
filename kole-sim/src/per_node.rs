//! `kole-sim bench --transport mqtt --per-node`: one real MQTT session per node, with its own
//! credentials, spread over several Mosquitto processes and several simulator processes.
//!
//! A single broker process holds at most about 19,000 connections here (20,000 open files per
//! process, a limit that cannot be raised), so the bench does what a real fleet that outgrows one
//! Mosquitto does: it starts `brokers` independent Mosquitto processes on loopback (password file
//! with one credential per node, the kole ACL), gives the controller the whole broker set
//! ([`CloudConfig::brokers`]: each node belongs to the broker its name hashes to, the controller
//! subscribes to all of them), and runs the agents in `workers` child processes of this binary
//! (`kole-sim agents …`), each below the open-file limit. Every agent is a real [`run_agent`]
//! driver over a real [`MqttConnector`] session (user name = node name), exactly as on a node.
//!
//! Phases: `register_s` (every node connected, authenticated, registered; sessions are started at
//! `connect_rate` per second overall, as a fleet coming up), `heartbeat_s` (every node's next
//! regular heartbeat, `heartbeat_interval_ms` apart), `distribute_s` (one broadcast workload until
//! every targeted node reports it running), and with `storm` a reconnect storm: broker 0 is killed
//! and restarted, and the bench records how fast its nodes come back (connects per 100 ms, summed
//! over the workers) and when all of them have registered again.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kole_core::agent::driver::{AgentDriverConfig, run_agent};
use kole_core::agent::{MemoryAgentStore, RecordingRuntime};
use kole_core::clock::wall_clock_now;
use kole_core::engine::EngineConfig;
use kole_core::model::stable_hash;
use kole_core::transport::Connector;
use kole_core::transport::{NodeTransport, TransportError};
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, CloudConfig, ConnectionConfig, Credentials, MqttConnector, NodeConfig, broker_for};
use tokio::sync::mpsc;

use crate::dataset::ReferenceFleet;
use crate::mqtt_bench::{
    ControllerCommand, ControllerView, MqttBenchError, bench_workload, controller_thread, engine_counts,
    record_batches, record_heartbeat_cpu, run_salt, setup,
};
use crate::procfs::{self, is_root, peak_rss_of, thread_cpu};
use crate::report::{Figures, bytes, thousands};

/// The controller's MQTT user name in the generated password file and ACL.
const CONTROLLER_USER: &str = "kole-controller";

/// What to benchmark.
#[derive(Clone, Debug)]
pub struct PerNodeConfig {
    /// Fleet size (one MQTT connection each).
    pub nodes: usize,
    /// Seed of the reference fleet.
    pub seed: u64,
    /// Mosquitto processes to start. Default: one per 12,500 nodes.
    pub brokers: usize,
    /// Simulator processes. Default: one per 16,000 nodes.
    pub workers: usize,
    /// New sessions per second, over all workers. Default 4,000.
    pub connect_rate: u32,
    /// Heartbeat interval the controller gives the nodes. Default 10 s.
    pub heartbeat_interval_ms: u32,
    /// Kill and restart broker 0 after the fleet converged, and measure the reconnect storm.
    pub storm: bool,
    /// Longest a phase may take. Default 600 s.
    pub phase_timeout: Duration,
    /// The `mosquitto` and `mosquitto_passwd` binaries' directory (`None`: from `PATH`).
    pub mosquitto_dir: Option<PathBuf>,
    /// [`CloudConfig::heartbeat_read_coalesce`] of the controller. Default: the controller's.
    pub heartbeat_read_coalesce: Duration,
}

impl PerNodeConfig {
    /// Defaults for `nodes` nodes.
    pub fn for_nodes(nodes: usize) -> Self {
        Self {
            nodes,
            seed: 42,
            brokers: nodes.div_ceil(12_500).max(1),
            workers: nodes.div_ceil(16_000).max(1),
            connect_rate: 4_000,
            heartbeat_interval_ms: 10_000,
            storm: false,
            phase_timeout: Duration::from_secs(600),
            mosquitto_dir: None,
            heartbeat_read_coalesce: CloudConfig::default().heartbeat_read_coalesce,
        }
    }
}

/// A node's password: derived from a per-run secret, so every run has fresh credentials.
fn password(secret: u64, node: &str) -> String {
    format!("{:016x}{:016x}", stable_hash(secret, node.as_bytes()), stable_hash(!secret, node.as_bytes()))
}

/// A running Mosquitto process and how to start it again.
struct Broker {
    bin: PathBuf,
    conf: PathBuf,
    port: u16,
    child: Option<Child>,
    peak_rss: u64,
}

impl Broker {
    fn start(bin: &Path, conf: &Path, port: u16) -> Result<Self, MqttBenchError> {
        let mut b = Self { bin: bin.to_owned(), conf: conf.to_owned(), port, child: None, peak_rss: 0 };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> Result<(), MqttBenchError> {
        let bin = &self.bin;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                setup(format!("starting {} (Debian package `mosquitto`, or --mosquitto-dir): {e}", bin.display()))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(setup(format!("mosquitto ({}) did not listen on port {}", self.conf.display(), self.port)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn note_rss(&mut self) {
        if let Some(c) = &self.child
            && let Some(rss) = peak_rss_of(c.id())
        {
            self.peak_rss = self.peak_rss.max(rss);
        }
    }

    fn kill(&mut self) {
        self.note_rss();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A worker process and what its reader thread collected.
struct Worker {
    child: Child,
    /// Its stdin: the worker exits when it closes.
    _stdin: Option<std::process::ChildStdin>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects per 100 ms bucket of the wall clock (epoch ms / 100), summed over the workers.
type ConnectHistogram = Arc<Mutex<BTreeMap<u64, u64>>>;

fn free_port() -> Result<u16, MqttBenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(setup)?;
    Ok(l.local_addr().map_err(setup)?.port())
}

/// Runs the benchmark; `progress` receives one line per step.
pub fn run(cfg: &PerNodeConfig, progress: &mut dyn FnMut(&str)) -> Result<Figures, MqttBenchError> {
    let n = cfg.nodes;
    let k = cfg.brokers.clamp(1, 64);
    let w = cfg.workers.clamp(1, 256);
    let mut fig = Figures::default();
    fig.int("nodes", n as u64);
    fig.int("seed", cfg.seed);
    fig.str("transport", "mqtt");
    fig.str("mode", "per-node");
    fig.int("connections", n as u64);
    fig.int("brokers", k as u64);
    fig.int("workers", w as u64);
    fig.int("connect_rate", u64::from(cfg.connect_rate));
    fig.int("heartbeat_read_coalesce_ms", cfg.heartbeat_read_coalesce.as_millis() as u64);

    let bin = |name: &str| cfg.mosquitto_dir.as_ref().map_or_else(|| PathBuf::from(name), |d| d.join(name));
    let dir = std::env::temp_dir().join(format!("kole-per-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(setup)?;
    let _cleanup = RemoveDir(dir.clone());

    // Credentials: one per node and the controller's, hashed by mosquitto_passwd.
    let fleet_name = format!("pernode-{:x}-{:x}", std::process::id(), run_salt());
    fig.str("fleet", fleet_name.clone());
    let topics = Topics::new(&fleet_name).map_err(setup)?;
    let secret = u64::from(run_salt()) << 32 | u64::from(std::process::id());
    let reference = ReferenceFleet::new(n, cfg.seed);
    let names: Vec<String> = (0..n).map(|i| reference.node(i).registration.name.as_str().to_owned()).collect();
    progress(&format!("writing {} credentials and the kole ACL", thousands(n as u64 + 1)));
    let t = Instant::now();
    let passwd = dir.join("passwd");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&passwd).map_err(setup)?);
        writeln!(f, "{CONTROLLER_USER}:{}", password(secret, CONTROLLER_USER)).map_err(setup)?;
        for name in &names {
            writeln!(f, "{name}:{}", password(secret, name)).map_err(setup)?;
        }
        f.flush().map_err(setup)?;
    }
    let status = Command::new(bin("mosquitto_passwd")).arg("-U").arg(&passwd).status().map_err(|e| {
        setup(format!("running mosquitto_passwd (Debian package `mosquitto`, or --mosquitto-dir): {e}"))
    })?;
    if !status.success() {
        return Err(setup(format!("mosquitto_passwd -U failed: {status}")));
    }
    let acl = dir.join("acl");
    std::fs::write(&acl, topics.mosquitto_acl(CONTROLLER_USER).map_err(setup)?).map_err(setup)?;
    fig.float("credentials_s", t.elapsed().as_secs_f64());

    progress(&format!("starting {k} Mosquitto processes"));
    let mut brokers = Vec::with_capacity(k);
    let mut addrs = Vec::with_capacity(k);
    for b in 0..k {
        let port = free_port()?;
        let conf = dir.join(format!("mosquitto-{b}.conf"));
        let user = if is_root() { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
                 persistence false\nmax_queued_messages 100000\nmax_inflight_messages 0\n\
                 message_size_limit 262144\nlog_dest file {}\nlog_type error\nlog_type warning\n",
                passwd.display(),
                acl.display(),
                dir.join(format!("mosquitto-{b}.log")).display()
            ),
        )
        .map_err(setup)?;
        brokers.push(Broker::start(&bin("mosquitto"), &conf, port)?);
        addrs.push(BrokerAddr::tcp("127.0.0.1", port));
    }
    let broker_list = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");

    // The controller, on its own thread, over the broker set.
    let view = Arc::new(ControllerView::default());
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let controller = {
        let (view, topics) = (view.clone(), topics.clone());
        let cloud_cfg = CloudConfig {
            brokers: addrs.clone(),
            credentials: Some(Credentials {
                username: CONTROLLER_USER.into(),
                password: password(secret, CONTROLLER_USER),
            }),
            client_id: CONTROLLER_USER.into(),
            inbox_capacity: (2 * n).clamp(262_144, 4_194_304),
            heartbeat_read_coalesce: cfg.heartbeat_read_coalesce,
            ..CloudConfig::default()
        };
        let engine_cfg = EngineConfig {
            status_interval_ms: 100,
            heartbeat_interval_ms: cfg.heartbeat_interval_ms,
            ..EngineConfig::default()
        };
        std::thread::Builder::new()
            .name("controller".into())
            .spawn(move || controller_thread(topics, cloud_cfg, engine_cfg, n, view, cmd_rx, ready_tx))
            .map_err(setup)?
    };
    match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(setup(format!("controller: {e}"))),
        Err(_) => return Err(setup("the controller did not connect within 30 s")),
    }

    let histogram: ConnectHistogram = Arc::default();
    let result = phases(
        cfg,
        k,
        w,
        &fleet_name,
        &broker_list,
        secret,
        &names,
        &mut brokers,
        &view,
        &cmd_tx,
        &histogram,
        &mut fig,
        progress,
    );
    let _ = cmd_tx.try_send(ControllerCommand::Stop);
    let _ = controller.join();
    for b in &mut brokers {
        b.note_rss();
    }
    let total_rss: u64 = brokers.iter().map(|b| b.peak_rss).sum();
    let max_rss = brokers.iter().map(|b| b.peak_rss).max().unwrap_or(0);
    drop(brokers);
    result?;
    fig.float("controller_cpu_s", view.final_cpu_us.load(Ordering::Relaxed) as f64 / 1e6);
    fig.int("controller_inbox_dropped", view.inbox_dropped.load(Ordering::Relaxed));
    fig.int("controller_send_failures", view.send_failures.load(Ordering::Relaxed));
    fig.int("controller_received", view.received.load(Ordering::Relaxed));
    record_batches(&mut fig, &view);
    fig.int("broker_rss_bytes", total_rss);
    fig.int("broker_rss_max_bytes", max_rss);
    fig.int("broker_bytes_per_connection", total_rss / n.max(1) as u64);
    fig.int("peak_rss_bytes", procfs::peak_rss_bytes().unwrap_or(0));
    Ok(fig)
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until `done` or the phase timeout; polls every 50 ms.
fn wait(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[allow(clippy::too_many_arguments)]
fn phases(
    cfg: &PerNodeConfig,
    k: usize,
    w: usize,
    fleet_name: &str,
    broker_list: &str,
    secret: u64,
    names: &[String],
    brokers: &mut [Broker],
    view: &ControllerView,
    cmd_tx: &mpsc::Sender<ControllerCommand>,
    histogram: &ConnectHistogram,
    fig: &mut Figures,
    progress: &mut dyn FnMut(&str),
) -> Result<(), MqttBenchError> {
    let n = cfg.nodes;
    let timeout = cfg.phase_timeout;
    let fail = |phase, detail: String| MqttBenchError::Timeout { phase, timeout, detail };
    let exe = std::env::current_exe().map_err(setup)?;
    progress(&format!(
        "starting {w} simulator processes: {} agents, one MQTT session each, {} new sessions/s",
        thousands(n as u64),
        thousands(u64::from(cfg.connect_rate))
    ));
    let t = Instant::now();
    let mut workers = Vec::with_capacity(w);
    for slice in 0..w {
        let mut child = Command::new(&exe)
            .args(["agents", "--fleet", fleet_name, "--brokers", broker_list])
            .args(["--nodes", &n.to_string(), "--seed", &cfg.seed.to_string()])
            .args(["--slice", &format!("{slice}/{w}"), "--secret", &secret.to_string()])
            .args(["--rate", &(cfg.connect_rate / w as u32).max(1).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(setup)?;
        let stdout = child.stdout.take().ok_or_else(|| setup("worker stdout"))?;
        let h = histogram.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // "C <bucket> <count>": connects in one 100 ms bucket of the wall clock.
                let mut it = line.split_whitespace();
                if it.next() == Some("C")
                    && let (Some(Ok(b)), Some(Ok(c))) =
                        (it.next().map(str::parse::<u64>), it.next().map(str::parse::<u64>))
                    && let Ok(mut h) = h.lock()
                {
                    *h.entry(b).or_default() += c;
                }
            }
        });
        let stdin = child.stdin.take();
        workers.push(Worker { child, _stdin: stdin });
    }

    progress("registering every node (connect, authenticate, subscribe, register, ack)");
    let mut last = Instant::now();
    let ok = wait(timeout, || {
        if last.elapsed() > Duration::from_secs(5) {
            last = Instant::now();
            progress(&format!("  {} registered", thousands(view.registered.load(Ordering::Relaxed))));
        }
        view.registered.load(Ordering::Relaxed) >= n as u64
    });
    if !ok {
        return Err(fail("registration", format!("{} of {n} registered", view.registered.load(Ordering::Relaxed))));
    }
    fig.float("register_s", t.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_millis(1_200)); // the workers report connects every second
    fig.int("register_sessions", histogram.lock().map(|h| h.values().sum()).unwrap_or(0));
    progress(&format!("  controller after registration: {}", engine_counts(view)));

    progress(&format!("every node's next heartbeat ({} ms interval)", cfg.heartbeat_interval_ms));
    let tid = view.tid.load(Ordering::Relaxed);
    let before = view.heartbeats.load(Ordering::Relaxed);
    let cpu0 = thread_cpu(tid);
    let t = Instant::now();
    if !wait(timeout, || view.heartbeats.load(Ordering::Relaxed) >= before + n as u64) {
        return Err(fail("heartbeat", format!("{} heartbeats", view.heartbeats.load(Ordering::Relaxed) - before)));
    }
    fig.float("heartbeat_s", t.elapsed().as_secs_f64());
    let cpu1 = thread_cpu(tid);
    record_heartbeat_cpu(fig, cpu0, cpu1, view.heartbeats.load(Ordering::Relaxed) - before);

    progress("one workload to every node, until the controller reports every node running");
    let workload = bench_workload()?;
    let t = Instant::now();
    cmd_tx.blocking_send(ControllerCommand::Apply(Box::new(workload))).map_err(setup)?;
    if !wait(timeout, || view.converged()) {
        return Err(fail(
            "distribution",
            format!("{} of {} ready", view.ready.load(Ordering::Relaxed), view.targeted.load(Ordering::Relaxed)),
        ));
    }
    fig.float("distribute_s", t.elapsed().as_secs_f64());
    fig.int("distribute_targeted", view.targeted.load(Ordering::Relaxed));
    progress(&format!("  controller after distribution: {}", engine_counts(view)));

    if cfg.storm {
        storm(cfg, k, names, brokers, view, histogram, fig, progress)?;
    }
    let mut rss = 0;
    for wk in &workers {
        rss += peak_rss_of(wk.child.id()).unwrap_or(0);
    }
    fig.int("workers_rss_bytes", rss);
    fig.int("worker_bytes_per_connection", rss / n.max(1) as u64);
    Ok(())
}

/// Kills broker 0 and starts it again on the same port after `down`; measures the reconnect
/// storm of its nodes.
#[allow(clippy::too_many_arguments)]
fn storm(
    cfg: &PerNodeConfig,
    k: usize,
    names: &[String],
    brokers: &mut [Broker],
    view: &ControllerView,
    histogram: &ConnectHistogram,
    fig: &mut Figures,
    progress: &mut dyn FnMut(&str),
) -> Result<(), MqttBenchError> {
    let on_broker0 = names.iter().filter(|n| broker_for(n, k) == 0).count() as u64;
    let down = Duration::from_secs(3);
    progress(&format!("reconnect storm: killing broker 0 ({} nodes) for {} s", thousands(on_broker0), down.as_secs()));
    let known0 = view.stats.lock().map(|s| s.registered_known).unwrap_or(0);
    let kill_bucket = wall_clock_now().as_millis() / 100;
    brokers[0].kill();
    std::thread::sleep(down);
    let t = Instant::now();
    let up_bucket = wall_clock_now().as_millis() / 100;
    brokers[0].spawn()?;
    let ok =
        wait(cfg.phase_timeout, || view.stats.lock().map(|s| s.registered_known).unwrap_or(0) >= known0 + on_broker0);
    if !ok {
        let again = view.stats.lock().map(|s| s.registered_known).unwrap_or(0) - known0;
        return Err(MqttBenchError::Timeout {
            phase: "reconnect storm",
            timeout: cfg.phase_timeout,
            detail: format!("{again} of {on_broker0} registered again"),
        });
    }
    let reregistered_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1_200)); // the workers report connects every second
    let h = histogram.lock().map(|h| h.clone()).unwrap_or_default();
    let after: Vec<(u64, u64)> = h.range(kill_bucket..).map(|(&b, &c)| (b, c)).collect();
    let reconnects: u64 = after.iter().map(|(_, c)| c).sum();
    let peak_100ms = after.iter().map(|(_, c)| *c).max().unwrap_or(0);
    let peak_1s = after
        .iter()
        .map(|&(b, _)| after.iter().filter(|&&(o, _)| o >= b && o < b + 10).map(|(_, c)| c).sum::<u64>())
        .max()
        .unwrap_or(0);
    let last = after.last().map_or(up_bucket, |(b, _)| *b);
    fig.int("storm_nodes", on_broker0);
    fig.int("storm_reconnects", reconnects);
    fig.int("storm_peak_connects_per_100ms", peak_100ms);
    fig.int("storm_peak_connects_per_s", peak_1s);
    fig.float("storm_reconnect_spread_s", last.saturating_sub(up_bucket) as f64 / 10.0);
    fig.float("storm_reregistered_s", reregistered_s);
    progress(&format!(
        "  {} reconnects, peak {} per 100 ms / {} per s, all registered again {:.1} s after the broker came back",
        thousands(reconnects),
        thousands(peak_100ms),
        thousands(peak_1s),
        reregistered_s
    ));
    Ok(())
}

/// One worker process: `kole-sim agents`, a slice of the reference fleet, one session per node.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The fleet name (topic prefix level).
    pub fleet: String,
    /// The broker set, in the controller's order.
    pub brokers: Vec<BrokerAddr>,
    /// Reference fleet size and seed.
    pub nodes: usize,
    /// Seed of the reference fleet.
    pub seed: u64,
    /// This worker runs the nodes `i` with `i % slices == slice`.
    pub slice: usize,
    /// Number of slices.
    pub slices: usize,
    /// The run's credential secret.
    pub secret: u64,
    /// New sessions per second.
    pub rate: u32,
}

/// Counts successful connects per 100 ms bucket of the wall clock.
struct CountingConnector {
    inner: MqttConnector,
    counts: Arc<ConnectCounts>,
}

struct ConnectCounts {
    start_bucket: u64,
    buckets: Vec<AtomicU32>,
    failures: AtomicU64,
}

impl ConnectCounts {
    fn new() -> Self {
        // Two hours of 100 ms buckets.
        Self {
            start_bucket: wall_clock_now().as_millis() / 100,
            buckets: (0..72_000).map(|_| AtomicU32::new(0)).collect(),
            failures: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Connector for CountingConnector {
    async fn connect(&self) -> Result<Arc<dyn NodeTransport>, TransportError> {
        let r = self.inner.connect().await;
        match &r {
            Ok(_) => {
                let i = (wall_clock_now().as_millis() / 100).saturating_sub(self.counts.start_bucket) as usize;
                if let Some(b) = self.counts.buckets.get(i) {
                    b.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.counts.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}

/// Runs a worker until its stdin closes; prints `C <bucket> <count>` lines (connects per 100 ms
/// bucket of the wall clock) every second.
pub fn worker(cfg: &WorkerConfig) -> Result<(), MqttBenchError> {
    let topics = Topics::new(&cfg.fleet).map_err(setup)?;
    let reference = ReferenceFleet::new(cfg.nodes, cfg.seed);
    let agent_cfg = Arc::new(crate::sim::simulated_agent_config());
    let agents: Vec<_> = crate::sim::reference_agents(&reference, agent_cfg)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % cfg.slices.max(1) == cfg.slice)
        .map(|(_, a)| a)
        .collect();
    let counts = Arc::new(ConnectCounts::new());
    // The parent closes our stdin (or dies): exit.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    {
        let counts = counts.clone();
        std::thread::spawn(move || {
            let mut reported = 0usize;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = ((wall_clock_now().as_millis() / 100).saturating_sub(counts.start_bucket) as usize)
                    .min(counts.buckets.len());
                let mut out = String::new();
                // Buckets before `now` are complete.
                for i in reported..now {
                    let c = counts.buckets[i].load(Ordering::Relaxed);
                    if c > 0 {
                        out.push_str(&format!("C {} {c}\n", counts.start_bucket + i as u64));
                    }
                }
                reported = now.max(reported);
                let mut stdout = std::io::stdout().lock();
                if stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                    std::process::exit(0);
                }
            }
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(setup)?;
    let node_cfg = NodeConfig {
        brokers: cfg.brokers.clone(),
        password: None,
        inbox_capacity: 64,
        connection: ConnectionConfig {
            keep_alive: Duration::from_secs(60),
            inflight: 8,
            request_channel: 64,
            ..ConnectionConfig::default()
        },
    };
    let rate = f64::from(cfg.rate.max(1));
    rt.block_on(async move {
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let start = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (j, mut agent) in agents.into_iter().enumerate() {
            let name = agent.name().clone();
            let node_cfg = NodeConfig { password: Some(password(cfg.secret, name.as_str())), ..node_cfg.clone() };
            let inner = MqttConnector::new(topics.clone(), name, node_cfg).map_err(setup)?;
            let connector = CountingConnector { inner, counts: counts.clone() };
            let at = start + Duration::from_secs_f64(j as f64 / rate);
            let stop = stop_rx.clone();
            tasks.spawn(async move {
                tokio::time::sleep_until(at).await;
                let mut runtime = RecordingRuntime::instant();
                let store = MemoryAgentStore::new();
                run_agent(&mut agent, &connector, &mut runtime, &store, &AgentDriverConfig::default(), stop).await
            });
        }
        while tasks.join_next().await.is_some() {}
        Ok::<(), MqttBenchError>(())
    })
}

/// The readable table of a per-node run.
pub fn table(fig: &Figures) -> String {
    let g = |k: &str| fig.num(k).unwrap_or(f64::NAN);
    let mut out = format!(
        "kole-sim bench --transport mqtt --per-node: {} nodes, one MQTT session each, over {} Mosquitto processes and {} simulator processes\n",
        thousands(g("nodes") as u64),
        g("brokers"),
        g("workers")
    );
    let mut row = |what: &str, v: String| out.push_str(&format!("  {what:<58} {v:>14}\n"));
    row("register every node (connect, authenticate, register)", format!("{:.2} s", g("register_s")));
    row("every node's next heartbeat", format!("{:.2} s", g("heartbeat_s")));
    row(
        "  controller CPU for it (user / system)",
        format!("{:.2} s ({:.2} / {:.2})", g("heartbeat_cpu_s"), g("heartbeat_cpu_user_s"), g("heartbeat_cpu_sys_s")),
    );
    row("  controller CPU per heartbeat", format!("{:.2} µs", g("heartbeat_cpu_us_per_msg")));
    row("uplink messages per batch into the controller's inbox", format!("{:.1}", g("controller_msgs_per_batch")));
    row("one workload delivered, all report running", format!("{:.2} s", g("distribute_s")));
    row("controller CPU, whole run", format!("{:.2} s", g("controller_cpu_s")));
    row("brokers' peak RSS (sum)", bytes(g("broker_rss_bytes") as u64));
    row("  per connection", bytes(g("broker_bytes_per_connection") as u64));
    row("simulator processes' peak RSS (sum)", bytes(g("workers_rss_bytes") as u64));
    row("  per connection", bytes(g("worker_bytes_per_connection") as u64));
    if fig.num("storm_nodes").is_some() {
        row("reconnect storm: nodes of the restarted broker", thousands(g("storm_nodes") as u64));
        row(
            "  peak connect rate (per 100 ms / per s)",
            format!("{} / {}", g("storm_peak_connects_per_100ms"), g("storm_peak_connects_per_s")),
        );
        row("  all registered again after the restart", format!("{:.2} s", g("storm_reregistered_s")));
    }
    out
}
