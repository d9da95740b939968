//! `kole-sim bench --transport mqtt`: the engine behind [`MqttCloud`] and the reference fleet's
//! agents over a real MQTT broker, multiplexed over a few plain rumqttc connections.
//!
//! Three parts share the machine, each on its own thread(s):
//!
//! - the **broker**: the embedded one (its own runtime) or an external one (`--broker`);
//! - the **controller**: [`Engine::handle`] in a loop over [`MqttCloud::recv`], on a dedicated
//!   thread with a current-thread runtime, so its CPU time (engine *and* MQTT client) is that
//!   thread's time, read from `/proc/self/task/{tid}/stat`;
//! - the **simulator**: one [`Agent`] per node, on the calling thread, over `connections` rumqttc
//!   connections. Each connection publishes on its nodes' own uplink topics and subscribes to its
//!   nodes' own downlink topics; connection 0 also subscribes to the fleet, spec and group topics
//!   once and hands each message to every agent concerned (one copy per simulator instead of one
//!   per node). The broker must let the simulator's user publish on every node's uplink: the
//!   embedded broker has no ACL; for Mosquitto run a broker without the kole ACL (see
//!   `docs/mqtt.md`).
//!
//! Phases, in one run: `register_s` (every agent connected, registered and acknowledged; agents
//! connect while fewer than `register_window` registrations await their ack),
//! `heartbeat_s` (one heartbeat from every node, all due at once: the agents' clock jumps one
//! heartbeat interval), `distribute_s` (one broadcast workload until the controller reports every
//! targeted node running).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kole_core::agent::{Agent, AgentConfig, AgentEvent, AgentInput, AgentOutputs, GroupChange, RecordingRuntime};
use kole_core::cache::NodeCache;
use kole_core::engine::{Engine, EngineConfig, EngineStats, Input, Outputs, RolloutPhase, WorkloadCommand};
use kole_core::model::{NodeName, RolloutStrategy, Selector, Timestamp, Workload, WorkloadId};
use kole_core::protocol::{self, GroupName, Message};
use kole_core::transport::{CloudTransport, Destination, MessageTransport, NodeDelivery, TransportError};
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, CloudConfig, MqttCloud, uplink_qos};
use rumqttc::{AsyncClient, ClientError, Event, EventLoop, MqttOptions, Packet, QoS, Request, SubscribeFilter};
use tokio::sync::mpsc;

use crate::dataset::ReferenceFleet;
use crate::procfs::{self, current_tid, peak_rss_of, thread_cpu_seconds, thread_cpu_split};
use crate::report::{Figures, Table, bytes, thousands};

/// What to benchmark.
#[derive(Clone, Debug)]
pub struct MqttBenchConfig {
    /// Fleet size.
    pub nodes: usize,
    /// Seed of the reference fleet.
    pub seed: u64,
    /// The broker; `None` starts the embedded one.
    pub broker: Option<BrokerAddr>,
    /// Process id of a local external broker, to report its peak RSS (`broker_rss_bytes`).
    pub broker_pid: Option<u32>,
    /// MQTT connections the simulated nodes share. Default 8.
    pub connections: usize,
    /// The controller's connections to the broker ([`CloudConfig::connections_per_broker`]).
    /// Default 2.
    pub controller_connections: usize,
    /// Subscribe to each node's own downlink topic (`true`, the default: the broker routes per
    /// node, as for real nodes) or to one `down/node/+` wildcard on connection 0.
    pub per_node_subscriptions: bool,
    /// Most in-flight QoS 1 publishes per simulator connection. Default 4,096.
    pub inflight: u16,
    /// Longest a phase may take before the bench gives up. Default 600 s.
    pub phase_timeout: Duration,
    /// Agents connect while fewer than this many wait for their registration ack. Default 50,000.
    pub register_window: usize,
    /// The controller's uplink subscriptions at QoS 0 instead of 1
    /// ([`CloudConfig::uplink_subscription_qos`]).
    pub controller_qos0: bool,
}

