//! Fault injection for the in-memory transports: what may go wrong with a message, and a seeded
//! random source that decides it.
//!
//! A [`FaultPlan`] is a plain description (probabilities, a delay range and a seed; every fault off by
//! default). [`FaultPlan::fate`] decides what happens to one message copy from the plan's seed and a
//! caller-chosen *key* alone, with no hidden state: the same plan and the same keys give the same
//! fates, in any order of asking. The transports derive the key from what identifies a delivery (a
//! running message sequence and the receiving node), so a replay with the same seed and the same
//! calls reproduces every drop, duplicate and delay exactly.
//!
//! [`SplitMix64`] is the deterministic generator underneath.
//!
//! ```
//! use kole_core::protocol::Direction;
//! use kole_core::transport::fault::FaultPlan;
//!
//! let plan = FaultPlan { drop_uplink: 0.5, min_delay_ms: 10, max_delay_ms: 50, seed: 7, ..FaultPlan::default() };
//! let fates: Vec<_> = (0..1000).map(|key| plan.fate(Direction::Uplink, key)).collect();
//! let dropped = fates.iter().filter(|f| f.dropped).count();
//! assert!((400..600).contains(&dropped));
//! assert!(fates.iter().filter(|f| !f.dropped).all(|f| (10..=50).contains(&f.delay_ms)));
//! // Same plan, same key, same fate.
//! assert_eq!(plan.fate(Direction::Uplink, 3), fates[3]);
//! assert!(FaultPlan::default().fate(Direction::Downlink, 3).is_clean());
//! ```

use std::cmp::Ordering;

use crate::model::mix64;
use crate::protocol::Direction;
use crate::rng::SplitMix64;

/// What may go wrong with messages in an in-memory transport. Every fault is off by default.
///
/// Probabilities are clamped to `[0, 1]` (NaN reads as 0). Drops are decided per message on the
/// uplink and per delivery (one node reached) on the downlink; a message that is not dropped is
/// duplicated with probability [`duplicate`](Self::duplicate); each copy gets its own delay drawn
/// uniformly from `min_delay_ms..=max_delay_ms`, so random delays reorder messages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FaultPlan {
    /// Probability that an uplink message (node → cloud) is lost. Default 0.
    pub drop_uplink: f64,
    /// Probability that a downlink delivery (cloud → one node) is lost. Default 0.
    pub drop_downlink: f64,
    /// Probability that a message that was not dropped arrives twice, in either direction (as
    /// with MQTT QoS 1 redelivery). Default 0.
    pub duplicate: f64,
    /// Shortest delay of a message, in milliseconds of the transport's clock. Default 0.
    pub min_delay_ms: u64,
    /// Longest delay, in milliseconds; below `min_delay_ms` it reads as `min_delay_ms`. Default 0
    /// (no delay: messages arrive at once, in send order).
    pub max_delay_ms: u64,
    /// Seed of every random decision. Default 0.
    pub seed: u64,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self::NONE
    }
}

/// What happens to one message (or one delivery of a fanned-out message).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fate {
    /// The message is lost; the other fields are then zero.
    pub dropped: bool,
    /// A second copy arrives too.
    pub duplicated: bool,
    /// Delay of the (first) copy, in milliseconds.
    pub delay_ms: u64,
    /// Delay of the duplicate, in milliseconds (0 when not duplicated).
    pub duplicate_delay_ms: u64,
}

impl Fate {
    /// Delivered once, at once.
    pub const CLEAN: Fate = Fate { dropped: false, duplicated: false, delay_ms: 0, duplicate_delay_ms: 0 };

    /// Whether nothing happens to the message.
    pub fn is_clean(&self) -> bool {
        *self == Self::CLEAN
    }

    /// The delay of every copy that arrives: none when dropped, one or two otherwise.
    pub fn copies(&self) -> impl Iterator<Item = u64> + use<> {
        let first = (!self.dropped).then_some(self.delay_ms);
        let second = (!self.dropped && self.duplicated).then_some(self.duplicate_delay_ms);
        first.into_iter().chain(second)
    }
}

