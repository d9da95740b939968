//! Signed downlink: the controller seals what it sends to agents with Ed25519, binding the
//! destination and the issue time; agents that pin the controller's public keys open it.
//!
//! ```text
//! byte 0   1      2..6        6..14              14..78       78..
//! ┌──────┬──────┬───────────┬──────────────────┬────────────┬───────────────────────────────┐
//! │ 3    │ kind │ key id    │ issued at (ms,   │ Ed25519    │ postcard body of that kind    │
//! │      │      │ (u32 BE)  │ u64 BE, Unix)    │ signature  │ (as in a version 1 message)   │
//! └──────┴──────┴───────────┴──────────────────┴────────────┴───────────────────────────────┘
//! ```
//!
//! The signature covers `"kole-downlink-v3\0"`, the destination's label (see
//! [`destination_label`]) and a NUL, the bytes `1..14` (kind, key id, issue time) and the body. So
//! a message signed for one node cannot be replayed to another, nor a group's spec to the fleet,
//! and the issue time cannot be changed. The key id is the first four bytes of the public key
//! (agents look the key up by it; a collision only costs a second verification).
//!
//! What the issue time buys (agent side, `agent::state`): an agent keeps, per workload, the issue
//! time of the newest statement it accepted about that workload (a spec, a desired set that holds
//! or drops it, a removal), and refuses older ones: a replayed old spec or an old desired set can
//! neither roll a node back nor remove a workload. A rollback is a new statement signed now, so it
//! passes. The marks are persisted with the agent's state.
//!
//! A spec is signed once per publish (once per version and wave), however many nodes receive it;
//! per-node messages (acks, desired sets, commands) are signed each. Costs: `docs/benchmarks.md`.

use std::sync::Arc;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use super::address::Destination;
use super::envelope::HEADER_LEN;
use super::error::DecodeError;
use super::limits::DecodeLimits;
use super::messages::{Message, MessageKind};
use super::wire;

/// The envelope version of a signed downlink message.
pub const SIGNED_VERSION: u8 = 3;
/// Bytes before the body of a signed message: version, kind, key id, issue time, signature.
pub const SEALED_HEADER_LEN: usize = HEADER_LEN + 4 + 8 + 64;
/// The domain separation prefix of every signed downlink message.
const DOMAIN: &[u8] = b"kole-downlink-v3\0";

/// Identifies a public key: its first four bytes, big endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub u32);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl KeyId {
    fn of(public: &[u8; 32]) -> Self {
        Self(u32::from_be_bytes([public[0], public[1], public[2], public[3]]))
    }
}

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// The controller's signing key (Ed25519). Its secret never leaves the controller: it is read from
/// a file or a Kubernetes Secret, never sent over MQTT.
#[derive(Clone)]
pub struct DownlinkSigner {
    key: SigningKey,
    id: KeyId,
}

impl std::fmt::Debug for DownlinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownlinkSigner").field("key_id", &self.id).finish_non_exhaustive()
    }
}

/// Two signers are equal when they hold the same key.
impl PartialEq for DownlinkSigner {
    fn eq(&self, other: &Self) -> bool {
        self.key.verifying_key() == other.key.verifying_key()
    }
}

impl Eq for DownlinkSigner {}

