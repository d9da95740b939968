//! The postcard bodies: the exact field order and encoding of every message.
//!
//! Two mirrors of each message live here. The `*Out` views borrow a message and serialize it
//! without allocating; the `*In` forms deserialize borrowing from the input (`&str`, `&[u8]`), so the
//! decoder can check limits and validate every field before it copies anything into the public,
//! owned message types. The round-trip property tests keep the two in agreement; `docs/protocol.md`
//! describes the result byte by byte. Digests (8 bytes) and boot ids (4 bytes) are fixed-width,
//! little-endian (they are random, a varint would only make them longer); counters, versions and
//! lengths are varints.

use std::net::IpAddr;

use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::model::{
    DeliveryMode, DesiredDigest, FailureThreshold, LabelsView, RawPairs, Requirement, RequirementOp, RolloutStrategy,
    Selector, ValidationError, Workload, WorkloadId, WorkloadPhase, WorkloadState, take_len,
};

use super::address::GroupName;
use super::error::DecodeError;
use super::limits::{DecodeLimits, Limit};
use super::messages::{
    Command, CommandKind, DesiredState, FailureReason, Heartbeat, Message, MessageKind, NodeHealth, Register,
    RegisterAck, RegisterOutcome, RegisterRef, RegisterView, RejectCode, StatusReport, WorkloadRemoved, WorkloadSpec,
};

// ---------------------------------------------------------------------------------------------
// Shared pieces

fn fixed8(d: DesiredDigest) -> [u8; 8] {
    d.0.to_le_bytes()
}

fn digest(b: [u8; 8]) -> DesiredDigest {
    DesiredDigest(u64::from_le_bytes(b))
}

/// A byte string: varint length, then the bytes (same bytes as a sequence of `u8`).
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Serializes an iterator of known length as a sequence (varint count, then the items).
struct Seq<I>(I);

impl<I> Serialize for Seq<I>
where
    I: Iterator + ExactSizeIterator + Clone,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone())
    }
}

#[derive(Serialize, Deserialize)]
enum RejectWire {
    IdentityMismatch,
    Invalid,
    NotAllowed,
    Overloaded,
}

#[derive(Serialize, Deserialize)]
enum OutcomeWire<'a> {
    Accepted,
    Rejected { code: RejectWire, message: &'a str, retry_after_ms: u32 },
}

#[derive(Serialize, Deserialize)]
enum DeliveryWire<'a> {
    Broadcast,
    Group(&'a str),
    PerNode,
}

#[derive(Serialize, Deserialize)]
enum CommandKindWire<'a> {
    Reregister,
    Resync,
    RestartWorkload(&'a str),
    Ping,
}

#[derive(Serialize, Deserialize)]
struct CommandWire<'a> {
    id: u64,
    #[serde(borrow)]
    kind: CommandKindWire<'a>,
}

#[derive(Serialize, Deserialize)]
struct StateWire<'a> {
    workload: &'a str,
    version: u64,
    phase: WorkloadPhase,
}

#[derive(Serialize, Deserialize)]
struct HeartbeatWire {
    seq: u32,
    boot_id: [u8; 4],
    applied: [u8; 8],
    health: u8,
}

/// One failure reason: the index of its workload in the report, then the text.
#[derive(Serialize, Deserialize)]
struct ReasonWire<'a> {
    index: u32,
    reason: &'a str,
}

/// A version-2 status report: the version-1 fields, then the reasons.
#[derive(Deserialize)]
struct StatusV2In<'a> {
    #[serde(borrow)]
    status: StatusIn<'a>,
    #[serde(borrow, deserialize_with = "bounded_seq")]
    reasons: Vec<ReasonWire<'a>>,
}

#[derive(Serialize, Deserialize)]
struct RemovedWire<'a> {
    id: &'a str,
}

// ---------------------------------------------------------------------------------------------
// Encoding views

fn reason_out(r: &FailureReason) -> ReasonWire<'_> {
    ReasonWire { index: r.index, reason: &r.reason }
}

fn state_out(s: &WorkloadState) -> StateWire<'_> {
    StateWire { workload: s.workload.as_str(), version: s.version, phase: s.phase }
}

