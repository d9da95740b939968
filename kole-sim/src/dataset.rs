//! The reference data set: a seeded, realistic fleet of far-edge nodes.
//!
//! Every benchmark figure kole publishes is measured on this fleet, so it is defined here in code
//! and documented in `docs/benchmarks.md`. It is built to look like a real CDN / retail / IoT
//! fleet, not to flatter a codec:
//!
//! - **Names** `{region}-s{site:05}-{serial}`: one of 12 regions, about 250 nodes per site (so a
//!   million nodes span 4,000 sites), and an 8-character base-32 serial that is a bijective scramble
//!   of the node index (unique, and as incompressible as a real hardware serial: 40 bits).
//! - **Labels** (3–6 per node): region, site type (`cdn`, `retail`, `gateway`, `vehicle`), tier,
//!   and optionally environment (per site), hardware class, retail customer (40 chains) and uplink network.
//!   A million nodes share a few thousand label sets.
//! - **Addresses**: one IPv4 per node; each site has its own /16 (thousands of /16s), the host part
//!   is random.
//! - **Platform**: `amd64` / `arm64` / `arm`, four kernel lines, five agent versions.
//! - **Workloads**: 2–3 per node from a catalog chosen by site type; about 5% of nodes still run the
//!   previous version (a rollout in flight); 97% running, 2% pending, 1% failed.
//! - **Liveness**: 97% online (last seen within the last 60 s), 2% offline (last seen 5 min to a
//!   day ago), 1% registering.
//!
//! Node `i` depends only on `(seed, nodes, i)`, so any node can be generated on its own and in any
//! order without holding the whole fleet in memory.

use std::net::{IpAddr, Ipv4Addr};

use kole_core::cache::{CacheError, StateCache};
use kole_core::model::{
    DesiredDigest, Labels, NodeInfo, NodeName, NodePhase, NodeRegistration, Timestamp, WorkloadId, WorkloadPhase,
    WorkloadState, mix64,
};
use kole_core::rng::SplitMix64;

/// The wall-clock "now" of the reference fleet (2026-09-21T…Z), fixed so runs are reproducible.
pub const REFERENCE_NOW_SECS: u64 = 1_790_000_000;
/// Average nodes per site.
pub const NODES_PER_SITE: usize = 250;

const REGIONS: [&str; 12] = [
    "cn-hangzhou",
    "cn-beijing",
    "cn-shenzhen",
    "cn-chengdu",
    "ap-southeast-1",
    "ap-northeast-1",
    "ap-south-1",
    "eu-central-1",
    "eu-west-1",
    "us-east-1",
    "us-west-2",
    "sa-east-1",
];
const SITE_TYPES: [&str; 4] = ["cdn", "retail", "gateway", "vehicle"];
const ENVS: [(&str, u32); 3] = [("prod", 85), ("canary", 10), ("staging", 5)];
const NETWORKS: [&str; 4] = ["fiber", "lte", "5g", "satellite"];
const ARCHES: [(&str, u32); 3] = [("amd64", 60), ("arm64", 35), ("arm", 5)];
const OSES: [(&str, u32); 4] = [("linux-5.10", 15), ("linux-5.15", 35), ("linux-6.1", 40), ("linux-6.6", 10)];
const AGENTS: [(&str, u32); 5] = [("1.4.0", 5), ("1.4.2", 15), ("1.5.0", 20), ("1.5.1", 45), ("1.6.0", 15)];
const HW_AMD64: [&str; 2] = ["x86-small", "x86-large"];
const HW_ARM: [&str; 3] = ["arm-pi4", "arm-jetson", "arm-rk3588"];
const BASE32: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Workload catalog: (id, current version) per site type.
const CATALOG: [&[(&str, u64)]; 4] = [
    &[("edge-system/cdn-cache", 42), ("edge-system/log-shipper", 17), ("edge-system/metrics-agent", 9)],
    &[("retail/pos-app", 128), ("edge-system/log-shipper", 17), ("edge-system/metrics-agent", 9)],
    &[("iot/mqtt-bridge", 6), ("edge-system/metrics-agent", 9), ("edge-system/log-shipper", 17)],
    &[("fleet/telemetry", 31), ("fleet/ota-updater", 12), ("edge-system/log-shipper", 17)],
];

/// A deterministic, seeded fleet of `nodes` reference nodes.
#[derive(Clone, Debug)]
pub struct ReferenceFleet {
    seed: u64,
    nodes: usize,
    sites: usize,
}

/// One generated node: its registration and the state the cache should hold for it.
#[derive(Clone, Debug)]
pub struct ReferenceNode {
    /// What the node registers with.
    pub registration: NodeRegistration,
    /// Its boot id.
    pub boot_id: u32,
    /// Its liveness phase.
    pub phase: NodePhase,
    /// When the controller last heard from it.
    pub last_seen: Timestamp,
}

