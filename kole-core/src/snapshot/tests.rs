//! Cross-cutting snapshot tests: round trips of random caches, corruption detection, store
//! fallback and crash safety, and an ignored timing run on a reference-like fleet.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::cache::{NodeCache, StateCache};
use crate::model::{
    DesiredDigest, Labels, NodeInfo, NodeName, NodePhase, NodeRecord, NodeRegistration, Selector, Timestamp,
    WorkloadId, WorkloadPhase, WorkloadState,
};

const NOW: u64 = 1_700_000_000;

fn bounded<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(120), f).await.expect("test timed out") })
}

fn records(cache: &NodeCache) -> Vec<NodeRecord> {
    let mut out = Vec::new();
    cache.visit(&Selector::everything(), &mut |r| {
        out.push(r);
        ControlFlow::Continue(())
    });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn assert_same(a: &NodeCache, b: &NodeCache) {
    b.check_invariants().expect("restored cache invariants");
    assert_eq!(a.len(), b.len());
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra, rb);
    for r in &ra {
        assert_eq!(b.get(r.name.as_str()).as_ref(), Some(r));
    }
    assert_eq!(a.counts(&Selector::everything()), b.counts(&Selector::everything()));
}

#[derive(Clone, Debug)]
enum Op {
    Register {
        node: usize,
        labels: Vec<(usize, usize)>,
        addrs: Vec<IpAddr>,
        platform: usize,
        applied: u64,
        workloads: Vec<(usize, u64, u8)>,
        at: u64,
    },
    Report {
        node: usize,
        workloads: Vec<(usize, u64, u8)>,
    },
    SetPhase {
        node: usize,
        phase: u8,
    },
    Remove {
        node: usize,
    },
}

const KEYS: [&str; 5] = ["region", "tier", "zone", "app.kubernetes.io/name", "kole.dev/site"];
const VALUES: [&str; 6] = ["", "cdn", "retail", "cn-hangzhou", "s0042", "a.b-c_d"];
const WORKLOADS: [&str; 4] = ["edge/agent", "cdn-cache", "ns/x.y", "probe"];

fn node_name(i: usize) -> String {
    format!("cn-hz-s{:04}-{}", i % 7, i * 7919 % 1000)
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ]
}

fn workloads() -> impl Strategy<Value = Vec<(usize, u64, u8)>> {
    proptest::collection::vec((0..WORKLOADS.len(), prop_oneof![0..4u64, any::<u64>()], 0..4u8), 0..4)
}

fn op(nodes: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            0..nodes,
            proptest::collection::vec((0..KEYS.len(), 0..VALUES.len()), 0..4),
            proptest::collection::vec(addr(), 0..4),
            0..3usize,
            prop_oneof![Just(0u64), Just(7), any::<u64>()],
            workloads(),
            0..200u64,
        )
            .prop_map(|(node, labels, addrs, platform, applied, workloads, at)| Op::Register {
                node, labels, addrs, platform, applied, workloads, at
            }),
        2 => (0..nodes, workloads()).prop_map(|(node, workloads)| Op::Report { node, workloads }),
        2 => (0..nodes, 0..3u8).prop_map(|(node, phase)| Op::SetPhase { node, phase }),
        1 => (0..nodes).prop_map(|node| Op::Remove { node }),
    ]
}

fn states(ws: &[(usize, u64, u8)]) -> Vec<WorkloadState> {
    ws.iter()
        .map(|&(w, version, p)| WorkloadState {
            workload: WorkloadId::new(WORKLOADS[w]).unwrap(),
            version,
            phase: WorkloadPhase::from_u8(p).unwrap(),
        })
        .collect()
}

