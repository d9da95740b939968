//! Conversions between the custom resources and kole-core's model, validated: a spec the schema
//! let through but the model refuses (waves not increasing, a bad label key) is a clear error that
//! names the object and the rule.

use std::collections::BTreeMap;

use kole_core::cache::HealthFilter;
use kole_core::engine::{RolloutPhase, RolloutProgress, WorkloadStatus};
use kole_core::model::{
    DeliveryMode, FailureThreshold, LabelSelector, LabelSelectorRequirement, NodeHealth, NodePhase, NodeRecord,
    RolloutStrategy, Selector, SelectorOperator, Timestamp, Workload, WorkloadId, WorkloadPhase,
};
use kole_core::runspec::{RestartPolicy, RunSpec, RunSpecError};
use kube::ResourceExt;

use crate::crd::{
    AppliedVersion, DeliveryModeSpec, EdgeWorkload, EdgeWorkloadSpec, EdgeWorkloadStatus, NodeHealthSpec, NodeItem,
    NodePhaseSpec, NodeWorkloadItem, RestartPolicySpec, RolloutPhaseSpec, RuntimeSpec, SelectorOperatorSpec,
    SelectorSpec, VersionCount,
};
use crate::{Error, Result};

/// The workload id of an object: `namespace/name`.
pub fn workload_id(obj: &EdgeWorkload) -> Result<WorkloadId> {
    let ns = obj.namespace().unwrap_or_else(|| "default".to_owned());
    WorkloadId::new(format!("{ns}/{}", obj.name_any()))
        .map_err(|e| Error::InvalidWorkload { object: format!("{ns}/{}", obj.name_any()), reason: e.to_string() })
}

/// A [`SelectorSpec`] as a validated [`Selector`].
pub fn selector(spec: &SelectorSpec) -> Result<Selector, kole_core::model::ValidationError> {
    let ls = LabelSelector {
        match_labels: spec.match_labels.clone(),
        match_expressions: spec
            .match_expressions
            .iter()
            .map(|r| LabelSelectorRequirement {
                key: r.key.clone(),
                operator: match r.operator {
                    SelectorOperatorSpec::In => SelectorOperator::In,
                    SelectorOperatorSpec::NotIn => SelectorOperator::NotIn,
                    SelectorOperatorSpec::Exists => SelectorOperator::Exists,
                    SelectorOperatorSpec::DoesNotExist => SelectorOperator::DoesNotExist,
                },
                values: r.values.clone(),
            })
            .collect(),
    };
    Selector::try_from(&ls)
}

/// The runtime spec nodes receive: kole's [`RunSpec`], checked by the rules every agent checks.
pub fn run_spec(runtime: &RuntimeSpec) -> Result<RunSpec, String> {
    let mut spec = match &runtime.image {
        Some(image) => RunSpec::container(image.clone()),
        None => RunSpec::default(),
    };
    spec.command.clone_from(&runtime.command);
    spec.args.clone_from(&runtime.args);
    for var in &runtime.env {
        if spec.env.insert(var.name.clone(), var.value.clone().unwrap_or_default()).is_some() {
            return Err(format!("env: {:?} is set twice", var.name));
        }
    }
    spec.working_dir.clone_from(&runtime.working_dir);
    spec.restart = match runtime.restart_policy.unwrap_or_default() {
        RestartPolicySpec::Always => RestartPolicy::Always,
        RestartPolicySpec::OnFailure => RestartPolicy::OnFailure,
        RestartPolicySpec::Never => RestartPolicy::Never,
    };
    if let Some(n) = runtime.max_restarts {
        spec.max_restarts = n;
    }
    if let Some(secs) = runtime.stop_grace_period_seconds {
        spec.stop_grace_ms = secs.saturating_mul(1_000);
    }
    spec.config.clone_from(&runtime.config);
    spec.validate().map_err(|e| match e {
        RunSpecError::Invalid { field: "command", .. } if runtime.image.is_none() => {
            "set image (for a container runtime) or command (for the process runtime)".to_owned()
        }
        e => e.to_string(),
    })?;
    Ok(spec)
}

/// The bytes of a workload's runtime spec as nodes receive it (kole's runtime spec format).
pub fn runtime_bytes(spec: &EdgeWorkloadSpec) -> Result<Vec<u8>, String> {
    run_spec(&spec.runtime)?.encode().map_err(|e| e.to_string())
}

