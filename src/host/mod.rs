//! The Wasm host: tenants' agents as components under per-tenant fuel, memory
//! and wall-clock limits.
//!
//! - `Host::new(HostConfig)` builds the engine (pooling allocator, fuel, epochs).
//! - `Host::admit(&[u8])` validates an upload and answers its digest.
//! - `Host::component(digest, fetch)` gives a compiled, pre-instantiated
//!   component from the LRU / disk cache, fetching bytes on a miss.
//! - `Host::context(digest, fetch)` gives a shared heavy context.
//! - `Host::run(RunRequest)` runs one attempt and reports what happened.
//!
//! Inside: `engine` builds the wasmtime engine and the epoch ticker,
//! `bindings` the `agent` world and its host imports, `sandbox` WASI with
//! nothing granted, `random` its `wasi:random` served and charged by the
//! host, `limits` the memory limiter and tenant budgets,
//! `admission` the upload checks, `cache` the compiled-component cache, and
//! `run` one attempt and the classification of how it ended.
//!
//! Metrics: `agentplane_host_runs_total{outcome}`, `agentplane_host_run_seconds`,
//! `agentplane_host_component_compiles_total`,
//! `agentplane_host_component_disk_loads_total`.

mod admission;
mod bindings;
mod budget;
mod cache;
mod compile;
mod engine;
pub mod limits;
mod random;
mod run;
mod sandbox;
mod structure;

pub use compile::{CompileChild, child_main as compile_child_main};

use crate::context::{ContextCache, HeavyContext};
use crate::model::{ErrorKind, Limits};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use wasmtime::component::{HasSelf, Linker};

/// Node-wide host settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Instances that may be alive at once (pooling allocator slots).
    pub max_instances: u32,
    /// Upper bound of any instance's linear memory, whatever the tenant says.
    pub max_memory_per_instance: u64,
    /// Memory all live instances of one tenant may hold on this node.
    pub tenant_memory_budget: u64,
    /// Byte budget of compiled components kept in memory.
    pub component_cache_bytes: u64,
    /// Byte budget of decoded heavy contexts kept in memory.
    pub context_cache_bytes: u64,
    /// Where precompiled components are written; `None` disables the disk cache.
    pub cache_dir: Option<PathBuf>,
    /// Pooling allocator (true) or on-demand allocation (false).
    pub pooling: bool,
    /// Fuel metering on (true) or off (benchmarks only; limits need it).
    pub fuel: bool,
    /// Bytes of stdout and of stderr kept per attempt.
    pub stdio_capture_bytes: usize,
    /// Largest component admitted or compiled (bytes). Compilation time and
    /// memory grow with size; the bound keeps one upload from tying up a
    /// node's compiler for minutes. The API and the workers must agree on
    /// it: a worker refuses to compile what is over its own bound.
    pub max_component_bytes: usize,
    /// Compile uploads in a child process bounded in time and memory
    /// (`Some`), or in this process (`None`: tests and tools; the
    /// structural checks still apply).
    pub compile_child: Option<CompileChild>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            max_instances: 1000,
            max_memory_per_instance: 256 << 20,
            tenant_memory_budget: 4 << 30,
            component_cache_bytes: 512 << 20,
            context_cache_bytes: 2 << 30,
            cache_dir: None,
            pooling: true,
            fuel: true,
            stdio_capture_bytes: 64 << 10,
            max_component_bytes: limits::DEFAULT_MAX_COMPONENT_BYTES,
            compile_child: None,
        }
    }
}

impl HostConfig {
    /// The configuration of a host that only admits uploads (the API): the
    /// workers' engine configuration exactly (pooling allocator and its
    /// per-component share included, see [`HostConfig::default`]), so that
    /// what admission accepts every worker can instantiate; only the pool is
    /// small and the caches are off, since it never runs anything. (It used
    /// to admit with pooling off: a component with 9 memories passed upload
    /// and then failed on every worker.)
    pub fn admission() -> HostConfig {
        HostConfig {
            max_instances: 1,
            component_cache_bytes: 0,
            context_cache_bytes: 0,
            cache_dir: None,
            ..HostConfig::default()
        }
    }
}

/// Why an upload was refused (`POST /v1/components` answers 400 with it).
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// Not a component, bad imports/exports, garbage, over a structural
    /// bound or the compiler's time or memory: the message names the problem.
    #[error("{0}")]
    Invalid(String),
    /// The node could not check it now (the compiler process could not be
    /// run): not the upload's fault, retry later.
    #[error("{0}")]
    Unavailable(String),
}

