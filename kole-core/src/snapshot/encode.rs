//! Encoding: the cache becomes a dictionary and name-sorted node columns, cut into chunks that
//! are compressed independently and in parallel.
//!
//! ## Dictionary section payload
//!
//! Five varints (the table sizes of the whole dictionary: strings, label sets, platforms,
//! workload-state sets, digests), a varint segment count, then segments: table byte, varint
//! first id, varint entry count, entries. A huge dictionary is cut into several chunks at any
//! entry; segments of one table are contiguous across chunks. Entries:
//!
//! - string: varint length, UTF-8 bytes;
//! - label set: varint pair count, pairs of varint string ids (key, value), keys strictly ascending;
//! - platform: three varint string ids (arch, os, agent version);
//! - workload-state set: varint item count, items of (varint workload string id, varint version,
//!   phase byte), workload ids strictly ascending;
//! - digest: 8 bytes little-endian.
//!
//! Ids of label sets, platforms, workload-state sets and digests are ranked by how many nodes use
//! them, so the common ones are the small numbers.
//!
//! ## Node section payload (nodes in strictly ascending name order)
//!
//! Varint node count `n`, varint base time (the snapshot's whole seconds), then columns:
//! names front-coded against the previous name of the chunk (`n` shared-prefix bytes, `n` suffix
//! length bytes, the suffix bytes), `n` flag bytes (phase in bits 0–1, bit 2 has IPv4, bit 3 has
//! extra addresses), `n` zigzag varints of base time minus last seen, byte planes (see
//! [`put_planes`]) of label set, platform, workload-state set and digest ids, four byte planes of
//! the IPv4 addresses of the nodes that have one, and for each node with extra addresses a varint
//! count and `(tag 4 | 6, 4 | 16 address bytes)` entries.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::chunk::{CHUNK_HEADER_LEN, ChunkHeader};
use super::cursor::{put_planes, put_varint, zigzag};
use super::{ChunkInfo, FORMAT_VERSION, Manifest, SectionKind, SnapshotError, SnapshotOptions, codec};
use crate::cache::{NodeCache, Slot};
use crate::model::{Timestamp, mix64};

/// Dictionary table numbers, in the order their entries are laid out.
pub(crate) const TABLE_STRINGS: u8 = 0;
pub(crate) const TABLE_LABEL_SETS: u8 = 1;
pub(crate) const TABLE_PLATFORMS: u8 = 2;
pub(crate) const TABLE_WORKLOAD_SETS: u8 = 3;
pub(crate) const TABLE_DIGESTS: u8 = 4;
pub(crate) const TABLES: usize = 5;

pub(crate) const FLAG_PHASE_MASK: u8 = 0b0011;
pub(crate) const FLAG_IPV4: u8 = 0b0100;
pub(crate) const FLAG_EXTRA: u8 = 0b1000;

const NONE: u32 = u32::MAX;

/// Names read ahead of the name column's byte compares, so their cache misses overlap.
const WARM_GROUP: usize = 16;

/// A snapshot encoded in memory: its manifest and its chunks (chunk `i` is `chunks[i]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedSnapshot {
    /// The manifest to commit after every chunk is stored.
    pub manifest: Manifest,
    /// The chunks, header included.
    pub chunks: Vec<Vec<u8>>,
}

/// Encodes `cache` as generation `generation`, taken at `now`. Sync and store-less: the building
/// block of [`write_snapshot`](super::write_snapshot).
pub fn encode_snapshot(
    cache: &NodeCache,
    generation: u64,
    now: Timestamp,
    opts: &SnapshotOptions,
) -> Result<EncodedSnapshot, SnapshotError> {
    opts.validate()?;
    let threads = opts.thread_count();
    let dict = Dictionary::build(cache);
    let order = sorted_slots(cache, threads);
    let nodes = NodeSection { cache, dict: &dict, order: &order, base: now.as_secs_u32() };
    let mut pending = cut(&dict, opts, threads)?;
    pending.extend(cut(&nodes, opts, threads)?);

    let snapshot_id = opts.snapshot_id.unwrap_or_else(random_id);
    let count = u32::try_from(pending.len())
        .map_err(|_| SnapshotError::InvalidOptions { reason: "more than 2^32 chunks; raise max_chunk_bytes" })?;
    // Seal headers in parallel: the CRC runs over every byte once more.
    let per = pending.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (part_no, part) in pending.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (i, p) in part.iter_mut().enumerate() {
                    p.checksum = ChunkHeader {
                        version: FORMAT_VERSION,
                        codec: opts.codec as u8,
                        section: p.section as u8,
                        generation,
                        snapshot_id,
                        index: (part_no * per + i) as u32,
                        count,
                        raw_len: p.raw_len,
                        payload_len: 0,
                        checksum: 0,
                    }
                    .seal(&mut p.bytes);
                }
            });
        }
    });
    let infos: Vec<ChunkInfo> = pending
        .iter()
        .map(|p| ChunkInfo {
            section: p.section,
            bytes: p.bytes.len() as u32,
            raw_len: p.raw_len,
            items: p.items,
            checksum: p.checksum,
        })
        .collect();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        generation,
        snapshot_id,
        codec: opts.codec,
        created_at: now,
        node_count: order.len() as u64,
        chunk_count: count,
        total_bytes: infos.iter().map(|c| u64::from(c.bytes)).sum(),
        chunks: infos,
        fencing_token: opts.fencing_token,
    };
    Ok(EncodedSnapshot { manifest, chunks: pending.into_iter().map(|p| p.bytes).collect() })
}

