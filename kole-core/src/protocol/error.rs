//! Why the decoder refused bytes: one error enum for every step of [`super::decode`].

use crate::model::{NodeName, ValidationError};

use super::address::{GroupNameError, UplinkKind};
use super::limits::Limit;
use super::messages::{Direction, MessageKind, PROTOCOL_VERSION, REASONS_VERSION};

/// Why bytes were not accepted as a message. Nothing was decoded when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty message: expected at least the 2-byte envelope header")]
    Empty,
    /// Only the version byte.
    #[error("1-byte message: the envelope header is a version byte and a kind byte")]
    MissingKind,
    /// The version byte is not one this build speaks.
    #[error(
        "unsupported protocol version {version} (this build speaks versions {PROTOCOL_VERSION} to {REASONS_VERSION}); upgrade the older side"
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
    /// Longer than [`DecodeLimits::max_message_bytes`](super::DecodeLimits::max_message_bytes); rejected
    /// before decoding.
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
    /// A count or length exceeds one of the [`DecodeLimits`](super::DecodeLimits).
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
    /// A downlink message without a signature, where signatures are required (the agent pins keys).
    #[error("unsigned downlink message (version {version}); this agent accepts only messages signed by a trusted key")]
    Unsigned {
        /// The envelope version found.
        version: u8,
    },
    /// Signed with a key the agent does not trust.
    #[error("signed with key {key:08x}, which this agent does not trust (add it to its trusted keys)")]
    UnknownKey {
        /// The key id.
        key: u32,
    },
    /// Signed with a revoked key.
    #[error("signed with revoked key {key:08x}")]
    RevokedKey {
        /// The key id.
        key: u32,
    },
    /// The signature does not verify (forged, altered, or signed for another destination).
    #[error("the signature does not verify: forged, altered, or signed for another destination")]
    BadSignature,
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
            DecodeError::Unsigned { .. } => "unsigned",
            DecodeError::UnknownKey { .. } => "unknown_key",
            DecodeError::RevokedKey { .. } => "revoked_key",
            DecodeError::BadSignature => "bad_signature",
        }
    }
}