impl DownlinkSigner {
    /// The signer of a 32-byte Ed25519 secret key (seed).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let id = KeyId::of(&key.verifying_key().to_bytes());
        Self { key, id }
    }

    /// Reads a secret key file's text: `ed25519-secret:` then 64 hex digits (what
    /// `kole-controller keygen` writes), surrounding whitespace ignored.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let hex = text.trim().strip_prefix("ed25519-secret:").ok_or_else(|| {
            KeyError(
                "a signing key file holds `ed25519-secret:` and 64 hex digits (see `kole-controller keygen`)".into(),
            )
        })?;
        Ok(Self::from_seed(from_hex::<32>(hex).ok_or_else(|| KeyError("the signing key is not 64 hex digits".into()))?))
    }

    /// The secret key as a file's text (`ed25519-secret:` and 64 hex digits).
    pub fn to_text(&self) -> String {
        format!("ed25519-secret:{}\n", to_hex(&self.key.to_bytes()))
    }

    /// The key id agents see in every message signed with this key.
    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// The public key as agents pin it: `ed25519:` and 64 hex digits.
    pub fn public_text(&self) -> String {
        format!("ed25519:{}", to_hex(&self.key.verifying_key().to_bytes()))
    }

    /// Signs `msg` under `domain` (a NUL is appended to it), for records the controller keeps
    /// outside the downlink (e.g. the rollout state it persists in Kubernetes). The domain keeps
    /// such a signature from ever passing as a downlink message's. Hex, 128 digits.
    pub fn sign_detached(&self, domain: &str, msg: &[u8]) -> String {
        to_hex(&self.key.sign(&detached(domain, msg)).to_bytes())
    }

    /// Whether `sig_hex` is this key's [`DownlinkSigner::sign_detached`] signature of `msg`.
    pub fn verify_detached(&self, domain: &str, msg: &[u8], sig_hex: &str) -> bool {
        let Some(bytes) = from_hex::<64>(sig_hex) else { return false };
        self.key.verifying_key().verify_strict(&detached(domain, msg), &Signature::from_bytes(&bytes)).is_ok()
    }

    /// Encodes `msg` for `to`, signed, issued at `issued_at_ms` (Unix milliseconds).
    pub fn seal(&self, msg: &Message, to: &Destination, issued_at_ms: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEALED_HEADER_LEN + 64);
        out.push(SIGNED_VERSION);
        out.push(msg.kind().as_u8());
        out.extend_from_slice(&self.id.0.to_be_bytes());
        out.extend_from_slice(&issued_at_ms.to_be_bytes());
        out.extend_from_slice(&[0; 64]);
        if let Err(e) = wire::encode_body(msg, &mut out) {
            debug_assert!(false, "encoding a {} body failed: {e}", msg.kind());
            out.truncate(HEADER_LEN);
            return out;
        }
        let signed = signed_bytes(to, &out[1..14], &out[SEALED_HEADER_LEN..]);
        let sig = self.key.sign(&signed);
        out[14..SEALED_HEADER_LEN].copy_from_slice(&sig.to_bytes());
        out
    }
}

/// The public keys an agent trusts (two or more while a key is rotated) and the ones it refuses
/// even if listed (revoked).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<(KeyId, [u8; 32])>,
    revoked: Vec<KeyId>,
}

impl TrustedKeys {
    /// No key: nothing verifies.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts a public key (`ed25519:` and 64 hex digits, as `kole-controller keygen` prints).
    pub fn trust_text(&mut self, text: &str) -> Result<KeyId, KeyError> {
        let hex = text.trim().strip_prefix("ed25519:").ok_or_else(|| {
            KeyError(format!("a trusted key is `ed25519:` and 64 hex digits, not {:?}", truncate(text.trim())))
        })?;
        let bytes =
            from_hex::<32>(hex).ok_or_else(|| KeyError("a trusted key is 64 hex digits after `ed25519:`".into()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError("not a valid Ed25519 public key".into()))?;
        let id = KeyId::of(&bytes);
        if !self.keys.iter().any(|(_, k)| *k == bytes) {
            self.keys.push((id, bytes));
        }
        Ok(id)
    }

    /// Refuses every message signed with key `id`, even if the key is trusted.
    pub fn revoke(&mut self, id: KeyId) {
        if !self.revoked.contains(&id) {
            self.revoked.push(id);
        }
    }

    /// Reads a trust file: one entry per line, `ed25519:<hex>` trusts a key, `revoked:<key id hex>`
    /// revokes one; blank lines and `#` comments are skipped. Errors name the line.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let mut t = Self::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(id) = line.strip_prefix("revoked:") {
                let id = u32::from_str_radix(id.trim(), 16)
                    .map_err(|_| KeyError(format!("line {}: `revoked:` takes an 8-digit hex key id", i + 1)))?;
                t.revoke(KeyId(id));
            } else {
                t.trust_text(line).map_err(|e| KeyError(format!("line {}: {e}", i + 1)))?;
            }
        }
        Ok(t)
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted keys' ids (revoked ones included).
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }
}

