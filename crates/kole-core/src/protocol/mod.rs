//! The wire protocol: envelope, message kinds, topic layout (see `docs/protocol.md`).
