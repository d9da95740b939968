//! The one seeded pseudo-random generator of kole: [`SplitMix64`].
//!
//! Simulations, fault plans and every jitter (agent retries, reconnects, restarts) must be
//! reproducible, so randomness comes from this tiny generator seeded by the caller, never from the
//! operating system (and no `rand` crate).
//!
//! ```
//! use kole_core::rng::SplitMix64;
//!
//! let mut a = SplitMix64::new(7);
//! let mut b = SplitMix64::new(7);
//! assert_eq!(a.next_u64(), b.next_u64());
//! assert!((10..=20).contains(&a.between(10, 20)));
//! assert!(a.below(5) < 5);
//! ```

use crate::model::mix64;

/// SplitMix64: a tiny, fast, seeded pseudo-random generator with good statistical quality for
/// simulations (not cryptographic). Every value depends only on the seed and how many came before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    /// A generator starting from `seed`.
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        mix64(self.state)
    }

    /// A uniform float in `[0, 1)` (53 random bits).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `true` with probability `p` (`p <= 0` or NaN: never; `p >= 1`: always).
    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        // `next_f64 < 1.0` always holds, so `p == 1.0` is always true and `p == 0.0` never.
        self.next_f64() < p
    }

    /// A uniform integer in `lo..=hi` (`hi < lo` is read as `lo..=lo`).
    #[inline]
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            // The modulo bias is below 2^-40 for every span a simulation uses.
            Some(span) => lo + self.next_u64() % span,
            None => self.next_u64(),
        }
    }

    /// A value in `0..bound` by modulo (0 when `bound` is 0): the agents' and transports' jitter.
    /// The modulo bias is irrelevant for jitter.
    #[inline]
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        self.next_u64() % bound
    }

    /// A value in `0..n` by multiply-shift (`next × n / 2⁶⁴`, no division; 0 when `n` is 0). A
    /// different mapping than [`below`](Self::below): the reference data set is generated with
    /// this one, so neither may change.
    #[inline]
    pub fn below_by_multiply(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_bounded() {
        let mut a = SplitMix64::new(9);
        let mut b = SplitMix64::new(9);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            let x = a.between(5, 9);
            assert!((5..=9).contains(&x));
            b.between(5, 9);
        }
        assert_eq!(a.between(3, 1), 3);
        a.between(0, u64::MAX);
        assert!((0..1000).all(|_| !a.chance(0.0) && a.chance(1.0)));
    }
}