fn apply(ops: &[Op]) -> NodeCache {
    let mut c = NodeCache::new();
    for op in ops {
        match op {
            Op::Register { node, labels, addrs, platform, applied, workloads, at } => {
                let reg = NodeRegistration {
                    name: NodeName::new(node_name(*node)).unwrap(),
                    labels: Labels::from_pairs(labels.iter().map(|&(k, v)| (KEYS[k], VALUES[v]))).unwrap(),
                    info: NodeInfo {
                        arch: ["amd64", "arm64", "riscv64"][*platform].into(),
                        os: "linux-6.1".into(),
                        agent_version: format!("1.{platform}.0"),
                        addresses: addrs.clone(),
                    },
                    applied: DesiredDigest(*applied),
                    workloads: states(workloads),
                };
                c.register(&reg, 1, Timestamp::from_secs(NOW - 100 + at)).unwrap();
            }
            Op::Report { node, workloads } => {
                let _ = c.report_workloads(&node_name(*node), &states(workloads));
            }
            Op::SetPhase { node, phase } => {
                let _ = c.set_phase(&node_name(*node), NodePhase::from_u8(*phase).unwrap());
            }
            Op::Remove { node } => {
                c.remove(&node_name(*node));
            }
        }
    }
    c
}

fn opts(codec: Codec, max_chunk_bytes: usize) -> SnapshotOptions {
    SnapshotOptions { codec, max_chunk_bytes, threads: 2, sample_items: 8, ..SnapshotOptions::default() }
}