/// A small deterministic random stream for one node.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.below_by_multiply(n)
    }

    fn percent(&mut self) -> u32 {
        self.below(100) as u32
    }

    fn weighted<'a>(&mut self, table: &[(&'a str, u32)]) -> &'a str {
        let total: u32 = table.iter().map(|&(_, w)| w).sum();
        let mut x = self.below(u64::from(total)) as u32;
        for &(v, w) in table {
            if x < w {
                return v;
            }
            x -= w;
        }
        table[table.len() - 1].0
    }
}

/// A bijection on 40-bit integers (xorshift and odd multiplications modulo 2^40).
fn scramble40(mut x: u64) -> u64 {
    const MASK: u64 = (1 << 40) - 1;
    x &= MASK;
    x ^= x >> 21;
    x = x.wrapping_mul(0x2545_f491_4f6c_dd1d) & MASK;
    x ^= x >> 17;
    x = x.wrapping_mul(0x9e37_79b9_7f4b) & MASK;
    x ^= x >> 19;
    x
}

impl ReferenceFleet {
    /// A fleet of `nodes` nodes generated from `seed`.
    pub fn new(nodes: usize, seed: u64) -> Self {
        Self { seed, nodes, sites: nodes.div_ceil(NODES_PER_SITE).max(1) }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes
    }

    /// Whether the fleet is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes == 0
    }

    /// Number of sites.
    pub fn sites(&self) -> usize {
        self.sites
    }

    /// The reference "now".
    pub fn now(&self) -> Timestamp {
        Timestamp::from_secs(REFERENCE_NOW_SECS)
    }

    fn rng(&self, i: usize, stream: u64) -> Rng {
        Rng(SplitMix64::new(mix64(self.seed ^ mix64(i as u64 ^ (stream << 48)))))
    }

    /// Site of node `i`.
    fn site(&self, i: usize) -> usize {
        self.rng(i, 1).below(self.sites as u64) as usize
    }

    /// The name of node `i` (cheap: no other field is generated).
    pub fn name(&self, i: usize) -> String {
        let site = self.site(i);
        let region = REGIONS[site % REGIONS.len()];
        // The serial scrambles the index, so it is unique per fleet (for up to 2^40 nodes).
        let serial = scramble40(i as u64 ^ (self.seed & ((1 << 40) - 1)));
        let mut s = String::with_capacity(region.len() + 16);
        s.push_str(region);
        s.push_str("-s");
        push_padded(&mut s, site as u64, 5);
        s.push('-');
        for k in (0..8).rev() {
            s.push(char::from(BASE32[((serial >> (5 * k)) & 31) as usize]));
        }
        s
    }

    /// Boot id of node `i`.
    pub fn boot_id(&self, i: usize) -> u32 {
        (self.rng(i, 2).next() as u32) | 1
    }

    /// The workloads (id, version, phase) node `i` runs.
    fn workloads(&self, i: usize, site_type: usize) -> Vec<WorkloadState> {
        let mut r = self.rng(i, 3);
        let catalog = CATALOG[site_type];
        let count = 2 + r.below(2) as usize;
        catalog[..count]
            .iter()
            .filter_map(|&(id, version)| {
                let version = if r.percent() < 5 { version - 1 } else { version };
                let p = r.percent();
                let phase = match p {
                    0..97 => WorkloadPhase::Running,
                    97..99 => WorkloadPhase::Pending,
                    _ => WorkloadPhase::Failed,
                };
                Some(WorkloadState { workload: WorkloadId::new(id).ok()?, version, phase })
            })
            .collect()
    }

    /// Generates node `i` in full.
    pub fn node(&self, i: usize) -> ReferenceNode {
        let site = self.site(i);
        let mut site_rng = Rng(SplitMix64::new(mix64(self.seed ^ 0x5175_u64 ^ (site as u64) << 20)));
        let mut r = self.rng(i, 4);
        let region = REGIONS[site % REGIONS.len()];
        let site_type = site_rng.below(SITE_TYPES.len() as u64) as usize;
        let arch = r.weighted(&ARCHES);

        let mut pairs: Vec<(&str, String)> = vec![
            ("topology.kubernetes.io/region", region.to_owned()),
            ("kole.dev/site-type", SITE_TYPES[site_type].to_owned()),
            ("kole.dev/tier", if site_type == 0 { "edge" } else { "far-edge" }.to_owned()),
        ];
        // Environment is a property of the site (canary sites), not of single nodes.
        if site_rng.percent() < 70 {
            pairs.push(("env", site_rng.weighted(&ENVS).to_owned()));
        }
        if r.percent() < 50 {
            let hw = if arch == "amd64" { HW_AMD64[r.below(2) as usize] } else { HW_ARM[r.below(3) as usize] };
            pairs.push(("kole.dev/hw", hw.to_owned()));
        }
        if site_type == 1 {
            pairs.push(("kole.dev/customer", format!("chain-{:02}", site_rng.below(40))));
        } else if r.percent() < 40 {
            pairs.push(("kole.dev/network", NETWORKS[r.below(4) as usize].to_owned()));
        }
        // Labels from fixed vocabularies are valid by construction.
        let labels = Labels::from_pairs(pairs).unwrap_or_default();

        // One /16 per site, avoiding 0/8, 10/8, 127/8 and multicast; random host part.
        let net = 0x0b00 + (mix64(self.seed ^ site as u64) % (0xdf00 - 0x0b00)) as u32;
        let net = if (0x7f00..0x8000).contains(&net) { net + 0x100 } else { net };
        let host = (r.below(0xfffe) + 1) as u32;
        let ipv4 = Ipv4Addr::from((net << 16) | host);

        let workloads = self.workloads(i, site_type);
        let applied = DesiredDigest::of(workloads.iter().map(|w| (w.workload.as_str(), w.version, &[][..])));
        let p = r.percent();
        let now = REFERENCE_NOW_SECS;
        let (phase, last_seen) = match p {
            0..97 => (NodePhase::Online, now - r.below(60)),
            97..99 => (NodePhase::Offline, now - 300 - r.below(86_100)),
            _ => (NodePhase::Registering, now - r.below(60)),
        };
        let registration = NodeRegistration {
            // Names are valid by construction (region, digits, base-32).
            name: NodeName::new(self.name(i)).unwrap_or_else(|e| panic!("reference name invalid: {e}")),
            labels,
            info: NodeInfo {
                arch: arch.to_owned(),
                os: r.weighted(&OSES).to_owned(),
                agent_version: r.weighted(&AGENTS).to_owned(),
                addresses: vec![IpAddr::V4(ipv4)],
            },
            applied,
            workloads,
        };
        ReferenceNode { registration, boot_id: self.boot_id(i), phase, last_seen: Timestamp::from_secs(last_seen) }
    }

    /// Registers every node into `cache` with its phase and last-seen time.
    pub fn load_into(&self, cache: &mut dyn StateCache) -> Result<(), CacheError> {
        self.load_range_into(cache, 0..self.nodes, &mut |_| {})
    }

    /// Registers nodes `range` into `cache`, calling `progress` with the count done every 64k nodes.
    pub fn load_range_into(
        &self,
        cache: &mut dyn StateCache,
        range: std::ops::Range<usize>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(), CacheError> {
        for i in range {
            let n = self.node(i);
            cache.register(&n.registration, n.boot_id, n.last_seen)?;
            if n.phase != NodePhase::Online {
                cache.set_phase(n.registration.name.as_str(), n.phase)?;
            }
            if i.is_multiple_of(65_536) {
                progress(i);
            }
        }
        Ok(())
    }
}

