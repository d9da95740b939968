//! The edgenodes aggregated API on a real kube-apiserver: the test registers an `APIService`
//! pointing at its own server (on this machine's non-loopback address: Endpoints refuse loopback;
//! the apiserver runs with `--enable-aggregator-routing=true` and the front-proxy flags, see
//! `.ci/kube.sh`), then talks to it through the apiserver as `kubectl` does.
//!
//! `KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start | tail -n1) cargo test -p kole-kube --test edgenodes -- --include-ignored`

#![allow(missing_docs)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kole_core::cache::{CacheWriter, NodeCache, StateCache, shared};
use kole_core::model::{NodePhase, Timestamp};
use kole_kube::edgenodes::{
    EdgeNodeApiConfig, EdgeNodeServer, FrontProxyConfig, NodeSource, ServingCert, SubjectAccessReviewer,
};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::Value;

const BASE: &str = "/apis/edge.kole.dev/v1alpha1/edgenodes";

async fn impersonating(user: &str) -> Client {
    let path = std::env::var("KOLE_TEST_KUBECONFIG").unwrap();
    let kc = Kubeconfig::read_from(&path).unwrap();
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    cfg.auth_info.impersonate = Some(user.to_owned());
    cfg.auth_info.impersonate_groups = Some(vec!["system:authenticated".to_owned()]);
    Client::try_from(cfg).unwrap()
}

async fn get_json(client: &Client, uri: &str) -> Result<Value, kube::Error> {
    client.request::<Value>(http::Request::get(uri).body(Vec::new()).unwrap()).await
}

fn names(list: &Value) -> Vec<String> {
    list["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_owned()).collect()
}

struct Fixture {
    client: Client,
    writer: CacheWriter<NodeCache>,
    ns: String,
    server: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

async fn setup(nodes: usize) -> Fixture {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let client = common::client().await;
    let ns = common::namespace(&client, "edgenodes").await;
    let (writer, store) = shared(NodeCache::new());
    {
        let mut w = writer.write();
        for i in 0..nodes {
            w.register(&common::aggregated::registration(i), 1, Timestamp::from_secs(1_700_000_000)).unwrap();
        }
        for i in (0..nodes).filter(|i| i % 7 == 0) {
            w.set_phase(common::aggregated::registration(i).name.as_str(), NodePhase::Offline).unwrap();
        }
    }
    let source = NodeSource::new();
    source.set_live(store);
    let cfg = EdgeNodeApiConfig {
        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
        watch_interval: Duration::from_millis(200),
        authz_cache_ttl: Duration::from_secs(1),
        ..EdgeNodeApiConfig::default()
    };
    let front_proxy =
        FrontProxyConfig::from_cluster(&client).await.expect("the apiserver publishes its front-proxy settings");
    let authz = Arc::new(SubjectAccessReviewer::new(client.clone(), cfg.authz_cache_ttl));
    let cert = ServingCert::SelfSigned { names: vec![format!("{}.{ns}.svc", common::aggregated::SERVICE)] };
    let server = EdgeNodeServer::bind(cfg, cert, front_proxy, source, authz).await.expect("bind");
    let port = server.local_addr().port();
    let ca = server.self_signed_pem().unwrap().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));

    common::aggregated::register(&client, &ns, port, &ca).await;
    Fixture { client, writer, ns, server, stop }
}

