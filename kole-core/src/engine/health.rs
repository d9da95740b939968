//! Wave health kept between ticks.
//!
//! A progressing rollout advances, halts or completes on how its reached nodes stand: how many are
//! online, ready or failed at the current version. Counting that by a pass over every targeted
//! node costs a random slot read per node, so a tick over a million-node rollout cost tens of
//! milliseconds, and a driver ticking ten times a second spent most of its time there. Instead, the
//! first tick of a wave counts once, and from then on every change to a node the engine makes
//! (a status report, coming back online, going offline, registering) moves the counts by that
//! node's part before and after. A tick then costs nothing per node.
//!
//! The counts are kept only while a rollout is [`Progressing`](RolloutPhase::Progressing) at one
//! wave; a new wave, a new version, a pause or a halt drops them, and the next tick counts again.
//! Debug builds check the kept counts against a full count on every tick.

use crate::cache::{NodeCache, Slot, StrId};
use crate::model::{WorkloadPhase, wave_point_seeded};
use crate::protocol::WorkloadSpec;

use super::Core;
use super::rollout::{RolloutPhase, WorkloadEntry};

/// How the reached nodes of a rollout's waves stand at its current version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WaveHealth {
    /// Targeted nodes in the reached waves.
    pub(crate) reached: u32,
    /// Of those, online.
    pub(crate) online: u32,
    /// Online and running the current version.
    pub(crate) ready: u32,
    /// Reporting the current version failed.
    pub(crate) failed: u32,
    /// Failed, and online.
    pub(crate) failed_online: u32,
}

impl WaveHealth {
    // Wrapping, not saturating: a drift shows as a wild count (and fails the debug check) instead
    // of hiding at zero.
    fn add(&mut self, o: WaveHealth) {
        self.combine(o, u32::wrapping_add);
    }

    fn sub(&mut self, o: WaveHealth) {
        self.combine(o, u32::wrapping_sub);
    }

    fn combine(&mut self, o: WaveHealth, f: fn(u32, u32) -> u32) {
        self.reached = f(self.reached, o.reached);
        self.online = f(self.online, o.online);
        self.ready = f(self.ready, o.ready);
        self.failed = f(self.failed, o.failed);
        self.failed_online = f(self.failed_online, o.failed_online);
    }
}

impl WorkloadEntry {
    /// One targeted node's part in this workload's wave health, taking it as online or not as
    /// `online` says (a caller may ask how the node stood before a change). `wl` is the workload
    /// id's interned string, as the node's reported workload-state set refers to it.
    #[inline]
    pub(crate) fn node_health(&self, cache: &NodeCache, slot: Slot, online: bool, wl: Option<StrId>) -> WaveHealth {
        let threshold = self.threshold();
        if threshold < WorkloadSpec::ALL_WAVES && wave_point_seeded(self.seed, cache.name_bytes(slot)) >= threshold {
            return WaveHealth::default();
        }
        let mut h = WaveHealth { reached: 1, online: u32::from(online), ..WaveHealth::default() };
        let reported = wl.and_then(|w| cache.workload_set(cache.workload_set_of(slot)).iter().find(|x| x.0 == w));
        if let Some(&(_, version, phase)) = reported
            && version == self.current.version
        {
            match WorkloadPhase::from_u8(phase) {
                Some(WorkloadPhase::Running) if online => h.ready = 1,
                Some(WorkloadPhase::Failed) => {
                    h.failed = 1;
                    h.failed_online = u32::from(online);
                }
                _ => {}
            }
        }
        h
    }

    /// Whether the engine keeps this workload's wave health between ticks right now.
    pub(super) fn keeps_health(&self) -> bool {
        self.phase == RolloutPhase::Progressing && self.health.is_some()
    }
}

impl Core {
    /// Takes a live node's part out of (`add` false) or puts it into (`add` true) the kept wave
    /// health of every rollout targeting it, as the node stands now but online as `online` says.
    /// Every change the engine makes to a node's labels, liveness or reported workloads is
    /// bracketed by these two calls.
    pub(super) fn node_health_moved(&mut self, cache: &NodeCache, slot: Slot, online: bool, add: bool) {
        if !self.health_kept {
            return;
        }
        let set = cache.label_set_of(slot);
        let n = self.targets(cache, set).len();
        for k in 0..n {
            let w = self.set_targets[set as usize].workloads[k] as usize;
            let Some(e) = self.workloads[w].as_mut() else { continue };
            if !e.keeps_health() {
                continue;
            }
            let h = e.node_health(cache, slot, online, cache.string_id(e.current.id.as_str()));
            if let Some(acc) = e.health.as_mut() {
                if add { acc.add(h) } else { acc.sub(h) }
            }
        }
    }

    /// A live node went from online (`was_online`) to how it stands now.
    pub(super) fn node_liveness_changed(&mut self, cache: &NodeCache, slot: Slot, was_online: bool) {
        let now_online = cache.is_online(slot);
        if was_online != now_online {
            self.node_health_moved(cache, slot, was_online, false);
            self.node_health_moved(cache, slot, now_online, true);
        }
    }

    /// Wave health of workload `idx` by one pass over its targeted nodes.
    pub(super) fn count_wave_health(&self, cache: &NodeCache, idx: usize) -> WaveHealth {
        let mut h = WaveHealth::default();
        let Some(e) = &self.workloads[idx] else { return h };
        let wl = cache.string_id(e.current.id.as_str());
        for set in cache.matching_sets(&e.current.selector) {
            for &slot in cache.members_of(set) {
                h.add(e.node_health(cache, slot, cache.is_online(slot), wl));
            }
        }
        h
    }

    /// Wave health of progressing workload `idx`: the kept counts, or one count that is then kept.
    pub(super) fn wave_health(&mut self, cache: &NodeCache, idx: usize) -> WaveHealth {
        match self.workloads[idx].as_ref().and_then(|e| e.health) {
            Some(h) => {
                debug_assert_eq!(
                    h,
                    self.count_wave_health(cache, idx),
                    "wave health kept between ticks drifted from a full count"
                );
                h
            }
            None => {
                let h = self.count_wave_health(cache, idx);
                if let Some(e) = self.workloads[idx].as_mut() {
                    e.health = Some(h);
                    self.health_kept = true;
                }
                h
            }
        }
    }
}

#[cfg(test)]
impl super::Engine {
    /// Where a progressing rollout's kept wave health differs from a full count, if anywhere.
    pub(super) fn wave_health_drift(&mut self) -> Option<String> {
        let cache = self.cache.write();
        (0..self.core.workloads.len()).find_map(|i| {
            let e = self.core.workloads[i].as_ref()?;
            let kept = e.health.filter(|_| e.keeps_health())?;
            let counted = self.core.count_wave_health(&cache, i);
            (kept != counted).then(|| format!("{}: kept {kept:?}, counted {counted:?}", e.current.id))
        })
    }

    /// Whether workload `id` keeps its wave health between ticks now.
    pub(super) fn keeps_wave_health(&self, id: &crate::model::WorkloadId) -> bool {
        self.core.entry(id).is_some_and(WorkloadEntry::keeps_health)
    }
}
