//! The tokio driver of an [`Agent`] (feature `tokio-driver`): connects it to a
//! [`NodeTransport`], a runtime, a store and the clock.
//!
//! [`run_agent`] runs one loop, on the caller's task (it spawns nothing): connect through a
//! [`Connector`], feed the agent `Connected`, deliveries, and ticks at its
//! [`next_wake`](Agent::next_wake), carry its outputs out (publish, subscribe, persist), and on a
//! transport error reconnect with jittered, bounded exponential backoff — the agent keeps ticking
//! (polling its runtime) while disconnected. It returns when the shutdown signal is raised.
//!
//! Time: the agent gets wall-clock milliseconds measured as "wall clock at start + tokio's
//! monotonic time since", so timers follow `tokio::time` (and `tokio::time::pause` in tests).
//!
//! ```no_run
//! use std::sync::Arc;
//! use kole_core::agent::driver::{run_agent, AgentDriverConfig};
//! use kole_core::agent::{Agent, AgentConfig, AgentIdentity, FileAgentStore, ProcessRuntime, load_or_empty};
//! use kole_core::model::{Labels, NodeInfo, NodeName};
//! use kole_core::transport::memory::{MemoryConfig, MemoryHub};
//! use kole_core::transport::{NodeTransport, TransportError};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let hub = MemoryHub::new(MemoryConfig::default());
//! let name = NodeName::new("edge-1")?;
//! let store = FileAgentStore::new("/var/lib/kole/agent.state");
//! let (persisted, _load_error) = load_or_empty(&store);
//! let identity = AgentIdentity { name: name.clone(), labels: Arc::new(Labels::new()), info: Arc::new(NodeInfo::default()) };
//! let mut agent = Agent::new(AgentConfig::default(), identity, 0x5eed, persisted);
//! let connect = move || hub.connect(name.clone()).map(|n| Arc::new(n) as Arc<dyn NodeTransport>);
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! let mut runtime = ProcessRuntime::default();
//! let stats = run_agent(&mut agent, &connect, &mut runtime, &store, &AgentDriverConfig::default(), shutdown).await;
//! # drop(stop); let _ = stats; Ok(())
//! # }
//! ```

use tokio::sync::watch;
use tokio::time::Instant;

use crate::model::{Timestamp, mix64};
use crate::rng::SplitMix64;
use crate::transport::{Connector, NodeTransport, TransportError};

use super::io::{AgentEvent, AgentInput, AgentOutputs, GroupChange};
use super::runtime::WorkloadRuntime;
use super::state::{Agent, LinkState};
use super::store::AgentStore;
use crate::backoff::Backoff;

/// Driver settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentDriverConfig {
    /// Backoff between connection attempts (reset once the agent is registered). Default 1 s
    /// doubling to 60 s, jittered into `[d/2, d]`.
    pub reconnect: Backoff,
    /// Most deliveries taken from the transport per receive. Default 256.
    pub max_batch: usize,
}

impl Default for AgentDriverConfig {
    fn default() -> Self {
        Self { reconnect: Backoff::new(1_000, 60_000, 2.0), max_batch: 256 }
    }
}

/// What a [`run_agent`] call did, returned at shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Successful connections.
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Connections lost (transport closed or failed).
    pub disconnects: u64,
    /// Deliveries handed to the agent.
    pub deliveries: u64,
    /// Messages published.
    pub published: u64,
    /// Publish batches dropped because the transport refused them (full, too large).
    pub publish_dropped: u64,
    /// States persisted.
    pub persisted: u64,
    /// Failed saves of the state (the agent goes on; the next change saves again).
    pub persist_failures: u64,
    /// Deliveries refused by signature or replay checks ([`super::AgentEvent::Refused`]); also
    /// reported to the controller as the heartbeat flag `DOWNLINK_REFUSED`.
    pub refused: u64,
}

