//! The status writer: the driver's statuses → the status subresource, coalesced and rate-bounded.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use kole_core::engine::driver::DriverEvent;
use kole_core::engine::{EngineEvent, WorkloadStatus};
use kole_core::model::WorkloadId;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::events::{Applied, Pending, Transition, from_engine, reference, rolled_back, run_publisher};
use super::{AppliedMap, ControllerConfig, now};
use crate::convert;
use crate::crd::EdgeWorkload;

/// Writes workload statuses from the driver's events: the latest status of each workload, at
/// most once per `cfg.status_interval`, through the status subresource. Events other than
/// statuses are forwarded to `forward` when given. Beside it, an Event per rollout transition is
/// published (see `events.rs`). Returns when `events` closes and the queued Events are out. `applied` is the
/// workload controller's record of the versions it handed over, persisted in each status.
pub(crate) async fn run_status_writer(
    client: Client,
    cfg: ControllerConfig,
    applied: AppliedMap,
    events: mpsc::Receiver<DriverEvent>,
    forward: Option<mpsc::Sender<DriverEvent>>,
) {
    // Events go through a bounded queue to their own task: a slow apiserver drops Events, never
    // status writes.
    let (queue, pending) = mpsc::channel(EVENT_QUEUE);
    tokio::join!(write_statuses(client.clone(), cfg, applied, events, forward, queue), run_publisher(client, pending));
}

/// Events waiting to be published, at most; more are dropped with a warning.
const EVENT_QUEUE: usize = 256;

async fn write_statuses(
    client: Client,
    cfg: ControllerConfig,
    applied: AppliedMap,
    mut events: mpsc::Receiver<DriverEvent>,
    forward: Option<mpsc::Sender<DriverEvent>>,
    queue: mpsc::Sender<Pending>,
) {
    let mut dirty: BTreeMap<WorkloadId, WorkloadStatus> = BTreeMap::new();
    let mut written: HashMap<WorkloadId, crate::crd::EdgeWorkloadStatus> = HashMap::new();
    // Every engine status seen, not only those written: transitions between two writes count too.
    let mut seen: HashMap<WorkloadId, WorkloadStatus> = HashMap::new();
    // The first write waits one interval too, so a burst at start-up is coalesced like any other.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + cfg.status_interval, cfg.status_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(DriverEvent::Status(s)) => {
                    if let Some(t) = rolled_back(seen.get(&s.id), &s) {
                        queue_event(&applied, &queue, &s.id, t);
                    }
                    seen.insert(s.id.clone(), s.clone());
                    dirty.insert(s.id.clone(), s);
                }
                Some(DriverEvent::Engine(e)) => {
                    let applied_of = |id: &WorkloadId| {
                        applied.lock().unwrap_or_else(|p| p.into_inner()).get(id).and_then(|a| a.current.as_ref()).map(|c| Applied {
                            version: Some(c.version),
                            waves: Some(c.spec.rollout.waves.len()),
                            threshold: c.spec.rollout.failure_threshold,
                        }).unwrap_or_default()
                    };
                    let id = engine_event_id(&e);
                    if let Some((id, t)) = id.and_then(|id| from_engine(&e, seen.get(id), applied_of(id))) {
                        queue_event(&applied, &queue, &id, t);
                    }
                    if let EngineEvent::CommandRejected { id, reason } = &e {
                        // On its own task: a slow apiserver must not hold up the status writes.
                        tokio::spawn(reject_in_status(client.clone(), applied.clone(), id.clone(), reason.clone()));
                    }
                    if let Some(f) = &forward { let _ = f.try_send(DriverEvent::Engine(e)); }
                }
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

fn engine_event_id(e: &EngineEvent) -> Option<&WorkloadId> {
    match e {
        EngineEvent::WaveAdvanced { id, .. }
        | EngineEvent::RolloutComplete { id }
        | EngineEvent::RolloutHalted { id, .. }
        | EngineEvent::ProgressDeadlineExceeded { id, .. }
        | EngineEvent::CommandRejected { id, .. } => Some(id),
        _ => None,
    }
}

/// Sets the `Accepted` condition False with the engine's reason (e.g. a spec the agents could not
/// decode), so `kubectl get` shows why the change did not roll out. A later accepted change's status
/// sets it True again.
async fn reject_in_status(client: Client, applied: AppliedMap, id: WorkloadId, reason: String) {
    let observed = applied.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map_or(0, |a| a.observed_generation);
    let (ns, name) = id.as_str().split_once('/').unwrap_or(("default", id.as_str()));
    let cond = crate::crd::Condition {
        type_: "Accepted".into(),
        status: "False".into(),
        reason: "CommandRejected".into(),
        message: reason,
        last_transition_time: convert::rfc3339(now()),
        observed_generation: observed,
    };
    let api: Api<EdgeWorkload> = Api::namespaced(client, ns);
    let patch = serde_json::json!({ "status": { "conditions": [cond] } });
    if let Err(e) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        tracing::warn!(workload = %id, error = %e, "writing the rejection into the status failed");
    }
}