fn clamp_probability(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

impl FaultPlan {
    /// No faults (the default).
    pub const NONE: FaultPlan =
        FaultPlan { drop_uplink: 0.0, drop_downlink: 0.0, duplicate: 0.0, min_delay_ms: 0, max_delay_ms: 0, seed: 0 };

    /// Whether every fault is off, so every message is delivered once, at once, in order.
    pub fn is_off(&self) -> bool {
        clamp_probability(self.drop_uplink) == 0.0
            && clamp_probability(self.drop_downlink) == 0.0
            && clamp_probability(self.duplicate) == 0.0
            && !self.has_delay()
    }

    /// Whether every message travelling `direction` is delivered once, at once (no drop, duplicate
    /// or delay can touch it).
    pub fn is_clean(&self, direction: Direction) -> bool {
        let drop = match direction {
            Direction::Uplink => self.drop_uplink,
            Direction::Downlink => self.drop_downlink,
        };
        clamp_probability(drop) == 0.0 && clamp_probability(self.duplicate) == 0.0 && !self.has_delay()
    }

    /// Whether messages may be delayed (and therefore reordered).
    pub fn has_delay(&self) -> bool {
        self.min_delay_ms > 0 || self.max_delay_ms > 0
    }

    /// The fate of one message copy travelling `direction`, decided from the plan's seed and `key`
    /// alone. Callers give every message (every delivery, for a fan-out) its own key; the same key
    /// always gets the same fate.
    pub fn fate(&self, direction: Direction, key: u64) -> Fate {
        if self.is_clean(direction) {
            return Fate::CLEAN;
        }
        let drop = clamp_probability(match direction {
            Direction::Uplink => self.drop_uplink,
            Direction::Downlink => self.drop_downlink,
        });
        let duplicate = clamp_probability(self.duplicate);
        let salt = match direction {
            Direction::Uplink => 0x7570_6c69_6e6b_0000,
            Direction::Downlink => 0x646f_776e_6c69_6e6b,
        };
        let mut rng = SplitMix64::new(mix64(self.seed ^ salt) ^ mix64(key));
        if drop > 0.0 && rng.chance(drop) {
            return Fate { dropped: true, ..Fate::CLEAN };
        }
        let duplicated = duplicate > 0.0 && rng.chance(duplicate);
        let (lo, hi) = (self.min_delay_ms, self.max_delay_ms.max(self.min_delay_ms));
        let delay_ms = rng.between(lo, hi);
        let duplicate_delay_ms = if duplicated { rng.between(lo, hi) } else { 0 };
        Fate { dropped: false, duplicated, delay_ms, duplicate_delay_ms }
    }
}

/// An entry of a delay heap, ordered so that `BinaryHeap` pops the earliest `(due, seq)` first.
/// Shared by the in-memory hub and kole-sim's simulated network, which delay messages alike.
#[derive(Debug)]
pub struct Timed<T> {
    /// When the item is due (the heap's own time unit).
    pub due: u64,
    /// Tie-breaker: insertion order among items due at the same time.
    pub seq: u64,
    /// The delayed item.
    pub item: T,
}

impl<T> PartialEq for Timed<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl<T> Eq for Timed<T> {}

impl<T> PartialOrd for Timed<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Timed<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_dropped(plan: &FaultPlan, direction: Direction, n: u64) -> u64 {
        (0..n).filter(|&k| plan.fate(direction, k).dropped).count() as u64
    }

    #[test]
    fn default_plan_is_off_and_clean() {
        let plan = FaultPlan::default();
        assert!(plan.is_off());
        assert!((0..1000).all(|k| plan.fate(Direction::Uplink, k).is_clean()));
        assert_eq!(Fate::CLEAN.copies().collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn drop_probabilities_hold_per_direction() {
        let all = FaultPlan { drop_uplink: 1.0, ..FaultPlan::default() };
        assert_eq!(count_dropped(&all, Direction::Uplink, 5000), 5000);
        assert_eq!(count_dropped(&all, Direction::Downlink, 5000), 0);
        let half = FaultPlan { drop_downlink: 0.5, seed: 42, ..FaultPlan::default() };
        // Binomial(5000, 0.5): sd ≈ 35, so ±250 is over 7 sd.
        let n = count_dropped(&half, Direction::Downlink, 5000);
        assert!((2250..=2750).contains(&n), "{n}");
        let silly = FaultPlan { drop_uplink: f64::NAN, drop_downlink: 7.0, ..FaultPlan::default() };
        assert_eq!(count_dropped(&silly, Direction::Uplink, 100), 0);
        assert_eq!(count_dropped(&silly, Direction::Downlink, 100), 100);
    }

    #[test]
    fn fates_depend_on_seed_and_key_only() {
        let plan = FaultPlan {
            drop_uplink: 0.3,
            duplicate: 0.3,
            min_delay_ms: 1,
            max_delay_ms: 100,
            seed: 1,
            ..FaultPlan::default()
        };
        let a: Vec<_> = (0..500).map(|k| plan.fate(Direction::Uplink, k)).collect();
        let b: Vec<_> = (0..500).rev().map(|k| plan.fate(Direction::Uplink, k)).rev().collect();
        assert_eq!(a, b, "asking order does not matter");
        let other = FaultPlan { seed: 2, ..plan };
        let c: Vec<_> = (0..500).map(|k| other.fate(Direction::Uplink, k)).collect();
        assert_ne!(a, c, "another seed gives other fates");
        for f in &a {
            if f.dropped {
                assert_eq!(f.copies().count(), 0);
            } else {
                assert!((1..=100).contains(&f.delay_ms));
                assert_eq!(f.copies().count(), if f.duplicated { 2 } else { 1 });
            }
        }
        let dups = a.iter().filter(|f| f.duplicated).count();
        assert!((60..=160).contains(&dups), "{dups}");
    }
}
