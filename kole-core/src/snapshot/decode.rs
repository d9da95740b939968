//! Decoding: chunks are checked, decompressed and parsed in parallel, then assembled in index
//! order by one thread that rebuilds the cache (or, for [`verify`], only checks). Every parser is
//! total and allocates only what the input's remaining length allows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use super::chunk::{self, Expected};
use super::cursor::{ReadError, ReadResult, Reader, unzigzag};
use super::encode::{
    FLAG_EXTRA, FLAG_IPV4, FLAG_PHASE_MASK, TABLE_DIGESTS, TABLE_LABEL_SETS, TABLE_PLATFORMS, TABLE_STRINGS,
    TABLE_WORKLOAD_SETS, TABLES,
};
use super::error::lossy;
use super::{ChunkFault, Manifest, RestoreLimits, SectionKind, SnapshotError, codec};
use crate::cache::{LabelSetId, NodeCache, PlatformId, WorkloadSetId};
use crate::model::{
    MAX_NODE_NAME_LEN, NodePhase, WorkloadId, WorkloadPhase, validate_label_key, validate_label_value,
    validate_node_name,
};

const TABLE_NAMES: [&str; TABLES] = ["string", "label set", "platform", "workload-state set", "digest"];

/// What [`verify`] found in a generation whose every chunk checks out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifySummary {
    /// Nodes in the snapshot.
    pub nodes: u64,
    /// Chunks checked.
    pub chunks: u32,
    /// Dictionary entries (strings, label sets, platforms, workload-state sets, digests).
    pub dictionary_entries: u64,
    /// Bytes after decompression.
    pub raw_bytes: u64,
    /// Bytes as stored.
    pub stored_bytes: u64,
}

/// Rebuilds the cache of one generation from its manifest and chunks (`chunks[i]` is chunk `i`).
/// Either every check passes and the whole cache comes back, or nothing does.
pub fn decode_snapshot(
    manifest: &Manifest,
    chunks: &[Vec<u8>],
    limits: &RestoreLimits,
) -> Result<NodeCache, SnapshotError> {
    let nodes = manifest.node_count.min(limits.max_nodes) as usize;
    let mut asm = Assembler::new(manifest, Some(NodeCache::with_capacity(nodes, 28)));
    asm.index.reserve(nodes);
    run(manifest, chunks, limits, &mut asm)?;
    asm.cache.take().ok_or_else(|| asm.inconsistent("no cache was built".into()))
}

/// Checks every chunk of a generation — header, checksum, decompression, every field, every
/// dictionary reference, name order, counts — without building a cache.
pub fn verify(manifest: &Manifest, chunks: &[Vec<u8>], limits: &RestoreLimits) -> Result<VerifySummary, SnapshotError> {
    let mut asm = Assembler::new(manifest, None);
    run(manifest, chunks, limits, &mut asm)?;
    Ok(VerifySummary {
        nodes: asm.nodes,
        chunks: manifest.chunk_count,
        dictionary_entries: asm.dict.as_ref().map_or(0, |d| d.lens.iter().sum()),
        raw_bytes: manifest.chunks.iter().map(|c| u64::from(c.raw_len)).sum(),
        stored_bytes: manifest.total_bytes,
    })
}

