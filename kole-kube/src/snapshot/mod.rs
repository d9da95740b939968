//! [`KubeSnapshotStore`]: kole's snapshot generations as custom resources.
//!
//! ```text
//! SnapshotChunk    {store}-g{generation:020}-c{index:06}   labels kole.dev/snapshot-store={store},
//!                                                         kole.dev/generation={generation}
//! SnapshotManifest {store}                                  the complete generations, newest first
//! ```
//!
//! A write stores every chunk object of generation g+1, then replaces the one manifest object with
//! a `resourceVersion` precondition so that it lists g+1 (the atomic switch: a concurrent writer
//! gets 409 Conflict and re-reads; a crash before it leaves g the latest), then deletes the chunk
//! objects of generations no longer listed. The last complete generation is never deleted: prune
//! keeps at least one, and removes chunks only of generations the manifest object does not list.
//!
//! **Fencing.** Each generation's manifest carries its writer's fencing token (the leadership
//! term's, see `lease::LeaderElector::fencing_token`). [`commit`](SnapshotStore::commit) and
//! [`prune_fenced`](SnapshotStore::prune_fenced) read the manifest object, refuse with
//! [`SnapshotError::Fenced`] when any recorded generation carries a newer token, and write with
//! the `resourceVersion` they read as a precondition: if the object changed in between, the
//! write gets 409, is retried from a fresh read, and so meets the fence again. A deposed leader
//! therefore never replaces or prunes a newer term's generations. A fenced prune also leaves
//! chunks above the newest complete generation alone (they may be the new leader's write in
//! progress). Not fenced: chunk objects themselves. Two writers that pick the same generation
//! number may overwrite each other's chunks; the manifest's checksums and snapshot id catch
//! that on restore, which then falls back to the previous generation.
//!
//! Every call retries with jittered exponential backoff on 409 (where a retry can succeed), 429,
//! 5xx and transport errors; 413 (request too large), 422 (invalid) and other 4xx fail at once
//! with an error naming the object.

use std::collections::BTreeSet;

use async_trait::async_trait;
use kole_core::backoff::{Backoff, Jitter};
use kole_core::clock::wall_clock_now;
use kole_core::rng::SplitMix64;
use kole_core::snapshot::{Manifest, SnapshotError, SnapshotStore};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::crd::{
    Base64Bytes, SnapshotChunk, SnapshotChunkSpec, SnapshotGeneration, SnapshotManifest, SnapshotManifestSpec,
};

/// Label naming the store a chunk belongs to.
pub const STORE_LABEL: &str = "kole.dev/snapshot-store";
/// Label holding a chunk's generation.
pub const GENERATION_LABEL: &str = "kole.dev/generation";

/// How calls to the apiserver are retried: how many attempts, spaced by kole's one [`Backoff`].
#[derive(Clone, Debug, PartialEq)]
pub struct ApiRetry {
    /// Attempts per call, the first included. Default 8.
    pub max_attempts: u32,
    /// The waits between attempts. Default 100 ms doubling to 5 s, each up to 25% longer at random.
    pub backoff: Backoff,
}

impl Default for ApiRetry {
    fn default() -> Self {
        Self { max_attempts: 8, backoff: Backoff::new(100, 5_000, 2.0).with_jitter(Jitter::Above { percent: 25 }) }
    }
}

/// Settings of a [`KubeSnapshotStore`]. A plain struct: change fields of [`Default::default`].
#[derive(Clone, Debug, PartialEq)]
pub struct KubeSnapshotConfig {
    /// Namespace of the objects. Default `kole-system`.
    pub namespace: String,
    /// The store's name: the manifest object's name and the prefix of chunk names (a DNS label of
    /// at most 200 characters). Default `kole-snapshot`.
    pub name: String,
    /// Retries.
    pub retry: ApiRetry,
    /// Objects per page when listing chunk metadata. Default 500.
    pub list_page_size: u32,
    /// Most generations the manifest object records (older ones drop off it and are pruned).
    /// Default 8.
    pub max_recorded_generations: usize,
}

impl Default for KubeSnapshotConfig {
    fn default() -> Self {
        Self {
            namespace: "kole-system".to_owned(),
            name: "kole-snapshot".to_owned(),
            retry: ApiRetry::default(),
            list_page_size: 500,
            max_recorded_generations: 8,
        }
    }
}

/// Snapshot generations stored as `SnapshotChunk` and `SnapshotManifest` custom resources. See the
/// module documentation for the layout and the commit protocol.
#[derive(Clone)]
pub struct KubeSnapshotStore {
    cfg: KubeSnapshotConfig,
    chunks: Api<SnapshotChunk>,
    manifests: Api<SnapshotManifest>,
}

