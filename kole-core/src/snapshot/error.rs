//! What can go wrong writing, storing, verifying or restoring a snapshot.

use std::fmt;
use std::path::PathBuf;

use crate::cache::CacheError;

/// Why a snapshot could not be written, stored, verified or restored.
///
/// Errors about one chunk name its generation and index ([`SnapshotError::Chunk`]); errors about a
/// whole generation name the generation. A restore that skips a generation reports it as a
/// [`RestoreFault`] holding one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// One chunk of a generation is damaged, foreign or inconsistent.
    #[error("snapshot chunk {index} of generation {generation} {fault}")]
    Chunk {
        /// Generation the chunk was read as part of.
        generation: u64,
        /// Index of the chunk within the generation.
        index: u32,
        /// What is wrong with it.
        fault: ChunkFault,
    },
    /// The store has no chunk at an index the manifest lists.
    #[error("snapshot chunk {index} of generation {generation} is missing from the store")]
    MissingChunk {
        /// Generation.
        generation: u64,
        /// Index of the missing chunk.
        index: u32,
    },
    /// The chunks handed to the decoder are not the ones the manifest lists.
    #[error("generation {generation} lists {expected} chunks, but {found} were supplied")]
    ChunkCountMismatch {
        /// Generation.
        generation: u64,
        /// Chunks in the manifest.
        expected: usize,
        /// Chunks supplied.
        found: usize,
    },
    /// A manifest does not decode or contradicts itself.
    #[error("snapshot manifest{} is invalid: {reason}", generation.map(|g| format!(" of generation {g}")).unwrap_or_default())]
    InvalidManifest {
        /// Generation, when known.
        generation: Option<u64>,
        /// What is wrong.
        reason: String,
    },
    /// A manifest or chunk uses a format version this build does not read.
    #[error("generation {generation} uses snapshot format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// Generation.
        generation: u64,
        /// Version found.
        found: u16,
        /// Version this build reads and writes.
        supported: u16,
    },
    /// The snapshot exceeds a [`RestoreLimits`](super::RestoreLimits) bound (a corrupt or hostile
    /// snapshot, or limits too tight for the fleet: raise them).
    #[error("generation {generation}: {what} is {value}, over the limit of {limit}")]
    LimitExceeded {
        /// Generation.
        generation: u64,
        /// What was counted.
        what: &'static str,
        /// The value found.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The chunks decode, but together they do not form the snapshot the manifest describes.
    #[error("generation {generation} is inconsistent: {reason}")]
    Inconsistent {
        /// Generation.
        generation: u64,
        /// What does not add up.
        reason: String,
    },
    /// Writing: one node (or dictionary entry) does not fit in a chunk of `max_chunk_bytes`.
    #[error("a single snapshot record needs {needed} bytes, over max_chunk_bytes = {max_chunk_bytes}; raise it")]
    RecordTooLarge {
        /// Bytes the smallest chunk holding it needs, header included.
        needed: usize,
        /// The configured limit.
        max_chunk_bytes: usize,
    },
    /// Writing: the options are unusable.
    #[error("invalid snapshot options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: &'static str,
    },
    /// Restoring: inserting a decoded node into the cache failed.
    #[error("generation {generation}: rebuilding the cache failed")]
    Cache {
        /// Generation.
        generation: u64,
        /// The cache's refusal.
        #[source]
        source: CacheError,
    },
    /// A file operation of a directory store failed.
    #[error("snapshot store: cannot {op} {}", path.display())]
    Io {
        /// The operation (`create`, `write`, `fsync`, `rename`, `remove`, `read`, `list`).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A store backend (e.g. the Kubernetes API) failed.
    #[error("snapshot store: {context}")]
    Backend {
        /// What the store was doing.
        context: String,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writing: the store holds a generation written under a newer fencing token, so this writer
    /// is no longer the leader (another term began) and must not commit or prune.
    #[error(
        "{op} refused: the store's generation {newer_generation} was written under fencing token {newer_token}, \
         newer than this writer's {token}; another leadership term has begun, so this writer must stop writing"
    )]
    Fenced {
        /// What was refused (`commit of generation 7`, `prune`).
        op: String,
        /// This writer's token.
        token: u64,
        /// The newest token in the store.
        newer_token: u64,
        /// The generation written under it.
        newer_generation: u64,
    },
    /// Restore found complete generations, but none of them is usable; every one is listed.
    #[error("no usable snapshot generation: {}", faults.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))]
    NoUsableGeneration {
        /// Why each generation was skipped, newest first.
        faults: Vec<RestoreFault>,
    },
}

