//! Kubernetes Events on `EdgeWorkload` objects: wave advances, halts, completion, rollback and the
//! progress deadline: the engine's events, with details from the workload's latest engine status,
//! and a rollback seen as the engine's version going back between two statuses.
//!
//! Publishing runs beside the status writer, fed through a bounded queue: a slow or refusing
//! apiserver drops Events (with a warning) and never delays or fails a status write.

use k8s_openapi::api::core::v1::ObjectReference;
use kole_core::engine::{EngineEvent, WorkloadStatus};
use kole_core::model::WorkloadId;
use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::crd::{EdgeWorkload, FailureThresholdSpec};

/// Reporting controller of the Events.
pub(crate) const REPORTER: &str = "kole-controller";

/// The Events API caps a note at 1 kB.
const MAX_NOTE_BYTES: usize = 1024;

/// One rollout transition worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Transition {
    /// Normal or Warning.
    pub(crate) type_: EventType,
    /// CamelCase reason (`WaveAdvanced`, …).
    pub(crate) reason: &'static str,
    /// What happened and what to do, for a person.
    pub(crate) note: String,
}

/// An Event to publish, with the object it is about.
pub(crate) struct Pending {
    pub(crate) regarding: ObjectReference,
    pub(crate) transition: Transition,
}

/// The reference to an `EdgeWorkload`; `uid` makes `kubectl describe` list the Event.
pub(crate) fn reference(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some(EdgeWorkload::api_version(&()).into_owned()),
        kind: Some(EdgeWorkload::kind(&()).into_owned()),
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        uid,
        ..Default::default()
    }
}

fn wave_of(s: &WorkloadStatus) -> String {
    format!("wave {} of {}", s.wave.saturating_add(1).min(s.waves.max(1)), s.waves)
}

