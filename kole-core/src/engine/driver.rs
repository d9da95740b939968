//! The tokio driver of the engine: transport batches, ticks, workload commands and snapshots in,
//! messages, statuses and events out. Everything decided is decided by [`Engine`]; this only moves
//! bytes and reads the clock.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{Engine, EngineConfig, EngineEvent, EngineStats, Input, Outputs, Reject, WorkloadCommand, WorkloadStatus};
use crate::cache::NodeCache;
use crate::model::Timestamp;
use crate::snapshot::{Manifest, RestoreFault, RestoreLimits, SnapshotError, SnapshotOptions, SnapshotStore};
use crate::transport::{CloudTransport, TransportError};

pub use crate::clock::{Clock, system_clock};

/// Driver settings, each with a documented default.
#[derive(Clone, Debug)]
pub struct EngineDriverConfig {
    /// How often the engine is ticked. Default 1 s.
    pub tick: Duration,
    /// Most uplink messages taken from the transport per batch. Default 8192.
    pub recv_batch: usize,
    /// How snapshots are written. Default [`SnapshotOptions::default`].
    pub snapshot: SnapshotOptions,
    /// Write a final snapshot when shutting down. Default true.
    pub snapshot_on_shutdown: bool,
    /// How many times a failed send is retried (with doubling backoff from 50 ms) before the batch
    /// is given up; the engine's level-triggered catch-up repairs what was lost. Default 5.
    pub send_retries: u32,
}

impl Default for EngineDriverConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            recv_batch: 8192,
            snapshot: SnapshotOptions::default(),
            snapshot_on_shutdown: true,
            send_retries: 5,
        }
    }
}

/// What the driver reports to its owner (a status writer, a logger, a test).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DriverEvent {
    /// A workload's aggregated status changed.
    Status(WorkloadStatus),
    /// An engine event.
    Engine(EngineEvent),
    /// A refused input.
    Reject(Reject),
    /// A snapshot generation was committed.
    SnapshotWritten(Manifest),
    /// A snapshot write failed; the previous generation stays in place.
    SnapshotFailed(String),
    /// A batch could not be sent after retries.
    SendFailed(String),
}

/// Which input the driver just handed to the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandledInput {
    /// A batch of uplink messages from the transport, of this many messages.
    Uplink(usize),
    /// A tick.
    Tick,
    /// A workload command.
    Workload,
}

/// What a [`DriverObserver`] sees after each input the driver handled.
#[derive(Debug)]
pub struct DriverStep<'a> {
    /// The input handled.
    pub input: HandledInput,
    /// The time the engine was given for it.
    pub now: Timestamp,
    /// The engine's counters after the input.
    pub stats: &'a EngineStats,
    /// What the engine asked for, before the driver sends the messages and drains the rest.
    pub outputs: &'a Outputs,
}

