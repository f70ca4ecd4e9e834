//! The node's cache of decoded contexts: LRU by digest under a byte budget,
//! with single-flight loading.
//!
//! One `std::sync::Mutex` guards both the LRU and the table of loads in
//! flight. It is never held across an `.await` and every critical section is
//! a few map operations, so a blocking mutex is cheaper than an async one;
//! guarding both maps with one lock makes "not cached, so join or start a
//! load" atomic, so a load that finishes between the two checks cannot be
//! missed (which would load the same context twice).
//!
//! Single flight: callers for one digest share one `tokio::sync::OnceCell`.
//! The first runs its loader; the others wait on the cell. If that first
//! caller is cancelled mid-load, the cell lets the next waiter run its own
//! loader, so a cancelled job never strands the others. A failed load is
//! shared with the callers already waiting (so a bad blob is decoded once,
//! not once per waiter), then forgotten, so the next caller tries again.

use super::HeavyContext;
use anyhow::Context as _;
use lru::LruCache;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::OnceCell;

/// The outcome of one load, shared by everyone who waited for it. The error
/// is a message: `anyhow::Error` cannot be cloned to each waiter (the caller
/// whose loader failed still gets the original error).
type Flight = OnceCell<Result<Arc<HeavyContext>, String>>;

struct State {
    /// Unbounded by count: the byte budget is the bound, enforced in `insert`.
    lru: LruCache<String, Arc<HeavyContext>>,
    /// Sum of `size_bytes` of the entries in `lru`.
    bytes: usize,
    inflight: HashMap<String, Arc<Flight>>,
}

/// LRU of decoded contexts by digest, bounded by the sum of `size_bytes`.
///
/// The budget counts what the cache keeps alive. An evicted context that
/// running instances still hold stays in memory until the last of them drops
/// its `Arc`; a context larger than the whole budget is returned to its
/// callers but not kept.
pub struct ContextCache {
    budget: usize,
    state: Mutex<State>,
    loads: AtomicU64,
}

impl ContextCache {
    /// An empty cache that keeps at most `budget_bytes` of contexts.
    pub fn new(budget_bytes: usize) -> Self {
        ContextCache {
            budget: budget_bytes,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
            }),
            loads: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No critical section can panic half-way (map operations and integer
        // arithmetic on sizes the cache itself added), so a poisoned lock
        // still guards consistent state: recover it instead of taking the
        // whole node down with one panicking thread.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached context, or `load()`ed, decoded (on a blocking thread: it
    /// is CPU work proportional to the context) and inserted. Concurrent
    /// callers for one digest load it once; a hit marks it most recently used.
    pub async fn get_or_load<F, Fut>(
        &self,
        digest: &str,
        load: F,
    ) -> anyhow::Result<Arc<HeavyContext>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<u8>>>,
    {
        let flight = {
            let mut st = self.state();
            if let Some(ctx) = st.lru.get(digest) {
                return Ok(ctx.clone());
            }
            st.inflight.entry(digest.to_owned()).or_default().clone()
        };
        let mut own_error = None;
        let outcome = flight
            .get_or_init(|| self.load_once(digest, load, &flight, &mut own_error))
            .await;
        match outcome {
            Ok(ctx) => Ok(ctx.clone()),
            Err(message) => Err(own_error
                .unwrap_or_else(|| anyhow::anyhow!("loading context {digest} failed: {message}"))),
        }
    }

    /// Runs one caller's loader for `flight`, then publishes the result to the
    /// LRU and retires the flight, both under one lock.
    async fn load_once<F, Fut>(
        &self,
        digest: &str,
        load: F,
        flight: &Arc<Flight>,
        own_error: &mut Option<anyhow::Error>,
    ) -> Result<Arc<HeavyContext>, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<u8>>>,
    {
        // A previous initializer may have been cancelled after it inserted
        // into the LRU but before the cell was set: don't load again.
        let cached = self.state().lru.get(digest).cloned();
        if let Some(ctx) = cached {
            return Ok(ctx);
        }
        let loaded = self.load_and_decode(digest, load).await;
        let mut st = self.state();
        if st
            .inflight
            .get(digest)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            st.inflight.remove(digest);
        }
        match loaded {
            Ok(ctx) => {
                self.insert(&mut st, digest, ctx.clone());
                Ok(ctx)
            }
            Err(e) => {
                let message = format!("{e:#}");
                *own_error = Some(e);
                Err(message)
            }
        }
    }

    async fn load_and_decode<F, Fut>(
        &self,
        digest: &str,
        load: F,
    ) -> anyhow::Result<Arc<HeavyContext>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<u8>>>,
    {
        self.loads.fetch_add(1, Ordering::Relaxed);
        let bytes = load().await?;
        let owned = digest.to_owned();
        // If this caller is cancelled now, the decode still runs to the end on
        // its blocking thread and its result is dropped; a waiter that takes
        // over decodes again. Rare (a cancelled first mounter) and bounded by
        // one extra decode, which is simpler than detaching the load.
        let ctx = tokio::task::spawn_blocking(move || HeavyContext::decode(&owned, &bytes))
            .await
            .context("the context decode task failed")??;
        Ok(Arc::new(ctx))
    }

    /// Inserts under the budget, evicting least-recently-used entries first.
    fn insert(&self, st: &mut State, digest: &str, ctx: Arc<HeavyContext>) {
        let size = ctx.size_bytes();
        if size > self.budget {
            tracing::warn!(
                digest,
                size,
                budget = self.budget,
                "context larger than the whole cache budget: served, not kept"
            );
            return;
        }
        while st.bytes + size > self.budget {
            match st.lru.pop_lru() {
                Some((_, old)) => st.bytes -= old.size_bytes(),
                None => break,
            }
        }
        if let Some(old) = st.lru.put(digest.to_owned(), ctx) {
            st.bytes -= old.size_bytes();
        }
        st.bytes += size;
    }

    /// Number of contexts kept.
    pub fn len(&self) -> usize {
        self.state().lru.len()
    }

    /// Whether no context is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sum of `size_bytes` of the contexts kept; never above `budget()`.
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
    use crate::context::{ContextUpload, Document, encode};

    fn blob(text: &str) -> (String, Vec<u8>) {
        let enc = encode(&ContextUpload {
            name: "c".into(),
            documents: vec![Document {
                id: "d".into(),
                text: text.into(),
                embedding: None,
            }],
            tools: vec![],
        })
        .unwrap();
        (enc.digest, enc.bytes)
    }

    #[tokio::test]
    async fn the_get_or_load_future_is_send() {
        // The worker spawns runs on a multi-threaded runtime: a guard held
        // across an await would make this fail to compile.
        fn assert_send<T: Send>(t: T) -> T {
            t
        }
        let cache = ContextCache::new(1 << 20);
        let (digest, bytes) = blob("x");
        let ctx = assert_send(cache.get_or_load(&digest, || async move { Ok(bytes) }))
            .await
            .unwrap();
        assert_eq!(ctx.digest(), digest);
    }

    #[tokio::test]
    async fn a_replaced_entry_keeps_the_byte_count_exact() {
        let cache = ContextCache::new(1 << 20);
        let (digest, bytes) = blob("x");
        let ctx = Arc::new(HeavyContext::decode(&digest, &bytes).unwrap());
        {
            let mut st = cache.state();
            cache.insert(&mut st, &digest, ctx.clone());
            cache.insert(&mut st, &digest, ctx.clone());
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), ctx.size_bytes());
    }
}
