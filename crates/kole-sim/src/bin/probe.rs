//! Scratch probe (removed before landing).
use kole_core::cache::{NodeCache, StateCache};
use kole_sim::dataset::ReferenceFleet;
use kole_sim::mem::rss_bytes;
use std::time::Instant;
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let fleet = ReferenceFleet::new(n, 42);
    let before = rss_bytes().unwrap();
    let t = Instant::now();
    let mut cache = NodeCache::with_capacity(n, 28);
    fleet.load_into(&mut cache).unwrap();
    let build = t.elapsed();
    cache.shrink_to_fit();
    let after = rss_bytes().unwrap();
    hb(&mut cache, &fleet);
    println!(
        "n={n} build={:?} rss_delta/node={} heap_est/node={} label_sets={} strings={}",
        build,
        (after - before) / n as u64,
        cache.heap_bytes() / n,
        cache.label_set_count(),
        cache.string_count()
    );
}
#[allow(dead_code)]
fn gen_only(n: usize) {
    let fleet = ReferenceFleet::new(n, 42);
    let t = Instant::now();
    let mut x = 0usize;
    for i in 0..n {
        x += fleet.node(i).registration.labels.len();
    }
    println!("gen only {:?} {x}", t.elapsed());
}
#[allow(dead_code)]
fn hb(cache: &mut NodeCache, fleet: &ReferenceFleet) {
    use kole_core::cache::HeartbeatUpdate;
    let n = fleet.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = 12345u64;
    for i in (1..n).rev() {
        s = kole_core::model::mix64(s);
        order.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let mut arena = Vec::new();
    let mut offs = Vec::new();
    for &i in &order {
        let nm = fleet.name(i);
        offs.push((arena.len(), nm.len()));
        arena.extend_from_slice(nm.as_bytes());
    }
    let boots: Vec<u32> = order.iter().map(|&i| fleet.boot_id(i)).collect();
    let now = fleet.now();
    let t = Instant::now();
    let mut ok = 0;
    for (k, &(o, l)) in offs.iter().enumerate() {
        let name = std::str::from_utf8(&arena[o..o + l]).unwrap();
        let u = HeartbeatUpdate {
            boot_id: boots[k],
            seq: 1,
            applied: Default::default(),
        };
        if cache.heartbeat(name, &u, now).is_ok() {
            ok += 1;
        }
    }
    let e = t.elapsed();
    println!(
        "single hb {ok} in {:?} = {:.0}/s",
        e,
        n as f64 / e.as_secs_f64()
    );
    let t = Instant::now();
    let mut ok = 0;
    let mut out = Vec::new();
    for (ks, chunk) in offs.chunks(1024).enumerate() {
        let batch: Vec<kole_core::cache::HeartbeatIn> = chunk
            .iter()
            .enumerate()
            .map(|(j, &(o, l))| kole_core::cache::HeartbeatIn {
                node: std::str::from_utf8(&arena[o..o + l]).unwrap(),
                update: HeartbeatUpdate {
                    boot_id: boots[ks * 1024 + j],
                    seq: 2,
                    applied: Default::default(),
                },
            })
            .collect();
        out.clear();
        cache.heartbeat_batch(&batch, now, &mut out);
        ok += out.iter().filter(|r| r.is_ok()).count();
    }
    let e = t.elapsed();
    println!("hb {ok} in {:?} = {:.0}/s", e, n as f64 / e.as_secs_f64());
}