/// A slice serialized through a per-item view.
type SliceSeq<'a, T, V> = Seq<std::iter::Map<std::slice::Iter<'a, T>, fn(&'a T) -> V>>;

fn slice_seq<'a, T, V>(items: &'a [T], view: fn(&'a T) -> V) -> SliceSeq<'a, T, V> {
    Seq(items.iter().map(view))
}

type StatesOut<'a> = SliceSeq<'a, WorkloadState, StateWire<'a>>;

#[derive(Serialize)]
struct InfoOut<'a> {
    arch: &'a str,
    os: &'a str,
    agent_version: &'a str,
    addresses: &'a [IpAddr],
}

/// A registration's fields before its labels. The labels follow as one copy of their wire form
/// ([`Labels::wire`](crate::model::Labels::wire)), then [`RegisterTail`]: postcard writes a struct
/// as its fields one after another, so the three pieces make the same bytes as one struct.
#[derive(Serialize)]
struct RegisterHead<'a> {
    name: &'a str,
    boot_id: [u8; 4],
}

#[derive(Serialize)]
struct RegisterTail<'a> {
    info: InfoOut<'a>,
    applied: [u8; 8],
    workloads: StatesOut<'a>,
}

#[derive(Serialize)]
struct StatusOut<'a> {
    seq: u32,
    boot_id: [u8; 4],
    applied: [u8; 8],
    workloads: StatesOut<'a>,
}

#[derive(Serialize)]
struct AckOut<'a> {
    boot_id: [u8; 4],
    outcome: OutcomeWire<'a>,
    heartbeat_interval_ms: u32,
    groups: &'a [GroupName],
    desired: [u8; 8],
}

#[derive(Serialize)]
struct RequirementOut<'a> {
    key: &'a str,
    op: RequirementOp,
    values: &'a [String],
}

fn requirement_out(r: &Requirement) -> RequirementOut<'_> {
    RequirementOut { key: r.key(), op: r.op(), values: r.values() }
}

#[derive(Serialize)]
struct RolloutOut<'a> {
    waves: Bytes<'a>,
    paused: bool,
    failure_threshold: FailureThreshold,
}

type SelectorOut<'a> = SliceSeq<'a, Requirement, RequirementOut<'a>>;

#[derive(Serialize)]
struct WorkloadOut<'a> {
    id: &'a str,
    version: u64,
    spec: Bytes<'a>,
    selector: SelectorOut<'a>,
    delivery: DeliveryWire<'a>,
    rollout: RolloutOut<'a>,
}

fn workload_out(w: &Workload) -> WorkloadOut<'_> {
    WorkloadOut {
        id: w.id.as_str(),
        version: w.version,
        spec: Bytes(&w.spec),
        selector: slice_seq(w.selector.requirements(), requirement_out),
        delivery: match &w.delivery {
            DeliveryMode::Broadcast => DeliveryWire::Broadcast,
            DeliveryMode::Group(g) => DeliveryWire::Group(g),
            DeliveryMode::PerNode => DeliveryWire::PerNode,
        },
        rollout: RolloutOut {
            waves: Bytes(&w.rollout.waves),
            paused: w.rollout.paused,
            failure_threshold: w.rollout.failure_threshold,
        },
    }
}

#[derive(Serialize)]
struct SpecOut<'a> {
    workload: WorkloadOut<'a>,
    wave_threshold: u16,
}

#[derive(Serialize)]
struct DesiredOut<'a> {
    digest: [u8; 8],
    workloads: SliceSeq<'a, Workload, WorkloadOut<'a>>,
}

/// Appends the postcard body of a registration built from borrowed parts (no owned [`Register`]).
pub(super) fn encode_register_body(r: &RegisterRef<'_>, buf: &mut Vec<u8>) -> Result<(), postcard::Error> {
    append(&RegisterHead { name: r.name.as_str(), boot_id: r.boot_id.to_le_bytes() }, buf)?;
    buf.extend_from_slice(r.labels.wire());
    let tail = RegisterTail {
        info: InfoOut {
            arch: &r.info.arch,
            os: &r.info.os,
            agent_version: &r.info.agent_version,
            addresses: &r.info.addresses,
        },
        applied: fixed8(r.applied),
        workloads: slice_seq(r.workloads, state_out),
    };
    append(&tail, buf)
}

