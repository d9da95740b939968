//! A bounded, cancel-safe inbox shared by connection tasks (producers) and one `recv` (consumer).

use std::sync::atomic::{AtomicU64, Ordering};

use kole_core::transport::TransportError;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// The producers' end: never blocks (a connection task must keep polling its event loop).
#[derive(Debug)]
pub(crate) struct InboxSender<T> {
    tx: mpsc::Sender<T>,
    dropped: std::sync::Arc<AtomicU64>,
}

impl<T> Clone for InboxSender<T> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), dropped: self.dropped.clone() }
    }
}

impl<T> InboxSender<T> {
    /// Enqueues `item`, or drops and counts it when the inbox is full or its reader is gone.
    pub(crate) fn push(&self, item: T) {
        if self.tx.try_send(item).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The consumer's end.
#[derive(Debug)]
pub(crate) struct Inbox<T> {
    rx: Mutex<mpsc::Receiver<T>>,
    capacity: usize,
    dropped: std::sync::Arc<AtomicU64>,
}

impl<T: Send> Inbox<T> {
    pub(crate) fn new(capacity: usize) -> (InboxSender<T>, Self) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let dropped = std::sync::Arc::new(AtomicU64::new(0));
        (InboxSender { tx, dropped: dropped.clone() }, Self { rx: Mutex::new(rx), capacity, dropped })
    }

    /// Messages dropped because the inbox was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
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
            n = rx.recv_many(&mut out, max) => if n == 0 { Err(TransportError::Closed) } else { Ok(out) },
        }
    }
}
