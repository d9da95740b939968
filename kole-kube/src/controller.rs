//! The workload controller, the status writer and the node query controller.
//!
//! - [`run_workload_controller`] watches `EdgeWorkload` objects (kube-runtime's `Controller`) and
//!   turns their changes into [`WorkloadCommand`]s for the engine driver. A finalizer makes deletion
//!   remove the workload from the nodes (a `Delete` command handed to the engine) before the object
//!   goes. A change of `rollout.paused` or `rollout.rollback` alone pauses, resumes or rolls back the
//!   current version instead of starting a new one.
//! - [`run_status_writer`] takes the driver's [`DriverEvent`]s and writes each workload's latest
//!   status through the status subresource at most once per [`ControllerConfig::status_interval`]:
//!   changes in between are coalesced, so a rollout to a million nodes costs a few status writes, not
//!   a million. The rollout position goes into the status so a restarted controller resumes.
//! - [`run_query_controller`] answers `NodeQuery` objects from the cache as soon as the watch
//!   delivers them, again when `spec.refresh` changes, and deletes them after `spec.ttlSeconds`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kole_core::cache::{CacheStore, NodeCache, NodeQuery as CacheQuery, StateCache};
use kole_core::engine::driver::DriverEvent;
use kole_core::engine::{WorkloadCommand, WorkloadStatus};
use kole_core::model::{NodeName, NodePhase, Timestamp, WorkloadId};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;

use crate::convert::{self, node_item, rfc3339};
use crate::crd::{AppliedVersion, Condition, EdgeWorkload, EdgeWorkloadSpec, NodeQuery, NodeQueryStatus, QuerySummary};
use crate::{Error, Result};

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
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            field_manager: "kole-controller".to_owned(),
            status_interval: Duration::from_secs(2),
            error_requeue: Duration::from_secs(5),
            status_concurrency: 16,
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
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(ms)
}

/// What the controller last handed the engine for one workload, shared with the status writer.
#[derive(Clone, Debug, Default)]
pub struct AppliedState {
    /// Current version and its spec.
    pub current: Option<AppliedVersion>,
    /// The version before it (nodes outside the reached waves keep it).
    pub previous: Option<AppliedVersion>,
    /// `rollout.paused` last handed over.
    pub paused: bool,
    /// `rollout.rollback` last handed over.
    pub rollback: bool,
}

/// Applied state per workload, shared by the workload controller and the status writer.
pub type AppliedMap = Arc<Mutex<HashMap<WorkloadId, AppliedState>>>;

struct WorkloadCtx {
    client: Client,
    commands: mpsc::Sender<WorkloadCommand>,
    applied: AppliedMap,
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
            if controls.1 && !k.rollback {
                commands.push(WorkloadCommand::Rollback(id.clone()));
            }
        }
        Some((_, current)) => {
            state.previous = Some(current.clone());
            state.current = Some(AppliedVersion { version: workload.version, spec: obj.spec.clone() });
            commands.push(WorkloadCommand::Apply { workload, progress: None });
        }
        None => {
            // First sight in this controller's life: resume what a previous life persisted in status,
            // then move on to the object's spec if it changed meanwhile.
            let status = obj.status.as_ref();
            let resumed = convert::resume_from_status(&obj).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "persisted rollout state unusable; starting the rollout over");
                None
            });
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
                            if controls.1 && !cur.spec.rollout.rollback {
                                commands.push(WorkloadCommand::Rollback(id.clone()));
                            }
                            state.previous = status.and_then(|s| s.previous.clone());
                            state.current = Some(cur);
                        }
                        cur => {
                            state.previous = cur;
                            state.current = Some(AppliedVersion { version: workload.version, spec: obj.spec.clone() });
                            commands.push(WorkloadCommand::Apply { workload, progress: None });
                        }
                    }
                }
                None => {
                    // A status without `current` still resumes when it describes this generation.
                    let progress = convert::progress_from_status(&obj).unwrap_or(None);
                    state.previous = status.and_then(|s| s.previous.clone());
                    state.current = Some(AppliedVersion { version: workload.version, spec: obj.spec.clone() });
                    commands.push(WorkloadCommand::Apply { workload, progress });
                }
            }
        }
    }
    state.paused = controls.0;
    state.rollback = controls.1;
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