/// A fresh snapshot id: randomness from the standard library's per-process hash keys, mixed with
/// a counter, so no clock and no extra dependency is needed.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(COUNTER.fetch_add(1, Ordering::Relaxed));
    mix64(h.finish())
}

/// The snapshot's dense dictionary and the maps from cache ids to it.
pub(crate) struct Dictionary<'a> {
    strings: Vec<&'a str>,
    label_sets: Vec<Vec<(u32, u32)>>,
    platforms: Vec<[u32; 3]>,
    workload_sets: Vec<Vec<(u32, u64, u8)>>,
    digests: Vec<u64>,
    label_map: Vec<u32>,
    platform_map: Vec<u32>,
    workload_map: Vec<u32>,
    digest_map: std::collections::HashMap<u64, u32, MixState>,
}

/// Ids ranked by use count, most used first (ties by id, for deterministic output).
fn ranked(items: impl Iterator<Item = (u32, u32)>) -> Vec<u32> {
    let mut v: Vec<(u32, u32)> = items.collect();
    v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().map(|(id, _)| id).collect()
}

impl<'a> Dictionary<'a> {
    fn build(cache: &'a NodeCache) -> Self {
        let mut string_map = vec![NONE; cache.strings.capacity_ids()];
        let mut strings: Vec<&'a str> = Vec::new();
        let mut sid = |id: u32| -> u32 {
            let m = &mut string_map[id as usize];
            if *m == NONE {
                *m = strings.len() as u32;
                strings.push(cache.str_of(id));
            }
            *m
        };
        let mut label_map = vec![NONE; cache.label_sets.capacity_ids()];
        let mut label_sets = Vec::new();
        for id in ranked(cache.label_sets.iter().map(|(id, _, refs)| (id, refs))) {
            label_map[id as usize] = label_sets.len() as u32;
            label_sets.push(cache.label_sets.get(id).iter().map(|&(k, v)| (sid(k), sid(v))).collect());
        }
        let mut platform_map = vec![NONE; cache.platforms.capacity_ids()];
        let mut platforms = Vec::new();
        for id in ranked(cache.platforms.iter().map(|(id, _, refs)| (id, refs))) {
            platform_map[id as usize] = platforms.len() as u32;
            platforms.push(cache.platforms.get(id).map(&mut sid));
        }
        let mut workload_map = vec![NONE; cache.workload_sets.capacity_ids()];
        let mut workload_sets = Vec::new();
        for id in ranked(cache.workload_sets.iter().map(|(id, _, refs)| (id, refs))) {
            workload_map[id as usize] = workload_sets.len() as u32;
            workload_sets.push(cache.workload_sets.get(id).iter().map(|&(w, v, p)| (sid(w), v, p)).collect());
        }
        let mut counts: std::collections::HashMap<u64, u32, MixState> =
            std::collections::HashMap::with_hasher(MixState);
        for n in cache.slots.iter().enumerate().filter(|&(s, _)| cache.is_live(s as Slot)).map(|(_, n)| n) {
            *counts.entry(n.applied).or_insert(0) += 1;
        }
        let mut by_use: Vec<(u64, u32)> = counts.iter().map(|(&d, &c)| (d, c)).collect();
        by_use.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let digests: Vec<u64> = by_use.iter().map(|&(d, _)| d).collect();
        let mut digest_map = counts;
        for (rank, &d) in digests.iter().enumerate() {
            digest_map.insert(d, rank as u32);
        }
        Self {
            strings,
            label_sets,
            platforms,
            workload_sets,
            digests,
            label_map,
            platform_map,
            workload_map,
            digest_map,
        }
    }

