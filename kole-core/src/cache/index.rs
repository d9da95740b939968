//! The name → slot index: an open-addressing table of packed `(hash, slot)` words.
//!
//! Each entry is one `u64`: the upper half is a 32-bit hash of the node name, the lower half the
//! slot. Linear probing keeps a lookup within one or two cache lines, the table never stores the
//! names themselves (callers verify a candidate slot against the name arena), and because the hash
//! is kept, growing and deleting (backward shift) never touch the arena. A lookup's likely answer is
//! exposed separately so batch paths can issue many independent loads before using any of them.

/// Marks an empty bucket.
const EMPTY: u64 = u64::MAX;

/// Buckets [`NameIndex::candidate`] reads from a hash's home: a cache line's worth of entries.
/// At the index's highest load (0.7) a successful lookup probes 2.2 buckets on average.
const CANDIDATE_PROBES: usize = 8;

/// Packs a hash and a slot.
#[inline]
pub(crate) fn pack(hash: u32, slot: u32) -> u64 {
    (u64::from(hash) << 32) | u64::from(slot)
}

/// The hash half of an entry.
#[inline]
pub(crate) fn entry_hash(e: u64) -> u32 {
    (e >> 32) as u32
}

/// The slot half of an entry.
#[inline]
pub(crate) fn entry_slot(e: u64) -> u32 {
    e as u32
}

/// Open-addressing name index (see the module docs).
#[derive(Debug, Clone, Default)]
pub(crate) struct NameIndex {
    table: Vec<u64>,
    len: usize,
}

