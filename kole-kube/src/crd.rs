//! kole's custom resources (`kole.dev/v1alpha1`): [`EdgeWorkload`], [`NodeQuery`],
//! [`SnapshotManifest`] and [`SnapshotChunk`].
//!
//! Validation is expressed as OpenAPI schema constraints (enums, patterns, minimums and maximums),
//! never as CEL rules, so the CRDs install and validate on every apiserver since 1.16 (CEL needs 1.25+).
//! What a schema cannot say (waves strictly increasing, a group name for group delivery) is checked by
//! the conversions in [`crate::convert`] and reported in the object's status.
//!
//! # Admission limits
//!
//! Every string, list and map of a spec has a schema limit no looser than what the agents decode
//! ([`DecodeLimits::default`], [`kole_core::runspec`]'s constants, Kubernetes' label rules), so the
//! apiserver refuses (HTTP 422, naming the field) what no agent could read. The numbers come from
//! kole-core's constants, not literals. Two things a per-field limit cannot say stay with the
//! controller, which reports them as `Accepted=False`: the spec's total encoded size
//! ([`DecodeLimits::max_spec_bytes`], [`DecodeLimits::max_message_bytes`]) and the selector's terms
//! counted across requirements and values ([`DecodeLimits::max_selector_terms`]). A schema's
//! `maxLength` counts characters while the agents count bytes, so non-ASCII text can pass the
//! schema and still be refused by the controller.

// kube-derive takes one `printcolumn(...)` per column; clippy mistakes the repeated `type_` for a duplicate.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    JSONSchemaPropsOrStringArray,
};
use kole_core::model::{MAX_LABEL_NAME_LEN, MAX_LABEL_PREFIX_LEN, MAX_NODE_NAME_LEN};
use kole_core::protocol::DecodeLimits;
use kole_core::runspec::{MAX_ARGV, MAX_ENV, MAX_IMAGE_LEN};
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The limits the agents decode with, which the schema's limits follow.
fn agents() -> DecodeLimits {
    DecodeLimits::default()
}

/// Longest label key: a DNS-1123 subdomain prefix, `/`, and a name (Kubernetes' rule).
pub const MAX_LABEL_KEY_LEN: usize = MAX_LABEL_PREFIX_LEN + 1 + MAX_LABEL_NAME_LEN;

/// A label key (Kubernetes' qualified name): an optional prefix of lowercase alphanumerics, `-` and
/// `.` (at most 253) and `/`, then a name of at most 63 alphanumerics, `-`, `_` and `.` that starts and
/// ends with an alphanumeric. The prefix's DNS rules in full are checked by the controller.
pub const LABEL_KEY_PATTERN: &str =
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

/// A label value: empty, or at most 63 alphanumerics, `-`, `_` and `.`, starting and ending with an
/// alphanumeric (Kubernetes' rule, as the agents check it).
pub const LABEL_VALUE_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";

/// `matchLabels`: each label is one requirement with one value, two selector terms, so at most half
/// the agents' terms; values follow the label value rule. (Structural schemas cannot constrain map
/// keys: the controller checks them.)
fn match_labels_limits(schema: &mut schemars::Schema) {
    schema.insert("maxProperties".into(), (agents().max_selector_terms / 2).into());
    if let Some(values) = schema.get_mut("additionalProperties").and_then(|v| v.as_object_mut()) {
        values.insert("maxLength".into(), MAX_LABEL_NAME_LEN.into());
        values.insert("pattern".into(), LABEL_VALUE_PATTERN.into());
    }
}

/// A label selector as written in a kole object: `matchLabels` and `matchExpressions`, with
/// Kubernetes' semantics (an empty selector selects every node).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectorSpec {
    /// `key: value` pairs, each equivalent to an `In` requirement with one value. At most 128.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = match_labels_limits)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements, ANDed. At most 256, and at most 256 requirements plus values in the
    /// whole selector (`matchLabels` count two each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = agents().max_selector_terms))]
    pub match_expressions: Vec<SelectorRequirementSpec>,
}

/// One `matchExpressions` entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SelectorRequirementSpec {
    /// The label key.
    #[schemars(length(min = 1, max = MAX_LABEL_KEY_LEN), regex(pattern = LABEL_KEY_PATTERN))]
    pub key: String,
    /// How the key's value is tested.
    pub operator: SelectorOperatorSpec,
    /// Values for `In` / `NotIn`; empty for `Exists` / `DoesNotExist`. At most 255 (with its
    /// requirement, the agents' 256 selector terms).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = agents().max_selector_terms - 1),
        inner(length(max = MAX_LABEL_NAME_LEN), regex(pattern = LABEL_VALUE_PATTERN))
    )]
    pub values: Vec<String>,
}

