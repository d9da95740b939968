//! The wire protocol: the versioned envelope, the messages, and the addressing types.
//!
//! Every payload is a 2-byte envelope (protocol version, message kind) followed by the message's
//! postcard body; `docs/protocol.md` documents every byte. [`encode`] / [`encode_into`] write a
//! [`Message`]; [`decode`] (or the direction-checking [`decode_uplink`], [`decode_downlink`] and
//! [`decode_from_node`]) read one back under [`DecodeLimits`], never panicking on any input.
//! [`Destination`], [`UplinkKind`] and [`GroupName`] say where a message goes; a transport maps
//! them to its own addresses (`kole_mqtt::Topics` renders MQTT topics and the broker ACLs).
//!
//! ```
//! use kole_core::model::DesiredDigest;
//! use kole_core::protocol::{self, DecodeLimits, Heartbeat, Message, NodeHealth};
//!
//! let hb = Heartbeat { seq: 1_234, boot_id: 0x5eed_b007, applied: DesiredDigest(0x0123_4567_89ab_cdef), health: NodeHealth::OK };
//! let bytes = protocol::encode(&Message::Heartbeat(hb));
//! assert!(bytes.len() <= 20);
//! assert_eq!(protocol::decode_uplink(&bytes, &DecodeLimits::default())?, Message::Heartbeat(hb));
//! # Ok::<(), protocol::DecodeError>(())
//! ```

mod address;
mod envelope;
mod error;
mod limits;
mod messages;
pub mod seal;
mod wire;

#[cfg(test)]
pub(crate) mod strategies;
#[cfg(test)]
mod tests;

pub use address::{Destination, GroupName, GroupNameError, UplinkKind};
pub(crate) use envelope::register_label_block;
pub use envelope::{
    EncodedGroups, HEADER_LEN, decode, decode_downlink, decode_from_node, decode_heartbeat_from_node,
    decode_register_view, decode_register_view_with, decode_uplink, encode, encode_accepted_ack, encode_into,
    encode_register, peek_kind,
};
pub use error::DecodeError;
pub use limits::{DecodeLimits, Limit};
pub use messages::{
    Command, CommandKind, DesiredState, Direction, FailureReason, Heartbeat, MAX_REASON_BYTES, Message, MessageKind,
    NodeHealth, PROTOCOL_VERSION, REASONS_VERSION, Register, RegisterAck, RegisterOutcome, RegisterRef, RegisterView,
    RejectCode, StatusReport, WorkloadRemoved, WorkloadSpec,
};
pub use wire::KnownLabels;
