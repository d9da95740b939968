//! The contract of [`SnapshotStore`]: what every store of snapshot generations must do.
//!
//! [`check`] runs every check below, each on a fresh store from the caller's factory:
//!
//! 1. **An empty store** numbers its first generation 1, lists nothing, has no chunk, and prunes
//!    without error.
//! 2. **Chunks** read back byte for byte; writing a chunk again replaces it (the leftover of an
//!    interrupted write); a generation with chunks but no committed manifest is *not listed*, yet
//!    counts for [`next_generation`](SnapshotStore::next_generation) ("above every generation
//!    present, complete or not").
//! 3. **Commit** makes a generation listed with the manifest read back equal; committing the same
//!    manifest again lists it once; a later generation is listed first (newest first); a restore
//!    through the store rebuilds the cache that was written.
//! 4. **A missing chunk** is `None` from [`get_chunk`](SnapshotStore::get_chunk) (not an error), so a
//!    restore reports [`SnapshotError::MissingChunk`] naming the generation and index.
//! 5. **Prune** keeps the newest `keep` complete generations and removes older ones and every
//!    incomplete generation, chunks included.
//!
//! The trait documents no refusal of a conflicting commit (a store may serialize concurrent commits,
//! as `KubeSnapshotStore` does with `resourceVersion` preconditions and retries), so none is checked
//! here; nor does it fix what `prune(0)` does (`KubeSnapshotStore` keeps at least one generation).

use std::time::Duration;

use kole_core::cache::{NodeCache, StateCache};
use kole_core::model::{Selector, Timestamp};
use kole_core::snapshot::{
    EncodedSnapshot, Manifest, RestoreLimits, SnapshotError, SnapshotOptions, SnapshotStore, encode_snapshot,
    restore_generation, restore_latest,
};

use crate::{bounded, fixtures};

/// Bound on each store call: generous for a store on a remote apiserver, short enough to fail a hang.
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// Runs every check of the module documentation. `fresh` returns a new, empty store each time it is
/// called (a fresh directory, a fresh object name on the apiserver). Panics at the first broken rule.
pub async fn check<S: SnapshotStore>(mut fresh: impl AsyncFnMut() -> S) {
    empty_store(&fresh().await).await;
    chunks_round_trip(&fresh().await).await;
    commit_lists_newest_first_and_restores(&fresh().await).await;
    missing_chunk_is_reported(&fresh().await).await;
    prune_keeps_the_newest_complete_generations(&fresh().await).await;
}

/// Check 1: an empty store.
pub async fn empty_store(store: &dyn SnapshotStore) {
    assert_eq!(call("next_generation", store.next_generation()).await, 1, "an empty store's first generation is 1");
    assert!(call("list_manifests", store.list_manifests()).await.is_empty(), "an empty store lists no generation");
    assert_eq!(call("get_chunk", store.get_chunk(1, 0)).await, None, "an empty store has no chunk");
    call("prune(1)", store.prune(1)).await;
    assert!(call("list_manifests", store.list_manifests()).await.is_empty());
}

/// Check 2: chunks read back and replace; an uncommitted generation is not listed but is counted.
pub async fn chunks_round_trip(store: &dyn SnapshotStore) {
    let g = call("next_generation", store.next_generation()).await;
    let snap = encoded(&fixtures::small_cache(), g, 1);
    put_all(store, &snap).await;
    for (i, chunk) in snap.chunks.iter().enumerate() {
        let back = call("get_chunk", store.get_chunk(g, i as u32)).await;
        assert_eq!(back.as_deref(), Some(&chunk[..]), "chunk {i} of generation {g} reads back as written");
    }
    assert!(
        call("list_manifests", store.list_manifests()).await.is_empty(),
        "generation {g} has chunks but no committed manifest: it must not be listed"
    );
    let next = call("next_generation", store.next_generation()).await;
    assert!(next > g, "next_generation must be above every generation present, complete or not: {next} <= {g}");

    // A second write of the same chunk (an interrupted write's leftover) replaces it.
    call("put_chunk (replace)", store.put_chunk(g, 0, b"leftover of an interrupted write")).await;
    call("put_chunk (replace)", store.put_chunk(g, 0, &snap.chunks[0])).await;
    let back = call("get_chunk", store.get_chunk(g, 0)).await;
    assert_eq!(back.as_deref(), Some(&snap.chunks[0][..]), "put_chunk replaces an existing chunk");
}