    fn table_lens(&self) -> [usize; TABLES] {
        [self.strings.len(), self.label_sets.len(), self.platforms.len(), self.workload_sets.len(), self.digests.len()]
    }
}

/// Hashes already-random `u64`s (digests) with one multiply-mix instead of SipHash.
#[derive(Clone, Copy, Default)]
pub(crate) struct MixState;

pub(crate) struct MixHasher(u64);

impl std::hash::BuildHasher for MixState {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(0)
    }
}

impl std::hash::Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = mix64(self.0 ^ v);
    }
}

/// Something that is cut into chunks by ranges of its items.
trait Section: Sync {
    const KIND: SectionKind;
    fn len(&self) -> usize;
    /// Appends the raw payload of items `range`.
    fn encode(&self, range: Range<usize>, out: &mut Vec<u8>);
}

impl Section for Dictionary<'_> {
    const KIND: SectionKind = SectionKind::Dictionary;

    fn len(&self) -> usize {
        self.table_lens().iter().sum()
    }

    fn encode(&self, range: Range<usize>, out: &mut Vec<u8>) {
        let lens = self.table_lens();
        lens.iter().for_each(|&l| put_varint(out, l as u64));
        let mut segments = Vec::new();
        let mut start = 0;
        for (table, &len) in lens.iter().enumerate() {
            let (a, b) = (range.start.max(start), range.end.min(start + len));
            if a < b {
                segments.push((table as u8, a - start, b - start));
            }
            start += len;
        }
        put_varint(out, segments.len() as u64);
        for (table, a, b) in segments {
            out.push(table);
            put_varint(out, a as u64);
            put_varint(out, (b - a) as u64);
            match table {
                TABLE_STRINGS => self.strings[a..b].iter().for_each(|s| {
                    put_varint(out, s.len() as u64);
                    out.extend_from_slice(s.as_bytes());
                }),
                TABLE_LABEL_SETS => self.label_sets[a..b].iter().for_each(|set| {
                    put_varint(out, set.len() as u64);
                    set.iter().for_each(|&(k, v)| {
                        put_varint(out, u64::from(k));
                        put_varint(out, u64::from(v));
                    });
                }),
                TABLE_PLATFORMS => {
                    self.platforms[a..b].iter().flatten().for_each(|&s| put_varint(out, u64::from(s)));
                }
                TABLE_WORKLOAD_SETS => self.workload_sets[a..b].iter().for_each(|set| {
                    put_varint(out, set.len() as u64);
                    set.iter().for_each(|&(w, version, phase)| {
                        put_varint(out, u64::from(w));
                        put_varint(out, version);
                        out.push(phase);
                    });
                }),
                _ => self.digests[a..b].iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes())),
            }
        }
    }
}

/// The live nodes in name order, columns drawn from the cache.
struct NodeSection<'a> {
    cache: &'a NodeCache,
    dict: &'a Dictionary<'a>,
    order: &'a [Slot],
    base: u32,
}

