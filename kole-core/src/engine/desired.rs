//! Desired state: which workloads (and versions) each node should run, its desired digest, the
//! groups it joins, and the per-node catch-up when it does not converge by itself.

use std::sync::Arc;

use crate::cache::{NodeCache, Slot};
use crate::model::{DesiredDigest, LabelLookup, NodeName, Timestamp, Workload};
use crate::protocol::{DesiredState, EncodedGroups, GroupName, Message};
use crate::transport::Destination;

use super::{Core, Outputs};

#[derive(Clone, Debug, Default)]
pub(super) struct SetTargets {
    epoch: u32,
    pub(super) generation: u64,
    pub(super) workloads: Vec<u32>,
    /// Groups of the label set (depend on labels only), valid for `groups_epoch`.
    groups_epoch: u32,
    groups: Vec<GroupName>,
    /// `groups` encoded, as an accepted ack carries them.
    groups_wire: EncodedGroups,
}

impl SetTargets {
    /// Reads what registering a node of this set reads (its targets and its encoded groups), for a
    /// warm pass ahead; returns it for `black_box`.
    pub(super) fn touch(&self) -> u64 {
        self.generation
            ^ u64::from(self.workloads.first().copied().unwrap_or(0))
            ^ u64::from(self.groups_wire.as_bytes().first().copied().unwrap_or(0))
    }
}

impl Core {
    /// Workload indices whose selector matches label set `set` (cached per set, per epoch).
    pub(super) fn targets(&mut self, cache: &NodeCache, set: u32) -> &[u32] {
        let idx = set as usize;
        if self.set_targets.len() <= idx {
            self.set_targets.resize_with(idx + 1, SetTargets::default);
        }
        let epoch = cache.label_set_epoch(set);
        let st = &mut self.set_targets[idx];
        if st.epoch != epoch || st.generation != self.generation {
            st.epoch = epoch;
            st.generation = self.generation;
            st.workloads.clear();
            let view = cache.label_set_view(set);
            for (i, e) in self.workloads.iter().enumerate() {
                if let Some(e) = e
                    && e.current.selector.matches(&view)
                {
                    st.workloads.push(i as u32);
                }
            }
        }
        &self.set_targets[idx].workloads
    }

    pub(super) fn desired(&mut self, cache: &NodeCache, slot: Slot) -> DesiredDigest {
        let set = cache.label_set_of(slot);
        let name = cache.name_bytes(slot);
        let mut d = 0u64;
        let n = self.targets(cache, set).len();
        for k in 0..n {
            let w = self.set_targets[set as usize].workloads[k] as usize;
            if let Some(e) = &self.workloads[w] {
                d = d.wrapping_add(e.digest_member(name));
            }
        }
        DesiredDigest(d)
    }

    pub(super) fn desired_set(&mut self, cache: &NodeCache, slot: Slot) -> Vec<Arc<Workload>> {
        let set = cache.label_set_of(slot);
        let name = cache.name_bytes(slot);
        let targets = self.targets(cache, set).to_vec();
        targets.into_iter().filter_map(|w| self.workloads[w as usize].as_ref()?.workload_for(name).cloned()).collect()
    }

    /// Makes the cached groups of label set `set` current (computed once per set and label epoch).
    fn refresh_groups_of_set(&mut self, cache: &NodeCache, set: u32) -> &SetTargets {
        let idx = set as usize;
        if self.set_targets.len() <= idx {
            self.set_targets.resize_with(idx + 1, SetTargets::default);
        }
        let epoch = cache.label_set_epoch(set);
        if self.set_targets[idx].groups_epoch != epoch || epoch == 0 {
            let groups = self.groups_of(&cache.label_set_view(set));
            let st = &mut self.set_targets[idx];
            st.groups_wire = EncodedGroups::new(&groups);
            st.groups = groups;
            st.groups_epoch = epoch;
        }
        &self.set_targets[idx]
    }

    /// Sends an accepted ack to a node of label set `set`. Unsigned, its groups are copied from
    /// the set's encoded form (one block, not a read of every group's name); signed, the ack is
    /// built and sealed as any message is.
    pub(super) fn send_accepted_ack(
        &mut self,
        cache: &NodeCache,
        set: u32,
        to: Destination,
        boot_id: u32,
        desired: DesiredDigest,
        out: &mut Outputs,
    ) {
        let interval = self.cfg.heartbeat_interval_ms;
        if self.signer.is_none() {
            let st = self.refresh_groups_of_set(cache, set);
            let payload = crate::protocol::encode_accepted_ack(boot_id, interval, &st.groups_wire, desired);
            out.messages.push(crate::transport::Outbound { to, payload, retain: false });
            return;
        }
        let groups = self.refresh_groups_of_set(cache, set).groups.clone();
        let ack = Message::RegisterAck(crate::protocol::RegisterAck {
            boot_id,
            outcome: crate::protocol::RegisterOutcome::Accepted,
            heartbeat_interval_ms: interval,
            groups,
            desired,
        });
        self.send(out, to, &ack, false);
    }

    fn groups_of(&self, labels: &impl LabelLookup) -> Vec<GroupName> {
        self.cfg
            .group_label_keys
            .iter()
            .filter_map(|key| {
                let value = labels.label(key).filter(|v| !v.is_empty())?;
                let short = key.rsplit('/').next().unwrap_or(key);
                GroupName::new(format!("{short}.{value}")).ok()
            })
            .collect()
    }

    pub(super) fn send_catchup(&mut self, cache: &NodeCache, slot: Slot, digest: DesiredDigest, out: &mut Outputs) {
        let workloads: Vec<Workload> = self.desired_set(cache, slot).iter().map(|w| (**w).clone()).collect();
        let Some(name) = cache.name_of(slot).and_then(|n| NodeName::new(n).ok()) else { return };
        self.send(out, Destination::Node(name), &Message::DesiredState(DesiredState { digest, workloads }), false);
        self.stats.catchups += 1;
    }

    /// A node shows `applied`; decide whether it needs a catch-up now. Every per-node catch-up a
    /// node's own messages can draw (here and at registration) is at most one per
    /// `convergence_grace_ms`, kept in `pending` (pruned by the tick once long past).
    pub(super) fn reconcile(
        &mut self,
        cache: &NodeCache,
        slot: Slot,
        applied: DesiredDigest,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let desired = self.desired(cache, slot);
        if desired == applied {
            // The node's pending deadline stays until it passes: a node alternating right and
            // wrong digests must not earn a catch-up on each wrong one.
            return;
        }
        let grace = self.cfg.convergence_grace_ms;
        if now.as_millis() < self.spec_changed_ms.saturating_add(grace) {
            return; // A broadcast is still on its way.
        }
        let now_s = now.as_secs_u32();
        if self.pending.get(&slot).is_some_and(|&deadline| now_s < deadline) {
            return;
        }
        self.pending.insert(slot, now_s.saturating_add((grace / 1000) as u32));
        self.send_catchup(cache, slot, desired, out);
    }
}
