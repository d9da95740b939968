//! The contract of [`WorkloadRuntime`]: what every runtime the agent drives must do.
//!
//! The trait is synchronous (the agent calls it from its event loop), so [`check`] is too; it polls
//! on the real clock, with every wait bounded. Each check below runs on a fresh runtime from the
//! caller's factory, with two specs the caller supplies in [`RuntimeSpecs`]:
//!
//! 1. **Start**: `apply` of a spec that runs returns `Running` or `Pending`, and `poll` reports
//!    `Running` within the bound, then nothing more while it keeps running.
//! 2. **Replace**: `apply` of a new version of the same workload replaces the old one and runs.
//! 3. **Stop**: `remove` stops and forgets it: `poll` never reports it again and `restart` returns
//!    `None`, as for a workload that was never applied.
//! 4. **Unknown workloads**: `remove` does nothing, `restart` returns `None`, `poll` reports
//!    nothing about them.
//! 5. **Failure**: `apply` of a spec that fails returns `Failed`, or `Pending` / `Running` and
//!    `poll` then reports `Failed` within the bound.
//!
//! `failure_reason` is `None` for a running workload and an unknown one (a runtime may or may not
//! know why a failed one failed).
//!
//! Throughout, `poll` reports a phase only when it *changed* since it was last reported (by
//! `apply`, `restart` or an earlier `poll`), and only for workloads the runtime was given.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kole_core::agent::WorkloadRuntime;
use kole_core::model::{NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};

use crate::fixtures;

/// Bound on a workload reaching a phase.
const PHASE_LIMIT: Duration = Duration::from_secs(10);

/// How long a running workload is watched for spurious reports.
const STEADY: Duration = Duration::from_millis(150);

/// The implementation-specific spec bytes the checks apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeSpecs {
    /// A spec that comes up and keeps running for at least a minute.
    pub runs: Vec<u8>,
    /// A spec whose start fails (or that fails right after starting, beyond its restart policy).
    pub fails: Vec<u8>,
}

/// Runs every check of the module documentation; `fresh` returns a new runtime each time.
/// Panics at the first broken rule.
pub fn check<R: WorkloadRuntime>(mut fresh: impl FnMut() -> R, specs: &RuntimeSpecs) {
    let specs = specs.clone();
    start_runs_then_stays_quiet(&mut Harness::new(fresh()), &specs);
    new_version_replaces(&mut Harness::new(fresh()), &specs);
    remove_stops_and_forgets(&mut Harness::new(fresh()), &specs);
    unknown_workloads_are_ignored(&mut Harness::new(fresh()));
    failing_start_is_reported_failed(&mut Harness::new(fresh()), &specs);
}

/// Check 1.
fn start_runs_then_stays_quiet<R: WorkloadRuntime>(h: &mut Harness<R>, specs: &RuntimeSpecs) {
    let w = workload("contract/web", 1, &specs.runs);
    let phase = h.apply(&w);
    assert!(matches!(phase, WorkloadPhase::Running | WorkloadPhase::Pending), "apply of a runnable spec: {phase:?}");
    h.until(&w.id, WorkloadPhase::Running);
    h.steady(&w.id, WorkloadPhase::Running);
    assert_eq!(h.runtime.failure_reason(&h.node, &w.id), None, "a failure reason for a running workload");
    h.remove(&w.id);
}

/// Check 2.
fn new_version_replaces<R: WorkloadRuntime>(h: &mut Harness<R>, specs: &RuntimeSpecs) {
    let v1 = workload("contract/web", 1, &specs.runs);
    h.apply(&v1);
    h.until(&v1.id, WorkloadPhase::Running);
    let v2 = workload("contract/web", 2, &specs.runs);
    let phase = h.apply(&v2);
    assert!(matches!(phase, WorkloadPhase::Running | WorkloadPhase::Pending), "apply of version 2: {phase:?}");
    h.until(&v2.id, WorkloadPhase::Running);
    h.steady(&v2.id, WorkloadPhase::Running);
    h.remove(&v2.id);
}

