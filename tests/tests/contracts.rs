//! Every seam's contract (`kole_tests::contract`) run against the implementations in kole-core, and
//! against a deliberately broken implementation of each, which the contract must catch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kole_core::agent::{ProcessRuntime, ProcessRuntimeConfig, RecordingRuntime, WorkloadRuntime};
use kole_core::backoff::Backoff;
use kole_core::model::{NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};
use kole_core::runspec::{RestartPolicy, RunSpec};
use kole_core::snapshot::{DirSnapshotStore, Manifest, MemorySnapshotStore, SnapshotError, SnapshotStore};
use kole_core::transport::memory::{MemoryConfig, MemoryHub};
use kole_core::transport::{CloudTransport, NodeTransport};
use kole_tests::contract::runtime::RuntimeSpecs;
use kole_tests::contract::transport::TransportFleet;
use kole_tests::contract::{runtime, snapshot_store, transport};
use kole_tests::{bounded, fixtures};

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn memory_snapshot_store_keeps_the_contract() {
    bounded(LIMIT, "contract", snapshot_store::check(async || MemorySnapshotStore::new())).await;
}

#[tokio::test]
async fn dir_snapshot_store_keeps_the_contract() {
    let root = fixtures::scratch_dir("dir-contract");
    let mut n = 0;
    let fresh = async || {
        n += 1;
        DirSnapshotStore::open(root.join(n.to_string())).expect("open a directory store")
    };
    bounded(LIMIT, "contract", snapshot_store::check(fresh)).await;
    let _ = std::fs::remove_dir_all(&root);
}

/// A store that lists generations oldest first: the contract must notice.
#[derive(Debug, Default)]
struct OldestFirst(MemorySnapshotStore);

#[async_trait]
impl SnapshotStore for OldestFirst {
    async fn next_generation(&self) -> Result<u64, SnapshotError> {
        self.0.next_generation().await
    }
    async fn put_chunk(&self, generation: u64, index: u32, chunk: &[u8]) -> Result<(), SnapshotError> {
        self.0.put_chunk(generation, index, chunk).await
    }
    async fn commit(&self, manifest: &Manifest) -> Result<(), SnapshotError> {
        self.0.commit(manifest).await
    }
    async fn list_manifests(&self) -> Result<Vec<Manifest>, SnapshotError> {
        let mut m = self.0.list_manifests().await?;
        m.reverse();
        Ok(m)
    }
    async fn get_chunk(&self, generation: u64, index: u32) -> Result<Option<Vec<u8>>, SnapshotError> {
        self.0.get_chunk(generation, index).await
    }
    async fn prune(&self, keep: usize) -> Result<(), SnapshotError> {
        self.0.prune(keep).await
    }
}

#[tokio::test]
#[should_panic(expected = "newest first")]
async fn the_store_contract_catches_a_broken_store() {
    bounded(LIMIT, "contract", snapshot_store::check(async || OldestFirst::default())).await;
}

/// One `MemoryHub` per check.
struct HubFleet {
    hub: MemoryHub,
    /// The payload length the contract expects the hub to refuse.
    oversize: usize,
}

impl HubFleet {
    fn new(config: MemoryConfig) -> Self {
        Self { oversize: config.max_payload_bytes + 1, hub: MemoryHub::new(config) }
    }
}

#[async_trait]
impl TransportFleet for HubFleet {
    async fn cloud(&self) -> Arc<dyn CloudTransport> {
        Arc::new(self.hub.cloud().expect("the hub's cloud endpoint"))
    }
    async fn node(&self, name: &NodeName) -> Arc<dyn NodeTransport> {
        Arc::new(self.hub.connect(name.clone()).expect("a node endpoint"))
    }
    fn oversize_payload(&self) -> usize {
        self.oversize
    }
    fn quiet(&self) -> Duration {
        Duration::from_millis(30)
    }
}