/// Builds the model's workload from a spec at `version`, for the object named `id`.
pub fn workload_from_spec(id: &WorkloadId, version: u64, spec: &EdgeWorkloadSpec) -> Result<Workload> {
    let bad = |reason: String| Error::InvalidWorkload { object: id.to_string(), reason };
    let selector = selector(&spec.selector).map_err(|e| bad(format!("spec.selector: {e}")))?;
    let delivery = match (spec.delivery.mode, &spec.delivery.group) {
        (DeliveryModeSpec::Broadcast, None) => DeliveryMode::Broadcast,
        (DeliveryModeSpec::PerNode, None) => DeliveryMode::PerNode,
        (DeliveryModeSpec::Group, Some(g)) if !g.is_empty() => DeliveryMode::Group(g.clone()),
        (DeliveryModeSpec::Group, _) => return Err(bad("spec.delivery.group is required when mode is Group".into())),
        (_, Some(_)) => return Err(bad("spec.delivery.group is only allowed when mode is Group".into())),
    };
    let failure_threshold = match spec.rollout.failure_threshold {
        None => FailureThreshold::default(),
        Some(t) => match (t.count, t.percent) {
            (Some(c), None) => FailureThreshold::Count(c),
            (None, Some(p)) => FailureThreshold::Percent(p),
            (None, None) => FailureThreshold::default(),
            (Some(_), Some(_)) => {
                return Err(bad("spec.rollout.failureThreshold: set count or percent, not both".into()));
            }
        },
    };
    let rollout = RolloutStrategy {
        waves: spec.rollout.waves.clone(),
        paused: spec.rollout.paused,
        failure_threshold,
        progress_deadline_s: spec.rollout.progress_deadline_seconds.max(1),
    };
    rollout.validate().map_err(|e| bad(format!("spec.rollout: {e}")))?;
    let bytes = runtime_bytes(spec).map_err(|e| bad(format!("spec.runtime: {e}")))?;
    Ok(Workload { id: id.clone(), version, spec: bytes, selector, delivery, rollout })
}

/// Builds the model's workload from an object: id `namespace/name`, version `metadata.generation`.
pub fn workload_from_object(obj: &EdgeWorkload) -> Result<Workload> {
    let id = workload_id(obj)?;
    let version = obj.metadata.generation.and_then(|g| u64::try_from(g).ok()).ok_or_else(|| {
        Error::InvalidWorkload { object: id.to_string(), reason: "metadata.generation is missing".into() }
    })?;
    workload_from_spec(&id, version, &obj.spec)
}

/// The rollout position persisted in an object's status, when it describes the object's current
/// generation (a restarted controller resumes from it instead of starting the rollout over).
pub fn progress_from_status(obj: &EdgeWorkload) -> Result<Option<RolloutProgress>> {
    let Some(status) = &obj.status else { return Ok(None) };
    if status.observed_generation.is_none() || status.observed_generation != obj.metadata.generation {
        return Ok(None);
    }
    let id = workload_id(obj)?;
    let previous = match &status.previous {
        Some(p) => Some(workload_from_spec(&id, p.version, &p.spec)?),
        None => None,
    };
    let phase = match status.rollout_phase.unwrap_or_default() {
        RolloutPhaseSpec::Progressing => RolloutPhase::Progressing,
        RolloutPhaseSpec::Paused => RolloutPhase::Paused,
        RolloutPhaseSpec::Halted => RolloutPhase::Halted,
        RolloutPhaseSpec::Complete => RolloutPhase::Complete,
    };
    Ok(Some(RolloutProgress { wave: status.current_wave as usize, phase, previous, published: status.published }))
}

/// The domain of the status signature (see [`EdgeWorkloadStatus::resume_signature`]).
pub const STATUS_SIGNATURE_DOMAIN: &str = "kole-status-v1";

/// The bytes a status signature covers: what a restarted controller resumes from, and the uid.
fn resume_record(uid: &str, s: &EdgeWorkloadStatus) -> Vec<u8> {
    // serde_json's maps are sorted: the same status always gives the same bytes.
    let record = serde_json::json!({
        "uid": uid,
        "current": s.current,
        "previous": s.previous,
        "rolledBack": s.rolled_back,
        "published": s.published,
        "currentWave": s.current_wave,
        "rolloutPhase": s.rollout_phase,
    });
    serde_json::to_vec(&record).unwrap_or_default()
}

