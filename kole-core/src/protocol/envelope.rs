//! The envelope: a version byte, a kind byte, then the postcard body. The decoder's limits and
//! errors live in `limits.rs` and `error.rs`, so the body codec (`wire.rs`) needs nothing from here.
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

use crate::model::{DesiredDigest, NodeName};

use super::address::{GroupName, UplinkKind};
use super::error::DecodeError;
use super::limits::DecodeLimits;
use super::messages::{
    Direction, Heartbeat, Message, MessageKind, PROTOCOL_VERSION, REASONS_VERSION, RegisterRef, RegisterView,
};
use super::wire;

/// Length of the envelope header (version and kind bytes).
pub const HEADER_LEN: usize = 2;

/// Encodes a message into a new buffer.
pub fn encode(msg: &Message) -> Vec<u8> {
    // Encoded into a reused scratch buffer, then copied once at its exact length: one allocation
    // per message instead of a chain of growing ones, and no slack held while it is queued.
    with_scratch(|buf| {
        encode_into(msg, buf);
        buf.to_vec()
    })
}

/// Runs `f` with this thread's scratch buffer (a fresh one if it is already in use).
fn with_scratch(f: impl FnOnce(&mut Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// A scratch buffer grown by a large message is not kept beyond this.
    const KEEP: usize = 64 * 1024;
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut buf) => {
            let out = f(&mut buf);
            if buf.capacity() > KEEP {
                *buf = Vec::new();
            }
            out
        }
        Err(_) => f(&mut Vec::new()),
    })
}

/// Encodes a message into `buf`, replacing its contents and reusing its capacity: a heartbeat
/// encoded into a buffer that held one before allocates nothing.
///
/// Encoding does not check [`DecodeLimits`]; a sender that wants to be sure a receiver accepts the
/// message compares the length with the receiver's limits.
pub fn encode_into(msg: &Message, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(msg.version());
    buf.push(msg.kind().as_u8());
    if let Err(e) = wire::encode_body(msg, buf) {
        // Unreachable in practice: every body type has a known-length encoding into memory. Should
        // it ever fail, leave the bare header, which every decoder rejects as malformed.
        debug_assert!(false, "encoding a {} body failed: {e}", msg.kind());
        buf.truncate(HEADER_LEN);
    }
}

/// Encodes a registration from borrowed parts (see [`RegisterRef`]).
pub fn encode_register(r: &RegisterRef<'_>) -> Vec<u8> {
    with_scratch(|buf| {
        buf.clear();
        buf.push(PROTOCOL_VERSION);
        buf.push(MessageKind::Register.as_u8());
        if wire::encode_register_body(r, buf).is_err() {
            debug_assert!(false, "encoding a registration failed");
            buf.truncate(HEADER_LEN);
        }
        buf.to_vec()
    })
}

/// The encoded form of a list of groups, made once and copied into every accepted ack that carries
/// the same list (the controller keeps one per label set): an ack then copies one block instead of
/// reading every group's name where it lies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedGroups(Vec<u8>);

impl EncodedGroups {
    /// Encodes `groups`.
    pub fn new(groups: &[GroupName]) -> Self {
        let mut buf = Vec::new();
        if wire::encode_groups(groups, &mut buf).is_err() {
            debug_assert!(false, "encoding groups failed");
            buf.clear();
        }
        Self(buf)
    }

    /// The encoded bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Encodes an accepted [`RegisterAck`](super::RegisterAck) with groups encoded beforehand: the same bytes as
/// [`encode`] of the ack with those groups.
pub fn encode_accepted_ack(
    boot_id: u32,
    heartbeat_interval_ms: u32,
    groups: &EncodedGroups,
    desired: DesiredDigest,
) -> Vec<u8> {
    with_scratch(|buf| {
        buf.clear();
        buf.push(PROTOCOL_VERSION);
        buf.push(MessageKind::RegisterAck.as_u8());
        if wire::encode_accepted_ack_body(boot_id, heartbeat_interval_ms, &groups.0, desired, buf).is_err() {
            debug_assert!(false, "encoding an ack failed");
            buf.truncate(HEADER_LEN);
        }
        buf.to_vec()
    })
}

/// Reads and checks the envelope header: length, version and kind.
///
/// Cheap (two bytes), so a receiver can count or route by kind before paying for the body.
pub fn peek_kind(bytes: &[u8], limits: &DecodeLimits) -> Result<MessageKind, DecodeError> {
    header(bytes, limits).map(|(_, kind)| kind)
}

/// The checked header: version and kind.
fn header(bytes: &[u8], limits: &DecodeLimits) -> Result<(u8, MessageKind), DecodeError> {
    let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > limits.max_message_bytes {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: limits.max_message_bytes });
    }
    if !(PROTOCOL_VERSION..=REASONS_VERSION).contains(&version) {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    let &kind = rest.first().ok_or(DecodeError::MissingKind)?;
    let kind = MessageKind::from_u8(kind).ok_or(DecodeError::UnknownKind { kind })?;
    // Version 2 exists only for status reports with reasons: one encoding per message.
    if version == REASONS_VERSION && kind != MessageKind::StatusReport {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    Ok((version, kind))
}

/// Decodes and validates one message of either direction.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Message, DecodeError> {
    let (version, kind) = header(bytes, limits)?;
    wire::decode_body(kind, version, &bytes[HEADER_LEN..], limits)
}

