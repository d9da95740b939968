//! What a watch over the cache needs: a cheap pass over every node's watched state.
//!
//! A watch (kole-kube's `edgenodes` API) notices changes by comparing each node's
//! [`WatchKey`] with the one it saw in its previous pass. The pass reads the dense slot array and
//! no string, so 1M nodes take milliseconds; only the nodes whose key changed are materialized.

use super::table::{NodeCache, Slot};
use crate::model::{Labels, NodePhase, NodeRecord};

/// The watched part of a node's state: phase, label set and workload state list. Equal keys mean
/// no watched change; heartbeats that only move `last_seen` leave it unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchKey {
    /// Lifecycle phase.
    pub phase: NodePhase,
    /// The interned label set and the epoch of its id (ids are recycled; the epoch tells).
    pub labels: (u32, u32),
    /// The interned workload state list (immutable once interned: a change is a new id).
    pub workloads: u32,
}

impl NodeCache {
    /// Calls `f(slot, name, key)` for every node, in slot order.
    pub fn for_each_watch_key(&self, mut f: impl FnMut(Slot, &str, WatchKey)) {
        for (i, n) in self.slots.iter().enumerate() {
            let slot = i as Slot;
            if !self.is_live(slot) {
                continue;
            }
            let Ok(name) = std::str::from_utf8(self.name_bytes(slot)) else { continue };
            let key = WatchKey {
                phase: NodePhase::from_u8(n.phase).unwrap_or_default(),
                labels: (n.label_set, self.members.get(n.label_set as usize).map_or(0, |m| m.epoch)),
                workloads: n.workloads,
            };
            f(slot, name, key);
        }
    }

    /// The labels of a key's label set, if that set is still interned as it was when the key was
    /// read (a released id has epoch 0; a recycled one a new epoch).
    pub fn labels_of_key(&self, key: &WatchKey) -> Option<Labels> {
        let (id, epoch) = key.labels;
        let m = self.members.get(id as usize)?;
        if epoch == 0 || m.epoch != epoch {
            return None;
        }
        let pairs = self.label_sets.get(id);
        Labels::from_pairs(pairs.iter().map(|&(k, v)| (self.str_of(k), self.str_of(v)))).ok()
    }

    /// A full copy of the node in `slot`, if the slot holds one.
    pub fn record_of_slot(&self, slot: Slot) -> Option<NodeRecord> {
        self.is_live(slot).then(|| self.record_at(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::StateCache;
    use crate::model::{DesiredDigest, Labels, NodeInfo, NodeName, NodeRegistration, Timestamp};

    fn reg(name: &str, labels: &[(&str, &str)]) -> NodeRegistration {
        NodeRegistration {
            name: NodeName::new(name).unwrap(),
            labels: Labels::from_pairs(labels.iter().copied()).unwrap(),
            info: NodeInfo { arch: "arm64".into(), os: "linux".into(), agent_version: "1".into(), addresses: vec![] },
            applied: DesiredDigest(0),
            workloads: vec![],
        }
    }

    fn keys(c: &NodeCache) -> Vec<(Slot, String, WatchKey)> {
        let mut v = Vec::new();
        c.for_each_watch_key(|s, n, k| v.push((s, n.to_owned(), k)));
        v
    }

    #[test]
    fn keys_change_with_phase_and_labels_not_with_heartbeat_time() {
        let mut c = NodeCache::new();
        let t = Timestamp::from_secs(1_000);
        c.register(&reg("a", &[("zone", "x")]), 1, t).unwrap();
        c.register(&reg("b", &[("zone", "x")]), 1, t).unwrap();
        let before = keys(&c);
        assert_eq!(before.len(), 2);
        assert_eq!(before[0].2, before[1].2, "same phase, labels and workloads: same key");
        c.set_phase("a", NodePhase::Offline).unwrap();
        let after = keys(&c);
        assert_ne!(after[0].2, before[0].2);
        assert_eq!(after[1].2, before[1].2);
        c.register(&reg("b", &[("zone", "y")]), 1, t).unwrap();
        assert_ne!(keys(&c)[1].2, before[1].2, "relabelled");
        assert_eq!(c.record_of_slot(after[0].0).unwrap().name.as_str(), "a");
        assert_eq!(c.labels_of_key(&before[0].2).unwrap().get("zone"), Some("x"), "a still carries zone=x");
        let y_key = keys(&c)[1].2;
        c.register(&reg("b", &[("zone", "z")]), 1, t).unwrap();
        assert!(c.labels_of_key(&y_key).is_none(), "zone=y was released with its last node");
        assert!(c.remove("a"));
        assert!(c.record_of_slot(after[0].0).is_none());
        assert_eq!(keys(&c).len(), 1);
    }
}
