//! # kole-kube
//!
//! The Kubernetes side of kole: custom resources for workloads, node queries and snapshots, a
//! [`kole_core::snapshot::SnapshotStore`] on custom resources, the workload controller, the status
//! writer and leader election on a `coordination.k8s.io` Lease.
//!
//! **Status: skeleton.** The implementation is tracked by the issue "kole-kube: CRDs, snapshots on
//! the apiserver, rollout status, queries, leader election". It depends on kube-rs, which is not
//! pulled in until then to keep the workspace's build light.

/// The API group every kole custom resource belongs to.
pub const API_GROUP: &str = "kole.dev";
/// The API version of kole's custom resources.
pub const API_VERSION: &str = "v1alpha1";