fn run(
    manifest: &Manifest,
    chunks: &[Vec<u8>],
    limits: &RestoreLimits,
    asm: &mut Assembler<'_>,
) -> Result<(), SnapshotError> {
    let generation = manifest.generation;
    manifest.validate()?;
    if chunks.len() != manifest.chunks.len() {
        return Err(SnapshotError::ChunkCountMismatch {
            generation,
            expected: manifest.chunks.len(),
            found: chunks.len(),
        });
    }
    let limit = |what, value: u64, limit: u64| {
        if value > limit { Err(SnapshotError::LimitExceeded { generation, what, value, limit }) } else { Ok(()) }
    };
    limit("the chunk count", u64::from(manifest.chunk_count), u64::from(limits.max_chunks))?;
    limit("the node count", manifest.node_count, limits.max_nodes)?;
    let raw: u64 = manifest.chunks.iter().map(|c| u64::from(c.raw_len)).sum();
    limit("the decompressed size", raw, limits.max_total_raw_bytes)?;

    let parse = |i: usize| parse_chunk(manifest, i, &chunks[i], limits);
    let threads = limits.thread_count().min(chunks.len());
    if threads <= 1 {
        for i in 0..chunks.len() {
            asm.take(i, parse(i)?, limits)?;
        }
        return asm.finish();
    }
    // Workers claim chunks in index order and parse them; this thread assembles in index order
    // as results arrive, so the sequential cache rebuild overlaps with decompression.
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, Result<Parsed, SnapshotError>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, stop, parse) = (&next, &stop, &parse);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= chunks.len() || tx.send((i, parse(i))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let result = (|| {
            let mut waiting: Vec<Option<Parsed>> = (0..chunks.len()).map(|_| None).collect();
            let mut at = 0;
            for (i, parsed) in rx.iter() {
                waiting[i] = Some(parsed?);
                while let Some(p) = waiting.get_mut(at).and_then(Option::take) {
                    asm.take(at, p, limits)?;
                    at += 1;
                }
            }
            if at != chunks.len() {
                return Err(asm.inconsistent("a decoding thread stopped early".into()));
            }
            asm.finish()
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })
}

/// A chunk parsed into its section's structure.
pub(crate) enum Parsed {
    Dictionary(DictPart),
    Nodes(NodePart),
}

fn parse_chunk(
    manifest: &Manifest,
    index: usize,
    bytes: &[u8],
    limits: &RestoreLimits,
) -> Result<Parsed, SnapshotError> {
    let info = &manifest.chunks[index];
    let fault = |fault| SnapshotError::Chunk { generation: manifest.generation, index: index as u32, fault };
    let want = Expected {
        codec: manifest.codec,
        section: info.section,
        generation: manifest.generation,
        snapshot_id: manifest.snapshot_id,
        index: index as u32,
        count: manifest.chunk_count,
        checksum: info.checksum,
        max_raw_len: limits.max_chunk_raw_bytes,
    };
    let (header, payload) = chunk::open(bytes, &want).map_err(fault)?;
    if header.raw_len != info.raw_len || bytes.len() != info.bytes as usize {
        return Err(fault(ChunkFault::NotInManifest { found: header.checksum, expected: info.checksum }));
    }
    let raw = codec::decompress(manifest.codec, payload, header.raw_len as usize).map_err(fault)?;
    let parsed = parse_section(info.section, &raw).map_err(fault)?;
    let items = match &parsed {
        Parsed::Dictionary(d) => d.segments.iter().map(|s| s.count as u64).sum::<u64>(),
        Parsed::Nodes(n) => n.flags.len() as u64,
    };
    if items != u64::from(info.items) {
        return Err(SnapshotError::Inconsistent {
            generation: manifest.generation,
            reason: format!("chunk {index} holds {items} entries, its manifest says {}", info.items),
        });
    }
    Ok(parsed)
}

/// Parses a decompressed section. Total: any input gives `Ok` or a fault, never a panic.
pub(crate) fn parse_section(kind: SectionKind, raw: &[u8]) -> Result<Parsed, ChunkFault> {
    let malformed = |e: ReadError| ChunkFault::Malformed { reason: e.reason, offset: e.offset };
    let mut r = Reader::new(raw);
    let parsed = match kind {
        SectionKind::Dictionary => Parsed::Dictionary(parse_dictionary(&mut r).map_err(malformed)?),
        SectionKind::Nodes => Parsed::Nodes(parse_nodes(&mut r)?),
    };
    if !r.is_empty() {
        return Err(ChunkFault::Malformed { reason: "trailing bytes after the section", offset: r.offset() });
    }
    Ok(parsed)
}

