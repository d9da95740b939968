//! Codec tests: round trips, hostile input, every error, and the size contract.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::strategies::{heartbeat, message};
use super::*;
use crate::model::{
    DeliveryMode, DesiredDigest, Labels, NodeInfo, NodeName, RolloutStrategy, Selector, ValidationError, Workload,
    WorkloadId, WorkloadPhase, WorkloadState,
};

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn realistic_heartbeat() -> Heartbeat {
    Heartbeat {
        seq: 1_234,
        boot_id: 0x5eed_b007,
        applied: DesiredDigest(0x0123_4567_89ab_cdef),
        health: NodeHealth::OK,
    }
}

fn realistic_register() -> Register {
    Register {
        name: NodeName::new("cn-hangzhou-s0042-7k2m9q4x").unwrap(),
        boot_id: 0x9b1c_44d2,
        labels: Labels::from_pairs([
            ("topology.kubernetes.io/region", "cn-hangzhou"),
            ("topology.kubernetes.io/zone", "cn-hangzhou-s0042"),
            ("tier", "cdn"),
            ("hw", "x86-gen3"),
        ])
        .unwrap(),
        info: NodeInfo {
            arch: "arm64".into(),
            os: "linux-6.1".into(),
            agent_version: "1.4.2".into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 42, 17, 3))],
        },
        applied: DesiredDigest(0x8f3e_5a1c_72d4_9b60),
        workloads: vec![
            WorkloadState {
                workload: WorkloadId::new("default/cdn-cache").unwrap(),
                version: 12,
                phase: WorkloadPhase::Running,
            },
            WorkloadState {
                workload: WorkloadId::new("kube-system/log-shipper").unwrap(),
                version: 3,
                phase: WorkloadPhase::Running,
            },
        ],
    }
}

fn sample_workload() -> Workload {
    Workload {
        id: WorkloadId::new("default/cdn-cache").unwrap(),
        version: 12,
        spec: b"image: registry.example/cdn-cache:1.9".to_vec(),
        selector: Selector::parse("tier in (cdn, retail)").unwrap(),
        delivery: DeliveryMode::Broadcast,
        rollout: RolloutStrategy { waves: vec![1, 10, 50, 100], ..Default::default() },
    }
}

/// Replaces the first occurrence of `from` by `to` (same length) in an encoding.
fn patch(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes.windows(from.len()).position(|w| w == from).expect("pattern present");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to);
    out
}

#[test]
fn heartbeat_bytes_are_pinned() {
    // The worked example of docs/protocol.md; changing it breaks every deployed agent.
    let bytes = encode(&Message::Heartbeat(realistic_heartbeat()));
    let expected = [
        0x01, 0x02, // version 1, kind heartbeat
        0xd2, 0x09, // seq 1234 (varint)
        0x07, 0xb0, 0xed, 0x5e, // boot id, fixed LE
        0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01, // applied digest, fixed LE
        0x00, // health
    ];
    assert_eq!(bytes, expected);
}

#[test]
fn heartbeat_size_contract() {
    // Realistic: a year of 10 s heartbeats is 3.2M, a 3-byte varint; worst case u32::MAX is 5 bytes.
    for seq in [0, 1_234, 3_200_000, u32::MAX] {
        let hb = Heartbeat { seq, boot_id: u32::MAX, applied: DesiredDigest(u64::MAX), health: NodeHealth(0xff) };
        let len = encode(&Message::Heartbeat(hb)).len();
        assert!(len <= 32, "heartbeat with seq {seq} encodes to {len} bytes");
        assert!(len <= 20, "heartbeat with seq {seq} encodes to {len} bytes");
    }
}