/// Check 3: commit lists a generation once, newest first, and a restore reads it back.
pub async fn commit_lists_newest_first_and_restores(store: &dyn SnapshotStore) {
    let cache = fixtures::small_cache();
    let g1 = call("next_generation", store.next_generation()).await;
    let s1 = encoded(&cache, g1, 1);
    put_all(store, &s1).await;
    call("commit", store.commit(&s1.manifest)).await;
    assert_eq!(generations(store).await, [g1], "a committed generation is listed");
    assert_eq!(call("list_manifests", store.list_manifests()).await[0], s1.manifest, "the manifest reads back equal");
    call("commit (again)", store.commit(&s1.manifest)).await;
    assert_eq!(generations(store).await, [g1], "committing the same manifest again lists it once");

    let mut smaller = fixtures::small_cache();
    let gone = fixtures::node_name("edge-00");
    assert!(smaller.remove(gone.as_str()), "the fixture has {gone}");
    let g2 = call("next_generation", store.next_generation()).await;
    assert!(g2 > g1, "the next generation after {g1} must be above it, got {g2}");
    let s2 = encoded(&smaller, g2, 2);
    put_all(store, &s2).await;
    call("commit", store.commit(&s2.manifest)).await;
    assert_eq!(generations(store).await, [g2, g1], "generations are listed newest first");

    let restored = call("restore_latest", restore_latest(store, &RestoreLimits::default()))
        .await
        .unwrap_or_else(|| panic!("the store holds generations {g2} and {g1}, restore found none"));
    assert_eq!(restored.manifest, s2.manifest, "restore uses the newest generation");
    assert!(restored.faults.is_empty(), "no generation was damaged: {:?}", restored.faults);
    assert_same_nodes(&restored.cache, &smaller);
    let older = call("restore_generation", restore_generation(store, &s1.manifest, &RestoreLimits::default())).await;
    assert_same_nodes(&older, &cache);
}

/// Check 4: a chunk the manifest lists but the store lacks is `None`, and a restore names it.
pub async fn missing_chunk_is_reported(store: &dyn SnapshotStore) {
    let g = call("next_generation", store.next_generation()).await;
    let snap = encoded(&fixtures::small_cache(), g, 1);
    let missing = snap.manifest.chunk_count - 1;
    for (i, chunk) in snap.chunks.iter().enumerate().filter(|(i, _)| *i as u32 != missing) {
        call("put_chunk", store.put_chunk(g, i as u32, chunk)).await;
    }
    call("commit", store.commit(&snap.manifest)).await;
    assert_eq!(call("get_chunk", store.get_chunk(g, missing)).await, None, "chunk {missing} was never stored");
    assert_eq!(
        call("get_chunk", store.get_chunk(g, snap.manifest.chunk_count)).await,
        None,
        "no chunk past the last index"
    );
    assert_eq!(call("get_chunk", store.get_chunk(g + 1000, 0)).await, None, "no chunk of an unknown generation");
    match bounded(
        CALL_LIMIT,
        "restore_generation",
        restore_generation(store, &snap.manifest, &RestoreLimits::default()),
    )
    .await
    {
        Err(SnapshotError::MissingChunk { generation, index }) => {
            assert_eq!((generation, index), (g, missing), "the missing chunk is named");
        }
        Err(other) => panic!("expected MissingChunk for chunk {missing} of generation {g}, got {other}"),
        Ok(_) => panic!("restored generation {g} although chunk {missing} is missing"),
    }
}

