//! Benchmark of the edgenodes aggregated API through a real kube-apiserver: list N edge nodes in
//! pages of 500, the first page's latency, and the memory of open watches; beside it, listing
//! Kubernetes `Node` objects the same way (what KubeEdge and OpenYurt users pay: one object per
//! node in etcd).
//!
//! ```text
//! export KOLE_TEST_KUBECONFIG="$(bash .ci/kube.sh start | tail -n 1)"
//! CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo run -p kole-kube --example edgenodes_bench -- --nodes 1000000 --node-objects 10000
//! ```
//!
//! The edge nodes are synthetic registrations (three regions, two tiers, two architectures, one
//! address each) put straight into the cache: what is measured is serving, not registering.

#[path = "../tests/common/aggregated.rs"]
mod aggregated;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kole_core::cache::{NodeCache, StateCache, shared};
use kole_core::model::Timestamp;
use kole_kube::edgenodes::{
    EdgeNodeApiConfig, EdgeNodeServer, FrontProxyConfig, NodeSource, ServingCert, SubjectAccessReviewer,
};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::Value;

/// Lists edge nodes through the apiserver's aggregation layer, and Node objects for comparison.
#[derive(Parser, Debug)]
struct Args {
    /// Edge nodes in the cache.
    #[arg(long, default_value_t = 1_000_000)]
    nodes: usize,
    /// Page size.
    #[arg(long, default_value_t = 500)]
    page: usize,
    /// Watches to open through the apiserver for the memory figure.
    #[arg(long, default_value_t = 200)]
    watches: usize,
    /// Kubernetes Node objects to create and list the same way (0: skip).
    #[arg(long, default_value_t = 0)]
    node_objects: usize,
    /// The kubeconfig of the apiserver (started with the front-proxy flags, as `.ci/kube.sh` does).
    #[arg(long, env = "KOLE_TEST_KUBECONFIG")]
    kubeconfig: String,
}

