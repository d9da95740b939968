//! A snapshot store in a directory: the embedded default.
//!
//! ```text
//! <root>/gen-00000000000000000042/chunk-000000.kole   chunk 0 of generation 42
//! <root>/gen-00000000000000000042/chunk-000001.kole
//! <root>/gen-00000000000000000042/manifest.kole       present and intact = generation complete
//! ```
//!
//! Each chunk file is written and fsynced; the manifest is written to `manifest.kole.tmp`,
//! fsynced, renamed to `manifest.kole`, and the generation directory fsynced. Pruning removes a
//! generation's manifest first, so a generation is never half-listed.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::SnapshotStore;
use crate::snapshot::{Manifest, SnapshotError};

const MANIFEST_FILE: &str = "manifest.kole";
const MANIFEST_TMP: &str = "manifest.kole.tmp";

/// Generations in a directory, one subdirectory each.
///
/// Its futures do blocking file I/O (kole-core knows no async runtime): a write is a handful of
/// fsynced files of at most `max_chunk_bytes`.
#[derive(Debug)]
pub struct DirSnapshotStore {
    root: PathBuf,
    ops: AtomicU64,
    fail_after: Option<u64>,
    max_file_bytes: u64,
    max_manifest_bytes: usize,
}

impl DirSnapshotStore {
    /// A store in `root`, created if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, SnapshotError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| SnapshotError::Io { op: "create", path: root.clone(), source })?;
        Ok(Self {
            root,
            ops: AtomicU64::new(0),
            fail_after: None,
            max_file_bytes: 64 << 20,
            max_manifest_bytes: 16 << 20,
        })
    }

    /// Crash testing: every file operation (create, write, fsync, rename, remove) after the
    /// first `ops` fails, as if the process had died there; a failing write leaves half its
    /// bytes behind, as a torn write would.
    pub fn fail_after(mut self, ops: u64) -> Self {
        self.fail_after = Some(ops);
        self
    }

    /// File operations performed (or attempted) so far.
    pub fn operations(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a generation's directory.
    pub fn generation_dir(&self, generation: u64) -> PathBuf {
        self.root.join(format!("gen-{generation:020}"))
    }

    /// Path of a chunk file.
    pub fn chunk_path(&self, generation: u64, index: u32) -> PathBuf {
        self.generation_dir(generation).join(format!("chunk-{index:06}.kole"))
    }

    /// Counts one file operation; fails it when the injected crash point is passed.
    fn op(&self, op: &'static str, path: &Path) -> Result<(), SnapshotError> {
        let n = self.ops.fetch_add(1, Ordering::Relaxed);
        match self.fail_after {
            Some(limit) if n >= limit => Err(SnapshotError::Io {
                op,
                path: path.to_owned(),
                source: std::io::Error::other("injected fault: the process died here"),
            }),
            _ => Ok(()),
        }
    }

    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
        move |source| SnapshotError::Io { op, path: path.to_owned(), source }
    }

    fn fsync_dir(&self, dir: &Path) -> Result<(), SnapshotError> {
        self.op("fsync", dir)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(Self::io("fsync", dir))
    }

    /// create + write + fsync, each counted.
    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.op("create", path)?;
        let mut f = File::create(path).map_err(Self::io("create", path))?;
        if let Err(e) = self.op("write", path) {
            let _ = f.write_all(&bytes[..bytes.len() / 2]);
            return Err(e);
        }
        f.write_all(bytes).map_err(Self::io("write", path))?;
        self.op("fsync", path)?;
        f.sync_all().map_err(Self::io("fsync", path))
    }

    fn read_limited(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, SnapshotError> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SnapshotError::Io { op: "read", path: path.to_owned(), source: e });
            }
        };
        // One byte over the limit is enough for the reader to see it is too long.
        let mut out = Vec::new();
        f.take(limit + 1).read_to_end(&mut out).map_err(Self::io("read", path))?;
        Ok(Some(out))
    }

    /// Generation numbers of every `gen-*` directory, complete or not.
    fn generation_dirs(&self) -> Result<Vec<u64>, SnapshotError> {
        let mut gens = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(Self::io("list", &self.root))? {
            let entry = entry.map_err(Self::io("list", &self.root))?;
            let name = entry.file_name();
            if let Some(g) = name.to_str().and_then(|n| n.strip_prefix("gen-")).and_then(|n| n.parse::<u64>().ok()) {
                gens.push(g);
            }
        }
        gens.sort_unstable();
        Ok(gens)
    }

    fn manifest_of(&self, generation: u64) -> Result<Option<Manifest>, SnapshotError> {
        let path = self.generation_dir(generation).join(MANIFEST_FILE);
        Ok(Self::read_limited(&path, self.max_manifest_bytes as u64)?
            .and_then(|b| Manifest::from_bytes(&b, self.max_manifest_bytes).ok())
            .filter(|m| m.generation == generation))
    }

    fn remove_generation(&self, generation: u64) -> Result<(), SnapshotError> {
        let dir = self.generation_dir(generation);
        let manifest = dir.join(MANIFEST_FILE);
        if manifest.exists() {
            self.op("remove", &manifest)?;
            fs::remove_file(&manifest).map_err(Self::io("remove", &manifest))?;
        }
        for entry in fs::read_dir(&dir).map_err(Self::io("list", &dir))? {
            let path = entry.map_err(Self::io("list", &dir))?.path();
            self.op("remove", &path)?;
            fs::remove_file(&path).map_err(Self::io("remove", &path))?;
        }
        self.op("remove", &dir)?;
        fs::remove_dir(&dir).map_err(Self::io("remove", &dir))
    }
}