/// An admitted upload.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
    /// Bytes uploaded.
    pub size: usize,
}

/// A compiled component ready to instantiate.
pub struct LoadedComponent {
    digest: String,
    pre: bindings::AgentPre<run::RunState>,
    /// Bytes it holds in memory (what the component cache budget counts).
    size: usize,
}

impl LoadedComponent {
    /// `sha256:<hex>` of the uploaded bytes it was compiled from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Approximate bytes of compiled code and metadata held in memory.
    pub fn size_bytes(&self) -> usize {
        self.size
    }
}

/// One attempt to run.
pub struct RunRequest {
    /// Whose job: its instances share the tenant's node memory budget.
    pub tenant: String,
    /// For the log and traces only.
    pub job_id: String,
    /// What to run, from [`Host::component`].
    pub component: Arc<LoadedComponent>,
    /// The argument of the guest's `run`.
    pub input: String,
    /// Fuel, memory and wall clock of this attempt.
    pub limits: Limits,
    /// Mounted contexts by name (the names the job gave).
    pub contexts: Vec<(String, Arc<HeavyContext>)>,
    /// The agent's durable state as of the claim, if any.
    pub state: Option<Vec<u8>>,
    /// Cancelled when the lease is lost or the job cancelled: the instance stops at once.
    pub cancel: CancellationToken,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// `run` returned `Ok` with this output.
    Ok(String),
    /// `run` returned `Err` (`AgentError`), trapped or hit a limit.
    Failed { kind: ErrorKind, message: String },
    /// Stopped through `RunRequest::cancel`.
    Interrupted,
}

/// Everything the worker needs to finalize an attempt.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: RunOutcome,
    /// Fuel burnt (0 with fuel off, or when the run had to be dropped from
    /// outside while parked in a host call).
    pub fuel_used: u64,
    /// Wall-clock time from the start of instantiation to the end.
    pub wall_ms: u64,
    /// `log.write` lines and captured stdout/stderr, bounded.
    pub log: String,
    /// `Some` when the guest called `state.set` and the run succeeded.
    pub new_state: Option<Vec<u8>>,
}

/// Why [`Host::component`] could not give a component.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `fetch` did not know the digest (or the digest is malformed).
    #[error("component {0} not found")]
    NotFound(String),
    /// The component can never run on this host: it fails the admission
    /// checks or compilation under this engine's configuration. Remembered
    /// per digest, so it is not recompiled on every claim.
    #[error("invalid component {0}")]
    Invalid(String),
    /// Fetching or verifying failed (may succeed later).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// One node's Wasm host: the engine, the caches and the tenants' budgets.
/// Shared by every slot of a worker (`Arc<Host>`); all methods take `&self`.
pub struct Host {
    cfg: HostConfig,
    compiler: Arc<cache::Compiler>,
    components: cache::ComponentCache,
    contexts: ContextCache,
    /// Memory in use per tenant on this node (`tenant_memory_budget` each).
    tenants: Mutex<HashMap<String, Arc<budget::TenantBudget>>>,
}

/// Tenants remembered before idle ones (nothing running) are forgotten:
/// stops the map of budgets from growing with every tenant ever seen.
const TENANT_MAP_PRUNE_AT: usize = 1024;

impl Host {
    /// Builds the engine under `cfg` and starts its epoch ticker.
    pub fn new(cfg: HostConfig) -> anyhow::Result<Host> {
        let engine = engine::build(&cfg)?;
        engine::start_ticker(&engine)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Agent::add_to_linker::<_, HasSelf<run::RunState>>(&mut linker, |s| s)?;
        random::shadow(&mut linker)?;
        let compiler = cache::Compiler::new(engine, linker, &cfg)?;
        Ok(Host {
            components: cache::ComponentCache::new(cfg.component_cache_bytes),
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
        };
        self.components.insert(Arc::new(loaded));
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
        self.components.get(&self.compiler, digest, fetch).await
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
        let env = run::RunEnv {
            fuel: self.cfg.fuel,
            max_memory_per_instance: self.cfg.max_memory_per_instance,
            capture_bytes: self.cfg.stdio_capture_bytes,
            tenant: self.tenant_budget(&req.tenant),
        };
        run::run(env, req).await
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

    /// Bytes of linear memory `tenant`'s live instances hold on this node.
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
        map.entry(tenant.to_string())
            .or_insert_with(|| Arc::new(budget::TenantBudget::new(self.cfg.tenant_memory_budget)))
            .clone()
    }
}
