//! The fixtures integration tests share: names, labels, workloads, registrations, agent
//! identities, a small node cache and scratch directories.
//!
//! Every constructor panics on invalid input (a typo in a test), naming the value.

use std::path::PathBuf;
use std::sync::Arc;

use kole_core::agent::AgentIdentity;
use kole_core::cache::{NodeCache, StateCache};
use kole_core::model::{
    DesiredDigest, Labels, NodeInfo, NodeName, NodeRegistration, RolloutStrategy, Selector, Timestamp, Workload,
    WorkloadId, WorkloadPhase, WorkloadState,
};
use kole_core::transport::GroupName;

/// The labels of a CDN edge node in the east region, as the MQTT and fleet tests give their agents.
pub const CDN_EAST: [(&str, &str); 2] = [("tier", "cdn"), ("topology.kubernetes.io/region", "east")];

/// A node name.
pub fn node_name(name: &str) -> NodeName {
    NodeName::new(name).unwrap_or_else(|e| panic!("fixture node name {name:?}: {e}"))
}

/// A group name.
pub fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap_or_else(|e| panic!("fixture group name {name:?}: {e}"))
}

/// A workload id (`namespace/name`).
pub fn workload_id(id: &str) -> WorkloadId {
    WorkloadId::new(id).unwrap_or_else(|e| panic!("fixture workload id {id:?}: {e}"))
}

/// A label set.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels::from_pairs(pairs.iter().copied()).unwrap_or_else(|e| panic!("fixture labels {pairs:?}: {e}"))
}

/// A selector in `kubectl` syntax (`tier=cdn,env!=staging`).
pub fn selector(s: &str) -> Selector {
    Selector::parse(s).unwrap_or_else(|e| panic!("fixture selector {s:?}: {e}"))
}

/// Workload `id` at `version`, aimed at `selector`, rolled out in `waves` (percentages; `&[100]` is
/// the default "all at once"), with spec bytes `image:v{version}`.
pub fn workload(id: &str, version: u64, selector: &str, waves: &[u8]) -> Workload {
    Workload {
        id: workload_id(id),
        version,
        spec: format!("image:v{version}").into_bytes(),
        selector: self::selector(selector),
        delivery: Default::default(),
        rollout: RolloutStrategy { waves: waves.to_vec(), ..RolloutStrategy::default() },
    }
}

/// Static facts of a Linux node of `arch` running agent 0.1.0, without addresses.
pub fn node_info(arch: &str) -> NodeInfo {
    NodeInfo { arch: arch.into(), os: "linux".into(), agent_version: "0.1.0".into(), addresses: vec![] }
}

/// An agent's identity: `name` with `labels` and default (empty) node facts.
pub fn identity(name: &str, labels: &[(&str, &str)]) -> AgentIdentity {
    AgentIdentity { name: node_name(name), labels: Arc::new(self::labels(labels)), info: Arc::new(NodeInfo::default()) }
}

/// A registration of `name` with `labels`, an `arm64` node that runs each `(workload, version)` of
/// `workloads`, applied digest 1.
pub fn registration(name: &str, labels: &[(&str, &str)], workloads: &[(&str, u64)]) -> NodeRegistration {
    NodeRegistration {
        name: node_name(name),
        labels: self::labels(labels),
        info: node_info("arm64"),
        applied: DesiredDigest(1),
        workloads: workloads
            .iter()
            .map(|&(id, version)| WorkloadState { workload: workload_id(id), version, phase: WorkloadPhase::Running })
            .collect(),
    }
}

/// When [`small_cache`]'s nodes registered.
pub const SMALL_CACHE_NOW: Timestamp = Timestamp::from_secs(1_700_000_000);

/// A small reference cache: 12 nodes `edge-00` … `edge-11`, two tiers (`cdn`, `retail`) by parity,
/// three regions, two label sets' worth of workloads, registered at [`SMALL_CACHE_NOW`].
pub fn small_cache() -> NodeCache {
    let mut cache = NodeCache::new();
    for i in 0..12u32 {
        let tier = if i % 2 == 0 { "cdn" } else { "retail" };
        let region = ["east", "west", "south"][(i % 3) as usize];
        let runs: &[(&str, u64)] = if tier == "cdn" { &[("edge/cdn-cache", 3)] } else { &[] };
        let reg =
            registration(&format!("edge-{i:02}"), &[("tier", tier), ("topology.kubernetes.io/region", region)], runs);
        if let Err(e) = cache.register(&reg, i + 1, SMALL_CACHE_NOW) {
            panic!("small_cache: registering edge-{i:02}: {e}");
        }
    }
    cache
}

/// A scratch directory path under the system's temporary directory, unique per process and `tag`.
/// It does not exist on return (one left behind by an earlier run is removed); stores create it.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kole-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
