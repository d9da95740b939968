//! End to end: the reference fleet of 100,000 nodes written to the directory store (the embedded
//! default), then restored by a fresh process-like path, node for node; a rotted newest
//! generation falls back to the previous one.

use std::time::Duration;

use kole_core::cache::{NodeCache, StateCache};
use kole_core::model::{Selector, Timestamp};
use kole_core::snapshot::{
    DirSnapshotStore, RestoreLimits, SnapshotError, SnapshotOptions, SnapshotStore, restore_latest, write_snapshot,
};
use kole_sim::dataset::ReferenceFleet;
use kole_tests::fixtures::scratch_dir;

const NODES: usize = 100_000;

#[tokio::test(flavor = "current_thread")]
async fn restores_100k_reference_nodes_through_the_directory_store() {
    tokio::time::timeout(Duration::from_secs(300), async {
        let dir = scratch_dir("dir100k");
        let fleet = ReferenceFleet::new(NODES, 7);
        let mut cache = NodeCache::with_capacity(NODES, 28);
        fleet.load_into(&mut cache).unwrap();

        let store = DirSnapshotStore::open(&dir).unwrap();
        let opts = SnapshotOptions::default();
        let m1 = write_snapshot(&store, &cache, &opts, fleet.now()).await.unwrap();
        assert_eq!(m1.node_count, NODES as u64);
        assert!(m1.chunk_count >= 1);

        // A second write into the same directory is the next generation.
        cache.remove(&fleet.name(0));
        let m2 = write_snapshot(&store, &cache, &opts, Timestamp::from_secs(fleet.now().as_millis() / 1000 + 60))
            .await
            .unwrap();
        assert_eq!(m2.generation, m1.generation + 1);

        // A fresh store over the same directory (as after a process restart) restores generation 2.
        let reopened = DirSnapshotStore::open(&dir).unwrap();
        let restored = restore_latest(&reopened, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(restored.manifest.generation, m2.generation);
        assert!(restored.faults.is_empty());
        let back = restored.cache;
        assert_eq!(back.len(), NODES - 1);
        assert_eq!(back.counts(&Selector::everything()), cache.counts(&Selector::everything()));
        let cdn = Selector::parse("kole.dev/site-type=cdn,env!=staging").unwrap();
        assert_eq!(back.counts(&cdn), cache.counts(&cdn));
        for i in (1..NODES).step_by(97) {
            let name = fleet.name(i);
            assert_eq!(back.get(&name), cache.get(&name), "node {name}");
        }
        assert!(back.get(&fleet.name(0)).is_none());
        back.check_invariants().unwrap();

        // Rot one chunk of the newest generation on disk: restore falls back to generation 1 and
        // says which chunk of which generation was bad.
        let victim = reopened.chunk_path(m2.generation, m2.chunk_count - 1);
        let mut bytes = std::fs::read(&victim).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
        std::fs::write(&victim, bytes).unwrap();
        let restored = restore_latest(&reopened, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(restored.manifest.generation, m1.generation);
        assert_eq!(restored.cache.len(), NODES);
        assert_eq!(restored.faults.len(), 1);
        let fault = restored.faults[0].to_string();
        assert!(fault.contains(&m2.generation.to_string()), "{fault}");

        // Rot the older one too: nothing usable is an error listing both, never a partial cache.
        let victim = reopened.chunk_path(m1.generation, 0);
        std::fs::write(&victim, b"garbage").unwrap();
        match restore_latest(&reopened, &RestoreLimits::default()).await {
            Err(SnapshotError::NoUsableGeneration { faults }) => assert_eq!(faults.len(), 2),
            other => panic!("expected NoUsableGeneration, got {:?}", other.map(|r| r.map(|r| r.manifest.generation))),
        }
        let listed = reopened.list_manifests().await.unwrap();
        assert_eq!(listed.len(), 2, "rotted generations are reported, not deleted");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .unwrap();
}
