//! Writing a generation to a store: chunks first, then the manifest, then pruning.

use super::{Manifest, SnapshotError, SnapshotOptions, SnapshotStore, encode_snapshot};
use crate::cache::NodeCache;
use crate::model::Timestamp;

/// Snapshots `cache` into `store` as its next generation and returns the committed manifest.
///
/// Order: every chunk is stored, then the manifest is committed (the atomic switch: before it the
/// previous generation is the latest, after it this one is), then generations beyond
/// [`SnapshotOptions::keep_generations`] are pruned. A failure before the commit leaves the
/// previous generation in place; a failure while pruning is returned although the new
/// generation is already committed. The commit and the prune carry
/// [`SnapshotOptions::fencing_token`], so a store shared with a newer leader refuses them
/// ([`SnapshotError::Fenced`]).
///
/// Encoding is CPU work (about a second for a million nodes, on `opts.threads` threads) done
/// inside this future; call it where blocking that long is acceptable.
pub async fn write_snapshot(
    store: &dyn SnapshotStore,
    cache: &NodeCache,
    opts: &SnapshotOptions,
    now: Timestamp,
) -> Result<Manifest, SnapshotError> {
    opts.validate()?;
    let generation = store.next_generation().await?;
    let encoded = encode_snapshot(cache, generation, now, opts)?;
    for (index, chunk) in encoded.chunks.iter().enumerate() {
        store.put_chunk(generation, index as u32, chunk).await?;
    }
    store.commit(&encoded.manifest).await?;
    store.prune_fenced(opts.keep_generations.max(1), opts.fencing_token).await?;
    Ok(encoded.manifest)
}