/// Operator of a selector requirement.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperatorSpec {
    /// The key is present with one of the values.
    In,
    /// The key is absent or its value is none of the values.
    NotIn,
    /// The key is present.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// What a node runs for a workload: a container (`image`, on agents started with a container
/// runtime) or a process (`command`, on agents started with `--runtime process`). Nodes receive it
/// as kole's runtime spec (`kole_core::runspec::RunSpec`, see docs/runtime.md).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// Container image, e.g. `registry.example/cdn-cache:1.4`: printable ASCII without spaces (as
    /// image references are), at most 512 bytes. Required by container runtimes; a process
    /// workload leaves it out and sets `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_IMAGE_LEN), regex(pattern = r"^[!-~]+$"))]
    pub image: Option<String>,
    /// Entry point: the program and its first arguments for a process; overrides the image's
    /// entry point for a container. At most 256 words with `args`; the runtime spec as a whole is at
    /// most 60 KiB (no single word can be larger, the controller checks the sum).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ARGV), inner(length(max = agents().max_spec_bytes)))]
    pub command: Vec<String>,
    /// Arguments, after `command`. At most 256 words with `command`, each within the runtime spec's
    /// 60 KiB (a `sh -c` script is one word).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ARGV), inner(length(max = agents().max_spec_bytes)))]
    pub args: Vec<String>,
    /// Environment variables (names unique; `KOLE_*` is reserved for the node's and the
    /// workload's identity). The workload sees only these, plus its identity. At most 256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENV))]
    pub env: Vec<EnvVar>,
    /// Working directory (an absolute path, at most 512 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = agents().max_string_len), regex(pattern = r"^/"))]
    pub working_dir: Option<String>,
    /// When to restart the workload after it exits. Default `Always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicySpec>,
    /// Restarts in a row before the node reports the workload failed. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub max_restarts: Option<u32>,
    /// Seconds between SIGTERM and SIGKILL when the workload stops. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3600))]
    pub stop_grace_period_seconds: Option<u32>,
    /// Free-form configuration handed to the workload: the runtime writes it to a file named by the
    /// workload's `KOLE_CONFIG_FILE`. At most 60 KiB, the agents' limit for the whole runtime spec,
    /// which the controller checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = agents().max_spec_bytes))]
    pub config: Option<String>,
}

/// One environment variable of a workload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct EnvVar {
    /// The name.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"))]
    pub name: String,
    /// The value (default empty), within the runtime spec's 60 KiB (the controller checks the sum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = agents().max_spec_bytes))]
    pub value: Option<String>,
}

/// When a workload that exited is started again.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartPolicySpec {
    /// After every exit (a service).
    #[default]
    Always,
    /// After an exit with a failure status.
    OnFailure,
    /// Never (a job).
    Never,
}

/// How a workload's spec reaches its nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeliveryModeSpec {
    /// One retained message on the fleet-wide topic; agents select themselves.
    #[default]
    Broadcast,
    /// One retained message on a group topic (`delivery.group`).
    Group,
    /// One message per targeted node (for specs that must not be broadcast).
    PerNode,
}

/// Delivery settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// The mode. Default `Broadcast`.
    #[serde(default)]
    pub mode: DeliveryModeSpec,
    /// The group, for `mode: Group` (e.g. `region.eu-west`), at most 128 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NODE_NAME_LEN), regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"))]
    pub group: Option<String>,
}

/// When a rollout halts on failures: `count` or `percent` (at most one; neither means 5%).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureThresholdSpec {
    /// Halt when more than this many nodes failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000_000))]
    pub count: Option<u32>,
    /// Halt when more than this share of the reached nodes failed (percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<u8>,
}

