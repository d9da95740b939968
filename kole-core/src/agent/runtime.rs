//! The seam between the agent and whatever runs workloads on the node, and a recording
//! implementation for tests and simulation.
//!
//! The agent does not own its runtime: [`super::Agent::handle`] borrows one per call, so a
//! simulator drives a million agents against one shared runtime. That is why every method names
//! the node it acts for; a real runtime (one per node, e.g. [`super::ProcessRuntime`]) ignores it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::model::{NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};
use crate::protocol::NodeHealth;

/// Runs workloads on a node. Object-safe: the agent takes it as `&mut dyn WorkloadRuntime`.
///
/// Calls must not block for long: the agent calls them from its event loop. Starting something
/// slow (an image pull) returns [`WorkloadPhase::Pending`] and reports the outcome later through
/// [`WorkloadRuntime::poll`].
pub trait WorkloadRuntime: Send {
    /// Starts `workload` on `node`, replacing whatever version of it runs there, and returns its
    /// phase right after (e.g. `Running`, `Pending`, or `Failed` when the spec is unusable).
    fn apply(&mut self, node: &NodeName, workload: &Arc<Workload>, now: Timestamp) -> WorkloadPhase;

    /// Stops and forgets workload `id` on `node` (nothing happens if it does not run there).
    fn remove(&mut self, node: &NodeName, id: &WorkloadId, now: Timestamp);

    /// Restarts workload `id` on `node`; returns its new phase, or `None` when the phase does not
    /// change now (or the workload is unknown).
    fn restart(&mut self, node: &NodeName, id: &WorkloadId, now: Timestamp) -> Option<WorkloadPhase>;

    /// Appends to `changes` every workload of `node` whose phase changed since it was last
    /// reported (by `apply`, `restart` or an earlier `poll`), with its new phase.
    fn poll(&mut self, node: &NodeName, now: Timestamp, changes: &mut Vec<(WorkloadId, WorkloadPhase)>);

    /// Why workload `id` on `node` is `Failed`, in a line a person can act on (e.g. "exec
    /// /nonexistent: No such file or directory", "image pull failed: …"); `None` when it is not
    /// failed or the runtime cannot tell. The agent asks when it reports a `Failed` phase and sends
    /// the reason (bounded) in its status report. Default: `None`.
    fn failure_reason(&self, node: &NodeName, id: &WorkloadId) -> Option<String> {
        let _ = (node, id);
        None
    }

    /// Node-level health flags the runtime contributes to heartbeats (e.g.
    /// [`NodeHealth::DEGRADED`] when the container runtime is unreachable). Default: none.
    fn health(&self, node: &NodeName) -> NodeHealth {
        let _ = node;
        NodeHealth::OK
    }
}

/// One call a [`RecordingRuntime`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeCall {
    /// The node it was made for.
    pub node: NodeName,
    /// What was asked.
    pub op: RuntimeOp,
}

/// What a [`RuntimeCall`] asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeOp {
    /// [`WorkloadRuntime::apply`] of this version.
    Apply {
        /// The workload.
        id: WorkloadId,
        /// Its version.
        version: u64,
    },
    /// [`WorkloadRuntime::remove`].
    Remove {
        /// The workload.
        id: WorkloadId,
    },
    /// [`WorkloadRuntime::restart`].
    Restart {
        /// The workload.
        id: WorkloadId,
    },
}

type OutcomeFn = dyn Fn(&NodeName, &Workload) -> Option<WorkloadPhase> + Send;
type ReasonFn = dyn Fn(&NodeName, &WorkloadId) -> Option<String> + Send;

/// A runtime that runs nothing: by default every applied workload is `Running` at once.
///
/// - [`RecordingRuntime::new`] records every call (for assertions);
///   [`RecordingRuntime::instant`] records nothing and keeps no per-node state, so one instance
///   serves a million simulated agents for the cost of its rules.
/// - [`RecordingRuntime::set_outcome`] makes a chosen (workload, version) come up `Failed` or stay
///   `Pending` on every node; [`RecordingRuntime::outcome_with`] decides per node (e.g. "fails on
///   a tenth of the nodes", for rollout-halt tests).
/// - [`RecordingRuntime::fail_with`] makes a (workload, version) fail everywhere with a reason;
///   [`RecordingRuntime::reason_with`] gives reasons per node.
/// - [`RecordingRuntime::push_phase`] queues a later phase change that the node's next
///   [`WorkloadRuntime::poll`] reports (a crash, a pull that finished).
#[derive(Default)]
pub struct RecordingRuntime {
    record: bool,
    calls: Vec<RuntimeCall>,
    outcomes: Vec<(WorkloadId, u64, WorkloadPhase)>,
    outcome_fn: Option<Box<OutcomeFn>>,
    reasons: Vec<(WorkloadId, String)>,
    reason_fn: Option<Box<ReasonFn>>,
    queued: HashMap<NodeName, Vec<(WorkloadId, WorkloadPhase)>>,
}

