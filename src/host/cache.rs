//! The node's one in-memory cache: an LRU by digest under a byte budget,
//! with single-flight loading. It serves both compiled components and
//! decoded contexts ([`Cache`] is generic over what it keeps), so both
//! follow one policy, including for an entry larger than the whole budget:
//! it is served to its callers but not kept (the budget is a bound on what
//! the cache holds, never exceeded; the two caches used to disagree, the
//! component one keeping any single entry whatever its size).
//!
//! One `std::sync::Mutex` guards both the LRU and the table of loads in
//! flight. It is never held across an `.await` and every critical section is
//! a few map operations, so a blocking mutex is cheaper than an async one;
//! guarding both maps with one lock makes "not cached, so join or start a
//! load" atomic, so a load that finishes between the two checks cannot be
//! missed (which would load the same entry twice).
//!
//! Single flight: callers for one digest share one `tokio::sync::OnceCell`.
//! The first runs its loader; the others wait on the cell. If that first
//! caller is cancelled mid-load, the cell lets the next waiter run its own
//! loader, so a cancelled job never strands the others. A failed load is
//! shared with the callers already waiting (so a bad blob is decoded once,
//! not once per waiter), then forgotten, so the next caller tries again.
//!
//! This module knows nothing of what it keeps: the host gives it loaders.

use lru::LruCache;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::OnceCell;

/// What the cache can keep: something that says what it costs in memory.
pub trait Weighed {
    /// Bytes this entry holds, as the budget counts them.
    fn weight(&self) -> usize;
}

/// A failure of one load, as its waiters see it. The caller whose loader
/// failed gets the original error; each waiter gets [`Shared::share`] of it
/// (errors such as `anyhow::Error` cannot be cloned).
pub trait Shared: Sized {
    /// A copy of this error for one more caller.
    fn share(&self) -> Self;
}

impl Shared for anyhow::Error {
    fn share(&self) -> Self {
        anyhow::anyhow!("{self:#}")
    }
}

type Flight<V, E> = OnceCell<Result<Arc<V>, E>>;

struct State<V, E> {
    /// Unbounded by count: the byte budget is the bound, enforced in `insert`.
    lru: LruCache<String, Arc<V>>,
    /// Sum of `weight` of the entries in `lru`.
    bytes: usize,
    inflight: HashMap<String, Arc<Flight<V, E>>>,
}

/// LRU of `V` by digest, bounded by the sum of their weights.
///
/// The budget counts what the cache keeps alive. An evicted entry that
/// running instances still hold stays in memory until the last of them drops
/// its `Arc`; an entry larger than the whole budget is returned to its
/// callers but not kept.
pub struct Cache<V, E> {
    budget: usize,
    state: Mutex<State<V, E>>,
    loads: AtomicU64,
}

impl<V: Weighed, E: Shared> Cache<V, E> {
    /// An empty cache that keeps at most `budget_bytes`.
    pub fn new(budget_bytes: usize) -> Self {
        Cache {
            budget: budget_bytes,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
            }),
            loads: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<V, E>> {
        // No critical section can panic half-way (map operations and integer
        // arithmetic on sizes the cache itself added), so a poisoned lock
        // still guards consistent state: recover it instead of taking the
        // whole node down with one panicking thread.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached entry of `digest`, marked most recently used.
    pub fn cached(&self, digest: &str) -> Option<Arc<V>> {
        self.state().lru.get(digest).cloned()
    }

    /// The cached entry, or `load()`ed and inserted. Concurrent callers for
    /// one digest load it once; a hit marks it most recently used.
    pub async fn get_or_load<F, Fut>(&self, digest: &str, load: F) -> Result<Arc<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let flight = {
            let mut st = self.state();
            if let Some(v) = st.lru.get(digest) {
                return Ok(v.clone());
            }
            st.inflight.entry(digest.to_owned()).or_default().clone()
        };
        let mut own_error = None;
        let outcome = flight
            .get_or_init(|| self.load_once(digest, load, &flight, &mut own_error))
            .await;
        match outcome {
            Ok(v) => Ok(v.clone()),
            Err(shared) => Err(own_error.unwrap_or_else(|| shared.share())),
        }
    }