/// Appends the postcard form of `value` to `buf`.
fn append<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> Result<(), postcard::Error> {
    postcard::serialize_with_flavor(value, AppendVec(buf))
}

/// A postcard output that appends to a `Vec`: a byte is a `push` and a string one copy, where
/// `postcard::to_io` makes every byte, varints and tags included, an `io::Write::write_all` call.
struct AppendVec<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendVec<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends the postcard form of a list of groups, as an ack's body holds it.
pub(super) fn encode_groups(groups: &[GroupName], buf: &mut Vec<u8>) -> Result<(), postcard::Error> {
    append(groups, buf)
}

/// Appends the postcard body of an accepted ack whose groups are already encoded
/// ([`encode_groups`]): postcard lays a struct's fields end to end, so the fields before the
/// groups, the groups and the digest after them, appended in turn, are the [`AckOut`] encoding.
pub(super) fn encode_accepted_ack_body(
    boot_id: u32,
    heartbeat_interval_ms: u32,
    groups: &[u8],
    desired: DesiredDigest,
    buf: &mut Vec<u8>,
) -> Result<(), postcard::Error> {
    append(&(boot_id.to_le_bytes(), OutcomeWire::Accepted, heartbeat_interval_ms), buf)?;
    buf.extend_from_slice(groups);
    append(&fixed8(desired), buf)
}

/// Appends the postcard body of `msg` to `buf`.
pub(super) fn encode_body(msg: &Message, buf: &mut Vec<u8>) -> Result<(), postcard::Error> {
    fn put<T: Serialize>(value: &T, buf: &mut Vec<u8>) -> Result<(), postcard::Error> {
        append(value, buf)
    }
    match msg {
        Message::Register(m) => encode_register_body(
            &RegisterRef {
                name: &m.name,
                boot_id: m.boot_id,
                labels: &m.labels,
                info: &m.info,
                applied: m.applied,
                workloads: &m.workloads,
            },
            buf,
        ),
        Message::Heartbeat(m) => put(
            &HeartbeatWire {
                seq: m.seq,
                boot_id: m.boot_id.to_le_bytes(),
                applied: fixed8(m.applied),
                health: m.health.0,
            },
            buf,
        ),
        Message::StatusReport(m) => {
            put(
                &StatusOut {
                    seq: m.seq,
                    boot_id: m.boot_id.to_le_bytes(),
                    applied: fixed8(m.applied),
                    workloads: slice_seq(&m.workloads, state_out),
                },
                buf,
            )?;
            // Version 2 (see `Message::version`): the version-1 fields, then the reasons. A report
            // without reasons is written as version 1, byte for byte what older agents send.
            if m.reasons.is_empty() {
                return Ok(());
            }
            let reasons = slice_seq(&m.reasons, reason_out);
            put(&reasons, buf)
        }
        Message::RegisterAck(m) => put(
            &AckOut {
                boot_id: m.boot_id.to_le_bytes(),
                outcome: match &m.outcome {
                    RegisterOutcome::Accepted => OutcomeWire::Accepted,
                    RegisterOutcome::Rejected { code, message, retry_after_ms } => OutcomeWire::Rejected {
                        code: match code {
                            RejectCode::IdentityMismatch => RejectWire::IdentityMismatch,
                            RejectCode::Invalid => RejectWire::Invalid,
                            RejectCode::NotAllowed => RejectWire::NotAllowed,
                            RejectCode::Overloaded => RejectWire::Overloaded,
                        },
                        message,
                        retry_after_ms: *retry_after_ms,
                    },
                },
                heartbeat_interval_ms: m.heartbeat_interval_ms,
                groups: &m.groups,
                desired: fixed8(m.desired),
            },
            buf,
        ),
        Message::WorkloadSpec(m) => {
            put(&SpecOut { workload: workload_out(&m.workload), wave_threshold: m.wave_threshold }, buf)
        }
        Message::WorkloadRemoved(m) => put(&RemovedWire { id: m.id.as_str() }, buf),
        Message::DesiredState(m) => {
            put(&DesiredOut { digest: fixed8(m.digest), workloads: slice_seq(&m.workloads, workload_out) }, buf)
        }
        Message::Command(m) => put(
            &CommandWire {
                id: m.id,
                kind: match &m.kind {
                    CommandKind::Reregister => CommandKindWire::Reregister,
                    CommandKind::Resync => CommandKindWire::Resync,
                    CommandKind::RestartWorkload(id) => CommandKindWire::RestartWorkload(id.as_str()),
                    CommandKind::Ping => CommandKindWire::Ping,
                },
            },
            buf,
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding forms

/// Most elements a sequence reserves room for before any has been decoded.
const MAX_PREALLOC: usize = 16;

/// Deserializes a sequence without trusting its declared length for the allocation: serde's own
/// `Vec` reserves up to the declared count (which postcard caps only at the remaining input length,
/// i.e. up to `size_of::<T>()` times the input), while this reserves at most [`MAX_PREALLOC`] and
/// then grows with the elements actually decoded, each of which consumed input bytes.
fn bounded_seq<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
    }

    d.deserialize_seq(Bounded(std::marker::PhantomData))
}

#[derive(Deserialize)]
struct InfoIn<'a> {
    arch: &'a str,
    os: &'a str,
    agent_version: &'a str,
    #[serde(deserialize_with = "bounded_seq")]
    addresses: Vec<IpAddr>,
}