impl Section for NodeSection<'_> {
    const KIND: SectionKind = SectionKind::Nodes;

    fn len(&self) -> usize {
        self.order.len()
    }

    fn encode(&self, range: Range<usize>, out: &mut Vec<u8>) {
        let (cache, dict) = (self.cache, self.dict);
        let slots = &self.order[range];
        let n = slots.len();
        // One gather pass touches each node's slot once; the column passes then run over this
        // chunk-local copy instead of chasing slots across the whole table again.
        let nodes: Vec<crate::cache::NodeSlot> = slots.iter().map(|&s| cache.slots[s as usize]).collect();
        put_varint(out, n as u64);
        put_varint(out, u64::from(self.base));
        let mut suffix_lens = Vec::with_capacity(n);
        let mut suffixes = Vec::with_capacity(n * 12);
        let mut prev: &[u8] = &[];
        for group in nodes.chunks(WARM_GROUP) {
            // Name order is not slot order, so each name is a miss in a large arena. Reading the
            // group's names (first and last byte: a name may span two lines) before comparing any
            // lets their misses overlap, where the byte-compare's branches would take them in turn.
            let touch = group
                .iter()
                .map(|n| cache.name_bytes_of(n))
                .fold(0u8, |t, name| t ^ name.first().copied().unwrap_or(0) ^ name.last().copied().unwrap_or(0));
            std::hint::black_box(touch);
            for node in group {
                let name = cache.name_bytes_of(node);
                let shared = prev.iter().zip(name).take_while(|(a, b)| a == b).count().min(255);
                out.push(shared as u8);
                suffix_lens.push((name.len() - shared) as u8);
                suffixes.extend_from_slice(&name[shared..]);
                prev = name;
            }
        }
        out.extend_from_slice(&suffix_lens);
        out.extend_from_slice(&suffixes);
        let mut ipv4 = Vec::with_capacity(n);
        let mut extra = Vec::new();
        for (&s, node) in slots.iter().zip(&nodes) {
            let mut flags = node.phase & FLAG_PHASE_MASK;
            if let Some(v4) = cache.ipv4_of_slot(node) {
                flags |= FLAG_IPV4;
                ipv4.push(v4);
            }
            if cache.has_extra_addrs(node) {
                flags |= FLAG_EXTRA;
                extra.push(s);
            }
            out.push(flags);
        }
        for node in &nodes {
            put_varint(out, zigzag(i64::from(self.base) - i64::from(node.last_seen)));
        }
        let mut column = |f: &dyn Fn(&crate::cache::NodeSlot) -> u32| {
            let v: Vec<u32> = nodes.iter().map(f).collect();
            put_planes(out, &v);
        };
        column(&|n| dict.label_map[n.label_set as usize]);
        column(&|n| dict.platform_map[n.platform as usize]);
        column(&|n| dict.workload_map[n.workloads as usize]);
        column(&|n| dict.digest_map.get(&n.applied).copied().unwrap_or(NONE));
        for shift in [24, 16, 8, 0] {
            out.extend(ipv4.iter().map(|&v| (v >> shift) as u8));
        }
        for s in extra {
            let addrs = cache.extra_addrs_of(s);
            put_varint(out, addrs.len() as u64);
            for a in addrs {
                match a {
                    std::net::IpAddr::V4(v4) => {
                        out.push(4);
                        out.extend_from_slice(&v4.octets());
                    }
                    std::net::IpAddr::V6(v6) => {
                        out.push(6);
                        out.extend_from_slice(&v6.octets());
                    }
                }
            }
        }
    }
}

/// A node's sort key: the first 24 bytes of its name as three big-endian words, zero-padded
/// (names hold no NUL, so padding sorts shorter names first, as byte order does). Sorting keys
/// instead of chasing every comparison into the name arena keeps the sort in cache; 32 bytes a key,
/// so ten million of them are 320 MB of fresh memory, not more.
#[derive(Clone, Copy)]
struct NameKey {
    words: [u64; 3],
    slot: Slot,
}

fn name_key(cache: &NodeCache, slot: Slot) -> NameKey {
    let mut b = [0u8; 24];
    let name = cache.name_bytes(slot);
    let n = name.len().min(24);
    b[..n].copy_from_slice(&name[..n]);
    let word = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    NameKey { words: [word(0), word(1), word(2)], slot }
}

