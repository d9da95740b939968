//! Per-workload status, aggregated from interned state, never by scanning nodes per heartbeat.

use crate::model::WorkloadId;

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
}
