//! Rollouts: workloads as the engine holds them (current and previous version, rollout position,
//! delivery), and the tick that sweeps liveness, measures each wave's health and advances, halts or
//! completes rollouts.

use std::sync::Arc;

use crate::cache::NodeCache;
use crate::model::{DesiredDigest, FailureThreshold, Timestamp, Workload, wave_point_seeded, wave_seed};
use crate::protocol::WorkloadSpec;

use super::{Core, EngineEvent, Outputs};

/// Where a workload's rollout stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RolloutPhase {
    /// Waves are being rolled out.
    #[default]
    Progressing,
    /// Held at the current wave on request.
    Paused,
    /// Stopped because failures exceeded the threshold; resume or roll back.
    Halted,
    /// Every wave reached and healthy.
    Complete,
}

impl RolloutPhase {
    /// Lower-case name, for status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Progressing => "progressing",
            RolloutPhase::Paused => "paused",
            RolloutPhase::Halted => "halted",
            RolloutPhase::Complete => "complete",
        }
    }
}

/// A workload's rollout position, as a controller persists it (e.g. in the custom resource's
/// status) so that a restarted engine resumes instead of starting the rollout over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutProgress {
    /// Index of the wave reached.
    pub wave: usize,
    /// Rollout phase.
    pub phase: RolloutPhase,
    /// The version nodes outside the reached waves keep running (and rollback returns to).
    pub previous: Option<Workload>,
    /// Whether the current spec and wave were already published (retained) by a previous life;
    /// if so, the engine does not publish them again.
    pub published: bool,
}

/// One workload inside the engine.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadEntry {
    pub(crate) current: Arc<Workload>,
    pub(crate) previous: Option<Arc<Workload>>,
    pub(crate) wave: usize,
    pub(crate) phase: RolloutPhase,
    pub(crate) seed: u64,
    pub(crate) member_current: u64,
    pub(crate) member_previous: u64,
    /// When the current wave started waiting to settle (ms; 0: not yet seen by a tick).
    pub(crate) wave_since_ms: u64,
    /// The current wave passed its progress deadline without settling.
    pub(crate) deadline_exceeded: bool,
    /// Failed nodes and their reasons (see [`super::failures`]).
    pub(crate) failures: super::failures::FailureReasons,
    /// The current wave's health, kept between ticks while progressing (see [`super::health`]);
    /// `None`: count it at the next tick.
    pub(crate) health: Option<super::health::WaveHealth>,
}

impl WorkloadEntry {
    pub(crate) fn new(current: Workload, previous: Option<Workload>, wave: usize, phase: RolloutPhase) -> Self {
        let seed = wave_seed(&current.id);
        let member_current = DesiredDigest::member_of(&current);
        let member_previous = previous.as_ref().map_or(0, DesiredDigest::member_of);
        let wave = wave.min(current.rollout.waves.len().saturating_sub(1));
        Self {
            current: Arc::new(current),
            previous: previous.map(Arc::new),
            wave,
            phase,
            seed,
            member_current,
            member_previous,
            wave_since_ms: 0,
            deadline_exceeded: false,
            failures: Default::default(),
            health: None,
        }
    }

    /// Nodes with a wave point below this run the current version (hundredths of a percent).
    pub(crate) fn threshold(&self) -> u16 {
        if self.phase == RolloutPhase::Complete {
            return WorkloadSpec::ALL_WAVES;
        }
        let pct = self.current.rollout.waves.get(self.wave).copied().unwrap_or(100);
        u16::from(pct.min(100)) * 100
    }

    /// Which version a node runs: `Some(true)` current, `Some(false)` previous, `None` neither.
    #[inline]
    pub(crate) fn version_for(&self, node: &[u8]) -> Option<bool> {
        let t = self.threshold();
        if t >= WorkloadSpec::ALL_WAVES || wave_point_seeded(self.seed, node) < t {
            Some(true)
        } else if self.previous.is_some() {
            Some(false)
        } else {
            None
        }
    }

    /// This workload's contribution to a node's desired digest.
    #[inline]
    pub(crate) fn digest_member(&self, node: &[u8]) -> u64 {
        match self.version_for(node) {
            Some(true) => self.member_current,
            Some(false) => self.member_previous,
            None => 0,
        }
    }

    /// The workload (version) a node should run.
    pub(crate) fn workload_for(&self, node: &[u8]) -> Option<&Arc<Workload>> {
        match self.version_for(node)? {
            true => Some(&self.current),
            false => self.previous.as_ref(),
        }
    }

    pub(crate) fn progress(&self) -> RolloutProgress {
        RolloutProgress {
            wave: self.wave,
            phase: self.phase,
            previous: self.previous.as_deref().cloned(),
            published: true,
        }
    }

    pub(crate) fn is_last_wave(&self) -> bool {
        self.wave + 1 >= self.current.rollout.waves.len()
    }

    /// Whether `failed` of `reached` nodes exceeds the failure threshold.
    pub(crate) fn failures_exceeded(&self, failed: u32, reached: u32) -> bool {
        match self.current.rollout.failure_threshold {
            FailureThreshold::Count(c) => failed > c,
            FailureThreshold::Percent(p) => u64::from(failed) * 100 > u64::from(p) * u64::from(reached.max(1)),
        }
    }

    pub(crate) fn spec_message(&self) -> WorkloadSpec {
        WorkloadSpec { workload: (*self.current).clone(), wave_threshold: self.threshold() }
    }
}