/// Check 3.
fn remove_stops_and_forgets<R: WorkloadRuntime>(h: &mut Harness<R>, specs: &RuntimeSpecs) {
    let w = workload("contract/web", 1, &specs.runs);
    h.apply(&w);
    h.until(&w.id, WorkloadPhase::Running);
    h.remove(&w.id);
    let restarted = h.runtime.restart(&h.node, &w.id, h.now());
    assert_eq!(restarted, None, "restart of a removed workload is None, as for an unknown one");
    h.steady_none();
}

/// Check 4.
fn unknown_workloads_are_ignored<R: WorkloadRuntime>(h: &mut Harness<R>) {
    let id = fixtures::workload_id("contract/never-applied");
    h.runtime.remove(&h.node, &id, h.now());
    assert_eq!(h.runtime.restart(&h.node, &id, h.now()), None, "restart of an unknown workload is None");
    assert_eq!(h.runtime.failure_reason(&h.node, &id), None, "a failure reason for an unknown workload");
    h.steady_none();
}

/// Check 5.
fn failing_start_is_reported_failed<R: WorkloadRuntime>(h: &mut Harness<R>, specs: &RuntimeSpecs) {
    let w = workload("contract/broken", 1, &specs.fails);
    let phase = h.apply(&w);
    assert_ne!(phase, WorkloadPhase::Stopped, "a failing start is not Stopped");
    h.until(&w.id, WorkloadPhase::Failed);
    h.remove(&w.id);
}

fn workload(id: &str, version: u64, spec: &[u8]) -> Arc<Workload> {
    Arc::new(Workload { spec: spec.to_vec(), ..fixtures::workload(id, version, "", &[100]) })
}

/// A runtime under test with the phases it reported, checked on every report.
struct Harness<R> {
    runtime: R,
    node: NodeName,
    start: Instant,
    reported: HashMap<WorkloadId, WorkloadPhase>,
}

impl<R: WorkloadRuntime> Harness<R> {
    fn new(runtime: R) -> Self {
        Self { runtime, node: fixtures::node_name("edge-contract"), start: Instant::now(), reported: HashMap::new() }
    }

    /// Milliseconds since the check began, from 1.
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.start.elapsed().as_millis() as u64 + 1)
    }

    fn apply(&mut self, w: &Arc<Workload>) -> WorkloadPhase {
        let phase = self.runtime.apply(&self.node, w, self.now());
        self.reported.insert(w.id.clone(), phase);
        phase
    }

    fn remove(&mut self, id: &WorkloadId) {
        self.runtime.remove(&self.node, id, self.now());
        self.reported.remove(id);
    }

    /// One poll; every reported change must be a change of a known workload.
    fn poll(&mut self) {
        let mut changes = Vec::new();
        self.runtime.poll(&self.node, self.now(), &mut changes);
        for (id, phase) in changes {
            match self.reported.insert(id.clone(), phase) {
                None => panic!("poll reported {id} ({phase:?}), which was removed or never applied"),
                Some(last) if last == phase => panic!("poll reported {id} as {phase:?} again, unchanged"),
                Some(_) => {}
            }
        }
    }

    /// Polls until `id` was last reported in `phase`.
    fn until(&mut self, id: &WorkloadId, phase: WorkloadPhase) {
        let deadline = Instant::now() + PHASE_LIMIT;
        while self.reported.get(id) != Some(&phase) {
            assert!(
                Instant::now() < deadline,
                "{id} did not reach {phase:?} in {PHASE_LIMIT:?}: {:?}",
                self.reported.get(id)
            );
            std::thread::sleep(Duration::from_millis(5));
            self.poll();
        }
    }

    /// Polls for a while; `id` must stay in `phase`.
    fn steady(&mut self, id: &WorkloadId, phase: WorkloadPhase) {
        let end = Instant::now() + STEADY;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
            self.poll();
            assert_eq!(self.reported.get(id), Some(&phase), "{id} left {phase:?} by itself");
        }
    }

    /// Polls for a while with nothing known: nothing may be reported.
    fn steady_none(&mut self) {
        let end = Instant::now() + STEADY;
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
            self.poll();
        }
    }
}
