//! A bounded, cancel-safe inbox shared by connection tasks (producers) and one `recv` (consumer).
//!
//! Bounded twice: by message count and by bytes (the sum of what `weigh` says each queued message
//! holds). A message that would cross either bound is dropped — the newest, because a producer
//! must never wait (it is a connection's event loop) — and counted.
//!
//! Producers hand over whole batches (everything one socket read decoded) under one lock and wake
//! the consumer only when the queue was empty, so a busy inbox costs one lock and at most one
//! wakeup per read, not per message; the consumer takes up to `max` messages under one lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kole_core::transport::TransportError;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The queue and its byte account, under one lock.
#[derive(Debug)]
struct Queue<T> {
    items: VecDeque<T>,
    /// Bytes of the messages queued now, never above `max_bytes`.
    bytes: usize,
}

/// What producers and the consumer share.
#[derive(Debug)]
struct Shared<T> {
    queue: Mutex<Queue<T>>,
    /// Wakes the consumer: notified when a push finds the queue empty, when a taker leaves
    /// messages behind, and when the last producer goes.
    ready: Notify,
    dropped: AtomicU64,
    /// Producers alive; 0 with an empty queue means `Closed`.
    senders: AtomicUsize,
    capacity: usize,
    max_bytes: usize,
    weigh: fn(&T) -> usize,
}

impl<T> Shared<T> {
    /// The queue. A producer or consumer that panicked while holding the lock left it consistent
    /// (every update is a single push, pop or add), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The producers' end: never blocks (a connection task must keep polling its event loop).
#[derive(Debug)]
pub(crate) struct InboxSender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for InboxSender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self { shared: self.shared.clone() }
    }
}

impl<T> Drop for InboxSender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last one: a waiting `recv` must see `Closed` once the queue is drained.
            self.shared.ready.notify_one();
        }
    }
}

impl<T> InboxSender<T> {
    /// Enqueues `item`, or drops and counts it when the inbox is full (by count or by bytes).
    pub(crate) fn push(&self, item: T) {
        self.push_all(std::iter::once(item));
    }

    /// Enqueues every message of `batch` in order (leaving it empty), under one lock and with at
    /// most one wakeup; each message that would cross a bound is dropped and counted, the others
    /// still go in.
    pub(crate) fn push_batch(&self, batch: &mut Vec<T>) {
        if !batch.is_empty() {
            self.push_all(batch.drain(..));
        }
    }

    /// Enqueues `items` in order under one lock (see [`InboxSender::push_batch`]).
    fn push_all(&self, items: impl Iterator<Item = T>) {
        let s = &*self.shared;
        let mut dropped = 0u64;
        let was_empty;
        {
            let mut q = s.lock();
            was_empty = q.items.is_empty();
            for item in items {
                let size = (s.weigh)(&item);
                match q.bytes.checked_add(size) {
                    Some(bytes) if bytes <= s.max_bytes && q.items.len() < s.capacity => {
                        q.bytes = bytes;
                        q.items.push_back(item);
                    }
                    _ => dropped += 1,
                }
            }
        }
        if dropped > 0 {
            s.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if was_empty {
            s.ready.notify_one();
        }
    }
}

/// The consumer's end.
#[derive(Debug)]
pub(crate) struct Inbox<T> {
    shared: Arc<Shared<T>>,
}

impl<T: Send> Inbox<T> {
    /// An inbox bounded by message count only.
    pub(crate) fn new(capacity: usize) -> (InboxSender<T>, Self) {
        Self::with_byte_bound(capacity, usize::MAX, |_| 0)
    }