/// What is wrong with one chunk (see [`SnapshotError::Chunk`]). Messages read as a predicate of
/// "snapshot chunk 7 of generation 42 …".
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChunkFault {
    /// Shorter than its fixed header.
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// Does not start with the chunk magic.
    BadMagic,
    /// Written by an unknown format version.
    UnsupportedVersion {
        /// Version found.
        found: u16,
    },
    /// Names a codec this build does not know.
    UnknownCodec {
        /// Codec byte found.
        found: u8,
    },
    /// Uses another codec than its manifest.
    CodecMismatch {
        /// Codec byte found.
        found: u8,
    },
    /// Names an unknown section kind, or another kind than its manifest lists.
    SectionMismatch {
        /// Section byte found.
        found: u8,
    },
    /// Belongs to another generation.
    WrongGeneration {
        /// Generation in the header.
        found: u64,
    },
    /// Belongs to another write (snapshot id) of the same generation number.
    WrongSnapshot {
        /// Snapshot id in the header.
        found: u64,
        /// Snapshot id of the manifest.
        expected: u64,
    },
    /// Sits at another index than its header says.
    WrongIndex {
        /// Index in the header.
        found: u32,
    },
    /// Claims another chunk count than its manifest.
    WrongCount {
        /// Count in the header.
        found: u32,
        /// Count in the manifest.
        expected: u32,
    },
    /// Payload length in the header disagrees with the bytes present.
    LengthMismatch {
        /// Payload length in the header.
        header: u32,
        /// Payload bytes present.
        actual: usize,
    },
    /// CRC-32 over header and payload does not match.
    Checksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum computed.
        computed: u32,
    },
    /// Intact, but not the chunk the manifest recorded (checksum or size differ).
    NotInManifest {
        /// Checksum in the header.
        found: u32,
        /// Checksum the manifest recorded.
        expected: u32,
    },
    /// Declares a decompressed size over the configured limit.
    TooLarge {
        /// Declared decompressed length.
        raw_len: u64,
        /// Limit.
        limit: u64,
    },
    /// The compressed payload does not decompress.
    Decompress {
        /// The codec's message.
        reason: String,
    },
    /// Decompresses to another length than declared.
    RawLengthMismatch {
        /// Declared length.
        declared: u32,
        /// Length obtained (at least; decompression stops past the declared length).
        actual: u64,
    },
    /// The decompressed section does not parse.
    Malformed {
        /// What did not parse.
        reason: &'static str,
        /// Byte offset in the decompressed section.
        offset: usize,
    },
    /// Refers to a dictionary entry that does not exist.
    DanglingId {
        /// The dictionary table.
        table: &'static str,
        /// The id.
        id: u64,
        /// Entries in that table.
        len: u64,
    },
    /// Holds a value the model rejects (an invalid name, label, workload id or phase).
    InvalidValue {
        /// What it is.
        what: &'static str,
        /// The value (truncated).
        value: String,
    },
    /// Holds node names out of order or twice (names are strictly ascending across chunks).
    NamesOutOfOrder {
        /// The name found out of order.
        name: String,
    },
}

impl fmt::Display for ChunkFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { len } => {
                write!(f, "is truncated: {len} bytes, shorter than its header")
            }
            Self::BadMagic => write!(f, "is not a kole snapshot chunk (bad magic)"),
            Self::UnsupportedVersion { found } => write!(f, "uses unknown format version {found}"),
            Self::UnknownCodec { found } => write!(f, "uses unknown codec {found}"),
            Self::CodecMismatch { found } => write!(f, "uses codec {found}, not its manifest's"),
            Self::SectionMismatch { found } => {
                write!(f, "holds section kind {found}, not the one its manifest lists")
            }
            Self::WrongGeneration { found } => write!(f, "belongs to generation {found}"),
            Self::WrongSnapshot { found, expected } => {
                write!(f, "belongs to snapshot {found:#018x}, not {expected:#018x}")
            }
            Self::WrongIndex { found } => write!(f, "carries index {found}"),
            Self::WrongCount { found, expected } => {
                write!(f, "claims {found} chunks, the manifest {expected}")
            }
            Self::LengthMismatch { header, actual } => {
                write!(f, "is truncated or padded: header says {header} payload bytes, {actual} present")
            }
            Self::Checksum { stored, computed } => {
                write!(f, "failed its checksum (stored {stored:#010x}, computed {computed:#010x})")
            }
            Self::NotInManifest { found, expected } => {
                write!(f, "is not the chunk its manifest recorded (checksum {found:#010x}, expected {expected:#010x})")
            }
            Self::TooLarge { raw_len, limit } => {
                write!(f, "declares {raw_len} decompressed bytes, over the limit of {limit}")
            }
            Self::Decompress { reason } => write!(f, "does not decompress: {reason}"),
            Self::RawLengthMismatch { declared, actual } => {
                write!(f, "decompresses to {actual} bytes, not the declared {declared}")
            }
            Self::Malformed { reason, offset } => {
                write!(f, "is malformed at byte {offset}: {reason}")
            }
            Self::DanglingId { table, id, len } => {
                write!(f, "refers to {table} entry {id}, but the dictionary has {len}")
            }
            Self::InvalidValue { what, value } => write!(f, "holds an invalid {what} {value:?}"),
            Self::NamesOutOfOrder { name } => {
                write!(f, "holds node name {name:?} out of order or twice")
            }
        }
    }
}

/// A generation that restore skipped, and why.
#[derive(Debug, thiserror::Error)]
#[error("generation {generation} skipped: {error}")]
pub struct RestoreFault {
    /// The generation skipped.
    pub generation: u64,
    /// Why.
    #[source]
    pub error: SnapshotError,
}

/// Bounded string for error messages built from untrusted bytes.
pub(crate) fn lossy(bytes: &[u8]) -> String {
    crate::model::truncate_for_error(&String::from_utf8_lossy(bytes))
}
