//! The host's public vocabulary: its settings and why it refuses things.
//! A leaf: every other host module may use it, it uses none of them.

use super::limits;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Idle instances kept on this node for reuse (`--warm-instances`): a
    /// run that ended cleanly (its `run` returned) leaves its instance for
    /// the next job of the same tenant, component, mounts and memory limit,
    /// which then skips instantiation. 0 (the default) runs every job on a
    /// fresh instance. A reused instance keeps what the tenant's earlier
    /// jobs left in its memory: opt in only where that is acceptable
    /// between one tenant's jobs. Never shared across tenants. Each idle
    /// instance holds a slot of the instance pool (`max_instances`) and its
    /// memory stays charged to its tenant (dropped when either is needed).
    pub warm_instances: usize,
    /// How long an instance may stay idle before it is dropped.
    pub warm_idle_ttl: Duration,
    /// Bounds of agents' outgoing HTTP requests (`wasi:http`).
    pub egress: EgressLimits,
    /// Models loaded at start and shared by every instance
    /// (`--model NAME=PATH`); none by default.
    pub models: Vec<crate::inference::ModelSpec>,
}

/// Bounds of agents' outgoing HTTP requests on this node (`wasi:http`,
/// sent under each tenant's `allowed_outbound_hosts`). A guest's request
/// options may shorten the timeouts, never lengthen them; none runs past
/// the job's wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressLimits {
    /// Resolving the name and connecting (TLS included).
    pub connect_timeout: Duration,
    /// From the request sent to the response's head.
    pub first_byte_timeout: Duration,
    /// Between two frames of the response's body.
    pub between_bytes_timeout: Duration,
    /// Body bytes one response may carry; past them the guest's read fails
    /// with `HTTP-response-body-size`. (What a job may spend in all is its
    /// grant, `EgressGrant`, set by the control plane's budget.)
    pub max_response_bytes: u64,
    /// Requests one tenant may have in flight on this node (until each
    /// response body is read or dropped).
    pub max_in_flight_per_tenant: u32,
}

impl Default for EgressLimits {
    fn default() -> Self {
        EgressLimits {
            connect_timeout: limits::EGRESS_CONNECT_TIMEOUT,
            first_byte_timeout: limits::EGRESS_FIRST_BYTE_TIMEOUT,
            between_bytes_timeout: limits::EGRESS_BETWEEN_BYTES_TIMEOUT,
            max_response_bytes: limits::EGRESS_MAX_RESPONSE_BYTES,
            max_in_flight_per_tenant: limits::EGRESS_MAX_IN_FLIGHT_PER_TENANT,
        }
    }
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
            warm_instances: 0,
            warm_idle_ttl: limits::WARM_IDLE_TTL,
            egress: EgressLimits::default(),
            models: Vec::new(),
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
    /// It imports `wasi:http/outgoing-handler`.
    pub outbound_http: bool,
    /// It imports `agentplane:agent/inference`.
    pub inference: bool,
}

/// Where and how components are compiled out of process.
#[derive(Debug, Clone)]
pub struct CompileChild {
    /// The `agentplane` binary (it answers [`CHILD_ARG`]).
    pub exe: PathBuf,
    /// Wall clock one compilation may take before it is killed and the
    /// upload refused.
    pub timeout: Duration,
    /// Heap one compilation may use (`RLIMIT_DATA` of the child).
    pub memory_bytes: u64,
}

impl CompileChild {
    /// This very binary as the compile child, with the default bounds.
    pub fn this_binary() -> std::io::Result<CompileChild> {
        Ok(CompileChild {
            exe: std::env::current_exe()?,
            timeout: limits::DEFAULT_COMPILE_TIMEOUT,
            memory_bytes: limits::DEFAULT_COMPILE_MEMORY,
        })
    }
}

/// Why `Host::component` could not give a component.
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