fn codec_strategy() -> impl Strategy<Value = Codec> {
    prop_oneof![Just(Codec::Gzip), Just(Codec::Lz4)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_caches_round_trip(ops in proptest::collection::vec(op(60), 0..160), codec in codec_strategy(), max in 160usize..1200) {
        let cache = apply(&ops);
        let enc = encode_snapshot(&cache, 3, Timestamp::from_secs(NOW), &opts(codec, max)).unwrap();
        prop_assert!(enc.chunks.iter().all(|c| c.len() <= max));
        prop_assert_eq!(enc.manifest.node_count, cache.len() as u64);
        let back = decode_snapshot(&enc.manifest, &enc.chunks, &RestoreLimits::default()).unwrap();
        assert_same(&cache, &back);
        let summary = verify(&enc.manifest, &enc.chunks, &RestoreLimits { threads: 1, ..RestoreLimits::default() }).unwrap();
        prop_assert_eq!(summary.nodes, cache.len() as u64);
    }

    #[test]
    fn any_damage_to_any_chunk_is_detected(
        ops in proptest::collection::vec(op(40), 1..80),
        codec in codec_strategy(),
        pick in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        flip in 1..=255u8,
        how in 0..6u8,
    ) {
        let cache = apply(&ops);
        let o = SnapshotOptions { snapshot_id: Some(11), ..opts(codec, 300) };
        let enc = encode_snapshot(&cache, 5, Timestamp::from_secs(NOW), &o).unwrap();
        let n = enc.chunks.len();
        let i = pick.index(n);
        let mut chunks = enc.chunks.clone();
        match how {
            0 => { let c = &mut chunks[i]; let j = at.index(c.len()); c[j] ^= flip; }
            1 => { chunks.remove(i); }
            2 => { let c = &mut chunks[i]; let j = at.index(c.len()); c.truncate(j); }
            3 => { chunks.push(chunks[i].clone()); }
            4 => {
                // Another generation, or another write of the same generation.
                let other = SnapshotOptions { snapshot_id: Some(12), ..o.clone() };
                let g = if flip % 2 == 0 { 6 } else { 5 };
                let e2 = encode_snapshot(&cache, g, Timestamp::from_secs(NOW), &other).unwrap();
                prop_assume!(e2.chunks.len() == n);
                chunks[i] = e2.chunks[i].clone();
            }
            _ => {
                prop_assume!(n > 1);
                let j = (i + 1 + at.index(n - 1)) % n;
                chunks.swap(i, j);
                prop_assume!(chunks[i] != chunks[j]);
            }
        }
        let r = decode_snapshot(&enc.manifest, &chunks, &RestoreLimits::default());
        prop_assert!(r.is_err(), "damage {} to chunk {} went unnoticed", how, i);
        prop_assert!(verify(&enc.manifest, &chunks, &RestoreLimits::default()).is_err());
    }
}

#[test]
fn huge_dictionary_spans_chunks() {
    let mut cache = NodeCache::new();
    for i in 0..3000u32 {
        let reg = NodeRegistration {
            name: NodeName::new(format!("n{i:05}")).unwrap(),
            labels: Labels::from_pairs([("serial", format!("v{i}-{}", i.wrapping_mul(2_654_435_761)))]).unwrap(),
            info: NodeInfo { arch: "arm64".into(), os: "linux".into(), agent_version: "1".into(), addresses: vec![] },
            applied: DesiredDigest(u64::from(i)),
            workloads: vec![],
        };
        cache.register(&reg, 1, Timestamp::from_secs(NOW)).unwrap();
    }
    for codec in [Codec::Gzip, Codec::Lz4] {
        let enc = encode_snapshot(&cache, 1, Timestamp::from_secs(NOW), &opts(codec, 4096)).unwrap();
        assert!(
            enc.manifest.dictionary_chunks() > 3,
            "{codec:?}: {} dictionary chunks",
            enc.manifest.dictionary_chunks()
        );
        assert!(enc.chunks.iter().all(|c| c.len() <= 4096));
        let back = decode_snapshot(&enc.manifest, &enc.chunks, &RestoreLimits::default()).unwrap();
        assert_same(&cache, &back);
        // Dropping a dictionary chunk from both manifest and chunks is caught by the table sizes.
        let mut m = enc.manifest.clone();
        m.chunks.remove(1);
        m.chunk_count -= 1;
        m.total_bytes = m.chunks.iter().map(|c| u64::from(c.bytes)).sum();
        let mut chunks = enc.chunks.clone();
        chunks.remove(1);
        assert!(decode_snapshot(&m, &chunks, &RestoreLimits::default()).is_err());
    }
}

#[test]
fn limits_stop_oversized_snapshots() {
    let cache = apply(&[Op::Register {
        node: 1,
        labels: vec![(0, 1)],
        addrs: vec![],
        platform: 0,
        applied: 0,
        workloads: vec![],
        at: 0,
    }]);
    let enc = encode_snapshot(&cache, 1, Timestamp::from_secs(NOW), &SnapshotOptions::default()).unwrap();
    let tight = RestoreLimits { max_nodes: 0, ..RestoreLimits::default() };
    assert!(matches!(decode_snapshot(&enc.manifest, &enc.chunks, &tight), Err(SnapshotError::LimitExceeded { .. })));
    let tight = RestoreLimits { max_chunk_raw_bytes: 4, ..RestoreLimits::default() };
    let err = decode_snapshot(&enc.manifest, &enc.chunks, &tight).unwrap_err();
    assert!(matches!(err, SnapshotError::Chunk { fault: ChunkFault::TooLarge { .. }, .. }), "{err}");
}

#[test]
fn options_are_validated() {
    let cache = NodeCache::new();
    let bad = SnapshotOptions { max_chunk_bytes: 50, ..SnapshotOptions::default() };
    assert!(encode_snapshot(&cache, 1, Timestamp::from_secs(NOW), &bad).is_err());
    let mut big = apply(&[]);
    let reg = NodeRegistration {
        name: NodeName::new("n1").unwrap(),
        labels: Labels::new(),
        info: NodeInfo {
            addresses: (0..200u128)
                .map(|v| IpAddr::V6(Ipv6Addr::from(v.wrapping_mul(0x9e3779b97f4a7c15_f39cc0605cedc834))))
                .collect(),
            ..NodeInfo::default()
        },
        applied: DesiredDigest(1),
        workloads: vec![],
    };
    big.register(&reg, 1, Timestamp::from_secs(NOW)).unwrap();
    let err = encode_snapshot(&big, 1, Timestamp::from_secs(NOW), &opts(Codec::Lz4, 400)).unwrap_err();
    assert!(matches!(err, SnapshotError::RecordTooLarge { .. }), "{err}");
}

fn sample_cache(seed: u64, nodes: usize) -> NodeCache {
    let ops: Vec<Op> = (0..nodes)
        .map(|i| Op::Register {
            node: i,
            labels: vec![(0, (i + seed as usize) % VALUES.len()), (1, 2)],
            addrs: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32))],
            platform: i % 3,
            applied: seed,
            workloads: vec![(0, seed, 1)],
            at: (i as u64 + seed) % 60,
        })
        .collect();
    apply(&ops)
}