/// One chunk's share of the dictionary.
#[derive(Default)]
pub(crate) struct DictPart {
    totals: [u64; TABLES],
    segments: Vec<Segment>,
    strings: Vec<String>,
    label_sets: Vec<Vec<(u32, u32)>>,
    platforms: Vec<[u32; 3]>,
    workload_sets: Vec<Vec<(u32, u64, u8)>>,
    digests: Vec<u64>,
}

struct Segment {
    table: u8,
    first: u64,
    count: usize,
}

fn parse_dictionary(r: &mut Reader<'_>) -> ReadResult<DictPart> {
    let mut d = DictPart::default();
    for t in &mut d.totals {
        *t = r.varint()?;
    }
    let string_id = |r: &mut Reader<'_>, total: u64| -> ReadResult<u32> {
        let id = r.varint_u32()?;
        if u64::from(id) >= total { Err(r.err("string id past the end of the string table")) } else { Ok(id) }
    };
    let segments = r.count(3)?;
    let mut last_table = None;
    for _ in 0..segments {
        let table = r.u8()?;
        if usize::from(table) >= TABLES {
            return Err(r.err("unknown dictionary table"));
        }
        if last_table.is_some_and(|t| t >= table) {
            return Err(r.err("dictionary segments out of table order"));
        }
        last_table = Some(table);
        let first = r.varint()?;
        let count = r.count(1)?;
        if first.checked_add(count as u64).is_none_or(|end| end > d.totals[usize::from(table)]) {
            return Err(r.err("dictionary segment runs past its table's size"));
        }
        let strings = d.totals[usize::from(TABLE_STRINGS)];
        match table {
            TABLE_STRINGS => {
                d.strings.reserve(count);
                for _ in 0..count {
                    let len = r.count(1)?;
                    let bytes = r.bytes(len)?;
                    let s = std::str::from_utf8(bytes).map_err(|_| r.err("string is not UTF-8"))?;
                    d.strings.push(s.to_owned());
                }
            }
            TABLE_LABEL_SETS => {
                d.label_sets.reserve(count);
                for _ in 0..count {
                    let pairs = r.count(2)?;
                    let mut set = Vec::with_capacity(pairs);
                    for _ in 0..pairs {
                        set.push((string_id(r, strings)?, string_id(r, strings)?));
                    }
                    d.label_sets.push(set);
                }
            }
            TABLE_PLATFORMS => {
                d.platforms.reserve(count);
                for _ in 0..count {
                    d.platforms.push([string_id(r, strings)?, string_id(r, strings)?, string_id(r, strings)?]);
                }
            }
            TABLE_WORKLOAD_SETS => {
                d.workload_sets.reserve(count);
                for _ in 0..count {
                    let items = r.count(3)?;
                    let mut set = Vec::with_capacity(items);
                    for _ in 0..items {
                        let w = string_id(r, strings)?;
                        let version = r.varint()?;
                        let phase = r.u8()?;
                        if WorkloadPhase::from_u8(phase).is_none() {
                            return Err(r.err("unknown workload phase"));
                        }
                        set.push((w, version, phase));
                    }
                    d.workload_sets.push(set);
                }
            }
            _ => {
                if count > r.remaining() / 8 {
                    return Err(r.err("digest table runs past the end"));
                }
                d.digests.reserve(count);
                for _ in 0..count {
                    d.digests.push(r.u64_le()?);
                }
            }
        }
        d.segments.push(Segment { table, first, count });
    }
    Ok(d)
}

/// One chunk of nodes, columns decoded and checked on their own.
pub(crate) struct NodePart {
    names: Vec<u8>,
    name_lens: Vec<u8>,
    flags: Vec<u8>,
    last_seen: Vec<u32>,
    label: Vec<u32>,
    platform: Vec<u32>,
    workloads: Vec<u32>,
    digest: Vec<u32>,
    ipv4: Vec<u32>,
    extras: Vec<Vec<IpAddr>>,
}