impl Default for MqttBenchConfig {
    fn default() -> Self {
        Self {
            nodes: 100_000,
            seed: 42,
            broker: None,
            broker_pid: None,
            connections: 8,
            controller_connections: 2,
            per_node_subscriptions: true,
            inflight: 4_096,
            phase_timeout: Duration::from_secs(600),
            register_window: 50_000,
            controller_qos0: false,
        }
    }
}

/// The MQTT benchmark could not produce meaningful figures.
#[derive(Debug, thiserror::Error)]
pub enum MqttBenchError {
    /// The broker, a connection or a runtime could not be set up.
    #[error("setting up the MQTT bench failed: {0}")]
    Setup(String),
    /// A phase did not finish within [`MqttBenchConfig::phase_timeout`].
    #[error("{phase} did not finish within {timeout:?}: {detail}")]
    Timeout {
        /// The phase.
        phase: &'static str,
        /// The timeout.
        timeout: Duration,
        /// How far it got.
        detail: String,
    },
}

pub(crate) fn setup(e: impl std::fmt::Display) -> MqttBenchError {
    MqttBenchError::Setup(e.to_string())
}

/// What the controller thread publishes for the orchestrator (written after every engine call).
#[derive(Debug, Default)]
pub(crate) struct ControllerView {
    pub(crate) tid: AtomicU64,
    pub(crate) registered: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) targeted: AtomicU64,
    pub(crate) ready: AtomicU64,
    pub(crate) complete: AtomicBool,
    pub(crate) send_failures: AtomicU64,
    pub(crate) inbox_dropped: AtomicU64,
    pub(crate) received: AtomicU64,
    /// The thread's CPU time when it finished, in microseconds.
    pub(crate) final_cpu_us: AtomicU64,
    /// The engine's counters, as of its last call.
    pub(crate) stats: std::sync::Mutex<EngineStats>,
}

impl ControllerView {
    /// Whether the watched workload's rollout is complete with every targeted node ready.
    pub(crate) fn converged(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
            && self.targeted.load(Ordering::Relaxed) > 0
            && self.ready.load(Ordering::Relaxed) == self.targeted.load(Ordering::Relaxed)
    }
}

pub(crate) enum ControllerCommand {
    Apply(Box<Workload>),
    Stop,
}

/// Runs the benchmark; `progress` receives one line per step.
pub fn run(cfg: &MqttBenchConfig, progress: &mut dyn FnMut(&str)) -> Result<Figures, MqttBenchError> {
    let n = cfg.nodes;
    let c = cfg.connections.clamp(1, 1024);
    let mut fig = Figures::default();
    fig.int("nodes", n as u64);
    fig.int("seed", cfg.seed);
    fig.str("transport", "mqtt");
    fig.int("connections", c as u64);
    fig.int("controller_connections", cfg.controller_connections as u64);
    fig.str("subscriptions", if cfg.per_node_subscriptions { "per-node" } else { "wildcard" });
    fig.int("controller_subscription_qos", u64::from(!cfg.controller_qos0));

    // The embedded broker gets a runtime (two workers) of its own, kept until the end.
    let broker_rt;
    let _embedded;
    let broker = match &cfg.broker {
        Some(b) => {
            fig.str("broker", b.to_string());
            b.clone()
        }
        None => {
            broker_rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("embedded-broker")
                .enable_all()
                .build()
                .map_err(setup)?;
            let bcfg = kole_mqtt::EmbeddedBrokerConfig {
                max_clients: 100_000,
                max_queued_per_client: (4 * n).max(100_000),
                ..Default::default()
            };
            let b = broker_rt.block_on(kole_mqtt::EmbeddedBroker::start(bcfg)).map_err(setup)?;
            fig.str("broker", "embedded");
            let addr = b.broker_addr();
            _embedded = b;
            addr
        }
    };
    progress(&format!("broker {broker}; building {} agents", thousands(n as u64)));
    // A fleet of its own per run: a long-lived broker keeps the retained specs of earlier runs.
    let fleet_name = format!("bench-{:x}-{:x}", std::process::id(), wall_nanos());
    fig.str("fleet", fleet_name.clone());
    let topics = Topics::new(&fleet_name).map_err(setup)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(setup)?;

    // The controller, on its own thread.
    let view = Arc::new(ControllerView::default());
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let controller = {
        let (view, topics, broker) = (view.clone(), topics.clone(), broker.clone());
        let cloud_cfg = CloudConfig {
            brokers: vec![broker],
            client_id: "kole-bench-controller".into(),
            connections_per_broker: cfg.controller_connections.max(1),
            inbox_capacity: (2 * n).clamp(262_144, 4_194_304),
            uplink_subscription_qos: if cfg.controller_qos0 { QoS::AtMostOnce } else { QoS::AtLeastOnce },
            ..CloudConfig::default()
        };
        let capacity = n;
        std::thread::Builder::new()
            .name("controller".into())
            .spawn(move || controller_thread(topics, cloud_cfg, engine_cfg(), capacity, view, cmd_rx, ready_tx))
            .map_err(setup)?
    };
    match ready_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(MqttBenchError::Setup(format!("controller: {e}"))),
        Err(_) => return Err(MqttBenchError::Setup("the controller did not connect within 30 s".into())),
    }

    let result = rt.block_on(simulate(cfg, c, &topics, &broker, &view, &cmd_tx, &mut fig, progress));
    let _ = cmd_tx.try_send(ControllerCommand::Stop);
    let _ = controller.join();
    let cpu = view.final_cpu_us.load(Ordering::Relaxed) as f64 / 1e6;
    result?;
    fig.float("controller_cpu_s", cpu);
    fig.int("controller_inbox_dropped", view.inbox_dropped.load(Ordering::Relaxed));
    fig.int("controller_send_failures", view.send_failures.load(Ordering::Relaxed));
    fig.int("controller_received", view.received.load(Ordering::Relaxed));
    if let Some(pid) = cfg.broker_pid
        && let Some(rss) = peak_rss_of(pid)
    {
        fig.int("broker_rss_bytes", rss);
    }
    fig.int("peak_rss_bytes", procfs::peak_rss_bytes().unwrap_or(0));
    Ok(fig)
}

