//! Reference-counted interning of values that repeat across many nodes.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// A fast, non-cryptographic hasher for in-process dictionaries (FxHash's word-at-a-time mix).
///
/// The interners hold operator-controlled strings (labels, versions), and a flooding attacker
/// would need to control label sets of many registered nodes, which the broker ACLs and the
/// registration validation already bound; SipHash's DoS resistance is not worth its cost here.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

const FX_K: u64 = 0x517c_c1b7_2722_0a95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// `HashMap` with [`FxHasher`].
pub(crate) type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Interns values of `T`: each distinct value is stored once and named by a dense `u32` id.
///
/// Ids are reference counted; when the last reference goes, the id is recycled. Lookups by id are
/// an index; lookups by value are a hash probe.
#[derive(Debug, Clone)]
pub(crate) struct Interner<T: Eq + Hash + Clone> {
    entries: Vec<Entry<T>>,
    by_value: FxHashMap<T, u32>,
    free: Vec<u32>,
}

#[derive(Debug, Clone)]
struct Entry<T> {
    value: Option<T>,
    refs: u32,
}

impl<T: Eq + Hash + Clone> Default for Interner<T> {
    fn default() -> Self {
        Self { entries: Vec::new(), by_value: FxHashMap::default(), free: Vec::new() }
    }
}

impl<T: Eq + Hash + Clone> Interner<T> {
    /// The id of `value`, adding it if new; takes one reference. Returns whether it was new.
    pub(crate) fn acquire(&mut self, value: &T) -> (u32, bool) {
        if let Some(&id) = self.by_value.get(value) {
            self.entries[id as usize].refs += 1;
            return (id, false);
        }
        let entry = Entry { value: Some(value.clone()), refs: 1 };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                let id = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
                assert!(id < u32::MAX, "interner id space exhausted");
                self.entries.push(entry);
                id
            }
        };
        self.by_value.insert(value.clone(), id);
        (id, true)
    }

    /// Takes another reference to an existing id.
    pub(crate) fn retain(&mut self, id: u32) {
        self.entries[id as usize].refs += 1;
    }

    /// Drops one reference; returns the value when that was the last one.
    pub(crate) fn release(&mut self, id: u32) -> Option<T> {
        let e = &mut self.entries[id as usize];
        debug_assert!(e.refs > 0, "release of a dead interned id");
        e.refs -= 1;
        if e.refs > 0 {
            return None;
        }
        let value = e.value.take();
        if let Some(v) = &value {
            self.by_value.remove(v);
        }
        self.free.push(id);
        value
    }

    /// The value of a live id.
    pub(crate) fn get(&self, id: u32) -> &T {
        match &self.entries[id as usize].value {
            Some(v) => v,
            None => panic!("interned id {id} is not live"),
        }
    }

    /// The value of `id`, if it is live.
    pub(crate) fn try_get(&self, id: u32) -> Option<&T> {
        self.entries.get(id as usize)?.value.as_ref()
    }

    /// The id of `value`, if interned.
    #[inline]
    pub(crate) fn find<Q>(&self, value: &Q) -> Option<u32>
    where
        T: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.by_value.get(value).copied()
    }

    /// Number of ids ever allocated (live or recycled): ids are below this.
    pub(crate) fn capacity_ids(&self) -> usize {
        self.entries.len()
    }

    /// Live ids with their values and reference counts.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &T, u32)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| e.value.as_ref().map(|v| (i as u32, v, e.refs)))
    }

    /// Number of live values.
    pub(crate) fn len(&self) -> usize {
        self.by_value.len()
    }

    /// Heap bytes held, roughly, for memory reports.
    pub(crate) fn heap_bytes(&self, value_bytes: impl Fn(&T) -> usize) -> usize {
        let values: usize = self.by_value.keys().map(&value_bytes).sum();
        self.entries.capacity() * std::mem::size_of::<Entry<T>>()
            + self.by_value.capacity() * (std::mem::size_of::<(T, u32)>() + 1)
            + 2 * values
            + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_shared_counted_and_recycled() {
        let mut i = Interner::<String>::default();
        let (a, new_a) = i.acquire(&"a".to_owned());
        let (a2, new_a2) = i.acquire(&"a".to_owned());
        assert!(new_a && !new_a2 && a == a2);
        let (b, _) = i.acquire(&"b".to_owned());
        assert_ne!(a, b);
        assert_eq!(i.release(a), None);
        assert_eq!(i.release(a).as_deref(), Some("a"));
        assert_eq!(i.find(&"a".to_owned()), None);
        let (c, _) = i.acquire(&"c".to_owned());
        assert_eq!(c, a, "freed id is recycled");
        assert_eq!(i.len(), 2);
    }
}