/// Check 5: prune keeps the newest complete generations and removes the rest, incomplete ones too.
pub async fn prune_keeps_the_newest_complete_generations(store: &dyn SnapshotStore) {
    let cache = fixtures::small_cache();
    let mut complete = Vec::new();
    for n in 0..3u64 {
        let g = call("next_generation", store.next_generation()).await;
        let snap = encoded(&cache, g, 10 + n);
        put_all(store, &snap).await;
        call("commit", store.commit(&snap.manifest)).await;
        complete.push(snap);
    }
    // An interrupted write: chunks of the highest generation, never committed.
    let torn = call("next_generation", store.next_generation()).await;
    put_all(store, &encoded(&cache, torn, 99)).await;
    let [g1, g2, g3] = [0, 1, 2].map(|i| complete[i].manifest.generation);

    call("prune(2)", store.prune(2)).await;
    assert_eq!(generations(store).await, [g3, g2], "prune(2) keeps the two newest complete generations");
    assert_eq!(call("get_chunk", store.get_chunk(g1, 0)).await, None, "pruned generation {g1}'s chunks are removed");
    assert_eq!(call("get_chunk", store.get_chunk(torn, 0)).await, None, "incomplete generation {torn} is removed");
    for snap in &complete[1..] {
        let g = snap.manifest.generation;
        for (i, chunk) in snap.chunks.iter().enumerate() {
            let back = call("get_chunk", store.get_chunk(g, i as u32)).await;
            assert_eq!(back.as_deref(), Some(&chunk[..]), "kept generation {g} keeps chunk {i}");
        }
    }
    let next = call("next_generation", store.next_generation()).await;
    assert!(next > g3, "next_generation {next} must stay above the kept generation {g3}");

    call("prune(1)", store.prune(1)).await;
    assert_eq!(generations(store).await, [g3], "prune(1) keeps the newest complete generation");
    assert_eq!(call("get_chunk", store.get_chunk(g2, 0)).await, None, "pruned generation {g2}'s chunks are removed");
    let restored = call("restore_latest", restore_latest(store, &RestoreLimits::default())).await;
    assert_eq!(restored.map(|r| r.manifest.generation), Some(g3), "the kept generation restores");
}

/// Awaits one store call, bounded; panics naming it when it fails or hangs.
async fn call<T>(what: &str, f: impl Future<Output = Result<T, SnapshotError>>) -> T {
    bounded(CALL_LIMIT, what, f).await.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// `cache` encoded as generation `generation`, with a fixed snapshot id (so runs are repeatable).
fn encoded(cache: &NodeCache, generation: u64, snapshot_id: u64) -> EncodedSnapshot {
    let opts = SnapshotOptions { snapshot_id: Some(snapshot_id), threads: 1, ..SnapshotOptions::default() };
    let now = Timestamp::from_secs(fixtures::SMALL_CACHE_NOW.as_millis() / 1_000 + generation);
    encode_snapshot(cache, generation, now, &opts).unwrap_or_else(|e| panic!("encoding the fixture cache: {e}"))
}

async fn put_all(store: &dyn SnapshotStore, snap: &EncodedSnapshot) {
    let g = snap.manifest.generation;
    for (i, chunk) in snap.chunks.iter().enumerate() {
        call("put_chunk", store.put_chunk(g, i as u32, chunk)).await;
    }
}

async fn generations(store: &dyn SnapshotStore) -> Vec<u64> {
    call("list_manifests", store.list_manifests()).await.iter().map(|m: &Manifest| m.generation).collect()
}

fn assert_same_nodes(back: &NodeCache, want: &NodeCache) {
    assert_eq!(back.len(), want.len(), "restored node count");
    assert_eq!(back.counts(&Selector::everything()), want.counts(&Selector::everything()), "restored counts");
    for i in 0..12 {
        let name = fixtures::node_name(&format!("edge-{i:02}"));
        assert_eq!(back.get(name.as_str()), want.get(name.as_str()), "restored node {name}");
    }
}