fn decode_directed(bytes: &[u8], expected: Direction, limits: &DecodeLimits) -> Result<Message, DecodeError> {
    let (version, kind) = header(bytes, limits)?;
    if kind.direction() != expected {
        return Err(DecodeError::WrongDirection { kind, actual: kind.direction(), expected });
    }
    wire::decode_body(kind, version, &bytes[HEADER_LEN..], limits)
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

/// The header of a message that arrived on an uplink topic of kind `topic_kind`: it must be an
/// uplink message, of the topic's kind. Every decoder of a node's messages checks it first.
fn topic_header(bytes: &[u8], topic_kind: UplinkKind, limits: &DecodeLimits) -> Result<(u8, MessageKind), DecodeError> {
    let (version, kind) = header(bytes, limits)?;
    if kind.direction() != Direction::Uplink {
        return Err(DecodeError::WrongDirection { kind, actual: kind.direction(), expected: Direction::Uplink });
    }
    if kind.uplink() != Some(topic_kind) {
        return Err(DecodeError::TopicKindMismatch { topic: topic_kind, payload: kind });
    }
    Ok((version, kind))
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
    let (version, kind) = topic_header(bytes, topic_kind, limits)?;
    let msg = wire::decode_body(kind, version, &bytes[HEADER_LEN..], limits)?;
    if let Message::Register(reg) = &msg
        && reg.name != *node
    {
        return Err(DecodeError::IdentityMismatch { topic: node.clone(), claimed: reg.name.clone() });
    }
    Ok(msg)
}

/// [`decode_from_node`] for a message on a heartbeat topic: the same checks and the same errors,
/// the heartbeat returned as it is. The controller decodes a heartbeat per node per interval, and
/// a [`Message`] built, moved and dropped around each one was a share of that work of its own.
pub fn decode_heartbeat_from_node(bytes: &[u8], limits: &DecodeLimits) -> Result<Heartbeat, DecodeError> {
    topic_header(bytes, UplinkKind::Heartbeat, limits)?;
    wire::decode_heartbeat_body(&bytes[HEADER_LEN..], limits)
}

/// [`decode_from_node`] for a message on `node`'s registration topic, decoded without copying its
/// strings: the same checks, the same errors, a [`RegisterView`] borrowing `bytes` instead of an
/// owned [`Register`](super::Register). The controller's registration path.
pub fn decode_register_view<'a>(
    bytes: &'a [u8],
    node: &NodeName,
    limits: &DecodeLimits,
) -> Result<RegisterView<'a>, DecodeError> {
    decode_register_view_with(bytes, node, limits, &mut |_| false)
}

/// Where the label block of a registration lies in `bytes` (a message on a registration topic),
/// with nothing in it checked: for a caller that looks the set up ahead of decoding, as the
/// controller does for a group of registrations so that their lookups' cache misses overlap. The
/// block is the bytes [`decode_register_view_with`] later hands its `known`. `None` when the
/// message is not a registration or is malformed; its decode says how.
pub(crate) fn register_label_block<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Option<&'a [u8]> {
    match header(bytes, limits) {
        Ok((_, MessageKind::Register)) => wire::register_label_block(&bytes[HEADER_LEN..], limits),
        _ => None,
    }
}

/// [`decode_register_view`], where `known` may vouch for a label set: one it returns true for
/// (called with the set's pairs, keys sorted and unique, within the limits) skips the per-string
/// label rules. The controller's cache vouches for the sets it already holds, which passed those
/// rules when they were first registered; a million nodes carry a few thousand sets. Returning
/// true for a set that breaks the rules lets it through, so only vouch for validated ones.
pub fn decode_register_view_with<'a>(
    bytes: &'a [u8],
    node: &NodeName,
    limits: &DecodeLimits,
    known: wire::KnownLabels<'_>,
) -> Result<RegisterView<'a>, DecodeError> {
    topic_header(bytes, UplinkKind::Register, limits)?;
    let reg = wire::decode_register_view(&bytes[HEADER_LEN..], limits, known)?;
    if reg.name != node.as_str() {
        // Both names are valid here; the error carries them as the owned decoder's does.
        let claimed = NodeName::new(reg.name).map_err(|source| DecodeError::InvalidField {
            kind: MessageKind::Register,
            field: "name",
            source,
        })?;
        return Err(DecodeError::IdentityMismatch { topic: node.clone(), claimed });
    }
    Ok(reg)
}
