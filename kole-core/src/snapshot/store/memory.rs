//! A snapshot store in memory, with hooks to damage it for tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::SnapshotStore;
use crate::snapshot::{Manifest, SnapshotError};

/// Generations kept in memory. Manifests are stored in their encoded form, as a real store
/// keeps them, so a damaged one is skipped like on disk.
#[derive(Debug, Default)]
pub struct MemorySnapshotStore {
    inner: Mutex<BTreeMap<u64, StoredGeneration>>,
}

#[derive(Debug, Default, Clone)]
struct StoredGeneration {
    chunks: BTreeMap<u32, Vec<u8>>,
    manifest: Option<Vec<u8>>,
}

impl MemorySnapshotStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, StoredGeneration>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Generations present, complete or not, ascending.
    pub fn generations(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// A copy of a stored chunk.
    pub fn chunk(&self, generation: u64, index: u32) -> Option<Vec<u8>> {
        self.lock().get(&generation)?.chunks.get(&index).cloned()
    }

    /// Test hook: changes a stored chunk in place; returns whether it existed.
    pub fn corrupt_chunk(&self, generation: u64, index: u32, damage: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut g = self.lock();
        match g.get_mut(&generation).and_then(|g| g.chunks.get_mut(&index)) {
            Some(c) => {
                damage(c);
                true
            }
            None => false,
        }
    }

    /// Test hook: removes a stored chunk; returns it.
    pub fn remove_chunk(&self, generation: u64, index: u32) -> Option<Vec<u8>> {
        self.lock().get_mut(&generation)?.chunks.remove(&index)
    }

    /// Test hook: stores `bytes` as a chunk, whatever they are.
    pub fn replace_chunk(&self, generation: u64, index: u32, bytes: Vec<u8>) {
        self.lock().entry(generation).or_default().chunks.insert(index, bytes);
    }

    /// Test hook: changes a committed manifest's stored bytes; returns whether it existed.
    pub fn corrupt_manifest(&self, generation: u64, damage: impl FnOnce(&mut Vec<u8>)) -> bool {
        match self.lock().get_mut(&generation).and_then(|g| g.manifest.as_mut()) {
            Some(m) => {
                damage(m);
                true
            }
            None => false,
        }
    }
}

#[async_trait]
impl SnapshotStore for MemorySnapshotStore {
    async fn next_generation(&self) -> Result<u64, SnapshotError> {
        Ok(self.lock().keys().next_back().map_or(1, |g| g + 1))
    }

    async fn put_chunk(&self, generation: u64, index: u32, chunk: &[u8]) -> Result<(), SnapshotError> {
        self.lock().entry(generation).or_default().chunks.insert(index, chunk.to_vec());
        Ok(())
    }

    async fn commit(&self, manifest: &Manifest) -> Result<(), SnapshotError> {
        self.lock().entry(manifest.generation).or_default().manifest = Some(manifest.to_bytes());
        Ok(())
    }

    async fn list_manifests(&self) -> Result<Vec<Manifest>, SnapshotError> {
        Ok(self
            .lock()
            .iter()
            .rev()
            .filter_map(|(&g, s)| {
                let m = Manifest::from_bytes(s.manifest.as_deref()?, usize::MAX).ok()?;
                (m.generation == g).then_some(m)
            })
            .collect())
    }

    async fn get_chunk(&self, generation: u64, index: u32) -> Result<Option<Vec<u8>>, SnapshotError> {
        Ok(self.chunk(generation, index))
    }

    async fn prune(&self, keep: usize) -> Result<(), SnapshotError> {
        let complete: Vec<u64> = self.list_manifests().await?.iter().map(|m| m.generation).take(keep).collect();
        self.lock().retain(|g, _| complete.contains(g));
        Ok(())
    }
}
