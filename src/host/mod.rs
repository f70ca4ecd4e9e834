//! The Wasm host: tenants' agents as components under per-tenant fuel, memory
//! and wall-clock limits.
//!
//! - `Host::new(HostConfig)` builds the engine (pooling allocator, fuel, epochs).
//! - `Host::admit(&[u8])` validates an upload and answers its digest.
//! - `Host::component(digest, fetch)` gives a compiled, pre-instantiated
//!   component from the LRU / disk cache, fetching bytes on a miss.
//! - `Host::context(digest, fetch)` gives a shared heavy context.
//! - `Host::run(RunRequest)` runs one attempt and reports what happened;
//!   `Host::run_live` also hands its log lines out as they are written.
//!
//! # Modules, one way down
//!
//! Each module uses only modules listed before it (never this one), so the
//! graph has no cycle:
//!
//! ```text
//! limits, bindings, budget, sandbox, cache            (leaves)
//! config     <- limits
//! engine     <- config
//! structure  <- config
//! compile    <- config, engine
//! http       <- config, sandbox                       (wasi:http under the egress policy;
//!                                                     http/meter: what its requests use)
//! inference  <- bindings, limits, state               (agentplane:agent/inference)
//! state      <- bindings, budget, http, inference, sandbox, limits (RunState + host imports)
//! random     <- state, sandbox, limits                (wasi:random, charged)
//! admission  <- config, bindings, state, structure, compile
//! warm       <- bindings, state                       (idle instances)
//! classify   <- budget                               (how a failed run ended)
//! run        <- bindings, budget, classify, config, engine, http, sandbox, state, limits, warm
//! mod        <- all of them: builds the engine, wires admission's compiler
//!               and the contexts' decoder into the one `cache`, calls `run`
//! ```
//!
//! `limits` states every bound and default the host enforces once; `config`
//! the public settings and errors; `cache` the single-flight LRU that keeps
//! both compiled components and decoded contexts under one policy.
//!
//! Metrics: `agentplane_host_runs_total{outcome}`, `agentplane_host_run_seconds`,
//! `agentplane_host_component_compiles_total`,
//! `agentplane_host_warm_reuses_total`,
//! `agentplane_host_component_disk_loads_total`,
//! `agentplane_egress_requests_total{tenant,outcome}`,
//! `agentplane_egress_bytes_total{tenant,direction}`; the inference
//! series are listed in `crate::inference`.

mod admission;
mod bindings;
mod budget;
mod cache;
mod classify;
mod compile;
mod config;
mod engine;
mod http;
mod inference;
pub mod limits;
mod random;
mod run;
mod sandbox;
mod state;
mod structure;
mod warm;

pub use compile::child_main as compile_child_main;
pub use config::{AdmissionError, Admitted, CompileChild, EgressLimits, HostConfig, HostError};
pub use http::{EgressGrant, EgressUse};
pub use inference::InferenceGrant;
pub use run::{RunOutcome, RunReport, RunRequest};
pub use sandbox::{LIVE_FLUSH_BYTES, LiveLog};
pub use state::LoadedComponent;

use crate::context::HeavyContext;
use anyhow::Context as _;
use lru::LruCache;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use wasmtime::component::{HasSelf, Linker};

impl cache::Weighed for LoadedComponent {
    fn weight(&self) -> usize {
        self.size
    }
}

impl cache::Weighed for HeavyContext {
    fn weight(&self) -> usize {
        self.size_bytes()
    }
}

impl cache::Shared for HostError {
    fn share(&self) -> Self {
        match self {
            HostError::NotFound(d) => HostError::NotFound(d.clone()),
            HostError::Invalid(why) => HostError::Invalid(why.clone()),
            HostError::Other(e) => HostError::Other(e.share()),
        }
    }
}

/// The node's decoded contexts by digest: the one cache (`cache::Cache`),
/// loading a context's blob and decoding it on a blocking thread (CPU work
/// proportional to the context).
pub struct ContextCache(cache::Cache<HeavyContext, anyhow::Error>);

