//! A fan-out workload spec decoded once and shared by every agent it reaches.

use std::sync::Arc;

use crate::model::Workload;
use crate::protocol::{self, DecodeLimits, Message};
use crate::transport::Bytes;

/// The last workload spec decoded, keyed by its payload, for drivers that hand one delivery to
/// many agents in one process (simulators, multiplexed benches, tests).
///
/// A broker fans one spec out to every node of a fleet or group; decoding it once and handing
/// each agent the same `Arc<Workload>` (as [`super::AgentInput::SharedSpec`]) saves the decode
/// and lets the agents share the workload's memory. Only the last spec is kept: a fan-out arrives
/// to its agents in a run, so one entry catches it, and a different payload replaces it.
#[derive(Debug, Default)]
pub struct SpecCache {
    limits: DecodeLimits,
    last: Option<(Bytes, Arc<Workload>, u16)>,
}

impl SpecCache {
    /// An empty cache that decodes under `limits` (an agent's [`super::AgentConfig::decode_limits`]).
    pub fn new(limits: DecodeLimits) -> Self {
        Self { limits, last: None }
    }

    /// The workload and wave threshold of the spec in `payload`: the cached ones when `payload` is
    /// the cached payload (the same allocation, or the same bytes), else decoded and cached.
    /// `None`, leaving the cache as it was, when `payload` is not a downlink workload spec or does
    /// not decode; the caller then delivers it as it is, and the agent reports why.
    pub fn get(&mut self, payload: &Bytes) -> Option<(Arc<Workload>, u16)> {
        if let Some((p, w, t)) = &self.last
            && ((p.as_ptr(), p.len()) == (payload.as_ptr(), payload.len()) || p[..] == payload[..])
        {
            return Some((Arc::clone(w), *t));
        }
        match protocol::decode_downlink(payload, &self.limits) {
            Ok(Message::WorkloadSpec(s)) => {
                let w = Arc::new(s.workload);
                self.last = Some((payload.clone(), Arc::clone(&w), s.wave_threshold));
                Some((w, s.wave_threshold))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RolloutStrategy, Selector, WorkloadId};
    use crate::protocol::WorkloadSpec;

    fn spec(version: u64) -> Bytes {
        let workload = Workload {
            id: WorkloadId::new("default/app").unwrap(),
            version,
            spec: b"run".to_vec(),
            selector: Selector::parse("tier=cdn").unwrap(),
            delivery: Default::default(),
            rollout: RolloutStrategy::default(),
        };
        Bytes::from(protocol::encode(&Message::WorkloadSpec(WorkloadSpec { workload, wave_threshold: 7 })))
    }

    #[test]
    fn decodes_once_per_payload_and_shares_the_workload() {
        let mut cache = SpecCache::default();
        let v1 = spec(1);
        let (a, t) = cache.get(&v1).unwrap();
        assert_eq!((a.version, t), (1, 7));
        // The same allocation, then the same bytes in another allocation: the same workload.
        assert!(Arc::ptr_eq(&a, &cache.get(&v1).unwrap().0));
        assert!(Arc::ptr_eq(&a, &cache.get(&spec(1)).unwrap().0));
        // Another spec replaces it.
        assert_eq!(cache.get(&spec(2)).unwrap().0.version, 2);
        // Not a spec: nothing, and the cache keeps what it had.
        assert!(cache.get(&Bytes::from_static(b"junk")).is_none());
        assert_eq!(cache.get(&spec(2)).unwrap().0.version, 2);
    }
}
