//! `kole-sim bench --transport mqtt`: the engine behind [`kole_mqtt::MqttCloud`] and the reference
//! fleet's agents over a real MQTT broker, multiplexed over a few plain MQTT connections.
//!
//! Three parts share the machine, each on its own thread(s):
//!
//! - the **broker**: the embedded one (its own runtime) or an external one (`--broker`);
//! - the **controller** (`controller.rs`): [`kole_core::engine::Engine::handle`] in a loop over
//!   [`kole_mqtt::MqttCloud::recv`], on a dedicated thread with a current-thread runtime, so its
//!   CPU time (engine *and* MQTT client) is that thread's time, read from
//!   `/proc/self/task/{tid}/stat`;
//! - the **simulator** (`fleet.rs`): one [`kole_core::agent::Agent`] per node, on the calling
//!   thread, over `connections` connections of its own (`wire.rs`: rumqttc's packet codec, one
//!   write per batch of queued packets). Each connection publishes on its nodes' own
//!   uplink topics and subscribes to its nodes' own downlink topics; connection 0 also subscribes to
//!   the fleet, spec and group topics once and hands each message to every agent concerned (one copy
//!   per simulator instead of one per node). The broker must let the simulator's user publish on
//!   every node's uplink: the embedded broker has no ACL; for Mosquitto run a broker without the
//!   kole ACL (see `docs/mqtt.md`).
//!
//! Phases, in one run: `register_s` (every agent connected, registered and acknowledged; agents
//! connect while fewer than `register_window` registrations await their ack),
//! `heartbeat_s` (one heartbeat from every node, all due at once: the agents' clock jumps one
//! heartbeat interval), `distribute_s` (one broadcast workload until the controller reports every
//! targeted node running).

mod controller;
mod fleet;
mod report;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kole_core::clock::wall_clock_now;
use kole_core::engine::EngineConfig;
use kole_core::model::{RolloutStrategy, Selector, Workload, WorkloadId};
use kole_core::transport::Destination;
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, CloudConfig};
use rumqttc::{QoS, SubscribeFilter};
use tokio::sync::mpsc;

use crate::procfs::{self, ThreadCpu, peak_rss_of, thread_cpu};
use crate::report::{Figures, thousands};

pub(crate) use controller::{ControllerCommand, ControllerView, controller_thread, engine_counts};
use fleet::SimFleet;
pub use report::table;

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
    /// MQTT connections the simulated nodes share. `None` (the default): 8, or with per-node
    /// subscriptions one per [`MAX_SUBSCRIPTIONS_PER_CONNECTION`] nodes if that is more.
    pub connections: Option<usize>,
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
    /// [`CloudConfig::heartbeat_read_coalesce`] of the controller. Default: the controller's.
    pub heartbeat_read_coalesce: Duration,
}

