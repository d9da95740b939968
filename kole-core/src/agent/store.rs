//! Local persistence of the agent's desired state, so a node restarted while cut off from the cloud
//! keeps running what it ran (edge autonomy).
//!
//! (See [`FileAgentStore`] for the on-disk format.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::model::{DesiredDigest, Workload};

/// What an agent persists: the workloads it should run and the digest of what it applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PersistedState {
    /// The desired workloads (one version each), sorted by id.
    pub workloads: Vec<Arc<Workload>>,
    /// Digest of the (workload, version) pairs handed to the runtime.
    pub applied: DesiredDigest,
    /// Signed-downlink replay marks: per workload, the issue time (Unix ms) of the newest signed
    /// statement accepted about it. Empty for an agent without trusted keys.
    pub marks: Vec<(crate::model::WorkloadId, u64)>,
}

/// File magic of the persisted state.
pub const STATE_MAGIC: [u8; 8] = *b"KOLEAGST";
/// Format version written by this build.
pub const STATE_FORMAT_VERSION: u16 = 2;
const HEADER: usize = 8 + 2 + 4;
const TRAILER: usize = 4;

#[derive(Serialize)]
struct BodyRef<'a> {
    workloads: Vec<&'a Workload>,
    applied: DesiredDigest,
    marks: &'a [(crate::model::WorkloadId, u64)],
}

#[derive(Deserialize)]
struct BodyOwned {
    workloads: Vec<Workload>,
    applied: DesiredDigest,
}

/// Format 2 appends the replay marks to format 1's body.
#[derive(Deserialize)]
struct BodyOwnedV2 {
    workloads: Vec<Workload>,
    applied: DesiredDigest,
    marks: Vec<(crate::model::WorkloadId, u64)>,
}

/// Why bytes are not a valid persisted state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateDecodeError {
    /// Shorter than header and checksum.
    #[error("{len} bytes is shorter than the {min}-byte header and checksum (truncated write?)")]
    Truncated {
        /// Length found.
        len: usize,
        /// Least possible length.
        min: usize,
    },
    /// Not a kole agent state file.
    #[error("wrong magic {found:02x?} (expected \"KOLEAGST\"): not a kole agent state")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Written by another format version.
    #[error("format version {found} is not supported (this build reads versions 1 to {STATE_FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// The length field disagrees with the data.
    #[error("body length field says {declared} bytes but {actual} are present (truncated write?)")]
    LengthMismatch {
        /// The declared body length.
        declared: u64,
        /// The body bytes present.
        actual: usize,
    },
    /// The checksum does not match.
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum {
        /// The stored CRC-32.
        stored: u32,
        /// The CRC-32 of the data.
        computed: u32,
    },
    /// The body does not decode (or has bytes left over).
    #[error("body does not decode: {reason}")]
    Body {
        /// The decoder's explanation.
        reason: String,
    },
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

impl PersistedState {
    /// A state holding `workloads` (sorted by id here), with `applied` computed from them.
    pub fn new(mut workloads: Vec<Arc<Workload>>) -> Self {
        workloads.sort_by(|a, b| a.id.cmp(&b.id));
        workloads.dedup_by(|a, b| a.id == b.id);
        let applied = DesiredDigest::of_workloads(workloads.iter().map(|w| &**w));
        Self { workloads, applied, marks: Vec::new() }
    }

    /// Encodes into the documented file format.
    pub fn encode(&self) -> Vec<u8> {
        let body = BodyRef {
            workloads: self.workloads.iter().map(|w| &**w).collect(),
            applied: self.applied,
            marks: &self.marks,
        };
        // Serializing plain data into memory cannot fail; should it ever, the empty body is caught
        // by the reader's decode check rather than by a panic here.
        let body = postcard::to_allocvec(&body).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + body.len() + TRAILER);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes the documented file format, checking magic, version, length and checksum first.
    /// Never panics, whatever the input.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateDecodeError> {
        if bytes.len() < HEADER + TRAILER {
            return Err(StateDecodeError::Truncated { len: bytes.len(), min: HEADER + TRAILER });
        }
        let (head, rest) = bytes.split_at(HEADER);
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&head[..8]);
        if magic != STATE_MAGIC {
            return Err(StateDecodeError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if !(1..=STATE_FORMAT_VERSION).contains(&version) {
            return Err(StateDecodeError::UnsupportedVersion { found: version });
        }
        let declared = u32::from_le_bytes([head[10], head[11], head[12], head[13]]);
        let (body, trailer) = rest.split_at(rest.len() - TRAILER);
        if u64::from(declared) != body.len() as u64 {
            return Err(StateDecodeError::LengthMismatch { declared: declared.into(), actual: body.len() });
        }
        let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let computed = crc32(&bytes[..bytes.len() - TRAILER]);
        if stored != computed {
            return Err(StateDecodeError::Checksum { stored, computed });
        }
        let bad = |e: postcard::Error| StateDecodeError::Body { reason: e.to_string() };
        // Format 1 (before signed downlink) has no marks.
        let (decoded, left) = if version == 1 {
            let (b, left): (BodyOwned, &[u8]) = postcard::take_from_bytes(body).map_err(bad)?;
            (BodyOwnedV2 { workloads: b.workloads, applied: b.applied, marks: Vec::new() }, left)
        } else {
            postcard::take_from_bytes::<BodyOwnedV2>(body).map_err(bad)?
        };
        if !left.is_empty() {
            return Err(StateDecodeError::Body { reason: format!("{} trailing bytes", left.len()) });
        }
        let mut workloads: Vec<Arc<Workload>> = decoded.workloads.into_iter().map(Arc::new).collect();
        workloads.sort_by(|a, b| a.id.cmp(&b.id));
        if workloads.windows(2).any(|w| w[0].id == w[1].id) {
            return Err(StateDecodeError::Body { reason: "a workload id appears twice".into() });
        }
        Ok(Self { workloads, applied: decoded.applied, marks: decoded.marks })
    }
}

