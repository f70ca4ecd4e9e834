//! The Wasm host: tenants' agents as components under per-tenant fuel, memory
//! and wall-clock limits.
//!
//! INTERFACE (fixed; the implementation is being written):
//! - `Host::new(HostConfig)` builds the engine (pooling allocator, fuel, epochs).
//! - `Host::admit(&[u8])` validates an upload and answers its digest.
//! - `Host::component(digest, fetch)` gives a compiled, pre-instantiated
//!   component from the LRU / disk cache, fetching bytes on a miss.
//! - `Host::context(digest, fetch)` gives a shared heavy context.
//! - `Host::run(RunRequest)` runs one attempt and reports what happened.

use crate::context::HeavyContext;
use crate::model::{ErrorKind, Limits};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// Not a component, bad imports/exports, garbage: the message names the problem.
    #[error("{0}")]
    Invalid(String),
}

/// An admitted upload.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
    pub size: usize,
}

/// A compiled component ready to instantiate.
pub struct LoadedComponent {
    _private: (),
}

/// One attempt to run.
pub struct RunRequest {
    pub tenant: String,
    pub job_id: String,
    pub component: Arc<LoadedComponent>,
    pub input: String,
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
    Ok(String),
    Failed {
        kind: ErrorKind,
        message: String,
    },
    /// Stopped through `RunRequest::cancel`.
    Interrupted,
}

/// Everything the worker needs to finalize an attempt.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: RunOutcome,
    pub fuel_used: u64,
    pub wall_ms: u64,
    /// `log.write` lines and captured stdout/stderr, bounded.
    pub log: String,
    /// `Some` when the guest called `state.set`.
    pub new_state: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("component {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub struct Host {
    _private: (),
}

impl Host {
    pub fn new(_cfg: HostConfig) -> anyhow::Result<Host> {
        anyhow::bail!("not implemented")
    }
    pub fn admit(&self, _bytes: &[u8]) -> Result<Admitted, AdmissionError> {
        Err(AdmissionError::Invalid("not implemented".into()))
    }
    pub async fn component<F, Fut>(
        &self,
        _digest: &str,
        _fetch: F,
    ) -> Result<Arc<LoadedComponent>, HostError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<Vec<u8>>>>,
    {
        Err(HostError::Other(anyhow::anyhow!("not implemented")))
    }
    pub async fn context<F, Fut>(
        &self,
        _digest: &str,
        _fetch: F,
    ) -> anyhow::Result<Arc<HeavyContext>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<u8>>>,
    {
        anyhow::bail!("not implemented")
    }
    pub async fn run(&self, _req: RunRequest) -> RunReport {
        RunReport {
            outcome: RunOutcome::Failed {
                kind: ErrorKind::Trap,
                message: "not implemented".into(),
            },
            fuel_used: 0,
            wall_ms: 0,
            log: String::new(),
            new_state: None,
        }
    }
}
