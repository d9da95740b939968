//! The one jittered exponential backoff of kole: agent retries and reconnects, process restarts,
//! MQTT reconnects (and the apiserver retries of kole-kube).
//!
//! Jitter must spread a fleet that acts together (a million agents registering after a broker
//! restart) but must stay reproducible, so it comes from a [`SplitMix64`] seeded by the caller (the
//! agent seeds it from its boot id and name), never from the OS.

use std::time::Duration;

use crate::rng::SplitMix64;

/// How a nominal wait is spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the nominal wait.
    None,
    /// "Equal jitter": uniformly in `[nominal / 2, nominal]`. Never shorter than half the nominal
    /// wait, so the backoff still backs off, and spread enough that agents that failed together
    /// retry apart.
    Equal,
    /// Uniformly in `[nominal, nominal × (100 + percent) / 100]`: never sooner than nominal.
    Above {
        /// The most added, in percent of the nominal wait.
        percent: u8,
    },
}

/// Bounded exponential backoff: attempt `n` (0-based) waits about
/// `min(max_ms, initial_ms × multiplierⁿ)`, spread by [`jitter`](Self::jitter).
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// Nominal wait before the first retry, in milliseconds.
    pub initial_ms: u32,
    /// Largest nominal wait, in milliseconds.
    pub max_ms: u32,
    /// Growth factor per attempt (values below 1 are treated as 1).
    pub multiplier: f64,
    /// How each wait is spread. [`Jitter::Equal`] with [`Backoff::new`].
    pub jitter: Jitter,
}

impl Backoff {
    /// A policy from its three parameters, with [`Jitter::Equal`].
    pub const fn new(initial_ms: u32, max_ms: u32, multiplier: f64) -> Self {
        Self { initial_ms, max_ms, multiplier, jitter: Jitter::Equal }
    }

    /// The same policy with another jitter.
    pub const fn with_jitter(self, jitter: Jitter) -> Self {
        Self { jitter, ..self }
    }

    /// The nominal (un-jittered) wait before retry number `attempt` (0-based), in milliseconds.
    pub fn nominal_ms(&self, attempt: u32) -> u64 {
        let max = f64::from(self.max_ms.max(1));
        let factor = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let ms = (f64::from(self.initial_ms.max(1)) * factor).min(max);
        // `ms` is finite and within 1..=u32::MAX.
        ms as u64
    }

    /// The jittered wait before retry number `attempt` (0-based), in milliseconds. Draws from
    /// `rng` only when the jitter needs it.
    pub fn delay_ms(&self, attempt: u32, rng: &mut SplitMix64) -> u64 {
        let base = self.nominal_ms(attempt);
        match self.jitter {
            Jitter::None => base,
            Jitter::Equal => {
                let half = base / 2;
                half + rng.below(base - half + 1)
            }
            Jitter::Above { percent } => base + rng.below(base * u64::from(percent) / 100 + 1),
        }
    }

    /// [`delay_ms`](Self::delay_ms) as a [`Duration`].
    pub fn delay(&self, attempt: u32, rng: &mut SplitMix64) -> Duration {
        Duration::from_millis(self.delay_ms(attempt, rng))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_bound_and_jitter_stays_in_range() {
        let p = Backoff::new(100, 5_000, 2.0);
        assert_eq!((0..8).map(|a| p.nominal_ms(a)).collect::<Vec<_>>(), [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(p.nominal_ms(u32::MAX), 5_000);
        let mut j = SplitMix64::new(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1_000 {
            let d = p.delay_ms(3, &mut j);
            assert!((400..=800).contains(&d), "{d}");
            seen.insert(d);
        }
        assert!(seen.len() > 100, "jitter spreads");
        // Degenerate parameters stay sane.
        let odd = Backoff::new(0, 0, 0.5);
        assert_eq!(odd.nominal_ms(10), 1);
    }

    #[test]
    fn jitter_is_reproducible_per_seed() {
        let a: Vec<u64> = (0..4).scan(SplitMix64::new(1), |j, _| Some(j.next_u64())).collect();
        let b: Vec<u64> = (0..4).scan(SplitMix64::new(1), |j, _| Some(j.next_u64())).collect();
        let c: Vec<u64> = (0..4).scan(SplitMix64::new(2), |j, _| Some(j.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(SplitMix64::new(3).below(0), 0);
    }

    #[test]
    fn other_jitters_stay_in_their_range() {
        let p = Backoff::new(100, 5_000, 2.0).with_jitter(Jitter::None);
        let mut rng = SplitMix64::new(1);
        assert_eq!(p.delay_ms(2, &mut rng), 400);
        assert_eq!(rng, SplitMix64::new(1), "no draw without jitter");
        let p = p.with_jitter(Jitter::Above { percent: 25 });
        assert!((0..1_000).all(|_| (400..=500).contains(&p.delay_ms(2, &mut rng))));
        assert_eq!(p.delay(0, &mut rng).as_millis() / 100, 1);
    }
}
