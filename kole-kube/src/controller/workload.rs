//! The workload controller: `EdgeWorkload` changes → engine commands, with a finalizer.

use std::sync::Arc;

use futures::StreamExt;
use kole_core::engine::WorkloadCommand;
use kole_core::engine::driver::DriverEvent;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use super::status::run_status_writer;
use super::{AppliedMap, ControllerConfig, FINALIZER, api, now};
use crate::convert::{self, rfc3339};
use crate::crd::{AppliedVersion, Condition, EdgeWorkload, EdgeWorkloadSpec};
use crate::{Error, Result};

struct WorkloadCtx {
    client: Client,
    commands: mpsc::Sender<WorkloadCommand>,
    applied: AppliedMap,
    status_key: Option<Arc<kole_core::protocol::seal::DownlinkSigner>>,
}

/// Same spec apart from the rollout controls (`paused`, `rollback`).
fn same_but_controls(a: &EdgeWorkloadSpec, b: &EdgeWorkloadSpec) -> bool {
    let strip = |s: &EdgeWorkloadSpec| {
        let mut s = s.clone();
        s.rollout.paused = false;
        s.rollout.rollback = false;
        s
    };
    strip(a) == strip(b)
}

async fn send(ctx: &WorkloadCtx, cmd: WorkloadCommand) -> Result<()> {
    ctx.commands.send(cmd).await.map_err(|_| Error::Controller("the engine driver stopped".into()))
}

async fn apply_workload(obj: Arc<EdgeWorkload>, ctx: Arc<WorkloadCtx>) -> Result<Action> {
    let id = convert::workload_id(&obj)?;
    let workload = match convert::workload_from_object(&obj) {
        Ok(w) => w,
        Err(e) => {
            // The schema let it through but the model refuses it: say so in status, change nothing.
            reject_in_status(&ctx, &obj, &e.to_string()).await?;
            return Ok(Action::await_change());
        }
    };
    let controls = (obj.spec.rollout.paused, obj.spec.rollout.rollback);
    let known = ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
    let mut commands = Vec::new();
    let mut state = known.clone().unwrap_or_default();
    match known.as_ref().and_then(|k| k.current.as_ref().map(|c| (k, c))) {
        Some((_, current)) if current.version == workload.version => {}
        Some((k, current)) if same_but_controls(&current.spec, &obj.spec) => {
            if controls.0 != k.paused {
                commands.push(if controls.0 {
                    WorkloadCommand::Pause(id.clone())
                } else {
                    WorkloadCommand::Resume(id.clone())
                });
            }
            if controls.1 && !k.rollback && !k.rolled_back {
                commands.push(WorkloadCommand::Rollback(id.clone()));
                // The engine refuses a rollback with nothing to go back to.
                state.rolled_back = k.previous.is_some();
            }
        }
        Some((k, current)) => {
            // After a rollback the engine runs `previous`: that is what the new version replaces.
            state.previous = if k.rolled_back { k.previous.clone() } else { Some(current.clone()) };
            state.current = Some(AppliedVersion { version: workload.version, spec: obj.spec.clone() });
            state.rolled_back = false;
            commands.push(WorkloadCommand::Apply { workload, progress: None });
        }
        None => {
            // First sight in this controller's life: resume what a previous life persisted in status,
            // then move on to the object's spec if it changed meanwhile. With a signing key, only a
            // status this controller signed is resumed: anyone with write access to the status
            // subresource could otherwise make it send a spec nobody applied.
            let trusted = convert::status_trusted(&obj, ctx.status_key.as_deref());
            if !trusted {
                tracing::warn!(
                    object = %id,
                    "the status is not signed by this controller's key (edited, or written without \
                     --signing-key): ignoring its rollout state and starting the object's spec over"
                );
            }
            let unsigned;
            let obj = if trusted {
                obj.as_ref()
            } else {
                unsigned = EdgeWorkload { status: None, ..(*obj).clone() };
                &unsigned
            };
            let status = obj.status.as_ref();
            let resumed = convert::resume_from_status(obj).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "persisted rollout state unusable; starting the rollout over");
                None
            });
            // The previous life rolled `current` back: the engine resumes `previous`.
            let rolled_back = status.is_some_and(|s| s.rolled_back && s.previous.is_some());
            match resumed {
                Some((old, progress)) if old.version == workload.version => {
                    state.previous = status.and_then(|s| s.previous.clone());
                    state.current = status.and_then(|s| s.current.clone());
                    commands.push(WorkloadCommand::Apply { workload, progress: Some(progress) });
                }
                Some((old, progress)) => {
                    let old_applied = status.and_then(|s| s.current.clone());
                    commands.push(WorkloadCommand::Apply { workload: old, progress: Some(progress) });
                    match old_applied {
                        Some(cur) if same_but_controls(&cur.spec, &obj.spec) => {
                            if controls.0 != cur.spec.rollout.paused {
                                commands.push(if controls.0 {
                                    WorkloadCommand::Pause(id.clone())
                                } else {
                                    WorkloadCommand::Resume(id.clone())
                                });
                            }
                            state.previous = status.and_then(|s| s.previous.clone());
                            state.rolled_back = rolled_back;
                            if controls.1 && !cur.spec.rollout.rollback && !rolled_back {
                                commands.push(WorkloadCommand::Rollback(id.clone()));
                                state.rolled_back = state.previous.is_some();
                            }
                            state.current = Some(cur);
                        }
                        cur => {
                            state.previous = if rolled_back { status.and_then(|s| s.previous.clone()) } else { cur };
                            state.current = Some(AppliedVersion { version: workload.version, spec: obj.spec.clone() });
                            state.rolled_back = false;
                            commands.push(WorkloadCommand::Apply { workload, progress: None });
                        }
                    }
                }
                None => {
                    // A status without `current` still resumes when it describes this generation.
                    let progress = convert::progress_from_status(obj).unwrap_or(None);
                    state.previous = status.and_then(|s| s.previous.clone());
                    state.current = Some(AppliedVersion { version: workload.version, spec: obj.spec.clone() });
                    commands.push(WorkloadCommand::Apply { workload, progress });
                }
            }
        }
    }
    state.paused = controls.0;
    state.rollback = controls.1;
    state.observed_generation = obj.metadata.generation.unwrap_or(0);
    state.uid = obj.uid();
    for cmd in commands {
        send(&ctx, cmd).await?;
    }
    ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).insert(id, state);
    Ok(Action::await_change())
}