/// A registration's fields before its labels, as [`RegisterHead`] writes them.
#[derive(Deserialize)]
struct RegisterHeadIn<'a> {
    name: &'a str,
    boot_id: [u8; 4],
}

/// A registration's fields after its labels, as [`RegisterTail`] writes them.
#[derive(Deserialize)]
struct RegisterTailIn<'a> {
    #[serde(borrow)]
    info: InfoIn<'a>,
    applied: [u8; 8],
    #[serde(borrow, deserialize_with = "bounded_seq")]
    workloads: Vec<StateWire<'a>>,
}

/// A registration split at its label set, which is kept as the block it arrived in
/// ([`Check::take_register`]).
struct RegisterIn<'a> {
    head: RegisterHeadIn<'a>,
    /// The label set's wire form, with its lengths and limits checked but not yet its strings.
    labels: &'a [u8],
    tail: RegisterTailIn<'a>,
}

#[derive(Deserialize)]
struct StatusIn<'a> {
    seq: u32,
    boot_id: [u8; 4],
    applied: [u8; 8],
    #[serde(borrow, deserialize_with = "bounded_seq")]
    workloads: Vec<StateWire<'a>>,
}

#[derive(Deserialize)]
struct AckIn<'a> {
    boot_id: [u8; 4],
    #[serde(borrow)]
    outcome: OutcomeWire<'a>,
    heartbeat_interval_ms: u32,
    #[serde(borrow, deserialize_with = "bounded_seq")]
    groups: Vec<&'a str>,
    desired: [u8; 8],
}

#[derive(Deserialize)]
struct RequirementIn<'a> {
    key: &'a str,
    op: RequirementOp,
    #[serde(borrow, deserialize_with = "bounded_seq")]
    values: Vec<&'a str>,
}

#[derive(Deserialize)]
struct RolloutIn<'a> {
    waves: &'a [u8],
    paused: bool,
    failure_threshold: FailureThreshold,
}

#[derive(Deserialize)]
struct WorkloadIn<'a> {
    id: &'a str,
    version: u64,
    spec: &'a [u8],
    #[serde(borrow, deserialize_with = "bounded_seq")]
    selector: Vec<RequirementIn<'a>>,
    #[serde(borrow)]
    delivery: DeliveryWire<'a>,
    #[serde(borrow)]
    rollout: RolloutIn<'a>,
}

#[derive(Deserialize)]
struct SpecIn<'a> {
    #[serde(borrow)]
    workload: WorkloadIn<'a>,
    wave_threshold: u16,
}

#[derive(Deserialize)]
struct DesiredIn<'a> {
    digest: [u8; 8],
    #[serde(borrow, deserialize_with = "bounded_seq")]
    workloads: Vec<WorkloadIn<'a>>,
}

