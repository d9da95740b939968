//! Failure reasons per workload: which nodes failed the workload, and why, as their status reports
//! said. Kept in the workload's rollout state (never in the per-node cache record) and bounded; the
//! aggregate is recomputed from the cache's reported states, so a node that recovers, moves to
//! another version or goes away stops counting at once.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::{NodeCache, Slot};
use crate::model::{NodeName, WorkloadPhase};

/// One of a workload's most common failure reasons, as [`super::WorkloadStatus::failures`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureSummary {
    /// The reason, as the nodes' runtime gave it (at most [`crate::protocol::MAX_REASON_BYTES`]).
    pub reason: String,
    /// How many nodes report the current version failed for this reason.
    pub count: u32,
    /// A few of those nodes (at most [`FailureReasons::SAMPLE_NODES`], smallest names first).
    pub sample_nodes: Vec<NodeName>,
}

/// The failed nodes of one workload with their reasons.
#[derive(Clone, Debug, Default)]
pub(crate) struct FailureReasons {
    /// Slot → (version that failed, reason). Reasons are shared between nodes.
    by_slot: HashMap<Slot, (u64, Arc<str>)>,
    /// Distinct reason texts, so a million nodes failing alike hold one copy.
    texts: HashMap<Arc<str>, ()>,
}

impl FailureReasons {
    /// Most reasons listed per workload.
    pub(crate) const TOP: usize = 5;
    /// Most sample node names per reason.
    pub(crate) const SAMPLE_NODES: usize = 3;

    /// Forgets `slot` (it reported again, re-registered or went away).
    pub(crate) fn forget(&mut self, slot: Slot) {
        self.by_slot.remove(&slot);
    }

    /// Records that `slot` failed `version` for `reason`, unless `cap` nodes are already tracked.
    pub(crate) fn record(&mut self, slot: Slot, version: u64, reason: &str, cap: usize) {
        if self.by_slot.len() >= cap && !self.by_slot.contains_key(&slot) {
            return;
        }
        let text = match self.texts.get_key_value(reason) {
            Some((t, _)) => Arc::clone(t),
            None => {
                // Drop texts no node holds any more before adding one, so they stay bounded too.
                if self.texts.len() >= cap {
                    self.gc();
                }
                let t: Arc<str> = Arc::from(reason);
                self.texts.insert(Arc::clone(&t), ());
                t
            }
        };
        self.by_slot.insert(slot, (version, text));
    }

    fn gc(&mut self) {
        self.texts.retain(|t, _| Arc::strong_count(t) > 1);
    }

    /// The top reasons among nodes whose reported state, per the cache, is still `Failed` at
    /// `version` of the workload named `workload`.
    pub(crate) fn summary(&self, cache: &NodeCache, workload: &str, version: u64) -> Vec<FailureSummary> {
        let Some(wid) = cache.string_id(workload) else { return Vec::new() };
        let mut by_reason: HashMap<&Arc<str>, (u32, Vec<&str>)> = HashMap::new();
        for (&slot, (v, text)) in &self.by_slot {
            if *v != version {
                continue;
            }
            let Some(name) = cache.name_of(slot) else { continue };
            let still_failed = cache.workload_set(cache.workload_set_of(slot)).iter().any(|&(w, sv, phase)| {
                w == wid && sv == version && WorkloadPhase::from_u8(phase) == Some(WorkloadPhase::Failed)
            });
            if !still_failed {
                continue;
            }
            let e = by_reason.entry(text).or_default();
            e.0 += 1;
            e.1.push(name);
        }
        let mut list: Vec<_> = by_reason.into_iter().collect();
        list.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(b.0)));
        list.truncate(Self::TOP);
        list.into_iter()
            .map(|(text, (count, mut names))| {
                names.sort_unstable();
                names.truncate(Self::SAMPLE_NODES);
                FailureSummary {
                    reason: text.to_string(),
                    count,
                    sample_nodes: names.into_iter().filter_map(|n| NodeName::new(n).ok()).collect(),
                }
            })
            .collect()
    }
}