impl ContextCache {
    /// An empty cache that keeps at most `budget_bytes` of contexts; a
    /// context larger than the whole budget is served but not kept.
    pub fn new(budget_bytes: usize) -> Self {
        ContextCache(cache::Cache::new(budget_bytes))
    }

    /// The cached context, or `load()`ed, decoded and inserted; concurrent
    /// callers for one digest load it once.
    pub async fn get_or_load<F, Fut>(
        &self,
        digest: &str,
        load: F,
    ) -> anyhow::Result<Arc<HeavyContext>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<u8>>>,
    {
        self.0
            .get_or_load(digest, || async move {
                let bytes = load().await?;
                let owned = digest.to_owned();
                // If this caller is cancelled now, the decode still runs to
                // the end on its blocking thread and its result is dropped;
                // a waiter that takes over decodes again (bounded by one).
                tokio::task::spawn_blocking(move || HeavyContext::decode(&owned, &bytes))
                    .await
                    .context("the context decode task failed")?
                    .map_err(anyhow::Error::from)
            })
            .await
    }

    /// Number of contexts kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no context is kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sum of `size_bytes` of the contexts kept; never above `budget()`.
    pub fn bytes(&self) -> usize {
        self.0.bytes()
    }

    /// The byte budget this cache was created with.
    pub fn budget(&self) -> usize {
        self.0.budget()
    }

    /// How many times a loader actually ran (cache misses that loaded).
    pub fn loads(&self) -> u64 {
        self.0.loads()
    }

    /// Whether `digest` is kept, without marking it used.
    pub fn contains(&self, digest: &str) -> bool {
        self.0.contains(digest)
    }
}

/// Failed digests remembered per node.
const FAILED_REMEMBERED: usize = 1024;

/// One node's Wasm host: the engine, the caches and the tenants' budgets.
/// Shared by every slot of a worker (`Arc<Host>`); all methods take `&self`.
pub struct Host {
    cfg: HostConfig,
    compiler: Arc<admission::Compiler>,
    components: cache::Cache<LoadedComponent, HostError>,
    /// Digests that failed to compile, with the reason: a bad component is
    /// refused at once on every later claim instead of being fetched and
    /// recompiled (a job of it used to cycle release-and-recompile at 100%
    /// CPU). Bounded: the oldest reasons are forgotten first.
    failed: Mutex<LruCache<String, String>>,
    contexts: ContextCache,
    /// Memory in use per tenant on this node (`tenant_memory_budget` each).
    tenants: Mutex<HashMap<String, Arc<budget::TenantBudget>>>,
    /// Idle instances for reuse; `None` when `warm_instances` is 0.
    warm: Option<Arc<warm::WarmPool>>,
    /// The node's models (`HostConfig::models`), loaded once.
    models: Arc<crate::inference::Models>,
}

/// Tenants remembered before idle ones (nothing running) are forgotten:
/// stops the map of budgets from growing with every tenant ever seen.
const TENANT_MAP_PRUNE_AT: usize = 1024;

impl Host {
    /// Builds the engine under `cfg` and starts its epoch ticker.
    pub fn new(cfg: HostConfig) -> anyhow::Result<Host> {
        let engine = engine::build(&cfg)?;
        engine::start_ticker(&engine)?;
        engine::check_map_count(&cfg);
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // `wasi:http/outgoing-handler` and its types, sent by `http::Egress`.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        // `wasi:config/store`: the job's tenant's secrets.
        wasmtime_wasi_config::add_to_linker(&mut linker, |s: &mut state::RunState| {
            wasmtime_wasi_config::WasiConfig::from(&*s.config)
        })?;
        bindings::Agent::add_to_linker::<_, HasSelf<state::RunState>>(&mut linker, |s| s)?;
        random::shadow(&mut linker)?;
        let compiler = admission::Compiler::new(engine, linker, &cfg)?;
        let models = Arc::new(crate::inference::Models::load(&cfg.models)?);
        let warm = match cfg.warm_instances {
            0 => None,
            n => {
                let pool = Arc::new(warm::WarmPool::new(n, cfg.warm_idle_ttl));
                warm::start_sweeper(&pool)?;
                Some(pool)
            }
        };
        Ok(Host {
            warm,
            models,
            components: cache::Cache::new(
                usize::try_from(cfg.component_cache_bytes).unwrap_or(usize::MAX),
            ),
            failed: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(FAILED_REMEMBERED)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            contexts: ContextCache::new(
                usize::try_from(cfg.context_cache_bytes).unwrap_or(usize::MAX),
            ),
            compiler: Arc::new(compiler),
            tenants: Mutex::new(HashMap::new()),
            cfg,
        })
    }