/// Why the agent's state could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing failed.
    #[error("cannot {op} agent state file {path}")]
    Io {
        /// What was being done ("read", "write", "rename", "sync directory of").
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The stored state is unusable; the agent should start with an empty desired state.
    #[error("agent state in {origin} is unusable; start empty and let the cloud's catch-up refill it")]
    Corrupt {
        /// Where it was read from.
        origin: String,
        /// What is wrong.
        #[source]
        source: StateDecodeError,
    },
    /// The state file is larger than the store's limit.
    #[error("agent state file {path} has {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// Where an agent keeps its [`PersistedState`]. Object-safe; synchronous (the state is small and
/// saved only when the desired set changes).
pub trait AgentStore: Send + Sync {
    /// The last saved state, `None` if nothing was ever saved.
    fn load(&self) -> Result<Option<PersistedState>, StoreError>;

    /// Replaces the saved state, atomically: after a crash, `load` returns the old or the new
    /// state, never a mix.
    fn save(&self, state: &PersistedState) -> Result<(), StoreError>;
}

/// Loads the state of `store` for [`super::Agent::new`]: a corrupt or unreadable state is
/// returned as the error next to `None`, so the caller logs it and the agent starts empty.
pub fn load_or_empty(store: &dyn AgentStore) -> (Option<PersistedState>, Option<StoreError>) {
    match store.load() {
        Ok(state) => (state, None),
        Err(e) => (None, Some(e)),
    }
}

/// An in-memory [`AgentStore`]. Clones share the same state, so a test can "restart" an agent by
/// building a new one from a clone of the store.
#[derive(Clone, Debug, Default)]
pub struct MemoryAgentStore {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    state: Option<PersistedState>,
    saves: u64,
}

impl MemoryAgentStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times [`AgentStore::save`] was called.
    pub fn saves(&self) -> u64 {
        self.lock().saves
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl AgentStore for MemoryAgentStore {
    fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        Ok(self.lock().state.clone())
    }

    fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.state = Some(state.clone());
        inner.saves += 1;
        Ok(())
    }
}

/// An [`AgentStore`] in one file, replaced atomically: write a temporary file next to it, fsync
/// it, rename it over the old one, fsync the directory.
///
/// The on-disk format of [`FileAgentStore`] (all integers little-endian):
///
/// ```text
/// bytes 0..8      magic "KOLEAGST"
/// bytes 8..10     format version, u16 = 1
/// bytes 10..14    body length N, u32
/// bytes 14..14+N  postcard body: the desired workloads (model::Workload's serde form) and the
///                 applied digest
/// last 4 bytes    CRC-32 (IEEE, as gzip) of every byte before it
/// ```
///
/// A file that is truncated, has another magic or version, a wrong length or checksum, or a body
/// that does not decode is reported as [`StoreError::Corrupt`]; the agent then starts with an
/// empty desired state and the cloud's catch-up refills it.
#[derive(Clone, Debug)]
pub struct FileAgentStore {
    path: PathBuf,
    max_bytes: u64,
}

impl FileAgentStore {
    /// Default [`FileAgentStore::max_bytes`]: 16 MiB, far above 256 workloads of 60 KiB specs.
    pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

    /// A store in the file at `path` (its directory must exist).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), max_bytes: Self::DEFAULT_MAX_BYTES }
    }

    /// Sets the largest file `load` reads (a larger one is an error, not an allocation).
    #[must_use]
    pub fn max_bytes(mut self, max: u64) -> Self {
        self.max_bytes = max;
        self
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn temp_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".tmp");
        PathBuf::from(p)
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { op, path, source }
    }
}