impl Fixture {
    async fn teardown(self) {
        common::aggregated::unregister(&self.client).await;
        let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone())
            .delete(&self.ns, &DeleteParams::default())
            .await;
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn edgenodes_through_the_apiserver_list_select_page_get_and_watch() {
    let f = setup(1_000).await;
    let c = &f.client;

    // Discovery, as kubectl reads it.
    let rl = get_json(c, "/apis/edge.kole.dev/v1alpha1").await.unwrap();
    assert_eq!(rl["resources"][0]["name"], "edgenodes");
    assert_eq!(rl["resources"][0]["namespaced"], false);

    // Label selector: a third of the fleet.
    let eu = get_json(c, &format!("{BASE}?labelSelector=region%3Deu-west")).await.unwrap();
    assert_eq!(eu["kind"], "EdgeNodeList");
    assert_eq!(names(&eu).len(), 334);
    assert!(eu["items"].as_array().unwrap().iter().all(|i| i["metadata"]["labels"]["region"] == "eu-west"));
    let set = get_json(c, &format!("{BASE}?labelSelector=region%20in%20(eu-west,us-east),tier!%3Dgold")).await.unwrap();
    let want = (0..1000).filter(|i| i % 3 != 2 && i % 10 != 0).count();
    assert_eq!(names(&set).len(), want);

    // Field selectors on phase and platform.
    let off = get_json(c, &format!("{BASE}?fieldSelector=status.phase%3DOffline,status.arch%3Darm64")).await.unwrap();
    assert_eq!(names(&off).len(), (0..1000).filter(|i| i % 7 == 0 && i % 2 == 1).count());
    assert!(
        off["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"]["phase"] == "Offline" && i["status"]["arch"] == "arm64")
    );
    let bad = get_json(c, &format!("{BASE}?fieldSelector=spec.foo%3D1")).await.unwrap_err();
    match bad {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 400);
            assert!(s.message.contains("field label not supported: spec.foo"), "{}", s.message);
        }
        e => panic!("expected 400, got {e:?}"),
    }

    // Pages of 100 while the fleet churns: every node present throughout comes exactly once.
    let mut seen: Vec<String> = Vec::new();
    let mut uri = format!("{BASE}?limit=100");
    let mut pages = 0;
    let mut churned = 0usize;
    loop {
        let page = get_json(c, &uri).await.unwrap();
        pages += 1;
        seen.extend(names(&page));
        // Churn between pages: new nodes register, some of the earliest leave.
        if pages <= 3 {
            let mut w = f.writer.write();
            for i in 0..20 {
                w.register(
                    &common::aggregated::registration(5_000 + churned + i),
                    1,
                    Timestamp::from_secs(1_700_000_100),
                )
                .unwrap();
            }
            for i in 0..10 {
                w.remove(common::aggregated::registration(churned + i).name.as_str());
            }
            churned += 20;
        }
        match page["metadata"]["continue"].as_str() {
            Some(tok) => uri = format!("{BASE}?limit=100&continue={tok}"),
            None => break,
        }
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a node was returned twice");
    let removed: BTreeSet<String> = (0..10)
        .chain(20..30)
        .chain(40..50)
        .map(|i| common::aggregated::registration(i).name.as_str().to_owned())
        .collect();
    for i in 0..1000 {
        let n = common::aggregated::registration(i).name.as_str().to_owned();
        if !removed.contains(&n) {
            assert!(unique.contains(&n), "{n} was present throughout and never listed");
        }
    }
    assert!(pages >= 10, "{pages} pages");

    // Get one, and one that does not exist.
    let one = get_json(c, &format!("{BASE}/node-0000077")).await.unwrap();
    assert_eq!(one["kind"], "EdgeNode");
    assert_eq!(one["status"]["phase"], "Offline");
    assert_eq!(one["status"]["addresses"][0], "10.0.0.77");
    match get_json(c, &format!("{BASE}/no-such-node")).await.unwrap_err() {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        e => panic!("expected 404, got {e:?}"),
    }

    // Table output, as kubectl get asks for it.
    let req = http::Request::get(format!("{BASE}?limit=5"))
        .header(http::header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
        .body(Vec::new())
        .unwrap();
    let t: Value = c.request(req).await.unwrap();
    assert_eq!(t["kind"], "Table");
    let cols: Vec<&str> =
        t["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(&cols[..5], ["Name", "Phase", "Last Seen", "Workloads", "Platform"]);
    assert_eq!(t["rows"].as_array().unwrap().len(), 5);
    assert!(t["rows"][0]["object"]["metadata"]["labels"]["region"].is_string());

    // Watch from the list's version: an eu-west node going offline arrives, a us-east one does not.
    let list = get_json(c, &format!("{BASE}?labelSelector=region%3Deu-west&limit=1")).await.unwrap();
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    let req = http::Request::get(format!(
        "{BASE}?watch=true&labelSelector=region%3Deu-west&resourceVersion={rv}&allowWatchBookmarks=true"
    ))
    .body(Vec::new())
    .unwrap();
    let mut lines = c.request_stream(req).await.unwrap().lines();
    f.writer.write().set_phase("node-0000502", NodePhase::Offline).unwrap(); // 502 % 3 == 1: us-east
    f.writer.write().set_phase("node-0000501", NodePhase::Offline).unwrap(); // 501 % 3 == 0: eu-west
    let ev = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let line = lines.next().await.expect("watch ended").expect("read");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["type"] != "BOOKMARK" {
                return v;
            }
        }
    })
    .await
    .expect("no watch event within 15 s");
    assert_eq!(ev["type"], "MODIFIED", "{ev}");
    assert_eq!(
        ev["object"]["metadata"]["name"], "node-0000501",
        "the us-east change must not reach an eu-west watch: {ev}"
    );
    assert_eq!(ev["object"]["status"]["phase"], "Offline");
    let ev_rv: u64 = ev["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(ev_rv > rv.parse::<u64>().unwrap());
    // A bookmark follows within the bookmark interval (10 s).
    let bm = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let line = lines.next().await.expect("watch ended").expect("read");
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["type"] == "BOOKMARK" {
                return v;
            }
        }
    })
    .await
    .expect("no bookmark");
    assert!(bm["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap() >= ev_rv);
    // A version from before this server's history: 410 Gone, list again.
    let req = http::Request::get(format!("{BASE}?watch=true&resourceVersion=1")).body(Vec::new()).unwrap();
    let mut lines = c.request_stream(req).await.unwrap().lines();
    let v: Value = serde_json::from_str(&lines.next().await.unwrap().unwrap()).unwrap();
    assert_eq!(v["type"], "ERROR");
    assert_eq!(v["object"]["code"], 410);
    f.teardown().await;
}

#[tokio::test]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn edgenodes_are_authorized_by_rbac_through_subject_access_reviews() {
    let f = setup(50).await;
    let user = format!("edge-viewer-{}", std::process::id());
    let viewer = impersonating(&user).await;
    match get_json(&viewer, BASE).await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message.contains(&format!("User \"{user}\" cannot list resource \"edgenodes\"")),
                "{}",
                s.message
            );
        }
        e => panic!("expected 403, got {e:?}"),
    }
    // Grant list and get; the server's decision cache (1 s here) expires and the list works.
    let role = ClusterRole {
        metadata: kube::api::ObjectMeta { name: Some(user.clone()), ..Default::default() },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["edge.kole.dev".into()]),
            resources: Some(vec!["edgenodes".into()]),
            verbs: vec!["get".into(), "list".into()],
            ..Default::default()
        }]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(f.client.clone()).create(&PostParams::default(), &role).await.unwrap();
    let binding = ClusterRoleBinding {
        metadata: kube::api::ObjectMeta { name: Some(user.clone()), ..Default::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: user.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.clone(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    Api::<ClusterRoleBinding>::all(f.client.clone()).create(&PostParams::default(), &binding).await.unwrap();
    let list = common::eventually(Duration::from_secs(15), "the viewer may list", || {
        let v = viewer.clone();
        async move { get_json(&v, BASE).await.ok() }
    })
    .await;
    assert_eq!(names(&list).len(), 50);
    // Watch was not granted.
    let req = http::Request::get(format!("{BASE}?watch=true")).body(Vec::new()).unwrap();
    match viewer.request_text(req).await.unwrap_err() {
        kube::Error::Api(s) => assert_eq!(s.code, 403),
        e => panic!("expected 403, got {e:?}"),
    }
    let _ = Api::<ClusterRoleBinding>::all(f.client.clone()).delete(&user, &DeleteParams::default()).await;
    let _ = Api::<ClusterRole>::all(f.client.clone()).delete(&user, &DeleteParams::default()).await;
    f.teardown().await;
}