    /// Validates an upload: a component (not a core module), at most
    /// [`HostConfig::max_component_bytes`],
    /// importing only WASI 0.2 and `agentplane:agent`, exporting `run` with
    /// the world's type. Answers its digest. The compiled result is kept (in
    /// memory and in the disk cache), so running it on this node, or on any
    /// node sharing `cache_dir`, needs no second compile. Compiling is
    /// CPU-bound for up to seconds: call this from a blocking context
    /// (`tokio::task::spawn_blocking`).
    pub fn admit(&self, bytes: &[u8]) -> Result<Admitted, AdmissionError> {
        let loaded = self.compiler.compile_checked(bytes)?;
        let admitted = Admitted {
            digest: loaded.digest.clone(),
            size: bytes.len(),
            outbound_http: loaded.outbound_http,
            inference: loaded.inference,
        };
        self.components.insert(&admitted.digest, Arc::new(loaded));
        Ok(admitted)
    }

    /// The compiled component of `digest`, from memory, the disk cache, or
    /// `fetch`ed and compiled (once, however many callers ask at once).
    /// `fetch` answering `Ok(None)` gives [`HostError::NotFound`].
    pub async fn component<F, Fut>(
        &self,
        digest: &str,
        fetch: F,
    ) -> Result<Arc<LoadedComponent>, HostError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<Vec<u8>>>>,
    {
        if let Some(c) = self.components.cached(digest) {
            return Ok(c);
        }
        if let Some(why) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Err(HostError::Invalid(why.clone()));
        }
        let hex = admission::digest_hex(digest)
            .ok_or_else(|| HostError::NotFound(digest.to_string()))?
            .to_string();
        let compiler = &self.compiler;
        let result = self
            .components
            .get_or_load(digest, || load_component(compiler, digest, hex, fetch))
            .await;
        if let Err(HostError::Invalid(why)) = &result {
            self.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(digest.to_string(), why.clone());
        }
        result
    }

    /// The shared heavy context of `digest`, loaded once per node.
    pub async fn context<F, Fut>(&self, digest: &str, fetch: F) -> anyhow::Result<Arc<HeavyContext>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<u8>>>,
    {
        self.contexts.get_or_load(digest, fetch).await
    }

    /// Runs one attempt under its limits and reports how it ended. Never
    /// panics or hangs on anything the guest does; stops within ~10 ms of
    /// `req.cancel` while guest code runs (~20 ms when the guest is parked
    /// in a host call).
    pub async fn run(&self, req: RunRequest) -> RunReport {
        self.run_live(req, self.live_log()).await
    }

    /// An empty live log, bounded like the run's log (`stdio_capture_bytes`).
    pub fn live_log(&self) -> LiveLog {
        LiveLog::new(self.cfg.stdio_capture_bytes)
    }

    /// [`Host::run`], with the run's `log.write` lines written to `log`
    /// as they come, so that a reader can take them while the run is in
    /// flight (the worker pushes them to the control plane).
    pub async fn run_live(&self, req: RunRequest, log: LiveLog) -> RunReport {
        let env = run::RunEnv {
            fuel: self.cfg.fuel,
            max_memory_per_instance: self.cfg.max_memory_per_instance,
            capture_bytes: self.cfg.stdio_capture_bytes,
            tenant: self.tenant_budget(&req.tenant),
            egress: self.cfg.egress,
            warm: self.warm.clone(),
            models: self.models.clone(),
        };
        run::run(env, req, log).await
    }

    /// The node's models, loaded at start (`HostConfig::models`).
    pub fn models(&self) -> &Arc<crate::inference::Models> {
        &self.models
    }

    /// Components compiled from bytes by this host (not loaded from the disk
    /// cache): lets tests and metrics see the caches working.
    pub fn compile_count(&self) -> u64 {
        self.compiler.compiles.load(Ordering::Relaxed)
    }

    /// Components loaded from the precompiled disk cache by this host.
    pub fn disk_load_count(&self) -> u64 {
        self.compiler.disk_loads.load(Ordering::Relaxed)
    }

    /// Runs that took an idle warm instance instead of a fresh one
    /// (always 0 with `warm_instances` 0).
    pub fn warm_reuses(&self) -> u64 {
        self.warm.as_ref().map_or(0, |w| w.reuses())
    }

    /// Warm instances idle on this node now.
    pub fn warm_idle(&self) -> usize {
        self.warm.as_ref().map_or(0, |w| w.len())
    }

    /// Bytes of linear memory `tenant`'s live instances hold on this node
    /// (idle warm ones included).
    pub fn tenant_memory_in_use(&self, tenant: &str) -> u64 {
        self.tenants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .map_or(0, |b| b.used.load(Ordering::Acquire))
    }

    fn tenant_budget(&self, tenant: &str) -> Arc<budget::TenantBudget> {
        let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= TENANT_MAP_PRUNE_AT && !map.contains_key(tenant) {
            // Only budgets nobody holds (no live store) may go; they are zero.
            map.retain(|_, b| Arc::strong_count(b) > 1);
        }
        if let Some(b) = map.get(tenant) {
            return b.clone();
        }
        let limit = self.cfg.tenant_memory_budget;
        let in_flight = self.cfg.egress.max_in_flight_per_tenant;
        map.entry(tenant.to_string())
            .or_insert_with(|| {
                Arc::new(
                    match &self.warm {
                        None => budget::TenantBudget::new(limit),
                        // A run refused memory first drops the tenant's idle
                        // instances. Weak: the pool's stores hold this budget.
                        Some(pool) => {
                            let (pool, tenant) = (Arc::downgrade(pool), tenant.to_string());
                            budget::TenantBudget::with_reclaim(
                                limit,
                                Box::new(move || {
                                    pool.upgrade().is_some_and(|p| p.evict_tenant(&tenant))
                                }),
                            )
                        }
                    }
                    .with_egress_in_flight(in_flight),
                )
            })
            .clone()
    }
}

