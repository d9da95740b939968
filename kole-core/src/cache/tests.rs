//! Property tests of [`NodeCache`] against a naive model of the [`StateCache`] contract: random
//! operation sequences are applied to both, and every answer of the cache must equal the model's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;

use proptest::prelude::*;

use super::{CacheError, CacheQuery, HealthFilter, HeartbeatUpdate, NodeCache, PhaseCounts, StateCache};
use crate::model::{
    DesiredDigest, Labels, NodeHealth, NodeInfo, NodeName, NodePhase, NodeRecord, NodeRegistration, Requirement,
    RequirementOp, Selector, Timestamp, WorkloadId, WorkloadPhase, WorkloadState,
};

// ---------------------------------------------------------------------------------------------
// The model: what the `StateCache` documentation promises, kept in the plainest data structure.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ModelNode {
    record: NodeRecord,
    boot: u32,
    seq: u32,
}

#[derive(Clone, Debug, Default)]
struct Model {
    nodes: BTreeMap<String, ModelNode>,
}

/// The cache keeps second precision, saturated to `u32`.
fn secs(t: Timestamp) -> Timestamp {
    Timestamp::from_secs(u64::from(t.as_secs_u32()))
}

/// Workload states as stored: sorted by workload, the first report of a workload wins.
fn normalized(states: &[WorkloadState]) -> Vec<WorkloadState> {
    let mut out: Vec<WorkloadState> = Vec::new();
    for s in states {
        if !out.iter().any(|o| o.workload == s.workload) {
            out.push(s.clone());
        }
    }
    out.sort_by(|a, b| a.workload.cmp(&b.workload));
    out
}

impl Model {
    /// `(created, restarted, previous)`.
    fn register(&mut self, reg: &NodeRegistration, boot: u32, now: Timestamp) -> (bool, bool, Option<NodePhase>) {
        let record = NodeRecord {
            name: reg.name.clone(),
            labels: reg.labels.clone(),
            info: reg.info.clone(),
            phase: NodePhase::Online,
            last_seen: secs(now),
            applied: reg.applied,
            health: NodeHealth::OK,
            workloads: normalized(&reg.workloads),
        };
        match self.nodes.get_mut(reg.name.as_str()) {
            Some(n) => {
                let restarted = n.boot != 0 && n.boot != boot;
                let previous = n.record.phase;
                if n.boot != boot {
                    n.seq = 0;
                }
                n.boot = boot;
                n.record = record;
                (false, restarted, Some(previous))
            }
            None => {
                self.nodes.insert(reg.name.as_str().to_owned(), ModelNode { record, boot, seq: 0 });
                (true, false, None)
            }
        }
    }

    /// `(previous, applied_changed)`.
    fn heartbeat(&mut self, name: &str, hb: &HeartbeatUpdate, now: Timestamp) -> Result<(NodePhase, bool), CacheError> {
        let n = self.nodes.get_mut(name).ok_or(CacheError::UnknownNode)?;
        // Boot 0 means "unknown" (e.g. restored): the first heartbeat's boot is adopted.
        if n.boot != 0 && n.boot != hb.boot_id {
            return Err(CacheError::BootMismatch { registered: n.boot, received: hb.boot_id });
        }
        if n.boot == hb.boot_id && hb.seq <= n.seq {
            return Err(CacheError::Stale { last: n.seq, received: hb.seq });
        }
        n.boot = hb.boot_id;
        n.seq = hb.seq;
        n.record.last_seen = n.record.last_seen.max(secs(now));
        let changed = n.record.applied != hb.applied;
        n.record.applied = hb.applied;
        if let Some(h) = hb.health {
            n.record.health = h;
        }
        let previous = std::mem::replace(&mut n.record.phase, NodePhase::Online);
        Ok((previous, changed))
    }

    fn report_workloads(&mut self, name: &str, states: &[WorkloadState]) -> Result<(), CacheError> {
        let n = self.nodes.get_mut(name).ok_or(CacheError::UnknownNode)?;
        n.record.workloads = normalized(states);
        Ok(())
    }

    fn set_phase(&mut self, name: &str, phase: NodePhase) -> Result<NodePhase, CacheError> {
        let n = self.nodes.get_mut(name).ok_or(CacheError::UnknownNode)?;
        Ok(std::mem::replace(&mut n.record.phase, phase))
    }