#[test]
fn register_size_is_small() {
    let bytes = encode(&Message::Register(realistic_register()));
    eprintln!("typical register: {} bytes", bytes.len());
    assert!(bytes.len() <= 256, "typical register encodes to {} bytes", bytes.len());
    let ack = RegisterAck {
        boot_id: 0x9b1c_44d2,
        outcome: RegisterOutcome::Accepted,
        heartbeat_interval_ms: 10_000,
        groups: vec![GroupName::new("cn-hangzhou-s0042").unwrap()],
        desired: DesiredDigest(0x8f3e_5a1c_72d4_9b60),
    };
    let ack_len = encode(&Message::RegisterAck(ack)).len();
    eprintln!("typical register ack: {ack_len} bytes");
    let spec_len =
        encode(&Message::WorkloadSpec(WorkloadSpec { workload: sample_workload(), wave_threshold: 100 })).len();
    eprintln!("typical workload spec: {spec_len} bytes");
}

#[test]
fn encode_into_reuses_the_buffer() {
    let mut buf = Vec::with_capacity(64);
    let ptr = buf.as_ptr();
    for seq in 0..100 {
        encode_into(&Message::Heartbeat(Heartbeat { seq, ..realistic_heartbeat() }), &mut buf);
        assert_eq!(decode(&buf, &limits()).unwrap(), Message::Heartbeat(Heartbeat { seq, ..realistic_heartbeat() }));
    }
    assert_eq!(buf.as_ptr(), ptr, "no reallocation");
    assert_eq!(buf.capacity(), 64);
}