#[async_trait]
impl SnapshotStore for DirSnapshotStore {
    async fn next_generation(&self) -> Result<u64, SnapshotError> {
        Ok(self.generation_dirs()?.last().map_or(1, |g| g + 1))
    }

    async fn put_chunk(&self, generation: u64, index: u32, chunk: &[u8]) -> Result<(), SnapshotError> {
        let dir = self.generation_dir(generation);
        if !dir.is_dir() {
            self.op("create", &dir)?;
            fs::create_dir(&dir).map_err(Self::io("create", &dir))?;
            self.fsync_dir(&self.root)?;
        }
        self.write_file(&self.chunk_path(generation, index), chunk)
    }

    async fn commit(&self, manifest: &Manifest) -> Result<(), SnapshotError> {
        let dir = self.generation_dir(manifest.generation);
        if !dir.is_dir() {
            self.op("create", &dir)?;
            fs::create_dir(&dir).map_err(Self::io("create", &dir))?;
            self.fsync_dir(&self.root)?;
        }
        let tmp = dir.join(MANIFEST_TMP);
        let path = dir.join(MANIFEST_FILE);
        self.write_file(&tmp, &manifest.to_bytes())?;
        self.op("rename", &path)?;
        fs::rename(&tmp, &path).map_err(Self::io("rename", &path))?;
        self.fsync_dir(&dir)
    }

    async fn list_manifests(&self) -> Result<Vec<Manifest>, SnapshotError> {
        let mut out = Vec::new();
        for g in self.generation_dirs()?.into_iter().rev() {
            if let Some(m) = self.manifest_of(g)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    async fn get_chunk(&self, generation: u64, index: u32) -> Result<Option<Vec<u8>>, SnapshotError> {
        Self::read_limited(&self.chunk_path(generation, index), self.max_file_bytes)
    }

    async fn prune(&self, keep: usize) -> Result<(), SnapshotError> {
        let mut kept = 0;
        let mut removed = false;
        for g in self.generation_dirs()?.into_iter().rev() {
            if kept < keep && self.manifest_of(g)?.is_some() {
                kept += 1;
            } else {
                self.remove_generation(g)?;
                removed = true;
            }
        }
        if removed {
            self.fsync_dir(&self.root)?;
        }
        Ok(())
    }
}