/// Queues an Event about workload `id`, without waiting.
fn queue_event(applied: &AppliedMap, queue: &mpsc::Sender<Pending>, id: &WorkloadId, transition: Transition) {
    let uid = applied.lock().unwrap_or_else(|p| p.into_inner()).get(id).and_then(|a| a.uid.clone());
    let (ns, name) = id.as_str().split_once('/').unwrap_or(("default", id.as_str()));
    let reason = transition.reason;
    if queue.try_send(Pending { regarding: reference(ns, name, uid), transition }).is_err() {
        tracing::warn!(workload = %id, reason, "Event queue full; dropping the Event (the status still says it)");
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
            let (previous, current, rolled_back, observed, uid) = applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&s.id)
                .map(|a| {
                    let observed = Some(a.observed_generation).filter(|g| *g > 0);
                    (a.previous.clone(), a.current.clone(), a.rolled_back, observed, a.uid.clone())
                })
                .unwrap_or_default();
            let mut status =
                convert::status_from_engine(&s, previous, current, rolled_back, observed, written.get(&s.id), t);
            if let (Some(key), Some(uid)) = (&cfg.status_key, &uid) {
                status.resume_signature = Some(convert::sign_status(key, uid, &status));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kole_core::engine::RolloutPhase;
    use kube::client::Body;
    use std::time::Duration;

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
            failures: vec![],
            progress_deadline_exceeded: false,
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

    /// A change the engine refused shows as `Accepted=False` with the engine's reason, and as a
    /// Warning Event.
    #[tokio::test(start_paused = true)]
    async fn a_rejected_command_sets_accepted_false_and_publishes_a_warning() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (tx, rx) = mpsc::channel(16);
        let writer =
            tokio::spawn(run_status_writer(client, ControllerConfig::default(), AppliedMap::default(), rx, None));
        let id = WorkloadId::new("edge/cdn").unwrap();
        let reason = "the encoded spec message is 70000 bytes, over the agents' decode limit of 65536 bytes";
        tx.send(DriverEvent::Engine(EngineEvent::CommandRejected { id, reason: reason.into() })).await.unwrap();
        let (mut condition, mut event) = (None, None);
        while condition.is_none() || event.is_none() {
            let (req, send) =
                tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.unwrap().unwrap();
            let path = req.uri().path().to_owned();
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            if path.contains("/events") {
                event = Some(body.clone());
            } else {
                assert_eq!(path, "/apis/kole.dev/v1alpha1/namespaces/edge/edgeworkloads/cdn/status");
                condition = Some(body["status"]["conditions"][0].clone());
            }
            send.send_response(
                Response::builder().status(200).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
            );
        }
        let c = condition.unwrap();
        assert_eq!((c["type"].as_str(), c["status"].as_str()), (Some("Accepted"), Some("False")));
        assert_eq!((c["reason"].as_str(), c["message"].as_str()), (Some("CommandRejected"), Some(reason)));
        let ev = event.unwrap();
        assert_eq!((ev["reason"].as_str(), ev["type"].as_str()), (Some("CommandRejected"), Some("Warning")));
        drop(tx);
        writer.await.unwrap();
    }

    /// After a pause edit (generation 3, the engine still runs version 2) and after a rollback (the
    /// engine runs version 1 again), the status describes the generation the controller acted on:
    /// never the engine's version, never going backwards.
    #[tokio::test(start_paused = true)]
    async fn observed_generation_is_the_objects_after_pause_and_rollback() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let cfg = ControllerConfig { status_interval: Duration::from_secs(2), ..Default::default() };
        let id = WorkloadId::new("edge/cdn").unwrap();
        let applied = AppliedMap::default();
        applied
            .lock()
            .unwrap()
            .insert(id.clone(), crate::controller::AppliedState { observed_generation: 3, ..Default::default() });
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(run_status_writer(client, cfg, applied.clone(), rx, None));
        let obj = serde_json::json!({"apiVersion": "kole.dev/v1alpha1", "kind": "EdgeWorkload",
            "metadata": {"name": "cdn", "namespace": "edge"}, "spec": {"runtime": {"image": "x"}}});
        let mut rolled_back_events = 0;
        for (engine_version, observed) in [(2, 3), (1, 4)] {
            applied.lock().unwrap().get_mut(&id).unwrap().observed_generation = observed;
            let mut s = status(&id, 5);
            s.version = engine_version;
            tx.send(DriverEvent::Status(s)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2100)).await;
            // The rollback (version 2 → 1) also publishes an Event, in any order with the status write.
            let (req, send) = loop {
                let (req, send) =
                    tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.unwrap().unwrap();
                if !req.uri().path().contains("/events") {
                    break (req, send);
                }
                assert_eq!(req.method(), Method::POST);
                assert_eq!(req.uri().path(), "/apis/events.k8s.io/v1/namespaces/edge/events");
                let ev = req.into_body().collect_bytes().await.unwrap();
                let ev: serde_json::Value = serde_json::from_slice(&ev).unwrap();
                assert_eq!(
                    (engine_version, ev["reason"].as_str(), ev["type"].as_str()),
                    (1, Some("RolledBack"), Some("Warning"))
                );
                assert_eq!(ev["regarding"]["kind"], "EdgeWorkload");
                assert_eq!(ev["regarding"]["name"], "cdn");
                assert_eq!(ev["reportingController"], "kole-controller");
                rolled_back_events += 1;
                send.send_response(
                    Response::builder().status(201).body(Body::from(serde_json::to_vec(&ev).unwrap())).unwrap(),
                );
            };
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(body["status"]["observedGeneration"], observed, "engine version {engine_version}");
            assert!(
                body["status"]["conditions"].as_array().unwrap().iter().all(|c| c["observedGeneration"] == observed)
            );
            send.send_response(
                Response::builder().status(200).body(Body::from(serde_json::to_vec(&obj).unwrap())).unwrap(),
            );
        }
        drop(tx);
        // The Event may still be queued when the status write is done.
        while rolled_back_events == 0 {
            let (req, send) =
                tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await.unwrap().unwrap();
            assert!(req.uri().path().ends_with("/events"));
            let ev = req.into_body().collect_bytes().await.unwrap();
            assert!(String::from_utf8_lossy(&ev).contains("RolledBack"));
            rolled_back_events += 1;
            send.send_response(Response::builder().status(201).body(Body::from(ev)).unwrap());
        }
        writer.await.unwrap();
    }
}
