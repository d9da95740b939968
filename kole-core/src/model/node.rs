//! What the cloud knows about one edge node.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{DesiredDigest, Labels, NodeName, Timestamp, WorkloadId};

/// Static facts a node reports when it registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// CPU architecture, e.g. `amd64`, `arm64` (Go's `GOARCH` spelling, as Kubernetes uses).
    pub arch: String,
    /// Operating system and version, e.g. `linux-6.1`.
    pub os: String,
    /// Version of the kole agent, e.g. `1.4.2`.
    pub agent_version: String,
    /// Addresses the node reported, primary first.
    pub addresses: Vec<IpAddr>,
}

/// Lifecycle of a node as the controller sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum NodePhase {
    /// Known (e.g. restored or pre-provisioned) but not yet registered in this controller's life.
    #[default]
    Registering = 0,
    /// Heartbeating within the liveness window.
    Online = 1,
    /// Missed too many heartbeats.
    Offline = 2,
}

impl NodePhase {
    /// Every phase, in discriminant order.
    pub const ALL: [NodePhase; 3] = [NodePhase::Registering, NodePhase::Online, NodePhase::Offline];

    /// The phase with this discriminant.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Lower-case name, as used in queries and status.
    pub fn as_str(self) -> &'static str {
        match self {
            NodePhase::Registering => "registering",
            NodePhase::Online => "online",
            NodePhase::Offline => "offline",
        }
    }
}

/// State of one workload on one node, as the agent reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum WorkloadPhase {
    /// Received, not yet running (pulling, starting, waiting for its wave).
    #[default]
    Pending = 0,
    /// Running and healthy.
    Running = 1,
    /// Failed to start or crashed beyond its restart policy.
    Failed = 2,
    /// Stopped on purpose (removed or superseded).
    Stopped = 3,
}

impl WorkloadPhase {
    /// Every phase, in discriminant order.
    pub const ALL: [WorkloadPhase; 4] =
        [WorkloadPhase::Pending, WorkloadPhase::Running, WorkloadPhase::Failed, WorkloadPhase::Stopped];

    /// The phase with this discriminant.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }
}

/// One workload's state on a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadState {
    /// The workload.
    pub workload: WorkloadId,
    /// The version the node runs (or tries to).
    pub version: u64,
    /// How it is doing.
    pub phase: WorkloadPhase,
}

/// Everything a node tells the controller when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    /// The node's name; the transport's authenticated identity must agree.
    pub name: NodeName,
    /// Labels the node carries (from its local configuration).
    pub labels: Labels,
    /// Static facts.
    pub info: NodeInfo,
    /// Digest of what the node has applied.
    pub applied: DesiredDigest,
    /// State of each workload it runs.
    pub workloads: Vec<WorkloadState>,
}

/// A full, owned view of one node in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// Name.
    pub name: NodeName,
    /// Labels.
    pub labels: Labels,
    /// Static facts.
    pub info: NodeInfo,
    /// Lifecycle phase.
    pub phase: NodePhase,
    /// When the controller last heard from the node (second precision).
    pub last_seen: Timestamp,
    /// Digest of what the node reports to have applied.
    pub applied: DesiredDigest,
    /// Per-workload state, sorted by workload.
    pub workloads: Vec<WorkloadState>,
}
