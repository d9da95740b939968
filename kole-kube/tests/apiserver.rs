//! Real-apiserver tier. Start one with `.ci/kube.sh start`, export the kubeconfig
//! path it prints as `KOLE_TEST_KUBECONFIG`, and run
//! `cargo test -p kole-kube --test apiserver -- --include-ignored --test-threads 1`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kole_core::cache::{NodeCache, StateCache};
use kole_core::snapshot::{
    RestoreLimits, SnapshotOptions, SnapshotStore, encode_snapshot, restore_latest, write_snapshot,
};
use kole_kube::crd::*;
use kole_kube::snapshot::{KubeSnapshotConfig, KubeSnapshotStore};
use kole_sim::dataset::ReferenceFleet;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{Api, ResourceExt};

const LIMIT: Duration = Duration::from_secs(240);

async fn timed<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f).await.expect("test timed out")
}

fn workload(image: &str, tier: &str) -> EdgeWorkloadSpec {
    EdgeWorkloadSpec {
        runtime: RuntimeSpec { image: Some(image.into()), ..Default::default() },
        selector: SelectorSpec { match_labels: [("tier".to_owned(), tier.to_owned())].into(), ..Default::default() },
        delivery: DeliverySpec::default(),
        rollout: RolloutSpec::default(),
    }
}

