//! # kole-tests: the shared test kit
//!
//! Test support for every crate of the workspace, plus the cross-crate tests in `tests/`:
//!
//! - [`fixtures`] — the names, labels, workloads, registrations and the small node cache that
//!   integration tests used to copy, defined once.
//! - [`contract`] — one contract test per seam of `kole-core`: any implementation of
//!   [`SnapshotStore`](kole_core::snapshot::SnapshotStore),
//!   [`CloudTransport`](kole_core::transport::CloudTransport) /
//!   [`NodeTransport`](kole_core::transport::NodeTransport) or
//!   [`WorkloadRuntime`](kole_core::agent::WorkloadRuntime) runs the same checks against itself.
//! - [`bounded`] — every await of a test ends, or fails with a message.
//!
//! This is test support: its functions **panic** with a message saying what was expected when an
//! implementation breaks its contract or a fixture is misused, as test assertions do. Do not link
//! it into library or production code.
//!
//! A crate adds it as a dev-dependency and runs a contract against its own implementation:
//!
//! ```no_run
//! use kole_core::snapshot::MemorySnapshotStore;
//!
//! # async fn demo() {
//! kole_tests::contract::snapshot_store::check(async || MemorySnapshotStore::new()).await;
//! # }
//! ```
//!
//! Unit tests inside a crate's `src/` cannot use the kit (it depends on `kole-core`; a
//! dev-dependency back on it would give those tests a second copy of every type), so they keep
//! their own small helpers.

pub mod contract;
pub mod fixtures;

use std::future::Future;
use std::time::Duration;

/// Runs `f` for at most `limit`; panics naming `what` when it takes longer.
pub async fn bounded<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}
