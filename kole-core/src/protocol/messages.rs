//! The protocol's messages: what nodes send up (register, heartbeat, status) and what the cloud
//! sends down (acks, specs, desired state, commands), with their kinds and directions.
//!
//! The types here are plain data; [`super::encode`] and [`super::decode`] turn them into and out of
//! bytes, and `docs/protocol.md` documents the encoding of every field.

use std::fmt;

pub use crate::model::NodeHealth;
use crate::model::{
    DesiredDigest, Labels, LabelsView, NodeInfo, NodeName, NodeRegistration, Workload, WorkloadId, WorkloadState,
};

use super::address::{GroupName, UplinkKind};

/// The protocol version of every message but a status report with failure reasons (envelope
/// byte 0).
pub const PROTOCOL_VERSION: u8 = 1;

/// The version of a [`StatusReport`] that carries failure reasons. Only a status report is ever
/// written with it, and only when it has reasons, so an agent stays readable by version-1
/// controllers until it has a failure reason to tell (upgrade controllers first).
pub const REASONS_VERSION: u8 = 2;

/// Which way a message travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Node → cloud, on the node's own uplink addresses.
    Uplink,
    /// Cloud → node(s), on downlink addresses.
    Downlink,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Uplink => "uplink",
            Direction::Downlink => "downlink",
        })
    }
}

/// The kind byte of the envelope (byte 1). Uplink kinds have the high bit clear, downlink kinds
/// have it set, so the direction is visible in the byte itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// [`Register`], node → cloud.
    Register = 0x01,
    /// [`Heartbeat`], node → cloud.
    Heartbeat = 0x02,
    /// [`StatusReport`], node → cloud.
    StatusReport = 0x03,
    /// [`RegisterAck`], cloud → node.
    RegisterAck = 0x81,
    /// [`WorkloadSpec`], cloud → nodes.
    WorkloadSpec = 0x82,
    /// [`WorkloadRemoved`], cloud → nodes.
    WorkloadRemoved = 0x83,
    /// [`DesiredState`], cloud → node.
    DesiredState = 0x84,
    /// [`Command`], cloud → node(s).
    Command = 0x85,
}

impl MessageKind {
    /// Every kind, uplink first.
    pub const ALL: [MessageKind; 8] = [
        MessageKind::Register,
        MessageKind::Heartbeat,
        MessageKind::StatusReport,
        MessageKind::RegisterAck,
        MessageKind::WorkloadSpec,
        MessageKind::WorkloadRemoved,
        MessageKind::DesiredState,
        MessageKind::Command,
    ];

    /// The kind with this envelope byte.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == byte)
    }

    /// The envelope byte.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// Which way messages of this kind travel.
    pub const fn direction(self) -> Direction {
        if (self as u8) & 0x80 == 0 { Direction::Uplink } else { Direction::Downlink }
    }

    /// The uplink topic kind carrying this message kind, for uplink kinds.
    pub const fn uplink(self) -> Option<UplinkKind> {
        match self {
            MessageKind::Register => Some(UplinkKind::Register),
            MessageKind::Heartbeat => Some(UplinkKind::Heartbeat),
            MessageKind::StatusReport => Some(UplinkKind::Status),
            _ => None,
        }
    }

    /// A stable lower-case name, for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageKind::Register => "register",
            MessageKind::Heartbeat => "heartbeat",
            MessageKind::StatusReport => "status_report",
            MessageKind::RegisterAck => "register_ack",
            MessageKind::WorkloadSpec => "workload_spec",
            MessageKind::WorkloadRemoved => "workload_removed",
            MessageKind::DesiredState => "desired_state",
            MessageKind::Command => "command",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.as_str(), *self as u8)
    }
}

impl From<UplinkKind> for MessageKind {
    fn from(k: UplinkKind) -> Self {
        match k {
            UplinkKind::Register => MessageKind::Register,
            UplinkKind::Heartbeat => MessageKind::Heartbeat,
            UplinkKind::Status => MessageKind::StatusReport,
        }
    }
}