/// Loads `digest` from the disk cache, else `fetch`es and compiles it.
async fn load_component<F, Fut>(
    compiler: &Arc<admission::Compiler>,
    digest: &str,
    hex: String,
    fetch: F,
) -> Result<LoadedComponent, HostError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<Vec<u8>>>>,
{
    // Deserializing and compiling are CPU-bound: off the async threads.
    let (c, d, h) = (compiler.clone(), digest.to_string(), hex);
    let from_disk = tokio::task::spawn_blocking(move || c.load_precompiled(&d, &h))
        .await
        .map_err(|e| anyhow::anyhow!("loading {digest} from disk: {e}"))?;
    if let Some(loaded) = from_disk {
        return Ok(loaded);
    }
    let bytes = fetch()
        .await?
        .ok_or_else(|| HostError::NotFound(digest.to_string()))?;
    if admission::digest_of(&bytes) != digest {
        // The store answered with other bytes than asked for: never run
        // them under this name.
        return Err(anyhow::anyhow!("fetched bytes do not match {digest}").into());
    }
    let (c, d) = (compiler.clone(), digest.to_string());
    tokio::task::spawn_blocking(move || c.compile(&d, &bytes))
        .await
        .map_err(|e| anyhow::anyhow!("compiling {digest}: {e}"))?
}