/// Signs a status's rollout state for the object `uid` (see [`EdgeWorkloadStatus::resume_signature`]).
pub fn sign_status(key: &kole_core::protocol::seal::DownlinkSigner, uid: &str, s: &EdgeWorkloadStatus) -> String {
    key.sign_detached(STATUS_SIGNATURE_DOMAIN, &resume_record(uid, s))
}

/// Whether a restarted controller may resume from the object's status: always without a key;
/// with one, only when the status carries that key's signature over its rollout state and uid.
pub fn status_trusted(obj: &EdgeWorkload, key: Option<&kole_core::protocol::seal::DownlinkSigner>) -> bool {
    let (Some(key), Some(status)) = (key, &obj.status) else { return true };
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    status
        .resume_signature
        .as_deref()
        .is_some_and(|sig| key.verify_detached(STATUS_SIGNATURE_DOMAIN, &resume_record(uid, status), sig))
}

/// The version the engine ran and its rollout position, as a previous controller persisted them in
/// status (whatever the object's generation is now): a restarted controller hands them to the engine
/// first, then the object's current spec when it differs. After a rollback (`status.rolledBack`)
/// that is `status.previous`, not `status.current`.
pub fn resume_from_status(obj: &EdgeWorkload) -> Result<Option<(Workload, RolloutProgress)>> {
    let Some(status) = &obj.status else { return Ok(None) };
    let Some(current) = &status.current else { return Ok(None) };
    let id = workload_id(obj)?;
    let previous = match &status.previous {
        Some(p) => Some(workload_from_spec(&id, p.version, &p.spec)?),
        None => None,
    };
    // Rolled back: the engine ran the previous version, with nothing to go back to.
    let (workload, previous) = match previous {
        Some(p) if status.rolled_back => (p, None),
        previous => (workload_from_spec(&id, current.version, &current.spec)?, previous),
    };
    let phase = match status.rollout_phase.unwrap_or_default() {
        RolloutPhaseSpec::Progressing => RolloutPhase::Progressing,
        RolloutPhaseSpec::Paused => RolloutPhase::Paused,
        RolloutPhaseSpec::Halted => RolloutPhase::Halted,
        RolloutPhaseSpec::Complete => RolloutPhase::Complete,
    };
    let progress = RolloutProgress { wave: status.current_wave as usize, phase, previous, published: status.published };
    Ok(Some((workload, progress)))
}

/// The status phase of an engine rollout phase.
pub fn phase_spec(phase: RolloutPhase) -> RolloutPhaseSpec {
    match phase {
        RolloutPhase::Progressing => RolloutPhaseSpec::Progressing,
        RolloutPhase::Paused => RolloutPhaseSpec::Paused,
        RolloutPhase::Halted => RolloutPhaseSpec::Halted,
        RolloutPhase::Complete => RolloutPhaseSpec::Complete,
    }
}