/// Uplink: a node announces itself, on its [`UplinkKind::Register`] uplink (QoS 1).
///
/// Sent on every agent start and whenever the controller asks for it ([`CommandKind::Reregister`])
/// or a heartbeat is refused. The controller answers with a [`RegisterAck`] on the node's topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    /// The name the node claims. The topic's node level is authoritative (the broker ACL ties it to
    /// the client's credentials); the controller rejects a registration whose claim disagrees.
    pub name: NodeName,
    /// Random per agent start; heartbeats of another boot are refused until the node re-registers.
    pub boot_id: u32,
    /// The node's labels.
    pub labels: Labels,
    /// Static facts about the node.
    pub info: NodeInfo,
    /// Digest of what the node has applied.
    pub applied: DesiredDigest,
    /// State of each workload the node runs.
    pub workloads: Vec<WorkloadState>,
}

impl Register {
    /// The cache's view of this registration (the boot id travels separately).
    pub fn to_registration(&self) -> NodeRegistration {
        NodeRegistration {
            name: self.name.clone(),
            labels: self.labels.clone(),
            info: self.info.clone(),
            applied: self.applied,
            workloads: self.workloads.clone(),
        }
    }

    /// Splits into the cache's registration and the boot id, without copying.
    pub fn into_registration(self) -> (NodeRegistration, u32) {
        let reg = NodeRegistration {
            name: self.name,
            labels: self.labels,
            info: self.info,
            applied: self.applied,
            workloads: self.workloads,
        };
        (reg, self.boot_id)
    }
}

/// A [`Register`] decoded without copying its strings: name, labels and facts borrow the payload
/// ([`super::decode_register_view`]). It passed exactly the checks a [`Register`] passes; the
/// controller interns it straight into its cache, so registering a node allocates no per-node
/// strings on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterView<'a> {
    /// The name the node claims (a valid node name, the topic's node).
    pub name: &'a str,
    /// Random per agent start.
    pub boot_id: u32,
    /// The node's labels: valid, sorted strictly by key, borrowed as the block they arrived in.
    pub labels: LabelsView<'a>,
    /// Architecture.
    pub arch: &'a str,
    /// Operating system.
    pub os: &'a str,
    /// Agent version.
    pub agent_version: &'a str,
    /// Addresses.
    pub addresses: Vec<std::net::IpAddr>,
    /// Digest of what the node has applied.
    pub applied: DesiredDigest,
    /// State of each workload the node runs (usually none at registration; owned, as ids are shared
    /// `Arc`s anyway).
    pub workloads: Vec<WorkloadState>,
}

impl RegisterView<'_> {
    /// The owned [`Register`] with the same content.
    pub fn to_register(&self) -> Result<Register, crate::model::ValidationError> {
        Ok(Register {
            name: NodeName::new(self.name)?,
            boot_id: self.boot_id,
            labels: self.labels.to_labels(),
            info: NodeInfo {
                arch: self.arch.to_owned(),
                os: self.os.to_owned(),
                agent_version: self.agent_version.to_owned(),
                addresses: self.addresses.clone(),
            },
            applied: self.applied,
            workloads: self.workloads.clone(),
        })
    }
}

/// A registration by reference: what [`super::encode_register`] writes, byte for byte the same as
/// [`super::encode`] of the equivalent [`Message::Register`], without cloning labels and facts into one.
#[derive(Clone, Copy, Debug)]
pub struct RegisterRef<'a> {
    /// The node's name.
    pub name: &'a NodeName,
    /// Boot id.
    pub boot_id: u32,
    /// Labels.
    pub labels: &'a Labels,
    /// Static facts.
    pub info: &'a NodeInfo,
    /// Applied digest.
    pub applied: DesiredDigest,
    /// Per-workload state.
    pub workloads: &'a [WorkloadState],
}

/// Uplink: "I am alive", on its [`UplinkKind::Heartbeat`] uplink (QoS 0), every heartbeat interval.
///
/// Carries no name: the identity is the topic's node level. Encoded in at most 20 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Heartbeat {
    /// Strictly increasing within a boot; shared with [`StatusReport::seq`], so the controller can
    /// order and de-duplicate both.
    pub seq: u32,
    /// The boot id of the node's registration.
    pub boot_id: u32,
    /// Digest of what the node has applied; a mismatch with the desired digest triggers catch-up.
    pub applied: DesiredDigest,
    /// Compact health flags.
    pub health: NodeHealth,
}