#[test]
fn header_errors() {
    let l = limits();
    assert_eq!(decode(&[], &l), Err(DecodeError::Empty));
    assert_eq!(decode(&[1], &l), Err(DecodeError::MissingKind));
    for v in [0u8, 2, 0x7f, 0xff] {
        assert_eq!(
            decode(&[v, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &l),
            Err(DecodeError::UnsupportedVersion { version: v })
        );
    }
    for k in [0u8, 0x04, 0x7f, 0x80, 0x86, 0xff] {
        assert_eq!(decode(&[1, k, 0, 0], &l), Err(DecodeError::UnknownKind { kind: k }));
    }
    // Oversize is refused before the version is even looked at.
    let big = vec![0u8; l.max_message_bytes + 1];
    assert_eq!(decode(&big, &l), Err(DecodeError::TooLarge { len: l.max_message_bytes + 1, max: l.max_message_bytes }));
    let mut at_limit = encode(&Message::Heartbeat(realistic_heartbeat()));
    let small = DecodeLimits { max_message_bytes: at_limit.len(), ..limits() };
    assert!(decode(&at_limit, &small).is_ok());
    at_limit.push(0);
    assert!(matches!(decode(&at_limit, &small), Err(DecodeError::TooLarge { .. })));
    // Bare header: a body is missing.
    assert!(matches!(decode(&[1, 0x02], &l), Err(DecodeError::Malformed { kind: MessageKind::Heartbeat, .. })));
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = encode(&Message::Heartbeat(realistic_heartbeat()));
    bytes.extend_from_slice(&[0, 0, 0]);
    assert_eq!(decode(&bytes, &limits()), Err(DecodeError::TrailingBytes { kind: MessageKind::Heartbeat, count: 3 }));
}

#[test]
fn directions_are_enforced() {
    let l = limits();
    let hb = encode(&Message::Heartbeat(realistic_heartbeat()));
    let cmd = encode(&Message::Command(Command { id: 1, kind: CommandKind::Ping }));
    assert!(decode_uplink(&hb, &l).is_ok());
    assert!(decode_downlink(&cmd, &l).is_ok());
    assert_eq!(
        decode_uplink(&cmd, &l),
        Err(DecodeError::WrongDirection {
            kind: MessageKind::Command,
            actual: Direction::Downlink,
            expected: Direction::Uplink
        })
    );
    assert!(matches!(decode_downlink(&hb, &l), Err(DecodeError::WrongDirection { .. })));
}

#[test]
fn identity_and_topic_kind_rules() {
    let l = limits();
    let reg = realistic_register();
    let me = reg.name.clone();
    let other = NodeName::new("cn-hangzhou-s0042-00000000").unwrap();
    let bytes = encode(&Message::Register(reg.clone()));
    assert_eq!(decode_from_node(&bytes, &me, UplinkKind::Register, &l), Ok(Message::Register(reg)));
    assert_eq!(
        decode_from_node(&bytes, &other, UplinkKind::Register, &l),
        Err(DecodeError::IdentityMismatch { topic: other.clone(), claimed: me.clone() })
    );
    assert_eq!(
        decode_from_node(&bytes, &me, UplinkKind::Heartbeat, &l),
        Err(DecodeError::TopicKindMismatch { topic: UplinkKind::Heartbeat, payload: MessageKind::Register })
    );
    let cmd = encode(&Message::Command(Command { id: 1, kind: CommandKind::Ping }));
    assert!(matches!(decode_from_node(&cmd, &me, UplinkKind::Status, &l), Err(DecodeError::WrongDirection { .. })));
}

#[test]
fn invalid_fields_are_reported_with_their_rule() {
    let l = limits();
    let bytes = encode(&Message::Register(realistic_register()));
    // A name with a topic separator.
    let bad = patch(&bytes, b"cn-hangzhou-s0042-7k2m9q4x", b"cn-hangzhou/s0042-7k2m9q4x");
    let err = decode(&bad, &l).unwrap_err();
    assert!(
        matches!(
            &err,
            DecodeError::InvalidField {
                kind: MessageKind::Register,
                field: "name",
                source: ValidationError::NodeName { .. }
            }
        ),
        "{err:?}"
    );
    assert!(std::error::Error::source(&err).is_some());
    // Labels out of order, and duplicated: one encoding per label set.
    let two = Register { labels: Labels::from_pairs([("aa", "x"), ("bb", "y")]).unwrap(), ..realistic_register() };
    let bytes = encode(&Message::Register(two));
    for (from, to) in [(b"aa", b"cc"), (b"bb", b"aa")] {
        let err = decode(&patch(&bytes, from, to), &l).unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidField { field: "labels", source: ValidationError::LabelKey { .. }, .. }),
            "{err:?}"
        );
    }
    // A label value breaking Kubernetes' rules.
    let err = decode(&patch(&bytes, b"\x01x", b"\x01-"), &l).unwrap_err();
    assert!(
        matches!(&err, DecodeError::InvalidField { field: "labels", source: ValidationError::LabelValue { .. }, .. }),
        "{err:?}"
    );
    // A label set has one encoding: a length in a longer form than it needs (0x82 0x00 is 2) is
    // refused before any caller is asked to vouch for the block.
    let node = realistic_register().name;
    let at = bytes.windows(3).position(|w| w == b"\x02aa").unwrap();
    let long = [&bytes[..at], &[0x82, 0x00], &bytes[at + 1..]].concat();
    let err = decode(&long, &l).unwrap_err();
    assert!(matches!(&err, DecodeError::Malformed { reason, .. } if reason.contains("shortest form")), "{err:?}");
    let mut asked = false;
    let vouched = decode_register_view_with(&long, &node, &l, &mut |_| {
        asked = true;
        true
    });
    assert_eq!(vouched.unwrap_err(), err);
    assert!(!asked);
    // A label string that is not UTF-8.
    let err = decode(&patch(&bytes, b"\x02aa", b"\x02a\xff"), &l).unwrap_err();
    assert!(matches!(&err, DecodeError::Malformed { reason, .. } if reason.contains("UTF-8")), "{err:?}");
    // Limits hold for a set the caller vouches for.
    let few = DecodeLimits { max_labels: 1, ..l.clone() };
    let err = decode_register_view_with(&bytes, &node, &few, &mut |_| true).unwrap_err();
    assert!(matches!(err, DecodeError::LimitExceeded { limit: Limit::Labels, .. }), "{err:?}");
    // A workload id with a wildcard.
    let bytes = encode(&Message::WorkloadRemoved(WorkloadRemoved { id: WorkloadId::new("default/app").unwrap() }));
    let err = decode(&patch(&bytes, b"app", b"a#p"), &l).unwrap_err();
    assert!(
        matches!(&err, DecodeError::InvalidField { field: "id", source: ValidationError::WorkloadId { .. }, .. }),
        "{err:?}"
    );
    // A group name with a wildcard.
    let ack = RegisterAck {
        boot_id: 1,
        outcome: RegisterOutcome::Accepted,
        heartbeat_interval_ms: 10_000,
        groups: vec![GroupName::new("site-1").unwrap()],
        desired: DesiredDigest(1),
    };
    let bytes = encode(&Message::RegisterAck(ack));
    let err = decode(&patch(&bytes, b"site-1", b"site-+"), &l).unwrap_err();
    assert!(matches!(&err, DecodeError::InvalidGroup { field: "groups", .. }), "{err:?}");
    // A rollout whose waves do not end at 100, and a wave threshold above 100%.
    let spec = WorkloadSpec { workload: sample_workload(), wave_threshold: 10_000 };
    let bytes = encode(&Message::WorkloadSpec(spec));
    let err = decode(&patch(&bytes, &[4, 1, 10, 50, 100], &[4, 1, 10, 50, 99]), &l).unwrap_err();
    assert!(matches!(&err, DecodeError::InvalidField { field: "workload.rollout", .. }), "{err:?}");
    let n = bytes.len();
    let mut over = bytes[..n - 2].to_vec(); // 10_000 is the 2-byte varint 0x90 0x4e
    assert_eq!(&bytes[n - 2..], &[0x90, 0x4e]);
    over.extend_from_slice(&[0x91, 0x4e]);
    let err = decode(&over, &l).unwrap_err();
    assert!(matches!(&err, DecodeError::InvalidField { field: "wave_threshold", .. }), "{err:?}");
    // A selector requirement that breaks the rules: `in` with a value that is not a label value.
    let err = decode(&patch(&bytes, b"retail", b"ret/il"), &l).unwrap_err();
    assert!(matches!(&err, DecodeError::InvalidField { field: "workload.selector", .. }), "{err:?}");
}