fn threshold_text(t: Option<FailureThresholdSpec>) -> String {
    match t {
        Some(FailureThresholdSpec { count: Some(c), .. }) => format!("{c}"),
        Some(FailureThresholdSpec { percent: Some(p), .. }) => format!("{p}%"),
        _ => "5%".to_owned(),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_NOTE_BYTES {
        let mut end = MAX_NOTE_BYTES - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

/// What the workload controller applied, for the notes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Applied {
    /// The current version.
    pub(crate) version: Option<u64>,
    /// Its number of waves.
    pub(crate) waves: Option<usize>,
    /// Its failure threshold.
    pub(crate) threshold: Option<FailureThresholdSpec>,
}

/// The Event for one engine event, if it marks a rollout transition. `latest` is the workload's
/// latest engine status (the driver emits a step's statuses before its events), for the details.
pub(crate) fn from_engine(
    ev: &EngineEvent,
    latest: Option<&WorkloadStatus>,
    applied: Applied,
) -> Option<(WorkloadId, Transition)> {
    let threshold = applied.threshold;
    // A new workload's first events can come before its first status: then what was applied tells.
    let (version, waves) = match latest {
        Some(s) => (Some(s.version), Some(s.waves as usize)),
        None => (applied.version, applied.waves),
    };
    let version = version.map(|v| format!("version {v}")).unwrap_or_else(|| "the rollout".to_owned());
    let wave_n = |wave: usize| match waves {
        Some(n) => format!("wave {} of {n}", wave.saturating_add(1)),
        None => format!("wave {}", wave.saturating_add(1)),
    };
    let (id, t) = match ev {
        EngineEvent::WaveAdvanced { id, wave } => (
            id,
            Transition {
                type_: EventType::Normal,
                reason: "WaveAdvanced",
                note: format!("{version} advanced to {}: the previous waves are ready", wave_n(*wave)),
            },
        ),
        EngineEvent::RolloutComplete { id } => (
            id,
            Transition {
                type_: EventType::Normal,
                reason: "RolloutComplete",
                note: match waves {
                    Some(n) => format!("{version} rolled out through all {n} waves and ready"),
                    None => format!("{version} rolled out through all waves and ready"),
                },
            },
        ),
        EngineEvent::RolloutHalted { id, failed, reached } => {
            let top = match latest.and_then(|s| s.failures.first()) {
                Some(f) => format!("; top reason ({} nodes): {}", f.count, f.reason),
                None => String::new(),
            };
            let at = latest.map(|s| format!(" at {}", wave_of(s))).unwrap_or_default();
            (
                id,
                Transition {
                    type_: EventType::Warning,
                    reason: "RolloutHalted",
                    note: format!(
                        "{version} halted{at}: {failed} of {reached} nodes in the reached waves failed (threshold {}){top}. \
                         Fix the spec and apply a new version, or set spec.rollout.rollback: true",
                        threshold_text(threshold)
                    ),
                },
            )
        }
        EngineEvent::ProgressDeadlineExceeded { id, wave } => {
            let counts = latest
                .map(|s| format!(" ({} of {} targeted nodes ready, {} failed)", s.ready, s.targeted, s.failed))
                .unwrap_or_default();
            (
                id,
                Transition {
                    type_: EventType::Warning,
                    reason: "ProgressDeadlineExceeded",
                    note: format!(
                        "{version}: {} has not settled within spec.rollout.progressDeadlineSeconds{counts}; the \
                         rollout keeps waiting: check the nodes' workloads with a NodeQuery",
                        wave_n(*wave)
                    ),
                },
            )
        }
        EngineEvent::CommandRejected { id, reason } => (
            id,
            Transition {
                type_: EventType::Warning,
                reason: "CommandRejected",
                note: format!("the engine refused this change and keeps what it had: {reason}"),
            },
        ),
        _ => return None,
    };
    Some((id.clone(), Transition { note: truncate(t.note), ..t }))
}

/// A rollback, seen as the engine's version going back between two statuses (the engine has no
/// event for it). With no `prev` (first sight in this controller's life) nothing is reported.
pub(crate) fn rolled_back(prev: Option<&WorkloadStatus>, new: &WorkloadStatus) -> Option<Transition> {
    let prev = prev.filter(|p| new.version < p.version)?;
    Some(Transition {
        type_: EventType::Warning,
        reason: "RolledBack",
        note: format!(
            "rolled back from version {} to version {}: the nodes that got version {} return to version {}",
            prev.version, new.version, prev.version, new.version
        ),
    })
}

/// Publishes queued Events until `queue` closes. A failed publish logs a warning and moves on.
pub(crate) async fn run_publisher(client: Client, mut queue: mpsc::Receiver<Pending>) {
    let reporter = Reporter::from(REPORTER);
    while let Some(p) = queue.recv().await {
        // A recorder per Event: kube's recorder folds Events with the same reason into one series
        // and keeps the first note, which would hide "wave 3" behind "wave 2".
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let ev = Event {
            type_: p.transition.type_,
            reason: p.transition.reason.to_owned(),
            note: Some(p.transition.note),
            action: "Rollout".to_owned(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &p.regarding).await {
            tracing::warn!(
                workload = %format!("{}/{}", p.regarding.namespace.as_deref().unwrap_or(""), p.regarding.name.as_deref().unwrap_or("")),
                reason = ev.reason,
                error = %e,
                "publishing an Event failed; the status is written regardless"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kole_core::engine::{FailureSummary, RolloutPhase};

    fn id() -> WorkloadId {
        WorkloadId::new("edge/cdn").unwrap()
    }

    fn st(version: u64, wave: u32, phase: RolloutPhase) -> WorkloadStatus {
        WorkloadStatus {
            id: id(),
            version,
            targeted: 40,
            updated: 10,
            ready: 10,
            failed: 0,
            by_version: vec![(version, 10)],
            wave,
            waves: 4,
            phase,
            failures: vec![],
            progress_deadline_exceeded: false,
        }
    }

    #[test]
    fn wave_advance_and_completion_are_normal() {
        let latest = st(3, 0, RolloutPhase::Progressing);
        let (w, t) =
            from_engine(&EngineEvent::WaveAdvanced { id: id(), wave: 1 }, Some(&latest), Applied::default()).unwrap();
        assert_eq!((w, t.reason, t.type_), (id(), "WaveAdvanced", EventType::Normal));
        assert!(t.note.starts_with("version 3 advanced to wave 2 of 4"), "{}", t.note);
        let (_, t) =
            from_engine(&EngineEvent::RolloutComplete { id: id() }, Some(&latest), Applied::default()).unwrap();
        assert_eq!((t.reason, t.type_), ("RolloutComplete", EventType::Normal));
        assert_eq!(t.note, "version 3 rolled out through all 4 waves and ready");
        // Without a status yet the note still says what happened.
        let (_, t) = from_engine(&EngineEvent::WaveAdvanced { id: id(), wave: 1 }, None, Applied::default()).unwrap();
        assert!(t.note.starts_with("the rollout advanced to wave 2"), "{}", t.note);
        let applied = Applied { version: Some(3), waves: Some(4), threshold: None };
        let (_, t) = from_engine(&EngineEvent::RolloutComplete { id: id() }, None, applied).unwrap();
        assert_eq!(t.note, "version 3 rolled out through all 4 waves and ready");
    }

    #[test]
    fn halt_says_where_why_and_what_to_do() {
        let mut halted = st(2, 1, RolloutPhase::Halted);
        halted.failed = 3;
        halted.failures = vec![FailureSummary {
            reason: "exec /x: No such file or directory".into(),
            count: 2,
            sample_nodes: vec![],
        }];
        let ev = EngineEvent::RolloutHalted { id: id(), failed: 3, reached: 20 };
        let (_, t) = from_engine(
            &ev,
            Some(&halted),
            Applied { threshold: Some(FailureThresholdSpec { count: Some(1), percent: None }), ..Default::default() },
        )
        .unwrap();
        assert_eq!((t.reason, t.type_), ("RolloutHalted", EventType::Warning));
        assert_eq!(
            t.note,
            "version 2 halted at wave 2 of 4: 3 of 20 nodes in the reached waves failed (threshold 1); top reason \
             (2 nodes): exec /x: No such file or directory. Fix the spec and apply a new version, or set \
             spec.rollout.rollback: true"
        );
        let (_, t) = from_engine(&ev, Some(&halted), Applied::default()).unwrap();
        assert!(t.note.contains("(threshold 5%)"), "the default threshold: {}", t.note);
    }

    #[test]
    fn progress_deadline_is_a_warning_with_counts() {
        let ev = EngineEvent::ProgressDeadlineExceeded { id: id(), wave: 0 };
        let (_, t) = from_engine(&ev, Some(&st(1, 0, RolloutPhase::Progressing)), Applied::default()).unwrap();
        assert_eq!((t.reason, t.type_), ("ProgressDeadlineExceeded", EventType::Warning));
        assert!(t.note.starts_with("version 1: wave 1 of 4 has not settled within"), "{}", t.note);
        assert!(t.note.contains("(10 of 40 targeted nodes ready, 0 failed)"), "{}", t.note);
    }

    #[test]
    fn a_rejected_command_is_a_warning_with_its_reason() {
        let ev = EngineEvent::CommandRejected { id: id(), reason: "the encoded spec message is 70000 bytes".into() };
        let (_, t) = from_engine(&ev, None, Applied::default()).unwrap();
        assert_eq!((t.reason, t.type_), ("CommandRejected", EventType::Warning));
        assert!(t.note.contains("70000 bytes"), "{}", t.note);
    }

    #[test]
    fn other_engine_events_are_not_events() {
        let ev = EngineEvent::NothingReached { id: id(), wave: 0 };
        assert!(from_engine(&ev, None, Applied::default()).is_none());
    }

    #[test]
    fn rollback_is_the_version_going_back() {
        let t = rolled_back(Some(&st(2, 1, RolloutPhase::Halted)), &st(1, 3, RolloutPhase::Complete)).unwrap();
        assert_eq!((t.reason, t.type_), ("RolledBack", EventType::Warning));
        assert!(t.note.starts_with("rolled back from version 2 to version 1"));
        assert!(rolled_back(None, &st(1, 3, RolloutPhase::Complete)).is_none(), "first sight is no rollback");
        assert!(rolled_back(Some(&st(1, 3, RolloutPhase::Complete)), &st(2, 0, RolloutPhase::Progressing)).is_none());
    }

    #[test]
    fn notes_fit_the_events_api() {
        let mut halted = st(1, 0, RolloutPhase::Halted);
        halted.failures = vec![FailureSummary { reason: "é".repeat(2000), count: 1, sample_nodes: vec![] }];
        let ev = EngineEvent::RolloutHalted { id: id(), failed: 1, reached: 1 };
        let (_, t) = from_engine(&ev, Some(&halted), Applied::default()).unwrap();
        assert!(t.note.len() <= MAX_NOTE_BYTES && t.note.ends_with("..."));
    }
}