/// Runs the workload controller until `shutdown` resolves. Commands go to the engine driver
/// through `commands`; `applied` is shared with [`run_status_writer`].
pub async fn run_workload_controller(
    client: Client,
    cfg: ControllerConfig,
    commands: mpsc::Sender<WorkloadCommand>,
    applied: AppliedMap,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<EdgeWorkload> = api(&client, cfg.namespace.as_deref());
    let requeue = cfg.error_requeue;
    let ctx = Arc::new(WorkloadCtx { client, commands, applied });
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

/// Writes workload statuses from the driver's events: the latest status of each workload, at
/// most once per `cfg.status_interval`, through the status subresource. Events other than
/// statuses are forwarded to `forward` when given. Returns when `events` closes.
pub async fn run_status_writer(
    client: Client,
    cfg: ControllerConfig,
    applied: AppliedMap,
    mut events: mpsc::Receiver<DriverEvent>,
    forward: Option<mpsc::Sender<DriverEvent>>,
) {
    let mut dirty: BTreeMap<WorkloadId, WorkloadStatus> = BTreeMap::new();
    let mut written: HashMap<WorkloadId, crate::crd::EdgeWorkloadStatus> = HashMap::new();
    // The first write waits one interval too, so a burst at start-up is coalesced like any other.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + cfg.status_interval, cfg.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(DriverEvent::Status(s)) => { dirty.insert(s.id.clone(), s); }
                Some(other) => if let Some(f) = &forward { let _ = f.try_send(other); },
                None => break,
            },
            _ = ticker.tick() => {
                if !dirty.is_empty() {
                    flush_statuses(&client, &cfg, &applied, std::mem::take(&mut dirty), &mut written).await;
                }
            }
        }
    }
    if !dirty.is_empty() {
        flush_statuses(&client, &cfg, &applied, dirty, &mut written).await;
    }
}

async fn flush_statuses(
    client: &Client,
    cfg: &ControllerConfig,
    applied: &AppliedMap,
    batch: BTreeMap<WorkloadId, WorkloadStatus>,
    written: &mut HashMap<WorkloadId, crate::crd::EdgeWorkloadStatus>,
) {
    let t = now();
    let writes: Vec<_> = batch
        .into_values()
        .filter_map(|s| {
            let (previous, current) = applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&s.id)
                .map(|a| (a.previous.clone(), a.current.clone()))
                .unwrap_or_default();
            let status = convert::status_from_engine(&s, previous, current, written.get(&s.id), t);
            (written.get(&s.id) != Some(&status)).then_some((s.id, status))
        })
        .collect();
    let results = futures::stream::iter(writes)
        .map(|(id, status)| async move {
            let (ns, name) = id.as_str().split_once('/').unwrap_or(("default", id.as_str()));
            let api: Api<EdgeWorkload> = Api::namespaced(client.clone(), ns);
            let patch = serde_json::json!({ "status": status });
            let pp = PatchParams::default();
            let r = api.patch_status(name, &pp, &Patch::Merge(&patch)).await;
            if let Err(e) = &r {
                tracing::warn!(workload = %id, error = %e, "status write failed; retried with the next change");
            }
            r.ok().map(|_| (id, status))
        })
        .buffer_unordered(cfg.status_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    for (id, status) in results.into_iter().flatten() {
        written.insert(id, status);
    }
}

struct QueryCtx {
    client: Client,
    cache: CacheStore<NodeCache>,
}

