//! Builds a small reference fleet, snapshots it into a directory, restores it and queries it.
//!
//! ```text
//! cargo run -p kole-examples --example snapshot_roundtrip -- /tmp/kole-snapshots
//! ```

use clap::Parser;
use kole_core::cache::{CacheQuery, NodeCache, StateCache};
use kole_core::model::{NodePhase, Selector};
use kole_core::snapshot::{DirSnapshotStore, RestoreLimits, SnapshotOptions, restore_latest, write_snapshot};
use kole_sim::dataset::ReferenceFleet;

/// Snapshots a small reference fleet into a directory, restores it and queries it.
#[derive(Debug, Parser)]
#[command(name = "snapshot_roundtrip")]
struct Cli {
    /// Directory of the snapshot store [default: `kole-example` in the temp dir].
    dir: Option<std::path::PathBuf>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let dir = cli.dir.unwrap_or_else(|| std::env::temp_dir().join("kole-example")).display().to_string();
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

    let offline_cdn = CacheQuery {
        selector: Selector::parse("kole.dev/site-type=cdn,topology.kubernetes.io/region in (cn-hangzhou,eu-west-1)")?,
        phase: Some(NodePhase::Offline),
        limit: 5,
        ..CacheQuery::default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn takes_one_optional_directory() {
        let cli = Cli::try_parse_from(["snapshot_roundtrip", "/tmp/kole-snapshots"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.dir.as_deref(), Some(std::path::Path::new("/tmp/kole-snapshots")));
        assert!(Cli::try_parse_from(["snapshot_roundtrip"]).is_ok_and(|c| c.dir.is_none()));
        assert!(Cli::try_parse_from(["snapshot_roundtrip", "a", "b"]).is_err());
    }
}