impl AgentStore for FileAgentStore {
    fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("open", &self.path)(e)),
        };
        let mut bytes = Vec::new();
        file.take(self.max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(self.io("read", &self.path))?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(StoreError::TooLarge { path: self.path.clone(), len: bytes.len() as u64, max: self.max_bytes });
        }
        PersistedState::decode(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt { origin: self.path.display().to_string(), source })
    }

    fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let tmp = self.temp_path();
        let bytes = state.encode();
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(self.io("create", &tmp))?;
            f.write_all(&bytes).map_err(self.io("write", &tmp))?;
            f.sync_all().map_err(self.io("sync", &tmp))?;
        }
        fs::rename(&tmp, &self.path).map_err(self.io("rename", &self.path))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // The rename is durable only once the directory entry is.
        File::open(&dir).and_then(|d| d.sync_all()).map_err(self.io("sync directory of", &self.path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Selector, WorkloadId};
    use crate::protocol::strategies;
    use proptest::prelude::*;

    fn wl(id: &str, version: u64) -> Arc<Workload> {
        Arc::new(Workload {
            id: WorkloadId::new(id).unwrap(),
            version,
            spec: b"sleep 30\nrestart=always\n".to_vec(),
            selector: Selector::parse("tier=cdn").unwrap(),
            delivery: Default::default(),
            rollout: Default::default(),
        })
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kole-agent-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn file_store_round_trips_and_replaces_atomically() {
        let dir = temp_dir("roundtrip");
        let store = FileAgentStore::new(dir.join("state"));
        assert_eq!(store.load().unwrap(), None, "nothing saved yet");
        let s1 = PersistedState::new(vec![wl("default/b", 2), wl("default/a", 1)]);
        store.save(&s1).unwrap();
        assert_eq!(store.load().unwrap(), Some(s1.clone()));
        assert_eq!(s1.workloads[0].id.as_str(), "default/a", "sorted by id");
        let s2 = PersistedState::new(vec![wl("default/a", 3)]);
        store.save(&s2).unwrap();
        assert_eq!(store.load().unwrap(), Some(s2));
        assert!(!store.temp_path().exists(), "the temporary file was renamed");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_or_truncated_files_are_errors_not_panics() {
        let dir = temp_dir("corrupt");
        let store = FileAgentStore::new(dir.join("state"));
        let bytes = PersistedState::new(vec![wl("default/a", 1)]).encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (bytes[..bytes.len() - 1].to_vec(), "truncated"),
            (bytes[..5].to_vec(), "truncated header"),
            (
                {
                    let mut b = bytes.clone();
                    b[20] ^= 0x40;
                    b
                },
                "bit flip",
            ),
            (
                {
                    let mut b = bytes.clone();
                    b[0] = b'X';
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = bytes.clone();
                    b[8] = 9;
                    b
                },
                "version",
            ),
        ];
        for (b, what) in cases {
            fs::write(store.path(), &b).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{what}: {err}");
            let (state, err) = load_or_empty(&store);
            assert!(state.is_none() && err.is_some(), "{what}");
        }
        fs::write(store.path(), vec![0u8; 100]).unwrap();
        assert!(matches!(store.clone().max_bytes(10).load(), Err(StoreError::TooLarge { len: 11, .. })));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn memory_store_is_shared_between_clones() {
        let a = MemoryAgentStore::new();
        let b = a.clone();
        let s = PersistedState::new(vec![wl("x", 1)]);
        a.save(&s).unwrap();
        assert_eq!(b.load().unwrap(), Some(s));
        assert_eq!(b.saves(), 1);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = PersistedState::decode(&bytes);
        }

        /// Arbitrary bodies behind a valid header and checksum reach the postcard decoder.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = STATE_MAGIC.to_vec();
            b.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
            b.extend_from_slice(&(body.len() as u32).to_le_bytes());
            b.extend_from_slice(&body);
            let crc = crc32(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            let _ = PersistedState::decode(&b);
        }

        #[test]
        fn round_trip(workloads in proptest::collection::vec(strategies::workload(), 0..4), at in any::<u64>()) {
            let mut state = PersistedState::new(workloads.into_iter().map(Arc::new).collect());
            state.marks = state.workloads.iter().map(|w| (w.id.clone(), at)).collect();
            let bytes = state.encode();
            prop_assert_eq!(PersistedState::decode(&bytes), Ok(state.clone()));
            // A format 1 file (before the marks) still loads, without marks.
            #[derive(serde::Serialize)]
            struct V1<'a> { workloads: Vec<&'a Workload>, applied: DesiredDigest }
            let body = postcard::to_allocvec(&V1 { workloads: state.workloads.iter().map(|w| &**w).collect(), applied: state.applied }).unwrap();
            let mut v1 = STATE_MAGIC.to_vec();
            v1.extend_from_slice(&1u16.to_le_bytes());
            v1.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v1.extend_from_slice(&body);
            let crc = crc32(&v1);
            v1.extend_from_slice(&crc.to_le_bytes());
            let old = PersistedState::decode(&v1).unwrap();
            prop_assert_eq!((&old.workloads, old.applied, old.marks.len()), (&state.workloads, state.applied, 0));
            // Any single flipped bit is caught.
            for i in [0, bytes.len() / 2, bytes.len() - 1] {
                let mut bad = bytes.clone();
                bad[i] ^= 1;
                prop_assert!(PersistedState::decode(&bad).is_err());
            }
        }
    }
}