    /// Runs one caller's loader for `flight`, then publishes the result to the
    /// LRU and retires the flight, both under one lock.
    async fn load_once<F, Fut>(
        &self,
        digest: &str,
        load: F,
        flight: &Arc<Flight<V, E>>,
        own_error: &mut Option<E>,
    ) -> Result<Arc<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        // A previous initializer may have been cancelled after it inserted
        // into the LRU but before the cell was set: don't load again.
        if let Some(v) = self.cached(digest) {
            return Ok(v);
        }
        self.loads.fetch_add(1, Ordering::Relaxed);
        let loaded = load().await;
        let mut st = self.state();
        if st
            .inflight
            .get(digest)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            st.inflight.remove(digest);
        }
        match loaded {
            Ok(v) => {
                let v = Arc::new(v);
                self.insert_locked(&mut st, digest, v.clone());
                Ok(v)
            }
            Err(e) => {
                let shared = e.share();
                *own_error = Some(e);
                Err(shared)
            }
        }
    }

    /// Keeps `v` under `digest` (an upload just compiled, say).
    pub fn insert(&self, digest: &str, v: Arc<V>) {
        let mut st = self.state();
        self.insert_locked(&mut st, digest, v);
    }

    /// Inserts under the budget, evicting least-recently-used entries first.
    fn insert_locked(&self, st: &mut State<V, E>, digest: &str, v: Arc<V>) {
        let size = v.weight();
        if size > self.budget {
            tracing::warn!(
                digest,
                size,
                budget = self.budget,
                "entry larger than the whole cache budget: served, not kept"
            );
            return;
        }
        if let Some(old) = st.lru.pop(digest) {
            st.bytes -= old.weight();
        }
        while st.bytes + size > self.budget {
            match st.lru.pop_lru() {
                Some((_, old)) => st.bytes -= old.weight(),
                None => break,
            }
        }
        st.lru.put(digest.to_owned(), v);
        st.bytes += size;
    }

    /// Number of entries kept.
    pub fn len(&self) -> usize {
        self.state().lru.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sum of the weights of the entries kept; never above `budget()`.
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }

    /// The byte budget this cache was created with.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// How many times a loader actually ran (cache misses that loaded).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Whether `digest` is kept, without marking it used.
    pub fn contains(&self, digest: &str) -> bool {
        self.state().lru.contains(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Blob(usize);
    impl Weighed for Blob {
        fn weight(&self) -> usize {
            self.0
        }
    }
    type C = Cache<Blob, anyhow::Error>;

    #[tokio::test]
    async fn the_get_or_load_future_is_send() {
        // The worker spawns runs on a multi-threaded runtime: a guard held
        // across an await would make this fail to compile.
        fn assert_send<T: Send>(t: T) -> T {
            t
        }
        let cache = C::new(100);
        let v = assert_send(cache.get_or_load("a", || async { Ok(Blob(10)) }))
            .await
            .unwrap();
        assert_eq!(v.0, 10);
    }

    #[test]
    fn a_replaced_entry_keeps_the_byte_count_exact() {
        let cache = C::new(100);
        cache.insert("a", Arc::new(Blob(30)));
        cache.insert("a", Arc::new(Blob(40)));
        assert_eq!((cache.len(), cache.bytes()), (1, 40));
    }

    #[test]
    fn an_entry_over_the_budget_is_not_kept_and_evicts_nothing() {
        let cache = C::new(100);
        cache.insert("a", Arc::new(Blob(60)));
        cache.insert("big", Arc::new(Blob(101)));
        assert!(cache.contains("a") && !cache.contains("big"));
        cache.insert("b", Arc::new(Blob(60)));
        assert!(!cache.contains("a") && cache.contains("b"));
        assert_eq!(cache.bytes(), 60);
    }
}
