//! proptest strategies for valid-by-construction protocol values (test builds only).

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::model::{
    DeliveryMode, DesiredDigest, FailureThreshold, Labels, NodeInfo, NodeName, Requirement, RequirementOp,
    RolloutStrategy, Selector, Workload, WorkloadId, WorkloadPhase, WorkloadState,
};

use super::address::GroupName;
use super::messages::{
    Command, CommandKind, DesiredState, Heartbeat, Message, NodeHealth, Register, RegisterAck, RegisterOutcome,
    RejectCode, StatusReport, WorkloadRemoved, WorkloadSpec,
};

const NAME: &str = "[A-Za-z0-9]([A-Za-z0-9._-]{0,40}[A-Za-z0-9])?";
const SEGMENT: &str = "[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?";

pub(crate) fn node_name() -> impl Strategy<Value = NodeName> {
    prop_oneof![
        9 => NAME.prop_map(|s| NodeName::new(s).unwrap()),
        1 => "[a-z0-9]{128}".prop_map(|s| NodeName::new(s).unwrap()),
    ]
}

pub(crate) fn group_name() -> impl Strategy<Value = GroupName> {
    NAME.prop_map(|s| GroupName::new(s).unwrap())
}

pub(crate) fn workload_id() -> impl Strategy<Value = WorkloadId> {
    (SEGMENT, proptest::option::of(SEGMENT)).prop_map(|(a, b)| match b {
        Some(b) => WorkloadId::new(format!("{a}/{b}")).unwrap(),
        None => WorkloadId::new(a).unwrap(),
    })
}

fn label_key() -> impl Strategy<Value = String> {
    let name = "[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?";
    (proptest::option::of("[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,2}"), name)
        .prop_map(|(prefix, name)| match prefix {
            Some(p) => format!("{p}/{name}"),
            None => name,
        })
}

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![1 => Just(String::new()), 4 => "[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?"]
}

pub(crate) fn labels() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(label_key(), label_value(), 0..8)
        .prop_map(|m: BTreeMap<String, String>| Labels::try_from(m).unwrap())
}

fn digest() -> impl Strategy<Value = DesiredDigest> {
    any::<u64>().prop_map(DesiredDigest)
}

fn phase() -> impl Strategy<Value = WorkloadPhase> {
    prop::sample::select(WorkloadPhase::ALL.to_vec())
}

fn workload_state() -> impl Strategy<Value = WorkloadState> {
    (workload_id(), any::<u64>(), phase()).prop_map(|(workload, version, phase)| WorkloadState {
        workload,
        version,
        phase,
    })
}

fn node_info() -> impl Strategy<Value = NodeInfo> {
    (".{0,16}", ".{0,16}", ".{0,16}", proptest::collection::vec(any::<std::net::IpAddr>(), 0..4))
        .prop_map(|(arch, os, agent_version, addresses)| NodeInfo { arch, os, agent_version, addresses })
}

fn selector() -> impl Strategy<Value = Selector> {
    let requirement =
        (label_key(), 0..4u8, proptest::collection::vec(label_value(), 1..4)).prop_map(|(key, op, values)| {
            let (op, values) = match op {
                0 => (RequirementOp::In, values),
                1 => (RequirementOp::NotIn, values),
                2 => (RequirementOp::Exists, vec![]),
                _ => (RequirementOp::DoesNotExist, vec![]),
            };
            Requirement::new(key, op, values).unwrap()
        });
    proptest::collection::vec(requirement, 0..4).prop_map(Selector::from_requirements)
}

fn rollout() -> impl Strategy<Value = RolloutStrategy> {
    (
        proptest::collection::btree_set(1u8..100, 0..5),
        any::<bool>(),
        prop_oneof![any::<u32>().prop_map(FailureThreshold::Count), (0u8..=100).prop_map(FailureThreshold::Percent)],
    )
        .prop_map(|(waves, paused, failure_threshold)| {
            let mut waves: Vec<u8> = waves.into_iter().collect();
            waves.push(100);
            RolloutStrategy { waves, paused, failure_threshold, ..Default::default() }
        })
}

