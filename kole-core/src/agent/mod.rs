//! The edge agent: a deterministic state machine, `handle(input, now, runtime) -> outputs`.
//!
//! [`Agent`] registers with the cloud when its transport connects (retrying with jittered
//! exponential backoff until an accepting [`RegisterAck`](crate::protocol::RegisterAck)),
//! subscribes to the groups the ack names, heartbeats at the acked interval (the first heartbeat
//! jittered over the interval, so a fleet that registered together does not beat in lockstep),
//! selects itself for broadcast workload specs by label selector and rollout wave, replaces its
//! desired set with a per-node [`DesiredState`](crate::protocol::DesiredState) catch-up, executes
//! commands, and reports per-workload status when it changes.
//!
//! It does no I/O and reads no clock: time is a parameter, jitter comes from a generator seeded by
//! the boot id and name, workloads run through a borrowed [`WorkloadRuntime`] (so a simulator drives
//! a million agents with one runtime), and everything to publish, subscribe or persist is appended
//! to [`AgentOutputs`]. With the `tokio-driver` feature, `driver::run_agent` connects it to a
//! [`NodeTransport`](crate::transport::NodeTransport).
//!
//! Edge autonomy: while disconnected the agent keeps running its workloads, and it persists its
//! desired set (through an [`AgentStore`]) whenever it changes; an agent created with that state
//! re-applies it on its first [`Agent::handle`] call, before any cloud contact.
//!
//! ```
//! use std::sync::Arc;
//! use kole_core::agent::{Agent, AgentConfig, AgentIdentity, AgentInput, AgentOutputs, LinkState, RecordingRuntime};
//! use kole_core::model::{DesiredDigest, Labels, NodeInfo, NodeName, Timestamp};
//! use kole_core::protocol::{self, Message, RegisterAck, RegisterOutcome};
//! use kole_core::transport::Destination;
//!
//! let name = NodeName::new("cn-hangzhou-s0042-7k2m9q4x")?;
//! let identity = AgentIdentity {
//!     name: name.clone(),
//!     labels: Arc::new(Labels::from_pairs([("tier", "cdn")])?),
//!     info: Arc::new(NodeInfo::default()),
//! };
//! let mut agent = Agent::new(AgentConfig::default(), identity, 0x5eed, None);
//! let mut runtime = RecordingRuntime::new();
//! let mut out = AgentOutputs::default();
//!
//! // Connected: the agent sends its registration.
//! agent.handle(AgentInput::Connected, Timestamp::from_secs(1), &mut runtime, &mut out);
//! assert!(matches!(protocol::decode(&out.publish[0].payload, &Default::default())?, Message::Register(_)));
//! out.clear();
//!
//! // The cloud accepts: the agent heartbeats within one interval.
//! let ack = Message::RegisterAck(RegisterAck {
//!     boot_id: 0x5eed,
//!     outcome: RegisterOutcome::Accepted,
//!     heartbeat_interval_ms: 30_000,
//!     groups: vec![],
//!     desired: DesiredDigest::EMPTY,
//! });
//! let from = Destination::Node(name);
//! agent.handle(AgentInput::Message { message: &ack, from: &from }, Timestamp::from_secs(2), &mut runtime, &mut out);
//! assert_eq!(agent.link(), LinkState::Registered);
//! assert!(out.next_wake.is_some_and(|t| t <= Timestamp::from_secs(32)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod container;
mod io;
mod process;
mod runtime;
mod spec_cache;
mod state;
mod store;

#[cfg(feature = "tokio-driver")]
pub mod driver;

#[cfg(test)]
mod tests;

pub use crate::runspec::{MAX_RESTARTS_LIMIT, RestartPolicy};
pub use container::{
    CONFIG_MOUNT_PATH, ContainerEngine, ContainerError, ContainerRuntime, ContainerRuntimeConfig,
    DEFAULT_PASSTHROUGH_ENV, LABEL_MANAGED, LABEL_NODE, LABEL_VERSION, LABEL_WORKLOAD, UnknownEngine, container_name,
};
pub use io::{AgentConfig, AgentEvent, AgentIdentity, AgentInput, AgentOutputs, GroupChange};
pub use process::{DEFAULT_PATH, LeftoverWorkload, ProcessRuntime, ProcessRuntimeConfig};
pub use runtime::{RecordingRuntime, RuntimeCall, RuntimeOp, WorkloadRuntime};
pub use spec_cache::SpecCache;
pub use state::{Agent, LinkState};
pub use store::{
    AgentStore, FileAgentStore, MemoryAgentStore, PersistedState, STATE_FORMAT_VERSION, STATE_MAGIC, StateDecodeError,
    StoreError, load_or_empty,
};