impl std::fmt::Debug for KubeSnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSnapshotStore").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

enum Attempt<T> {
    Done(T),
    Retry(kube::Error),
    /// A refusal that no retry can change (fenced).
    Refuse(SnapshotError),
}

/// Whether an error is worth retrying: conflicts, throttling, server errors and transport errors.
pub fn is_retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 409 | 429 | 500..=599),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl KubeSnapshotStore {
    /// A store over `client` with `cfg`.
    pub fn new(client: Client, cfg: KubeSnapshotConfig) -> Self {
        let chunks = Api::namespaced(client.clone(), &cfg.namespace);
        let manifests = Api::namespaced(client, &cfg.namespace);
        Self { cfg, chunks, manifests }
    }

    /// The settings.
    pub fn config(&self) -> &KubeSnapshotConfig {
        &self.cfg
    }

    /// Name of the object holding chunk `index` of `generation`.
    pub fn chunk_name(&self, generation: u64, index: u32) -> String {
        format!("{}-g{generation:020}-c{index:06}", self.cfg.name)
    }

    fn store_selector(&self) -> String {
        format!("{STORE_LABEL}={}", self.cfg.name)
    }

    fn backend(&self, op: String, e: kube::Error) -> SnapshotError {
        let hint = match status_code(&e) {
            Some(413) => {
                "; the object is over the apiserver's request size limit: lower SnapshotOptions::max_chunk_bytes"
            }
            Some(422) => "; the apiserver rejected the object as invalid: are the kole CRDs installed and current?",
            Some(404) => "; are the kole CRDs installed?",
            _ => "",
        };
        SnapshotError::Backend {
            context: format!("{op} in namespace {}{hint}", self.cfg.namespace),
            source: Box::new(e),
        }
    }

    /// Runs `f` until it is done, fails with a non-retryable error, or attempts run out.
    async fn with_retry<T, F, Fut>(&self, op: impl Fn() -> String, mut f: F) -> Result<T, SnapshotError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, kube::Error>>,
    {
        let mut attempt = 0;
        // Jitter only spreads retries of different controllers; the clock is seed enough.
        let mut rng = SplitMix64::new(wall_clock_now().as_millis() ^ u64::from(std::process::id()));
        loop {
            attempt += 1;
            let err = match f().await {
                Ok(Attempt::Done(v)) => return Ok(v),
                Ok(Attempt::Retry(e)) => e,
                Ok(Attempt::Refuse(e)) => return Err(e),
                Err(e) if is_retryable(&e) => e,
                Err(e) => return Err(self.backend(op(), e)),
            };
            if attempt >= self.cfg.retry.max_attempts {
                return Err(self.backend(format!("{} (gave up after {attempt} attempts)", op()), err));
            }
            tracing::debug!(op = %op(), attempt, error = %err, "retrying");
            tokio::time::sleep(self.cfg.retry.backoff.delay(attempt - 1, &mut rng)).await;
        }
    }

    async fn get_manifest_object(&self) -> Result<Option<SnapshotManifest>, SnapshotError> {
        let name = self.cfg.name.clone();
        self.with_retry(
            || format!("get SnapshotManifest {name}"),
            || async { self.manifests.get_opt(&self.cfg.name).await.map(Attempt::Done) },
        )
        .await
    }

    /// Generations of every chunk object of this store, complete or not (a paged list of metadata).
    pub async fn chunk_generations(&self) -> Result<BTreeSet<u64>, SnapshotError> {
        let mut out = BTreeSet::new();
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().labels(&self.store_selector()).limit(self.cfg.list_page_size);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = self
                .with_retry(
                    || format!("list SnapshotChunks of store {}", self.cfg.name),
                    || {
                        let lp = lp.clone();
                        async move { self.chunks.list_metadata(&lp).await.map(Attempt::Done) }
                    },
                )
                .await?;
            for o in &page.items {
                if let Some(g) =
                    o.metadata.labels.as_ref().and_then(|l| l.get(GENERATION_LABEL)).and_then(|g| g.parse().ok())
                {
                    out.insert(g);
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => token = Some(c),
                None => return Ok(out),
            }
        }
    }

    async fn delete_generation(&self, generation: u64) -> Result<(), SnapshotError> {
        let selector = format!("{},{GENERATION_LABEL}={generation}", self.store_selector());
        let lp = ListParams::default().labels(&selector);
        self.with_retry(
            || format!("delete SnapshotChunks of generation {generation} of store {}", self.cfg.name),
            || {
                let lp = lp.clone();
                async move {
                    self.chunks.delete_collection(&DeleteParams::default(), &lp).await.map(|_| Attempt::Done(()))
                }
            },
        )
        .await
    }
}