/// Live slots sorted by name: keys sorted in `threads` parts in parallel, then merged (the last
/// merge writes the slots alone).
fn sorted_slots(cache: &NodeCache, threads: usize) -> Vec<Slot> {
    let cmp = |a: &NameKey, b: &NameKey| {
        a.words.cmp(&b.words).then_with(|| cache.name_bytes(a.slot).cmp(cache.name_bytes(b.slot)))
    };
    let live: Vec<Slot> = (0..cache.slots.len() as Slot).filter(|&s| cache.is_live(s)).collect();
    let parts = if threads < 2 || live.len() < 1 << 15 { 1 } else { threads };
    let per = live.len().div_ceil(parts).max(1);
    let mut runs: Vec<Vec<NameKey>> = std::thread::scope(|s| {
        let handles: Vec<_> = live
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    let mut keys: Vec<NameKey> = part.iter().map(|&slot| name_key(cache, slot)).collect();
                    keys.sort_unstable_by(cmp);
                    keys
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    drop(live);
    while runs.len() > 2 {
        let mut next = Vec::with_capacity(runs.len().div_ceil(2));
        let mut it = runs.into_iter();
        while let Some(a) = it.next() {
            match it.next() {
                Some(b) => next.push(merge(&a, &b, cmp, |k| k)),
                None => next.push(a),
            }
        }
        runs = next;
    }
    match (runs.pop(), runs.pop()) {
        (Some(b), Some(a)) => merge(&a, &b, cmp, |k| k.slot),
        (Some(a), None) => a.into_iter().map(|k| k.slot).collect(),
        _ => Vec::new(),
    }
}

/// Merges two sorted runs (ties from `a` first), writing `out(item)` for each.
fn merge<T: Copy, U>(a: &[T], b: &[T], cmp: impl Fn(&T, &T) -> std::cmp::Ordering, out: impl Fn(T) -> U) -> Vec<U> {
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if cmp(&b[j], &a[i]).is_lt() {
            merged.push(out(b[j]));
            j += 1;
        } else {
            merged.push(out(a[i]));
            i += 1;
        }
    }
    merged.extend(a[i..].iter().map(|&x| out(x)));
    merged.extend(b[j..].iter().map(|&x| out(x)));
    merged
}

/// A compressed chunk whose header is not written yet (its first [`CHUNK_HEADER_LEN`] bytes are
/// reserved for it).
struct Pending {
    section: SectionKind,
    items: u32,
    raw_len: u32,
    bytes: Vec<u8>,
    checksum: u32,
}

fn build<S: Section>(section: &S, range: Range<usize>, opts: &SnapshotOptions) -> Result<Pending, SnapshotError> {
    let items = range.len() as u32;
    let mut raw = Vec::new();
    section.encode(range, &mut raw);
    let raw_len = u32::try_from(raw.len())
        .map_err(|_| SnapshotError::InvalidOptions { reason: "a chunk's raw section exceeds 4 GiB" })?;
    let mut bytes = vec![0u8; CHUNK_HEADER_LEN];
    codec::compress(opts.codec, opts.level, &raw, &mut bytes);
    Ok(Pending { section: S::KIND, items, raw_len, bytes, checksum: 0 })
}

/// Runs `f` over `items` on up to `threads` scoped threads; results in input order.
pub(crate) fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.min(items.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    results.sort_unstable_by_key(|&(i, _)| i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Cuts a section into chunks that come close to `max_chunk_bytes` without exceeding it.
///
/// The compressed bytes per item are estimated from a sample, then chunks are compressed a wave
/// of `threads` at a time, each wave sized by the ratio the previous chunk achieved. A chunk that
/// overflows is discarded with the rest of its wave and re-cut smaller at its own ratio.
fn cut<S: Section>(section: &S, opts: &SnapshotOptions, threads: usize) -> Result<Vec<Pending>, SnapshotError> {
    let total = section.len();
    let budget = opts.max_chunk_bytes - CHUNK_HEADER_LEN;
    let target = budget as f64 * f64::from(opts.target_fill);
    let fits = |p: &Pending| p.bytes.len() <= opts.max_chunk_bytes;
    let mut out = Vec::new();
    if total == 0 {
        // The dictionary always has a chunk (it carries the table sizes); no nodes, no node chunk.
        if S::KIND == SectionKind::Dictionary {
            let p = build(section, 0..0, opts)?;
            if !fits(&p) {
                return Err(SnapshotError::RecordTooLarge {
                    needed: p.bytes.len(),
                    max_chunk_bytes: opts.max_chunk_bytes,
                });
            }
            out.push(p);
        }
        return Ok(out);
    }
    let sample = total.min(opts.sample_items.max(1));
    let probe = build(section, 0..sample, opts)?;
    if sample == total && fits(&probe) {
        out.push(probe);
        return Ok(out);
    }
    let mut per_item = (probe.bytes.len() - CHUNK_HEADER_LEN).max(1) as f64 / sample as f64;
    let mut pos = 0;
    while pos < total {
        let mut ranges = Vec::with_capacity(threads);
        let mut p = pos;
        while ranges.len() < threads && p < total {
            let n = ((target / per_item) as usize).clamp(1, total - p);
            ranges.push(p..p + n);
            p += n;
        }
        let built = par_map(&ranges, threads, |r| build(section, r.clone(), opts));
        for (r, chunk) in ranges.into_iter().zip(built) {
            let chunk = chunk?;
            let payload = (chunk.bytes.len() - CHUNK_HEADER_LEN).max(1) as f64;
            per_item = payload / r.len() as f64;
            if fits(&chunk) {
                pos = r.end;
                out.push(chunk);
            } else if r.len() == 1 {
                return Err(SnapshotError::RecordTooLarge {
                    needed: chunk.bytes.len(),
                    max_chunk_bytes: opts.max_chunk_bytes,
                });
            } else {
                // Shrink strictly, even when the ratio estimate rounds the same way twice.
                per_item = per_item.max(target / (r.len() - 1) as f64);
                break;
            }
        }
    }
    Ok(out)
}