fn store(client: &kube::Client, ns: &str, name: &str) -> KubeSnapshotStore {
    KubeSnapshotStore::new(
        client.clone(),
        KubeSnapshotConfig { namespace: ns.into(), name: name.into(), ..Default::default() },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn crds_install_and_the_schema_rejects_invalid_workloads() {
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-crd").await;
        let api: Api<EdgeWorkload> = Api::namespaced(client.clone(), &ns);
        let ok = api.create(&PostParams::default(), &EdgeWorkload::new("good", workload("cdn:1", "cdn"))).await;
        assert!(ok.is_ok(), "{ok:?}");

        // Typed objects the schema refuses: waves out of range, an empty image.
        let mut bad = workload("cdn:1", "cdn");
        bad.rollout.waves = vec![0, 101];
        let err = api.create(&PostParams::default(), &EdgeWorkload::new("bad-waves", bad)).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "{err:?}");
        let err =
            api.create(&PostParams::default(), &EdgeWorkload::new("bad-image", workload("", "cdn"))).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "{err:?}");

        // Raw objects as kubectl would send them: an unknown enum value, a string for an integer.
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("kole.dev", "v1alpha1", "EdgeWorkload"));
        let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        for (name, spec) in [
            ("bad-mode", serde_json::json!({"runtime": {"image": "x"}, "delivery": {"mode": "Multicast"}})),
            ("bad-limit", serde_json::json!({"runtime": {"image": "x"}, "rollout": {"waves": "all"}})),
            ("no-runtime", serde_json::json!({"selector": {}})),
        ] {
            let mut o = DynamicObject::new(name, &ar);
            o.data = serde_json::json!({ "spec": spec });
            let err = raw.create(&PostParams::default(), &o).await.unwrap_err();
            assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "{name}: {err:?}");
        }
        let nq: Api<NodeQuery> = Api::namespaced(client.clone(), &ns);
        let mut q = NodeQuery::new(
            "q",
            NodeQuerySpec {
                names: vec![],
                selector: None,
                phase: None,
                health: None,
                limit: 5000,
                continue_: None,
                ttl_seconds: 60,
                refresh: None,
            },
        );
        let err = nq.create(&PostParams::default(), &q).await.unwrap_err();
        assert!(matches!(&err, kube::Error::Api(s) if s.code == 422), "limit over 1000: {err:?}");
        q.spec.limit = 10;
        nq.create(&PostParams::default(), &q).await.unwrap();

        // A chunk index past u32: the schema's bounds (not its format, which apiservers do not
        // enforce) refuse it; apiservers accepted it while the schema said `format: uint32`.
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("kole.dev", "v1alpha1", "SnapshotChunk"));
        let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        for (name, index, ok) in [("chunk-big", 5_000_000_000_u64, false), ("chunk-max", u64::from(u32::MAX), true)] {
            let mut o = DynamicObject::new(name, &ar);
            o.data = serde_json::json!({ "spec": { "generation": 1, "index": index, "bytes": 3, "data": "AAAA" } });
            let res = raw.create(&PostParams::default(), &o).await;
            if ok {
                assert!(res.is_ok(), "{name}: {res:?}");
            } else {
                let refused =
                    matches!(&res, Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("spec.index"));
                assert!(refused, "{name}: {res:?}");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn snapshot_of_100k_reference_nodes_round_trips_through_custom_resources() {
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-snap").await;
        let store = store(&client, &ns, "fleet");
        let fleet = ReferenceFleet::new(100_000, 42);
        let mut cache = NodeCache::new();
        fleet.load_into(&mut cache).unwrap();

        let t = Instant::now();
        let manifest = write_snapshot(&store, &cache, &SnapshotOptions::default(), fleet.now()).await.unwrap();
        let wrote = t.elapsed();
        let t = Instant::now();
        let restored = restore_latest(&store, &RestoreLimits::default()).await.unwrap().unwrap();
        let read = t.elapsed();
        eprintln!(
            "100k nodes: {} chunk objects, {} bytes; write {wrote:?}, restore {read:?}",
            manifest.chunk_count, manifest.total_bytes
        );
        assert_eq!(restored.manifest, manifest);
        assert!(restored.faults.is_empty());
        assert_eq!(restored.cache.len(), 100_000);
        for i in (0..100_000).step_by(997) {
            let name = fleet.name(i);
            assert_eq!(restored.cache.get(&name), cache.get(&name), "node {name}");
        }
        let chunks: Api<SnapshotChunk> = Api::namespaced(client.clone(), &ns);
        let listed =
            chunks.list_metadata(&ListParams::default().labels("kole.dev/snapshot-store=fleet")).await.unwrap();
        assert_eq!(listed.items.len(), manifest.chunk_count as usize);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn a_crash_between_chunks_and_manifest_restores_the_previous_generation() {
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-crash").await;
        let store = store(&client, &ns, "fleet");
        let fleet = ReferenceFleet::new(20_000, 7);
        let mut cache = NodeCache::new();
        fleet.load_into(&mut cache).unwrap();
        let g1 = write_snapshot(&store, &cache, &SnapshotOptions::default(), fleet.now()).await.unwrap();
        assert_eq!(g1.generation, 1);

        // Generation 2 of a changed cache: every chunk written, then the controller "dies".
        cache.remove(&fleet.name(0));
        let g2 = store.next_generation().await.unwrap();
        assert_eq!(g2, 2);
        let enc = encode_snapshot(&cache, g2, fleet.now(), &SnapshotOptions::default()).unwrap();
        for (i, c) in enc.chunks.iter().enumerate() {
            store.put_chunk(g2, i as u32, c).await.unwrap();
        }

        // A new controller (a fresh store object) restores generation 1, whole.
        let store = self::store(&client, &ns, "fleet");
        let restored = restore_latest(&store, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(restored.manifest.generation, 1);
        assert_eq!(restored.cache.len(), 20_000);
        assert!(restored.cache.get(&fleet.name(0)).is_some());

        // Its next write skips the leftover number and pruning removes the leftovers,
        // never generation 1 while it is the last complete one.
        assert_eq!(store.next_generation().await.unwrap(), 3);
        let g3 =
            write_snapshot(&store, &cache, &SnapshotOptions { keep_generations: 2, ..Default::default() }, fleet.now())
                .await
                .unwrap();
        assert_eq!(g3.generation, 3);
        assert_eq!(store.chunk_generations().await.unwrap(), BTreeSet::from([1, 3]));
        let restored = restore_latest(&store, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(restored.manifest.generation, 3);
        assert_eq!(restored.cache.len(), 19_999);
        store.prune(1).await.unwrap();
        assert_eq!(store.chunk_generations().await.unwrap(), BTreeSet::from([3]));
        assert_eq!(store.list_manifests().await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn a_workload_reaches_simulated_nodes_and_queries_answer_from_the_cache() {
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-e2e").await;
        let hub = hub();
        let ctl = ControllerUnderTest::start(&client, &ns, &hub, None).await;
        let (agents_stop, agents) = spawn_agents(&hub, 40);
        let cache = ctl.cache.clone();
        eventually(Duration::from_secs(60), "40 nodes registered", || {
            let n = cache.read().len();
            async move { (n == 40).then_some(()) }
        })
        .await;

        let api: Api<EdgeWorkload> = Api::namespaced(client.clone(), &ns);
        // Two waves, so the rollout has a wave advance to report as well as its completion.
        let mut spec = workload("cdn:1", "cdn");
        spec.rollout.waves = vec![50, 100];
        api.create(&PostParams::default(), &EdgeWorkload::new("cdn", spec)).await.unwrap();
        let status = eventually(Duration::from_secs(90), "status converged", || {
            let api = api.clone();
            async move {
                let o = api.get("cdn").await.ok()?;
                let s = o.status?;
                (s.observed_generation == Some(1) && s.ready == 20 && s.updated == 20)
                    .then_some((s, o.metadata.finalizers.unwrap_or_default()))
            }
        })
        .await;
        assert_eq!(status.0.targeted, 20);
        assert_eq!(status.0.rollout_phase, Some(RolloutPhaseSpec::Complete));
        assert!(status.1.contains(&kole_kube::controller::FINALIZER.to_owned()));

        // The rollout's transitions are Events on the object (events.k8s.io/v1), as `kubectl
        // describe` finds them: by kind, name and uid.
        let uid = api.get("cdn").await.unwrap().uid();
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
        let ours = eventually(Duration::from_secs(30), "rollout Events", || {
            let events = events.clone();
            async move {
                let listed = events.list(&ListParams::default()).await;
                let ours: Vec<_> = listed
                    .ok()?
                    .items
                    .into_iter()
                    .filter(|e| e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some("EdgeWorkload")))
                    .collect();
                let has = |r: &str| ours.iter().any(|e| e.reason.as_deref() == Some(r));
                (has("WaveAdvanced") && has("RolloutComplete")).then_some(ours)
            }
        })
        .await;
        for e in &ours {
            let r = e.regarding.as_ref().unwrap();
            assert_eq!((r.name.as_deref(), r.namespace.as_deref()), (Some("cdn"), Some(ns.as_str())));
            assert_eq!(r.uid, uid, "{e:?}");
            assert_eq!(r.api_version.as_deref(), Some("kole.dev/v1alpha1"));
            assert_eq!(e.reporting_controller.as_deref(), Some("kole-controller"));
            assert_eq!(e.type_.as_deref(), Some("Normal"), "{e:?}");
        }
        let note = |reason: &str| {
            ours.iter().find(|e| e.reason.as_deref() == Some(reason)).and_then(|e| e.note.clone()).unwrap_or_default()
        };
        assert!(note("WaveAdvanced").starts_with("version 1 advanced to wave 2 of 2"), "{}", note("WaveAdvanced"));
        assert_eq!(note("RolloutComplete"), "version 1 rolled out through all 2 waves and ready");
        assert_eq!(ours.len(), 2, "one Event per transition: {ours:?}");

        // A query: cdn nodes in the east, a page of 3, with summary counts of every match.
        let nq: Api<NodeQuery> = Api::namespaced(client.clone(), &ns);
        let spec = NodeQuerySpec {
            names: vec![],
            selector: Some(SelectorSpec {
                match_labels: [
                    ("tier".to_owned(), "cdn".to_owned()),
                    ("topology.kubernetes.io/region".to_owned(), "east".to_owned()),
                ]
                .into(),
                ..Default::default()
            }),
            phase: None,
            health: None,
            limit: 3,
            continue_: None,
            ttl_seconds: 600,
            refresh: None,
        };
        let created = Instant::now();
        nq.create(&PostParams::default(), &NodeQuery::new("east-cdn", spec)).await.unwrap();
        let answer = eventually(Duration::from_secs(10), "query answered", || {
            let nq = nq.clone();
            async move { nq.get("east-cdn").await.ok()?.status.filter(|s| s.answered_at.is_some()) }
        })
        .await;
        eprintln!("query answered in {:?}", created.elapsed());
        // Nodes 0, 6, 12, … (even and divisible by 3): 7 of 40.
        assert_eq!(answer.summary.matched, 7);
        assert_eq!(answer.summary.online, 7);
        assert_eq!(answer.returned, 3);
        let expected: BTreeSet<String> = (0..40).filter(|i| i % 6 == 0).map(|i| format!("edge-{i:04}")).collect();
        let page1: BTreeSet<String> = answer.items.iter().map(|i| i.name.clone()).collect();
        assert!(page1.is_subset(&expected), "{page1:?}");
        assert!(answer.items[0].workloads.iter().any(|w| w.workload == format!("{ns}/cdn") && w.phase == "Running"));
        let next = answer.continue_.clone().expect("a continue token");
        let mut q = nq.get("east-cdn").await.unwrap();
        q.spec.continue_ = Some(next);
        q.metadata.managed_fields = None;
        nq.replace("east-cdn", &PostParams::default(), &q).await.unwrap();
        let page2 = eventually(Duration::from_secs(10), "second page", || {
            let nq = nq.clone();
            async move { nq.get("east-cdn").await.ok()?.status.filter(|s| s.observed_generation == Some(2)) }
        })
        .await;
        let page2: BTreeSet<String> = page2.items.iter().map(|i| i.name.clone()).collect();
        assert_eq!(page2.len(), 3);
        assert!(page2.is_subset(&expected) && page2.is_disjoint(&page1), "{page1:?} then {page2:?}");

        // Deleting the workload removes it from the nodes before the object goes.
        api.delete("cdn", &DeleteParams::default()).await.unwrap();
        eventually(Duration::from_secs(30), "object gone", || {
            let api = api.clone();
            async move { api.get_opt("cdn").await.ok()?.is_none().then_some(()) }
        })
        .await;
        eventually(Duration::from_secs(30), "nodes stopped the workload", || {
            let running = cache.read().get("edge-0000").is_some_and(|r| {
                r.workloads.iter().any(|w| {
                    w.workload.as_str() == format!("{ns}/cdn") && w.phase == kole_core::model::WorkloadPhase::Running
                })
            });
            async move { (!running).then_some(()) }
        })
        .await;

        let _ = agents_stop.send(true);
        for a in agents {
            let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
        }
        ctl.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn two_controllers_one_lease_the_standby_takes_over_and_converges() {
    use kole_kube::lease::{LeaderElector, LeaseConfig};
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-lease").await;
        let hub = hub();
        let snapshots: Arc<dyn SnapshotStore> = Arc::new(store(&client, &ns, "fleet"));
        let lease = |id: &str| LeaseConfig {
            lease_duration: Duration::from_secs(3),
            renew_interval: Duration::from_millis(500),
            ..LeaseConfig::new(&ns, "kole-fleet", id)
        };
        let a = LeaderElector::new(client.clone(), lease("a"));
        let mut b = LeaderElector::new(client.clone(), lease("b"));
        let (a_leads, mut a_leading) = tokio::sync::watch::channel(false);
        let (_a_stop, a_stop_rx) = tokio::sync::watch::channel(false);
        let a_task = tokio::spawn(a.run(a_leads, a_stop_rx));
        tokio::time::timeout(Duration::from_secs(10), a_leading.wait_for(|l| *l)).await.unwrap().unwrap();
        assert!(!b.step().await.unwrap(), "b stands by");

        // a leads: controller + fleet, a workload converges, a snapshot is written.
        let ctl_a = ControllerUnderTest::start(&client, &ns, &hub, Some(snapshots.clone())).await;
        let (agents_stop, agents) = spawn_agents(&hub, 30);
        let api: Api<EdgeWorkload> = Api::namespaced(client.clone(), &ns);
        api.create(&PostParams::default(), &EdgeWorkload::new("retail", workload("pos:7", "retail"))).await.unwrap();
        let ready = |n: u32, generation: i64| {
            let api = api.clone();
            move || {
                let api = api.clone();
                async move {
                    let s = api.get("retail").await.ok()?.status?;
                    (s.observed_generation == Some(generation) && s.ready == n).then_some(())
                }
            }
        };
        eventually(Duration::from_secs(90), "a's rollout converged", ready(15, 1)).await;
        // a dies without releasing (the shutdown snapshot is its last act): b waits for expiry.
        ctl_a.stop().await;
        a_task.abort();
        let t = Instant::now();
        loop {
            if b.step().await.unwrap() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "b never took over");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(t.elapsed() >= Duration::from_secs(2), "b took over before the lease expired");

        // b restores from the snapshot (all 30 nodes known before any of them speaks) and converges.
        let ctl_b = ControllerUnderTest::start(&client, &ns, &hub, Some(snapshots.clone())).await;
        assert_eq!(ctl_b.cache.read().len(), 30, "b restored the fleet from the snapshot");
        let mut o = api.get("retail").await.unwrap();
        o.spec.runtime.image = Some("pos:8".into());
        o.metadata.managed_fields = None;
        api.replace("retail", &PostParams::default(), &o).await.unwrap();
        eventually(Duration::from_secs(90), "b's rollout converged", ready(15, 2)).await;

        let _ = agents_stop.send(true);
        for t in agents {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        ctl_b.stop().await;
        b.release().await.unwrap();
        let name = api.get("retail").await.unwrap().name_any();
        assert_eq!(name, "retail");
    })
    .await;
}

/// Events of a workload's object, by reason (events.k8s.io/v1, as `kubectl describe` finds them).
async fn events_of(client: &kube::Client, ns: &str, name: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some("EdgeWorkload") && r.name.as_deref() == Some(name))
        })
        .collect()
}

async fn edit(api: &Api<EdgeWorkload>, name: &str, f: impl FnOnce(&mut EdgeWorkloadSpec)) {
    let mut o = api.get(name).await.unwrap();
    f(&mut o.spec);
    o.metadata.managed_fields = None;
    api.replace(name, &PostParams::default(), &o).await.unwrap();
}

/// Halt, rollback and progress deadline as a user sees them (status, health flags, Events), then
/// a controller restart that must keep the rollback, and must clear the retained spec of a
/// workload deleted while no controller led.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn halt_rollback_deadline_and_a_restart_that_keeps_the_rollback_and_clears_deleted_specs() {
    use kole_core::cache::{CacheQuery, HealthFilter};
    use kole_core::model::{NodeHealth, WorkloadPhase};
    use kole_core::transport::Destination;
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-life").await;
        let hub = hub();
        let snapshots: Arc<dyn SnapshotStore> = Arc::new(store(&client, &ns, "fleet"));
        let ctl = ControllerUnderTest::start(&client, &ns, &hub, Some(snapshots.clone())).await;
        let (agents_stop, agents) = spawn_agents(&hub, 20);
        let api: Api<EdgeWorkload> = Api::namespaced(client.clone(), &ns);
        let status = |name: &'static str| {
            let api = api.clone();
            move || {
                let api = api.clone();
                async move { api.get(name).await.ok()?.status }
            }
        };

        // v1 rolls out to the 10 retail nodes.
        api.create(&PostParams::default(), &EdgeWorkload::new("web", workload("web:1", "retail"))).await.unwrap();
        eventually(Duration::from_secs(90), "web v1 ready", || {
            let s = status("web")();
            async move { s.await.filter(|s| s.observed_generation == Some(1) && s.ready == 10) }
        })
        .await;

        // v2 cannot start: the rollout halts, the reason and the nodes' health say why.
        edit(&api, "web", |s| s.runtime.image = Some("web:2-broken".into())).await;
        let halted = eventually(Duration::from_secs(60), "web v2 halted", || {
            let s = status("web")();
            async move {
                s.await
                    .filter(|s| s.observed_generation == Some(2) && s.rollout_phase == Some(RolloutPhaseSpec::Halted))
            }
        })
        .await;
        assert!(halted.failed > 0, "{halted:?}");
        assert_eq!(halted.failures[0].reason, "exec /broken: No such file or directory");
        let cache = ctl.cache.clone();
        let failing = eventually(Duration::from_secs(30), "failed nodes flag it in their heartbeats", || {
            let q = CacheQuery { health: HealthFilter::AnyOf(NodeHealth::WORKLOAD_FAILED), ..CacheQuery::default() };
            let page = cache.read().query(&q);
            async move { (page.items.len() == halted.failed as usize).then_some(page.items) }
        })
        .await;
        assert!(
            failing
                .iter()
                .all(|r| r.labels.get("tier") == Some("retail") && r.health.contains(NodeHealth::WORKLOAD_FAILED))
        );

        // Rolling back returns every node to v1 at once.
        edit(&api, "web", |s| s.rollout.rollback = true).await;
        let back = eventually(Duration::from_secs(60), "web rolled back", || {
            let s = status("web")();
            async move {
                s.await.filter(|s| {
                    s.observed_generation == Some(3)
                        && s.rolled_back
                        && s.by_version == [VersionCount { version: 1, nodes: 10 }]
                        && s.ready == 10
                })
            }
        })
        .await;
        assert_eq!(back.current.as_ref().map(|c| c.version), Some(2), "current is the version rolled back from");

        // A workload whose nodes never get ready passes its progress deadline.
        let mut stuck = workload("stuck:1", "cdn");
        stuck.rollout.progress_deadline_seconds = 2;
        api.create(&PostParams::default(), &EdgeWorkload::new("stuck", stuck)).await.unwrap();

        let reasons = |name: &'static str, want: &'static [&'static str]| {
            let client = client.clone();
            let ns = ns.clone();
            move || {
                let (client, ns) = (client.clone(), ns.clone());
                async move {
                    let evs = events_of(&client, &ns, name).await;
                    want.iter().all(|r| evs.iter().any(|e| e.reason.as_deref() == Some(*r))).then_some(evs)
                }
            }
        };
        let web_events =
            eventually(Duration::from_secs(30), "web's Events", reasons("web", &["RolloutHalted", "RolledBack"])).await;
        for e in &web_events {
            if matches!(e.reason.as_deref(), Some("RolloutHalted" | "RolledBack")) {
                assert_eq!(e.type_.as_deref(), Some("Warning"), "{e:?}");
            }
        }
        let stuck_events =
            eventually(Duration::from_secs(30), "stuck's Event", reasons("stuck", &["ProgressDeadlineExceeded"])).await;
        let deadline = stuck_events.iter().find(|e| e.reason.as_deref() == Some("ProgressDeadlineExceeded")).unwrap();
        assert_eq!(deadline.type_.as_deref(), Some("Warning"));
        let stuck_status = eventually(Duration::from_secs(30), "stuck's Progressing=False", || {
            let s = status("stuck")();
            async move {
                s.await.filter(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Progressing" && c.status == "False" && c.reason == "ProgressDeadlineExceeded"
                    })
                })
            }
        })
        .await;
        assert_eq!(stuck_status.ready, 0);

        // A workload the nodes run; then the controller goes away.
        api.create(&PostParams::default(), &EdgeWorkload::new("gone", workload("gone:1", "cdn"))).await.unwrap();
        eventually(Duration::from_secs(60), "gone ready", || {
            let s = status("gone")();
            async move { s.await.filter(|s| s.ready == 10) }
        })
        .await;
        ctl.stop().await;

        // While no controller leads: `gone` is deleted with its finalizer removed by hand (its
        // retained spec stays on the broker), and web's rollback is switched off again.
        api.delete("gone", &DeleteParams::default()).await.unwrap();
        let patch = serde_json::json!({ "metadata": { "finalizers": null } });
        api.patch("gone", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
        eventually(Duration::from_secs(10), "gone deleted", || {
            let api = api.clone();
            async move { api.get_opt("gone").await.ok()?.is_none().then_some(()) }
        })
        .await;
        let gone_spec = Destination::WorkloadSpec(kole_core::model::WorkloadId::new(format!("{ns}/gone")).unwrap());
        assert!(hub.retained(&gone_spec).is_some(), "the deleted workload's spec is still retained");
        edit(&api, "web", |s| s.rollout.rollback = false).await;

        // The next controller clears the stale spec; the nodes stop `gone` and stay on web v1.
        let ctl = ControllerUnderTest::start(&client, &ns, &hub, Some(snapshots.clone())).await;
        eventually(Duration::from_secs(30), "stale spec cleared", || {
            let cleared = hub.retained(&gone_spec).is_none();
            async move { cleared.then_some(()) }
        })
        .await;
        let cache = ctl.cache.clone();
        let runs = |cache: &kole_core::cache::CacheStore<NodeCache>, w: &str| -> Vec<(String, u64, WorkloadPhase)> {
            let mut out = Vec::new();
            for r in cache.read().query(&CacheQuery { limit: 100, ..CacheQuery::default() }).items {
                for s in r.workloads.iter().filter(|s| s.workload.as_str() == w) {
                    out.push((r.name.to_string(), s.version, s.phase));
                }
            }
            out
        };
        let gone_id = format!("{ns}/gone");
        eventually(Duration::from_secs(30), "nodes stopped gone", || {
            let left = runs(&cache, &gone_id).into_iter().filter(|r| r.2 == WorkloadPhase::Running).count();
            async move { (left == 0).then_some(()) }
        })
        .await;
        eventually(Duration::from_secs(60), "the new controller observed web's generation 4", || {
            let s = status("web")();
            async move { s.await.filter(|s| s.observed_generation == Some(4)) }
        })
        .await;
        // Several heartbeat rounds: every retail node still runs web v1, none ever got v2 again.
        let web_id = format!("{ns}/web");
        for _ in 0..15 {
            let web = runs(&cache, &web_id);
            assert!(web.iter().all(|r| r.1 == 1), "a node left v1 after the restart: {web:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let s = api.get("web").await.unwrap().status.unwrap();
        assert_eq!(s.by_version, [VersionCount { version: 1, nodes: 10 }], "{s:?}");

        let _ = agents_stop.send(true);
        for a in agents {
            let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
        }
        ctl.stop().await;
    })
    .await;
}

