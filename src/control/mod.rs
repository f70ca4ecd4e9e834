//! The control plane: job state, fairness, quotas, credits, leases and
//! recovery, every transition one atomic Lua script (`lua/`).
//!
//! INTERFACE (fixed; the implementation is being written). Callers branch on
//! [`CpError`]; everything else is plain data.

use crate::model::{ErrorKind, Job, JobState, Limits};
use serde::{Deserialize, Serialize};

/// Prices turn usage into integer credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    /// Credits per million units of fuel.
    pub credits_per_mfuel: u64,
    /// Credits per GPU-second of wall time.
    pub credits_per_gpu_second: u64,
    /// How much slot-time one GPU weighs in fair share, relative to a CPU slot.
    pub gpu_slot_weight: u64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            credits_per_mfuel: 1,
            credits_per_gpu_second: 100,
            gpu_slot_weight: 10,
        }
    }
}

/// Deployment-wide control-plane settings. Every process of one deployment
/// must agree on `prefix` and `shards`.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub prefix: String,
    /// Tenants are spread over this many hash-tagged shards.
    pub shards: u32,
    pub lease_ms: u64,
    pub prices: Prices,
    pub idempotency_ttl_s: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Agent states larger than this go to the blob tier.
    pub state_inline_max: usize,
    /// Tenant limits when a tenant is created without them.
    pub default_limits: Limits,
    /// Bytes of an attempt's log kept.
    pub log_max_bytes: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            prefix: "ap".into(),
            shards: 1,
            lease_ms: 10_000,
            prices: Prices::default(),
            idempotency_ttl_s: 24 * 3600,
            retry_base_ms: 500,
            retry_max_ms: 60_000,
            state_inline_max: 64 << 10,
            default_limits: Limits::default(),
            log_max_bytes: 128 << 10,
        }
    }
}

/// `POST /v1/tenants` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TenantSpec {
    pub id: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub credits: i64,
    #[serde(default = "big")]
    pub max_running: u32,
    #[serde(default = "big")]
    pub max_queued: u32,
    #[serde(default)]
    pub max_gpus: u32,
    #[serde(default)]
    pub limits: Option<LimitsPatch>,
}

fn one() -> u32 {
    1
}
fn big() -> u32 {
    1_000_000
}

/// Optional limits (tenant creation and `PATCH`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LimitsPatch {
    pub fuel: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub timeout_ms: Option<u64>,
}

/// `PATCH /v1/tenants/{id}` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TenantPatch {
    pub weight: Option<u32>,
    pub max_running: Option<u32>,
    pub max_queued: Option<u32>,
    pub max_gpus: Option<u32>,
    pub limits: Option<LimitsPatch>,
}

/// `{"balance","reserved"}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credits {
    pub balance: i64,
    pub reserved: i64,
}

/// `GET /v1/tenants/{id}`: config plus live counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TenantInfo {
    pub id: String,
    pub weight: u32,
    pub max_running: u32,
    pub max_queued: u32,
    pub max_gpus: u32,
    pub limits: Limits,
    pub credits: Credits,
    pub running: u32,
    pub queued: u32,
    pub gpus_in_use: u32,
    /// Sum of all grants (may include negative grants).
    pub granted: i64,
    /// Sum of all settled attempt costs.
    pub settled: i64,
}

/// `POST /v1/jobs` body (contract §3 "Job request").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub component: String,
    pub input: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub contexts: Vec<String>,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub fuel: Option<u64>,
    #[serde(default)]
    pub delay_ms: u64,
}

/// A submission after the API resolved names: what the SUBMIT script stores.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitSpec {
    pub component: String,
    pub input: String,
    pub agent_id: Option<String>,
    /// `(name, digest)` of each mounted context, fixed at submission.
    pub contexts: Vec<(String, String)>,
    pub gpus: u32,
    pub max_attempts: u32,
    /// Per-job limits (already checked to be at most the tenant's); `None`
    /// keeps the tenant's value at claim time.
    pub timeout_ms: Option<u64>,
    pub fuel: Option<u64>,
    pub delay_ms: u64,
    /// `Idempotency-Key` header and the sha256 of the request body.
    pub idempotency: Option<(String, String)>,
}

/// What SUBMIT answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: String,
    pub state: JobState,
    /// False when an idempotent replay found the existing job.
    pub created: bool,
}

/// Who holds a job and with which fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub tenant: String,
    pub token: u64,
}

/// A job handed to a worker by CLAIM.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub lease: Lease,
    pub attempt: u32,
    pub component: String,
    pub input: String,
    pub contexts: Vec<(String, String)>,
    pub gpus: u32,
    pub limits: Limits,
    pub agent_id: Option<String>,
    pub state: Option<Vec<u8>>,
    pub state_version: u64,
}

/// How an attempt ended, as the worker reports it to FINALIZE.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Succeeded { output: String },
    Failed { kind: ErrorKind, message: String },
    /// The worker stopped the run because RENEW answered `Cancelled`.
    Cancelled,
}