/// Answers one query from the cache (pure: no I/O), for the controller and for tests.
pub fn answer_query(cache: &dyn StateCache, spec: &crate::crd::NodeQuerySpec, at: Timestamp) -> NodeQueryStatus {
    let mut status = NodeQueryStatus { answered_at: Some(rfc3339(at)), ..Default::default() };
    let names: std::result::Result<Vec<NodeName>, _> = spec.names.iter().map(|n| NodeName::new(n.clone())).collect();
    let selector = spec.selector.as_ref().map(convert::selector).transpose();
    let continue_after = spec.continue_.as_deref().map(str::parse::<u32>).transpose();
    match (names, selector, continue_after) {
        (Ok(names), Ok(selector), Ok(continue_after)) => {
            let q = CacheQuery {
                names,
                selector: selector.unwrap_or_default(),
                phase: spec.phase.map(convert::node_phase),
                limit: spec.limit.clamp(1, 1000) as usize,
                continue_after,
            };
            let page = cache.query(&q);
            status.items = page.items.iter().map(node_item).collect();
            status.returned = u32::try_from(status.items.len()).unwrap_or(u32::MAX);
            status.summary = QuerySummary {
                matched: page.counts.total(),
                online: u64::from(page.counts.get(NodePhase::Online)),
                offline: u64::from(page.counts.get(NodePhase::Offline)),
                registering: u64::from(page.counts.get(NodePhase::Registering)),
            };
            status.continue_ = page.continue_after.map(|c| c.to_string());
        }
        (Err(e), _, _) => status.error = Some(format!("spec.names: {e}")),
        (_, Err(e), _) => status.error = Some(format!("spec.selector: {e}")),
        (_, _, Err(e)) => status.error = Some(format!("spec.continue: {e}")),
    }
    status
}

async fn reconcile_query(obj: Arc<NodeQuery>, ctx: Arc<QueryCtx>) -> Result<Action> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let api: Api<NodeQuery> = Api::namespaced(ctx.client.clone(), &ns);
    let t = now();
    let created_ms = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(t.as_millis(), |c| u64::try_from(c.0.as_millisecond()).unwrap_or(0));
    let expires_ms = created_ms.saturating_add(u64::from(obj.spec.ttl_seconds) * 1000);
    if t.as_millis() >= expires_ms {
        api.delete(&name, &Default::default())
            .await
            .map_err(|source| Error::Kube { op: format!("delete expired NodeQuery {ns}/{name}"), source })?;
        return Ok(Action::await_change());
    }
    let answered = obj.status.as_ref().is_some_and(|s| {
        s.observed_generation == obj.metadata.generation
            && s.observed_refresh == obj.spec.refresh
            && s.answered_at.is_some()
    });
    if !answered {
        let mut status = {
            let cache = ctx.cache.read();
            answer_query(&*cache, &obj.spec, t)
        };
        status.observed_generation = obj.metadata.generation;
        status.observed_refresh = obj.spec.refresh.clone();
        // Replace the whole status (a merge patch would keep items of a previous, longer page).
        let mut body = (*obj).clone();
        body.status = Some(status);
        body.metadata.managed_fields = None;
        api.replace_status(&name, &Default::default(), &body)
            .await
            .map_err(|source| Error::Kube { op: format!("write status of NodeQuery {ns}/{name}"), source })?;
    }
    let left = Duration::from_millis(expires_ms.saturating_sub(t.as_millis()));
    Ok(Action::requeue(left.max(Duration::from_millis(100))))
}

