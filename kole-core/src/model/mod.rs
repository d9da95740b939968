//! The domain model: nodes, labels, selectors, workloads, digests and time.

mod digest;
mod labels;
mod name;
mod node;
mod selector;
#[cfg(test)]
mod selector_props;
mod workload;

use serde::{Deserialize, Serialize};

pub use digest::{DesiredDigest, mix64, stable_hash};
pub use labels::{
    LabelLookup, Labels, LabelsView, MAX_LABEL_NAME_LEN, MAX_LABEL_PREFIX_LEN, validate_label_key, validate_label_value,
};
pub(crate) use labels::{RawPairs, encode_pairs, take_len};
pub use name::{MAX_NODE_NAME_LEN, NodeName, validate_node_name};
pub use node::{NodeHealth, NodeInfo, NodePhase, NodeRecord, NodeRegistration, WorkloadPhase, WorkloadState};
pub use selector::{LabelSelector, LabelSelectorRequirement, Requirement, RequirementOp, Selector, SelectorOperator};
pub use workload::{
    DEFAULT_PROGRESS_DEADLINE_S, DeliveryMode, FailureThreshold, MAX_WORKLOAD_ID_LEN, RolloutStrategy, Workload,
    WorkloadId, wave_point, wave_point_seeded, wave_seed,
};

#[allow(unused_imports)]
pub use name::truncate_for_error;

/// A point in time: milliseconds since the Unix epoch, on the caller's clock.
///
/// The core never reads a clock: drivers pass `now` in, simulations pass virtual time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `ms` milliseconds since the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// Whole seconds since the epoch, saturated to `u32` (the cache's storage unit; good until 2106).
    pub fn as_secs_u32(self) -> u32 {
        u32::try_from(self.0 / 1000).unwrap_or(u32::MAX)
    }

    /// The timestamp of a whole second.
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs * 1000)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }
}

/// An input that breaks one of the model's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A node name breaks the rules of [`NodeName`].
    #[error("invalid node name {name:?}: {reason}")]
    NodeName {
        /// The offending name (truncated).
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A label key breaks Kubernetes' rules.
    #[error("invalid label key {key:?}: {reason}")]
    LabelKey {
        /// The offending key (truncated).
        key: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A label value breaks Kubernetes' rules.
    #[error("invalid label value {value:?}: {reason}")]
    LabelValue {
        /// The offending value (truncated).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A selector requirement is malformed.
    #[error("invalid selector requirement on key {key:?}: {reason}")]
    Selector {
        /// The requirement's key.
        key: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A selector string does not parse.
    #[error("cannot parse label selector {input:?} at byte {position}: {reason}")]
    SelectorSyntax {
        /// The input (truncated).
        input: String,
        /// Byte offset of the problem.
        position: usize,
        /// What was expected.
        reason: &'static str,
    },
    /// A workload id is malformed.
    #[error("invalid workload id {id:?}: {reason}")]
    WorkloadId {
        /// The offending id (truncated).
        id: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A rollout strategy is malformed.
    #[error("invalid rollout strategy: {reason}")]
    Rollout {
        /// The rule it breaks.
        reason: &'static str,
    },
}
