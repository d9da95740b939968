//! # kole-kube
//!
//! The Kubernetes side of kole, on kube-rs: custom resources for workloads, node queries and
//! snapshots (group `kole.dev`, version `v1alpha1`), a [`kole_core::snapshot::SnapshotStore`] on
//! custom resources, the workload, status and query controllers, and Lease leader election.
//!
//! Entry points:
//! - [`crd`]: [`crd::EdgeWorkload`], [`crd::NodeQuery`], [`crd::SnapshotManifest`],
//!   [`crd::SnapshotChunk`] and [`crd::all_crds`] (the YAML in `deploy/crds/` is generated from them:
//!   `cargo run -p kole-kube --example gen-crds`);
//! - [`convert`]: an `EdgeWorkload` as a validated [`kole_core::model::Workload`], status from
//!   [`kole_core::engine::WorkloadStatus`];
//! - [`snapshot::KubeSnapshotStore`]: snapshot generations as `SnapshotChunk` objects plus one
//!   `SnapshotManifest` moved with a `resourceVersion` precondition;
//! - [`controller`]: [`controller::run_workload_controller`] (EdgeWorkload changes → engine
//!   commands, with a finalizer; driver events → coalesced, rate-bounded status writes) and
//!   [`controller::run_query_controller`] (NodeQuery answers from the cache);
//! - [`lease::LeaderElector`]: one active controller per fleet on a `coordination.k8s.io/v1` Lease;
//! - [`edgenodes::EdgeNodeServer`]: `kubectl get edgenodes`, an aggregated API
//!   (`edge.kole.dev/v1alpha1`) served from the cache, with no object per node.
//!
//! The assembled controller is the `kole-controller` example (`/healthz`, `/readyz`, `/metrics`);
//! `deploy/` holds the namespace, RBAC, CRDs and Deployment.
//!
//! This crate picks no `k8s-openapi` version feature: the binary or test that links it does
//! (kole's own tests use `v1_33`, the earliest of k8s-openapi 0.29; the resources themselves use only
//! APIs that exist since Kubernetes 1.16).
//!
//! ## TLS: pick a crypto provider
//!
//! kube's client speaks TLS through rustls, and this crate enables no rustls crypto provider (no
//! `ring` or `aws-lc-rs` feature of `kube`), so it never fights the application's choice. The
//! application picks one, either with a feature of its own `kube` dependency:
//!
//! ```toml
//! kube = { version = "5", default-features = false, features = ["client", "rustls-tls", "ring"] }
//! # or: features = ["client", "rustls-tls", "aws-lc-rs"]
//! ```
//!
//! or, when more than one provider is compiled in (rustls then refuses to guess and panics at the
//! first connection), by installing one before the first client is built:
//!
//! ```text
//! rustls::crypto::ring::default_provider().install_default().ok();
//! // or: rustls::crypto::aws_lc_rs::default_provider().install_default().ok();
//! ```
//!
//! kole's programs and tests use `ring`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kole_core::cache::StateCache;
//! use kole_core::snapshot::{RestoreLimits, SnapshotStore, restore_latest};
//! use kole_kube::snapshot::{KubeSnapshotConfig, KubeSnapshotStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = kube::Client::try_default().await?;
//! let store: Arc<dyn SnapshotStore> = Arc::new(KubeSnapshotStore::new(client, KubeSnapshotConfig::default()));
//! if let Some(restored) = restore_latest(store.as_ref(), &RestoreLimits::default()).await? {
//!     println!("{} nodes from generation {}", restored.cache.len(), restored.manifest.generation);
//! }
//! # Ok(()) }
//! ```

pub mod controller;
pub mod convert;
pub mod crd;
pub mod edgenodes;
mod error;
pub mod lease;
pub mod snapshot;
pub mod yaml;

pub use error::{Error, Result};

/// The API group every kole custom resource belongs to.
pub const API_GROUP: &str = "kole.dev";
/// The API version of kole's custom resources.
pub const API_VERSION: &str = "v1alpha1";