impl Default for MqttBenchConfig {
    fn default() -> Self {
        Self {
            nodes: 100_000,
            seed: 42,
            broker: None,
            broker_pid: None,
            connections: None,
            controller_connections: 2,
            per_node_subscriptions: true,
            inflight: 4_096,
            phase_timeout: Duration::from_secs(600),
            register_window: 50_000,
            controller_qos0: false,
            heartbeat_read_coalesce: CloudConfig::default().heartbeat_read_coalesce,
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

/// Most per-node downlink subscriptions one simulator connection makes by default. Mosquitto 2.0
/// keeps a client's subscriptions in an array it scans for a free slot, and grows by one, on every
/// new subscription, so `n` subscriptions on one connection cost it O(n²). With 125,000 per
/// connection (1M nodes over 8) Debian's 2.0.11 dropped the connections mid-subscribe, logging
/// `disconnected due to out of memory` (it also logs that for a failed socket write); with
/// 16,384 (1M over 62) subscribing takes 7 s and nothing drops. A real node makes 3 or 4.
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 16_384;

impl MqttBenchConfig {
    /// The simulator's connection count: as configured, else 8, or one per
    /// [`MAX_SUBSCRIPTIONS_PER_CONNECTION`] nodes with per-node subscriptions if that is more.
    pub fn connection_count(&self) -> usize {
        let auto =
            if self.per_node_subscriptions { self.nodes.div_ceil(MAX_SUBSCRIPTIONS_PER_CONNECTION).max(8) } else { 8 };
        self.connections.unwrap_or(auto).clamp(1, 1024)
    }
}

/// Runs the benchmark; `progress` receives one line per step.
pub fn run(cfg: &MqttBenchConfig, progress: &mut dyn FnMut(&str)) -> Result<Figures, MqttBenchError> {
    let n = cfg.nodes;
    let c = cfg.connection_count();
    let mut fig = Figures::default();
    fig.int("nodes", n as u64);
    fig.int("seed", cfg.seed);
    fig.str("transport", "mqtt");
    fig.int("connections", c as u64);
    fig.int("controller_connections", cfg.controller_connections as u64);
    fig.str("subscriptions", if cfg.per_node_subscriptions { "per-node" } else { "wildcard" });
    fig.int("controller_subscription_qos", u64::from(!cfg.controller_qos0));
    fig.int("heartbeat_read_coalesce_ms", cfg.heartbeat_read_coalesce.as_millis() as u64);

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
    let fleet_name = format!("bench-{:x}-{:x}", std::process::id(), run_salt());
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
            heartbeat_read_coalesce: cfg.heartbeat_read_coalesce,
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
    record_batches(&mut fig, &view);
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
        let opts = wire::Options {
            host: broker.host.clone(),
            port: broker.port,
            client_id: format!("kole-bench-sim-{i}"),
            keep_alive: Duration::from_secs(60),
            inflight: cfg.inflight.max(1),
        };
        let (client, requests) = wire::client(65_536);
        let sinks = wire::Sinks { down: down_tx.clone(), acks: acks.clone(), errors: errors.clone() };
        tasks.push(tokio::spawn(wire::run(opts, requests, sinks)));
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
            let f = chunk.iter().map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)).collect();
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
    let cpu0 = thread_cpu(tid);
    let t = Instant::now();
    fleet.offset_ms += u64::from(EngineConfig::default().heartbeat_interval_ms);
    let ok = fleet
        .run_until(&mut down_rx, t + timeout, |_| view.heartbeats.load(Ordering::Relaxed) >= before + n as u64)
        .await;
    if !ok {
        return Err(fail("heartbeat", format!("{} heartbeats", view.heartbeats.load(Ordering::Relaxed) - before)));
    }
    fig.float("heartbeat_s", t.elapsed().as_secs_f64());
    let cpu1 = thread_cpu(tid);
    record_heartbeat_cpu(fig, cpu0, cpu1, view.heartbeats.load(Ordering::Relaxed) - before);
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
    // A clean goodbye (DISCONNECT, then close), so the broker logs no lost connections.
    for client in &fleet.clients {
        client.try_disconnect();
    }
    drop(down_rx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            t.abort();
        }
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

/// Records the controller thread's CPU between two readings of [`thread_cpu`] as
/// `heartbeat_cpu_s`, `heartbeat_cpu_user_s` and `heartbeat_cpu_sys_s` (10 ms ticks), and, from
/// the exact total, `heartbeat_cpu_us_per_msg` for the `heartbeats` the engine counted in between
/// (NaN when unreadable).
pub(crate) fn record_heartbeat_cpu(
    fig: &mut Figures,
    before: Option<ThreadCpu>,
    after: Option<ThreadCpu>,
    heartbeats: u64,
) {
    let nan = ThreadCpu { user_s: f64::NAN, sys_s: f64::NAN, ns: None };
    let (b, a) = (before.unwrap_or(nan), after.unwrap_or(nan));
    fig.float("heartbeat_cpu_s", (a.user_s - b.user_s) + (a.sys_s - b.sys_s));
    fig.float("heartbeat_cpu_user_s", a.user_s - b.user_s);
    fig.float("heartbeat_cpu_sys_s", a.sys_s - b.sys_s);
    let us = match (b.ns, a.ns) {
        (Some(b), Some(a)) if heartbeats > 0 => a.saturating_sub(b) as f64 / 1e3 / heartbeats as f64,
        _ => f64::NAN,
    };
    fig.int("heartbeat_cpu_msgs", heartbeats);
    fig.float("heartbeat_cpu_us_per_msg", us);
}

/// `controller_msgs_per_batch`: uplink messages per batch a connection handed to the inbox over
/// the whole run ([`kole_mqtt::CloudStats::uplink_batches`]).
pub(crate) fn record_batches(fig: &mut Figures, view: &ControllerView) {
    let (msgs, batches) = (view.received.load(Ordering::Relaxed), view.uplink_batches.load(Ordering::Relaxed));
    fig.int("controller_uplink_batches", batches);
    fig.float("controller_msgs_per_batch", if batches == 0 { f64::NAN } else { msgs as f64 / batches as f64 });
}

/// A per-run salt (for fleet names and credentials): the wall clock's milliseconds, low 32 bits.
pub(crate) fn run_salt() -> u32 {
    // Truncation is the point: only the fast-changing bits matter for a salt.
    wall_clock_now().as_millis() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_count_bounds_subscriptions_per_connection() {
        let at = |nodes: usize, per_node_subscriptions: bool| {
            MqttBenchConfig { nodes, per_node_subscriptions, ..MqttBenchConfig::default() }.connection_count()
        };
        assert_eq!(at(10_000, true), 8);
        assert_eq!(at(1_000_000, true), 62);
        assert_eq!(at(10_000_000, true), 611);
        assert_eq!(at(1_000_000, false), 8, "one wildcard subscription");
        let given = MqttBenchConfig { connections: Some(3), ..MqttBenchConfig::default() };
        assert_eq!(given.connection_count(), 3);
    }

    #[test]
    fn a_small_fleet_over_the_embedded_broker() {
        let cfg = MqttBenchConfig {
            nodes: 300,
            connections: Some(3),
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