/// The simulator side and the phases.
#[allow(clippy::too_many_arguments)]
async fn simulate(
    cfg: &MqttBenchConfig,
    c: usize,
    topics: &Topics,
    broker: &BrokerAddr,
    view: &ControllerView,
    cmd_tx: &mpsc::Sender<ControllerCommand>,
    fig: &mut Figures,
    progress: &mut dyn FnMut(&str),
) -> Result<(), MqttBenchError> {
    let n = cfg.nodes;
    let mut fleet = SimFleet::new(cfg, c, topics.clone());
    let t = Instant::now();
    let (down_tx, down_rx) = mpsc::channel(65_536);
    let mut tasks = Vec::new();
    let acks = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    for i in 0..c {
        let mut o = MqttOptions::new(format!("kole-bench-sim-{i}"), broker.host.clone(), broker.port);
        o.set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true)
            .set_max_packet_size(256 * 1024, 256 * 1024)
            .set_inflight(cfg.inflight.max(1))
            .set_request_channel_capacity(65_536);
        let (client, eventloop) = AsyncClient::new(o, 65_536);
        tasks.push(tokio::spawn(connection(eventloop, down_tx.clone(), acks.clone(), errors.clone())));
        fleet.clients.push(client);
    }
    drop(down_tx);
    progress(&format!("subscribing {} connections", c));
    let mut packets = 0u64;
    let mut filters: Vec<Vec<String>> = vec![Vec::new(); c];
    filters[0].push(topics.downlink(&Destination::Fleet));
    filters[0].push(format!("{}/down/spec/+/+", topics.base()));
    if cfg.per_node_subscriptions {
        for (i, a) in fleet.agents.iter().enumerate() {
            filters[i % c].push(topics.downlink(&Destination::Node(a.name().clone())));
        }
    } else {
        filters[0].push(format!("{}/down/node/+", topics.base()));
    }
    for (i, list) in filters.into_iter().enumerate() {
        for chunk in list.chunks(1_000) {
            let f = chunk.iter().map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
            fleet.clients[i].subscribe_many(f).await.map_err(setup)?;
            packets += 1;
        }
    }
    let deadline = Instant::now() + cfg.phase_timeout;
    while acks.load(Ordering::Relaxed) < packets + c as u64 {
        // `acks` counts CONNACKs and SUBACKs.
        if Instant::now() > deadline || errors.load(Ordering::Relaxed) > 0 {
            return Err(MqttBenchError::Timeout {
                phase: "subscribing",
                timeout: cfg.phase_timeout,
                detail: format!(
                    "{} of {} acks, {} connection errors",
                    acks.load(Ordering::Relaxed),
                    packets + c as u64,
                    errors.load(Ordering::Relaxed)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fig.float("subscribe_s", t.elapsed().as_secs_f64());

    let mut down_rx = down_rx;
    let timeout = cfg.phase_timeout;
    let fail = |phase, detail: String| MqttBenchError::Timeout { phase, timeout, detail };

    progress(&format!(
        "registering every node (connect, register, ack; at most {} registrations outstanding)",
        thousands(cfg.register_window as u64)
    ));
    let t = Instant::now();
    fleet.register_window = cfg.register_window.max(1);
    let ok = fleet
        .run_until(&mut down_rx, t + timeout, |f| {
            f.registered >= n as u64 && view.registered.load(Ordering::Relaxed) >= n as u64
        })
        .await;
    if !ok {
        return Err(fail(
            "registration",
            format!(
                "{} agents acknowledged, {} known to the controller",
                fleet.registered,
                view.registered.load(Ordering::Relaxed)
            ),
        ));
    }
    fig.float("register_s", t.elapsed().as_secs_f64());
    progress(&format!("  controller after registration: {}", engine_counts(view)));

    progress("one heartbeat from every node, all due at once");
    let tid = view.tid.load(Ordering::Relaxed);
    let before = view.heartbeats.load(Ordering::Relaxed);
    let cpu0 = thread_cpu_split(tid);
    let t = Instant::now();
    fleet.offset_ms += u64::from(EngineConfig::default().heartbeat_interval_ms);
    let ok = fleet
        .run_until(&mut down_rx, t + timeout, |_| view.heartbeats.load(Ordering::Relaxed) >= before + n as u64)
        .await;
    if !ok {
        return Err(fail("heartbeat", format!("{} heartbeats", view.heartbeats.load(Ordering::Relaxed) - before)));
    }
    fig.float("heartbeat_s", t.elapsed().as_secs_f64());
    record_heartbeat_cpu(fig, cpu0, thread_cpu_split(tid));
    progress(&format!("  controller after the heartbeat: {}", engine_counts(view)));

    progress("one workload to every node, until the controller reports every node running");
    let workload = bench_workload()?;
    let t = Instant::now();
    cmd_tx.send(ControllerCommand::Apply(Box::new(workload))).await.map_err(setup)?;
    let ok = fleet.run_until(&mut down_rx, t + timeout, |_| view.converged()).await;
    if !ok {
        return Err(fail(
            "distribution",
            format!("{} of {} ready", view.ready.load(Ordering::Relaxed), view.targeted.load(Ordering::Relaxed)),
        ));
    }
    fig.float("distribute_s", t.elapsed().as_secs_f64());
    progress(&format!("  controller after distribution: {}", engine_counts(view)));
    fig.int("distribute_targeted", view.targeted.load(Ordering::Relaxed));
    fig.int("sim_connection_errors", errors.load(Ordering::Relaxed));
    for client in &fleet.clients {
        let _ = client.try_disconnect();
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// The bench controller's engine settings: defaults, with a status every 100 ms so phases are
/// timed to a tenth of a second.
pub(crate) fn engine_cfg() -> EngineConfig {
    EngineConfig { status_interval_ms: 100, ..EngineConfig::default() }
}

/// The workload of the distribution phase: one broadcast spec for the edge tiers.
pub(crate) fn bench_workload() -> Result<Workload, MqttBenchError> {
    Ok(Workload {
        id: WorkloadId::new("edge-system/node-exporter").map_err(setup)?,
        version: 1,
        spec: b"image: registry.local/node-exporter:1.8.2".to_vec(),
        selector: Selector::parse("kole.dev/tier in (edge, far-edge)").map_err(setup)?,
        delivery: Default::default(),
        rollout: RolloutStrategy::default(),
    })
}

/// Records the controller thread's CPU between two readings of [`thread_cpu_split`] as
/// `heartbeat_cpu_s`, `heartbeat_cpu_user_s` and `heartbeat_cpu_sys_s` (NaN when unreadable).
pub(crate) fn record_heartbeat_cpu(fig: &mut Figures, before: Option<(f64, f64)>, after: Option<(f64, f64)>) {
    let ((u0, s0), (u1, s1)) = (before.unwrap_or((f64::NAN, f64::NAN)), after.unwrap_or((f64::NAN, f64::NAN)));
    fig.float("heartbeat_cpu_s", (u1 - u0) + (s1 - s0));
    fig.float("heartbeat_cpu_user_s", u1 - u0);
    fig.float("heartbeat_cpu_sys_s", s1 - s0);
}

/// Milliseconds since the Unix epoch.
pub(crate) fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Nanoseconds of the wall clock (a per-run salt).
pub(crate) fn wall_nanos() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
}

/// The engine counters that explain a phase, for the progress lines.
pub(crate) fn engine_counts(view: &ControllerView) -> String {
    let s = view.stats.lock().map(|s| s.clone()).unwrap_or_default();
    format!(
        "registered {} (+{} again), heartbeats {} (stale {}), status {}, catch-ups {}, unknown {}, boot mismatch {}, decode errors {}",
        s.registered_new,
        s.registered_known,
        s.heartbeats,
        s.stale,
        s.status_reports,
        s.catchups,
        s.unknown_node,
        s.boot_mismatch,
        s.decode_errors
    )
}

/// One simulator connection's event loop: hands every downlink publish to the agents' loop and
/// counts CONNACKs and SUBACKs.
async fn connection(
    mut eventloop: EventLoop,
    down: mpsc::Sender<rumqttc::Publish>,
    acks: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // Awaiting is safe: the agents' loop never waits on this connection.
                if down.send(p).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(_) | Packet::SubAck(_))) => {
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                // Clean session: a reconnect would lose the subscriptions; the phase then times
                // out and the error count says why.
                errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The simulated agents and their routing.
struct SimFleet {
    topics: Topics,
    agents: Vec<Agent>,
    index: HashMap<NodeName, u32>,
    groups: HashMap<GroupName, HashSet<u32>>,
    clients: Vec<AsyncClient>,
    /// Publishes the request channel could not take yet, per connection (bounded by what the
    /// agents emit in one round: a few messages per node).
    backlog: Vec<VecDeque<rumqttc::Publish>>,
    wakes: BTreeMap<u64, Vec<u32>>,
    wake_at: Vec<u64>,
    runtime: RecordingRuntime,
    out: AgentOutputs,
    spec_cache: Option<(Arc<[u8]>, Arc<Workload>, u16)>,
    decode_limits: protocol::DecodeLimits,
    wall_ms: u64,
    start: Instant,
    /// Added to the agents' clock (the heartbeat phase jumps it by one interval).
    offset_ms: u64,
    /// Agents acknowledged at least once, and how many.
    acked: Vec<bool>,
    registered: u64,
    /// Agents connected so far (in index order), and how many may wait for their ack at once.
    connected: usize,
    register_window: usize,
}

const NEVER: u64 = u64::MAX;

impl SimFleet {
    fn new(cfg: &MqttBenchConfig, c: usize, topics: Topics) -> Self {
        let fleet = ReferenceFleet::new(cfg.nodes, cfg.seed);
        let agents = crate::sim::reference_agents(&fleet, Arc::new(AgentConfig::default()));
        let index: HashMap<NodeName, u32> =
            agents.iter().enumerate().map(|(i, a)| (a.name().clone(), i as u32)).collect();
        let wall_ms = epoch_ms();
        Self {
            topics,
            wake_at: vec![NEVER; agents.len()],
            agents,
            index,
            groups: HashMap::new(),
            clients: Vec::with_capacity(c),
            backlog: (0..c).map(|_| VecDeque::new()).collect(),
            wakes: BTreeMap::new(),
            runtime: RecordingRuntime::instant(),
            out: AgentOutputs::default(),
            spec_cache: None,
            decode_limits: AgentConfig::default().decode_limits,
            wall_ms,
            start: Instant::now(),
            offset_ms: 0,
            acked: vec![false; cfg.nodes],
            registered: 0,
            connected: 0,
            register_window: 0,
        }
    }

    fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp::from_millis(self.wall_ms.saturating_add(elapsed).saturating_add(self.offset_ms))
    }

    /// Runs the agents (deliveries and timers) until `done` or `deadline`; whether `done` held.
    async fn run_until(
        &mut self,
        down: &mut mpsc::Receiver<rumqttc::Publish>,
        deadline: Instant,
        mut done: impl FnMut(&Self) -> bool,
    ) -> bool {
        let mut batch = Vec::with_capacity(4096);
        loop {
            self.connect_more();
            self.flush_backlog();
            self.wake_due();
            if done(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            let busy = self.backlog.iter().any(|b| !b.is_empty());
            let next = self.wakes.first_key_value().map(|(&t, _)| t).unwrap_or(NEVER);
            let wait_ms = next.saturating_sub(self.now().as_millis()).min(if busy { 1 } else { 20 });
            tokio::select! {
                k = down.recv_many(&mut batch, 4096) => {
                    if k == 0 {
                        return done(self);
                    }
                    for p in batch.drain(..) {
                        self.dispatch(p);
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            }
        }
    }

    /// Connects more agents while fewer than `register_window` wait for their ack: nodes of a
    /// real fleet come up spread by their connect backoff and the broker's accept rate, and an
    /// agent's registration timer must not run while its message waits in this simulator's own
    /// queue (which a real node does not have).
    fn connect_more(&mut self) {
        let outstanding = self.connected - self.registered as usize;
        if self.connected >= self.agents.len() || outstanding >= self.register_window {
            return;
        }
        let end = (self.connected + self.register_window - outstanding).min(self.agents.len());
        for i in self.connected..end {
            self.connected = i + 1;
            self.input(i as u32, AgentInput::Connected);
        }
    }

    fn wake_due(&mut self) {
        let now = self.now().as_millis();
        while let Some(entry) = self.wakes.first_entry() {
            let at = *entry.key();
            if at > now {
                break;
            }
            for id in entry.remove() {
                if self.wake_at[id as usize] == at {
                    self.wake_at[id as usize] = NEVER;
                    self.input(id, AgentInput::Tick);
                }
            }
        }
    }

    fn dispatch(&mut self, p: rumqttc::Publish) {
        let Ok(from) = self.topics.parse_downlink(&p.topic) else { return };
        let payload: Arc<[u8]> = Arc::from(&p.payload[..]);
        let d = NodeDelivery { from, payload, retained: p.retain };
        let targets: Vec<u32> = match &d.from {
            Destination::Node(name) => self.index.get(name).copied().into_iter().collect(),
            Destination::Fleet | Destination::WorkloadSpec(_) => (0..self.agents.len() as u32).collect(),
            Destination::Group(g) | Destination::GroupWorkloadSpec(g, _) => {
                self.groups.get(g).map(|m| m.iter().copied().collect()).unwrap_or_default()
            }
        };
        let shared = if matches!(d.from, Destination::WorkloadSpec(_) | Destination::GroupWorkloadSpec(..)) {
            self.shared_spec(&d.payload)
        } else {
            None
        };
        for i in targets {
            match &shared {
                Some((w, t)) => {
                    self.input(i, AgentInput::SharedSpec { workload: w, wave_threshold: *t, from: &d.from })
                }
                None => self.input(i, AgentInput::Delivery(&d)),
            }
        }
    }

    /// A fan-out spec decoded once for every agent (as `sim.rs` does).
    fn shared_spec(&mut self, payload: &Arc<[u8]>) -> Option<(Arc<Workload>, u16)> {
        if let Some((p, w, t)) = &self.spec_cache
            && p[..] == payload[..]
        {
            return Some((Arc::clone(w), *t));
        }
        match protocol::decode_downlink(payload, &self.decode_limits) {
            Ok(Message::WorkloadSpec(s)) => {
                let w = Arc::new(s.workload);
                self.spec_cache = Some((Arc::clone(payload), Arc::clone(&w), s.wave_threshold));
                Some((w, s.wave_threshold))
            }
            _ => None,
        }
    }

    fn input(&mut self, id: u32, input: AgentInput<'_>) {
        let i = id as usize;
        let now = self.now();
        let c = i % self.clients.len().max(1);
        self.out.clear();
        self.agents[i].handle(input, now, &mut self.runtime, &mut self.out);
        for p in self.out.publish.drain(..) {
            let topic = self.topics.uplink(self.agents[i].name(), p.kind);
            let mut msg = rumqttc::Publish::new(topic, uplink_qos(p.kind), p.payload);
            msg.retain = false;
            if self.backlog[c].is_empty() {
                if let Err(back) = try_send(&self.clients[c], msg) {
                    self.backlog[c].push_back(back);
                }
            } else {
                self.backlog[c].push_back(msg);
            }
        }
        for g in self.out.groups.drain(..) {
            match g {
                GroupChange::Subscribe(g) => {
                    let members = self.groups.entry(g.clone()).or_default();
                    if members.is_empty() {
                        // One subscription per group for the whole simulator (connection 0).
                        let _ = self.clients[0].try_subscribe(self.topics.group_filter(&g), QoS::AtLeastOnce);
                    }
                    members.insert(id);
                }
                GroupChange::Unsubscribe(g) => {
                    if let Some(m) = self.groups.get_mut(&g) {
                        m.remove(&id);
                    }
                }
            }
        }
        if !self.acked[i] && self.out.events.iter().any(|e| matches!(e, AgentEvent::Registered { .. })) {
            // Distinct agents: a retried registration is acknowledged more than once.
            self.acked[i] = true;
            self.registered += 1;
        }
        if let Some(at) = self.out.next_wake {
            let at = at.as_millis();
            if at != self.wake_at[i] {
                self.wake_at[i] = at;
                self.wakes.entry(at).or_default().push(id);
            }
        }
    }

    fn flush_backlog(&mut self) {
        for (c, backlog) in self.backlog.iter_mut().enumerate() {
            while let Some(msg) = backlog.pop_front() {
                if let Err(back) = try_send(&self.clients[c], msg) {
                    backlog.push_front(back);
                    break;
                }
            }
        }
    }
}

/// Hands a publish to a connection without waiting; gives it back when the channel is full.
fn try_send(client: &AsyncClient, msg: rumqttc::Publish) -> Result<(), rumqttc::Publish> {
    let rumqttc::Publish { topic, qos, retain, payload, .. } = msg;
    match client.try_publish(topic, qos, retain, payload) {
        Ok(()) => Ok(()),
        Err(ClientError::TryRequest(Request::Publish(p))) => Err(p),
        // The connection is gone: the phase will time out and report the connection errors.
        Err(_) => Ok(()),
    }
}

/// The controller: the engine over [`MqttCloud`], on this (dedicated) thread.
pub(crate) fn controller_thread(
    topics: Topics,
    cloud_cfg: CloudConfig,
    engine_cfg: EngineConfig,
    capacity: usize,
    view: Arc<ControllerView>,
    mut commands: mpsc::Receiver<ControllerCommand>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    view.tid.store(current_tid().unwrap_or(0), Ordering::Relaxed);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let shared = view.clone();
    rt.block_on(async move {
        let view = shared;
        let cloud = match MqttCloud::connect(topics, cloud_cfg).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let clock = kole_core::engine::driver::system_clock();
        // Status every 100 ms, so the distribution phase is timed to a tenth of a second.
        let mut engine = Engine::new(engine_cfg, NodeCache::with_capacity(capacity, 28), clock());
        let mut out = Outputs::default();
        let mut watched: Option<WorkloadId> = None;
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = cloud.recv(8192) => match batch {
                    Ok(batch) => {
                        engine.handle(Input::Uplink(&batch), clock(), &mut out);
                    }
                    Err(_) => break,
                },
                cmd = commands.recv() => match cmd {
                    Some(ControllerCommand::Apply(w)) => {
                        watched = Some(w.id.clone());
                        let cmd = WorkloadCommand::Apply { workload: *w, progress: None };
                        engine.handle(Input::Workload(&cmd), clock(), &mut out);
                    }
                    Some(ControllerCommand::Stop) | None => break,
                },
                _ = ticker.tick() => engine.handle(Input::Tick, clock(), &mut out),
            }
            if !out.messages.is_empty() {
                let batch = std::mem::take(&mut out.messages);
                let mut delay = Duration::from_millis(20);
                for attempt in 0.. {
                    match cloud.send(batch.clone()).await {
                        Ok(()) => break,
                        Err(TransportError::Full { .. }) if attempt < 8 => {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                        Err(_) => {
                            view.send_failures.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            let s = engine.stats();
            view.registered.store(s.registered_new, Ordering::Relaxed);
            view.heartbeats.store(s.heartbeats, Ordering::Relaxed);
            if let Ok(mut st) = view.stats.try_lock() {
                st.clone_from(s);
            }
            for st in out.statuses.iter().filter(|st| Some(&st.id) == watched.as_ref()) {
                view.targeted.store(u64::from(st.targeted), Ordering::Relaxed);
                view.ready.store(u64::from(st.ready), Ordering::Relaxed);
                view.complete.store(st.phase == RolloutPhase::Complete, Ordering::Relaxed);
            }
            out.clear();
        }
        let st = cloud.stats();
        view.inbox_dropped.store(st.dropped_full, Ordering::Relaxed);
        view.received.store(st.received, Ordering::Relaxed);
        cloud.close();
    });
    let cpu = current_tid().and_then(thread_cpu_seconds).unwrap_or(0.0);
    view.final_cpu_us.store((cpu * 1e6) as u64, Ordering::Relaxed);
}

/// The readable table: kole-over-MQTT's figures beside the KOLE paper's and the targets.
pub fn table(fig: &Figures) -> String {
    let num = |k: &str| fig.num(k).unwrap_or(f64::NAN);
    let s = |k: &str| match fig.get(k) {
        Some(crate::report::Value::Str(s)) => s.clone(),
        _ => String::new(),
    };
    let mut t = Table::new(format!(
        "kole-sim bench --transport mqtt: {} reference nodes over {} connections ({} subscriptions), broker {}",
        thousands(num("nodes") as u64),
        num("connections") as u64,
        s("subscriptions"),
        s("broker"),
    ));
    t.row("register every node (over the broker)", format!("{:.2} s", num("register_s")), "~260 s", "<= 30 s");
    t.row("one heartbeat from every node", format!("{:.2} s", num("heartbeat_s")), "~9.2 s", "n/a");
    t.row("  controller CPU for it", format!("{:.2} s", num("heartbeat_cpu_s")), "n/a", "<= 1 CPU-s");
    t.row("one workload delivered, all report running", format!("{:.2} s", num("distribute_s")), "~73 s", "<= 15 s");
    t.row("controller CPU, whole run", format!("{:.2} s", num("controller_cpu_s")), "n/a", "n/a");
    let broker_rss = fig.num("broker_rss_bytes").map_or("n/a (not a local process)".into(), |b| bytes(b as u64));
    t.row("broker peak RSS", broker_rss, "n/a", "n/a");
    let mut out = t.render();
    out.push_str(&format!(
        "  (subscribing took {:.2} s; the workload reached {} nodes; controller inbox drops {}, send failures {}; simulator connection errors {}; this process's peak RSS {})\n",
        num("subscribe_s"),
        thousands(num("distribute_targeted") as u64),
        num("controller_inbox_dropped") as u64,
        num("controller_send_failures") as u64,
        num("sim_connection_errors") as u64,
        bytes(num("peak_rss_bytes") as u64),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_fleet_over_the_embedded_broker() {
        let cfg = MqttBenchConfig {
            nodes: 300,
            connections: 3,
            phase_timeout: Duration::from_secs(60),
            ..MqttBenchConfig::default()
        };
        let fig = run(&cfg, &mut |_| {}).unwrap();
        assert_eq!(fig.num("nodes"), Some(300.0));
        assert!(fig.num("distribute_targeted").is_some_and(|t| t > 0.0));
        assert!(fig.num("controller_cpu_s").is_some_and(|c| c >= 0.0));
        assert!(fig.get("broker_rss_bytes").is_none());
        let table = table(&fig);
        assert!(table.contains("register every node"));
        assert!(fig.to_json().contains("\"transport\":\"mqtt\""));
    }
}
