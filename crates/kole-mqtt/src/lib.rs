//! # kole-mqtt
//!
//! The MQTT side of kole: the [`kole_core::transport::MessageTransport`] trait over an MQTT broker,
//! cloud side and node side, the topic layout of `docs/protocol.md`, broker ACL templates, and an
//! embedded broker for the zero-setup default.
//!
//! **Status: skeleton.** The implementation is tracked by the issue "kole-mqtt: the MQTT transport,
//! an embedded broker, and a million nodes over a real broker". Until then the in-memory transport
//! of `kole-core` is the only one. This crate currently exports the topic layout, which the
//! protocol document fixes and both sides will share.

pub use kole_core::protocol::topics;