/// Sees every input the driver handles, with the engine's counters and outputs, so a benchmark
/// or a metrics exporter can use [`EngineDriver`] as is instead of writing its loop again.
///
/// Called synchronously on the driver's task, between the engine and the transport: keep it
/// cheap. Any `FnMut(&DriverStep<'_>) + Send` closure is an observer.
pub trait DriverObserver: Send {
    /// Called after the engine handled one input, before its outputs are sent.
    fn handled(&mut self, step: &DriverStep<'_>);
}

impl<F: FnMut(&DriverStep<'_>) + Send> DriverObserver for F {
    fn handled(&mut self, step: &DriverStep<'_>) {
        self(step)
    }
}

/// Why the driver stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The transport was closed.
    #[error("transport closed: {0}")]
    Transport(#[from] TransportError),
    /// Restoring at start-up failed in a way that is not "no snapshot yet".
    #[error("restore at start-up failed: {0}")]
    Restore(#[from] SnapshotError),
}

/// Restores the newest good snapshot generation from `store` into a new engine, or starts empty
/// when the store has none. Skipped generations are returned for logging.
pub async fn restore_engine(
    cfg: EngineConfig,
    store: &dyn SnapshotStore,
    limits: &RestoreLimits,
    now: Timestamp,
) -> Result<(Engine, Option<Manifest>, Vec<RestoreFault>), DriverError> {
    match crate::snapshot::restore_latest(store, limits).await? {
        Some(r) => Ok((Engine::new(cfg, r.cache, now), Some(r.manifest), r.faults)),
        None => Ok((Engine::new(cfg, NodeCache::new(), now), None, Vec::new())),
    }
}

/// Connects an [`Engine`] to a transport, a snapshot store and its owner.
pub struct EngineDriver {
    cfg: EngineDriverConfig,
    engine: Engine,
    transport: Arc<dyn CloudTransport>,
    snapshots: Option<Arc<dyn SnapshotStore>>,
    clock: Clock,
    events: mpsc::Sender<DriverEvent>,
    events_dropped: u64,
    observer: Option<Box<dyn DriverObserver>>,
    final_snapshot: Option<watch::Receiver<bool>>,
}

impl EngineDriver {
    /// A driver; events go to `events` (bounded: when full, events are counted and dropped rather
    /// than stalling the engine).
    pub fn new(
        cfg: EngineDriverConfig,
        engine: Engine,
        transport: Arc<dyn CloudTransport>,
        snapshots: Option<Arc<dyn SnapshotStore>>,
        clock: Clock,
        events: mpsc::Sender<DriverEvent>,
    ) -> Self {
        Self {
            cfg,
            engine,
            transport,
            snapshots,
            clock,
            events,
            events_dropped: 0,
            observer: None,
            final_snapshot: None,
        }
    }

    /// Decides at stop time whether the final snapshot is written: only when `allowed` holds
    /// `true` as the driver stops (and [`EngineDriverConfig::snapshot_on_shutdown`] is set). A
    /// leader whose Lease was lost sets it to `false` before asking the driver to stop, since only
    /// then is the reason known: a deposed leader must not write (its store would refuse it as
    /// fenced anyway, but a refused write is a warning, not a plan).
    pub fn with_final_snapshot_switch(mut self, allowed: watch::Receiver<bool>) -> Self {
        self.final_snapshot = Some(allowed);
        self
    }

    /// Calls `observer` after every input the engine handles (see [`DriverObserver`]).
    pub fn with_observer(mut self, observer: impl DriverObserver + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Events dropped because the owner's channel was full.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    /// Runs until `shutdown` turns true or the transport closes; returns the engine (for a final
    /// look, or to hand over).
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<WorkloadCommand>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Engine, DriverError> {
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Outputs::default();
        let mut snapshot_task: Option<tokio::task::JoinHandle<Result<Manifest, SnapshotError>>> = None;
        let transport = Arc::clone(&self.transport);
        let mut commands_open = true;
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            tokio::select! {
                _ = shutdown.changed() => {}
                batch = transport.recv(self.cfg.recv_batch) => match batch {
                    Ok(batch) => {
                        let now = (self.clock)();
                        self.engine.handle(Input::Uplink(&batch), now, &mut out);
                        self.observe(HandledInput::Uplink(batch.len()), now, &out);
                    }
                    Err(e) => break Err(DriverError::Transport(e)),
                },
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(cmd) => {
                        let now = (self.clock)();
                        self.engine.handle(Input::Workload(&cmd), now, &mut out);
                        self.observe(HandledInput::Workload, now, &out);
                    }
                    None => commands_open = false,
                },
                _ = ticker.tick() => {
                    let now = (self.clock)();
                    self.engine.handle(Input::Tick, now, &mut out);
                    self.observe(HandledInput::Tick, now, &out);
                }
            }
            self.reap_snapshot(&mut snapshot_task).await;
            if out.snapshot_due && snapshot_task.is_none() {
                snapshot_task = self.start_snapshot();
            }
            self.flush(&mut out).await;
        };
        if let Some(task) = snapshot_task.take() {
            self.report_snapshot(task.await);
        }
        let allowed = self.final_snapshot.as_ref().is_none_or(|a| *a.borrow());
        if self.cfg.snapshot_on_shutdown
            && allowed
            && let Some(task) = self.start_snapshot()
        {
            self.report_snapshot(task.await);
        }
        result.map(|()| self.engine)
    }

    fn observe(&mut self, input: HandledInput, now: Timestamp, out: &Outputs) {
        if let Some(observer) = self.observer.as_mut() {
            observer.handled(&DriverStep { input, now, stats: self.engine.stats(), outputs: out });
        }
    }

    fn emit(&mut self, e: DriverEvent) {
        if self.events.try_send(e).is_err() {
            self.events_dropped += 1;
        }
    }

    async fn flush(&mut self, out: &mut Outputs) {
        if !out.messages.is_empty() {
            let batch = std::mem::take(&mut out.messages);
            let mut delay = Duration::from_millis(50);
            let mut attempt = 0;
            loop {
                match self.transport.send(batch.clone()).await {
                    Ok(()) => break,
                    Err(TransportError::Full { .. }) if attempt < self.cfg.send_retries => {
                        attempt += 1;
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    Err(e) => {
                        self.emit(DriverEvent::SendFailed(e.to_string()));
                        break;
                    }
                }
            }
        }
        for s in out.statuses.drain(..).collect::<Vec<_>>() {
            self.emit(DriverEvent::Status(s));
        }
        for e in out.events.drain(..).collect::<Vec<_>>() {
            self.emit(DriverEvent::Engine(e));
        }
        for r in out.rejects.drain(..).collect::<Vec<_>>() {
            self.emit(DriverEvent::Reject(r));
        }
        out.clear();
    }

    /// Copies the cache (a memcpy of the compact table, ~0.1 s per million nodes) and writes it in
    /// the background, so the engine keeps serving while the snapshot is encoded and stored.
    fn start_snapshot(&self) -> Option<tokio::task::JoinHandle<Result<Manifest, SnapshotError>>> {
        let store = Arc::clone(self.snapshots.as_ref()?);
        let cache: NodeCache = self.engine.store().read().clone();
        let opts = self.cfg.snapshot.clone();
        let now = (self.clock)();
        let rt = tokio::runtime::Handle::current();
        Some(tokio::task::spawn_blocking(move || {
            rt.block_on(crate::snapshot::write_snapshot(store.as_ref(), &cache, &opts, now))
        }))
    }

    async fn reap_snapshot(&mut self, task: &mut Option<tokio::task::JoinHandle<Result<Manifest, SnapshotError>>>) {
        if task.as_ref().is_some_and(|t| t.is_finished())
            && let Some(t) = task.take()
        {
            let r = t.await;
            self.report_snapshot(r);
        }
    }

    fn report_snapshot(&mut self, r: Result<Result<Manifest, SnapshotError>, tokio::task::JoinError>) {
        match r {
            Ok(Ok(m)) => self.emit(DriverEvent::SnapshotWritten(m)),
            Ok(Err(e)) => self.emit(DriverEvent::SnapshotFailed(e.to_string())),
            Err(e) => self.emit(DriverEvent::SnapshotFailed(format!("snapshot task failed: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers `edge-1` (labels `tier=cdn`, boot 1) through `node`.
    async fn register_edge_1(node: &dyn NodeTransport) {
        let reg = Message::Register(Register {
            name: NodeName::new("edge-1").unwrap(),
            boot_id: 1,
            labels: Labels::from_pairs([("tier", "cdn")]).unwrap(),
            info: NodeInfo::default(),
            applied: DesiredDigest::EMPTY,
            workloads: vec![],
        });
        node.publish(vec![NodePublish { kind: UplinkKind::Register, payload: protocol::encode(&reg) }]).await.unwrap();
    }
    use crate::model::{DesiredDigest, Labels, NodeInfo, NodeName, RolloutStrategy, Selector, Workload, WorkloadId};
    use crate::protocol::{self, Message, Register, UplinkKind};
    use crate::snapshot::MemorySnapshotStore;
    use crate::transport::memory::{MemoryConfig, MemoryHub};
    use crate::transport::{NodePublish, NodeTransport};

    #[tokio::test]
    async fn drives_registration_workloads_and_snapshots() {
        let test = async {
            let hub = MemoryHub::new(MemoryConfig::default());
            let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud().unwrap());
            let node = hub.connect(NodeName::new("edge-1").unwrap()).unwrap();
            let store = Arc::new(MemorySnapshotStore::new());
            let engine = Engine::new(EngineConfig::default(), NodeCache::new(), Timestamp::from_secs(1));
            let (ev_tx, mut ev_rx) = mpsc::channel(64);
            let cfg = EngineDriverConfig { tick: Duration::from_millis(10), ..Default::default() };
            let driver = EngineDriver::new(cfg, engine, cloud, Some(store.clone()), system_clock(), ev_tx);
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(driver.run(cmd_rx, stop_rx));

            register_edge_1(&node).await;
            let ack = node.recv(1).await.unwrap();
            assert!(matches!(ack[0].decode(&Default::default()).unwrap(), Message::RegisterAck(_)));

            let w = Workload {
                id: WorkloadId::new("default/app").unwrap(),
                version: 1,
                spec: b"run".to_vec(),
                selector: Selector::parse("tier=cdn").unwrap(),
                delivery: Default::default(),
                rollout: RolloutStrategy::default(),
            };
            cmd_tx.send(WorkloadCommand::Apply { workload: w.clone(), progress: None }).await.unwrap();
            let spec = node.recv(1).await.unwrap();
            assert!(
                matches!(spec[0].decode(&Default::default()).unwrap(), Message::WorkloadSpec(s) if s.workload == w)
            );

            // A status arrives for the workload.
            loop {
                if let Some(DriverEvent::Status(s)) = ev_rx.recv().await
                    && s.id == w.id
                {
                    assert_eq!(s.targeted, 1);
                    break;
                }
            }
            stop_tx.send(true).unwrap();
            let engine = task.await.unwrap().unwrap();
            assert_eq!(engine.stats().registered_new, 1);
            // The shutdown snapshot holds the node.
            let restored =
                crate::snapshot::restore_latest(store.as_ref(), &RestoreLimits::default()).await.unwrap().unwrap();
            assert!(restored.cache.slot_of("edge-1").is_some());
        };
        tokio::time::timeout(Duration::from_secs(20), test).await.unwrap();
    }

    #[tokio::test]
    async fn a_new_leader_clears_the_retained_spec_of_a_workload_deleted_while_nobody_led() {
        let test = async {
            let hub = MemoryHub::new(MemoryConfig::default());
            let node = hub.connect(NodeName::new("edge-1").unwrap()).unwrap();
            let w = Workload {
                id: WorkloadId::new("default/gone").unwrap(),
                version: 1,
                spec: b"run".to_vec(),
                selector: Selector::parse("tier=cdn").unwrap(),
                delivery: Default::default(),
                rollout: RolloutStrategy::default(),
            };
            let spec_topic = crate::transport::Destination::WorkloadSpec(w.id.clone());
            let cfg = || EngineDriverConfig {
                tick: Duration::from_millis(10),
                snapshot_on_shutdown: false,
                ..Default::default()
            };
            // The first leader publishes the workload, then goes away.
            {
                let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud().unwrap());
                let engine = Engine::new(EngineConfig::default(), NodeCache::new(), Timestamp::from_secs(1));
                let (ev_tx, _ev_rx) = mpsc::channel(64);
                let driver = EngineDriver::new(cfg(), engine, cloud, None, system_clock(), ev_tx);
                let (cmd_tx, cmd_rx) = mpsc::channel(8);
                let (stop_tx, stop_rx) = watch::channel(false);
                let task = tokio::spawn(driver.run(cmd_rx, stop_rx));
                cmd_tx.send(WorkloadCommand::Apply { workload: w.clone(), progress: None }).await.unwrap();
                node.recv(1).await.unwrap();
                stop_tx.send(true).unwrap();
                task.await.unwrap().unwrap();
            }
            // The workload is deleted while no controller leads: its spec stays retained.
            assert!(hub.retained(&spec_topic).is_some());

            // The next leader lists the retained specs and reconciles them against the live set.
            let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud().unwrap());
            let found = cloud.retained_specs().await.unwrap();
            assert_eq!(found, vec![spec_topic.clone()]);
            let engine = Engine::new(EngineConfig::default(), NodeCache::new(), Timestamp::from_secs(2));
            let (ev_tx, mut ev_rx) = mpsc::channel(64);
            let driver = EngineDriver::new(cfg(), engine, Arc::clone(&cloud), None, system_clock(), ev_tx);
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(driver.run(cmd_rx, stop_rx));
            cmd_tx.send(WorkloadCommand::ReconcileRetained { found, live: vec![] }).await.unwrap();

            // A connected node is told to remove it; a node that connects later gets nothing.
            loop {
                let got = node.recv(8).await.unwrap();
                if got
                    .iter()
                    .any(|d| matches!(d.decode(&Default::default()), Ok(Message::WorkloadRemoved(r)) if r.id == w.id))
                {
                    break;
                }
            }
            assert!(hub.retained(&spec_topic).is_none());
            assert!(cloud.retained_specs().await.unwrap().is_empty());
            loop {
                if let Some(DriverEvent::Engine(EngineEvent::StaleSpecCleared { id, .. })) = ev_rx.recv().await {
                    assert_eq!(id, w.id);
                    break;
                }
            }
            stop_tx.send(true).unwrap();
            task.await.unwrap().unwrap();
        };
        tokio::time::timeout(Duration::from_secs(20), test).await.unwrap();
    }

    #[tokio::test]
    async fn the_observer_sees_every_handled_input() {
        let test = async {
            let hub = MemoryHub::new(MemoryConfig::default());
            let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud().unwrap());
            let node = hub.connect(NodeName::new("edge-1").unwrap()).unwrap();
            let engine = Engine::new(EngineConfig::default(), NodeCache::new(), Timestamp::from_secs(1));
            let (ev_tx, _ev_rx) = mpsc::channel(64);
            let cfg = EngineDriverConfig {
                tick: Duration::from_millis(10),
                snapshot_on_shutdown: false,
                ..Default::default()
            };
            // (input, registrations counted, messages produced) per step.
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            let log = Arc::clone(&seen);
            let driver = EngineDriver::new(cfg, engine, cloud, None, system_clock(), ev_tx).with_observer(
                move |step: &DriverStep<'_>| {
                    log.lock().unwrap().push((step.input, step.stats.registered_new, step.outputs.messages.len()));
                },
            );
            let (_cmd_tx, cmd_rx) = mpsc::channel(8);
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(driver.run(cmd_rx, stop_rx));

            register_edge_1(&node).await;
            node.recv(1).await.unwrap();
            // Wait for a tick after the registration, so both kinds of input were observed.
            while !seen
                .lock()
                .unwrap()
                .iter()
                .skip_while(|s| s.0 == HandledInput::Tick)
                .any(|s| s.0 == HandledInput::Tick)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop_tx.send(true).unwrap();
            task.await.unwrap().unwrap();

            let seen = seen.lock().unwrap();
            // The registration's batch: one message in, the ack out, counted by the engine.
            assert!(seen.contains(&(HandledInput::Uplink(1), 1, 1)), "{seen:?}");
            assert!(seen.iter().any(|s| s.0 == HandledInput::Tick));
        };
        tokio::time::timeout(Duration::from_secs(20), test).await.unwrap();
    }

    /// A leader that lost its Lease stops without its final snapshot; one stopping cleanly
    /// (SIGTERM while leading) still writes it.
    #[tokio::test]
    async fn the_final_snapshot_switch_decides_at_stop_time() {
        let test = async {
            for allowed in [false, true] {
                let hub = MemoryHub::new(MemoryConfig::default());
                let cloud: Arc<dyn CloudTransport> = Arc::new(hub.cloud().unwrap());
                let store = Arc::new(MemorySnapshotStore::new());
                let engine = Engine::new(EngineConfig::default(), NodeCache::new(), Timestamp::from_secs(1));
                let (ev_tx, _ev_rx) = mpsc::channel(64);
                let (final_tx, final_rx) = watch::channel(true);
                let driver = EngineDriver::new(
                    EngineDriverConfig::default(),
                    engine,
                    cloud,
                    Some(store.clone()),
                    system_clock(),
                    ev_tx,
                )
                .with_final_snapshot_switch(final_rx);
                let (_cmd_tx, cmd_rx) = mpsc::channel(8);
                let (stop_tx, stop_rx) = watch::channel(false);
                let task = tokio::spawn(driver.run(cmd_rx, stop_rx));
                // The reason is known only at stop time: the switch flips just before the stop.
                final_tx.send(allowed).unwrap();
                stop_tx.send(true).unwrap();
                task.await.unwrap().unwrap();
                let written = store.generations();
                if allowed {
                    assert_eq!(written, vec![1], "a clean stop writes the final snapshot");
                } else {
                    assert!(written.is_empty(), "a deposed leader wrote generations {written:?}");
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), test).await.unwrap();
    }
}