fn parse_nodes(r: &mut Reader<'_>) -> Result<NodePart, ChunkFault> {
    let malformed = |e: ReadError| ChunkFault::Malformed { reason: e.reason, offset: e.offset };
    let n = r.count(6).map_err(malformed)?;
    let base = i64::from(r.varint_u32().map_err(malformed)?);
    let prefixes = r.bytes(n).map_err(malformed)?;
    let suffix_lens = r.bytes(n).map_err(malformed)?;
    let suffix_total: usize = suffix_lens.iter().map(|&l| usize::from(l)).sum();
    let mut suffixes = r.bytes(suffix_total).map_err(malformed)?;
    let mut names = Vec::with_capacity(prefixes.iter().map(|&p| usize::from(p)).sum::<usize>() + suffix_total);
    let mut prev = 0..0;
    for (&p, &s) in prefixes.iter().zip(suffix_lens) {
        let (p, s) = (usize::from(p), usize::from(s));
        if p > prev.len() {
            return Err(malformed(r.err("name shares more bytes than the previous name has")));
        }
        let start = names.len();
        names.extend_from_within(prev.start..prev.start + p);
        names.extend_from_slice(&suffixes[..s]);
        suffixes = &suffixes[s..];
        let name = &names[start..];
        if name.len() > MAX_NODE_NAME_LEN || validate_node_name(std::str::from_utf8(name).unwrap_or("")).is_err() {
            return Err(ChunkFault::InvalidValue { what: "node name", value: lossy(name) });
        }
        if !prev.is_empty() && names[prev.clone()] >= *name {
            return Err(ChunkFault::NamesOutOfOrder { name: lossy(name) });
        }
        prev = start..names.len();
    }
    let name_lens: Vec<u8> = prefixes.iter().zip(suffix_lens).map(|(&p, &s)| p.wrapping_add(s)).collect();
    let flags = r.bytes(n).map_err(malformed)?.to_vec();
    if let Some(&bad) =
        flags.iter().find(|&&f| f & !(FLAG_PHASE_MASK | FLAG_IPV4 | FLAG_EXTRA) != 0 || f & FLAG_PHASE_MASK > 2)
    {
        return Err(ChunkFault::InvalidValue { what: "node flags", value: format!("{bad:#04x}") });
    }
    let mut last_seen = Vec::with_capacity(n);
    for _ in 0..n {
        let t = base - unzigzag(r.varint().map_err(malformed)?);
        last_seen.push(u32::try_from(t).map_err(|_| malformed(r.err("last-seen time out of range")))?);
    }
    let label = r.planes(n).map_err(malformed)?;
    let platform = r.planes(n).map_err(malformed)?;
    let workloads = r.planes(n).map_err(malformed)?;
    let digest = r.planes(n).map_err(malformed)?;
    let k = flags.iter().filter(|&&f| f & FLAG_IPV4 != 0).count();
    let planes = r.bytes(4 * k).map_err(malformed)?;
    let ipv4 =
        (0..k).map(|i| u32::from_be_bytes([planes[i], planes[k + i], planes[2 * k + i], planes[3 * k + i]])).collect();
    let with_extra = flags.iter().filter(|&&f| f & FLAG_EXTRA != 0).count();
    let mut extras = Vec::with_capacity(with_extra.min(r.remaining()));
    for _ in 0..with_extra {
        let count = r.count(5).map_err(malformed)?;
        if count == 0 {
            return Err(malformed(r.err("node flagged with extra addresses has none")));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            addrs.push(match r.u8().map_err(malformed)? {
                4 => {
                    let b = r.bytes(4).map_err(malformed)?;
                    IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                }
                6 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(r.bytes(16).map_err(malformed)?);
                    IpAddr::V6(Ipv6Addr::from(a))
                }
                _ => return Err(malformed(r.err("unknown address tag"))),
            });
        }
        extras.push(addrs);
    }
    Ok(NodePart { names, name_lens, flags, last_seen, label, platform, workloads, digest, ipv4, extras })
}

/// The whole dictionary, checked, and (when building) interned into the cache.
struct Dict {
    lens: [u64; TABLES],
    labels: Vec<LabelSetId>,
    platforms: Vec<PlatformId>,
    workloads: Vec<WorkloadSetId>,
    digests: Vec<u64>,
}

