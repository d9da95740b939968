//! Per-workload status, aggregated from interned state, never by scanning nodes per heartbeat.

use std::collections::BTreeMap;

use crate::cache::NodeCache;
use crate::model::WorkloadId;

use super::Core;
use super::rollout::RolloutPhase;

/// Aggregated state of one workload across the fleet, as a status writer publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadStatus {
    /// The workload.
    pub id: WorkloadId,
    /// The version being rolled out (or run).
    pub version: u64,
    /// Nodes whose labels match the selector.
    pub targeted: u32,
    /// Nodes reporting the current version (any state).
    pub updated: u32,
    /// Nodes running the current version and healthy.
    pub ready: u32,
    /// Nodes reporting the current version failed.
    pub failed: u32,
    /// Nodes per reported version, ascending by version.
    pub by_version: Vec<(u64, u32)>,
    /// Index of the wave reached.
    pub wave: u32,
    /// Number of waves.
    pub waves: u32,
    /// Rollout phase.
    pub phase: RolloutPhase,
    /// The most common reasons nodes gave for failing the current version, most frequent first
    /// (at most 5, each with its count and up to 3 sample nodes).
    pub failures: Vec<super::FailureSummary>,
    /// The current wave went past the rollout's progress deadline without settling.
    pub progress_deadline_exceeded: bool,
}

impl Core {
    pub(super) fn statuses(&mut self, cache: &NodeCache) -> Vec<WorkloadStatus> {
        let mut targeted = vec![0u32; self.workloads.len()];
        let sets: Vec<u32> = cache.label_set_ids().collect();
        for set in sets {
            let members = cache.members_of(set).len() as u32;
            for &w in self.targets(cache, set) {
                targeted[w as usize] += members;
            }
        }
        let mut out = Vec::new();
        for (i, e) in self.workloads.iter().enumerate() {
            let Some(e) = e else { continue };
            let mut by_version: BTreeMap<u64, u32> = BTreeMap::new();
            let (mut updated, mut ready, mut failed) = (0, 0, 0);
            if let Some(w) = cache.string_id(e.current.id.as_str()) {
                for (_, items, refs) in cache.reported_workload_sets() {
                    for &(wid, version, phase) in items.iter() {
                        if wid != w {
                            continue;
                        }
                        *by_version.entry(version).or_default() += refs;
                        if version == e.current.version {
                            updated += refs;
                            match crate::model::WorkloadPhase::from_u8(phase) {
                                Some(crate::model::WorkloadPhase::Running) => ready += refs,
                                Some(crate::model::WorkloadPhase::Failed) => failed += refs,
                                _ => {}
                            }
                        }
                    }
                }
            }
            out.push(WorkloadStatus {
                id: e.current.id.clone(),
                version: e.current.version,
                targeted: targeted[i],
                updated,
                ready,
                failed,
                by_version: by_version.into_iter().collect(),
                wave: e.wave as u32,
                waves: e.current.rollout.waves.len() as u32,
                phase: e.phase,
                failures: e.failures.summary(cache, e.current.id.as_str(), e.current.version),
                progress_deadline_exceeded: e.deadline_exceeded,
            });
        }
        out
    }
}