#[test]
fn every_limit_is_enforced() {
    let reg = realistic_register();
    let bytes = encode(&Message::Register(reg.clone()));
    let check = |limits: DecodeLimits, bytes: &[u8], want: Limit| {
        let err = decode(bytes, &limits).unwrap_err();
        assert!(matches!(err, DecodeError::LimitExceeded { limit, .. } if limit == want), "{want}: {err:?}");
    };
    check(DecodeLimits { max_labels: 3, ..limits() }, &bytes, Limit::Labels);
    check(DecodeLimits { max_workloads: 1, ..limits() }, &bytes, Limit::Workloads);
    check(DecodeLimits { max_string_len: 20, ..limits() }, &bytes, Limit::StringLen);
    check(DecodeLimits { max_addresses: 0, ..limits() }, &bytes, Limit::Addresses);
    let status = encode(&Message::StatusReport(StatusReport {
        seq: 1,
        boot_id: 1,
        applied: reg.applied,
        workloads: reg.workloads,
        reasons: vec![],
    }));
    check(DecodeLimits { max_workloads: 1, ..limits() }, &status, Limit::Workloads);
    let ack = RegisterAck {
        boot_id: 1,
        outcome: RegisterOutcome::Accepted,
        heartbeat_interval_ms: 10_000,
        groups: vec![GroupName::new("a").unwrap(), GroupName::new("b").unwrap()],
        desired: DesiredDigest(1),
    };
    check(DecodeLimits { max_groups: 1, ..limits() }, &encode(&Message::RegisterAck(ack)), Limit::Groups);
    let spec = encode(&Message::WorkloadSpec(WorkloadSpec { workload: sample_workload(), wave_threshold: 0 }));
    check(DecodeLimits { max_spec_bytes: 8, ..limits() }, &spec, Limit::SpecBytes);
    // `tier in (cdn, retail)`: one requirement and two values.
    check(DecodeLimits { max_selector_terms: 2, ..limits() }, &spec, Limit::SelectorTerms);
    assert!(decode(&spec, &DecodeLimits { max_selector_terms: 3, ..limits() }).is_ok());
    let desired = encode(&Message::DesiredState(DesiredState {
        digest: DesiredDigest(1),
        workloads: vec![sample_workload(), sample_workload()],
    }));
    check(DecodeLimits { max_workloads: 1, ..limits() }, &desired, Limit::Workloads);
}