/// Consumes parsed chunks in index order.
struct Assembler<'m> {
    manifest: &'m Manifest,
    cache: Option<NodeCache>,
    parts: Vec<DictPart>,
    dict: Option<Dict>,
    nodes: u64,
    last_name: Vec<u8>,
    /// The name-index entries of the nodes inserted so far, added to the cache's index in one
    /// pass at the end (`NodeCache::index_bulk`): nothing looks a name up before then.
    index: Vec<u64>,
}

impl<'m> Assembler<'m> {
    fn new(manifest: &'m Manifest, cache: Option<NodeCache>) -> Self {
        Self { manifest, cache, parts: Vec::new(), dict: None, nodes: 0, last_name: Vec::new(), index: Vec::new() }
    }

    fn inconsistent(&self, reason: String) -> SnapshotError {
        SnapshotError::Inconsistent { generation: self.manifest.generation, reason }
    }

    fn fault(&self, index: usize, fault: ChunkFault) -> SnapshotError {
        SnapshotError::Chunk { generation: self.manifest.generation, index: index as u32, fault }
    }

    fn take(&mut self, index: usize, parsed: Parsed, limits: &RestoreLimits) -> Result<(), SnapshotError> {
        match parsed {
            Parsed::Dictionary(d) => {
                if let Some(first) = self.parts.first()
                    && first.totals != d.totals
                {
                    return Err(
                        self.inconsistent(format!("chunk {index} disagrees with chunk 0 on the dictionary's size"))
                    );
                }
                let entries: u64 = d.totals.iter().fold(0u64, |a, &t| a.saturating_add(t));
                if entries > limits.max_dictionary_entries {
                    return Err(SnapshotError::LimitExceeded {
                        generation: self.manifest.generation,
                        what: "the dictionary entry count",
                        value: entries,
                        limit: limits.max_dictionary_entries,
                    });
                }
                self.parts.push(d);
                Ok(())
            }
            Parsed::Nodes(part) => {
                if self.dict.is_none() {
                    self.finish_dictionary()?;
                }
                self.take_nodes(index, part)
            }
        }
    }

    fn finish(&mut self) -> Result<(), SnapshotError> {
        if self.dict.is_none() {
            self.finish_dictionary()?;
        }
        if self.nodes != self.manifest.node_count {
            return Err(self.inconsistent(format!(
                "the manifest counts {} nodes, the chunks hold {}",
                self.manifest.node_count, self.nodes
            )));
        }
        if let (Some(cache), Some(dict)) = (self.cache.as_mut(), self.dict.as_ref()) {
            cache.release_restore_refs(&dict.labels, &dict.platforms, &dict.workloads);
            cache.index_bulk(&std::mem::take(&mut self.index));
        }
        Ok(())
    }