/// Uplink: full per-workload status, on its [`UplinkKind::Status`] uplink (QoS 1), only when it changed (and on
/// [`CommandKind::Resync`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    /// Sequence, from the same counter as [`Heartbeat::seq`].
    pub seq: u32,
    /// The boot id of the node's registration.
    pub boot_id: u32,
    /// Digest of what the node has applied.
    pub applied: DesiredDigest,
    /// State of every workload on the node.
    pub workloads: Vec<WorkloadState>,
    /// Why failed workloads failed, as the node's runtime tells it: at most one per entry of
    /// `workloads`, each naming a `Failed` one, in increasing index order. Empty when nothing
    /// failed or the runtime gave no reason (and then nothing of it is on the wire).
    pub reasons: Vec<FailureReason>,
}

/// Longest failure reason an agent sends, in bytes (longer ones are cut on a char boundary).
pub const MAX_REASON_BYTES: usize = 256;

/// Why one workload of a [`StatusReport`] failed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FailureReason {
    /// Index of the workload in [`StatusReport::workloads`] (compact: no second copy of its id).
    pub index: u32,
    /// A short line a person can act on, e.g. "exec /nonexistent: No such file or directory".
    pub reason: String,
}

impl FailureReason {
    /// A reason for the workload at `index`, cut to [`MAX_REASON_BYTES`] on a char boundary.
    pub fn new(index: u32, reason: &str) -> Self {
        Self { index, reason: cut(reason, MAX_REASON_BYTES).to_owned() }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why a registration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The payload's name disagrees with the topic's node level.
    IdentityMismatch,
    /// The registration breaks a rule (labels, limits) the decoder could not check.
    Invalid,
    /// The node is not allowed in this fleet (e.g. decommissioned).
    NotAllowed,
    /// The controller sheds load; retry after `retry_after_ms`.
    Overloaded,
}

/// The controller's answer to a registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// Registered: start heartbeating.
    Accepted,
    /// Refused.
    Rejected {
        /// Why.
        code: RejectCode,
        /// A human-readable explanation for the agent's log.
        message: String,
        /// Retry no sooner than this (plus jitter); 0 leaves it to the agent's backoff.
        retry_after_ms: u32,
    },
}

/// Downlink: answer to a [`Register`], on the node's topic (QoS 1), sent immediately.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterAck {
    /// The boot id of the registration answered, so an agent ignores a late ack of an earlier boot.
    pub boot_id: u32,
    /// Accepted or rejected.
    pub outcome: RegisterOutcome,
    /// How often to heartbeat, in milliseconds (agents add jitter).
    pub heartbeat_interval_ms: u32,
    /// The groups the node must subscribe to (replacing its previous set).
    pub groups: Vec<GroupName>,
    /// The digest of the node's desired state; when its applied digest differs, expect catch-up.
    pub desired: DesiredDigest,
}

/// Downlink: a workload's spec, retained on its spec topic (fleet-wide or a group's, QoS 1), or sent
/// to one node. Agents select themselves: they apply it when the selector matches their labels and
/// their [`crate::model::wave_point`] is below `wave_threshold`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// The workload, complete.
    pub workload: Workload,
    /// The rollout's current reach in hundredths of a percent (`0..=10_000`): nodes whose wave point
    /// is below it run this version. `10_000` reaches every targeted node.
    pub wave_threshold: u16,
}

impl WorkloadSpec {
    /// The threshold that reaches every targeted node.
    pub const ALL_WAVES: u16 = 10_000;

    /// Whether a node with this name and these labels should run this version now.
    pub fn selects(&self, node: &str, labels: &Labels) -> bool {
        self.workload.selector.matches(labels)
            && crate::model::wave_point(node, &self.workload.id) < self.wave_threshold
    }
}

/// Downlink: a workload was deleted; agents stop it (fleet or group topic, QoS 1). The retained spec
/// topic is cleared at the same time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadRemoved {
    /// The workload deleted.
    pub id: WorkloadId,
}

