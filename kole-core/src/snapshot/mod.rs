//! Snapshots of the node cache: format, codecs, chunking, stores and paranoid restore.
//!
//! A snapshot is a *generation*: a [`Manifest`] and the chunks it lists. [`write_snapshot`] stores
//! every chunk of generation g+1, then commits its manifest (the atomic switch), then prunes old
//! generations; [`restore_latest`] takes the newest complete generation whose every chunk checks
//! out and falls back to older ones, reporting each one it skipped. A cache is restored whole or
//! not at all.
//!
//! The layout is columnar and dictionary-coded for size (each section's bytes are documented in
//! `snapshot/encode.rs`): a dictionary of strings, label sets, platforms, workload-state sets and applied
//! digests, then the nodes in name order, one column per field. It is cut into chunks of at most
//! [`SnapshotOptions::max_chunk_bytes`], each with a fixed header ([`ChunkHeader`]) and compressed
//! on its own ([`Codec`]), so chunks fit a Kubernetes object and compress and decompress in parallel.
//!
//! ```
//! use kole_core::cache::{NodeCache, StateCache};
//! use kole_core::model::Timestamp;
//! use kole_core::snapshot::{RestoreLimits, SnapshotOptions, decode_snapshot, encode_snapshot};
//!
//! let cache = NodeCache::new();
//! let enc = encode_snapshot(&cache, 1, Timestamp::from_secs(1_700_000_000), &SnapshotOptions::default())?;
//! let back = decode_snapshot(&enc.manifest, &enc.chunks, &RestoreLimits::default())?;
//! assert_eq!(back.len(), 0);
//! # Ok::<(), kole_core::snapshot::SnapshotError>(())
//! ```

mod chunk;
mod codec;
mod cursor;
mod decode;
mod encode;
mod error;
mod manifest;
mod restore;
pub mod store;
#[cfg(test)]
mod tests;
mod write;

pub use chunk::{CHUNK_HEADER_LEN, CHUNK_MAGIC, ChunkHeader, SectionKind};
pub use codec::Codec;
pub use decode::{VerifySummary, decode_snapshot, verify};
pub use encode::{EncodedSnapshot, encode_snapshot};
pub use error::{ChunkFault, RestoreFault, SnapshotError};
pub use manifest::{ChunkInfo, MANIFEST_MAGIC, Manifest};
pub use restore::{Restored, fetch_chunks, restore_generation, restore_latest};
pub use store::{DirSnapshotStore, MemorySnapshotStore, SnapshotStore};
pub use write::write_snapshot;

/// The snapshot format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// How snapshots are written. A plain struct: change fields of [`SnapshotOptions::default`].
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotOptions {
    /// Chunk compression. Default [`Codec::Gzip`].
    pub codec: Codec,
    /// Largest chunk, header included. Default 768 KiB, which fits one Kubernetes object with room
    /// for base64 and metadata under etcd's 1.5 MiB request limit.
    pub max_chunk_bytes: usize,
    /// Gzip level, 0..=9 (ignored by LZ4). Default 2: the fastest level that still builds Huffman
    /// tables from the data (level 1 is static-table only in zlib-rs and much larger here).
    pub level: u32,
    /// Threads for sorting, compression and checksums; 0 means all available cores. Default 0.
    pub threads: usize,
    /// Fraction of `max_chunk_bytes` the chunker aims at, leaving room for the compression ratio to
    /// vary between chunks (an overflowing chunk is re-cut). Default 0.97.
    pub target_fill: f32,
    /// Items compressed up front to estimate the compression ratio. Default 16384.
    pub sample_items: usize,
    /// Complete generations [`write_snapshot`] keeps after committing (at least 1). Default 2.
    pub keep_generations: usize,
    /// Fixes the snapshot id (tests, reproducible output). Default `None`: random per write.
    pub snapshot_id: Option<u64>,
    /// The writer's fencing token, recorded in the manifest ([`Manifest::fencing_token`]): a
    /// leader writes the token of its leadership term (e.g. `LeaderElector::fencing_token` in
    /// kole-kube), and a store shared by several writers refuses to commit or prune under a token
    /// older than the newest it holds, so a deposed leader cannot overwrite its successor's
    /// generations. Default 0: unfenced (a single writer).
    pub fencing_token: u64,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            codec: Codec::Gzip,
            max_chunk_bytes: 768 * 1024,
            level: 2,
            threads: 0,
            target_fill: 0.97,
            sample_items: 16_384,
            keep_generations: 2,
            snapshot_id: None,
            fencing_token: 0,
        }
    }
}

impl SnapshotOptions {
    pub(crate) fn validate(&self) -> Result<(), SnapshotError> {
        if self.max_chunk_bytes < CHUNK_HEADER_LEN + 64 || self.max_chunk_bytes > u32::MAX as usize {
            return Err(SnapshotError::InvalidOptions {
                reason: "max_chunk_bytes must be between 108 bytes and 4 GiB",
            });
        }
        if !(0.1..=1.0).contains(&self.target_fill) {
            return Err(SnapshotError::InvalidOptions { reason: "target_fill must be between 0.1 and 1.0" });
        }
        Ok(())
    }

    pub(crate) fn thread_count(&self) -> usize {
        resolve_threads(self.threads)
    }
}

fn resolve_threads(threads: usize) -> usize {
    if threads > 0 { threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) }
}

/// Bounds on what a restore accepts, so a corrupt or hostile snapshot cannot exhaust memory
/// (decompression bombs, absurd counts). Defaults suit fleets of tens of millions of nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreLimits {
    /// Most nodes. Default 50 million.
    pub max_nodes: u64,
    /// Most chunks in a generation. Default 100,000.
    pub max_chunks: u32,
    /// Largest decompressed chunk payload. Default 64 MiB.
    pub max_chunk_raw_bytes: u64,
    /// Largest decompressed snapshot, all chunks together. Default 8 GiB.
    pub max_total_raw_bytes: u64,
    /// Most dictionary entries, all tables together. Default 100 million.
    pub max_dictionary_entries: u64,
    /// Largest stored manifest. Default 16 MiB.
    pub max_manifest_bytes: usize,
    /// Threads decompressing and parsing chunks; 0 means all available cores. Default 0.
    pub threads: usize,
}

impl Default for RestoreLimits {
    fn default() -> Self {
        Self {
            max_nodes: 50_000_000,
            max_chunks: 100_000,
            max_chunk_raw_bytes: 64 << 20,
            max_total_raw_bytes: 8 << 30,
            max_dictionary_entries: 100_000_000,
            max_manifest_bytes: 16 << 20,
            threads: 0,
        }
    }
}

impl RestoreLimits {
    pub(crate) fn thread_count(&self) -> usize {
        resolve_threads(self.threads)
    }
}
