//! The controller side of the MQTT bench: the engine over [`MqttCloud`] on a dedicated thread,
//! and what it publishes for the orchestrator.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kole_core::cache::NodeCache;
use kole_core::engine::{Engine, EngineConfig, EngineStats, Input, Outputs, RolloutPhase, WorkloadCommand};
use kole_core::model::{Workload, WorkloadId};
use kole_core::transport::{CloudTransport, MessageTransport, TransportError};

use kole_mqtt::Topics;
use kole_mqtt::{CloudConfig, MqttCloud};
use tokio::sync::mpsc;

use crate::procfs::{current_tid, thread_cpu_seconds};

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
    pub(crate) uplink_batches: AtomicU64,
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
        view.uplink_batches.store(st.uplink_batches, Ordering::Relaxed);
        cloud.close();
    });
    let cpu = current_tid().and_then(thread_cpu_seconds).unwrap_or(0.0);
    view.final_cpu_us.store((cpu * 1e6) as u64, Ordering::Relaxed);
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