/// A `Node` as a kubelet reports one (labels, addresses, five conditions, capacity, node info; no
/// image list, which would make it several times larger).
fn node_object(name: &str) -> Node {
    let conditions: Vec<Value> = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready", "NetworkUnavailable"]
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": t, "status": if *t == "Ready" { "True" } else { "False" },
                "lastHeartbeatTime": "2026-12-01T04:00:00Z", "lastTransitionTime": "2026-11-30T04:00:00Z",
                "reason": format!("Kubelet{t}"), "message": format!("kubelet reports {t}"),
            })
        })
        .collect();
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64",
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "arm64",
                "node.kubernetes.io/instance-type": "edge-box", "topology.kubernetes.io/region": "eu-west",
                "tier": "std",
            },
            "annotations": { "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true" },
        },
        "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"] },
        "status": {
            "addresses": [{ "type": "InternalIP", "address": "10.0.1.17" }, { "type": "Hostname", "address": name }],
            "capacity": { "cpu": "4", "memory": "8049476Ki", "pods": "110", "ephemeral-storage": "61255492Ki", "hugepages-2Mi": "0" },
            "allocatable": { "cpu": "4", "memory": "7947076Ki", "pods": "110", "ephemeral-storage": "56453061201", "hugepages-2Mi": "0" },
            "conditions": conditions,
            "daemonEndpoints": { "kubeletEndpoint": { "Port": 10250 } },
            "nodeInfo": {
                "machineID": "6f1c0b8e2a4d4b0e9f7a3c5d1e2f3a4b", "systemUUID": "6f1c0b8e-2a4d-4b0e-9f7a-3c5d1e2f3a4b",
                "bootID": "0d8e5f7a-1b2c-4d3e-8f9a-0b1c2d3e4f5a", "kernelVersion": "6.1.0-18-arm64",
                "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.13",
                "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "arm64",
            },
        },
    });
    serde_json::from_value(v).expect("a Node")
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn list_all(client: &Client, base: &str, page: usize) -> (usize, usize, Duration) {
    let t = Instant::now();
    let (mut items, mut pages) = (0, 0);
    let mut uri = format!("{base}?limit={page}");
    loop {
        let v: Value = client.request(http::Request::get(&uri).body(Vec::new()).unwrap()).await.expect("list page");
        pages += 1;
        items += v["items"].as_array().map_or(0, Vec::len);
        match v["metadata"]["continue"].as_str().filter(|c| !c.is_empty()) {
            Some(c) => uri = format!("{base}?limit={page}&continue={c}"),
            None => return (items, pages, t.elapsed()),
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(&args.kubeconfig).expect("read the kubeconfig");
    let client =
        Client::try_from(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap()).unwrap();
    let ns = format!("edgenodes-bench-{}", std::process::id());
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace { metadata: ObjectMeta { name: Some(ns.clone()), ..Default::default() }, ..Default::default() },
        )
        .await
        .unwrap();

    let t = Instant::now();
    let (writer, store) = shared(NodeCache::with_capacity(args.nodes, 14));
    {
        let mut w = writer.write();
        for i in 0..args.nodes {
            w.register(&aggregated::registration(i), 1, Timestamp::from_secs(1_700_000_000)).unwrap();
        }
    }
    println!("cache: {} edge nodes in {:.1} s", args.nodes, t.elapsed().as_secs_f64());
    let source = NodeSource::new();
    source.set_live(store);
    let cfg = EdgeNodeApiConfig {
        listen: SocketAddr::from(([0, 0, 0, 0], 0)),
        max_watches: args.watches + 10,
        ..Default::default()
    };
    let front_proxy = FrontProxyConfig::from_cluster(&client).await.expect("front-proxy settings");
    let authz = Arc::new(SubjectAccessReviewer::new(client.clone(), cfg.authz_cache_ttl));
    let cert = ServingCert::SelfSigned { names: vec![format!("{}.{ns}.svc", aggregated::SERVICE)] };
    let server = EdgeNodeServer::bind(cfg, cert, front_proxy, source, authz).await.unwrap();
    let (port, ca) = (server.local_addr().port(), server.self_signed_pem().unwrap().to_owned());
    tokio::spawn(server.run(std::future::pending()));
    aggregated::register(&client, &ns, port, &ca).await;

    let base = "/apis/edge.kole.dev/v1alpha1/edgenodes";
    let mut first = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let v: Value = client
            .request(http::Request::get(format!("{base}?limit={}", args.page)).body(Vec::new()).unwrap())
            .await
            .unwrap();
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(v["items"].as_array().unwrap().len(), args.page.min(args.nodes));
    }
    first.sort_by(f64::total_cmp);
    println!(
        "first page of {} through the apiserver: median {:.1} ms (min {:.1}, max {:.1}, 7 runs)",
        args.page, first[3], first[0], first[6]
    );
    let (items, pages, took) = list_all(&client, base, args.page).await;
    assert_eq!(items, args.nodes, "every edge node listed once");
    println!(
        "list of every edge node through the apiserver: {items} items in {pages} pages of {} in {:.1} s ({:.0} items/s)",
        args.page,
        took.as_secs_f64(),
        items as f64 / took.as_secs_f64()
    );

    if args.watches > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = rss_bytes();
        let mut streams = Vec::new();
        let rv = {
            let v: Value =
                client.request(http::Request::get(format!("{base}?limit=1")).body(Vec::new()).unwrap()).await.unwrap();
            v["metadata"]["resourceVersion"].as_str().unwrap().to_owned()
        };
        for i in 0..args.watches {
            let sel = format!("region%3D{}", aggregated::REGIONS[i % 3]);
            let req = http::Request::get(format!("{base}?watch=true&resourceVersion={rv}&labelSelector={sel}"))
                .body(Vec::new())
                .unwrap();
            streams.push(client.request_stream(req).await.expect("watch").lines());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_bytes();
        // Every watch sees a change: one node of each region goes offline.
        let t = Instant::now();
        {
            let mut w = writer.write();
            for i in 0..3 {
                w.set_phase(aggregated::registration(i).name.as_str(), kole_core::model::NodePhase::Offline).unwrap();
            }
        }
        for s in &mut streams {
            let line = tokio::time::timeout(Duration::from_secs(30), s.next())
                .await
                .expect("event")
                .expect("open")
                .expect("read");
            assert!(line.contains("MODIFIED"), "{line}");
        }
        println!(
            "{} watches open through the apiserver: {:.1} KiB RSS each (this process: server and client ends), one change reached all in {:.2} s",
            args.watches,
            after.saturating_sub(before) as f64 / 1024.0 / args.watches as f64,
            t.elapsed().as_secs_f64()
        );
        drop(streams);
    }

    if args.node_objects > 0 {
        let nodes: Api<Node> = Api::all(client.clone());
        let t = Instant::now();
        let names: Vec<String> = (0..args.node_objects).map(|i| format!("bench-node-{i:07}")).collect();
        futures::stream::iter(names.iter().cloned())
            .for_each_concurrent(32, |name| {
                let nodes = nodes.clone();
                async move {
                    let _ = nodes.create(&PostParams::default(), &node_object(&name)).await;
                }
            })
            .await;
        let size = serde_json::to_vec(&node_object("bench-node-0000000")).map_or(0, |v| v.len());
        println!(
            "created {} Node objects ({size} B of JSON each) in {:.1} s",
            args.node_objects,
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let (mut items, mut pages) = (0usize, 0usize);
        let mut lp = ListParams::default().limit(args.page as u32);
        loop {
            let l = nodes.list(&lp).await.unwrap();
            pages += 1;
            items += l.items.len();
            match l.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => break,
            }
        }
        let took = t.elapsed().as_secs_f64();
        println!(
            "list of {items} Node objects in {pages} pages of {}: {took:.1} s ({:.0} items/s)",
            args.page,
            items as f64 / took
        );
        futures::stream::iter(names)
            .for_each_concurrent(32, |name| {
                let nodes = nodes.clone();
                async move {
                    let _ = nodes.delete(&name, &DeleteParams::default()).await;
                }
            })
            .await;
    }
    aggregated::unregister(&client).await;
    let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &DeleteParams::default()).await;
}