#[tokio::test]
async fn memory_hub_keeps_the_transport_contract() {
    bounded(LIMIT, "contract", transport::check(async || HubFleet::new(MemoryConfig::default()))).await;
}

/// Told a limit below the hub's, the contract expects a refusal the hub does not give.
#[tokio::test]
#[should_panic(expected = "PayloadTooLarge")]
async fn the_transport_contract_catches_a_transport_without_a_limit() {
    let fresh = async || HubFleet { oversize: 1_000, ..HubFleet::new(MemoryConfig::default()) };
    bounded(LIMIT, "contract", transport::oversize_payloads_are_refused_whole(&fresh().await)).await;
}

fn recording() -> RecordingRuntime {
    let mut rt = RecordingRuntime::new();
    rt.outcome_with(|_, w| (w.spec == b"fail").then_some(WorkloadPhase::Failed));
    rt
}

fn recording_specs() -> RuntimeSpecs {
    RuntimeSpecs { runs: b"run".to_vec(), fails: b"fail".to_vec() }
}

#[test]
fn recording_runtime_keeps_the_contract() {
    runtime::check(recording, &recording_specs());
}

/// The process runtime's spec bytes for the contract.
fn process_spec(argv: &[&str], restart: RestartPolicy) -> Vec<u8> {
    let mut spec = RunSpec::process(argv.iter().copied());
    spec.restart = restart;
    spec.encode().expect("a valid spec")
}

#[test]
fn process_runtime_keeps_the_contract() {
    let root = fixtures::scratch_dir("process-contract");
    let mut n = 0;
    // A directory per runtime: one runtime takes over what another left in its directory.
    let mut fresh = || {
        n += 1;
        ProcessRuntime::new(ProcessRuntimeConfig {
            dir: root.join(n.to_string()),
            restart_backoff: Backoff::new(10, 40, 2.0),
            seed: 1,
            ..ProcessRuntimeConfig::default()
        })
    };
    let runs = process_spec(&["sleep", "60"], RestartPolicy::Always);
    // Fails after it started (exit 3, no restart), so the failure is reported by `poll`.
    let specs =
        RuntimeSpecs { runs: runs.clone(), fails: process_spec(&["/bin/sh", "-c", "exit 3"], RestartPolicy::Never) };
    runtime::check(&mut fresh, &specs);
    // A program that cannot start at all.
    let specs =
        RuntimeSpecs { runs: runs.clone(), fails: process_spec(&["/nonexistent/kole-contract"], RestartPolicy::Never) };
    runtime::check(&mut fresh, &specs);
    // Bytes that are not a runtime spec.
    let specs = RuntimeSpecs { runs, fails: b"sleep 60".to_vec() };
    runtime::check(&mut fresh, &specs);
    let _ = std::fs::remove_dir_all(&root);
}

/// A runtime that reports its workloads `Running` again on every poll.
struct Chatty(RecordingRuntime, Vec<WorkloadId>);

impl WorkloadRuntime for Chatty {
    fn apply(&mut self, node: &NodeName, workload: &Arc<Workload>, now: Timestamp) -> WorkloadPhase {
        self.1.push(workload.id.clone());
        self.0.apply(node, workload, now)
    }
    fn remove(&mut self, node: &NodeName, id: &WorkloadId, now: Timestamp) {
        self.0.remove(node, id, now);
    }
    fn restart(&mut self, node: &NodeName, id: &WorkloadId, now: Timestamp) -> Option<WorkloadPhase> {
        self.0.restart(node, id, now)
    }
    fn poll(&mut self, node: &NodeName, now: Timestamp, changes: &mut Vec<(WorkloadId, WorkloadPhase)>) {
        self.0.poll(node, now, changes);
        changes.extend(self.1.iter().map(|id| (id.clone(), WorkloadPhase::Running)));
    }
}

#[test]
#[should_panic(expected = "again, unchanged")]
fn the_runtime_contract_catches_a_runtime_that_repeats_itself() {
    runtime::check(|| Chatty(recording(), Vec::new()), &recording_specs());
}