/// A verified downlink message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The message.
    pub message: Message,
    /// When the controller issued it (Unix milliseconds).
    pub issued_at_ms: u64,
    /// The key that signed it.
    pub key: KeyId,
}

/// The parts of a signed message, its header checked (length, kind, direction).
struct Sealed<'a> {
    kind: MessageKind,
    key: KeyId,
    issued_at_ms: u64,
    signature: Signature,
    /// Bytes 1..14: what the signature covers of the header.
    header: &'a [u8],
    body: &'a [u8],
}

/// Splits a version 3 message; `Unsigned` for any other version.
fn sealed<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Sealed<'a>, DecodeError> {
    let (&version, _) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > limits.max_message_bytes {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: limits.max_message_bytes });
    }
    if version != SIGNED_VERSION {
        return Err(DecodeError::Unsigned { version });
    }
    let &kind = bytes.get(1).ok_or(DecodeError::MissingKind)?;
    let kind = MessageKind::from_u8(kind).ok_or(DecodeError::UnknownKind { kind })?;
    if kind.direction() != super::Direction::Downlink {
        return Err(DecodeError::WrongDirection {
            kind,
            actual: kind.direction(),
            expected: super::Direction::Downlink,
        });
    }
    if bytes.len() < SEALED_HEADER_LEN {
        let reason = format!("{} bytes, shorter than the {SEALED_HEADER_LEN}-byte signed header", bytes.len());
        return Err(DecodeError::Malformed { kind, reason });
    }
    let mut at = [0u8; 8];
    at.copy_from_slice(&bytes[6..14]);
    let mut sig = [0u8; 64];
    sig.copy_from_slice(&bytes[14..SEALED_HEADER_LEN]);
    Ok(Sealed {
        kind,
        key: KeyId(u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]])),
        issued_at_ms: u64::from_be_bytes(at),
        signature: Signature::from_bytes(&sig),
        header: &bytes[1..14],
        body: &bytes[SEALED_HEADER_LEN..],
    })
}

/// Verifies and decodes a signed downlink message that arrived on `from`.
///
/// Refuses (before decoding the body) an unsigned message, a key that is not trusted or is
/// revoked, and a signature that does not verify for this destination; then decodes the body
/// under `limits` like [`super::decode_downlink`].
pub fn open(
    bytes: &[u8],
    from: &Destination,
    trust: &TrustedKeys,
    limits: &DecodeLimits,
) -> Result<Opened, DecodeError> {
    let s = sealed(bytes, limits)?;
    if trust.revoked.contains(&s.key) {
        return Err(DecodeError::RevokedKey { key: s.key.0 });
    }
    let mut candidates = trust.keys.iter().filter(|(k, _)| *k == s.key).peekable();
    if candidates.peek().is_none() {
        return Err(DecodeError::UnknownKey { key: s.key.0 });
    }
    let signed = signed_bytes(from, s.header, s.body);
    let verified = candidates.any(|(_, public)| {
        VerifyingKey::from_bytes(public).is_ok_and(|vk| vk.verify_strict(&signed, &s.signature).is_ok())
    });
    if !verified {
        return Err(DecodeError::BadSignature);
    }
    let message = wire::decode_body(s.kind, super::PROTOCOL_VERSION, s.body, limits)?;
    Ok(Opened { message, issued_at_ms: s.issued_at_ms, key: s.key })
}

/// Decodes a signed downlink message without verifying it: for agents that pin no key (tests,
/// simulations, a fleet that has not turned signing on). Unsigned messages decode as usual.
pub fn decode_unverified(bytes: &[u8], limits: &DecodeLimits) -> Result<(Message, Option<u64>), DecodeError> {
    if bytes.first() != Some(&SIGNED_VERSION) {
        return super::decode_downlink(bytes, limits).map(|m| (m, None));
    }
    let s = sealed(bytes, limits)?;
    let m = wire::decode_body(s.kind, super::PROTOCOL_VERSION, s.body, limits)?;
    Ok((m, Some(s.issued_at_ms)))
}

