//! Kubernetes Events on `EdgeWorkload` objects: wave advances, halts, completion, rollback and the
//! progress deadline, found by comparing each workload's previous engine status with the new one.
//!
//! Publishing runs beside the status writer, fed through a bounded queue: a slow or refusing
//! apiserver drops Events (with a warning) and never delays or fails a status write.

use k8s_openapi::api::core::v1::ObjectReference;
use kole_core::engine::{RolloutPhase, WorkloadStatus};
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

/// The transitions from `prev` to `new` of one workload's engine status. With no `prev` (first
/// sight in this controller's life, possibly a resumed rollout) nothing is reported: a restart
/// must not repeat Events of the previous life.
pub(crate) fn transitions(
    prev: Option<&WorkloadStatus>,
    new: &WorkloadStatus,
    threshold: Option<FailureThresholdSpec>,
) -> Vec<Transition> {
    let Some(prev) = prev else { return Vec::new() };
    let mut out = Vec::new();
    if new.version < prev.version {
        out.push(Transition {
            type_: EventType::Warning,
            reason: "RolledBack",
            note: format!(
                "rolled back from version {} to version {}: the nodes that got version {} return to version {}",
                prev.version, new.version, prev.version, new.version
            ),
        });
        return out;
    }
    // A new version starts from its first wave, progressing, within its deadline.
    let (prev_wave, prev_phase, prev_deadline) = if new.version > prev.version {
        (0, RolloutPhase::Progressing, false)
    } else {
        (prev.wave, prev.phase, prev.progress_deadline_exceeded)
    };
    if new.wave > prev_wave {
        out.push(Transition {
            type_: EventType::Normal,
            reason: "WaveAdvanced",
            note: format!(
                "version {} advanced to {}: {} of {} targeted nodes ready, {} failed",
                new.version,
                wave_of(new),
                new.ready,
                new.targeted,
                new.failed
            ),
        });
    }
    if new.phase != prev_phase {
        match new.phase {
            RolloutPhase::Complete => out.push(Transition {
                type_: EventType::Normal,
                reason: "RolloutComplete",
                note: format!(
                    "version {} rolled out through all {} waves: {} of {} targeted nodes ready",
                    new.version, new.waves, new.ready, new.targeted
                ),
            }),
            RolloutPhase::Halted => {
                let top = match new.failures.first() {
                    Some(f) => format!("; top reason ({} nodes): {}", f.count, f.reason),
                    None => String::new(),
                };
                out.push(Transition {
                    type_: EventType::Warning,
                    reason: "RolloutHalted",
                    note: format!(
                        "version {} halted at {}: {} nodes failed (threshold {}){top}. Fix the spec and apply a new \
                         version, or set spec.rollout.rollback: true",
                        new.version,
                        wave_of(new),
                        new.failed,
                        threshold_text(threshold)
                    ),
                });
            }
            RolloutPhase::Progressing | RolloutPhase::Paused => {}
        }
    }
    // Reported once per wave: the engine clears the flag when the wave changes.
    if new.progress_deadline_exceeded && (!prev_deadline || new.wave != prev_wave) {
        out.push(Transition {
            type_: EventType::Warning,
            reason: "ProgressDeadlineExceeded",
            note: format!(
                "version {}: {} has not settled within spec.rollout.progressDeadlineSeconds ({} of {} targeted nodes \
                 ready, {} failed); the rollout keeps waiting: check the nodes' workloads with a NodeQuery",
                new.version,
                wave_of(new),
                new.ready,
                new.targeted,
                new.failed
            ),
        });
    }
    for t in &mut out {
        t.note = truncate(std::mem::take(&mut t.note));
    }
    out
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
    use kole_core::engine::FailureSummary;
    use kole_core::model::{NodeName, WorkloadId};

    fn st(version: u64, wave: u32, phase: RolloutPhase) -> WorkloadStatus {
        WorkloadStatus {
            id: WorkloadId::new("edge/cdn").unwrap(),
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

    fn reasons(t: &[Transition]) -> Vec<&'static str> {
        t.iter().map(|t| t.reason).collect()
    }

    #[test]
    fn first_sight_reports_nothing() {
        assert!(transitions(None, &st(1, 3, RolloutPhase::Complete), None).is_empty());
    }

    #[test]
    fn wave_advance_and_completion_are_normal() {
        let t = transitions(Some(&st(1, 0, RolloutPhase::Progressing)), &st(1, 1, RolloutPhase::Progressing), None);
        assert_eq!(reasons(&t), ["WaveAdvanced"]);
        assert_eq!(t[0].type_, EventType::Normal);
        assert!(t[0].note.contains("version 1 advanced to wave 2 of 4"), "{}", t[0].note);
        let t = transitions(Some(&st(1, 2, RolloutPhase::Progressing)), &st(1, 3, RolloutPhase::Complete), None);
        assert_eq!(reasons(&t), ["WaveAdvanced", "RolloutComplete"]);
        assert!(t.iter().all(|t| t.type_ == EventType::Normal));
        // Nothing changed that matters: no Event.
        let mut more_ready = st(1, 3, RolloutPhase::Complete);
        more_ready.ready = 40;
        assert!(transitions(Some(&st(1, 3, RolloutPhase::Complete)), &more_ready, None).is_empty());
    }

    #[test]
    fn halt_says_where_why_and_what_to_do() {
        let mut halted = st(2, 1, RolloutPhase::Halted);
        halted.failed = 3;
        halted.failures = vec![FailureSummary {
            reason: "exec /x: No such file or directory".into(),
            count: 2,
            sample_nodes: vec![NodeName::new("edge-0001").unwrap()],
        }];
        let t = transitions(
            Some(&st(2, 1, RolloutPhase::Progressing)),
            &halted,
            Some(FailureThresholdSpec { count: Some(1), percent: None }),
        );
        assert_eq!(reasons(&t), ["RolloutHalted"]);
        assert_eq!(t[0].type_, EventType::Warning);
        assert!(
            t[0].note.starts_with(
                "version 2 halted at wave 2 of 4: 3 nodes failed (threshold 1); top reason (2 nodes): exec /x: No such file"
            ),
            "{}",
            t[0].note
        );
        assert!(t[0].note.contains("spec.rollout.rollback"));
    }

    #[test]
    fn rollback_is_a_warning_and_nothing_else() {
        let t = transitions(Some(&st(2, 1, RolloutPhase::Halted)), &st(1, 3, RolloutPhase::Complete), None);
        assert_eq!(reasons(&t), ["RolledBack"]);
        assert_eq!(t[0].type_, EventType::Warning);
        assert!(t[0].note.starts_with("rolled back from version 2 to version 1"));
    }

    #[test]
    fn a_new_version_starts_from_its_first_wave() {
        let t = transitions(Some(&st(1, 3, RolloutPhase::Complete)), &st(2, 0, RolloutPhase::Progressing), None);
        assert!(t.is_empty(), "{t:?}");
        let t = transitions(Some(&st(1, 3, RolloutPhase::Complete)), &st(2, 1, RolloutPhase::Progressing), None);
        assert_eq!(reasons(&t), ["WaveAdvanced"]);
    }

    #[test]
    fn progress_deadline_is_reported_once_per_wave() {
        let mut late = st(1, 1, RolloutPhase::Progressing);
        late.progress_deadline_exceeded = true;
        let t = transitions(Some(&st(1, 1, RolloutPhase::Progressing)), &late, None);
        assert_eq!(reasons(&t), ["ProgressDeadlineExceeded"]);
        assert_eq!(t[0].type_, EventType::Warning);
        assert!(transitions(Some(&late), &late, None).is_empty());
    }

    #[test]
    fn notes_fit_the_events_api() {
        let mut halted = st(1, 0, RolloutPhase::Halted);
        halted.failures = vec![FailureSummary { reason: "é".repeat(2000), count: 1, sample_nodes: vec![] }];
        let t = transitions(Some(&st(1, 0, RolloutPhase::Progressing)), &halted, None);
        assert!(t[0].note.len() <= MAX_NOTE_BYTES && t[0].note.ends_with("..."));
    }
}
