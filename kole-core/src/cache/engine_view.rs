//! The engine's view of [`NodeCache`]: the few crate-private reads its batch paths make over the
//! dense slot table and the interned sets, so the engine never touches the table's fields.
//!
//! These are not part of [`StateCache`](super::StateCache): they expose the compact layout
//! (slots, label-set ids, interned workload-state sets) that makes targeting cost one pass per
//! distinct label set, and lets the engine keep wave health node by node as it changes nodes,
//! which a generic cache could not offer.

use super::Slot;
use super::table::{LabelSetId, NodeCache, StrId, WorkloadSetId};
use crate::model::NodePhase;

impl NodeCache {
    /// The label set a live slot carries.
    #[inline]
    pub(crate) fn label_set_of(&self, slot: Slot) -> LabelSetId {
        self.slots[slot as usize].label_set
    }

    /// Whether the node in a live slot is online.
    #[inline]
    pub(crate) fn is_online(&self, slot: Slot) -> bool {
        self.slots[slot as usize].phase == NodePhase::Online as u8
    }

    /// The workload-state set a live slot reports.
    #[inline]
    pub(crate) fn workload_set_of(&self, slot: Slot) -> WorkloadSetId {
        self.slots[slot as usize].workloads
    }

    /// The slots carrying label set `set`.
    #[inline]
    pub(crate) fn members_of(&self, set: LabelSetId) -> &[Slot] {
        &self.members[set as usize].slots
    }

    /// The epoch of label set `set`: it changes whenever the id is given to another label set, so
    /// the engine's per-set caches (targets, groups) notice a recycled id.
    #[inline]
    pub(crate) fn label_set_epoch(&self, set: LabelSetId) -> u32 {
        self.members[set as usize].epoch
    }

    /// Every label set id in use.
    pub(crate) fn label_set_ids(&self) -> impl Iterator<Item = LabelSetId> + '_ {
        self.label_sets.iter().map(|(id, _, _)| id)
    }

    /// The interned id of `s` (a workload id, as workload-state sets refer to it), if any node
    /// reported it.
    pub(crate) fn string_id(&self, s: &str) -> Option<StrId> {
        self.strings.find(s)
    }

    /// The `(workload id string, version, phase)` items of a workload-state set.
    #[inline]
    pub(crate) fn workload_set(&self, id: WorkloadSetId) -> &[(StrId, u64, u8)] {
        self.workload_sets.get(id)
    }

    /// Every workload-state set in use: its id, its items, and how many nodes report it.
    pub(crate) fn reported_workload_sets(&self) -> impl Iterator<Item = (WorkloadSetId, &[(StrId, u64, u8)], u32)> {
        self.workload_sets.iter().map(|(id, items, refs)| (id, &**items, refs))
    }
}