impl Core {
    pub(super) fn tick(&mut self, cache: &mut NodeCache, now: Timestamp, out: &mut Outputs) {
        let window = u64::from(self.cfg.heartbeat_interval_ms) * u64::from(self.cfg.offline_after_missed);
        let now_ms = now.as_millis();
        // No node can be declared offline until a full window after this engine started: a
        // restored cache's last-seen times predate the restart.
        if now_ms >= self.started_ms.saturating_add(window) {
            let mut gone = Vec::new();
            let n = cache.mark_offline_before(Timestamp::from_millis(now_ms - window), |slot| gone.push(slot));
            self.stats.marked_offline += n as u64;
            for slot in gone {
                self.node_liveness_changed(cache, slot, true);
            }
        }
        for i in 0..self.workloads.len() {
            if self.workloads[i].as_ref().is_some_and(|e| e.phase == RolloutPhase::Progressing) {
                self.evaluate_rollout(cache, i, now, out);
            }
        }
        self.health_kept = self.workloads.iter().flatten().any(WorkloadEntry::keeps_health);
        if now_ms >= self.last_status_ms.saturating_add(self.cfg.status_interval_ms) {
            self.last_status_ms = now_ms;
            for s in self.statuses(cache) {
                if self.reported.get(&s.id) != Some(&s) {
                    self.reported.insert(s.id.clone(), s.clone());
                    out.statuses.push(s);
                }
            }
        }
        if now_ms >= self.last_snapshot_ms.saturating_add(self.cfg.snapshot_interval_ms) {
            self.last_snapshot_ms = now_ms;
            out.snapshot_due = true;
        }
        if !self.pending.is_empty() {
            let horizon = now.as_secs_u32().saturating_sub(600);
            self.pending.retain(|_, deadline| *deadline > horizon);
        }
    }

    fn evaluate_rollout(&mut self, cache: &NodeCache, idx: usize, now: Timestamp, out: &mut Outputs) {
        let h = self.wave_health(cache, idx);
        let (reached, online, ready, failed, failed_online) = (h.reached, h.online, h.ready, h.failed, h.failed_online);
        let Some(e) = self.workloads[idx].as_mut() else { return };
        let id = e.current.id.clone();
        if e.failures_exceeded(failed, reached) {
            e.phase = RolloutPhase::Halted;
            e.health = None;
            out.events.push(EngineEvent::RolloutHalted { id, failed, reached });
            return;
        }
        let now_ms = now.as_millis();
        // Failed nodes within the threshold are settled: waiting for them would stall for good. But
        // settling needs evidence: offline nodes say nothing, so a wave whose reached nodes are all
        // offline (a broker outage) holds rather than completing unseen.
        let needed = if reached == 0 {
            0
        } else {
            let share = u64::from(reached) * u64::from(self.cfg.min_ready_percent.min(100));
            (share.div_ceil(100) as u32).max(1)
        };
        if ready.saturating_add(failed_online) < online || ready < needed {
            if e.wave_since_ms == 0 {
                e.wave_since_ms = now_ms;
            } else if !e.deadline_exceeded
                && now_ms >= e.wave_since_ms.saturating_add(u64::from(e.current.rollout.progress_deadline_s) * 1000)
            {
                e.deadline_exceeded = true;
                out.events.push(EngineEvent::ProgressDeadlineExceeded { id, wave: e.wave });
            }
            return;
        }
        e.wave_since_ms = now_ms;
        e.deadline_exceeded = false;
        if reached == 0 {
            out.events.push(EngineEvent::NothingReached { id: id.clone(), wave: e.wave });
        }
        if e.is_last_wave() {
            e.phase = RolloutPhase::Complete;
            e.health = None;
            out.events.push(EngineEvent::RolloutComplete { id });
            return;
        }
        let from = e.threshold();
        e.wave += 1;
        e.health = None;
        let wave = e.wave;
        self.publish(cache, idx, from, now, out);
        out.events.push(EngineEvent::WaveAdvanced { id, wave });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RolloutStrategy, Selector, WorkloadId};

    fn wl(version: u64, waves: &[u8]) -> Workload {
        Workload {
            id: WorkloadId::new("default/app").unwrap(),
            version,
            spec: vec![1, 2, 3],
            selector: Selector::everything(),
            delivery: Default::default(),
            rollout: RolloutStrategy { waves: waves.to_vec(), ..Default::default() },
        }
    }

    #[test]
    fn waves_split_nodes_between_versions() {
        let e = WorkloadEntry::new(wl(2, &[10, 100]), Some(wl(1, &[100])), 0, RolloutPhase::Progressing);
        assert_eq!(e.threshold(), 1000);
        let names: Vec<String> = (0..10_000).map(|i| format!("n{i}")).collect();
        let current = names.iter().filter(|n| e.version_for(n.as_bytes()) == Some(true)).count();
        assert!((800..1200).contains(&current), "{current}");
        assert!(names.iter().all(|n| e.version_for(n.as_bytes()).is_some()));
        let fresh = WorkloadEntry::new(wl(1, &[10, 100]), None, 0, RolloutPhase::Progressing);
        assert!(names.iter().any(|n| fresh.version_for(n.as_bytes()).is_none()));
        let done = WorkloadEntry { phase: RolloutPhase::Complete, ..fresh };
        assert!(names.iter().all(|n| done.version_for(n.as_bytes()) == Some(true)));
    }

    #[test]
    fn failure_thresholds() {
        let mut w = wl(1, &[100]);
        w.rollout.failure_threshold = FailureThreshold::Count(2);
        let e = WorkloadEntry::new(w.clone(), None, 0, RolloutPhase::Progressing);
        assert!(!e.failures_exceeded(2, 10) && e.failures_exceeded(3, 10));
        w.rollout.failure_threshold = FailureThreshold::Percent(10);
        let e = WorkloadEntry::new(w, None, 0, RolloutPhase::Progressing);
        assert!(!e.failures_exceeded(10, 100) && e.failures_exceeded(11, 100));
    }
}