/// Staged rollout of new versions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Cumulative percentages of the targeted nodes per wave, strictly increasing, ending at 100.
    /// Default `[100]` (all at once).
    #[serde(default = "default_waves")]
    #[schemars(length(min = 1, max = 100), inner(range(min = 1, max = 100)))]
    pub waves: Vec<u8>,
    /// Hold the rollout at its current wave.
    #[serde(default)]
    pub paused: bool,
    /// When failures halt the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<FailureThresholdSpec>,
    /// Return every node to the previous version (applied once per spec generation).
    #[serde(default)]
    pub rollback: bool,
    /// Seconds a wave may go without settling before the `Progressing` condition turns `False`
    /// with reason `ProgressDeadlineExceeded` (the rollout keeps waiting, as a Deployment's does).
    /// Default 600.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: u32,
}

fn default_progress_deadline() -> u32 {
    kole_core::model::DEFAULT_PROGRESS_DEADLINE_S
}

fn default_waves() -> Vec<u8> {
    vec![100]
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            waves: default_waves(),
            paused: false,
            failure_threshold: None,
            rollback: false,
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

/// A workload for a fleet of edge nodes (KOLE's `KoleDaemonSet`): what runs, on which nodes (by
/// label selector), how it is delivered and how new versions roll out. No object per node: its
/// status aggregates the fleet.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kole.dev",
    version = "v1alpha1",
    kind = "EdgeWorkload",
    namespaced,
    status = "EdgeWorkloadStatus",
    shortname = "ew",
    category = "kole",
    derive = "PartialEq",
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.runtime.image"),
    printcolumn(name = "Targeted", type_ = "integer", json_path = ".status.targeted"),
    printcolumn(name = "Updated", type_ = "integer", json_path = ".status.updated"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.ready"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(name = "Wave", type_ = "integer", json_path = ".status.wave"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.rolloutPhase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct EdgeWorkloadSpec {
    /// What runs.
    pub runtime: RuntimeSpec,
    /// Which nodes run it; empty selects every node.
    #[serde(default)]
    pub selector: SelectorSpec,
    /// How the spec is delivered.
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// How a new version rolls out.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// Rollout phase as shown in status.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhaseSpec {
    /// Waves are being rolled out.
    #[default]
    Progressing,
    /// Held on request.
    Paused,
    /// Stopped on failures; resume or roll back.
    Halted,
    /// Every wave reached and healthy.
    Complete,
}

/// Nodes reporting one version.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct VersionCount {
    /// The version (the object's `metadata.generation` when it was applied).
    pub version: u64,
    /// Nodes reporting it.
    pub nodes: u32,
}

/// One of the most common reasons nodes gave for failing the current version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureReasonStatus {
    /// The reason, as the nodes' runtime gave it (at most 256 bytes).
    pub reason: String,
    /// Nodes reporting it.
    pub count: u32,
    /// A few of them (at most 3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sample_nodes: Vec<String>,
}

/// A Kubernetes-style condition.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`, `Progressing`, `Available` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// A human-readable message.
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
    /// The generation the condition was computed for.
    #[serde(default)]
    pub observed_generation: i64,
}

/// A spec as it was applied at one generation, kept so a restarted controller can resume a
/// rollout (nodes outside the reached waves keep the previous version).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct AppliedVersion {
    /// The generation.
    pub version: u64,
    /// The spec at that generation.
    pub spec: EdgeWorkloadSpec,
}

/// Aggregated fleet status of an [`EdgeWorkload`], written at a bounded rate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeWorkloadStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes whose labels match the selector.
    #[serde(default)]
    pub targeted: u32,
    /// Nodes reporting the current version.
    #[serde(default)]
    pub updated: u32,
    /// Nodes running the current version, healthy.
    #[serde(default)]
    pub ready: u32,
    /// Nodes reporting the current version failed.
    #[serde(default)]
    pub failed: u32,
    /// Nodes per reported version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_version: Vec<VersionCount>,
    /// The most common failure reasons of the current version, most frequent first (at most 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailureReasonStatus>,
    /// Index of the wave reached (0-based, as the engine persists it to resume a rollout).
    #[serde(default)]
    pub current_wave: u32,
    /// Number of the wave reached, counting from 1: what `kubectl get` prints and the
    /// `Progressing` condition says ("wave 2 of 3").
    #[serde(default)]
    pub wave: u32,
    /// Number of waves.
    #[serde(default)]
    pub waves: u32,
    /// Rollout phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_phase: Option<RolloutPhaseSpec>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Whether the current version's spec was already published (a restarted controller does not
    /// publish it again).
    #[serde(default)]
    pub published: bool,
    /// The version nodes outside the reached waves keep (and a rollback returns to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<AppliedVersion>,
    /// The version the engine runs (the spec at `observedGeneration`), so a controller that
    /// restarts after the object changed resumes the old rollout before starting the new one.
    /// After a rollback it is the version rolled back from, and `rolledBack` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<AppliedVersion>,
    /// Whether `current` was rolled back: the nodes run `previous`, and a restarted controller
    /// resumes that, not `current`. Always written, so a merge patch clears it.
    #[serde(default)]
    pub rolled_back: bool,
    /// The controller's signature (its downlink key, hex) over what a restarted controller resumes
    /// from (`current`, `previous`, `rolledBack`, `published`, `currentWave`, `rolloutPhase`) and the
    /// object's uid. A controller with a signing key resumes only from a status it signed, so write
    /// access to `edgeworkloads/status` cannot make it send a spec nobody applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_signature: Option<String>,
}

