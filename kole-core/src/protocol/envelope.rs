//! The envelope: a version byte, a kind byte, then the postcard body; and the decoder's limits
//! and errors.
//!
//! ```text
//! byte 0      byte 1      bytes 2..
//! ┌─────────┬───────────┬──────────────────────────────┐
//! │ version │ kind      │ postcard body of that kind   │
//! │ = 1     │ see below │ (no length prefix, no tail)  │
//! └─────────┴───────────┴──────────────────────────────┘
//! ```
//!
//! Decoding is defensive: the length is checked before anything else, then the version and kind,
//! then the body is decoded borrowing from the input (strings and byte strings are not copied until
//! they have been checked), then every limit and every field rule is checked, and only then are the
//! owned message types built. Nothing on that path panics, and allocation stays within a small
//! multiple of the input length (see `docs/protocol.md`).

use std::fmt;

use crate::model::{DesiredDigest, Labels, NodeInfo, NodeName, ValidationError, WorkloadState};

use super::address::{GroupNameError, UplinkKind};
use super::messages::{Direction, Message, MessageKind};
use super::wire;

/// The protocol version this build speaks (envelope byte 0).
pub const PROTOCOL_VERSION: u8 = 1;

/// Length of the envelope header (version and kind bytes).
pub const HEADER_LEN: usize = 2;

/// Bounds the decoder enforces on untrusted input. Every field has a documented default
/// ([`DecodeLimits::default`]); raise them only together with the broker's maximum packet size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecodeLimits {
    /// Largest accepted message, envelope included, checked before any decoding. Default 64 KiB.
    pub max_message_bytes: usize,
    /// Largest runtime spec of one workload, in bytes. Default 60 KiB.
    pub max_spec_bytes: usize,
    /// Most labels in one registration. Default 64.
    pub max_labels: usize,
    /// Most workloads (states or specs) in one message. Default 256.
    pub max_workloads: usize,
    /// Most groups in one registration ack. Default 64.
    pub max_groups: usize,
    /// Longest string of any field, in bytes. Default 512 (label keys and workload ids reach 317).
    pub max_string_len: usize,
    /// Most addresses in one node's info. Default 16.
    pub max_addresses: usize,
    /// Most requirements plus values in one workload's selector. Default 256.
    pub max_selector_terms: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_spec_bytes: 60 * 1024,
            max_labels: 64,
            max_workloads: 256,
            max_groups: 64,
            max_string_len: 512,
            max_addresses: 16,
            max_selector_terms: 256,
        }
    }
}

/// Which [`DecodeLimits`] bound a message exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// [`DecodeLimits::max_spec_bytes`].
    SpecBytes,
    /// [`DecodeLimits::max_labels`].
    Labels,
    /// [`DecodeLimits::max_workloads`].
    Workloads,
    /// [`DecodeLimits::max_groups`].
    Groups,
    /// [`DecodeLimits::max_string_len`].
    StringLen,
    /// [`DecodeLimits::max_addresses`].
    Addresses,
    /// [`DecodeLimits::max_selector_terms`].
    SelectorTerms,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::SpecBytes => "max_spec_bytes",
            Limit::Labels => "max_labels",
            Limit::Workloads => "max_workloads",
            Limit::Groups => "max_groups",
            Limit::StringLen => "max_string_len",
            Limit::Addresses => "max_addresses",
            Limit::SelectorTerms => "max_selector_terms",
        })
    }
}

/// Why bytes were not accepted as a message. Nothing was decoded when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty message: expected at least the 2-byte envelope header")]
    Empty,
    /// Only the version byte.
    #[error("1-byte message: the envelope header is a version byte and a kind byte")]
    MissingKind,
    /// The version byte is not one this build speaks.
    #[error(
        "unsupported protocol version {version} (this build speaks version {PROTOCOL_VERSION}); upgrade the older side"
    )]
    UnsupportedVersion {
        /// The version byte received.
        version: u8,
    },
    /// The kind byte names no message.
    #[error("unknown message kind 0x{kind:02x}")]
    UnknownKind {
        /// The kind byte received.
        kind: u8,
    },
    /// A message travelling the wrong way (e.g. a node sending a downlink kind).
    #[error("{kind} is a {actual} message, but a {expected} message was expected")]
    WrongDirection {
        /// The kind received.
        kind: MessageKind,
        /// The direction of that kind.
        actual: Direction,
        /// The direction the caller accepts.
        expected: Direction,
    },
    /// Longer than [`DecodeLimits::max_message_bytes`]; rejected before decoding.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid postcard encoding of the kind's body.
    #[error("malformed {kind} body: {reason}")]
    Malformed {
        /// The kind whose body failed to decode.
        kind: MessageKind,
        /// The decoder's explanation.
        reason: String,
    },
    /// The body decoded, but a field breaks one of the model's rules.
    #[error("{kind}: invalid field `{field}`")]
    InvalidField {
        /// The message kind.
        kind: MessageKind,
        /// The field's path, e.g. `labels` or `workloads[].workload`.
        field: &'static str,
        /// The rule broken.
        #[source]
        source: ValidationError,
    },
    /// The body decoded, but a group name breaks the topic naming rules.
    #[error("{kind}: invalid group name in `{field}`")]
    InvalidGroup {
        /// The message kind.
        kind: MessageKind,
        /// The field's path.
        field: &'static str,
        /// The rule broken.
        #[source]
        source: GroupNameError,
    },
    /// The body decoded with bytes left over.
    #[error("{kind}: {count} trailing bytes after the body")]
    TrailingBytes {
        /// The message kind.
        kind: MessageKind,
        /// How many bytes were left.
        count: usize,
    },
    /// A count or length exceeds one of the [`DecodeLimits`].
    #[error("{kind}: {actual} exceeds {limit} = {max}")]
    LimitExceeded {
        /// The message kind.
        kind: MessageKind,
        /// The limit exceeded.
        limit: Limit,
        /// The count or length found.
        actual: usize,
        /// The limit's value.
        max: usize,
    },
    /// The payload's kind disagrees with the uplink topic it arrived on.
    #[error("{payload} received on the `{topic}` uplink topic")]
    TopicKindMismatch {
        /// The kind named by the topic.
        topic: UplinkKind,
        /// The kind in the payload.
        payload: MessageKind,
    },
    /// A registration claims another node than the topic's (authenticated) node.
    #[error("registration on the topic of node {topic} claims to be node {claimed}")]
    IdentityMismatch {
        /// The node of the topic.
        topic: NodeName,
        /// The node the payload claims.
        claimed: NodeName,
    },
}