/// Write access to `edgeworkloads/status` must not be code execution on the fleet: a controller
/// with a signing key resumes only from a status it signed. Here the status is forged while no
/// controller runs (an older `current` with another image, not yet published); the next
/// controller ignores it and rolls out only what the object says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn a_forged_status_is_not_resumed_by_a_controller_with_a_key() {
    use std::sync::atomic::Ordering;
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-forge").await;
        let hub = hub();
        let key = Arc::new(kole_core::protocol::seal::DownlinkSigner::from_seed([11; 32]));
        let ctl = ControllerUnderTest::start_with_key(&client, &ns, &hub, None, Some(key.clone())).await;
        let (agents_stop, agents) = spawn_agents(&hub, 20);
        let api: Api<EdgeWorkload> = Api::namespaced(client.clone(), &ns);
        api.create(&PostParams::default(), &EdgeWorkload::new("web", workload("web:1", "retail"))).await.unwrap();
        let signed = eventually(Duration::from_secs(90), "web ready, status signed", || {
            let api = api.clone();
            async move {
                let s = api.get("web").await.ok()?.status?;
                (s.ready == 10 && s.resume_signature.is_some()).then_some(s)
            }
        })
        .await;
        assert_eq!(signed.current.as_ref().map(|c| c.version), Some(1));
        ctl.stop().await;

        // While no controller runs: the status is forged, and the object moves on to web:2.
        let mut forged = signed.current.clone().unwrap();
        forged.spec.runtime.image = Some("evil:1".into());
        let patch = serde_json::json!({ "status": { "current": forged, "published": false } });
        api.patch_status("web", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
        let mut o = api.get("web").await.unwrap();
        o.spec.runtime.image = Some("web:2".into());
        o.metadata.managed_fields = None;
        api.replace("web", &PostParams::default(), &o).await.unwrap();

        let before = EVIL_APPLIES.load(Ordering::SeqCst);
        let ctl = ControllerUnderTest::start_with_key(&client, &ns, &hub, None, Some(key)).await;
        let s = eventually(Duration::from_secs(90), "web:2 ready", || {
            let api = api.clone();
            async move {
                let s = api.get("web").await.ok()?.status?;
                (s.observed_generation == Some(2) && s.ready == 10 && s.updated == 10).then_some(s)
            }
        })
        .await;
        assert_eq!(EVIL_APPLIES.load(Ordering::SeqCst), before, "a node ran the spec forged into the status");
        assert_eq!(s.current.and_then(|c| c.spec.runtime.image).as_deref(), Some("web:2"));

        let _ = agents_stop.send(true);
        for a in agents {
            let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
        }
        ctl.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn a_deposed_leaders_snapshot_commit_is_refused_and_the_newer_generation_survives() {
    use kole_core::snapshot::SnapshotError;
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-fence").await;
        // Two writers on one store, as two controllers of successive terms are.
        let old_term = store(&client, &ns, "fleet");
        let new_term = store(&client, &ns, "fleet");
        let opts = |token| SnapshotOptions { fencing_token: token, threads: 1, ..SnapshotOptions::default() };
        let fleet = ReferenceFleet::new(2_000, 7);
        let mut old_cache = NodeCache::new();
        fleet.load_into(&mut old_cache).unwrap();
        let mut new_cache = NodeCache::new();
        ReferenceFleet::new(3_000, 8).load_into(&mut new_cache).unwrap();

        // Term 1 writes a generation, then starts another: its chunks are stored, its commit pending.
        write_snapshot(&old_term, &old_cache, &opts(1), fleet.now()).await.unwrap();
        let g = old_term.next_generation().await.unwrap();
        let late = encode_snapshot(&old_cache, g, fleet.now(), &opts(1)).unwrap();
        for (i, chunk) in late.chunks.iter().enumerate() {
            old_term.put_chunk(g, i as u32, chunk).await.unwrap();
        }
        // Term 2 begins and writes.
        let newer = write_snapshot(&new_term, &new_cache, &opts(2), fleet.now()).await.unwrap();
        assert_eq!(newer.fencing_token, 2);

        // The deposed writer's commit, a whole write and a prune are refused.
        let err = old_term.commit(&late.manifest).await.unwrap_err();
        assert!(
            matches!(err, SnapshotError::Fenced { token: 1, newer_token: 2, newer_generation, .. } if newer_generation == newer.generation),
            "{err:?}"
        );
        eprintln!("refused: {err}");
        let err = write_snapshot(&old_term, &old_cache, &opts(1), fleet.now()).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Fenced { .. }), "{err:?}");
        let err = old_term.prune_fenced(1, 1).await.unwrap_err();
        assert!(matches!(err, SnapshotError::Fenced { .. }), "{err:?}");

        // The newer generation survives, is the latest, and restores whole.
        let restored = restore_latest(&new_term, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(restored.manifest, newer);
        assert!(restored.faults.is_empty(), "{:?}", restored.faults);
        assert_eq!(restored.cache.len(), 3_000);
        let listed = new_term.list_manifests().await.unwrap();
        assert!(listed.iter().all(|m| m.generation <= newer.generation), "{listed:?}");
        for i in 0..newer.chunk_count {
            assert!(new_term.get_chunk(newer.generation, i).await.unwrap().is_some(), "chunk {i} kept");
        }
    })
    .await;
}

