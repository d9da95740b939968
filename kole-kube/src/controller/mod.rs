//! The workload controller (with its status writer) and the node query controller, one per file.
//!
//! - [`run_workload_controller`] (`workload.rs`) watches `EdgeWorkload` objects (kube-runtime's
//!   `Controller`) and turns their changes into [`WorkloadCommand`](kole_core::engine::WorkloadCommand)s
//!   for the engine driver. A finalizer makes deletion remove the workload from the nodes (a `Delete`
//!   command handed to the engine) before the object goes. A change of `rollout.paused` or
//!   `rollout.rollback` alone pauses, resumes or rolls back the current version instead of starting a
//!   new one.
//! - Beside it, its status writer (`status.rs`) takes the driver's
//!   [`DriverEvent`](kole_core::engine::driver::DriverEvent)s and writes each workload's latest status
//!   through the status subresource at most once per [`ControllerConfig::status_interval`]: changes
//!   in between are coalesced, so a rollout to a million nodes costs a few status writes, not a
//!   million. The rollout position goes into the status so a restarted controller resumes.
//! - The status writer also publishes a Kubernetes Event per rollout transition (`events.rs`), from
//!   the engine's events and, for a rollback, the engine's version going back: `WaveAdvanced`,
//!   `RolloutComplete` (Normal), `RolloutHalted`, `RolledBack`, `ProgressDeadlineExceeded`
//!   (Warning), reported by `kole-controller`. Publishing never delays or fails a status write.
//! - [`reconcile_retained_specs`] (`retained.rs`), once per leadership term, clears the retained
//!   specs of `EdgeWorkload`s deleted while no controller led.
//! - [`run_query_controller`] (`query.rs`) answers `NodeQuery` objects from the cache as soon as the
//!   watch delivers them, again when `spec.refresh` changes, and deletes them after `spec.ttlSeconds`.
//!
//! This module holds what they share: [`ControllerConfig`], [`FINALIZER`], the namespace-or-all
//! `Api`, the wall clock, and the workload controller's record of what it handed the engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kole_core::model::{Timestamp, WorkloadId};
use kube::{Api, Client};

use crate::crd::AppliedVersion;

mod events;
mod query;
mod retained;
mod status;
mod workload;

pub use query::{answer_query, run_query_controller};
pub use retained::{RetainedReconcile, reconcile_retained_specs};
pub use workload::run_workload_controller;

/// The finalizer kole puts on `EdgeWorkload` objects.
pub const FINALIZER: &str = "kole.dev/remove-from-nodes";

/// Settings of the controllers. A plain struct: change fields of [`Default::default`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Namespace watched; `None` watches all namespaces. Default `None`.
    pub namespace: Option<String>,
    /// Field manager of status writes. Default `kole-controller`.
    pub field_manager: String,
    /// Least time between two status writes of one workload. Default 2 s.
    pub status_interval: Duration,
    /// Requeue of a workload whose reconcile failed. Default 5 s.
    pub error_requeue: Duration,
    /// Most status writes in flight per flush. Default 16.
    pub status_concurrency: usize,
    /// The controller's signing key: statuses carry its signature over the rollout state, and a
    /// restarted controller resumes only from a status it signed (else it starts the object's
    /// spec over, with a warning). `None`: statuses are trusted as they are. Default `None`.
    pub status_key: Option<Arc<kole_core::protocol::seal::DownlinkSigner>>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            field_manager: "kole-controller".to_owned(),
            status_interval: Duration::from_secs(2),
            error_requeue: Duration::from_secs(5),
            status_concurrency: 16,
            status_key: None,
        }
    }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn now() -> Timestamp {
    kole_core::clock::wall_clock_now()
}

/// What the workload controller last handed the engine for one workload, read by its status writer.
///
/// Private to this module: [`run_workload_controller`] creates it and shares it with the status
/// writer it runs. It is not derivable from the engine's reports: the status persists each version
/// as the object's `EdgeWorkloadSpec` (the engine holds the model `Workload`: runtime bytes, a
/// normalized selector), and the controls are what was handed over, not the engine's phase (a
/// `Pause` leaves a complete or halted rollout as it is, a `Rollback` makes the previous version
/// current while this keeps the one rolled back from).
#[derive(Clone, Debug, Default)]
pub(crate) struct AppliedState {
    /// Current version and its spec.
    pub(crate) current: Option<AppliedVersion>,
    /// The version before it (nodes outside the reached waves keep it).
    pub(crate) previous: Option<AppliedVersion>,
    /// `rollout.paused` last handed over.
    pub(crate) paused: bool,
    /// `rollout.rollback` last handed over.
    pub(crate) rollback: bool,
    /// The engine was told to roll `current` back: it runs `previous` now. Cleared by a new version.
    pub(crate) rolled_back: bool,
    /// The object's `metadata.generation` last acted on: what the status's `observedGeneration`
    /// says. Not the engine's version: a pause or rollback edit is a new generation without a new
    /// version, and a rollback makes the engine's version go back.
    pub(crate) observed_generation: i64,
    /// The object's `metadata.uid`, so Events about it show in `kubectl describe`.
    pub(crate) uid: Option<String>,
}

/// Applied state per workload, shared by the workload controller and its status writer.
pub(crate) type AppliedMap = Arc<Mutex<HashMap<WorkloadId, AppliedState>>>;
