//! Figures through a real kube-apiserver (see `docs/benchmarks.md`):
//!
//! 1. snapshot write and restore of N reference nodes (`kole_sim::dataset::ReferenceFleet`) through
//!    `SnapshotChunk` / `SnapshotManifest` custom resources, and the number of chunk objects;
//! 2. the paper's baseline: LIST M `v1/Node` objects (paged, 500 per page, as a reflector does)
//!    against restoring M nodes from kole's snapshot.
//!
//! ```text
//! KOLE_TEST_KUBECONFIG=$(bash .ci/kube.sh start | tail -n 1)
//! cargo run --release -p kole-examples --example kube-bench -- 1000000 50000
//! ```
//! The Node objects are created once (it takes minutes) and left for later runs.

use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kole_core::cache::{NodeCache, StateCache};
use kole_core::snapshot::{RestoreLimits, SnapshotOptions, restore_latest, write_snapshot};
use kole_kube::snapshot::{KubeSnapshotConfig, KubeSnapshotStore};
use kole_sim::dataset::ReferenceFleet;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

async fn client() -> anyhow::Result<Client> {
    let path = std::env::var("KOLE_TEST_KUBECONFIG").context("set KOLE_TEST_KUBECONFIG")?;
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    Ok(Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?)
}

async fn snapshot_round(client: &Client, nodes: usize, ns: &str) -> anyhow::Result<(f64, f64, u32, u64)> {
    let fleet = ReferenceFleet::new(nodes, 42);
    let mut cache = NodeCache::new();
    fleet.load_into(&mut cache)?;
    let store = KubeSnapshotStore::new(
        client.clone(),
        KubeSnapshotConfig { namespace: ns.into(), name: format!("bench-{nodes}"), ..Default::default() },
    );
    let t = Instant::now();
    let m = write_snapshot(&store, &cache, &SnapshotOptions::default(), fleet.now()).await?;
    let write = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r = restore_latest(&store, &RestoreLimits::default()).await?.context("nothing restored")?;
    let restore = t.elapsed().as_secs_f64();
    anyhow::ensure!(r.cache.len() == nodes, "restored {} of {nodes}", r.cache.len());
    Ok((write, restore, m.chunk_count, m.total_bytes))
}

fn node_object(fleet: &ReferenceFleet, i: usize) -> Node {
    let r = fleet.node(i).registration;
    let mut n = Node::default();
    n.metadata.name = Some(fleet.name(i));
    n.metadata.labels = Some(r.labels.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect());
    let q = |s: &str| Quantity(s.to_owned());
    n.status = Some(NodeStatus {
        addresses: Some(
            r.info
                .addresses
                .iter()
                .map(|a| NodeAddress { type_: "InternalIP".into(), address: a.to_string() })
                .collect(),
        ),
        capacity: Some(
            [("cpu".to_owned(), q("4")), ("memory".to_owned(), q("8Gi")), ("pods".to_owned(), q("110"))].into(),
        ),
        allocatable: Some(
            [("cpu".to_owned(), q("4")), ("memory".to_owned(), q("7Gi")), ("pods".to_owned(), q("110"))].into(),
        ),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("KubeletReady".into()),
            message: Some("kubelet is posting ready status".into()),
            ..Default::default()
        }]),
        node_info: Some(NodeSystemInfo {
            architecture: r.info.arch.clone(),
            operating_system: "linux".into(),
            os_image: r.info.os.clone(),
            kubelet_version: r.info.agent_version.clone(),
            ..Default::default()
        }),
        ..Default::default()
    });
    n
}

/// Snapshot write and restore through a kube-apiserver, and LIST of Node objects against a restore.
///
/// The cluster is the one `KOLE_TEST_KUBECONFIG` names.
#[derive(Debug, Parser)]
#[command(name = "kube-bench")]
struct Cli {
    /// Reference nodes to snapshot and restore through the API server.
    #[arg(default_value_t = 1_000_000)]
    nodes: usize,
    /// Node objects to LIST, against restoring as many nodes from a snapshot.
    #[arg(default_value_t = 50_000)]
    list_nodes: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { nodes, list_nodes: list_n } = Cli::parse();
    // kole's libraries pick no rustls crypto provider; this program uses ring (an `Err` means one is set).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = client().await?;
    let ns = "kole-bench";
    let nsapi: Api<Namespace> = Api::all(client.clone());
    if nsapi.get_opt(ns).await?.is_none() {
        let mut o = Namespace::default();
        o.metadata.name = Some(ns.into());
        nsapi.create(&PostParams::default(), &o).await?;
    }

    let (w, r, chunks, bytes) = snapshot_round(&client, nodes, ns).await?;
    println!("snapshot {nodes} nodes: write {w:.2} s, restore {r:.2} s, {chunks} chunk objects, {bytes} bytes");

    // Baseline: M Node objects, created once.
    let fleet = ReferenceFleet::new(list_n, 42);
    let api: Api<Node> = Api::all(client.clone());
    let have = api.list_metadata(&ListParams::default().limit(1)).await?;
    let existing = have.metadata.remaining_item_count.unwrap_or(0) as usize + have.items.len();
    if existing < list_n {
        let t = Instant::now();
        let pp = PostParams::default();
        futures::stream::iter(existing..list_n)
            .map(|i| {
                let api = api.clone();
                let pp = pp.clone();
                let n = node_object(&fleet, i);
                async move {
                    api.create(&pp, &n).await.map(|_| ()).or_else(|e| match e {
                        kube::Error::Api(s) if s.code == 409 => Ok(()),
                        e => Err(e),
                    })
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        println!(
            "ensured {list_n} Node objects ({} missing before, 32 creates in flight) in {:.1} s",
            list_n - existing,
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    let mut count = 0;
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(500);
        if let Some(c) = &token {
            lp = lp.continue_token(c);
        }
        let page = api.list(&lp).await?;
        count += page.items.len();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => token = Some(c),
            None => break,
        }
    }
    let list = t.elapsed().as_secs_f64();
    let (_, r_small, chunks_small, _) = snapshot_round(&client, list_n, ns).await?;
    println!(
        "LIST {count} Node objects (pages of 500): {list:.2} s; restore {list_n} nodes from kole's snapshot ({chunks_small} chunks): {r_small:.3} s; ratio {:.0}x",
        list / r_small
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_command_line() {
        let cli = Cli::try_parse_from(["kube-bench", "1000000", "50000"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((cli.nodes, cli.list_nodes), (1_000_000, 50_000));
        let cli = Cli::try_parse_from(["kube-bench"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((cli.nodes, cli.list_nodes), (1_000_000, 50_000));
        assert!(Cli::try_parse_from(["kube-bench", "many"]).is_err());
        assert!(Cli::try_parse_from(["kube-bench", "1", "2", "3"]).is_err());
    }
}
