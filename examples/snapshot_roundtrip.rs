//! Builds a small reference fleet, snapshots it into a directory, restores it and queries it.
//!
//! ```text
//! cargo run -p kole-examples --example snapshot_roundtrip -- /tmp/kole-snapshots
//! ```

use kole_core::cache::{NodeCache, NodeQuery, StateCache};
use kole_core::model::{NodePhase, Selector};
use kole_core::snapshot::{DirSnapshotStore, RestoreLimits, SnapshotOptions, restore_latest, write_snapshot};
use kole_sim::dataset::ReferenceFleet;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir =
        std::env::args().nth(1).unwrap_or_else(|| std::env::temp_dir().join("kole-example").display().to_string());
    let rt = tokio::runtime::Builder::new_current_thread().build()?;

    let fleet = ReferenceFleet::new(50_000, 1);
    let mut cache = NodeCache::with_capacity(fleet.len(), 28);
    fleet.load_into(&mut cache)?;

    let store = DirSnapshotStore::open(&dir)?;
    let manifest = rt.block_on(write_snapshot(&store, &cache, &SnapshotOptions::default(), fleet.now()))?;
    println!(
        "wrote generation {} to {dir}: {} nodes in {} chunks, {} bytes",
        manifest.generation, manifest.node_count, manifest.chunk_count, manifest.total_bytes
    );

    let restored = rt.block_on(restore_latest(&store, &RestoreLimits::default()))?.ok_or("no snapshot")?;
    let cache = restored.cache;
    println!("restored generation {}: {} nodes", restored.manifest.generation, cache.len());

    let offline_cdn = NodeQuery {
        selector: Selector::parse("kole.dev/site-type=cdn,topology.kubernetes.io/region in (cn-hangzhou,eu-west-1)")?,
        phase: Some(NodePhase::Offline),
        limit: 5,
        ..NodeQuery::default()
    };
    let page = cache.query(&offline_cdn);
    println!(
        "offline CDN nodes in cn-hangzhou or eu-west-1: {} (of {} matching); first page:",
        page.counts.offline,
        page.counts.total()
    );
    for node in &page.items {
        println!("  {} last seen {} ms, labels {:?}", node.name, node.last_seen.as_millis(), node.labels);
    }
    Ok(())
}