fn manifest_generation(m: &Manifest) -> SnapshotGeneration {
    SnapshotGeneration {
        generation: m.generation,
        node_count: m.node_count,
        chunk_count: m.chunk_count,
        total_bytes: m.total_bytes,
        created_at_ms: m.created_at.as_millis(),
        manifest: Base64Bytes(m.to_bytes()),
    }
}

/// The newest fencing token among the recorded generations, with its generation; records that do
/// not decode are skipped (they are skipped on restore too).
fn newest_token(spec: &SnapshotManifestSpec) -> Option<(u64, u64)> {
    spec.generations
        .iter()
        .filter_map(|g| Manifest::from_bytes(&g.manifest.0, 16 << 20).ok())
        .map(|m| (m.fencing_token, m.generation))
        .max()
}

/// `Some(refusal)` when `spec` holds a generation written under a newer token than `token`.
fn fence(spec: &SnapshotManifestSpec, token: u64, op: impl FnOnce() -> String) -> Option<SnapshotError> {
    match newest_token(spec) {
        Some((newer_token, newer_generation)) if newer_token > token => {
            Some(SnapshotError::Fenced { op: op(), token, newer_token, newer_generation })
        }
        _ => None,
    }
}

fn set_latest(spec: &mut SnapshotManifestSpec) {
    spec.generations.sort_by_key(|g| std::cmp::Reverse(g.generation));
    spec.generations.dedup_by_key(|g| g.generation);
    let latest = spec.generations.first();
    spec.latest_generation = latest.map_or(0, |g| g.generation);
    spec.latest_node_count = latest.map_or(0, |g| g.node_count);
    spec.latest_chunk_count = latest.map_or(0, |g| g.chunk_count);
}

#[async_trait]
impl SnapshotStore for KubeSnapshotStore {
    async fn next_generation(&self) -> Result<u64, SnapshotError> {
        let recorded = self.get_manifest_object().await?.map_or(0, |m| m.spec.latest_generation);
        let chunks = self.chunk_generations().await?.last().copied().unwrap_or(0);
        Ok(recorded.max(chunks) + 1)
    }

