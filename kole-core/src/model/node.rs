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

/// A node's compact health, one byte in every heartbeat: a set of flags.
///
/// Bits without a constant here are reserved: decoders keep them (so a newer agent's flags survive
/// an older controller) and must not give them a meaning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeHealth(pub u8);

impl NodeHealth {
    /// Everything fine.
    pub const OK: Self = Self(0);
    /// The agent itself has a problem (e.g. cannot reach its container runtime).
    pub const DEGRADED: Self = Self(0x01);
    /// At least one workload is `Failed`.
    pub const WORKLOAD_FAILED: Self = Self(0x02);
    /// At least one workload is `Pending` (pulling, starting, waiting for its wave).
    pub const WORKLOAD_PENDING: Self = Self(0x04);
    /// The node is short of disk, memory or PIDs.
    pub const RESOURCE_PRESSURE: Self = Self(0x08);
    /// The node's clock is not synchronized.
    pub const CLOCK_UNSYNCED: Self = Self(0x10);
    /// The agent refused downlink messages since its last heartbeat: unsigned, forged, signed by an
    /// untrusted or revoked key, or replayed (see `protocol::seal`). Worth an alert.
    pub const DOWNLINK_REFUSED: Self = Self(0x20);

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// This set with the flags of `other` added.
    #[must_use]
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether no flag is set.
    pub const fn is_ok(self) -> bool {
        self.0 == 0
    }

    /// Whether any flag of `other` is set.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// The known flags and their names, as `kubectl` output and `NodeQuery` spell them.
    pub const NAMED: [(Self, &'static str); 6] = [
        (Self::DEGRADED, "Degraded"),
        (Self::WORKLOAD_FAILED, "WorkloadFailed"),
        (Self::WORKLOAD_PENDING, "WorkloadPending"),
        (Self::RESOURCE_PRESSURE, "ResourcePressure"),
        (Self::CLOCK_UNSYNCED, "ClockUnsynced"),
        (Self::DOWNLINK_REFUSED, "DownlinkRefused"),
    ];

    /// The names of the set flags, in bit order; a reserved bit is named `Bit<n>`.
    pub fn names(self) -> Vec<String> {
        (0..8u8)
            .filter(|b| self.0 & (1 << b) != 0)
            .map(|b| match Self::NAMED.iter().find(|(f, _)| f.0 == 1 << b) {
                Some((_, name)) => (*name).to_owned(),
                None => format!("Bit{b}"),
            })
            .collect()
    }

    /// The flag a name of [`NodeHealth::NAMED`] stands for (ASCII case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMED.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)).map(|(f, _)| *f)
    }
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
    /// Health flags of the node's last heartbeat ([`NodeHealth::OK`] after a registration or a
    /// restore, until the next heartbeat: health is not persisted in snapshots).
    pub health: NodeHealth,
    /// Per-workload state, sorted by workload.
    pub workloads: Vec<WorkloadState>,
}
