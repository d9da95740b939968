//! One contract test per seam of `kole-core`.
//!
//! Each module holds a `check` function that takes a factory of the implementation under test and
//! asserts what the seam's trait documents, so every implementation — the in-memory ones of
//! `kole-core`, the directory store, MQTT, custom resources, a process runtime — is held to the
//! same rules:
//!
//! | seam | contract | run against |
//! |---|---|---|
//! | [`SnapshotStore`](kole_core::snapshot::SnapshotStore) | [`snapshot_store::check`] | memory and directory stores (`tests/tests/contracts.rs`), `KubeSnapshotStore` (`kole-kube/tests/contract.rs`, needs an apiserver) |
//! | [`CloudTransport`](kole_core::transport::CloudTransport) / [`NodeTransport`](kole_core::transport::NodeTransport) | [`transport::check`] | `MemoryHub` (`tests/tests/contracts.rs`), `MqttCloud` / `MqttNode` over the embedded broker (`kole-mqtt/tests/contract.rs`) |
//! | [`WorkloadRuntime`](kole_core::agent::WorkloadRuntime) | [`runtime::check`] | `RecordingRuntime`, `ProcessRuntime` (`tests/tests/contracts.rs`) |
//!
//! `tests/tests/contracts.rs` also runs each contract against a deliberately broken
//! implementation and expects it to fail, so a contract that stops checking is noticed.

pub mod runtime;
pub mod snapshot_store;
pub mod transport;