async fn reject_in_status(ctx: &WorkloadCtx, obj: &EdgeWorkload, reason: &str) -> Result<()> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<EdgeWorkload> = Api::namespaced(ctx.client.clone(), &ns);
    let cond = Condition {
        type_: "Accepted".into(),
        status: "False".into(),
        reason: "InvalidSpec".into(),
        message: reason.to_owned(),
        last_transition_time: rfc3339(now()),
        observed_generation: obj.metadata.generation.unwrap_or(0),
    };
    let patch = serde_json::json!({ "status": { "conditions": [cond] } });
    api.patch_status(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::Kube { op: format!("write status of EdgeWorkload {ns}/{}", obj.name_any()), source })
}

async fn cleanup_workload(obj: Arc<EdgeWorkload>, ctx: Arc<WorkloadCtx>) -> Result<Action> {
    let id = convert::workload_id(&obj)?;
    send(&ctx, WorkloadCommand::Delete(id.clone())).await?;
    ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    Ok(Action::await_change())
}

async fn reconcile_workload(obj: Arc<EdgeWorkload>, ctx: Arc<WorkloadCtx>) -> Result<Action> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<EdgeWorkload> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            FinalizerEvent::Apply(o) => apply_workload(o, ctx.clone()).await,
            FinalizerEvent::Cleanup(o) => cleanup_workload(o, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Controller(e.to_string()))
}

/// Runs the workload controller and its status writer. Commands go to the engine driver through
/// `commands`; the driver's `events` come back to the status writer, which writes each workload's
/// latest status at most once per `cfg.status_interval` and forwards other events to `forward` when
/// given. Returns when `shutdown` has resolved (the controller) and `events` has closed (the writer).
pub async fn run_workload_controller(
    client: Client,
    cfg: ControllerConfig,
    commands: mpsc::Sender<WorkloadCommand>,
    events: mpsc::Receiver<DriverEvent>,
    forward: Option<mpsc::Sender<DriverEvent>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // What was handed to the engine, read by the writer for the statuses it persists.
    let applied = AppliedMap::default();
    let writer = run_status_writer(client.clone(), cfg.clone(), applied.clone(), events, forward);
    tokio::join!(run_controller(client, cfg, commands, applied, shutdown), writer);
}

async fn run_controller(
    client: Client,
    cfg: ControllerConfig,
    commands: mpsc::Sender<WorkloadCommand>,
    applied: AppliedMap,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<EdgeWorkload> = api(&client, cfg.namespace.as_deref());
    let requeue = cfg.error_requeue;
    let ctx = Arc::new(WorkloadCtx { client, commands, applied, status_key: cfg.status_key.clone() });
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile_workload,
            move |obj, err, _| {
                tracing::warn!(object = %obj.name_any(), error = %err, "EdgeWorkload reconcile failed");
                Action::requeue(requeue)
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
}