    async fn put_chunk(&self, generation: u64, index: u32, chunk: &[u8]) -> Result<(), SnapshotError> {
        let name = self.chunk_name(generation, index);
        let bytes = u32::try_from(chunk.len()).map_err(|_| SnapshotError::Backend {
            context: format!("chunk {index} of generation {generation} is over 4 GiB"),
            source: "chunk too large".into(),
        })?;
        let object = SnapshotChunk {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.cfg.namespace.clone()),
                labels: Some(
                    [
                        (STORE_LABEL.to_owned(), self.cfg.name.clone()),
                        (GENERATION_LABEL.to_owned(), generation.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: SnapshotChunkSpec { generation, index, bytes, data: Base64Bytes(chunk.to_vec()) },
        };
        let pp = PostParams::default();
        self.with_retry(
            || format!("create SnapshotChunk {name}"),
            || async {
                match self.chunks.create(&pp, &object).await {
                    Ok(_) => Ok(Attempt::Done(())),
                    // Left there by an interrupted write of the same generation: replace it.
                    Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {
                        let existing = self.chunks.get(&name).await?;
                        let mut replacement = object.clone();
                        replacement.metadata.resource_version = existing.metadata.resource_version;
                        match self.chunks.replace(&name, &pp, &replacement).await {
                            Ok(_) => Ok(Attempt::Done(())),
                            Err(e) if status_code(&e) == Some(409) => Ok(Attempt::Retry(e)),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    async fn commit(&self, manifest: &Manifest) -> Result<(), SnapshotError> {
        let name = self.cfg.name.clone();
        let record = manifest_generation(manifest);
        let pp = PostParams::default();
        let max = self.cfg.max_recorded_generations.max(1);
        self.with_retry(
            || format!("commit generation {} to SnapshotManifest {name}", manifest.generation),
            || async {
                match self.manifests.get_opt(&name).await? {
                    None => {
                        let mut spec = SnapshotManifestSpec::default();
                        spec.generations.push(record.clone());
                        set_latest(&mut spec);
                        let mut obj = SnapshotManifest::new(&name, spec);
                        obj.metadata.namespace = Some(self.cfg.namespace.clone());
                        // A concurrent create wins with 409 AlreadyExists: retry, which re-reads.
                        self.manifests.create(&pp, &obj).await.map(|_| Attempt::Done(()))
                    }
                    Some(mut obj) => {
                        // Checked on every attempt: a conflict's re-read may show a newer term.
                        if let Some(refused) = fence(&obj.spec, manifest.fencing_token, || {
                            format!("commit of generation {} to SnapshotManifest {name}", manifest.generation)
                        }) {
                            return Ok(Attempt::Refuse(refused));
                        }
                        obj.spec.generations.retain(|g| g.generation != record.generation);
                        obj.spec.generations.push(record.clone());
                        set_latest(&mut obj.spec);
                        obj.spec.generations.truncate(max);
                        // `obj` carries the resourceVersion it was read at: the precondition.
                        obj.metadata.managed_fields = None;
                        self.manifests.replace(&name, &pp, &obj).await.map(|_| Attempt::Done(()))
                    }
                }
            },
        )
        .await
    }

    async fn list_manifests(&self) -> Result<Vec<Manifest>, SnapshotError> {
        let Some(obj) = self.get_manifest_object().await? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for g in &obj.spec.generations {
            // A damaged record is skipped, as a damaged manifest file is.
            match Manifest::from_bytes(&g.manifest.0, 16 << 20) {
                Ok(m) if m.generation == g.generation => out.push(m),
                Ok(m) => tracing::warn!(
                    recorded = g.generation,
                    found = m.generation,
                    "snapshot manifest record names another generation; skipped"
                ),
                Err(e) => tracing::warn!(generation = g.generation, error = %e, "snapshot manifest record skipped"),
            }
        }
        out.sort_by_key(|m| std::cmp::Reverse(m.generation));
        Ok(out)
    }

    async fn get_chunk(&self, generation: u64, index: u32) -> Result<Option<Vec<u8>>, SnapshotError> {
        let name = self.chunk_name(generation, index);
        let obj = self
            .with_retry(
                || format!("get SnapshotChunk {name}"),
                || async { self.chunks.get_opt(&name).await.map(Attempt::Done) },
            )
            .await?;
        // An object whose spec disagrees with its name is not this chunk; the core's header check
        // would catch it too, but say so precisely.
        Ok(obj.filter(|o| o.spec.generation == generation && o.spec.index == index).map(|o| o.spec.data.0))
    }

    async fn prune(&self, keep: usize) -> Result<(), SnapshotError> {
        self.prune_with(keep, None).await
    }

    async fn prune_fenced(&self, keep: usize, fencing_token: u64) -> Result<(), SnapshotError> {
        self.prune_with(keep, Some(fencing_token)).await
    }
}

impl KubeSnapshotStore {
    /// Prune, fenced by `token` when given: refused under an older token than the manifest
    /// object holds, and sparing chunks above the newest kept generation (another writer's write
    /// in progress; the next prune after a newer commit removes them if they were a leftover).
    async fn prune_with(&self, keep: usize, token: Option<u64>) -> Result<(), SnapshotError> {
        let keep = keep.max(1);
        let name = self.cfg.name.clone();
        let pp = PostParams::default();
        // First drop old generations from the manifest object, so none is listed without chunks.
        let kept: BTreeSet<u64> = self
            .with_retry(
                || format!("prune SnapshotManifest {name}"),
                || async {
                    let Some(mut obj) = self.manifests.get_opt(&name).await? else {
                        return Ok(Attempt::Done(BTreeSet::new()));
                    };
                    if let Some(refused) =
                        token.and_then(|t| fence(&obj.spec, t, || format!("prune of SnapshotManifest {name}")))
                    {
                        return Ok(Attempt::Refuse(refused));
                    }
                    let valid: Vec<u64> = obj
                        .spec
                        .generations
                        .iter()
                        .filter(|g| {
                            Manifest::from_bytes(&g.manifest.0, 16 << 20).is_ok_and(|m| m.generation == g.generation)
                        })
                        .map(|g| g.generation)
                        .take(keep)
                        .collect();
                    if valid.is_empty() {
                        // Nothing readable: delete nothing rather than guess.
                        return Ok(Attempt::Done(obj.spec.generations.iter().map(|g| g.generation).collect()));
                    }
                    let before = obj.spec.generations.len();
                    obj.spec.generations.retain(|g| valid.contains(&g.generation));
                    if obj.spec.generations.len() != before {
                        set_latest(&mut obj.spec);
                        obj.metadata.managed_fields = None;
                        // The resourceVersion precondition: a commit in between makes this retry,
                        // and the retry checks the fence again.
                        self.manifests.replace(&name, &pp, &obj).await?;
                    }
                    Ok(Attempt::Done(valid.into_iter().collect()))
                },
            )
            .await?;
        let newest_kept = kept.last().copied().unwrap_or(0);
        for g in self.chunk_generations().await? {
            let in_progress_elsewhere = token.is_some() && g > newest_kept;
            if !kept.contains(&g) && !in_progress_elsewhere {
                self.delete_generation(g).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