#[test]
fn memory_store_falls_back_to_the_previous_generation() {
    bounded(async {
        let store = MemorySnapshotStore::new();
        assert!(restore_latest(&store, &RestoreLimits::default()).await.unwrap().is_none());
        let old = sample_cache(1, 300);
        let new = sample_cache(2, 500);
        let o = opts(Codec::Gzip, 600);
        let m1 = write_snapshot(&store, &old, &o, Timestamp::from_secs(NOW)).await.unwrap();
        let m2 = write_snapshot(&store, &new, &o, Timestamp::from_secs(NOW + 60)).await.unwrap();
        assert_eq!((m1.generation, m2.generation), (1, 2));
        assert!(m2.chunk_count > 2);
        let r = restore_latest(&store, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(r.manifest, m2);
        assert!(r.faults.is_empty());
        assert_same(&new, &r.cache);

        assert!(store.corrupt_chunk(2, 2, |c| {
            let last = c.len() - 1;
            c[last] ^= 0x40;
        }));
        let r = restore_latest(&store, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(r.manifest, m1);
        assert_same(&old, &r.cache);
        assert_eq!(r.faults.len(), 1);
        let msg = r.faults[0].to_string();
        assert!(msg.contains("snapshot chunk 2 of generation 2 failed its checksum"), "{msg}");

        store.remove_chunk(1, 0);
        let err = restore_latest(&store, &RestoreLimits::default()).await.unwrap_err();
        let SnapshotError::NoUsableGeneration { faults } = &err else { panic!("{err}") };
        assert_eq!(faults.len(), 2);
        assert!(matches!(faults[1].error, SnapshotError::MissingChunk { generation: 1, index: 0 }), "{err}");

        // A third write prunes down to two generations, and the newest is restorable again.
        let m3 = write_snapshot(&store, &old, &o, Timestamp::from_secs(NOW + 120)).await.unwrap();
        assert_eq!(store.generations(), vec![2, 3]);
        assert_eq!(restore_latest(&store, &RestoreLimits::default()).await.unwrap().unwrap().manifest, m3);
        assert!(store.corrupt_manifest(3, |m| m[8] ^= 1));
        let r = restore_latest(&store, &RestoreLimits::default()).await.unwrap_err();
        assert!(matches!(r, SnapshotError::NoUsableGeneration { .. }), "generation 2 is still damaged");
    });
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kole-snapshot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn dir_store_survives_a_crash_after_every_file_operation() {
    bounded(async {
        let dir = temp_dir("crash");
        let old = sample_cache(1, 400);
        let new = sample_cache(2, 700);
        let o = opts(Codec::Lz4, 1500);
        let limits = RestoreLimits::default();
        let mut n = 0;
        loop {
            let _ = std::fs::remove_dir_all(&dir);
            let store = DirSnapshotStore::open(&dir).unwrap();
            let g = write_snapshot(&store, &old, &o, Timestamp::from_secs(NOW)).await.unwrap().generation;
            let crashing = DirSnapshotStore::open(&dir).unwrap().fail_after(n);
            let result = write_snapshot(&crashing, &new, &o, Timestamp::from_secs(NOW + 60)).await;

            // A restarted process sees exactly the old or the new generation, whole.
            let restarted = DirSnapshotStore::open(&dir).unwrap();
            let r = restore_latest(&restarted, &limits).await.unwrap().unwrap();
            assert!(r.faults.is_empty(), "n = {n}: {:?}", r.faults);
            if r.manifest.generation == g {
                assert!(result.is_err(), "n = {n}: write reported success but restore found the old generation");
                assert_same(&old, &r.cache);
            } else {
                assert_eq!(r.manifest.generation, g + 1, "n = {n}");
                assert_same(&new, &r.cache);
            }
            // And the next write works and becomes the latest.
            let m = write_snapshot(&restarted, &old, &o, Timestamp::from_secs(NOW + 120)).await.unwrap();
            let r = restore_latest(&restarted, &limits).await.unwrap().unwrap();
            assert_eq!(r.manifest, m, "n = {n}");
            assert_same(&old, &r.cache);
            let gens = std::fs::read_dir(&dir).unwrap().count();
            assert_eq!(gens, 2, "n = {n}: pruned to two generations");
            if result.is_ok() {
                assert!(n > 5);
                break;
            }
            n += 1;
            assert!(n < 1000);
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn dir_store_falls_back_when_the_newest_generation_is_damaged() {
    bounded(async {
        let dir = temp_dir("fallback");
        let store = DirSnapshotStore::open(&dir).unwrap();
        let old = sample_cache(1, 300);
        let new = sample_cache(2, 300);
        let o = opts(Codec::Gzip, 700);
        write_snapshot(&store, &old, &o, Timestamp::from_secs(NOW)).await.unwrap();
        let m = write_snapshot(&store, &new, &o, Timestamp::from_secs(NOW)).await.unwrap();
        assert!(m.chunk_count >= 2);
        let path = store.chunk_path(m.generation, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[CHUNK_HEADER_LEN + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let r = restore_latest(&store, &RestoreLimits::default()).await.unwrap().unwrap();
        assert_eq!(r.manifest.generation, m.generation - 1);
        assert_same(&old, &r.cache);
        let msg = r.faults[0].to_string();
        assert!(msg.contains(&format!("snapshot chunk 1 of generation {} failed its checksum", m.generation)), "{msg}");
        // A third write lands at max + 1 and prunes the damaged one's predecessor.
        let m3 = write_snapshot(&store, &new, &o, Timestamp::from_secs(NOW)).await.unwrap();
        assert_eq!(m3.generation, m.generation + 1);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// A fleet shaped like the reference data set (until `kole-sim`'s generator lands): names
/// region-site-serial, a few labels from vocabularies, one /16 per site, few platforms, 2–3
/// workloads, ~97% online, last seen within 60 s. Registered in random order.
pub(crate) fn reference_like_fleet(nodes: usize) -> NodeCache {
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng = crate::model::mix64(rng.wrapping_add(0x9e37_79b9_7f4a_7c15));
        rng
    };
    const REGIONS: [&str; 8] = [
        "cn-hangzhou",
        "cn-shanghai",
        "cn-beijing",
        "cn-shenzhen",
        "ap-southeast-1",
        "eu-central-1",
        "us-west-1",
        "cn-chengdu",
    ];
    const TIERS: [&str; 4] = ["cdn", "retail", "iot", "factory"];
    const ZONES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
    const ISPS: [&str; 5] = ["telecom", "unicom", "mobile", "edu", "other"];
    const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let sites = (nodes / 500).max(1);
    let mut cache = NodeCache::with_capacity(nodes, 28);
    for _ in 0..nodes {
        let site = (next() % sites as u64) as usize;
        let region = REGIONS[site % REGIONS.len()];
        let serial: String = (0..8).map(|_| ALNUM[(next() % 36) as usize] as char).collect();
        let name = format!("{region}-s{site:04}-{serial}");
        let mut labels = vec![("topology.kubernetes.io/region", region.to_owned())];
        let r = next();
        labels.push(("tier", TIERS[(r % 4) as usize].to_owned()));
        if r & 0x100 != 0 {
            labels.push(("topology.kubernetes.io/zone", ZONES[((r >> 12) % 6) as usize].to_owned()));
        }
        if r & 0x200 != 0 {
            labels.push(("isp", ISPS[((r >> 20) % 5) as usize].to_owned()));
        }
        let p = next();
        let arch = if p % 10 < 7 { "arm64" } else { "amd64" };
        let os = ["linux-5.10", "linux-6.1", "linux-6.6"][((p >> 8) % 3) as usize];
        let ver = ["1.4.2", "1.4.3", "1.5.0"][((p >> 16) % 3) as usize];
        let ip = ((site as u32 * 2_654_435_761) & 0xffff_0000) | (next() as u32 & 0xffff);
        let nw = 2 + (p >> 24) % 2;
        let workloads: Vec<WorkloadState> = (0..nw)
            .map(|w| WorkloadState {
                workload: WorkloadId::new(["edge/agent-sidecar", "cdn/cache", "iot/collector"][w as usize]).unwrap(),
                version: 3 + (p >> 30) % 2,
                phase: WorkloadPhase::Running,
            })
            .collect();
        let applied = DesiredDigest::of(workloads.iter().map(|w| (w.workload.as_str(), w.version, &[][..])));
        let reg = NodeRegistration {
            name: NodeName::new(name).unwrap(),
            labels: Labels::from_pairs(labels).unwrap(),
            info: NodeInfo {
                arch: arch.into(),
                os: os.into(),
                agent_version: ver.into(),
                addresses: vec![IpAddr::V4(Ipv4Addr::from(ip))],
            },
            applied,
            workloads,
        };
        let seen = NOW - next() % 60;
        let Ok(_) = cache.register(&reg, 1, Timestamp::from_secs(seen)) else {
            continue;
        };
        if next() % 100 < 3 {
            let _ = cache.set_phase(reg.name.as_str(), NodePhase::Offline);
        }
    }
    cache
}

/// `cargo test -p kole-core --release -- --ignored --nocapture snapshot_timing`
#[test]
#[ignore = "timing run on a million nodes; use --release"]
fn snapshot_timing() {
    let nodes = std::env::var("KOLE_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let t = std::time::Instant::now();
    let cache = reference_like_fleet(nodes);
    println!("fleet: {} nodes, {} label sets, built in {:?}", cache.len(), cache.label_set_count(), t.elapsed());
    for codec in [Codec::Gzip, Codec::Lz4] {
        for level in if codec == Codec::Gzip { vec![2] } else { vec![0] } {
            let o = SnapshotOptions { codec, level, ..SnapshotOptions::default() };
            let (t, c0) = (std::time::Instant::now(), cpu_secs());
            let enc = encode_snapshot(&cache, 1, Timestamp::from_secs(NOW), &o).unwrap();
            let encode = t.elapsed();
            let encode_cpu = cpu_secs() - c0;
            let (t, c0) = (std::time::Instant::now(), cpu_secs());
            let back = decode_snapshot(&enc.manifest, &enc.chunks, &RestoreLimits::default()).unwrap();
            let restore = t.elapsed();
            let restore_cpu = cpu_secs() - c0;
            let raw: u64 = enc.manifest.chunks.iter().map(|c| u64::from(c.raw_len)).sum();
            println!(
                "{:>4} level {level}: encode {encode:?} (cpu {encode_cpu:.2}s), restore {restore:?} (cpu {restore_cpu:.2}s), {} bytes ({:.2} B/node, raw {raw}), {} chunks ({} dictionary), fullest {}",
                codec.as_str(),
                enc.manifest.total_bytes,
                enc.manifest.total_bytes as f64 / nodes as f64,
                enc.manifest.chunk_count,
                enc.manifest.dictionary_chunks(),
                enc.chunks.iter().map(Vec::len).max().unwrap_or(0),
            );
            assert_eq!(back.len(), cache.len());
        }
    }
}

/// CPU seconds this process has used (user + system), from /proc; 0 elsewhere.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