/// The label a destination is signed under, independent of any transport's topic layout:
/// `node/{name}`, `all`, `group/{group}`, `spec/{workload id}`, `group/{group}/spec/{workload id}`.
pub fn destination_label(to: &Destination) -> String {
    match to {
        Destination::Node(n) => format!("node/{n}"),
        Destination::Fleet => "all".to_owned(),
        Destination::Group(g) => format!("group/{g}"),
        Destination::WorkloadSpec(id) => format!("spec/{id}"),
        Destination::GroupWorkloadSpec(g, id) => format!("group/{g}/spec/{id}"),
    }
}

fn signed_bytes(to: &Destination, header: &[u8], body: &[u8]) -> Vec<u8> {
    let label = destination_label(to);
    let mut m = Vec::with_capacity(DOMAIN.len() + label.len() + 1 + header.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(label.as_bytes());
    m.push(0);
    m.extend_from_slice(header);
    m.extend_from_slice(body);
    m
}

fn detached(domain: &str, msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + msg.len());
    m.extend_from_slice(domain.as_bytes());
    m.push(0);
    m.extend_from_slice(msg);
    m
}

/// `N` bytes from exactly `2 * N` hex digits (surrounding whitespace ignored).
fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn truncate(s: &str) -> String {
    s.chars().take(24).collect()
}