/// An object status from the engine's aggregated status. `previous` is the version nodes outside
/// the reached waves keep; `observed_generation` is the object's `metadata.generation` the
/// controller last acted on (`None`: the engine's version); `now` stamps changed conditions.
pub fn status_from_engine(
    s: &WorkloadStatus,
    previous: Option<AppliedVersion>,
    current: Option<AppliedVersion>,
    rolled_back: bool,
    observed_generation: Option<i64>,
    old: Option<&EdgeWorkloadStatus>,
    now: Timestamp,
) -> EdgeWorkloadStatus {
    // A pause or rollback edit is a new generation without a new engine version, and a rollback
    // takes the engine's version back: the generation acted on is what was observed.
    let generation = observed_generation.unwrap_or_else(|| i64::try_from(s.version).unwrap_or(i64::MAX));
    let phase = phase_spec(s.phase);
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" }.to_owned();
        let since = old
            .and_then(|o| o.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| rfc3339(now));
        crate::crd::Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            last_transition_time: since,
            observed_generation: generation,
        }
    };
    let conditions = vec![
        cond("Accepted", true, "Valid", "the spec is valid and handed to the engine".into()),
        cond(
            "Progressing",
            matches!(phase, RolloutPhaseSpec::Progressing) && !s.progress_deadline_exceeded,
            if s.progress_deadline_exceeded && phase == RolloutPhaseSpec::Progressing {
                "ProgressDeadlineExceeded"
            } else {
                phase_reason(phase)
            },
            if s.progress_deadline_exceeded && phase == RolloutPhaseSpec::Progressing {
                format!(
                    "wave {} of {} has not settled within spec.rollout.progressDeadlineSeconds ({} of {} targeted nodes ready, {} failed)",
                    s.wave.saturating_add(1).min(s.waves.max(1)),
                    s.waves,
                    s.ready,
                    s.targeted,
                    s.failed
                )
            } else {
                format!("wave {} of {}", s.wave.saturating_add(1).min(s.waves.max(1)), s.waves)
            },
        ),
        cond(
            "Available",
            phase == RolloutPhaseSpec::Complete && s.ready == s.targeted,
            if s.ready == s.targeted { "AllReady" } else { "NotAllReady" },
            format!("{} of {} targeted nodes ready", s.ready, s.targeted),
        ),
        cond(
            "Degraded",
            phase == RolloutPhaseSpec::Halted || s.failed > 0,
            if phase == RolloutPhaseSpec::Halted { "FailureThresholdExceeded" } else { "Failures" },
            degraded_message(s),
        ),
    ];
    EdgeWorkloadStatus {
        observed_generation: Some(generation),
        targeted: s.targeted,
        updated: s.updated,
        ready: s.ready,
        failed: s.failed,
        by_version: s.by_version.iter().map(|&(version, nodes)| VersionCount { version, nodes }).collect(),
        failures: s
            .failures
            .iter()
            .map(|f| crate::crd::FailureReasonStatus {
                reason: f.reason.clone(),
                count: f.count,
                sample_nodes: f.sample_nodes.iter().map(|n| n.as_str().to_owned()).collect(),
            })
            .collect(),
        current_wave: s.wave,
        wave: s.wave.saturating_add(1).min(s.waves.max(1)),
        waves: s.waves,
        rollout_phase: Some(phase),
        conditions,
        published: true,
        previous,
        current,
        rolled_back,
        // Signed by the status writer, which knows the object's uid.
        resume_signature: None,
    }
}

/// "3 nodes failed", naming the most common reason when nodes gave one: what a user reads first.
fn degraded_message(s: &WorkloadStatus) -> String {
    match s.failures.first() {
        Some(top) => {
            let nodes = top.sample_nodes.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ");
            format!("{} nodes failed; most common reason ({} nodes, e.g. {nodes}): {}", s.failed, top.count, top.reason)
        }
        None => format!("{} nodes failed", s.failed),
    }
}

fn phase_reason(phase: RolloutPhaseSpec) -> &'static str {
    match phase {
        RolloutPhaseSpec::Progressing => "RollingOut",
        RolloutPhaseSpec::Paused => "Paused",
        RolloutPhaseSpec::Halted => "Halted",
        RolloutPhaseSpec::Complete => "Complete",
    }
}

/// The model's phase of a query's phase filter.
pub fn node_phase(p: NodePhaseSpec) -> NodePhase {
    match p {
        NodePhaseSpec::Registering => NodePhase::Registering,
        NodePhaseSpec::Online => NodePhase::Online,
        NodePhaseSpec::Offline => NodePhase::Offline,
    }
}

/// The cache's health filter of a query's health filter.
pub fn health_filter(h: NodeHealthSpec) -> HealthFilter {
    let flag = HealthFilter::AnyOf;
    match h {
        NodeHealthSpec::Healthy => HealthFilter::Healthy,
        NodeHealthSpec::Unhealthy => HealthFilter::AnyOf(NodeHealth(u8::MAX)),
        NodeHealthSpec::Degraded => flag(NodeHealth::DEGRADED),
        NodeHealthSpec::WorkloadFailed => flag(NodeHealth::WORKLOAD_FAILED),
        NodeHealthSpec::WorkloadPending => flag(NodeHealth::WORKLOAD_PENDING),
        NodeHealthSpec::ResourcePressure => flag(NodeHealth::RESOURCE_PRESSURE),
        NodeHealthSpec::ClockUnsynced => flag(NodeHealth::CLOCK_UNSYNCED),
        NodeHealthSpec::DownlinkRefused => flag(NodeHealth::DOWNLINK_REFUSED),
    }
}