#[test]
fn status_reports_with_reasons_are_version_2() {
    let w = WorkloadId::new("default/app").unwrap();
    let states = vec![
        WorkloadState { workload: w.clone(), version: 2, phase: WorkloadPhase::Running },
        WorkloadState { workload: w.clone(), version: 3, phase: WorkloadPhase::Failed },
    ];
    let plain = StatusReport { seq: 5, boot_id: 1, applied: DesiredDigest(7), workloads: states, reasons: vec![] };
    let plain_bytes = encode(&Message::StatusReport(plain.clone()));
    assert_eq!(plain_bytes[0], 1, "no reasons: a version-1 report, readable by every controller");
    let mut with = plain.clone();
    with.reasons = vec![FailureReason::new(1, "exec /x: No such file")];
    let with_bytes = encode(&Message::StatusReport(with.clone()));
    // Version 2: the same fields, then the reasons: count 1, index 1, length 21, the text.
    assert_eq!(with_bytes[0], REASONS_VERSION);
    assert_eq!(&with_bytes[1..plain_bytes.len()], &plain_bytes[1..]);
    let mut tail = vec![1, 1, 21];
    tail.extend_from_slice(b"exec /x: No such file");
    assert_eq!(&with_bytes[plain_bytes.len()..], &tail[..]);
    assert_eq!(decode(&with_bytes, &limits()).unwrap(), Message::StatusReport(with));
    assert_eq!(decode(&plain_bytes, &limits()).unwrap(), Message::StatusReport(plain));
    let v2 = |tail: &[u8]| {
        let mut b = plain_bytes.clone();
        b[0] = REASONS_VERSION;
        b.extend_from_slice(tail);
        b
    };
    // A reason for a workload that is not failed, out of range, twice, or none at all: refused.
    for bad in [&[1u8, 0, 1, b'x'][..], &[1, 2, 1, b'x'], &[2, 1, 1, b'x', 1, 1, b'y'], &[0]] {
        assert!(decode(&v2(bad), &limits()).is_err(), "{bad:?}");
    }
    // Version 2 of another kind does not exist.
    let mut hb = encode(&Message::Heartbeat(realistic_heartbeat()));
    hb[0] = REASONS_VERSION;
    assert_eq!(decode(&hb, &limits()), Err(DecodeError::UnsupportedVersion { version: 2 }));
    // Too long a reason: the string limit.
    let mut long = vec![1, 1, 30];
    long.extend_from_slice(&[b'x'; 30]);
    let err = decode(&v2(&long), &DecodeLimits { max_string_len: 20, ..limits() }).unwrap_err();
    assert!(matches!(err, DecodeError::LimitExceeded { limit: Limit::StringLen, .. }), "{err:?}");
}

#[test]
fn huge_declared_lengths_fail_fast() {
    let l = limits();
    // Register: name length varint claims 2^63 bytes.
    let mut bytes = vec![1, MessageKind::Register.as_u8()];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(decode(&bytes, &l), Err(DecodeError::Malformed { .. })));
    // DesiredState: the workload count claims 2^35 workloads in a 12-byte body.
    let mut bytes = vec![1, MessageKind::DesiredState.as_u8(), 0, 0, 0, 0, 0, 0, 0, 0];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(decode(&bytes, &l), Err(DecodeError::Malformed { .. })));
}

