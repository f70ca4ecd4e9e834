//! Warm instances: an operator's opt-in (`HostConfig::warm_instances`,
//! `--warm-instances`) to run the next job of the same tenant and component
//! on the instance the last one ended cleanly on, instead of instantiating
//! a fresh one (most of a small agent's per-job cost is instantiation:
//! guest start-up code and the page faults of a fresh memory).
//!
//! What a reused instance shares with the runs before it is only what its
//! own tenant's earlier jobs of the same component left in it: its linear
//! memory (globals, heap, caches) and its WASI handles. Never across tenants:
//! the key names the tenant. Each run still gets its own fuel, deadline,
//! cancellation, log, stdout/stderr capture and state (`RunState::begin`);
//! its memory limit is the instance's (part of the key). Any run that did
//! not end cleanly (a trap, a limit hit, a timeout, a cancel) drops its
//! instance. An idle instance keeps its memory charged to its tenant's node
//! budget, and is dropped when that tenant needs the memory, when the node
//! needs its pool slot, after `HostConfig::warm_idle_ttl`, or by LRU past
//! the bound.

use super::bindings::Agent;
use super::state::RunState;
use crate::context::HeavyContext;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use wasmtime::Store;

/// How often idle instances past their time are looked for when no run
/// comes by to do it.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Which runs may share an instance: one tenant, one component, the same
/// contexts mounted under the same names, and the same memory limit (an
/// instance's memory never shrinks, so a lower limit could not be honoured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WarmKey {
    tenant: String,
    component: String,
    contexts: Vec<(String, String)>,
    memory_limit: u64,
}

impl WarmKey {
    pub fn new(
        tenant: &str,
        component: &str,
        contexts: &[(String, Arc<HeavyContext>)],
        memory_limit: u64,
    ) -> WarmKey {
        WarmKey {
            tenant: tenant.to_string(),
            component: component.to_string(),
            contexts: contexts
                .iter()
                .map(|(name, c)| (name.clone(), c.digest().to_string()))
                .collect(),
            memory_limit,
        }
    }
}

/// An instance between two runs, with the store it lives in.
pub(crate) struct Warm {
    pub store: Store<RunState>,
    pub agent: Agent,
}

struct Idle {
    key: WarmKey,
    warm: Warm,
    since: Instant,
}

/// The node's idle instances, most recently parked last. A linear scan:
/// the pool is small (an operator's few hundred at most) and a scan of it
/// costs far less than the instantiation it saves.
pub(crate) struct WarmPool {
    cap: usize,
    ttl: Duration,
    idle: Mutex<VecDeque<Idle>>,
    reuses: AtomicU64,
}

impl WarmPool {
    /// A pool keeping at most `cap` idle instances, each for at most `ttl`.
    pub fn new(cap: usize, ttl: Duration) -> WarmPool {
        WarmPool {
            cap,
            ttl,
            idle: Mutex::new(VecDeque::new()),
            reuses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently parked instance for `key`, taken out of the pool.
    pub fn take(&self, key: &WarmKey) -> Option<Warm> {
        let mut idle = self.lock();
        let at = idle.iter().rposition(|i| i.key == *key)?;
        let found = idle.remove(at)?;
        drop(idle);
        if found.since.elapsed() >= self.ttl {
            return None;
        }
        self.reuses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("agentplane_host_warm_reuses_total").increment(1);
        Some(found.warm)
    }

    /// Parks an instance that ended its run cleanly; the least recently
    /// parked one goes if the pool is full.
    pub fn put(&self, key: WarmKey, warm: Warm) {
        if self.cap == 0 {
            return;
        }
        let evicted = {
            let mut idle = self.lock();
            idle.push_back(Idle {
                key,
                warm,
                since: Instant::now(),
            });
            if idle.len() > self.cap {
                idle.pop_front()
            } else {
                None
            }
        };
        // Dropping a store unmaps its memory: never under the lock.
        drop(evicted);
    }

    /// Drops every idle instance of `tenant`; whether there was any.
    pub fn evict_tenant(&self, tenant: &str) -> bool {
        self.evict_where(|i| i.key.tenant == tenant)
    }

    /// Drops the least recently parked instance (its pool slot is needed);
    /// whether there was one.
    pub fn evict_oldest(&self) -> bool {
        let oldest = self.lock().pop_front();
        oldest.is_some()
    }

    /// Drops the instances idle for the pool's `ttl` or more.
    pub fn sweep(&self) {
        let ttl = self.ttl;
        self.evict_where(|i| i.since.elapsed() >= ttl);
    }

    fn evict_where(&self, doomed: impl Fn(&Idle) -> bool) -> bool {
        let gone = {
            let mut idle = self.lock();
            let (gone, kept): (VecDeque<Idle>, VecDeque<Idle>) =
                idle.drain(..).partition(|i| doomed(i));
            *idle = kept;
            gone
        };
        !gone.is_empty()
    }

    /// Instances idle now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Runs that took an idle instance instead of a fresh one.
    pub fn reuses(&self) -> u64 {
        self.reuses.load(Ordering::Relaxed)
    }
}

/// Starts the thread that drops expired idle instances while no run comes
/// by. It holds a weak handle and ends once the pool (its `Host`) is gone.
pub(crate) fn start_sweeper(pool: &Arc<WarmPool>) -> std::io::Result<()> {
    let weak: Weak<WarmPool> = Arc::downgrade(pool);
    super::engine::spawn_periodic(
        "agentplane-warm",
        SWEEP_EVERY,
        move || weak.upgrade(),
        |pool| pool.sweep(),
    )
}
