//! Retained specs left on the broker by `EdgeWorkload`s deleted while no controller led.

use std::collections::HashSet;

use kole_core::engine::WorkloadCommand;
use kole_core::model::WorkloadId;
use kole_core::transport::{CloudTransport, Destination, TransportError};
use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::api;
use crate::convert;
use crate::crd::EdgeWorkload;
use crate::{Error, Result};

/// What [`reconcile_retained_specs`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetainedReconcile {
    /// Retained specs on the broker, in the watched namespace(s).
    pub found: usize,
    /// Of those, the ones whose `EdgeWorkload` does not exist: the engine clears them (unless their
    /// workload was created again meanwhile).
    pub stale: Vec<WorkloadId>,
}

/// Clears the retained specs of `EdgeWorkload`s that were deleted while no controller led: their
/// finalizer was never run by kole (it was removed by hand, or the namespace went), so the spec
/// stayed on the broker and nodes would run it again after reconnecting.
///
/// Call once per leadership term, after the engine driver and [`run_workload_controller`] run with
/// the same `commands`. It lists the retained specs (`transport`), then the live objects, and hands
/// the engine a [`WorkloadCommand::ReconcileRetained`]: the engine clears what it does not hold and
/// the list does not name, so an object created in between is never touched. With a `namespace`,
/// specs of other namespaces are left alone (another controller may own them). A transport that
/// cannot list retained specs is not an error: there is nothing to reconcile.
///
/// [`run_workload_controller`]: super::run_workload_controller
pub async fn reconcile_retained_specs(
    client: &Client,
    namespace: Option<&str>,
    transport: &dyn CloudTransport,
    commands: &mpsc::Sender<WorkloadCommand>,
) -> Result<RetainedReconcile> {
    let found = match transport.retained_specs().await {
        Ok(found) => found,
        Err(TransportError::Unsupported { .. }) => return Ok(RetainedReconcile::default()),
        Err(e) => return Err(Error::Controller(format!("listing the retained specs on the broker failed: {e}"))),
    };
    let in_scope =
        |id: &WorkloadId| namespace.is_none_or(|ns| id.as_str().split_once('/').is_some_and(|(n, _)| n == ns));
    let found: Vec<Destination> = found
        .into_iter()
        .filter(|d| match d {
            Destination::WorkloadSpec(id) | Destination::GroupWorkloadSpec(_, id) => in_scope(id),
            _ => false,
        })
        .collect();
    let objects: Api<EdgeWorkload> = api(client, namespace);
    let list = objects
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Kube { op: "list EdgeWorkloads".into(), source })?;
    let live: Vec<WorkloadId> = list.items.iter().filter_map(|o| convert::workload_id(o).ok()).collect();
    let live_set: HashSet<&WorkloadId> = live.iter().collect();
    let stale = found
        .iter()
        .filter_map(|d| match d {
            Destination::WorkloadSpec(id) | Destination::GroupWorkloadSpec(_, id) if !live_set.contains(id) => {
                Some(id.clone())
            }
            _ => None,
        })
        .collect();
    let report = RetainedReconcile { found: found.len(), stale };
    commands
        .send(WorkloadCommand::ReconcileRetained { found, live })
        .await
        .map_err(|_| Error::Controller("the engine driver stopped".into()))?;
    Ok(report)
}