/// Runs the node query controller until `shutdown` resolves, answering from `cache`.
pub async fn run_query_controller(
    client: Client,
    cfg: ControllerConfig,
    cache: CacheStore<NodeCache>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<NodeQuery> = api(&client, cfg.namespace.as_deref());
    let requeue = cfg.error_requeue;
    let ctx = Arc::new(QueryCtx { client, cache });
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile_query,
            move |obj, err, _| {
                tracing::warn!(object = %obj.name_any(), error = %err, "NodeQuery reconcile failed");
                Action::requeue(requeue)
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kole_core::engine::RolloutPhase;
    use kube::client::Body;

    fn status(id: &WorkloadId, ready: u32) -> WorkloadStatus {
        WorkloadStatus {
            id: id.clone(),
            version: 1,
            targeted: 100,
            updated: ready,
            ready,
            failed: 0,
            by_version: vec![(1, ready)],
            wave: 0,
            waves: 1,
            phase: RolloutPhase::Progressing,
        }
    }

    /// A rollout's stream of status changes costs one status write per interval, carrying the latest.
    #[tokio::test(start_paused = true)]
    async fn status_writes_are_coalesced_per_interval() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let cfg = ControllerConfig { status_interval: Duration::from_secs(2), ..Default::default() };
        let (tx, rx) = mpsc::channel(1024);
        let writer = tokio::spawn(run_status_writer(client, cfg, AppliedMap::default(), rx, None));
        let id = WorkloadId::new("edge/cdn").unwrap();
        for ready in 1..=100 {
            tx.send(DriverEvent::Status(status(&id, ready))).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.unwrap().unwrap();
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(req.uri().path(), "/apis/kole.dev/v1alpha1/namespaces/edge/edgeworkloads/cdn/status");
        assert_eq!(req.headers().get("content-type").unwrap(), "application/merge-patch+json");
        let body: serde_json::Value = serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!(body["status"]["ready"], 100, "the latest status wins");
        assert_eq!(body["status"]["observedGeneration"], 1);
        let obj = serde_json::json!({"apiVersion": "kole.dev/v1alpha1", "kind": "EdgeWorkload",
            "metadata": {"name": "cdn", "namespace": "edge"}, "spec": {"runtime": {"image": "x"}}});
        send.send_response(
            Response::builder().status(200).body(Body::from(serde_json::to_vec(&obj).unwrap())).unwrap(),
        );
        // Nothing changed since: no further write, however long we wait.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!matches!(tokio::time::timeout(Duration::from_millis(10), handle.next_request()).await, Ok(Some(_))));
        drop(tx);
        writer.await.unwrap();
    }

    #[test]
    fn queries_answer_from_the_cache_with_pages_and_summary() {
        use kole_core::model::{DesiredDigest, Labels, NodeInfo, NodeRegistration};
        let mut cache = NodeCache::new();
        for i in 0..10u32 {
            let reg = NodeRegistration {
                name: NodeName::new(format!("n{i}")).unwrap(),
                labels: Labels::from_pairs([("tier", if i % 2 == 0 { "cdn" } else { "pos" })]).unwrap(),
                info: NodeInfo::default(),
                applied: DesiredDigest::EMPTY,
                workloads: vec![],
            };
            cache.register(&reg, 1, Timestamp::from_secs(100)).unwrap();
        }
        cache.set_phase("n0", NodePhase::Offline).unwrap();
        let spec = crate::crd::NodeQuerySpec {
            names: vec![],
            selector: Some(crate::crd::SelectorSpec {
                match_labels: [("tier".to_owned(), "cdn".to_owned())].into(),
                ..Default::default()
            }),
            phase: None,
            limit: 2,
            continue_: None,
            ttl_seconds: 60,
            refresh: None,
        };
        let a = answer_query(&cache, &spec, Timestamp::from_secs(200));
        assert_eq!(a.summary, QuerySummary { matched: 5, online: 4, offline: 1, registering: 0 });
        assert_eq!(a.returned, 2);
        assert_eq!(a.answered_at.as_deref(), Some("1970-01-01T00:03:20Z"));
        let mut next = spec.clone();
        next.continue_ = a.continue_.clone();
        let b = answer_query(&cache, &next, Timestamp::from_secs(200));
        assert!(b.items.iter().all(|i| !a.items.contains(i)));
        let mut bad = spec;
        bad.selector = Some(crate::crd::SelectorSpec {
            match_labels: [("bad key!".to_owned(), "x".to_owned())].into(),
            ..Default::default()
        });
        assert!(answer_query(&cache, &bad, Timestamp::from_secs(200)).error.unwrap().contains("spec.selector"));
    }
}