/// Wall-clock milliseconds that advance with tokio's clock.
struct Clock {
    wall_ms: u64,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        let wall_ms = crate::clock::wall_clock_now().as_millis();
        Self { wall_ms, start: Instant::now() }
    }

    fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp::from_millis(self.wall_ms.saturating_add(elapsed))
    }

    fn instant(&self, at: Timestamp) -> Instant {
        let ms = at.as_millis().saturating_sub(self.wall_ms);
        // Bound far-future deadlines (a year) so the addition cannot overflow.
        self.start + std::time::Duration::from_millis(ms.min(365 * 24 * 3_600_000))
    }
}

/// Completes when `true` is sent on the channel or its sender is dropped.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

struct Driver<'a> {
    agent: &'a mut Agent,
    runtime: &'a mut dyn WorkloadRuntime,
    store: &'a dyn AgentStore,
    clock: Clock,
    out: AgentOutputs,
    stats: DriverStats,
    observe: &'a mut (dyn FnMut(&AgentEvent) + Send),
}

impl Driver<'_> {
    fn handle(&mut self, input: AgentInput<'_>) {
        let now = self.clock.now();
        self.agent.handle(input, now, self.runtime, &mut self.out);
    }

    fn wake_at(&self) -> Instant {
        match self.agent.next_wake() {
            Some(at) => self.clock.instant(at),
            // Nothing scheduled: wake in a year (something else will happen first).
            None => self.clock.instant(Timestamp::from_millis(u64::MAX)),
        }
    }

    /// Carries the outputs out. `Err` when the transport is gone.
    async fn flush(&mut self, transport: Option<&dyn NodeTransport>) -> Result<(), TransportError> {
        if let Some(state) = self.out.persist.take() {
            match self.store.save(&state) {
                Ok(()) => self.stats.persisted += 1,
                Err(_) => self.stats.persist_failures += 1,
            }
        }
        let groups = std::mem::take(&mut self.out.groups);
        let publish = std::mem::take(&mut self.out.publish);
        for e in &self.out.events {
            self.stats.refused += u64::from(matches!(e, AgentEvent::Refused { .. }));
            (self.observe)(e);
        }
        self.out.clear();
        let Some(t) = transport else {
            return Ok(());
        };
        for change in &groups {
            match change {
                GroupChange::Subscribe(g) => t.subscribe(g).await?,
                GroupChange::Unsubscribe(g) => t.unsubscribe(g).await?,
            }
        }
        if publish.is_empty() {
            return Ok(());
        }
        let n = publish.len() as u64;
        match t.publish(publish).await {
            Ok(()) => self.stats.published += n,
            // Lost uplink is repaired by the protocol (registration retries, the next
            // heartbeat carries the digest again).
            Err(TransportError::Full { .. } | TransportError::PayloadTooLarge { .. }) => {
                self.stats.publish_dropped += 1
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Ticks the agent (offline) until `deadline`; `false` if shutdown was raised.
    async fn idle_until(&mut self, deadline: Instant, shutdown: &mut watch::Receiver<bool>) -> bool {
        loop {
            let wake = self.wake_at();
            tokio::select! {
                biased;
                () = stopped(shutdown) => return false,
                () = tokio::time::sleep_until(deadline) => return true,
                () = tokio::time::sleep_until(wake) => {
                    self.handle(AgentInput::Tick);
                    let _ = self.flush(None).await;
                }
            }
        }
    }

    /// Runs one connection until the transport fails (`true`) or shutdown (`false`).
    async fn connection(
        &mut self,
        t: &dyn NodeTransport,
        max_batch: usize,
        failures: &mut u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        self.handle(AgentInput::Connected);
        if self.flush(Some(t)).await.is_err() {
            return true;
        }
        loop {
            let wake = self.wake_at();
            let result = tokio::select! {
                biased;
                () = stopped(shutdown) => return false,
                r = t.recv(max_batch) => match r {
                    Ok(batch) => {
                        self.stats.deliveries += batch.len() as u64;
                        for d in &batch {
                            self.handle(AgentInput::Delivery(d));
                        }
                        self.flush(Some(t)).await
                    }
                    Err(e) => Err(e),
                },
                () = tokio::time::sleep_until(wake) => {
                    self.handle(AgentInput::Tick);
                    self.flush(Some(t)).await
                }
            };
            if result.is_err() {
                return true;
            }
            if self.agent.link() == LinkState::Registered {
                *failures = 0;
            }
        }
    }
}

/// Drives `agent` until `true` is sent on `shutdown` (or its sender is dropped); returns what it
/// did. Runs on the caller's task and spawns nothing. See the [module documentation](self).
pub async fn run_agent(
    agent: &mut Agent,
    connector: &dyn Connector,
    runtime: &mut dyn WorkloadRuntime,
    store: &dyn AgentStore,
    config: &AgentDriverConfig,
    shutdown: watch::Receiver<bool>,
) -> DriverStats {
    run_agent_observed(agent, connector, runtime, store, config, shutdown, &mut |_| {}).await
}

/// [`run_agent`], calling `observe` with each [`AgentEvent`] as the agent reports it: a program
/// logs refused deliveries (a forged or replayed message is worth a warning when it happens, not
/// only a count at shutdown) and what it ignored.
pub async fn run_agent_observed(
    agent: &mut Agent,
    connector: &dyn Connector,
    runtime: &mut dyn WorkloadRuntime,
    store: &dyn AgentStore,
    config: &AgentDriverConfig,
    mut shutdown: watch::Receiver<bool>,
    observe: &mut (dyn FnMut(&AgentEvent) + Send),
) -> DriverStats {
    let mut jitter = SplitMix64::new(mix64(u64::from(agent.boot_id()) ^ 0x6472_6976_6572));
    let mut d = Driver {
        agent,
        runtime,
        store,
        clock: Clock::new(),
        out: AgentOutputs::default(),
        stats: DriverStats::default(),
        observe,
    };
    // Before any cloud contact: the agent re-applies its persisted desired state.
    d.handle(AgentInput::Tick);
    let _ = d.flush(None).await;
    let mut failures: u32 = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let connected = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            r = connector.connect() => r,
        };
        match connected {
            Ok(t) => {
                d.stats.connects += 1;
                let lost = d.connection(&*t, config.max_batch, &mut failures, &mut shutdown).await;
                t.close();
                d.handle(AgentInput::Disconnected);
                let _ = d.flush(None).await;
                if !lost {
                    break;
                }
                d.stats.disconnects += 1;
            }
            Err(_) => d.stats.connect_failures += 1,
        }
        let delay = config.reconnect.delay_ms(failures, &mut jitter);
        failures = failures.saturating_add(1);
        let deadline = Instant::now() + std::time::Duration::from_millis(delay);
        if !d.idle_until(deadline, &mut shutdown).await {
            break;
        }
    }
    d.stats
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::agent::{AgentConfig, AgentIdentity, MemoryAgentStore, PersistedState, RecordingRuntime, RuntimeOp};
    use crate::cache::{NodeCache, StateCache};
    use crate::engine::{Engine, EngineConfig, Input, Outputs, WorkloadCommand};
    use crate::model::{DesiredDigest, Labels, NodeInfo, NodeName, Selector, Workload, WorkloadId};
    use crate::protocol::{self, GroupName, Message, RegisterAck, RegisterOutcome, WorkloadSpec};
    use crate::transport::memory::{MemoryConfig, MemoryHub, MemoryNode};
    use crate::transport::{CloudTransport, Destination, Inbound, MessageTransport, Outbound};

    async fn bounded<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(600), f).await.expect("timed out")
    }

    fn agent(name: &str, boot: u32, persisted: Option<PersistedState>) -> Agent {
        let identity = AgentIdentity {
            name: NodeName::new(name).unwrap(),
            labels: Arc::new(Labels::from_pairs([("topology.kubernetes.io/region", "east")]).unwrap()),
            info: Arc::new(NodeInfo::default()),
        };
        let config = AgentConfig { runtime_poll_ms: 500, ..AgentConfig::default() };
        Agent::new(config, identity, boot, persisted)
    }

    fn workload(id: &str, version: u64) -> Workload {
        Workload {
            id: WorkloadId::new(id).unwrap(),
            version,
            spec: b"run".to_vec(),
            selector: Selector::everything(),
            delivery: Default::default(),
            rollout: Default::default(),
        }
    }

    type Endpoints = Arc<Mutex<Vec<Arc<MemoryNode>>>>;

    /// A connector over the hub that keeps every endpoint it made, so a test can cut them.
    fn connector(hub: &MemoryHub, name: &str) -> (impl Connector + 'static, Endpoints) {
        let made = Arc::new(Mutex::new(Vec::new()));
        let (hub, name, kept) = (hub.clone(), NodeName::new(name).unwrap(), made.clone());
        let connect = move || {
            let node = Arc::new(hub.connect(name.clone())?);
            kept.lock().unwrap().push(node.clone());
            Ok(node as Arc<dyn NodeTransport>)
        };
        (connect, made)
    }

    async fn next(cloud: &dyn CloudTransport) -> (Inbound, Message) {
        let mut batch = bounded(cloud.recv(1)).await.unwrap();
        let inbound = batch.remove(0);
        let msg = inbound.decode(&Default::default()).unwrap();
        (inbound, msg)
    }

    fn ack(boot_id: u32, groups: &[&str]) -> Vec<u8> {
        protocol::encode(&Message::RegisterAck(RegisterAck {
            boot_id,
            outcome: RegisterOutcome::Accepted,
            heartbeat_interval_ms: 2_000,
            groups: groups.iter().map(|g| GroupName::new(*g).unwrap()).collect(),
            desired: DesiredDigest::EMPTY,
        }))
    }

    fn to(to: Destination, payload: Vec<u8>, retain: bool) -> Vec<Outbound> {
        vec![Outbound { to, payload, retain }]
    }

    #[tokio::test(start_paused = true)]
    async fn driver_registers_heartbeats_persists_reconnects_and_stops() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let (connect, endpoints) = connector(&hub, "edge-1");
        let store = MemoryAgentStore::new();
        let (stop, shutdown) = watch::channel(false);
        let driver = tokio::spawn({
            let store = store.clone();
            async move {
                let mut agent = agent("edge-1", 77, None);
                let mut runtime = RecordingRuntime::new();
                let config =
                    AgentDriverConfig { reconnect: Backoff::new(1_000, 10_000, 2.0), ..AgentDriverConfig::default() };
                let stats = run_agent(&mut agent, &connect, &mut runtime, &store, &config, shutdown).await;
                (agent, stats, runtime)
            }
        });
        let node = Destination::Node(NodeName::new("edge-1").unwrap());

        let (_, Message::Register(reg)) = next(&cloud).await else { panic!("expected a registration") };
        assert_eq!(reg.boot_id, 77);
        bounded(cloud.send(to(node.clone(), ack(77, &["region.east"]), false))).await.unwrap();
        let acked = Instant::now();
        let mut beats = Vec::new();
        for seq in 1..=3 {
            let (i, Message::Heartbeat(hb)) = next(&cloud).await else { panic!("expected a heartbeat") };
            assert_eq!((i.node.as_str(), hb.seq, hb.boot_id), ("edge-1", seq, 77));
            beats.push(Instant::now());
        }
        assert!(beats[0] - acked < Duration::from_millis(2_000), "first jittered within the interval");
        for w in beats.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(2_000));
        }

        // The group subscription from the ack carries a group spec: applied, reported, persisted.
        let mut w = workload("default/app", 1);
        w.delivery = crate::model::DeliveryMode::Group("region.east".into());
        let g = GroupName::new("region.east").unwrap();
        let spec = protocol::encode(&Message::WorkloadSpec(WorkloadSpec {
            workload: w.clone(),
            wave_threshold: WorkloadSpec::ALL_WAVES,
        }));
        bounded(cloud.send(to(Destination::GroupWorkloadSpec(g, w.id.clone()), spec, true))).await.unwrap();
        let (_, Message::StatusReport(report)) = next(&cloud).await else { panic!("expected a status report") };
        assert_eq!(report.applied, DesiredDigest::of([("default/app", 1, &b"run"[..])]));
        assert_eq!(store.saves(), 1);

        // The broker drops the connection: the driver reconnects after a backoff and registers
        // again with the same boot id.
        let cut = Instant::now();
        endpoints.lock().unwrap()[0].close();
        let (_, Message::Register(reg)) = next(&cloud).await else { panic!("expected a re-registration") };
        let waited = Instant::now() - cut;
        assert!((Duration::from_millis(500)..=Duration::from_millis(1_000)).contains(&waited), "{waited:?}");
        assert_eq!((reg.boot_id, reg.applied), (77, report.applied));
        assert_eq!(endpoints.lock().unwrap().len(), 2);

        stop.send(true).unwrap();
        let (agent, stats, runtime) = bounded(driver).await.unwrap();
        assert_eq!((stats.connects, stats.disconnects, stats.persisted), (2, 1, 1));
        assert_eq!(agent.link(), LinkState::Disconnected);
        assert_eq!(runtime.calls_for(agent.name()), [RuntimeOp::Apply { id: w.id, version: 1 }]);
    }

    #[tokio::test(start_paused = true)]
    async fn driver_backs_off_while_unreachable_and_runs_the_persisted_state_meanwhile() {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let hub = MemoryHub::new(MemoryConfig::default());
        let _cloud = hub.cloud().unwrap();
        let connect = {
            let (attempts, hub) = (attempts.clone(), hub.clone());
            move || -> Result<Arc<dyn NodeTransport>, TransportError> {
                let mut a = attempts.lock().unwrap();
                a.push(Instant::now());
                if a.len() <= 5 {
                    return Err(TransportError::Closed);
                }
                Ok(Arc::new(hub.connect(NodeName::new("edge-2").unwrap())?))
            }
        };
        let w = Arc::new(workload("default/app", 9));
        let store = MemoryAgentStore::new();
        store.save(&PersistedState::new(vec![w.clone()])).unwrap();
        let (stop, shutdown) = watch::channel(false);
        let driver = tokio::spawn({
            let store = store.clone();
            async move {
                let persisted = store.load().unwrap();
                let mut agent = agent("edge-2", 5, persisted);
                let mut runtime = RecordingRuntime::new();
                let config =
                    AgentDriverConfig { reconnect: Backoff::new(100, 1_000, 2.0), ..AgentDriverConfig::default() };
                let stats = run_agent(&mut agent, &connect, &mut runtime, &store, &config, shutdown).await;
                (agent, stats, runtime)
            }
        });
        bounded(async {
            while attempts.lock().unwrap().len() < 6 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        stop.send(true).unwrap();
        let (agent, stats, runtime) = bounded(driver).await.unwrap();
        assert_eq!((stats.connect_failures, stats.connects), (5, 1));
        let a = attempts.lock().unwrap();
        for (k, nominal) in [100u64, 200, 400, 800, 1_000].into_iter().enumerate() {
            let gap = a[k + 1] - a[k];
            assert!(
                (Duration::from_millis(nominal / 2)..=Duration::from_millis(nominal)).contains(&gap),
                "attempt {k}: {gap:?}"
            );
        }
        // The persisted workload ran before the first connection.
        assert_eq!(runtime.calls_for(agent.name()), [RuntimeOp::Apply { id: w.id.clone(), version: 9 }]);
    }

    /// A signed agent's refusals reach the observer while the driver runs (a program logs them as
    /// they happen), and are counted in the stats it returns.
    #[tokio::test(start_paused = true)]
    async fn refusals_are_observed_as_they_happen() {
        use crate::protocol::seal::{DownlinkSigner, TrustedKeys};
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let (connect, _) = connector(&hub, "edge-1");
        let signer = DownlinkSigner::from_seed([7; 32]);
        let trust = Arc::new(TrustedKeys::from_text(&signer.public_text()).unwrap());
        let seen: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let (stop, shutdown) = watch::channel(false);
        let driver = tokio::spawn({
            let seen = seen.clone();
            async move {
                let identity = AgentIdentity {
                    name: NodeName::new("edge-1").unwrap(),
                    labels: Arc::new(Labels::default()),
                    info: Arc::new(NodeInfo::default()),
                };
                let config = AgentConfig { trust: Some(trust), runtime_poll_ms: 500, ..AgentConfig::default() };
                let mut agent = Agent::new(config, identity, 5, None);
                let mut runtime = RecordingRuntime::new();
                let store = MemoryAgentStore::new();
                let mut observe = |e: &AgentEvent| {
                    if let AgentEvent::Refused { reason, .. } = e {
                        seen.lock().unwrap().push(reason);
                    }
                };
                let config = AgentDriverConfig::default();
                run_agent_observed(&mut agent, &connect, &mut runtime, &store, &config, shutdown, &mut observe).await
            }
        });
        let node = Destination::Node(NodeName::new("edge-1").unwrap());
        let (_, Message::Register(_)) = next(&cloud).await else { panic!("expected a registration") };
        // An unsigned ack, then a properly signed one.
        bounded(cloud.send(to(node.clone(), ack(5, &[]), false))).await.unwrap();
        let signed = protocol::decode(&ack(5, &[]), &Default::default()).unwrap();
        bounded(cloud.send(to(node.clone(), signer.seal(&signed, &node, 1), false))).await.unwrap();
        let (_, Message::Heartbeat(_)) = next(&cloud).await else { panic!("the signed ack registers it") };
        assert_eq!(*seen.lock().unwrap(), ["unsigned"], "seen before shutdown");
        stop.send(true).unwrap();
        let stats = bounded(driver).await.unwrap();
        assert_eq!(stats.refused, 1);
    }

    /// A real engine in a task, a dozen drivers over the hub: everyone converges on a workload.
    #[tokio::test(start_paused = true)]
    async fn drivers_and_engine_converge() {
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let engine = Arc::new(Mutex::new(Engine::new(
            EngineConfig { heartbeat_interval_ms: 2_000, convergence_grace_ms: 4_000, ..EngineConfig::default() },
            NodeCache::new(),
            Timestamp::from_millis(0),
        )));
        let clock = Instant::now();
        let now = move || Timestamp::from_millis(clock.elapsed().as_millis() as u64);
        let (stop, shutdown) = watch::channel(false);
        let mut tasks = Vec::new();
        for i in 0..12u32 {
            let (connect, _) = connector(&hub, &format!("edge-{i}"));
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let mut agent = agent(&format!("edge-{i}"), 100 + i, None);
                let mut runtime = RecordingRuntime::instant();
                let store = MemoryAgentStore::new();
                run_agent(&mut agent, &connect, &mut runtime, &store, &AgentDriverConfig::default(), shutdown).await
            }));
        }
        let (commands, mut command_rx) = tokio::sync::mpsc::channel::<WorkloadCommand>(8);
        let engine_task = tokio::spawn({
            let engine = engine.clone();
            let mut shutdown = shutdown.clone();
            async move {
                let mut out = Outputs::default();
                let mut tick = tokio::time::interval(Duration::from_millis(1_000));
                loop {
                    tokio::select! {
                        () = stopped(&mut shutdown) => break,
                        batch = cloud.recv(1024) => {
                            let Ok(batch) = batch else { break };
                            engine.lock().unwrap().handle(Input::Uplink(&batch), now(), &mut out);
                        }
                        Some(cmd) = command_rx.recv() => {
                            engine.lock().unwrap().handle(Input::Workload(&cmd), now(), &mut out);
                        }
                        _ = tick.tick() => {
                            engine.lock().unwrap().handle(Input::Tick, now(), &mut out);
                        }
                    }
                    let batch = std::mem::take(&mut out.messages);
                    out.clear();
                    if !batch.is_empty() {
                        let _ = cloud.send(batch).await;
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        commands.send(WorkloadCommand::Apply { workload: workload("default/app", 1), progress: None }).await.unwrap();
        bounded(async {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut e = engine.lock().unwrap();
                let cache = e.store();
                let done = (0..12).all(|i| {
                    let name = format!("edge-{i}");
                    let applied = cache.read().get(&name).map(|r| r.applied);
                    applied.is_some() && e.desired_digest(&name) == applied && applied != Some(DesiredDigest::EMPTY)
                });
                if done {
                    break;
                }
            }
        })
        .await;
        stop.send(true).unwrap();
        for t in tasks {
            let stats = bounded(t).await.unwrap();
            assert_eq!(stats.connects, 1);
        }
        bounded(engine_task).await.unwrap();
    }
}