    /// Joins the dictionary parts, checks every cross-reference and interns it into the cache.
    fn finish_dictionary(&mut self) -> Result<(), SnapshotError> {
        let parts = std::mem::take(&mut self.parts);
        let Some(totals) = parts.first().map(|p| p.totals) else {
            return Err(self.inconsistent("no dictionary chunk".into()));
        };
        let mut strings: Vec<String> = Vec::new();
        let mut label_sets: Vec<Vec<(u32, u32)>> = Vec::new();
        let mut platforms: Vec<[u32; 3]> = Vec::new();
        let mut workload_sets: Vec<Vec<(u32, u64, u8)>> = Vec::new();
        let mut digests: Vec<u64> = Vec::new();
        // Per table: (entries so far, chunk) after each chunk, to name the chunk of a bad entry.
        let mut origin: [Vec<(usize, usize)>; TABLES] = Default::default();
        for (index, mut part) in parts.into_iter().enumerate() {
            let mut taken = [0usize; TABLES];
            for seg in &part.segments {
                let t = usize::from(seg.table);
                let have = [strings.len(), label_sets.len(), platforms.len(), workload_sets.len(), digests.len()][t];
                if seg.first != have as u64 {
                    return Err(self.fault(
                        index,
                        ChunkFault::Malformed {
                            reason: "dictionary segment does not continue where the previous chunk stopped",
                            offset: 0,
                        },
                    ));
                }
                let (a, b) = (taken[t], taken[t] + seg.count);
                taken[t] = b;
                // Segment counts were checked against the entries parsed, so these ranges hold.
                match seg.table {
                    TABLE_STRINGS => strings.extend(part.strings.drain(..b - a)),
                    TABLE_LABEL_SETS => label_sets.extend(part.label_sets.drain(..b - a)),
                    TABLE_PLATFORMS => platforms.extend(part.platforms.drain(..b - a)),
                    TABLE_WORKLOAD_SETS => workload_sets.extend(part.workload_sets.drain(..b - a)),
                    _ => digests.extend(part.digests.drain(..b - a)),
                }
            }
            let have = [strings.len(), label_sets.len(), platforms.len(), workload_sets.len(), digests.len()];
            for (o, h) in origin.iter_mut().zip(have) {
                o.push((h, index));
            }
        }
        let chunk_of = |t: u8, id: usize| {
            let o = &origin[usize::from(t)];
            o.get(o.partition_point(|&(end, _)| end <= id)).map_or(0, |&(_, c)| c) as u32
        };
        let lens =
            [strings.len(), label_sets.len(), platforms.len(), workload_sets.len(), digests.len()].map(|l| l as u64);
        if lens != totals {
            return Err(
                self.inconsistent(format!("the dictionary declares {totals:?} entries, its chunks hold {lens:?}"))
            );
        }
        // Values the model would reject never enter the cache. Each string is checked once per role.
        let dict_fault = |index: u32, what: &'static str, value: &str| SnapshotError::Chunk {
            generation: self.manifest.generation,
            index,
            fault: ChunkFault::InvalidValue { what, value: lossy(value.as_bytes()) },
        };
        let mut key_ok = vec![false; strings.len()];
        let mut value_ok = vec![false; strings.len()];
        for (id, set) in label_sets.iter().enumerate() {
            let at = chunk_of(TABLE_LABEL_SETS, id);
            for (i, &(k, v)) in set.iter().enumerate() {
                let (k, v) = (k as usize, v as usize);
                if !key_ok[k] {
                    validate_label_key(&strings[k]).map_err(|_| dict_fault(at, "label key", &strings[k]))?;
                    key_ok[k] = true;
                }
                if !value_ok[v] {
                    validate_label_value(&strings[v]).map_err(|_| dict_fault(at, "label value", &strings[v]))?;
                    value_ok[v] = true;
                }
                if i > 0 && strings[set[i - 1].0 as usize] >= strings[k] {
                    return Err(dict_fault(at, "label set (keys out of order or repeated)", &strings[k]));
                }
            }
        }
        let mut workload_ok = vec![false; strings.len()];
        for (id, set) in workload_sets.iter().enumerate() {
            let at = chunk_of(TABLE_WORKLOAD_SETS, id);
            for (i, &(w, _, _)) in set.iter().enumerate() {
                let w = w as usize;
                if !workload_ok[w] {
                    WorkloadId::new(strings[w].as_str()).map_err(|_| dict_fault(at, "workload id", &strings[w]))?;
                    workload_ok[w] = true;
                }
                if i > 0 && strings[set[i - 1].0 as usize] >= strings[w] {
                    return Err(dict_fault(at, "workload-state set (workloads out of order or repeated)", &strings[w]));
                }
            }
        }
        let mut dict = Dict { lens, labels: Vec::new(), platforms: Vec::new(), workloads: Vec::new(), digests };
        if let Some(cache) = self.cache.as_mut() {
            let s = |id: u32| strings[id as usize].as_str();
            dict.labels = label_sets
                .iter()
                .map(|set| {
                    let pairs: Vec<(&str, &str)> = set.iter().map(|&(k, v)| (s(k), s(v))).collect();
                    cache.restore_label_set(&pairs)
                })
                .collect();
            dict.platforms = platforms.iter().map(|&[a, o, v]| cache.restore_platform(s(a), s(o), s(v))).collect();
            dict.workloads = workload_sets
                .iter()
                .map(|set| {
                    let items: Vec<(&str, u64, u8)> = set.iter().map(|&(w, v, p)| (s(w), v, p)).collect();
                    cache.restore_workload_set(&items)
                })
                .collect();
        }
        self.dict = Some(dict);
        Ok(())
    }

    fn take_nodes(&mut self, index: usize, part: NodePart) -> Result<(), SnapshotError> {
        let generation = self.manifest.generation;
        let Some(dict) = self.dict.as_ref() else {
            return Err(self.inconsistent("node chunk before the dictionary".into()));
        };
        let fault = |fault| SnapshotError::Chunk { generation, index: index as u32, fault };
        let dangling = |t: u8, id: u32| {
            fault(ChunkFault::DanglingId {
                table: TABLE_NAMES[usize::from(t)],
                id: u64::from(id),
                len: dict.lens[usize::from(t)],
            })
        };
        let first_len = part.name_lens.first().map_or(0, |&l| usize::from(l));
        if let Some(first) = part.names.get(..first_len)
            && !first.is_empty()
            && !self.last_name.is_empty()
            && *first <= *self.last_name
        {
            return Err(fault(ChunkFault::NamesOutOfOrder { name: lossy(first) }));
        }
        let check = |col: &[u32], t: u8| match col.iter().find(|&&id| u64::from(id) >= dict.lens[usize::from(t)]) {
            Some(&id) => Err(dangling(t, id)),
            None => Ok(()),
        };
        check(&part.label, TABLE_LABEL_SETS)?;
        check(&part.platform, TABLE_PLATFORMS)?;
        check(&part.workloads, TABLE_WORKLOAD_SETS)?;
        check(&part.digest, TABLE_DIGESTS)?;
        let n = part.flags.len();
        if let Some(cache) = self.cache.as_mut() {
            let (mut off, mut v4, mut ex) = (0usize, 0usize, 0usize);
            for i in 0..n {
                let len = usize::from(part.name_lens[i]);
                let name = part.names.get(off..off + len).unwrap_or_default();
                off += len;
                // Parsed names are validated ASCII.
                let name = std::str::from_utf8(name).unwrap_or_default();
                let flags = part.flags[i];
                let (label, platform, workloads) = (
                    dict.labels[part.label[i] as usize],
                    dict.platforms[part.platform[i] as usize],
                    dict.workloads[part.workloads[i] as usize],
                );
                cache.retain_parts(label, platform, workloads);
                let slot = cache
                    .insert_unindexed(
                        name,
                        label,
                        platform,
                        workloads,
                        NodePhase::from_u8(flags & FLAG_PHASE_MASK).unwrap_or_default(),
                        part.last_seen[i],
                        dict.digests[part.digest[i] as usize],
                    )
                    .map_err(|source| SnapshotError::Cache { generation, source })?;
                self.index.push(NodeCache::index_entry(name, slot));
                if flags & FLAG_EXTRA != 0 {
                    let mut addrs = Vec::new();
                    if flags & FLAG_IPV4 != 0 {
                        addrs.push(IpAddr::V4(Ipv4Addr::from(part.ipv4[v4])));
                        v4 += 1;
                    }
                    addrs.extend_from_slice(&part.extras[ex]);
                    ex += 1;
                    cache.set_addresses_raw(slot, &addrs);
                } else if flags & FLAG_IPV4 != 0 {
                    cache.set_ipv4_raw(slot, part.ipv4[v4]);
                    v4 += 1;
                }
            }
        }
        if n > 0 {
            let last_len = usize::from(part.name_lens[n - 1]);
            self.last_name.clear();
            self.last_name.extend_from_slice(&part.names[part.names.len() - last_len..]);
        }
        self.nodes += n as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn section_decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_section(SectionKind::Dictionary, &bytes);
            let _ = parse_section(SectionKind::Nodes, &bytes);
            let _ = chunk::ChunkHeader::parse(&bytes);
        }
    }
}
