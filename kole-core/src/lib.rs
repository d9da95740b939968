//! # kole-core
//!
//! The core of kole, a framework for managing millions of far-edge nodes from Kubernetes over MQTT.
//! It knows no MQTT, no Kubernetes and no async runtime: the controller ([`engine::Engine`]) and the
//! edge agent ([`agent::Agent`]) are deterministic state machines (`handle(input, now) -> outputs`),
//! and everything they touch outside themselves goes through a seam:
//!
//! | seam | what it connects | implementations here | elsewhere |
//! |---|---|---|---|
//! | [`transport::CloudTransport`], [`transport::NodeTransport`], [`transport::Connector`] | controller and agents to a broker | [`transport::memory::MemoryHub`] | `kole_mqtt::{MqttCloud, MqttNode, MqttConnector}` |
//! | [`snapshot::SnapshotStore`] | the cache's snapshot generations | [`snapshot::MemorySnapshotStore`], [`snapshot::DirSnapshotStore`] | `kole_kube::snapshot::KubeSnapshotStore` |
//! | [`agent::WorkloadRuntime`] | an agent to what runs on the node | [`agent::ProcessRuntime`], [`agent::RecordingRuntime`] | yours |
//! | [`agent::AgentStore`] | an agent's persisted desired state | [`agent::FileAgentStore`], [`agent::MemoryAgentStore`] | yours |
//! | [`cache::StateCache`] | readers of the fleet (queries, counts) | [`cache::NodeCache`], the engine's own cache | — |
//!
//! Every seam has a contract test in the `kole-tests` package that another implementation can run
//! against itself.
//!
//! ## Two assemblies
//!
//! **A controller** is an [`engine::Engine`] (restored from the newest snapshot generation, if any)
//! run by an `engine::driver::EngineDriver` over a cloud transport, fed [`engine::WorkloadCommand`]s.
//! **An agent** is an [`agent::Agent`] run by `agent::driver::run_agent` with a connector, a
//! runtime and a store. Both drivers need the `tokio-driver` feature. Here both run in one process
//! over the in-memory hub; swap in `kole_mqtt`'s transport and the same code runs over a broker:
//!
#![cfg_attr(
    feature = "tokio-driver",
    doc = r#"
```
use std::sync::Arc;
use kole_core::prelude::*;
use tokio::sync::{mpsc, watch};

# #[tokio::main(flavor = "current_thread")]
# async fn main() -> Result<(), Box<dyn std::error::Error>> {
let hub = MemoryHub::new(MemoryConfig::default());
let (stop, shutdown) = watch::channel(false);

// The controller.
let snapshots: Arc<dyn SnapshotStore> = Arc::new(MemorySnapshotStore::new());
let (engine, _manifest, _faults) =
    restore_engine(EngineConfig::default(), snapshots.as_ref(), &RestoreLimits::default(), wall_clock_now()).await?;
let nodes = engine.store(); // a cheap reader of the engine's cache
let (events_tx, _events) = mpsc::channel(1024);
let (commands, commands_rx) = mpsc::channel(64);
let driver = EngineDriver::new(
    EngineDriverConfig::default(),
    engine,
    Arc::new(hub.cloud()?),
    Some(snapshots),
    system_clock(),
    events_tx,
);
let controller = tokio::spawn(driver.run(commands_rx, shutdown.clone()));

// An agent.
let identity = AgentIdentity {
    name: NodeName::new("cn-hangzhou-s0042-7k2m9q4x")?,
    labels: Arc::new(Labels::from_pairs([("tier", "cdn")])?),
    info: Arc::new(NodeInfo { arch: "arm64".into(), os: "linux-6.1".into(), agent_version: "1.4.2".into(), addresses: vec![] }),
};
let connect = {
    let (hub, name) = (hub.clone(), identity.name.clone());
    move || Ok(Arc::new(hub.connect(name.clone())?) as Arc<dyn NodeTransport>)
};
let store = MemoryAgentStore::new();
let mut agent_ = Agent::new(AgentConfig::default(), identity, 1, None);
let agent = tokio::spawn({
    let shutdown = shutdown.clone();
    async move {
        let mut runtime = RecordingRuntime::new();
        run_agent(&mut agent_, &connect, &mut runtime, &store, &AgentDriverConfig::default(), shutdown).await
    }
});

// The node registers, and the controller's cache holds it.
while nodes.read().len() == 0 {
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
}
drop(commands);
stop.send(true)?;
controller.await??;
agent.await?;
# Ok(())
# }
```
"#
)]
//!
//! Start from [`prelude`]; the modules hold the rest: [`model`] (names, labels, selectors,
//! workloads), [`protocol`] (the wire format, `docs/protocol.md`), [`cache`], [`snapshot`],
//! [`engine`], [`agent`], [`transport`], and the one [`backoff`], [`rng`] and [`clock`] every crate
//! of kole uses.

pub mod agent;
pub mod backoff;
pub mod cache;
pub mod clock;
pub mod engine;
pub mod model;
pub mod protocol;
pub mod rng;
pub mod runspec;
pub mod snapshot;
pub mod transport;

/// The names an assembly needs, in one `use kole_core::prelude::*;`.
pub mod prelude {
    #[cfg(feature = "tokio-driver")]
    pub use crate::agent::driver::{AgentDriverConfig, run_agent};
    pub use crate::agent::{
        Agent, AgentConfig, AgentIdentity, AgentStore, FileAgentStore, MemoryAgentStore, ProcessRuntime,
        ProcessRuntimeConfig, RecordingRuntime, WorkloadRuntime,
    };
    pub use crate::backoff::Backoff;
    pub use crate::cache::{CacheQuery, CacheStore, NodeCache, StateCache};
    pub use crate::clock::{Clock, system_clock, wall_clock_now};
    #[cfg(feature = "tokio-driver")]
    pub use crate::engine::driver::{EngineDriver, EngineDriverConfig, restore_engine};
    pub use crate::engine::{Engine, EngineConfig, WorkloadCommand, WorkloadStatus};
    pub use crate::model::{
        DeliveryMode, Labels, NodeInfo, NodeName, RolloutStrategy, Selector, Timestamp, Workload, WorkloadId,
    };
    pub use crate::snapshot::{DirSnapshotStore, MemorySnapshotStore, RestoreLimits, SnapshotOptions, SnapshotStore};
    pub use crate::transport::memory::{MemoryConfig, MemoryHub};
    pub use crate::transport::{CloudTransport, Connector, NodeTransport};
}