impl fmt::Debug for RecordingRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingRuntime")
            .field("record", &self.record)
            .field("calls", &self.calls.len())
            .field("outcomes", &self.outcomes)
            .field("outcome_fn", &self.outcome_fn.is_some())
            .field("reasons", &self.reasons)
            .field("reason_fn", &self.reason_fn.is_some())
            .field("queued_nodes", &self.queued.len())
            .finish()
    }
}

impl RecordingRuntime {
    /// A runtime that records every call.
    pub fn new() -> Self {
        Self { record: true, ..Self::default() }
    }

    /// A runtime that records nothing: workloads are `Running` at once unless a rule says
    /// otherwise.
    pub fn instant() -> Self {
        Self::default()
    }

    /// Every applied `(id, version)` comes up in `phase` (e.g. `Failed`, `Pending`) on every node.
    pub fn set_outcome(&mut self, id: WorkloadId, version: u64, phase: WorkloadPhase) -> &mut Self {
        self.outcomes.retain(|(i, v, _)| !(*i == id && *v == version));
        self.outcomes.push((id, version, phase));
        self
    }

    /// Decides the phase of each apply: `Some(phase)` overrides, `None` falls back to the
    /// [`set_outcome`](Self::set_outcome) rules and then to `Running`.
    pub fn outcome_with(
        &mut self,
        f: impl Fn(&NodeName, &Workload) -> Option<WorkloadPhase> + Send + 'static,
    ) -> &mut Self {
        self.outcome_fn = Some(Box::new(f));
        self
    }

    /// Every applied `(id, version)` comes up `Failed` on every node, and
    /// [`WorkloadRuntime::failure_reason`] of `id` says `reason`.
    pub fn fail_with(&mut self, id: WorkloadId, version: u64, reason: impl Into<String>) -> &mut Self {
        self.set_outcome(id.clone(), version, WorkloadPhase::Failed);
        self.reasons.retain(|(i, _)| *i != id);
        self.reasons.push((id, reason.into()));
        self
    }

    /// Decides [`WorkloadRuntime::failure_reason`] per node: `Some` overrides the
    /// [`fail_with`](Self::fail_with) rules.
    pub fn reason_with(&mut self, f: impl Fn(&NodeName, &WorkloadId) -> Option<String> + Send + 'static) -> &mut Self {
        self.reason_fn = Some(Box::new(f));
        self
    }

    /// Queues a phase change of workload `id` on `node`, reported by the node's next poll.
    pub fn push_phase(&mut self, node: &NodeName, id: WorkloadId, phase: WorkloadPhase) {
        self.queued.entry(node.clone()).or_default().push((id, phase));
    }

    /// The calls recorded so far, in order.
    pub fn calls(&self) -> &[RuntimeCall] {
        &self.calls
    }

    /// The calls recorded for one node, in order.
    pub fn calls_for(&self, node: &NodeName) -> Vec<RuntimeOp> {
        self.calls.iter().filter(|c| c.node == *node).map(|c| c.op.clone()).collect()
    }

    /// Takes the recorded calls, leaving none.
    pub fn take_calls(&mut self) -> Vec<RuntimeCall> {
        std::mem::take(&mut self.calls)
    }

    fn record(&mut self, node: &NodeName, op: impl FnOnce() -> RuntimeOp) {
        if self.record {
            self.calls.push(RuntimeCall { node: node.clone(), op: op() });
        }
    }
}

impl WorkloadRuntime for RecordingRuntime {
    fn apply(&mut self, node: &NodeName, workload: &Arc<Workload>, _now: Timestamp) -> WorkloadPhase {
        self.record(node, || RuntimeOp::Apply { id: workload.id.clone(), version: workload.version });
        if let Some(phase) = self.outcome_fn.as_ref().and_then(|f| f(node, workload)) {
            return phase;
        }
        self.outcomes
            .iter()
            .find(|(id, v, _)| *id == workload.id && *v == workload.version)
            .map_or(WorkloadPhase::Running, |(_, _, phase)| *phase)
    }

    fn remove(&mut self, node: &NodeName, id: &WorkloadId, _now: Timestamp) {
        self.record(node, || RuntimeOp::Remove { id: id.clone() });
        if let Some(q) = self.queued.get_mut(node) {
            q.retain(|(w, _)| w != id);
        }
    }

    fn restart(&mut self, node: &NodeName, id: &WorkloadId, _now: Timestamp) -> Option<WorkloadPhase> {
        self.record(node, || RuntimeOp::Restart { id: id.clone() });
        None
    }

    fn failure_reason(&self, node: &NodeName, id: &WorkloadId) -> Option<String> {
        if let Some(r) = self.reason_fn.as_ref().and_then(|f| f(node, id)) {
            return Some(r);
        }
        self.reasons.iter().find(|(i, _)| i == id).map(|(_, r)| r.clone())
    }

    fn poll(&mut self, node: &NodeName, _now: Timestamp, changes: &mut Vec<(WorkloadId, WorkloadPhase)>) {
        if self.queued.is_empty() {
            return;
        }
        if let Some(q) = self.queued.remove(node) {
            changes.extend(q);
        }
    }
}