/// Node phase filter of a [`NodeQuery`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodePhaseSpec {
    /// Known, not yet registered in this controller's life.
    Registering,
    /// Heartbeating.
    Online,
    /// Missed too many heartbeats.
    Offline,
}

/// Health filter of a [`NodeQuery`], on the flags of each node's last heartbeat.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodeHealthSpec {
    /// No flag set.
    Healthy,
    /// Any flag set.
    Unhealthy,
    /// The agent has a problem of its own (e.g. its container runtime is unreachable).
    Degraded,
    /// At least one workload failed.
    WorkloadFailed,
    /// At least one workload is pending.
    WorkloadPending,
    /// Short of disk, memory or PIDs.
    ResourcePressure,
    /// The node's clock is not synchronized.
    ClockUnsynced,
    /// The agent refused forged, unsigned or replayed downlink messages since its last heartbeat.
    DownlinkRefused,
}

/// A question about the fleet, answered from the controller's cache (KOLE's `KoleQuery`, done
/// right): by names, selector and phase, one bounded page at a time, with summary counts.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kole.dev",
    version = "v1alpha1",
    kind = "NodeQuery",
    namespaced,
    status = "NodeQueryStatus",
    shortname = "nq",
    category = "kole",
    derive = "PartialEq",
    printcolumn(name = "Matched", type_ = "integer", json_path = ".status.summary.matched"),
    printcolumn(name = "Online", type_ = "integer", json_path = ".status.summary.online"),
    printcolumn(name = "Offline", type_ = "integer", json_path = ".status.summary.offline"),
    printcolumn(name = "Returned", type_ = "integer", json_path = ".status.returned"),
    printcolumn(name = "Answered", type_ = "date", json_path = ".status.answeredAt")
)]
#[serde(rename_all = "camelCase")]
pub struct NodeQuerySpec {
    /// Only these nodes (still filtered by selector and phase); empty means all. At most 1000
    /// names of at most 128 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(min = 1, max = MAX_NODE_NAME_LEN)))]
    pub names: Vec<String>,
    /// Label selector; absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorSpec>,
    /// Only nodes in this phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<NodePhaseSpec>,
    /// Only nodes whose last heartbeat's health passes: `Healthy`, `Unhealthy`, or one flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<NodeHealthSpec>,
    /// Page size. Default 100.
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: u32,
    /// The `continue` token of a previous answer's status, for the next page.
    #[serde(default, rename = "continue", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 10), regex(pattern = r"^[0-9]+$"))]
    pub continue_: Option<String>,
    /// Seconds after its creation the query is deleted. Default 3600.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 1, max = 604_800))]
    pub ttl_seconds: u32,
    /// Change this value to have the query answered again with fresh data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub refresh: Option<String>,
}

fn default_limit() -> u32 {
    100
}

fn default_ttl() -> u32 {
    3600
}

/// Per-workload state of a node in a query answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct NodeWorkloadItem {
    /// The workload (`namespace/name`).
    pub workload: String,
    /// The version the node runs.
    pub version: u64,
    /// `Pending`, `Running`, `Failed` or `Stopped`.
    pub phase: String,
}

/// One node in a query answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeItem {
    /// The node's name.
    pub name: String,
    /// `Registering`, `Online` or `Offline`.
    pub phase: String,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// When the controller last heard from it (RFC 3339).
    pub last_seen: String,
    /// CPU architecture.
    pub arch: String,
    /// Operating system.
    pub os: String,
    /// Agent version.
    pub agent_version: String,
    /// Addresses, primary first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Health flags of its last heartbeat (`Degraded`, `WorkloadFailed`, `WorkloadPending`,
    /// `ResourcePressure`, `ClockUnsynced`, `DownlinkRefused`); empty when healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<String>,
    /// Workloads it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<NodeWorkloadItem>,
}

