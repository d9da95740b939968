//! Restoring from a store: the newest generation that checks out, falling back generation by
//! generation, never a partial cache.

use super::{Manifest, RestoreFault, RestoreLimits, SnapshotError, SnapshotStore, decode_snapshot};
use crate::cache::NodeCache;

/// A restored cache and where it came from.
#[derive(Debug)]
pub struct Restored {
    /// The rebuilt cache (boot ids and heartbeat sequences are unknown until nodes speak again).
    pub cache: NodeCache,
    /// The generation it was rebuilt from.
    pub manifest: Manifest,
    /// Newer generations that were skipped, and why (empty when the newest one was used).
    pub faults: Vec<RestoreFault>,
}

/// Rebuilds the cache from the newest usable generation in `store`.
///
/// Returns `Ok(None)` when the store holds no complete generation, and
/// [`SnapshotError::NoUsableGeneration`] (listing every fault) when it holds some but none
/// restores. Store errors while listing are returned as they are.
pub async fn restore_latest(
    store: &dyn SnapshotStore,
    limits: &RestoreLimits,
) -> Result<Option<Restored>, SnapshotError> {
    let manifests = store.list_manifests().await?;
    if manifests.is_empty() {
        return Ok(None);
    }
    let mut faults = Vec::new();
    for manifest in manifests {
        match restore_generation(store, &manifest, limits).await {
            Ok(cache) => {
                return Ok(Some(Restored { cache, manifest, faults }));
            }
            Err(error) => faults.push(RestoreFault { generation: manifest.generation, error }),
        }
    }
    Err(SnapshotError::NoUsableGeneration { faults })
}

/// Rebuilds the cache of one generation of `store`.
pub async fn restore_generation(
    store: &dyn SnapshotStore,
    manifest: &Manifest,
    limits: &RestoreLimits,
) -> Result<NodeCache, SnapshotError> {
    let chunks = fetch_chunks(store, manifest, limits).await?;
    decode_snapshot(manifest, &chunks, limits)
}

/// Fetches every chunk a manifest lists, in index order (for [`decode_snapshot`] or
/// [`verify`](super::verify)); a missing one is an error naming it.
pub async fn fetch_chunks(
    store: &dyn SnapshotStore,
    manifest: &Manifest,
    limits: &RestoreLimits,
) -> Result<Vec<Vec<u8>>, SnapshotError> {
    manifest.validate()?;
    if manifest.chunk_count > limits.max_chunks {
        return Err(SnapshotError::LimitExceeded {
            generation: manifest.generation,
            what: "the chunk count",
            value: u64::from(manifest.chunk_count),
            limit: u64::from(limits.max_chunks),
        });
    }
    let mut chunks = Vec::with_capacity(manifest.chunks.len());
    for index in 0..manifest.chunk_count {
        match store.get_chunk(manifest.generation, index).await? {
            Some(c) => chunks.push(c),
            None => {
                return Err(SnapshotError::MissingChunk { generation: manifest.generation, index });
            }
        }
    }
    Ok(chunks)
}