/// The body of a heartbeat: [`decode_body`]'s heartbeat arm, returned as it is rather than in a
/// [`Message`], for the controller's heartbeat path.
pub(super) fn decode_heartbeat_body(body: &[u8], limits: &DecodeLimits) -> Result<Heartbeat, DecodeError> {
    let cx = Check { kind: MessageKind::Heartbeat, limits };
    let m: HeartbeatWire = cx.parse(body)?;
    Ok(Heartbeat {
        seq: m.seq,
        boot_id: u32::from_le_bytes(m.boot_id),
        applied: digest(m.applied),
        health: NodeHealth(m.health),
    })
}

/// Decodes one body of `kind`, then checks limits and field rules, then builds the owned message.
pub(super) fn decode_body(
    kind: MessageKind,
    version: u8,
    body: &[u8],
    limits: &DecodeLimits,
) -> Result<Message, DecodeError> {
    let cx = Check { kind, limits };
    match kind {
        MessageKind::Register => cx.register(cx.take_register(body)?).map(Message::Register),
        MessageKind::Heartbeat => decode_heartbeat_body(body, limits).map(Message::Heartbeat),
        MessageKind::StatusReport => {
            let (m, reasons) = if version == super::messages::REASONS_VERSION {
                let m: StatusV2In<'_> = cx.parse(body)?;
                (m.status, Some(m.reasons))
            } else {
                (cx.parse::<StatusIn<'_>>(body)?, None)
            };
            let workloads = cx.states(&m.workloads)?;
            let reasons = match reasons {
                Some(r) => cx.reasons(r, &workloads)?,
                None => Vec::new(),
            };
            Ok(Message::StatusReport(StatusReport {
                seq: m.seq,
                boot_id: u32::from_le_bytes(m.boot_id),
                applied: digest(m.applied),
                workloads,
                reasons,
            }))
        }
        MessageKind::RegisterAck => cx.ack(cx.parse(body)?).map(Message::RegisterAck),
        MessageKind::WorkloadSpec => {
            let m: SpecIn<'_> = cx.parse(body)?;
            if m.wave_threshold > WorkloadSpec::ALL_WAVES {
                return Err(cx.invalid("wave_threshold")(ValidationError::Rollout {
                    reason: "wave threshold must be 0 to 10000 (hundredths of a percent)",
                }));
            }
            let workload = cx.workload(&m.workload)?;
            Ok(Message::WorkloadSpec(WorkloadSpec { workload, wave_threshold: m.wave_threshold }))
        }
        MessageKind::WorkloadRemoved => {
            let m: RemovedWire<'_> = cx.parse(body)?;
            Ok(Message::WorkloadRemoved(WorkloadRemoved { id: cx.workload_id("id", m.id)? }))
        }
        MessageKind::DesiredState => {
            let m: DesiredIn<'_> = cx.parse(body)?;
            cx.count(Limit::Workloads, m.workloads.len(), limits.max_workloads)?;
            let workloads = m.workloads.iter().map(|w| cx.workload(w)).collect::<Result<Vec<_>, _>>()?;
            Ok(Message::DesiredState(DesiredState { digest: digest(m.digest), workloads }))
        }
        MessageKind::Command => {
            let m: CommandWire<'_> = cx.parse(body)?;
            let kind = match m.kind {
                CommandKindWire::Reregister => CommandKind::Reregister,
                CommandKindWire::Resync => CommandKind::Resync,
                CommandKindWire::RestartWorkload(id) => {
                    CommandKind::RestartWorkload(cx.workload_id("kind.workload", id)?)
                }
                CommandKindWire::Ping => CommandKind::Ping,
            };
            Ok(Message::Command(Command { id: m.id, kind }))
        }
    }
}

/// Says whether a label set, given as its wire form (the count, then each key and value
/// length-prefixed; within limits, lengths in their shortest form), is byte for byte one the caller
/// already holds validated ([`LabelsView::wire`]), so its strings need not be checked again (see
/// [`decode_register_view_with`](super::decode_register_view_with)).
pub type KnownLabels<'k> = &'k mut dyn FnMut(&[u8]) -> bool;

/// Decodes a registration body borrowing its strings (see [`RegisterView`]).
pub(super) fn decode_register_view<'a>(
    body: &'a [u8],
    limits: &DecodeLimits,
    known: KnownLabels<'_>,
) -> Result<RegisterView<'a>, DecodeError> {
    let cx = Check { kind: MessageKind::Register, limits };
    cx.register_view(cx.take_register(body)?, known)
}