#[test]
fn error_reasons_are_distinct_labels() {
    let errs = [
        DecodeError::Empty,
        DecodeError::MissingKind,
        DecodeError::UnsupportedVersion { version: 2 },
        DecodeError::UnknownKind { kind: 9 },
        DecodeError::TooLarge { len: 2, max: 1 },
        DecodeError::TrailingBytes { kind: MessageKind::Heartbeat, count: 1 },
    ];
    let mut reasons: Vec<_> = errs.iter().map(DecodeError::reason).collect();
    reasons.dedup();
    assert_eq!(reasons.len(), errs.len());
    assert_eq!(
        DecodeError::UnsupportedVersion { version: 3 }.to_string(),
        "unsupported protocol version 3 (this build speaks versions 1 to 2); upgrade the older side"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// An accepted ack built from groups encoded beforehand is byte for byte the ack `encode`
    /// makes, and decodes to it.
    #[test]
    fn accepted_ack_from_encoded_groups_equals_the_encoded_ack(
        boot_id in any::<u32>(),
        interval in any::<u32>(),
        groups in proptest::collection::vec(super::strategies::group_name(), 0..6),
        desired in any::<u64>(),
    ) {
        let ack = Message::RegisterAck(RegisterAck {
            boot_id,
            outcome: RegisterOutcome::Accepted,
            heartbeat_interval_ms: interval,
            groups: groups.clone(),
            desired: DesiredDigest(desired),
        });
        let bytes = encode_accepted_ack(boot_id, interval, &EncodedGroups::new(&groups), DesiredDigest(desired));
        prop_assert_eq!(&bytes, &encode(&ack));
        prop_assert_eq!(decode(&bytes, &limits()).unwrap(), ack);
    }

    #[test]
    fn every_message_round_trips(msg in message()) {
        let l = limits();
        let bytes = encode(&msg);
        prop_assert_eq!(bytes[0], msg.version());
        prop_assert_eq!(bytes[1], msg.kind().as_u8());
        prop_assert_eq!(peek_kind(&bytes, &l), Ok(msg.kind()));
        prop_assert_eq!(&decode(&bytes, &l).unwrap(), &msg);
        let directed = match msg.direction() {
            Direction::Uplink => (decode_uplink(&bytes, &l), decode_downlink(&bytes, &l)),
            Direction::Downlink => (decode_downlink(&bytes, &l), decode_uplink(&bytes, &l)),
        };
        prop_assert_eq!(directed.0.as_ref(), Ok(&msg));
        let wrong_direction = matches!(directed.1, Err(DecodeError::WrongDirection { .. }));
        prop_assert!(wrong_direction);
        // Canonical: re-encoding the decoded message gives the same bytes.
        prop_assert_eq!(encode(&decode(&bytes, &l).unwrap()), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes, &limits());
        // The registration label-block hint reads the same bytes; what it returns lies in them.
        if let Some(b) = crate::protocol::register_label_block(&bytes, &limits()) {
            let within = bytes.as_ptr_range();
            prop_assert!(within.start <= b.as_ptr() && b.as_ptr_range().end <= within.end);
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(kind in prop::sample::select(MessageKind::ALL.to_vec()),
                                    body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = vec![PROTOCOL_VERSION, kind.as_u8()];
        bytes.extend_from_slice(&body);
        if let Ok(msg) = decode(&bytes, &limits()) {
            prop_assert_eq!(msg.kind(), kind);
        }
    }

    #[test]
    fn truncations_are_rejected(msg in message()) {
        let bytes = encode(&msg);
        for len in 0..bytes.len() {
            prop_assert!(decode(&bytes[..len], &limits()).is_err(), "prefix of {} bytes decoded", len);
        }
    }

    #[test]
    fn appended_bytes_are_rejected(msg in message(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        let mut bytes = encode(&msg);
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode(&bytes, &limits()), Err(DecodeError::TrailingBytes { kind: msg.kind(), count: extra.len() }));
    }

    #[test]
    fn bit_flips_never_panic(msg in message(), flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4)) {
        let mut bytes = encode(&msg);
        for (at, bit) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        if let Ok(decoded) = decode(&bytes, &limits()) {
            // Whatever decodes is a valid message that survives its own round trip.
            prop_assert_eq!(decode(&encode(&decoded), &limits()).unwrap(), decoded);
        }
    }

    #[test]
    fn the_borrowed_registration_decoder_agrees_with_the_owned_one(
        msg in message(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..3),
        other_topic in any::<bool>(),
    ) {
        // Valid registrations (on their own topic or another node's), other kinds, and bit-flipped
        // bytes of either: the same verdict, the same error, the same content.
        let mut bytes = encode(&msg);
        for (at, bit) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        let node = match &msg {
            Message::Register(r) if !other_topic => r.name.clone(),
            _ => NodeName::new("edge-0001").unwrap(),
        };
        let owned = decode_from_node(&bytes, &node, UplinkKind::Register, &limits());
        let view = decode_register_view(&bytes, &node, &limits());
        // A caller vouching for exactly the blocks of valid sets (as the controller's cache does for
        // those it holds) changes nothing either.
        // The label block found ahead of decoding (the controller's warm pass) is the very slice
        // the decoder hands `known`, whenever it hands one.
        let hint = crate::protocol::register_label_block(&bytes, &limits());
        let mut handed: Option<*const [u8]> = None;
        let vouched = decode_register_view_with(&bytes, &node, &limits(), &mut |w| {
            handed = Some(std::ptr::from_ref(w));
            postcard::from_bytes::<Labels>(w).is_ok_and(|l| l.wire() == w)
        });
        prop_assert_eq!(&vouched, &view);
        if let Some(w) = handed {
            prop_assert!(hint.is_some_and(|h| std::ptr::eq(h, w)), "hint {:?} is not the block decoded", hint);
        }
        if let Ok(v) = &view {
            prop_assert!(hint.is_some_and(|h| std::ptr::eq(h, v.labels.wire())));
        }
        match (owned, view) {
            (Ok(Message::Register(r)), Ok(v)) => prop_assert_eq!(v.to_register().unwrap(), r),
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "owned {:?}, borrowed {:?}", a, b),
        }
    }

    #[test]
    fn the_heartbeat_decoder_agrees_with_the_general_one(
        msg in prop_oneof![heartbeat().prop_map(Message::Heartbeat), message()],
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..3),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        // Heartbeats, other kinds, bit-flipped and truncated bytes of either, on a heartbeat
        // topic: the same verdict, the same error, the same heartbeat.
        let mut bytes = encode(&msg);
        for (at, bit) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let node = NodeName::new("edge-0001").unwrap();
        let general = decode_from_node(&bytes, &node, UplinkKind::Heartbeat, &limits());
        let direct = decode_heartbeat_from_node(&bytes, &limits());
        match (general, direct) {
            (Ok(Message::Heartbeat(a)), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "general {:?}, direct {:?}", a, b),
        }
    }

    #[test]
    fn heartbeats_fit_the_size_contract(hb in heartbeat()) {
        prop_assert!(encode(&Message::Heartbeat(hb)).len() <= 20);
    }
}

