//! A bounded, cancel-safe inbox shared by connection tasks (producers) and one `recv` (consumer).
//!
//! Bounded twice: by message count (the channel's capacity) and by bytes (the sum of what
//! `weigh` says each queued message holds). A message that would cross either bound is dropped —
//! the newest, because a producer must never wait (it is a connection's event loop) and cannot
//! reach the oldest, which the consumer may be taking at that moment — and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use kole_core::transport::TransportError;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// What producers and the consumer share: the drop counter and the byte account.
#[derive(Debug)]
struct Bounds {
    dropped: AtomicU64,
    /// Bytes of the messages queued now (reserved before a message enters, released after
    /// `recv` took it out), never above `max_bytes`.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
}

/// The producers' end: never blocks (a connection task must keep polling its event loop).
#[derive(Debug)]
pub(crate) struct InboxSender<T> {
    tx: mpsc::Sender<T>,
    bounds: Arc<Bounds>,
    weigh: fn(&T) -> usize,
}

impl<T> Clone for InboxSender<T> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), bounds: self.bounds.clone(), weigh: self.weigh }
    }
}

impl<T> InboxSender<T> {
    /// Enqueues `item`, or drops and counts it when the inbox is full (by count or by bytes) or
    /// its reader is gone.
    pub(crate) fn push(&self, item: T) {
        let size = (self.weigh)(&item);
        let b = &self.bounds;
        // Reserve first, so producers racing each other can never together pass the bound.
        let reserved = b
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| q.checked_add(size).filter(|n| *n <= b.max_bytes))
            .is_ok();
        if !reserved {
            b.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.try_send(item).is_err() {
            b.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            b.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The consumer's end.
#[derive(Debug)]
pub(crate) struct Inbox<T> {
    rx: Mutex<mpsc::Receiver<T>>,
    capacity: usize,
    bounds: Arc<Bounds>,
    weigh: fn(&T) -> usize,
}

impl<T: Send> Inbox<T> {
    /// An inbox bounded by message count only.
    pub(crate) fn new(capacity: usize) -> (InboxSender<T>, Self) {
        Self::with_byte_bound(capacity, usize::MAX, |_| 0)
    }

    /// An inbox holding at most `capacity` messages and `max_bytes` bytes, a message weighing
    /// what `weigh` says.
    pub(crate) fn with_byte_bound(capacity: usize, max_bytes: usize, weigh: fn(&T) -> usize) -> (InboxSender<T>, Self) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let bounds = Arc::new(Bounds { dropped: AtomicU64::new(0), queued_bytes: AtomicUsize::new(0), max_bytes });
        (InboxSender { tx, bounds: bounds.clone(), weigh }, Self { rx: Mutex::new(rx), capacity, bounds, weigh })
    }

    /// Messages dropped because the inbox was full (by count or by bytes).
    pub(crate) fn dropped(&self) -> u64 {
        self.bounds.dropped.load(Ordering::Relaxed)
    }

    /// The capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes queued now (the tests check the bound with it).
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.bounds.queued_bytes.load(Ordering::Acquire)
    }

    /// Waits for at least one message and returns up to `max`. Cancel-safe: both the lock and
    /// `recv_many` are, so a cancelled call loses nothing. `Closed` once `closed` is cancelled, or
    /// when every producer is gone and the inbox is drained.
    pub(crate) async fn recv(&self, max: usize, closed: &CancellationToken) -> Result<Vec<T>, TransportError> {
        if closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut rx = tokio::select! {
            () = closed.cancelled() => return Err(TransportError::Closed),
            rx = self.rx.lock() => rx,
        };
        let mut out = Vec::with_capacity(max.min(4096));
        tokio::select! {
            () = closed.cancelled() => Err(TransportError::Closed),
            n = rx.recv_many(&mut out, max) => {
                if n == 0 {
                    return Err(TransportError::Closed);
                }
                let taken: usize = out.iter().map(self.weigh).sum();
                self.bounds.queued_bytes.fetch_sub(taken, Ordering::AcqRel);
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    // The inbox's size function takes `&T`, here `&Vec<u8>`.
    #[allow(clippy::ptr_arg)]
    fn len(v: &Vec<u8>) -> usize {
        v.len()
    }

    #[tokio::test]
    async fn large_messages_stop_at_the_byte_bound_and_small_ones_pass_after_a_drain() {
        let (tx, inbox) = Inbox::<Vec<u8>>::with_byte_bound(1_000, 10_000, len);
        let closed = CancellationToken::new();
        // 100 messages of 3,000 bytes: only 3 fit in 10,000 bytes, though the count allows 1,000.
        for _ in 0..100 {
            tx.push(vec![7; 3_000]);
            assert!(inbox.queued_bytes() <= 10_000, "{} bytes queued", inbox.queued_bytes());
        }
        assert_eq!(inbox.queued_bytes(), 9_000);
        assert_eq!(inbox.dropped(), 97);
        // A small message still fits beside them; one more large one does not.
        tx.push(vec![1; 500]);
        tx.push(vec![7; 3_000]);
        assert_eq!(inbox.dropped(), 98);
        let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv(100, &closed)).await.unwrap().unwrap();
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![3_000, 3_000, 3_000, 500]);
        assert_eq!(inbox.queued_bytes(), 0);
        // Drained: small messages pass again, and so do large ones up to the bound.
        for _ in 0..10 {
            tx.push(vec![2; 100]);
        }
        tx.push(vec![7; 3_000]);
        assert_eq!(inbox.dropped(), 98);
        let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv(100, &closed)).await.unwrap().unwrap();
        assert_eq!(got.len(), 11);
    }

    #[tokio::test]
    async fn the_count_bound_still_holds_and_releases_the_bytes_of_what_it_drops() {
        let (tx, inbox) = Inbox::<Vec<u8>>::with_byte_bound(2, 10_000, len);
        for _ in 0..5 {
            tx.push(vec![0; 10]);
        }
        assert_eq!(inbox.dropped(), 3);
        assert_eq!(inbox.queued_bytes(), 20);
    }
}