/// The `Accepted` condition of EdgeWorkload `name`, once the controller has written one.
async fn accepted(api: &Api<EdgeWorkload>, name: &str) -> Condition {
    eventually(Duration::from_secs(60), &format!("{name}: Accepted condition"), || {
        let api = api.clone();
        async move {
            let o = api.get(name).await.ok()?;
            o.status?.conditions.into_iter().find(|c| c.type_ == "Accepted")
        }
    })
    .await
}

/// Issue 12, admission limits: the apiserver refuses (422, naming the field) an EdgeWorkload no agent
/// could decode wherever a per-field limit can say so, and accepts one at each limit. What the schema
/// cannot say (the spec's total size, selector terms counted across requirements and values) the
/// controller refuses with `Accepted=False` naming the size and the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn the_schema_refuses_what_agents_cannot_decode_and_the_controller_the_rest() {
    use serde_json::{Value, json};
    timed(async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-limits").await;
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("kole.dev", "v1alpha1", "EdgeWorkload"));
        let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        let env = |n: usize, len: usize| -> Value {
            (0..n).map(|i| json!({"name": format!("V{i:03}"), "value": "v".repeat(len)})).collect()
        };
        let values = |n: usize, len: usize| -> Value {
            (0..n).map(|i| format!("{i:03}{}", "v".repeat(len - 3))).collect()
        };
        let labels = |n: usize| -> Value {
            (0..n).map(|i| (format!("k{i:03}"), json!("v".repeat(63)))).collect::<serde_json::Map<_, _>>().into()
        };
        let expr = |vals: Value| json!({"selector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": vals}]}});
        let rt = |runtime: Value| json!({"runtime": runtime});
        let with = |mut base: Value, extra: Value| {
            base["runtime"] = json!({"image": "cdn:1"});
            if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            base
        };
        let create = |name: &str, spec: Value| {
            let mut o = DynamicObject::new(name, &ar);
            o.data = json!({ "spec": spec });
            let raw = raw.clone();
            async move { raw.create(&PostParams::default(), &o).await }
        };

        // Over a limit: (object, spec, the field the apiserver's message names).
        let over: Vec<(&str, Value, &str)> = vec![
            ("env-count", rt(json!({"image": "cdn:1", "env": env(300, 1)})), "spec.runtime.env"),
            ("env-value", rt(json!({"image": "cdn:1", "env": env(1, 60 * 1024 + 1)})), "spec.runtime.env.value"),
            ("values", with(json!({}), expr(values(300, 3))), "spec.selector.matchExpressions.values"),
            ("value-len", with(json!({}), expr(values(1, 64))), "spec.selector.matchExpressions.values"),
            ("label-count", with(json!({}), json!({"selector": {"matchLabels": labels(129)}})), "spec.selector.matchLabels"),
            ("image-len", rt(json!({"image": "i".repeat(513)})), "spec.runtime.image"),
            // 300 characters but 600 bytes: the agents count bytes.
            ("image-bytes", rt(json!({"image": "é".repeat(300)})), "spec.runtime.image"),
            ("arg-len", rt(json!({"image": "cdn:1", "args": ["a".repeat(60 * 1024 + 1)]})), "spec.runtime.args"),
            ("config-len", rt(json!({"image": "cdn:1", "config": "c".repeat(60 * 1024 + 1)})), "spec.runtime.config"),
            ("group-len", with(json!({}), json!({"delivery": {"mode": "Group", "group": "g".repeat(129)}})), "spec.delivery.group"),
        ];
        for (name, spec, field) in over {
            let res = create(name, spec).await;
            let named = matches!(&res, Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains(field));
            assert!(named, "{name}: want a 422 naming {field}, got {res:?}");
        }

        // At each limit: stored by the apiserver.
        let at: Vec<(&str, Value)> = vec![
            ("env-count", rt(json!({"image": "cdn:1", "env": env(256, 1)}))),
            // A certificate in an env value, a script in an argument: larger than any other string.
            ("env-value", rt(json!({"image": "cdn:1", "env": env(1, 8 * 1024)}))),
            ("values", with(json!({}), expr(values(255, 63)))),
            ("label-count", with(json!({}), json!({"selector": {"matchLabels": labels(128)}}))),
            ("image-len", rt(json!({"image": "i".repeat(512)}))),
            ("arg-len", rt(json!({"image": "cdn:1", "args": ["a".repeat(8 * 1024)]}))),
            ("group-len", with(json!({}), json!({"delivery": {"mode": "Group", "group": "g".repeat(128)}}))),
            // Within every per-field limit, over what agents decode as a whole: the controller's part.
            ("spec-bytes", rt(json!({"image": "cdn:1", "config": "c".repeat(60 * 1024)}))),
            (
                "terms",
                with(
                    json!({}),
                    json!({"selector": {"matchExpressions": (0..128)
                        .map(|i| json!({"key": format!("k{i:03}"), "operator": "In", "values": ["a", "b"]}))
                        .collect::<Vec<_>>()}}),
                ),
            ),
        ];
        for (name, spec) in at {
            let res = create(name, spec).await;
            assert!(res.is_ok(), "{name}: at the limit, want it stored, got {res:?}");
        }

        let hub = hub();
        let ctl = ControllerUnderTest::start(&client, &ns, &hub, None).await;
        let api: Api<EdgeWorkload> = Api::namespaced(client.clone(), &ns);
        for name in ["env-count", "env-value", "values", "label-count", "image-len", "arg-len", "group-len"] {
            let c = accepted(&api, name).await;
            assert_eq!(c.status, "True", "{name}: {c:?}");
        }
        // The runtime spec is 60 KiB of config plus its header and fields: over the agents' 61440.
        let c = accepted(&api, "spec-bytes").await;
        assert_eq!(c.status, "False", "{c:?}");
        assert!(c.message.contains("spec.runtime") && c.message.contains("more than the limit of 61440"), "{c:?}");
        // 128 requirements and 256 values: 384 selector terms, over the agents' 256.
        let c = accepted(&api, "terms").await;
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "CommandRejected"), "{c:?}");
        assert!(c.message.contains("384 exceeds max_selector_terms = 256"), "{c:?}");
        ctl.stop().await;
    })
    .await;
}
