//! One writer, many readers.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::StateCache;

/// The exclusive write handle of a shared cache (held by the engine). Not `Clone`.
#[derive(Debug)]
pub struct CacheWriter<C: ?Sized> {
    inner: Arc<RwLock<C>>,
}

/// A cheap, cloneable read handle of a shared cache. Reads are synchronous.
#[derive(Debug)]
pub struct CacheStore<C: ?Sized> {
    inner: Arc<RwLock<C>>,
}

impl<C: ?Sized> Clone for CacheStore<C> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

/// Shares `cache` between one writer and any number of readers.
pub fn shared<C: StateCache>(cache: C) -> (CacheWriter<C>, CacheStore<C>) {
    let inner = Arc::new(RwLock::new(cache));
    (CacheWriter { inner: Arc::clone(&inner) }, CacheStore { inner })
}

impl<C: ?Sized> CacheWriter<C> {
    /// Locks the cache for writing. Batch updates under one guard; readers wait meanwhile.
    pub fn write(&self) -> RwLockWriteGuard<'_, C> {
        // A panic while writing leaves the cache as the last completed call left it (every
        // StateCache method validates before mutating), so poisoning is not fatal.
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A reader of the same cache.
    pub fn store(&self) -> CacheStore<C> {
        CacheStore { inner: Arc::clone(&self.inner) }
    }
}

impl<C: ?Sized> CacheStore<C> {
    /// Locks the cache for reading.
    pub fn read(&self) -> RwLockReadGuard<'_, C> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::NodeCache;
    use crate::model::{Labels, NodeInfo, NodeName, NodeRegistration, Selector, Timestamp};

    #[test]
    fn readers_see_writes() {
        let (w, r) = shared(NodeCache::new());
        let r2 = r.clone();
        let reg = NodeRegistration {
            name: NodeName::new("n1").unwrap(),
            labels: Labels::from_pairs([("a", "b")]).unwrap(),
            info: NodeInfo::default(),
            applied: Default::default(),
            workloads: vec![],
        };
        w.write().register(&reg, 1, Timestamp::from_secs(10)).unwrap();
        assert_eq!(r.read().len(), 1);
        assert_eq!(r2.read().counts(&Selector::parse("a=b").unwrap()).online, 1);
    }
}