impl NameIndex {
    /// An index that holds `n` entries without growing.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let mut idx = Self::default();
        if n > 0 {
            idx.table = vec![EMPTY; buckets_for(n)];
        }
        idx
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.table.capacity() * 8
    }

    #[inline]
    fn mask(&self) -> usize {
        self.table.len() - 1
    }

    /// The slot of the first entry with `hash` among the [`CANDIDATE_PROBES`] buckets from its
    /// home (`u32::MAX`: none there): a lookup's likely answer, read from the line its first probe
    /// loads (and the next), for batching. A name whose entry sits past its home bucket, which
    /// linear probing makes common, is found here too, so its slot and name are warmed with the
    /// rest.
    #[inline]
    pub(crate) fn candidate(&self, hash: u32) -> u32 {
        if self.table.is_empty() {
            return u32::MAX;
        }
        let mask = self.mask();
        let mut i = hash as usize & mask;
        for _ in 0..CANDIDATE_PROBES {
            let e = self.table[i];
            if e == EMPTY {
                break;
            }
            if entry_hash(e) == hash {
                return entry_slot(e);
            }
            i = (i + 1) & mask;
        }
        u32::MAX
    }

    /// The slot whose entry has `hash` and for which `is_it` holds.
    #[inline]
    pub(crate) fn find(&self, hash: u32, mut is_it: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.table.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = hash as usize & mask;
        loop {
            let e = self.table[i];
            if e == EMPTY {
                return None;
            }
            if entry_hash(e) == hash && is_it(entry_slot(e)) {
                return Some(entry_slot(e));
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds an entry; the caller guarantees the name is not present yet.
    pub(crate) fn insert(&mut self, hash: u32, slot: u32) {
        if self.table.is_empty() || (self.len + 1) * 10 > self.table.len() * 7 {
            self.grow();
        }
        self.place(pack(hash, slot));
    }

    /// Adds many packed entries (see [`pack`]) whose names are not present yet, in an order that
    /// keeps the writes local: the entries are first partitioned by the region of the table their
    /// home bucket lies in, each region small enough to stay in the core's cache while it fills.
    /// One random bucket per entry would cost a cache miss each once the table outgrows the cache.
    pub(crate) fn insert_bulk(&mut self, entries: &[u64]) {
        let need = self.len + entries.len();
        if self.table.is_empty() || need * 10 > self.table.len() * 7 {
            self.rebuild(buckets_for(need));
        }
        let bits = self.table.len().trailing_zeros();
        let part_bits = bits.saturating_sub(REGION_BITS).min(MAX_PART_BITS);
        if part_bits == 0 {
            entries.iter().for_each(|&e| self.place(e));
            return;
        }
        let mask = self.mask();
        let shift = bits - part_bits;
        let part_of = |e: u64| (entry_hash(e) as usize & mask) >> shift;
        let mut next = vec![0usize; (1 << part_bits) + 1];
        for &e in entries {
            next[part_of(e) + 1] += 1;
        }
        for p in 1..next.len() {
            next[p] += next[p - 1];
        }
        let mut ordered = vec![EMPTY; entries.len()];
        for &e in entries {
            let p = part_of(e);
            ordered[next[p]] = e;
            next[p] += 1;
        }
        ordered.into_iter().for_each(|e| self.place(e));
    }

    /// Writes `e` into the first empty bucket of its probe run; the table has room.
    #[inline]
    fn place(&mut self, e: u64) {
        let mask = self.mask();
        let mut i = entry_hash(e) as usize & mask;
        while self.table[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.table[i] = e;
        self.len += 1;
    }

    /// Removes the entry `(hash, slot)`; returns whether it was present.
    pub(crate) fn remove(&mut self, hash: u32, slot: u32) -> bool {
        if self.table.is_empty() {
            return false;
        }
        let mask = self.mask();
        let target = pack(hash, slot);
        let mut i = hash as usize & mask;
        loop {
            let e = self.table[i];
            if e == EMPTY {
                return false;
            }
            if e == target {
                break;
            }
            i = (i + 1) & mask;
        }
        // Backward-shift deletion: pull later entries of the probe run into the hole when their
        // home bucket does not lie cyclically after the hole.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.table[j];
            if e == EMPTY {
                break;
            }
            let home = entry_hash(e) as usize & mask;
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.table[hole] = e;
                hole = j;
            }
        }
        self.table[hole] = EMPTY;
        self.len -= 1;
        true
    }

    /// Resizes to the smallest table that holds the current entries.
    pub(crate) fn shrink_to_fit(&mut self) {
        let want = if self.len == 0 { 0 } else { buckets_for(self.len) };
        if want < self.table.len() {
            self.rebuild(want);
        }
    }

    fn grow(&mut self) {
        let want = (self.table.len() * 2).max(16);
        self.rebuild(want);
    }

    fn rebuild(&mut self, buckets: usize) {
        let old = std::mem::replace(&mut self.table, vec![EMPTY; buckets]);
        if buckets == 0 {
            return;
        }
        let mask = buckets - 1;
        for e in old.into_iter().filter(|&e| e != EMPTY) {
            let mut i = entry_hash(e) as usize & mask;
            while self.table[i] != EMPTY {
                i = (i + 1) & mask;
            }
            self.table[i] = e;
        }
    }
}

/// [`NameIndex::insert_bulk`] fills the table one region at a time: regions of at least
/// `2^REGION_BITS` buckets (256 KiB), at most `2^MAX_PART_BITS` of them (one write stream each while
/// partitioning; 512 KiB regions at 10M nodes).
const REGION_BITS: u32 = 15;
const MAX_PART_BITS: u32 = 8;

/// Buckets (a power of two) that keep `n` entries at or below a 70% load factor.
fn buckets_for(n: usize) -> usize {
    (n * 10 / 7 + 1).next_power_of_two().max(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn insert_find_remove_against_a_map() {
        let mut idx = NameIndex::default();
        let mut model: HashMap<u32, u32> = HashMap::new();
        // Few distinct hashes force long collision runs and wrap-around.
        let mut x = 7u64;
        for step in 0..20_000u32 {
            x = crate::model::mix64(x);
            let key = (x % 3_000) as u32;
            let hash = key % 97 * 0x0101_0101;
            if let Some(slot) = model.get(&key).copied() {
                assert_eq!(idx.find(hash, |s| s == slot), Some(slot));
                if x & 1 == 0 {
                    assert!(idx.remove(hash, slot));
                    model.remove(&key);
                    assert_eq!(idx.find(hash, |s| s == slot), None);
                }
            } else {
                idx.insert(hash, step);
                model.insert(key, step);
            }
            assert_eq!(idx.len(), model.len());
        }
        for (&key, &slot) in &model {
            assert_eq!(idx.find(key % 97 * 0x0101_0101, |s| s == slot), Some(slot));
        }
        idx.shrink_to_fit();
        for (&key, &slot) in &model {
            assert_eq!(idx.find(key % 97 * 0x0101_0101, |s| s == slot), Some(slot));
        }
    }

    #[test]
    fn bulk_insert_finds_every_entry_and_removes_cleanly() {
        // Sizes below and above one region, on an empty table and on one that holds entries.
        for (before, bulk) in [(0usize, 1_000usize), (0, 300_000), (5_000, 200_000)] {
            let mut idx = NameIndex::default();
            let mut x = bulk as u64;
            let mut hash_of = |slot: u32| {
                x = crate::model::mix64(x ^ u64::from(slot));
                // Some shared hashes: runs of equal homes across region boundaries.
                if slot.is_multiple_of(5) { (x as u32) & 0xffff_0000 } else { x as u32 }
            };
            let all: Vec<(u32, u32)> = (0..(before + bulk) as u32).map(|s| (hash_of(s), s)).collect();
            for &(h, s) in &all[..before] {
                idx.insert(h, s);
            }
            let packed: Vec<u64> = all[before..].iter().map(|&(h, s)| pack(h, s)).collect();
            idx.insert_bulk(&packed);
            assert_eq!(idx.len(), all.len());
            assert!(idx.table.len() >= buckets_for(all.len()), "sized for every entry");
            for &(h, s) in &all {
                assert_eq!(idx.find(h, |c| c == s), Some(s), "slot {s}");
            }
            for &(h, s) in all.iter().step_by(3) {
                assert!(idx.remove(h, s));
            }
            for (i, &(h, s)) in all.iter().enumerate() {
                assert_eq!(idx.find(h, |c| c == s).is_some(), i % 3 != 0, "slot {s} after removals");
            }
        }
    }

    #[test]
    fn candidate_is_the_first_entry_of_its_hash_near_home() {
        // Unique random hashes at the highest load before growing (0.7), plus runs of a shared
        // hash, which must yield the first of their entries in probe order.
        let n = 180_000usize;
        let mut idx = NameIndex::with_capacity(n);
        let mut x = 11u64;
        let mut hashes = Vec::with_capacity(n);
        for slot in 0..n as u32 {
            x = crate::model::mix64(x);
            let h = if slot % 50 == 0 { 0xdead_0000 | (slot % 7) } else { x as u32 };
            idx.insert(h, slot);
            hashes.push(h);
        }
        assert!(idx.len() * 10 > idx.table.len() * 6, "load {} / {}", idx.len(), idx.table.len());
        let mut found = 0usize;
        for (slot, &h) in hashes.iter().enumerate() {
            let c = idx.candidate(h);
            if c == u32::MAX {
                continue;
            }
            found += 1;
            assert_eq!(Some(c), idx.find(h, |_| true), "slot {slot}: not the first entry of its hash");
        }
        // Linear probing leaves few entries further than a line from home at this load.
        assert!(found * 100 >= n * 95, "{found} of {n} found near home");
        // A hash the index does not hold has no candidate, in a full index or an empty one.
        let absent = (0..u32::MAX).find(|h| idx.find(*h, |_| true).is_none()).unwrap();
        assert_eq!(idx.candidate(absent), u32::MAX);
        assert_eq!(NameIndex::default().candidate(absent), u32::MAX);
    }
}