#[test]
fn register_by_reference_encodes_like_the_owned_message() {
    use crate::model::{DesiredDigest, Labels, NodeInfo, NodeName, WorkloadId, WorkloadPhase, WorkloadState};
    let name = NodeName::new("cn-hangzhou-s00042-7k2m9q4x").unwrap();
    let labels = Labels::from_pairs([("tier", "cdn"), ("topology.kubernetes.io/region", "cn-hangzhou")]).unwrap();
    let info = NodeInfo {
        arch: "arm64".into(),
        os: "linux-6.1".into(),
        agent_version: "1.5.1".into(),
        addresses: vec!["10.1.2.3".parse().unwrap()],
    };
    let workloads = vec![WorkloadState {
        workload: WorkloadId::new("edge-system/cdn-cache").unwrap(),
        version: 42,
        phase: WorkloadPhase::Running,
    }];
    let applied = DesiredDigest(0xfeed_beef);
    let owned = crate::protocol::encode(&Message::Register(crate::protocol::Register {
        name: name.clone(),
        boot_id: 7,
        labels: labels.clone(),
        info: info.clone(),
        applied,
        workloads: workloads.clone(),
    }));
    let by_ref = crate::protocol::encode_register(&crate::protocol::RegisterRef {
        name: &name,
        boot_id: 7,
        labels: &labels,
        info: &info,
        applied,
        workloads: &workloads,
    });
    assert_eq!(owned, by_ref);
}