/// Counts of every node matching the names and selector (all pages, any phase).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct QuerySummary {
    /// Matching nodes.
    pub matched: u64,
    /// Of those, online.
    pub online: u64,
    /// Of those, offline.
    pub offline: u64,
    /// Of those, registering.
    pub registering: u64,
}

/// The answer to a [`NodeQuery`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeQueryStatus {
    /// The generation answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The `refresh` value answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_refresh: Option<String>,
    /// When it was answered (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_at: Option<String>,
    /// The page of matching nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<NodeItem>,
    /// Number of items on this page.
    #[serde(default)]
    pub returned: u32,
    /// Summary counts.
    #[serde(default)]
    pub summary: QuerySummary,
    /// Put this in `spec.continue` for the next page; absent on the last page.
    #[serde(default, rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_: Option<String>,
    /// Why the query could not be answered (an invalid selector or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Bytes stored base64-encoded in JSON (OpenAPI `type: string, format: byte`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Base64Bytes(pub Vec<u8>);

impl Serialize for Base64Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Base64Bytes)
            .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Base64Bytes {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Base64Bytes".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "format": "byte" })
    }
}

/// One complete generation, as recorded in a [`SnapshotManifest`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotGeneration {
    /// Generation number.
    pub generation: u64,
    /// Nodes in it.
    pub node_count: u64,
    /// Chunk objects in it.
    pub chunk_count: u32,
    /// Stored bytes, all chunks.
    pub total_bytes: u64,
    /// When it was taken (milliseconds since the epoch).
    pub created_at_ms: u64,
    /// kole's encoded manifest (magic, version, body, CRC-32), verified on read.
    pub manifest: Base64Bytes,
}

/// The list of complete snapshot generations of one store, newest first. Replacing it (with a
/// `resourceVersion` precondition) is what makes a generation exist.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kole.dev",
    version = "v1alpha1",
    kind = "SnapshotManifest",
    namespaced,
    shortname = "ksm",
    category = "kole",
    derive = "PartialEq",
    printcolumn(name = "Latest", type_ = "integer", json_path = ".spec.latestGeneration"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".spec.latestNodeCount"),
    printcolumn(name = "Chunks", type_ = "integer", json_path = ".spec.latestChunkCount"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotManifestSpec {
    /// The newest complete generation (0 when none).
    #[serde(default)]
    pub latest_generation: u64,
    /// Nodes in the newest generation.
    #[serde(default)]
    pub latest_node_count: u64,
    /// Chunks in the newest generation.
    #[serde(default)]
    pub latest_chunk_count: u32,
    /// Complete generations, newest first.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub generations: Vec<SnapshotGeneration>,
}

/// One chunk of one snapshot generation: a header-framed, compressed slice of the cache, at most
/// 768 KiB before base64.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kole.dev",
    version = "v1alpha1",
    kind = "SnapshotChunk",
    namespaced,
    shortname = "ksc",
    category = "kole",
    derive = "PartialEq",
    printcolumn(name = "Generation", type_ = "integer", json_path = ".spec.generation"),
    printcolumn(name = "Index", type_ = "integer", json_path = ".spec.index"),
    printcolumn(name = "Bytes", type_ = "integer", json_path = ".spec.bytes"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotChunkSpec {
    /// The generation it belongs to.
    pub generation: u64,
    /// Its index in the generation.
    pub index: u32,
    /// Stored bytes (before base64).
    pub bytes: u32,
    /// The chunk: kole's chunk header and compressed payload.
    pub data: Base64Bytes,
}

/// Every kole CRD, in a stable order, with schemas a current apiserver accepts without warnings (see
/// [`kubernetes_schema`]). Install these rather than `EdgeWorkload::crd()` and the like, which are
/// kube-derive's raw output.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![EdgeWorkload::crd(), NodeQuery::crd(), SnapshotManifest::crd(), SnapshotChunk::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
                kubernetes_schema(schema);
            }
        }
    }
    crds
}