/// A node phase as Kubernetes objects spell it: `Registering`, `Online`, `Offline`.
pub fn phase_name(p: NodePhase) -> &'static str {
    match p {
        NodePhase::Registering => "Registering",
        NodePhase::Online => "Online",
        NodePhase::Offline => "Offline",
    }
}

/// A cache record as a query answer item.
pub fn node_item(r: &NodeRecord) -> NodeItem {
    let phase = phase_name(r.phase);
    NodeItem {
        name: r.name.as_str().to_owned(),
        phase: phase.to_owned(),
        labels: r.labels.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect::<BTreeMap<_, _>>(),
        last_seen: rfc3339(r.last_seen),
        arch: r.info.arch.clone(),
        os: r.info.os.clone(),
        agent_version: r.info.agent_version.clone(),
        addresses: r.info.addresses.iter().map(ToString::to_string).collect(),
        health: r.health.names(),
        workloads: r
            .workloads
            .iter()
            .map(|w| NodeWorkloadItem {
                workload: w.workload.to_string(),
                version: w.version,
                phase: match w.phase {
                    WorkloadPhase::Pending => "Pending",
                    WorkloadPhase::Running => "Running",
                    WorkloadPhase::Failed => "Failed",
                    WorkloadPhase::Stopped => "Stopped",
                }
                .to_owned(),
            })
            .collect(),
    }
}

