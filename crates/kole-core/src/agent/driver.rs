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
//! use kole_core::agent::driver::{run_agent, DriverConfig};
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
//! let stats = run_agent(&mut agent, &connect, &mut runtime, &store, &DriverConfig::default(), shutdown).await;
//! # drop(stop); let _ = stats; Ok(())
//! # }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::model::{Timestamp, mix64};
use crate::transport::{NodeTransport, TransportError};

use super::backoff::{Jitter, RetryPolicy};
use super::io::{AgentInput, AgentOutputs, GroupChange};
use super::runtime::WorkloadRuntime;
use super::state::{Agent, LinkState};
use super::store::AgentStore;

/// Opens a node transport. Object-safe; any
/// `Fn() -> Result<Arc<dyn NodeTransport>, TransportError>` (e.g. around
/// [`MemoryHub::connect`](crate::transport::memory::MemoryHub::connect)) is one.
#[async_trait]
pub trait Connector: Send + Sync {
    /// Connects (a clean session).
    async fn connect(&self) -> Result<Arc<dyn NodeTransport>, TransportError>;
}

#[async_trait]
impl<F> Connector for F
where
    F: Fn() -> Result<Arc<dyn NodeTransport>, TransportError> + Send + Sync,
{
    async fn connect(&self) -> Result<Arc<dyn NodeTransport>, TransportError> {
        self()
    }
}

/// Driver settings.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverConfig {
    /// Backoff between connection attempts (reset once the agent is registered). Default 1 s
    /// doubling to 60 s, jittered into `[d/2, d]`.
    pub reconnect: RetryPolicy,
    /// Most deliveries taken from the transport per receive. Default 256.
    pub max_batch: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            reconnect: RetryPolicy::new(1_000, 60_000, 2.0),
            max_batch: 256,
        }
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
}

/// Wall-clock milliseconds that advance with tokio's clock.
struct Clock {
    wall_ms: u64,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        let wall_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            wall_ms,
            start: Instant::now(),
        }
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
    async fn idle_until(
        &mut self,
        deadline: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
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
    config: &DriverConfig,
    mut shutdown: watch::Receiver<bool>,
) -> DriverStats {
    let mut jitter = Jitter::new(mix64(u64::from(agent.boot_id()) ^ 0x6472_6976_6572));
    let mut d = Driver {
        agent,
        runtime,
        store,
        clock: Clock::new(),
        out: AgentOutputs::default(),
        stats: DriverStats::default(),
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
                let lost = d
                    .connection(&*t, config.max_batch, &mut failures, &mut shutdown)
                    .await;
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