    fn mark_offline(&mut self, cutoff: Timestamp) -> usize {
        let cutoff = secs(cutoff);
        let mut changed = 0;
        for n in self.nodes.values_mut() {
            if n.record.phase == NodePhase::Online && n.record.last_seen < cutoff {
                n.record.phase = NodePhase::Offline;
                changed += 1;
            }
        }
        changed
    }

    fn remove(&mut self, name: &str) -> bool {
        self.nodes.remove(name).is_some()
    }

    fn selected<'a>(&'a self, selector: &'a Selector) -> impl Iterator<Item = &'a NodeRecord> + 'a {
        self.nodes.values().map(|n| &n.record).filter(|r| selector.matches(&r.labels))
    }

    fn counts(&self, selector: &Selector) -> PhaseCounts {
        let mut c = PhaseCounts::default();
        for r in self.selected(selector) {
            match r.phase {
                NodePhase::Registering => c.registering += 1,
                NodePhase::Online => c.online += 1,
                NodePhase::Offline => c.offline += 1,
            }
        }
        c
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the tests
// ---------------------------------------------------------------------------------------------

/// Everything observable through `StateCache` reads and the interners' sizes equals the model.
fn assert_agrees(cache: &NodeCache, model: &Model, names: &[String]) -> Result<(), TestCaseError> {
    if let Err(e) = cache.check_invariants() {
        return Err(TestCaseError::fail(format!("invariant broken: {e}")));
    }
    prop_assert_eq!(cache.len(), model.nodes.len());
    prop_assert_eq!(cache.is_empty(), model.nodes.is_empty());
    for name in names.iter().chain(model.nodes.keys()) {
        prop_assert_eq!(cache.get(name), model.nodes.get(name).map(|n| n.record.clone()), "get({})", name);
    }
    prop_assert_eq!(cache.counts(&Selector::everything()), model.counts(&Selector::everything()));

    // Interned values are shared and dropped with their last user.
    let records: Vec<&NodeRecord> = model.nodes.values().map(|n| &n.record).collect();
    let label_sets: BTreeSet<&Labels> = records.iter().map(|r| &r.labels).collect();
    let platforms: BTreeSet<(&str, &str, &str)> =
        records.iter().map(|r| (&*r.info.arch, &*r.info.os, &*r.info.agent_version)).collect();
    let workload_sets: BTreeSet<&[WorkloadState]> = records.iter().map(|r| &*r.workloads).collect();
    let mut strings: BTreeSet<&str> = BTreeSet::new();
    for r in &records {
        strings.extend(r.labels.iter().flat_map(|(k, v)| [k, v]));
        strings.extend([&*r.info.arch, &*r.info.os, &*r.info.agent_version]);
        strings.extend(r.workloads.iter().map(|w| w.workload.as_str()));
    }
    prop_assert_eq!(cache.label_set_count(), label_sets.len(), "label sets");
    // Each live set is found by its wire form alone, as the engine finds a registration's.
    for l in &label_sets {
        prop_assert!(cache.find_label_set(l.wire()).is_some(), "{:?} not found by its block", l);
    }
    prop_assert_eq!(cache.string_count(), strings.len(), "strings {:?}", strings);
    prop_assert_eq!(cache.platforms.len(), platforms.len(), "platforms");
    prop_assert_eq!(cache.workload_sets.len(), workload_sets.len(), "workload sets");
    Ok(())
}

/// Every page of a query, following `continue_after` to the end.
fn all_pages(
    cache: &NodeCache,
    base: &CacheQuery,
    expected_counts: PhaseCounts,
) -> Result<Vec<NodeRecord>, TestCaseError> {
    let mut items = Vec::new();
    let mut q = base.clone();
    for _ in 0..=cache.len() + 1 {
        let page = cache.query(&q);
        prop_assert!(page.items.len() <= q.limit.max(1), "page longer than its limit");
        prop_assert_eq!(page.counts, expected_counts, "summary counts of {:?}", q);
        items.extend(page.items.iter().cloned());
        match page.continue_after {
            None => return Ok(items),
            Some(token) => {
                // A token is only handed out when there is more: pages before the last are full.
                prop_assert_eq!(page.items.len(), q.limit.max(1), "short page with a continue token");
                q.continue_after = Some(token);
            }
        }
    }
    Err(TestCaseError::fail(format!("query {base:?} did not end")))
}

fn by_name(mut v: Vec<NodeRecord>) -> Vec<NodeRecord> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Selector scans, name lookups and visits, paged with a small limit, against the model.
fn assert_queries_agree(
    cache: &NodeCache,
    model: &Model,
    selector: &Selector,
    names: &[NodeName],
    limit: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(cache.counts(selector), model.counts(selector), "counts({})", selector);
    for health in [HealthFilter::Healthy, HealthFilter::AnyOf(NodeHealth::WORKLOAD_FAILED.with(NodeHealth::DEGRADED))] {
        let want: Vec<NodeRecord> = model.selected(selector).filter(|r| health.matches(r.health)).cloned().collect();
        let q = CacheQuery { selector: selector.clone(), health, limit, ..CacheQuery::default() };
        let got = all_pages(cache, &q, model.counts(selector))?;
        prop_assert_eq!(by_name(got), want, "scan {} health {:?} limit {}", selector, health, limit);
    }
    for phase in [None, Some(NodePhase::Registering), Some(NodePhase::Online), Some(NodePhase::Offline)] {
        let want: Vec<NodeRecord> =
            model.selected(selector).filter(|r| phase.is_none_or(|p| r.phase == p)).cloned().collect();
        let q = CacheQuery { selector: selector.clone(), phase, limit, ..CacheQuery::default() };
        let got = all_pages(cache, &q, model.counts(selector))?;
        prop_assert_eq!(by_name(got), want, "scan {} phase {:?} limit {}", selector, phase, limit);

        // By names: in the order asked, each node once, unknown names skipped.
        let mut seen = BTreeSet::new();
        let named: Vec<&NodeRecord> = names
            .iter()
            .filter(|n| seen.insert(n.as_str()))
            .filter_map(|n| model.nodes.get(n.as_str()).map(|m| &m.record))
            .filter(|r| selector.matches(&r.labels))
            .collect();
        let mut named_counts = PhaseCounts::default();
        for r in &named {
            match r.phase {
                NodePhase::Registering => named_counts.registering += 1,
                NodePhase::Online => named_counts.online += 1,
                NodePhase::Offline => named_counts.offline += 1,
            }
        }
        let want: Vec<NodeRecord> = named.into_iter().filter(|r| phase.is_none_or(|p| r.phase == p)).cloned().collect();
        let q = CacheQuery { names: names.to_vec(), selector: selector.clone(), phase, limit, ..CacheQuery::default() };
        if !names.is_empty() {
            let got = all_pages(cache, &q, named_counts)?;
            prop_assert_eq!(got, want, "names {:?} {} phase {:?} limit {}", names, selector, phase, limit);
        }
    }
    let mut visited = Vec::new();
    cache.visit(selector, &mut |r| {
        visited.push(r);
        ControlFlow::Continue(())
    });
    prop_assert_eq!(by_name(visited), model.selected(selector).cloned().collect::<Vec<_>>(), "visit {}", selector);
    let mut calls = 0;
    cache.visit(selector, &mut |_| {
        calls += 1;
        ControlFlow::Break(())
    });
    prop_assert_eq!(calls, usize::from(model.selected(selector).next().is_some()), "visit stops on Break");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// A small pool of names so registrations, removals and re-registrations collide; the last one is
/// as long as a name may be.
fn name_pool() -> Vec<String> {
    let mut v: Vec<String> = ["n0", "n1", "node-2", "edge.3", "x"].iter().map(|s| (*s).to_owned()).collect();
    v.push(format!("l{}9", "o".repeat(126)));
    v
}

const LABEL_KEYS: &[&str] = &["a", "b", "tier", "example.com/zone"];
// Strings recur across roles (a key as a value, a value as an arch or a workload) to share interned ids.
const LABEL_VALUES: &[&str] = &["", "1", "2", "edge", "a"];

fn labels() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(prop::sample::select(LABEL_KEYS), prop::sample::select(LABEL_VALUES), 0..3)
        .prop_map(|m| Labels::from_pairs(m).unwrap())
}

fn info() -> impl Strategy<Value = NodeInfo> {
    let addr = prop::sample::select(vec![
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
        IpAddr::V4(Ipv4Addr::new(192, 168, 7, 9)),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
    ]);
    (
        prop::sample::select(&["amd64", "arm64", "1"][..]),
        prop::sample::select(&["linux-6.1", "linux-5.15", "1"][..]),
        prop::sample::select(&["1.0.0", "1.1.0", "edge"][..]),
        prop::collection::vec(addr, 0..3),
    )
        .prop_map(|(arch, os, ver, addresses)| NodeInfo {
            arch: arch.to_owned(),
            os: os.to_owned(),
            agent_version: ver.to_owned(),
            addresses,
        })
}

fn workloads() -> impl Strategy<Value = Vec<WorkloadState>> {
    let one = (
        prop::sample::select(&["ns/a", "ns/b", "c", "edge"][..]),
        0u64..3,
        prop::sample::select(&WorkloadPhase::ALL[..]),
    )
        .prop_map(|(w, version, phase)| WorkloadState { workload: WorkloadId::new(w).unwrap(), version, phase });
    prop::collection::vec(one, 0..4)
}

/// Mostly small times so `mark_offline` cuts through them; sometimes past `u32` seconds.
fn time() -> impl Strategy<Value = Timestamp> {
    prop_oneof![20 => 0u64..60_000, 1 => Just(u64::MAX), 1 => Just(u64::from(u32::MAX) * 1000 + 999)]
        .prop_map(Timestamp::from_millis)
}

fn selector() -> impl Strategy<Value = Selector> {
    let op = prop::sample::select(
        &[RequirementOp::In, RequirementOp::NotIn, RequirementOp::Exists, RequirementOp::DoesNotExist][..],
    );
    let req = (prop::sample::select(LABEL_KEYS), op, prop::collection::vec(prop::sample::select(LABEL_VALUES), 1..3))
        .prop_map(|(k, op, values)| {
            let values = if matches!(op, RequirementOp::In | RequirementOp::NotIn) {
                values.into_iter().map(str::to_owned).collect()
            } else {
                Vec::new()
            };
            Requirement::new(k, op, values).unwrap()
        });
    prop::collection::vec(req, 0..3).prop_map(Selector::from_requirements)
}

/// Which boot a heartbeat claims.
#[derive(Clone, Debug)]
enum BootPick {
    /// The one the model holds for the node.
    Current,
    /// A fixed one (often wrong, sometimes 0).
    Fixed(u32),
}

/// Which sequence a heartbeat carries.
#[derive(Clone, Debug)]
enum SeqPick {
    /// One or more past the last applied.
    After(u32),
    /// The last applied, a duplicate.
    Same,
    /// A fixed one, in or out of order.
    Fixed(u32),
}

#[derive(Clone, Debug)]
enum Op {
    Register {
        name: usize,
        labels: Labels,
        info: NodeInfo,
        boot: u32,
        applied: u64,
        workloads: Vec<WorkloadState>,
        now: Timestamp,
    },
    Heartbeat {
        name: usize,
        boot: BootPick,
        seq: SeqPick,
        applied: u64,
        /// `None`: a status report, which keeps the health.
        health: Option<u8>,
        now: Timestamp,
    },
    Report {
        name: usize,
        workloads: Vec<WorkloadState>,
    },
    SetPhase {
        name: usize,
        phase: NodePhase,
    },
    MarkOffline {
        cutoff: Timestamp,
    },
    Remove {
        name: usize,
    },
    /// `shrink_to_fit`, or carry on with a clone of the cache.
    Maintain {
        shrink: bool,
    },
}

fn op(pool: usize) -> impl Strategy<Value = Op> {
    let name = 0..pool + 1; // one past the pool: a name never registered
    let boot = prop_oneof![3 => Just(BootPick::Current), 1 => (0u32..3).prop_map(BootPick::Fixed)];
    let seq = prop_oneof![6 => (1u32..3).prop_map(SeqPick::After), 1 => Just(SeqPick::Same), 2 => (0u32..8).prop_map(SeqPick::Fixed)];
    prop_oneof![
        4 => (name.clone(), labels(), info(), 0u32..3, 0u64..3, workloads(), time()).prop_map(
            |(name, labels, info, boot, applied, workloads, now)| Op::Register { name, labels, info, boot, applied, workloads, now }
        ),
        6 => (name.clone(), boot, seq, 0u64..3, prop::option::of(prop::sample::select(&[0u8, 0x02, 0x03, 0x10][..])), time())
            .prop_map(|(name, boot, seq, applied, health, now)| Op::Heartbeat { name, boot, seq, applied, health, now }),
        1 => (name.clone(), workloads()).prop_map(|(name, workloads)| Op::Report { name, workloads }),
        1 => (name.clone(), prop::sample::select(&NodePhase::ALL[..])).prop_map(|(name, phase)| Op::SetPhase { name, phase }),
        1 => time().prop_map(|cutoff| Op::MarkOffline { cutoff }),
        2 => name.prop_map(|name| Op::Remove { name }),
        1 => any::<bool>().prop_map(|shrink| Op::Maintain { shrink }),
    ]
}

/// Applies one operation to both sides and compares the answers; a refused operation must leave
/// the cache exactly as it was.
fn apply(cache: &mut NodeCache, model: &mut Model, names: &[String], op: &Op) -> Result<(), TestCaseError> {
    let before = format!("{cache:?}");
    let refused = match op {
        Op::Register { name, labels, info, boot, applied, workloads, now } => {
            let reg = NodeRegistration {
                name: NodeName::new(names[*name].clone()).unwrap(),
                labels: labels.clone(),
                info: info.clone(),
                applied: DesiredDigest(*applied),
                workloads: workloads.clone(),
            };
            let got = cache.register(&reg, *boot, *now).map_err(|e| TestCaseError::fail(format!("register: {e}")))?;
            let (created, restarted, previous) = model.register(&reg, *boot, *now);
            prop_assert_eq!((got.created, got.restarted, got.previous), (created, restarted, previous));
            prop_assert_eq!(Some(got.slot), cache.slot_of(&names[*name]));
            None
        }
        Op::Heartbeat { name, boot, seq, applied, health, now } => {
            let name = &names[*name];
            let known = model.nodes.get(name.as_str());
            let boot_id = match boot {
                BootPick::Current => known.map_or(1, |n| n.boot),
                BootPick::Fixed(b) => *b,
            };
            let last = known.map_or(0, |n| n.seq);
            let seq = match seq {
                SeqPick::After(d) => last.saturating_add(*d),
                SeqPick::Same => last,
                SeqPick::Fixed(s) => *s,
            };
            let health = health.map(NodeHealth);
            let hb = HeartbeatUpdate { boot_id, seq, applied: DesiredDigest(*applied), health };
            let got = cache.heartbeat(name, &hb, *now);
            let want = model.heartbeat(name, &hb, *now);
            match (got, want) {
                (Ok(got), Ok((previous, changed))) => {
                    prop_assert_eq!((got.previous, got.applied_changed), (previous, changed));
                    prop_assert_eq!(Some(got.slot), cache.slot_of(name));
                    None
                }
                (Err(got), Err(want)) => {
                    prop_assert_eq!(&got, &want);
                    Some(got)
                }
                (got, want) => {
                    return Err(TestCaseError::fail(format!("heartbeat {hb:?}: {got:?}, model {want:?}")));
                }
            }
        }
        Op::Report { name, workloads } => {
            let got = cache.report_workloads(&names[*name], workloads);
            let want = model.report_workloads(&names[*name], workloads);
            prop_assert_eq!(got.as_ref().err(), want.as_ref().err());
            if let Ok(slot) = got {
                prop_assert_eq!(Some(slot), cache.slot_of(&names[*name]));
            }
            got.err()
        }
        Op::SetPhase { name, phase } => {
            let got = cache.set_phase(&names[*name], *phase);
            prop_assert_eq!(&got, &model.set_phase(&names[*name], *phase));
            got.err()
        }
        Op::MarkOffline { cutoff } => {
            prop_assert_eq!(cache.mark_offline(*cutoff), model.mark_offline(*cutoff));
            None
        }
        Op::Remove { name } => {
            prop_assert_eq!(cache.remove(&names[*name]), model.remove(&names[*name]));
            None
        }
        Op::Maintain { shrink: true } => {
            cache.shrink_to_fit();
            None
        }
        Op::Maintain { shrink: false } => {
            *cache = cache.clone();
            None
        }
    };
    if let Some(e) = refused {
        prop_assert_eq!(format!("{cache:?}"), before, "refused with {:?} but changed the cache", e);
    }
    assert_agrees(cache, model, names)
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random operation sequences: after every step the invariants hold and every read agrees with
    /// the model; at the end every query, paged with a small limit, returns the model's answer;
    /// removing everything frees every interned value.
    #[test]
    fn cache_behaves_like_model(
        ops in prop::collection::vec(op(6), 1..80),
        selectors in prop::collection::vec(selector(), 1..4),
        queried in prop::collection::vec(0usize..7, 0..8),
        limit in 0usize..4,
    ) {
        let mut names = name_pool();
        names.push("never-registered".to_owned());
        let mut cache = NodeCache::new();
        let mut model = Model::default();
        for op in &ops {
            apply(&mut cache, &mut model, &names, op)?;
        }
        let queried: Vec<NodeName> = queried.iter().map(|&i| NodeName::new(names[i].clone()).unwrap()).collect();
        for s in selectors.iter().chain([&Selector::everything()]) {
            assert_queries_agree(&cache, &model, s, &queried, limit)?;
        }
        for name in 0..names.len() {
            apply(&mut cache, &mut model, &names, &Op::Remove { name })?;
        }
        prop_assert_eq!((cache.label_set_count(), cache.string_count()), (0, 0));
    }
}

fn reg(name: &str, labels: &[(&str, &str)], arch: &str, workloads: &[&str]) -> NodeRegistration {
    NodeRegistration {
        name: NodeName::new(name).unwrap(),
        labels: Labels::from_pairs(labels.iter().copied()).unwrap(),
        info: NodeInfo { arch: arch.into(), os: "linux".into(), agent_version: "1.0".into(), addresses: vec![] },
        applied: DesiredDigest(1),
        workloads: workloads
            .iter()
            .map(|w| WorkloadState {
                workload: WorkloadId::new(*w).unwrap(),
                version: 1,
                phase: WorkloadPhase::Running,
            })
            .collect(),
    }
}

/// Heartbeats that are refused — unknown node, duplicate or reordered sequence, another boot —
/// leave every byte of the cache as it was.
#[test]
fn refused_heartbeats_change_nothing() {
    let mut cache = NodeCache::new();
    cache.register(&reg("n1", &[("a", "1")], "arm64", &["w"]), 7, Timestamp::from_secs(10)).unwrap();
    let hb =
        |boot_id, seq| HeartbeatUpdate { boot_id, seq, applied: DesiredDigest(2), health: Some(NodeHealth::DEGRADED) };
    cache.heartbeat("n1", &hb(7, 5), Timestamp::from_secs(11)).unwrap();
    cache.set_phase("n1", NodePhase::Offline).unwrap();
    let before = format!("{cache:?}");
    let refused = [
        ("nx", hb(7, 6), CacheError::UnknownNode),
        ("n1", hb(7, 5), CacheError::Stale { last: 5, received: 5 }),
        ("n1", hb(7, 4), CacheError::Stale { last: 5, received: 4 }),
        ("n1", hb(8, 6), CacheError::BootMismatch { registered: 7, received: 8 }),
        ("n1", hb(0, 6), CacheError::BootMismatch { registered: 7, received: 0 }),
    ];
    for (name, hb, err) in refused {
        assert_eq!(cache.heartbeat(name, &hb, Timestamp::from_secs(99)), Err(err));
        assert_eq!(format!("{cache:?}"), before);
    }
    assert_eq!(cache.get("n1").unwrap().phase, NodePhase::Offline);
    assert_eq!(cache.get("n1").unwrap().last_seen, Timestamp::from_secs(11));
}

/// Removing many long names makes the arena compact itself; every name still resolves afterwards,
/// and names registered, removed and re-registered around the compaction too.
#[test]
fn name_arena_compaction_keeps_every_name() {
    let name = |i: usize| format!("{i:05}-{}", "n".repeat(122));
    let mut cache = NodeCache::new();
    let mut model = Model::default();
    let total = 9_000;
    for i in 0..total {
        let r = reg(&name(i), &[("site", if i % 2 == 0 { "even" } else { "odd" })], "arm64", &[]);
        model.register(&r, 1, Timestamp::from_secs(5));
        cache.register(&r, 1, Timestamp::from_secs(5)).unwrap();
    }
    // Keep every 20th node: 8,550 removed names are over 1 MiB of garbage, over half the arena.
    for i in (0..total).filter(|i| i % 20 != 0) {
        assert!(cache.remove(&name(i)));
        model.remove(&name(i));
    }
    cache.check_invariants().unwrap();
    let before = cache.heap_bytes();
    // The next name pushed compacts the arena first.
    let r = reg(&name(total), &[("site", "new")], "arm64", &[]);
    model.register(&r, 1, Timestamp::from_secs(6));
    cache.register(&r, 1, Timestamp::from_secs(6)).unwrap();
    let after = cache.heap_bytes();
    assert!(after + 900_000 < before, "the arena did not shrink: {before} -> {after} bytes");
    // Re-register some removed names and drop some kept ones after the compaction.
    for i in (1..total).step_by(97) {
        let r = reg(&name(i), &[("site", "back")], "amd64", &["w"]);
        model.register(&r, 2, Timestamp::from_secs(7));
        cache.register(&r, 2, Timestamp::from_secs(7)).unwrap();
    }
    for i in (0..total).step_by(170) {
        assert_eq!(cache.remove(&name(i)), model.remove(&name(i)));
    }
    let names: Vec<String> = (0..=total).map(name).collect();
    assert_agrees(&cache, &model, &names).unwrap();
    for s in ["site=even", "site in (back,new)", "!site", ""] {
        let s = Selector::parse(s).unwrap();
        assert_queries_agree(&cache, &model, &s, &[], 97).unwrap();
    }
}

/// Label sets, strings, platforms and workload lists are freed when the last node using them
/// goes, whether it is removed or re-registers with other values.
#[test]
fn interned_values_are_freed_with_their_last_node() {
    let mut cache = NodeCache::new();
    cache.register(&reg("n1", &[("a", "1"), ("b", "x")], "arm64", &["ns/w"]), 1, Timestamp::from_secs(1)).unwrap();
    cache.register(&reg("n2", &[("a", "1"), ("b", "x")], "arm64", &["ns/w"]), 1, Timestamp::from_secs(1)).unwrap();
    cache.register(&reg("n3", &[("c", "1")], "amd64", &[]), 1, Timestamp::from_secs(1)).unwrap();
    assert_eq!(cache.label_set_count(), 2);
    // a, 1, b, x, arm64, linux, 1.0, ns/w, c, amd64
    assert_eq!(cache.string_count(), 10);
    // n3 takes n1's labels: {c=1} and "c" go; amd64 goes once n3 is arm64 too.
    cache.register(&reg("n3", &[("a", "1"), ("b", "x")], "arm64", &["ns/w"]), 1, Timestamp::from_secs(2)).unwrap();
    assert_eq!((cache.label_set_count(), cache.string_count()), (1, 8));
    cache.report_workloads("n1", &[]).unwrap();
    cache.report_workloads("n2", &[]).unwrap();
    cache.report_workloads("n3", &[]).unwrap();
    assert_eq!(cache.string_count(), 7, "ns/w is freed with the last workload list using it");
    cache.check_invariants().unwrap();
    for n in ["n1", "n2", "n3"] {
        assert!(cache.remove(n));
        cache.check_invariants().unwrap();
    }
    assert_eq!((cache.label_set_count(), cache.string_count()), (0, 0));
    assert_eq!((cache.platforms.len(), cache.workload_sets.len()), (0, 0));
    // Recycled ids start clean.
    cache.register(&reg("n4", &[("d", "2")], "riscv64", &[]), 1, Timestamp::from_secs(3)).unwrap();
    cache.check_invariants().unwrap();
    assert_eq!(cache.counts(&Selector::parse("d=2").unwrap()).online, 1);
    assert_eq!(cache.counts(&Selector::parse("a=1").unwrap()).total(), 0);
}