/// The label block of a registration body, found as [`decode_register_view`] finds it (the head
/// parsed, the pairs' lengths walked within `limits`) but with nothing else checked: a hint for a
/// caller that looks the set up ahead of decoding. The decode that follows makes every check and
/// reports what is wrong; here anything wrong is `None`.
pub(super) fn register_label_block<'a>(body: &'a [u8], limits: &DecodeLimits) -> Option<&'a [u8]> {
    let cx = Check { kind: MessageKind::Register, limits };
    cx.split_register(body).ok().map(|(_, labels, _)| labels)
}

/// Limit and rule checks, with the message kind for error context.
struct Check<'l> {
    kind: MessageKind,
    limits: &'l DecodeLimits,
}

impl Check<'_> {
    fn parse<'a, T: Deserialize<'a>>(&self, body: &'a [u8]) -> Result<T, DecodeError> {
        let (value, rest) = postcard::take_from_bytes::<T>(body)
            .map_err(|e| DecodeError::Malformed { kind: self.kind, reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes { kind: self.kind, count: rest.len() });
        }
        Ok(value)
    }

    fn count(&self, limit: Limit, actual: usize, max: usize) -> Result<(), DecodeError> {
        if actual > max {
            return Err(DecodeError::LimitExceeded { kind: self.kind, limit, actual, max });
        }
        Ok(())
    }

    fn invalid(&self, field: &'static str) -> impl Fn(ValidationError) -> DecodeError + '_ {
        move |source| DecodeError::InvalidField { kind: self.kind, field, source }
    }

    fn string(&self, s: &str) -> Result<String, DecodeError> {
        self.count(Limit::StringLen, s.len(), self.limits.max_string_len)?;
        Ok(s.to_owned())
    }

    fn workload_id(&self, field: &'static str, s: &str) -> Result<WorkloadId, DecodeError> {
        self.count(Limit::StringLen, s.len(), self.limits.max_string_len)?;
        WorkloadId::new(s).map_err(self.invalid(field))
    }

    fn group(&self, field: &'static str, s: &str) -> Result<GroupName, DecodeError> {
        self.count(Limit::StringLen, s.len(), self.limits.max_string_len)?;
        GroupName::decoded(s).map_err(|source| DecodeError::InvalidGroup { kind: self.kind, field, source })
    }

    fn states(&self, states: &[StateWire<'_>]) -> Result<Vec<WorkloadState>, DecodeError> {
        self.count(Limit::Workloads, states.len(), self.limits.max_workloads)?;
        states
            .iter()
            .map(|s| {
                Ok(WorkloadState {
                    workload: self.workload_id("workloads[].workload", s.workload)?,
                    version: s.version,
                    phase: s.phase,
                })
            })
            .collect()
    }

    /// Reasons: at most one per workload, in increasing index order, each naming a `Failed` one.
    fn reasons(
        &self,
        reasons: Vec<ReasonWire<'_>>,
        states: &[WorkloadState],
    ) -> Result<Vec<FailureReason>, DecodeError> {
        self.count(Limit::Workloads, reasons.len(), states.len())?;
        if reasons.is_empty() {
            // A report without reasons is written as version 1: one encoding per message.
            return Err(DecodeError::Malformed {
                kind: self.kind,
                reason: "a version-2 status report without reasons".into(),
            });
        }
        let mut last = None;
        reasons
            .iter()
            .map(|r| {
                self.count(Limit::StringLen, r.reason.len(), self.limits.max_string_len)?;
                let failed = states.get(r.index as usize).is_some_and(|s| s.phase == WorkloadPhase::Failed);
                if !failed || last.is_some_and(|l| r.index <= l) {
                    return Err(DecodeError::Malformed {
                        kind: self.kind,
                        reason: format!(
                            "failure reason for workload index {} does not name a failed workload in increasing order",
                            r.index
                        ),
                    });
                }
                last = Some(r.index);
                Ok(FailureReason { index: r.index, reason: r.reason.to_owned() })
            })
            .collect()
    }

    /// Splits a registration at its label set: the fields before it, the set's block, and the
    /// fields after it. The block's shape is checked here (every length present, in its shortest
    /// form, within limits); its strings are checked by [`Self::labels`].
    fn take_register<'a>(&self, body: &'a [u8]) -> Result<RegisterIn<'a>, DecodeError> {
        let (head, labels, rest) = self.split_register(body)?;
        Ok(RegisterIn { head, labels, tail: self.parse(rest)? })
    }

    /// A registration body's head, its label block (the count and the pairs, their lengths checked
    /// against the limits, their bytes not yet), and the bytes after it.
    fn split_register<'a>(&self, body: &'a [u8]) -> Result<(RegisterHeadIn<'a>, &'a [u8], &'a [u8]), DecodeError> {
        let (head, rest) = postcard::take_from_bytes::<RegisterHeadIn<'a>>(body)
            .map_err(|e| DecodeError::Malformed { kind: self.kind, reason: e.to_string() })?;
        let (count, mut pairs) = self.varint(rest)?;
        self.count(Limit::Labels, count, self.limits.max_labels)?;
        for _ in 0..count {
            let (key, after) = self.length_prefixed(pairs)?;
            let (value, after) = self.length_prefixed(after)?;
            self.count(Limit::StringLen, key.len().max(value.len()), self.limits.max_string_len)?;
            pairs = after;
        }
        let (labels, rest) = rest.split_at(rest.len() - pairs.len());
        Ok((head, labels, rest))
    }

    /// A length as postcard writes it (LEB128), refusing any but its shortest form: a label set
    /// has one encoding, so equal sets are equal blocks.
    fn varint<'a>(&self, bytes: &'a [u8]) -> Result<(usize, &'a [u8]), DecodeError> {
        let (n, used) = take_len(bytes)
            .map_err(|e| DecodeError::Malformed { kind: self.kind, reason: format!("label set: {}", e.reason()) })?;
        Ok((n, &bytes[used..]))
    }

    /// A length-prefixed string's bytes, and what follows them.
    fn length_prefixed<'a>(&self, bytes: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), DecodeError> {
        let (len, rest) = self.varint(bytes)?;
        rest.split_at_checked(len).ok_or_else(|| DecodeError::Malformed {
            kind: self.kind,
            reason: format!("label set: a {len}-byte string with {} bytes of input left", rest.len()),
        })
    }

    /// Checks a label set's strings as [`Labels`](crate::model::Labels) would take them: UTF-8,
    /// keys sorted and unique, then each key and value by Kubernetes' rules. A set the caller
    /// already holds validated (`known`) is not checked again: the rules depend on the bytes alone.
    fn labels<'a>(&self, block: &'a [u8], known: KnownLabels<'_>) -> Result<LabelsView<'a>, DecodeError> {
        if !known(block) {
            let mut pairs = RawPairs::of(block);
            let mut last: Option<&str> = None;
            while let Some((k, v)) = pairs.next_raw() {
                let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) else {
                    return Err(DecodeError::Malformed {
                        kind: self.kind,
                        reason: "label set: a key or value is not valid UTF-8".into(),
                    });
                };
                // One encoding per label set: keys strictly increasing, as the encoder writes them.
                if last.is_some_and(|l| l >= k) {
                    return Err(self.invalid("labels")(ValidationError::LabelKey {
                        key: crate::model::truncate_for_error(k),
                        reason: "duplicate or out of order (keys must be sorted and unique)",
                    }));
                }
                last = Some(k);
                crate::model::validate_label_key(k).map_err(self.invalid("labels"))?;
                crate::model::validate_label_value(v).map_err(self.invalid("labels"))?;
            }
        }
        Ok(LabelsView::from_checked_wire(block))
    }

    fn register(&self, m: RegisterIn<'_>) -> Result<Register, DecodeError> {
        // The owned message is the borrowed one copied: one set of checks, so the two decoders
        // cannot disagree.
        self.register_view(m, &mut |_| false)?.to_register().map_err(self.invalid("registration"))
    }

    fn register_view<'a>(&self, m: RegisterIn<'a>, known: KnownLabels<'_>) -> Result<RegisterView<'a>, DecodeError> {
        let RegisterIn { head, labels, tail: t } = m;
        self.count(Limit::Addresses, t.info.addresses.len(), self.limits.max_addresses)?;
        self.count(Limit::StringLen, head.name.len(), self.limits.max_string_len)?;
        crate::model::validate_node_name(head.name).map_err(self.invalid("name"))?;
        let labels = self.labels(labels, known)?;
        for s in [t.info.arch, t.info.os, t.info.agent_version] {
            self.count(Limit::StringLen, s.len(), self.limits.max_string_len)?;
        }
        let workloads = self.states(&t.workloads)?;
        Ok(RegisterView {
            name: head.name,
            boot_id: u32::from_le_bytes(head.boot_id),
            labels,
            arch: t.info.arch,
            os: t.info.os,
            agent_version: t.info.agent_version,
            addresses: t.info.addresses,
            applied: digest(t.applied),
            workloads,
        })
    }

    fn ack(&self, m: AckIn<'_>) -> Result<RegisterAck, DecodeError> {
        self.count(Limit::Groups, m.groups.len(), self.limits.max_groups)?;
        let outcome = match m.outcome {
            OutcomeWire::Accepted => RegisterOutcome::Accepted,
            OutcomeWire::Rejected { code, message, retry_after_ms } => RegisterOutcome::Rejected {
                code: match code {
                    RejectWire::IdentityMismatch => RejectCode::IdentityMismatch,
                    RejectWire::Invalid => RejectCode::Invalid,
                    RejectWire::NotAllowed => RejectCode::NotAllowed,
                    RejectWire::Overloaded => RejectCode::Overloaded,
                },
                message: self.string(message)?,
                retry_after_ms,
            },
        };
        Ok(RegisterAck {
            boot_id: u32::from_le_bytes(m.boot_id),
            outcome,
            heartbeat_interval_ms: m.heartbeat_interval_ms,
            groups: m.groups.iter().map(|g| self.group("groups", g)).collect::<Result<_, _>>()?,
            desired: digest(m.desired),
        })
    }

    fn selector(&self, reqs: &[RequirementIn<'_>]) -> Result<Selector, DecodeError> {
        let terms = reqs.iter().fold(reqs.len(), |n, r| n.saturating_add(r.values.len()));
        self.count(Limit::SelectorTerms, terms, self.limits.max_selector_terms)?;
        let reqs = reqs
            .iter()
            .map(|r| {
                let key = self.string(r.key)?;
                let values = r.values.iter().map(|v| self.string(v)).collect::<Result<Vec<_>, _>>()?;
                Requirement::new(key, r.op, values).map_err(self.invalid("workload.selector"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Selector::from_requirements(reqs))
    }

    fn workload(&self, w: &WorkloadIn<'_>) -> Result<Workload, DecodeError> {
        self.count(Limit::SpecBytes, w.spec.len(), self.limits.max_spec_bytes)?;
        let rollout = RolloutStrategy {
            waves: w.rollout.waves.to_vec(),
            paused: w.rollout.paused,
            failure_threshold: w.rollout.failure_threshold,
            // Not on the wire: only the controller's engine uses it.
            progress_deadline_s: crate::model::DEFAULT_PROGRESS_DEADLINE_S,
        };
        rollout.validate().map_err(self.invalid("workload.rollout"))?;
        Ok(Workload {
            id: self.workload_id("workload.id", w.id)?,
            version: w.version,
            spec: w.spec.to_vec(),
            selector: self.selector(&w.selector)?,
            delivery: match w.delivery {
                DeliveryWire::Broadcast => DeliveryMode::Broadcast,
                DeliveryWire::Group(g) => DeliveryMode::Group(self.group("workload.delivery", g)?.as_str().to_owned()),
                DeliveryWire::PerNode => DeliveryMode::PerNode,
            },
            rollout,
        })
    }
}
