//! The delay heap's entry (the same ordering the in-memory hub uses in kole-core's `fault`).

use std::cmp::Ordering;

/// An entry of a delay heap, ordered so that `BinaryHeap` pops the earliest `(due, seq)` first.
#[derive(Debug)]
pub(crate) struct Timed<T> {
    pub(crate) due: u64,
    pub(crate) seq: u64,
    pub(crate) item: T,
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
