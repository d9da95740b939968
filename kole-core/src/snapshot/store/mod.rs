//! Where generations live: the [`SnapshotStore`] seam and its two implementations, in memory
//! ([`MemorySnapshotStore`]) and in a directory ([`DirSnapshotStore`], the embedded default).

mod dir;
mod memory;

pub use dir::DirSnapshotStore;
pub use memory::MemorySnapshotStore;

use async_trait::async_trait;

use super::{Manifest, SnapshotError};

/// Storage of snapshot generations. Object-safe: hold it as `Arc<dyn SnapshotStore>`.
///
/// Chunks and manifests are addressed by `(generation, index)` and `generation`, so a backend of
/// Kubernetes custom resources maps them to object names and uses resourceVersion preconditions
/// for [`commit`](Self::commit). A generation is *complete* once its manifest is committed and
/// reads back intact; only complete generations are listed.
///
/// **Fencing.** Each manifest carries its writer's [`fencing_token`](Manifest::fencing_token). A
/// store that several writers can reach (leaders of successive terms) refuses, with
/// [`SnapshotError::Fenced`], a [`commit`](Self::commit) whose token is older than the newest
/// token among the committed manifests, and a [`prune_fenced`](Self::prune_fenced) likewise; the
/// in-process stores have one writer and accept every token.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// The number the next write should use: above every generation present, complete or not
    /// (1 for an empty store).
    async fn next_generation(&self) -> Result<u64, SnapshotError>;

    /// Stores chunk `index` of `generation`, replacing one left there by an interrupted write.
    async fn put_chunk(&self, generation: u64, index: u32, chunk: &[u8]) -> Result<(), SnapshotError>;

    /// Makes `manifest.generation` complete, atomically: before the call returns it is either
    /// wholly listed or not at all. Call after every chunk is stored.
    async fn commit(&self, manifest: &Manifest) -> Result<(), SnapshotError>;

    /// Manifests of the complete generations, newest first.
    async fn list_manifests(&self) -> Result<Vec<Manifest>, SnapshotError>;

    /// Chunk `index` of `generation`, or `None` when there is none.
    async fn get_chunk(&self, generation: u64, index: u32) -> Result<Option<Vec<u8>>, SnapshotError>;

    /// Keeps the newest `keep` complete generations and removes the rest, together with any
    /// incomplete generation (leftovers of interrupted writes). Unfenced: for a single writer or
    /// an operator's tool.
    async fn prune(&self, keep: usize) -> Result<(), SnapshotError>;

    /// [`prune`](Self::prune) by a writer holding `fencing_token`, as [`write_snapshot`]
    /// calls it after its commit. A store shared by several writers (`KubeSnapshotStore`)
    /// refuses with [`SnapshotError::Fenced`] when it holds a generation written under a newer
    /// token, and leaves alone incomplete generations above its newest complete one (they may
    /// be another writer's write in progress). The default is plain `prune`: a store with one
    /// writer needs no fence.
    ///
    /// [`write_snapshot`]: crate::snapshot::write_snapshot
    async fn prune_fenced(&self, keep: usize, fencing_token: u64) -> Result<(), SnapshotError> {
        let _ = fencing_token;
        self.prune(keep).await
    }
}