/// A signer shared by the engine's messages.
pub type SharedSigner = Arc<DownlinkSigner>;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{DesiredDigest, NodeName};
    use crate::protocol::{Command, CommandKind, DesiredState, encode};

    fn signer() -> DownlinkSigner {
        DownlinkSigner::from_seed([7; 32])
    }

    fn trust() -> TrustedKeys {
        let mut t = TrustedKeys::new();
        t.trust_text(&signer().public_text()).unwrap();
        t
    }

    fn node(n: &str) -> Destination {
        Destination::Node(NodeName::new(n).unwrap())
    }

    fn resync() -> Message {
        Message::Command(Command { id: 42, kind: CommandKind::Resync })
    }

    /// The test vector of `docs/protocol.md`: seed 32 × 0x07, a `Resync` command (id 42) to node
    /// `edge-1`, issued at 1,790,000,000,000 ms. The signature was checked against a second
    /// implementation (OpenSSL's Ed25519 through Python's `cryptography`).
    #[test]
    fn the_documented_test_vector_holds() {
        let s = signer();
        assert_eq!(s.public_text(), "ed25519:ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c");
        assert_eq!(s.key_id().to_string(), "ea4a6c63");
        let sealed = s.seal(&resync(), &node("edge-1"), 1_790_000_000_000);
        assert_eq!(
            to_hex(&sealed),
            "0385ea4a6c63000001a0c4506c00\
             d73168bdcebfbb83ea2b31dc99ab74d39bc0cbc8d7a80b7ef426ebe45f608f18\
             8f75fc15102de06110a665328a70165621dd9c751fdb469f8bf56e739772b70f\
             2a01"
        );
    }

    #[test]
    fn a_sealed_message_opens_only_for_its_destination_and_key() {
        let s = signer();
        let t = trust();
        let limits = DecodeLimits::default();
        let sealed = s.seal(&resync(), &node("edge-1"), 1_000);
        let opened = open(&sealed, &node("edge-1"), &t, &limits).unwrap();
        assert_eq!((opened.message, opened.issued_at_ms, opened.key), (resync(), 1_000, s.key_id()));
        // Replayed to another node, the fleet or a group: refused.
        for other in [node("edge-2"), Destination::Fleet] {
            assert_eq!(open(&sealed, &other, &t, &limits), Err(DecodeError::BadSignature));
        }
        // Unsigned, another key, a revoked key, a flipped bit anywhere: refused.
        assert_eq!(open(&encode(&resync()), &node("edge-1"), &t, &limits), Err(DecodeError::Unsigned { version: 1 }));
        let other = DownlinkSigner::from_seed([8; 32]).seal(&resync(), &node("edge-1"), 1_000);
        assert!(matches!(open(&other, &node("edge-1"), &t, &limits), Err(DecodeError::UnknownKey { .. })));
        let mut revoked = t.clone();
        revoked.revoke(s.key_id());
        assert!(matches!(open(&sealed, &node("edge-1"), &revoked, &limits), Err(DecodeError::RevokedKey { .. })));
        for i in 1..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(open(&bad, &node("edge-1"), &t, &limits).is_err(), "bit flip at byte {i} accepted");
        }
        // Two trusted keys (a rotation): both verify.
        let mut rotating = t.clone();
        let next = DownlinkSigner::from_seed([9; 32]);
        rotating.trust_text(&next.public_text()).unwrap();
        assert!(open(&next.seal(&resync(), &Destination::Fleet, 5), &Destination::Fleet, &rotating, &limits).is_ok());
        assert!(open(&sealed, &node("edge-1"), &rotating, &limits).is_ok());
    }

    #[test]
    fn detached_signatures_are_domain_separated() {
        let s = signer();
        let sig = s.sign_detached("kole-status-v1", b"record");
        assert!(s.verify_detached("kole-status-v1", b"record", &sig));
        assert!(!s.verify_detached("kole-status-v1", b"recorD", &sig));
        assert!(!s.verify_detached("kole-other", b"record", &sig));
        assert!(!DownlinkSigner::from_seed([8; 32]).verify_detached("kole-status-v1", b"record", &sig));
        assert!(!s.verify_detached("kole-status-v1", b"record", "zz"));
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_say_what_is_wrong() {
        let s = signer();
        assert_eq!(DownlinkSigner::from_text(&s.to_text()).unwrap().public_text(), s.public_text());
        assert!(DownlinkSigner::from_text("0707").unwrap_err().to_string().contains("keygen"));
        let file = format!("# fleet keys\n{}\n\nrevoked:0badc0de\n", s.public_text());
        let t = TrustedKeys::from_text(&file).unwrap();
        assert_eq!(t.key_ids(), [s.key_id()]);
        assert_eq!(t.revoked, [KeyId(0x0bad_c0de)]);
        let err = TrustedKeys::from_text("ed25519:zz\n").unwrap_err().to_string();
        assert!(err.starts_with("line 1:"), "{err}");
    }

    proptest! {
        /// Whatever the bytes: `open` and `decode_unverified` return, never panic, and a forged
        /// message never verifies.
        #[test]
        fn opening_arbitrary_bytes_never_panics_nor_verifies(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let limits = DecodeLimits::default();
            prop_assert!(open(&bytes, &node("edge-1"), &trust(), &limits).is_err());
            let _ = decode_unverified(&bytes, &limits);
        }

        /// Every downlink message seals and opens to itself.
        #[test]
        fn every_downlink_message_round_trips(msg in crate::protocol::strategies::message(), at in any::<u64>()) {
            prop_assume!(msg.kind().direction() == crate::protocol::Direction::Downlink);
            let sealed = signer().seal(&msg, &Destination::Fleet, at);
            let opened = open(&sealed, &Destination::Fleet, &trust(), &DecodeLimits::default()).unwrap();
            prop_assert_eq!(opened.message, msg);
            prop_assert_eq!(opened.issued_at_ms, at);
        }
    }

    #[test]
    fn an_unverified_decode_reads_signed_and_unsigned() {
        let limits = DecodeLimits::default();
        let m = Message::DesiredState(DesiredState { digest: DesiredDigest::EMPTY, workloads: vec![] });
        assert_eq!(decode_unverified(&encode(&m), &limits).unwrap(), (m.clone(), None));
        assert_eq!(decode_unverified(&signer().seal(&m, &node("a"), 9), &limits).unwrap(), (m, Some(9)));
    }
}