fn push_padded(s: &mut String, v: u64, width: usize) {
    let digits = v.to_string();
    for _ in digits.len()..width {
        s.push('0');
    }
    s.push_str(&digits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use kole_core::cache::NodeCache;
    use kole_core::model::Selector;
    use std::collections::HashSet;

    #[test]
    fn deterministic_and_unique() {
        let f = ReferenceFleet::new(20_000, 7);
        assert_eq!(f.node(123).registration, ReferenceFleet::new(20_000, 7).node(123).registration);
        let names: HashSet<String> = (0..f.len()).map(|i| f.name(i)).collect();
        assert_eq!(names.len(), f.len());
        assert_ne!(f.name(5), ReferenceFleet::new(20_000, 8).name(5));
    }

    #[test]
    fn realistic_shape() {
        let f = ReferenceFleet::new(50_000, 1);
        let mut cache = NodeCache::new();
        f.load_into(&mut cache).unwrap();
        assert_eq!(cache.len(), 50_000);
        let sets = cache.label_set_count();
        assert!((100..5_000).contains(&sets), "{sets} label sets");
        let all = cache.counts(&Selector::everything());
        assert!(all.online > 47_000 && all.offline > 500 && all.registering > 200, "{all:?}");
        for i in (0..f.len()).step_by(997) {
            let n = f.node(i);
            assert!((3..=6).contains(&n.registration.labels.len()));
            assert!((2..=3).contains(&n.registration.workloads.len()));
            assert!(n.registration.name.as_str().len() <= 32);
        }
        let slash16: HashSet<u32> = (0..f.len())
            .step_by(7)
            .filter_map(|i| match f.node(i).registration.info.addresses[0] {
                IpAddr::V4(v) => Some(u32::from(v) >> 16),
                IpAddr::V6(_) => None,
            })
            .collect();
        assert!(slash16.len() > 150, "{} /16s", slash16.len());
    }
}