/// RFC 3339 (UTC, second precision) of a timestamp, as Kubernetes writes times.
pub fn rfc3339(t: Timestamp) -> String {
    let secs = t.as_millis() / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), valid for the whole u64 day range we produce.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeliverySpec, EnvVar, FailureThresholdSpec, RolloutSpec, RuntimeSpec};

    fn object(spec: EdgeWorkloadSpec) -> EdgeWorkload {
        let mut o = EdgeWorkload::new("cdn", spec);
        o.metadata.namespace = Some("edge".into());
        o.metadata.generation = Some(3);
        o
    }

    fn spec() -> EdgeWorkloadSpec {
        EdgeWorkloadSpec {
            runtime: RuntimeSpec { image: Some("cdn:1".into()), ..Default::default() },
            selector: SelectorSpec { match_labels: [("tier".into(), "cdn".into())].into(), ..Default::default() },
            delivery: DeliverySpec::default(),
            rollout: RolloutSpec { waves: vec![10, 100], ..Default::default() },
        }
    }

    #[test]
    fn converts_a_valid_workload() {
        let w = workload_from_object(&object(spec())).unwrap();
        assert_eq!(w.id.as_str(), "edge/cdn");
        assert_eq!(w.version, 3);
        assert_eq!(w.rollout.waves, vec![10, 100]);
        assert_eq!(RunSpec::decode(&w.spec, &Default::default()).unwrap(), RunSpec::container("cdn:1"));
        assert_eq!(w.selector, Selector::parse("tier=cdn").unwrap());
    }

    #[test]
    fn a_process_runtime_section_becomes_the_runtime_spec_nodes_decode() {
        let runtime: RuntimeSpec = serde_json::from_value(serde_json::json!({
            "command": ["sh", "-c"],
            "args": ["echo $GREETING; sleep 60"],
            "env": [{"name": "GREETING", "value": "hello"}],
            "workingDir": "/tmp",
            "restartPolicy": "OnFailure",
            "maxRestarts": 2,
            "stopGracePeriodSeconds": 3,
            "config": "k: v",
        }))
        .unwrap();
        let got = run_spec(&runtime).unwrap();
        let mut want = RunSpec::process(["sh", "-c"]);
        want.args = vec!["echo $GREETING; sleep 60".into()];
        want.env.insert("GREETING".into(), "hello".into());
        want.working_dir = Some("/tmp".into());
        want.restart = RestartPolicy::OnFailure;
        want.max_restarts = 2;
        want.stop_grace_ms = 3_000;
        want.config = Some("k: v".into());
        assert_eq!(got, want);
        let bytes = runtime_bytes(&EdgeWorkloadSpec { runtime, ..spec() }).unwrap();
        assert_eq!(RunSpec::decode(&bytes, &Default::default()).unwrap(), want);
    }

    #[test]
    fn a_runtime_section_nodes_would_refuse_is_refused_here() {
        let bad = |runtime: RuntimeSpec| {
            let err = workload_from_object(&object(EdgeWorkloadSpec { runtime, ..spec() })).unwrap_err();
            err.to_string()
        };
        let none = bad(RuntimeSpec::default());
        assert!(none.contains("set image") && none.contains("or command"), "{none}");
        let env = vec![EnvVar { name: "A".into(), value: Some("1".into()) }, EnvVar { name: "A".into(), value: None }];
        let twice = bad(RuntimeSpec { command: vec!["true".into()], env, ..Default::default() });
        assert!(twice.contains("\"A\" is set twice"), "{twice}");
        let kole = vec![EnvVar { name: "KOLE_NODE".into(), value: Some("x".into()) }];
        let reserved = bad(RuntimeSpec { command: vec!["true".into()], env: kole, ..Default::default() });
        assert!(reserved.contains("reserved"), "{reserved}");
    }

    #[test]
    fn invalid_specs_are_clear_errors() {
        type Damage = Box<dyn Fn(&mut EdgeWorkloadSpec)>;
        let cases: Vec<(Damage, &str)> = vec![
            (Box::new(|s| s.rollout.waves = vec![50, 20, 100]), "strictly increasing"),
            (Box::new(|s| s.rollout.waves = vec![50]), "last wave must be 100"),
            (Box::new(|s| s.delivery.mode = DeliveryModeSpec::Group), "group is required"),
            (
                Box::new(|s| {
                    s.rollout.failure_threshold = Some(FailureThresholdSpec { count: Some(1), percent: Some(1) })
                }),
                "not both",
            ),
            (
                Box::new(|s| {
                    s.selector.match_labels.insert("bad key!".into(), "x".into());
                }),
                "spec.selector",
            ),
        ];
        for (damage, expect) in cases {
            let mut s = spec();
            damage(&mut s);
            let err = workload_from_object(&object(s)).unwrap_err().to_string();
            assert!(err.contains("edge/cdn") && err.contains(expect), "{err}");
        }
        let mut o = object(spec());
        o.metadata.generation = None;
        assert!(workload_from_object(&o).unwrap_err().to_string().contains("generation"));
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(Timestamp::from_secs(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(Timestamp::from_secs(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(Timestamp::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn status_round_trips_progress() {
        let s = WorkloadStatus {
            id: WorkloadId::new("edge/cdn").unwrap(),
            version: 3,
            targeted: 10,
            updated: 4,
            ready: 3,
            failed: 1,
            by_version: vec![(2, 6), (3, 4)],
            wave: 1,
            waves: 2,
            phase: RolloutPhase::Paused,
            failures: vec![kole_core::engine::FailureSummary {
                reason: "exec /usr/bin/cdn: No such file or directory".into(),
                count: 1,
                sample_nodes: vec![kole_core::model::NodeName::new("edge-7").unwrap()],
            }],
            progress_deadline_exceeded: false,
        };
        let prev = AppliedVersion { version: 2, spec: spec() };
        let cur = AppliedVersion { version: 3, spec: spec() };
        let st = status_from_engine(&s, Some(prev), Some(cur), false, None, None, Timestamp::from_secs(10));
        assert_eq!(st.failures.len(), 1);
        assert_eq!(st.failures[0].sample_nodes, ["edge-7"]);
        let degraded = st.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(degraded.status, "True");
        assert!(degraded.message.contains("exec /usr/bin/cdn: No such file or directory"), "{}", degraded.message);
        let mut o = object(spec());
        o.status = Some(st);
        let mut stuck = s.clone();
        stuck.phase = RolloutPhase::Progressing;
        stuck.progress_deadline_exceeded = true;
        let st2 = status_from_engine(&stuck, None, None, false, None, None, Timestamp::from_secs(10));
        let progressing = st2.conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
        assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("False", "ProgressDeadlineExceeded"));
        let p = progress_from_status(&o).unwrap().unwrap();
        assert_eq!(p.wave, 1);
        assert_eq!(p.phase, RolloutPhase::Paused);
        assert_eq!(p.previous.unwrap().version, 2);
        o.metadata.generation = Some(4);
        assert!(progress_from_status(&o).unwrap().is_none());
        // The spec changed while no controller ran: the old version and its position come back.
        let (old, p) = resume_from_status(&o).unwrap().unwrap();
        assert_eq!((old.version, p.wave, p.previous.map(|w| w.version)), (3, 1, Some(2)));

        // After a rollback the nodes run `previous`: that is what a restarted controller resumes,
        // with nothing left to roll back to (not `current`, the version rolled back from).
        let mut v1 = spec();
        v1.runtime.image = Some("cdn:0".into());
        let mut back = s.clone();
        back.version = 2;
        back.phase = RolloutPhase::Complete;
        let prev = AppliedVersion { version: 2, spec: v1 };
        let cur = AppliedVersion { version: 3, spec: spec() };
        o.status =
            Some(status_from_engine(&back, Some(prev), Some(cur), true, Some(4), None, Timestamp::from_secs(10)));
        assert!(o.status.as_ref().unwrap().rolled_back);
        let (resumed, p) = resume_from_status(&o).unwrap().unwrap();
        assert_eq!((resumed.version, p.phase, p.previous), (2, RolloutPhase::Complete, None));
        assert_eq!(resumed.spec, runtime_bytes(&o.status.as_ref().unwrap().previous.as_ref().unwrap().spec).unwrap());
    }

    /// With a key, only a status the controller signed (for this object) is resumed from.
    #[test]
    fn a_status_is_trusted_only_with_the_controllers_signature_over_its_rollout_state() {
        use kole_core::protocol::seal::DownlinkSigner;
        let key = DownlinkSigner::from_seed([5; 32]);
        let mut o = object(spec());
        o.metadata.uid = Some("uid-1".into());
        let mut st = EdgeWorkloadStatus {
            current: Some(AppliedVersion { version: 3, spec: spec() }),
            published: true,
            ..Default::default()
        };
        o.status = Some(st.clone());
        assert!(status_trusted(&o, None), "without a key, statuses are trusted as before");
        assert!(!status_trusted(&o, Some(&key)), "unsigned");
        st.resume_signature = Some(sign_status(&key, "uid-1", &st));
        o.status = Some(st.clone());
        assert!(status_trusted(&o, Some(&key)));
        // Counts and conditions are not covered: the writer may change them freely.
        o.status.as_mut().unwrap().ready = 7;
        assert!(status_trusted(&o, Some(&key)));
        // A spec slipped into the status, another object's status, another key: refused.
        let mut forged = o.clone();
        forged.status.as_mut().unwrap().current.as_mut().unwrap().spec.runtime.image = Some("evil:1".into());
        assert!(!status_trusted(&forged, Some(&key)));
        let mut other = o.clone();
        other.metadata.uid = Some("uid-2".into());
        assert!(!status_trusted(&other, Some(&key)));
        assert!(!status_trusted(&o, Some(&DownlinkSigner::from_seed([6; 32]))));
    }

    /// `kubectl get edgeworkloads` and the Progressing condition name the same wave.
    #[test]
    fn the_printed_wave_column_agrees_with_the_condition_message() {
        use kube::CustomResourceExt;
        let crd = EdgeWorkload::crd();
        let columns = crd.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
        let path = columns.iter().find(|c| c.name == "Wave").map(|c| c.json_path.clone()).unwrap();
        for (wave, waves) in [(0, 3), (1, 3), (2, 3)] {
            let s = WorkloadStatus {
                id: WorkloadId::new("edge/cdn").unwrap(),
                version: 3,
                targeted: 10,
                updated: 0,
                ready: 0,
                failed: 0,
                by_version: vec![],
                wave,
                waves,
                phase: RolloutPhase::Progressing,
                failures: vec![],
                progress_deadline_exceeded: false,
            };
            let st = status_from_engine(&s, None, None, false, None, None, Timestamp::from_secs(10));
            let json = serde_json::json!({ "status": st });
            let mut v = &json;
            for part in path.trim_start_matches('.').split('.') {
                v = &v[part];
            }
            let printed = v.as_u64().unwrap_or_else(|| panic!("{path} in {json}"));
            let message = &st.conditions.iter().find(|c| c.type_ == "Progressing").unwrap().message;
            assert_eq!(message, &format!("wave {printed} of {waves}"), "column {path} = {printed}");
        }
    }
}
