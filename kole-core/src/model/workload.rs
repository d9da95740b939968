//! Workloads: what the fleet should run.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::name::truncate_for_error;
use super::{Selector, ValidationError};

/// Longest workload id, in bytes (`namespace/name` of a Kubernetes object fits).
pub const MAX_WORKLOAD_ID_LEN: usize = 317;

/// A workload's identity: `namespace/name` when it comes from Kubernetes, or any name of
/// `[A-Za-z0-9._-]` segments with at most one `/`. The text is shared (`Arc<str>`), so ids cloned
/// into every topic, delivery and status cost a reference count, not an allocation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId(std::sync::Arc<str>);

impl Serialize for WorkloadId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl WorkloadId {
    /// Validates and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, ValidationError> {
        let id = id.into();
        let bad = |reason| ValidationError::WorkloadId { id: truncate_for_error(&id), reason };
        if id.is_empty() || id.len() > MAX_WORKLOAD_ID_LEN {
            return Err(bad("must be 1 to 317 bytes"));
        }
        let mut parts = 0;
        for part in id.split('/') {
            parts += 1;
            let b = part.as_bytes();
            if b.is_empty()
                || !b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                || !b[0].is_ascii_alphanumeric()
                || !b[b.len() - 1].is_ascii_alphanumeric()
            {
                return Err(bad("segments must be alphanumerics, '-', '_' or '.', starting and ending alphanumeric"));
            }
        }
        if parts > 2 {
            return Err(bad("may contain at most one '/'"));
        }
        Ok(Self(std::sync::Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for WorkloadId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// How a workload's spec reaches its nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// One retained message on the fleet-wide topic; agents select themselves (the default).
    #[default]
    Broadcast,
    /// One retained message on a group topic; agents subscribed to the group select themselves.
    Group(String),
    /// One message per targeted node, for specs that must not be broadcast (e.g. per-node secrets).
    PerNode,
}

/// When a rollout stops on failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureThreshold {
    /// Halt when more than this many nodes of the rollout have failed.
    Count(u32),
    /// Halt when more than this share of the nodes reached so far have failed, in percent (0–100).
    Percent(u8),
}

impl Default for FailureThreshold {
    fn default() -> Self {
        Self::Percent(5)
    }
}

/// Staged rollout of a new workload version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RolloutStrategy {
    /// Cumulative percentages of targeted nodes per wave, increasing, ending at 100.
    /// A node is in wave *i* when `wave_point(node, workload) < waves[i]` (see [`wave_point`]).
    pub waves: Vec<u8>,
    /// When true, the rollout holds at its current wave.
    pub paused: bool,
    /// When a wave's failures halt the rollout.
    pub failure_threshold: FailureThreshold,
    /// How long a wave may go without settling (every online node of the reached waves running
    /// the new version, or failed within the threshold) before the rollout reports
    /// `ProgressDeadlineExceeded`, in seconds; like a Deployment's `progressDeadlineSeconds`, the
    /// rollout keeps waiting. Only the controller uses it: it is not on the wire, and a decoded
    /// workload carries the default. Default 600.
    pub progress_deadline_s: u32,
}

/// Default of [`RolloutStrategy::progress_deadline_s`], in seconds.
pub const DEFAULT_PROGRESS_DEADLINE_S: u32 = 600;

impl Default for RolloutStrategy {
    /// All at once: one wave of 100%.
    fn default() -> Self {
        Self {
            waves: vec![100],
            paused: false,
            failure_threshold: FailureThreshold::default(),
            progress_deadline_s: DEFAULT_PROGRESS_DEADLINE_S,
        }
    }
}

impl RolloutStrategy {
    /// Checks that waves are strictly increasing percentages ending at 100.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let bad = |reason| Err(ValidationError::Rollout { reason });
        if self.waves.is_empty() || self.waves.len() > 100 {
            return bad("waves must hold 1 to 100 entries");
        }
        if self.waves.windows(2).any(|w| w[0] >= w[1]) || self.waves[0] == 0 {
            return bad("waves must be strictly increasing percentages above 0");
        }
        if self.waves.last() != Some(&100) {
            return bad("the last wave must be 100");
        }
        if let FailureThreshold::Percent(p) = self.failure_threshold
            && p > 100
        {
            return bad("failure threshold percent must be 0 to 100");
        }
        Ok(())
    }
}

/// Position of a node in a workload's rollout, in `0..10_000` (hundredths of a percent).
///
/// Deterministic in (node, workload) so agents compute their own wave from a broadcast spec.
/// Independent of the version, so a node in the first 1% stays a canary across versions.
pub fn wave_point(node: &str, workload: &WorkloadId) -> u16 {
    wave_point_seeded(wave_seed(workload), node.as_bytes())
}

/// The per-workload half of [`wave_point`], to hoist out of loops over many nodes.
pub fn wave_seed(workload: &WorkloadId) -> u64 {
    super::digest::stable_hash(0x7761_7665, workload.as_str().as_bytes())
}

/// [`wave_point`] with the workload's [`wave_seed`] precomputed.
#[inline]
pub fn wave_point_seeded(seed: u64, node: &[u8]) -> u16 {
    // `h % 10_000` is below 10_000, so it fits.
    (super::digest::stable_hash(seed, node) % 10_000) as u16
}

/// A workload: an opaque runtime spec, the nodes it targets, and how it rolls out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Identity.
    pub id: WorkloadId,
    /// Monotonic version (the Kubernetes `metadata.generation` of the spec).
    pub version: u64,
    /// The runtime spec, opaque to kole (container image, command line, config, …).
    pub spec: Vec<u8>,
    /// Nodes whose labels match run this workload.
    pub selector: Selector,
    /// How the spec is delivered.
    pub delivery: DeliveryMode,
    /// How a new version rolls out.
    pub rollout: RolloutStrategy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids() {
        for ok in ["default/cdn-cache", "log-shipper", "a.b_c/d-e"] {
            assert!(WorkloadId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b/c", "/a", "a/", "a b", "-a", "a#"] {
            assert!(WorkloadId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rollout_validation() {
        assert!(RolloutStrategy::default().validate().is_ok());
        let s = |w: &[u8]| RolloutStrategy { waves: w.to_vec(), ..Default::default() };
        assert!(s(&[1, 10, 50, 100]).validate().is_ok());
        assert!(s(&[10, 10, 100]).validate().is_err());
        assert!(s(&[0, 100]).validate().is_err());
        assert!(s(&[50]).validate().is_err());
        assert!(s(&[]).validate().is_err());
    }

    #[test]
    fn wave_points_spread_evenly() {
        let w = WorkloadId::new("default/app").unwrap();
        let mut buckets = [0u32; 10];
        for i in 0..100_000 {
            buckets[usize::from(wave_point(&format!("node-{i}"), &w) / 1000)] += 1;
        }
        assert!(buckets.iter().all(|&b| (9_000..11_000).contains(&b)), "{buckets:?}");
    }
}