    /// An inbox holding at most `capacity` messages and `max_bytes` bytes, a message weighing
    /// what `weigh` says.
    pub(crate) fn with_byte_bound(capacity: usize, max_bytes: usize, weigh: fn(&T) -> usize) -> (InboxSender<T>, Self) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { items: VecDeque::new(), bytes: 0 }),
            ready: Notify::new(),
            dropped: AtomicU64::new(0),
            senders: AtomicUsize::new(1),
            capacity: capacity.max(1),
            max_bytes,
            weigh,
        });
        (InboxSender { shared: shared.clone() }, Self { shared })
    }

    /// Messages dropped because the inbox was full (by count or by bytes).
    pub(crate) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Bytes queued now (the tests check the bound with it).
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// Takes up to `max` queued messages (`None` when the queue is empty).
    fn take(&self, max: usize) -> Option<Vec<T>> {
        let s = &*self.shared;
        let mut q = s.lock();
        if q.items.is_empty() {
            return None;
        }
        let n = q.items.len().min(max);
        let out: Vec<T> = q.items.drain(..n).collect();
        let taken: usize = out.iter().map(s.weigh).sum();
        q.bytes -= taken;
        let left = !q.items.is_empty();
        drop(q);
        if left {
            // Another `recv` may be waiting; no push will wake it while the queue is not empty.
            s.ready.notify_one();
        }
        Some(out)
    }

    /// Waits for at least one message and returns up to `max`. Cancel-safe: messages leave the
    /// queue only in a synchronous step that returns them, so a cancelled call loses nothing.
    /// `Closed` once `closed` is cancelled, or when every producer is gone and the inbox is
    /// drained.
    pub(crate) async fn recv(&self, max: usize, closed: &CancellationToken) -> Result<Vec<T>, TransportError> {
        if closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        if max == 0 {
            return Ok(Vec::new());
        }
        let s = &*self.shared;
        loop {
            if let Some(out) = self.take(max) {
                return Ok(out);
            }
            if s.senders.load(Ordering::Acquire) == 0 {
                // The last producer may have pushed before it went: look once more.
                return self.take(max).ok_or(TransportError::Closed);
            }
            // A push that lands between the check above and this wait stored a permit in
            // `ready` (notify_one), so the wait returns at once: no wakeup is lost.
            tokio::select! {
                () = closed.cancelled() => return Err(TransportError::Closed),
                () = s.ready.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use proptest::strategy::Strategy;

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

    #[tokio::test]
    async fn a_batch_keeps_its_order_and_drops_only_what_crosses_a_bound() {
        let (tx, inbox) = Inbox::<Vec<u8>>::with_byte_bound(4, 1_000, len);
        let closed = CancellationToken::new();
        // Bytes: 400 + 400 fit, 300 would cross 1,000, 100 still fits; count: the fifth message
        // that fits in bytes is over the count bound of 4.
        let mut batch = vec![vec![1; 400], vec![2; 400], vec![3; 300], vec![4; 100], vec![5; 10], vec![6; 10]];
        tx.push_batch(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(inbox.dropped(), 2);
        assert_eq!(inbox.queued_bytes(), 910);
        let got = inbox.recv(100, &closed).await.unwrap();
        assert_eq!(got.iter().map(|m| m[0]).collect::<Vec<_>>(), vec![1, 2, 4, 5]);
        assert_eq!(inbox.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn recv_takes_at_most_max_and_the_rest_waits_in_order() {
        let (tx, inbox) = Inbox::<Vec<u8>>::new(100);
        let closed = CancellationToken::new();
        tx.push_batch(&mut (0..10u8).map(|i| vec![i]).collect());
        let first = inbox.recv(3, &closed).await.unwrap();
        let rest = inbox.recv(100, &closed).await.unwrap();
        assert_eq!(first.concat(), vec![0, 1, 2]);
        assert_eq!(rest.concat(), (3..10).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn a_waiting_recv_wakes_for_a_push_and_sees_closed_after_the_last_producer() {
        let (tx, inbox) = Inbox::<Vec<u8>>::new(100);
        let inbox = Arc::new(inbox);
        let closed = CancellationToken::new();
        let waiting = {
            let (inbox, closed) = (inbox.clone(), closed.clone());
            tokio::spawn(async move { inbox.recv(10, &closed).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let tx2 = tx.clone();
        tx2.push(vec![9]);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
        assert_eq!(got, vec![vec![9]]);
        // What the producers queued before they went is still delivered, then `Closed`.
        tx.push(vec![8]);
        drop(tx);
        drop(tx2);
        assert_eq!(inbox.recv(10, &closed).await.unwrap(), vec![vec![8]]);
        let end = tokio::time::timeout(Duration::from_secs(5), inbox.recv(10, &closed)).await.unwrap();
        assert!(matches!(end, Err(TransportError::Closed)), "{end:?}");
    }

    #[tokio::test]
    async fn a_cancelled_recv_loses_nothing() {
        let (tx, inbox) = Inbox::<Vec<u8>>::new(100);
        let closed = CancellationToken::new();
        // A recv that is cancelled while it waits, then a push: the next recv gets it.
        assert!(tokio::time::timeout(Duration::from_millis(10), inbox.recv(10, &closed)).await.is_err());
        tx.push(vec![1]);
        let got = tokio::time::timeout(Duration::from_secs(5), inbox.recv(10, &closed)).await.unwrap().unwrap();
        assert_eq!(got, vec![vec![1]]);
        closed.cancel();
        assert!(matches!(inbox.recv(10, &closed).await, Err(TransportError::Closed)));
    }

    proptest::proptest! {
        /// Any sequence of batches and takes: the bounds hold after every step, nothing is lost
        /// or reordered (what was taken is what was pushed minus what was counted as dropped, in
        /// push order), and the byte account matches what is queued.
        #[test]
        fn bounds_hold_and_nothing_is_lost_or_reordered(
            steps in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(0usize..300, 0..20).prop_map(Step::Push),
                    (1usize..30).prop_map(Step::Take),
                ],
                1..60,
            ),
            capacity in 1usize..40,
            max_bytes in 0usize..3_000,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let (tx, inbox) = Inbox::<Vec<u8>>::with_byte_bound(capacity, max_bytes, len);
            let closed = CancellationToken::new();
            let (mut next, mut model, mut dropped) = (0u32, std::collections::VecDeque::<Vec<u8>>::new(), 0u64);
            for step in steps {
                match step {
                    Step::Push(sizes) => {
                        let mut batch = Vec::new();
                        for size in sizes {
                            // Each message is tagged with its sequence number, then padded.
                            let mut m = next.to_le_bytes().to_vec();
                            m.resize(size.max(4), 0);
                            next += 1;
                            let queued: usize = model.iter().map(Vec::len).sum();
                            if model.len() < capacity && queued + m.len() <= max_bytes {
                                model.push_back(m.clone());
                            } else {
                                dropped += 1;
                            }
                            batch.push(m);
                        }
                        tx.push_batch(&mut batch);
                    }
                    Step::Take(max) => {
                        let want: Vec<Vec<u8>> = model.drain(..model.len().min(max)).collect();
                        if want.is_empty() {
                            let r = rt.block_on(async {
                                tokio::time::timeout(Duration::from_millis(1), inbox.recv(max, &closed)).await
                            });
                            proptest::prop_assert!(r.is_err(), "an empty inbox returned {r:?}");
                        } else {
                            let got = rt.block_on(inbox.recv(max, &closed)).unwrap();
                            proptest::prop_assert_eq!(got, want);
                        }
                    }
                }
                let queued: usize = model.iter().map(Vec::len).sum();
                proptest::prop_assert_eq!(inbox.queued_bytes(), queued);
                proptest::prop_assert!(queued <= max_bytes && model.len() <= capacity);
                proptest::prop_assert_eq!(inbox.dropped(), dropped);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push(Vec<usize>),
        Take(usize),
    }
}