impl DecodeError {
    /// A stable, low-cardinality name of the error's variant, for a rejected-messages counter.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::MissingKind => "missing_kind",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
            DecodeError::UnknownKind { .. } => "unknown_kind",
            DecodeError::WrongDirection { .. } => "wrong_direction",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::InvalidField { .. } => "invalid_field",
            DecodeError::InvalidGroup { .. } => "invalid_group",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::LimitExceeded { .. } => "limit_exceeded",
            DecodeError::TopicKindMismatch { .. } => "topic_kind_mismatch",
            DecodeError::IdentityMismatch { .. } => "identity_mismatch",
        }
    }
}

/// Encodes a message into a new buffer.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(msg, &mut buf);
    buf
}

/// Encodes a message into `buf`, replacing its contents and reusing its capacity: a heartbeat
/// encoded into a buffer that held one before allocates nothing.
///
/// Encoding does not check [`DecodeLimits`]; a sender that wants to be sure a receiver accepts the
/// message compares the length with the receiver's limits.
pub fn encode_into(msg: &Message, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(PROTOCOL_VERSION);
    buf.push(msg.kind().as_u8());
    if let Err(e) = wire::encode_body(msg, buf) {
        // Unreachable in practice: every body type has a known-length encoding into memory. Should
        // it ever fail, leave the bare header, which every decoder rejects as malformed.
        debug_assert!(false, "encoding a {} body failed: {e}", msg.kind());
        buf.truncate(HEADER_LEN);
    }
}

/// A registration by reference: what [`encode_register`] writes, byte for byte the same as
/// [`encode`] of the equivalent [`Message::Register`], without cloning labels and facts into one.
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

/// Encodes a registration from borrowed parts (see [`RegisterRef`]).
pub fn encode_register(r: &RegisterRef<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    buf.push(PROTOCOL_VERSION);
    buf.push(MessageKind::Register.as_u8());
    if wire::encode_register_body(r, &mut buf).is_err() {
        debug_assert!(false, "encoding a registration failed");
        buf.truncate(HEADER_LEN);
    }
    buf
}

/// Reads and checks the envelope header: length, version and kind.
///
/// Cheap (two bytes), so a receiver can count or route by kind before paying for the body.
pub fn peek_kind(bytes: &[u8], limits: &DecodeLimits) -> Result<MessageKind, DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > limits.max_message_bytes {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: limits.max_message_bytes });
    }
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    let &kind = rest.first().ok_or(DecodeError::MissingKind)?;
    MessageKind::from_u8(kind).ok_or(DecodeError::UnknownKind { kind })
}

/// Decodes and validates one message of either direction.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Message, DecodeError> {
    let kind = peek_kind(bytes, limits)?;
    wire::decode_body(kind, &bytes[HEADER_LEN..], limits)
}

fn decode_directed(bytes: &[u8], expected: Direction, limits: &DecodeLimits) -> Result<Message, DecodeError> {
    let kind = peek_kind(bytes, limits)?;
    if kind.direction() != expected {
        return Err(DecodeError::WrongDirection { kind, actual: kind.direction(), expected });
    }
    wire::decode_body(kind, &bytes[HEADER_LEN..], limits)
}

/// Decodes a message a node sent (the cloud's decoder): downlink kinds are refused before their
/// body is looked at.
pub fn decode_uplink(bytes: &[u8], limits: &DecodeLimits) -> Result<Message, DecodeError> {
    decode_directed(bytes, Direction::Uplink, limits)
}

/// Decodes a message the cloud sent (a node's decoder): uplink kinds are refused before their body
/// is looked at.
pub fn decode_downlink(bytes: &[u8], limits: &DecodeLimits) -> Result<Message, DecodeError> {
    decode_directed(bytes, Direction::Downlink, limits)
}

/// Decodes a message that arrived on `node`'s uplink topic of kind `topic_kind`, enforcing the
/// identity rule: it must be an uplink message, of the topic's kind, and a registration must claim
/// the topic's node (the topic is authoritative; the broker ACL ties it to the node's credentials).
pub fn decode_from_node(
    bytes: &[u8],
    node: &NodeName,
    topic_kind: UplinkKind,
    limits: &DecodeLimits,
) -> Result<Message, DecodeError> {
    let kind = peek_kind(bytes, limits)?;
    if kind.direction() != Direction::Uplink {
        return Err(DecodeError::WrongDirection { kind, actual: kind.direction(), expected: Direction::Uplink });
    }
    if kind.uplink() != Some(topic_kind) {
        return Err(DecodeError::TopicKindMismatch { topic: topic_kind, payload: kind });
    }
    let msg = wire::decode_body(kind, &bytes[HEADER_LEN..], limits)?;
    if let Message::Register(reg) = &msg
        && reg.name != *node
    {
        return Err(DecodeError::IdentityMismatch { topic: node.clone(), claimed: reg.name.clone() });
    }
    Ok(msg)
}