/// FINALIZE's input.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub outcome: AttemptOutcome,
    pub fuel: u64,
    pub wall_ms: u64,
    pub log: String,
    /// The state the agent set (committed only with success).
    pub new_state: Option<Vec<u8>>,
}

/// What FINALIZE did with the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finalized {
    Succeeded,
    Failed,
    Cancelled,
    /// Back in the delayed queue for another attempt.
    Retrying { delay_ms: u64 },
    /// The agent's state moved on since this attempt read it: runs again.
    StateConflict,
}

/// Errors callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    /// The lease is gone (reaped, finalized or superseded): change nothing.
    #[error("lease lost")]
    LeaseLost,
    /// RENEW: the job was cancelled; stop it and finalize as cancelled.
    #[error("job cancelled")]
    Cancelled,
    #[error("not found")]
    NotFound,
    #[error("tenant already exists")]
    TenantExists,
    #[error("tenant's max_queued reached")]
    QueueFull,
    #[error("credits below the job's reservation")]
    InsufficientCredits,
    #[error("idempotency key reused with another body")]
    IdempotencyConflict,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("internal: {0}")]
    Internal(String),
}

/// Metadata of an uploaded component, per tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ComponentMeta {
    pub digest: String,
    pub size: u64,
    pub created_at: String,
}

/// Metadata of a named context, per tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContextMeta {
    pub name: String,
    pub digest: String,
    pub documents: u64,
    pub dim: u64,
}

/// Handle to the control plane; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    cfg: std::sync::Arc<ControlConfig>,
}

#[allow(unused_variables)]
impl ControlPlane {
    /// Connects to `redis://`, `rediss://`, `redis+unix://` or
    /// `redis+cluster://h:p,h:p`.
    pub async fn connect(url: &str, cfg: ControlConfig) -> Result<Self, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }
    pub async fn ping(&self) -> Result<(), CpError> {
        Err(CpError::Internal("not implemented".into()))
    }

    // --- tenants (admin) ---
    pub async fn create_tenant(&self, spec: &TenantSpec, token_hash: &str) -> Result<(), CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn update_tenant(&self, id: &str, patch: &TenantPatch) -> Result<(), CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// Adds `amount` (may be negative) and answers the new balance.
    pub async fn grant_credits(&self, id: &str, amount: i64) -> Result<i64, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn tenant(&self, id: &str) -> Result<Option<TenantInfo>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// The stored sha256 hex of the tenant's token, for authentication.
    pub async fn tenant_token_hash(&self, id: &str) -> Result<Option<String>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }

    // --- components and contexts ---
    pub async fn put_component(
        &self,
        tenant: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<ComponentMeta, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn component_meta(
        &self,
        tenant: &str,
        digest: &str,
    ) -> Result<Option<ComponentMeta>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn component_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn put_context(
        &self,
        tenant: &str,
        meta: &ContextMeta,
        bytes: &[u8],
    ) -> Result<(), CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn context_meta(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<ContextMeta>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn context_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }

    // --- jobs ---
    pub async fn submit(&self, tenant: &str, spec: &SubmitSpec) -> Result<Submitted, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn job(&self, tenant: &str, id: &str) -> Result<Option<Job>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn job_log(&self, tenant: &str, id: &str) -> Result<Option<String>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// Newest first; `cursor` is the last id of the previous page.
    pub async fn list_jobs(
        &self,
        tenant: &str,
        state: Option<JobState>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<Job>, Option<String>), CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// Queued/delayed → cancelled now; running → cancelled at the next lease check.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<JobState, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }

    // --- workers ---
    /// Up to `max` jobs for worker `worker` with `free_gpus` GPU slots free.
    pub async fn claim(
        &self,
        worker: &str,
        max: u32,
        free_gpus: u32,
    ) -> Result<Vec<Claim>, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// Extends the lease; `LeaseLost` or `Cancelled` tell the worker to stop.
    pub async fn renew(&self, lease: &Lease) -> Result<(), CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    pub async fn finalize(&self, lease: &Lease, finish: &Finish) -> Result<Finalized, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// Hands a claimed job back to the queue uncharged (worker draining).
    pub async fn release(&self, lease: &Lease) -> Result<(), CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// Waits until work may be there (a wake-up signal) or `timeout` passes.
    pub async fn wait_for_work(&self, timeout: std::time::Duration) -> Result<(), CpError> {
        tokio::time::sleep(timeout).await;
        Ok(())
    }

    // --- scheduler ---
    /// Moves due delayed jobs to their queues; answers how many.
    pub async fn promote(&self, batch: u32) -> Result<u32, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
    /// Reclaims expired leases; answers how many.
    pub async fn reap(&self, batch: u32) -> Result<u32, CpError> {
        Err(CpError::Internal("not implemented".into()))
    }
}