pub(crate) fn workload() -> impl Strategy<Value = Workload> {
    let delivery = prop_oneof![
        Just(DeliveryMode::Broadcast),
        group_name().prop_map(|g| DeliveryMode::Group(g.as_str().to_owned())),
        Just(DeliveryMode::PerNode),
    ];
    (workload_id(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..256), selector(), delivery, rollout())
        .prop_map(|(id, version, spec, selector, delivery, rollout)| Workload {
            id,
            version,
            spec,
            selector,
            delivery,
            rollout,
        })
}

fn outcome() -> impl Strategy<Value = RegisterOutcome> {
    let code = prop::sample::select(vec![
        RejectCode::IdentityMismatch,
        RejectCode::Invalid,
        RejectCode::NotAllowed,
        RejectCode::Overloaded,
    ]);
    prop_oneof![
        Just(RegisterOutcome::Accepted),
        (code, ".{0,40}", any::<u32>()).prop_map(|(code, message, retry_after_ms)| {
            RegisterOutcome::Rejected { code, message, retry_after_ms }
        }),
    ]
}

fn command_kind() -> impl Strategy<Value = CommandKind> {
    prop_oneof![
        Just(CommandKind::Reregister),
        Just(CommandKind::Resync),
        workload_id().prop_map(CommandKind::RestartWorkload),
        Just(CommandKind::Ping),
    ]
}

pub(crate) fn heartbeat() -> impl Strategy<Value = Heartbeat> {
    (any::<u32>(), any::<u32>(), digest(), any::<u8>()).prop_map(|(seq, boot_id, applied, health)| Heartbeat {
        seq,
        boot_id,
        applied,
        health: NodeHealth(health),
    })
}

/// A status report whose failed workloads carry a reason (from `texts`) unless the text is empty.
pub(crate) fn status_report(
    seq: u32,
    boot_id: u32,
    applied: crate::model::DesiredDigest,
    workloads: Vec<crate::model::WorkloadState>,
    texts: &[String],
) -> StatusReport {
    let reasons = workloads
        .iter()
        .enumerate()
        .filter(|(i, w)| w.phase == crate::model::WorkloadPhase::Failed && !texts[i % texts.len()].is_empty())
        .map(|(i, _)| super::FailureReason::new(i as u32, &texts[i % texts.len()]))
        .collect();
    StatusReport { seq, boot_id, applied, workloads, reasons }
}

/// Any message, valid by construction and within the default decode limits.
pub(crate) fn message() -> impl Strategy<Value = Message> {
    let states = || proptest::collection::vec(workload_state(), 0..6);
    prop_oneof![
        (node_name(), any::<u32>(), labels(), node_info(), digest(), states()).prop_map(
            |(name, boot_id, labels, info, applied, workloads)| {
                Message::Register(Register { name, boot_id, labels, info, applied, workloads })
            }
        ),
        heartbeat().prop_map(Message::Heartbeat),
        (any::<u32>(), any::<u32>(), digest(), states(), proptest::collection::vec(".{0,80}", 6)).prop_map(
            |(seq, boot_id, applied, workloads, texts)| {
                Message::StatusReport(status_report(seq, boot_id, applied, workloads, &texts))
            }
        ),
        (any::<u32>(), outcome(), any::<u32>(), proptest::collection::vec(group_name(), 0..5), digest()).prop_map(
            |(boot_id, outcome, heartbeat_interval_ms, groups, desired)| Message::RegisterAck(RegisterAck {
                boot_id,
                outcome,
                heartbeat_interval_ms,
                groups,
                desired
            })
        ),
        (workload(), 0u16..=10_000)
            .prop_map(|(workload, wave_threshold)| Message::WorkloadSpec(WorkloadSpec { workload, wave_threshold })),
        workload_id().prop_map(|id| Message::WorkloadRemoved(WorkloadRemoved { id })),
        (digest(), proptest::collection::vec(workload(), 0..4))
            .prop_map(|(digest, workloads)| { Message::DesiredState(DesiredState { digest, workloads }) }),
        (any::<u64>(), command_kind()).prop_map(|(id, kind)| Message::Command(Command { id, kind })),
    ]
}