/// Downlink: the complete desired state of one node, on its topic (QoS 1): catch-up after a digest
/// mismatch. The agent runs exactly these workloads (no self-selection: the controller resolved
/// selectors and waves).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredState {
    /// Digest of `workloads` (the node reports it back as applied once converged).
    pub digest: DesiredDigest,
    /// Every workload the node should run.
    pub workloads: Vec<Workload>,
}

/// What a [`Command`] asks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// Send a fresh [`Register`] (e.g. after a controller restart lost the node).
    Reregister,
    /// Send a [`StatusReport`] now.
    Resync,
    /// Restart one workload.
    RestartWorkload(WorkloadId),
    /// Answer with a heartbeat now (liveness probe).
    Ping,
}

/// Downlink: an imperative request (node, group or fleet topic, QoS 1).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Command {
    /// Controller-chosen id, so an agent executes a redelivered command once.
    pub id: u64,
    /// What to do.
    pub kind: CommandKind,
}

/// Any protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Register`].
    Register(Register),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`StatusReport`].
    StatusReport(StatusReport),
    /// See [`RegisterAck`].
    RegisterAck(RegisterAck),
    /// See [`WorkloadSpec`].
    WorkloadSpec(WorkloadSpec),
    /// See [`WorkloadRemoved`].
    WorkloadRemoved(WorkloadRemoved),
    /// See [`DesiredState`].
    DesiredState(DesiredState),
    /// See [`Command`].
    Command(Command),
}

impl Message {
    /// The message's kind (its envelope byte).
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Register(_) => MessageKind::Register,
            Message::Heartbeat(_) => MessageKind::Heartbeat,
            Message::StatusReport(_) => MessageKind::StatusReport,
            Message::RegisterAck(_) => MessageKind::RegisterAck,
            Message::WorkloadSpec(_) => MessageKind::WorkloadSpec,
            Message::WorkloadRemoved(_) => MessageKind::WorkloadRemoved,
            Message::DesiredState(_) => MessageKind::DesiredState,
            Message::Command(_) => MessageKind::Command,
        }
    }

    /// Which way the message travels.
    pub fn direction(&self) -> Direction {
        self.kind().direction()
    }

    /// The envelope version it is written with: [`REASONS_VERSION`] for a status report with
    /// failure reasons, [`PROTOCOL_VERSION`] for everything else.
    pub fn version(&self) -> u8 {
        match self {
            Message::StatusReport(r) if !r.reasons.is_empty() => REASONS_VERSION,
            _ => PROTOCOL_VERSION,
        }
    }
}

macro_rules! from_body {
    ($($variant:ident),*) => {$(
        impl From<$variant> for Message {
            fn from(m: $variant) -> Self {
                Message::$variant(m)
            }
        }
    )*};
}

from_body!(Register, Heartbeat, StatusReport, RegisterAck, WorkloadSpec, WorkloadRemoved, DesiredState, Command);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_bytes_and_directions() {
        for k in MessageKind::ALL {
            assert_eq!(MessageKind::from_u8(k.as_u8()), Some(k));
            assert_eq!(k.direction() == Direction::Uplink, k.uplink().is_some(), "{k}");
        }
        for k in UplinkKind::ALL {
            assert_eq!(MessageKind::from(k).uplink(), Some(k));
        }
        assert_eq!(MessageKind::from_u8(0), None);
        assert_eq!(MessageKind::from_u8(0x80), None);
        assert_eq!(MessageKind::from_u8(0xff), None);
    }

    #[test]
    fn reasons_are_cut_on_a_char_boundary() {
        let long = "é".repeat(200); // 400 bytes
        let r = FailureReason::new(0, &long);
        assert!(r.reason.len() <= MAX_REASON_BYTES && r.reason.len() >= MAX_REASON_BYTES - 1);
        assert!(long.starts_with(&r.reason));
        assert_eq!(FailureReason::new(1, "short").reason, "short");
    }

    #[test]
    fn health_flags() {
        let h = NodeHealth::OK.with(NodeHealth::WORKLOAD_FAILED).with(NodeHealth::CLOCK_UNSYNCED);
        assert!(h.contains(NodeHealth::WORKLOAD_FAILED) && !h.contains(NodeHealth::DEGRADED) && !h.is_ok());
        assert!(NodeHealth::OK.is_ok());
    }
}