/// Rewrites a kind's schema, as generated by schemars and kube-derive, into what Kubernetes knows.
///
/// - Integer formats: schemars writes `uint8`, `uint32`, ... for Rust's unsigned integers; apiservers
///   since 1.3x warn `unrecognized format` and none enforce them. They become `int32` or `int64` with
///   the Rust type's range as `minimum`/`maximum` (kept when an attribute already narrowed it). `u64`
///   becomes `int64` with `minimum: 0` and no `maximum`: Kubernetes stores int64, so its own limit
///   (2^63 - 1, which an `f64` bound cannot state exactly) applies.
/// - The kind's description: kube-derive writes a placeholder ("Auto-generated derived type for ...");
///   it becomes the spec type's doc, which is the kind's.
/// - Descriptions: doc comments are wrapped at the source's line width; `kubectl explain` shows those
///   breaks, so each paragraph is joined into one line (paragraphs stay apart).
pub fn kubernetes_schema(root: &mut JSONSchemaProps) {
    let spec_doc = root.properties.as_ref().and_then(|p| p.get("spec")).and_then(|s| s.description.clone());
    if let Some(doc) = spec_doc {
        root.description = Some(doc);
    }
    walk_schema(root);
}

fn walk_schema(s: &mut JSONSchemaProps) {
    if let Some(d) = s.description.as_mut() {
        *d = one_line_paragraphs(d);
    }
    if s.type_.as_deref() == Some("integer") {
        integer_format(s);
    }
    let maps = [s.properties.as_mut(), s.pattern_properties.as_mut(), s.definitions.as_mut()];
    for child in maps.into_iter().flatten().flat_map(|m| m.values_mut()) {
        walk_schema(child);
    }
    let lists = [s.all_of.as_mut(), s.any_of.as_mut(), s.one_of.as_mut()];
    for child in lists.into_iter().flatten().flat_map(|v| v.iter_mut()) {
        walk_schema(child);
    }
    if let Some(not) = s.not.as_mut() {
        walk_schema(not);
    }
    match s.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(child)) => walk_schema(child),
        Some(JSONSchemaPropsOrArray::Schemas(children)) => children.iter_mut().for_each(walk_schema),
        None => {}
    }
    for child in [s.additional_properties.as_mut(), s.additional_items.as_mut()].into_iter().flatten() {
        if let JSONSchemaPropsOrBool::Schema(child) = child {
            walk_schema(child);
        }
    }
    for child in s.dependencies.iter_mut().flat_map(|m| m.values_mut()) {
        if let JSONSchemaPropsOrStringArray::Schema(child) = child {
            walk_schema(child);
        }
    }
}

/// The Kubernetes format and bounds of one of schemars' integer formats.
fn integer_format(s: &mut JSONSchemaProps) {
    let (format, min, max): (&str, f64, Option<f64>) = match s.format.as_deref() {
        Some("uint8") => ("int32", 0.0, Some(f64::from(u8::MAX))),
        Some("uint16") => ("int32", 0.0, Some(f64::from(u16::MAX))),
        Some("uint32") => ("int64", 0.0, Some(f64::from(u32::MAX))),
        Some("uint64" | "uint") => ("int64", 0.0, None),
        Some("int8") => ("int32", f64::from(i8::MIN), Some(f64::from(i8::MAX))),
        Some("int16") => ("int32", f64::from(i16::MIN), Some(f64::from(i16::MAX))),
        Some("int" | "int64") => {
            s.format = Some("int64".to_owned());
            return;
        }
        _ => return,
    };
    s.format = Some(format.to_owned());
    s.minimum = Some(s.minimum.map_or(min, |m| m.max(min)));
    if let Some(max) = max {
        s.maximum = Some(s.maximum.map_or(max, |m| m.min(max)));
    }
}

/// Joins the lines of each paragraph (paragraphs are separated by a blank line) with single spaces.
fn one_line_paragraphs(text: &str) -> String {
    text.split("\n\n")
        .map(|para| para.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "))
        .filter(|para| !para.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Every kole CRD as `(file name, YAML)`, as checked in under `deploy/crds/`.
pub fn rendered_crds() -> Vec<(String, String)> {
    all_crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let value = serde_json::to_value(&crd).unwrap_or_default();
            let header = "# Generated from kole-kube's Rust types; do not edit.\n\
                          # Regenerate: cargo run -p kole-kube --example gen-crds\n";
            (format!("{name}.yaml"), format!("{header}{}", crate::yaml::to_yaml(&value)))
        })
        .collect()
}
