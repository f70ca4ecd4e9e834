//! The control plane: job state, fairness, quotas, credits, leases and
//! recovery, every transition one atomic Lua script (`lua/`).
//!
//! The Rust side is thin: one typed function per script ([`ControlPlane`]),
//! plain reads for what the API shows, and [`CpError`] for what callers
//! branch on. The key schema is [`keys::KeySpace`], documented in
//! `lua/README.md`.

pub mod audit;
mod conn;
pub mod keys;
pub mod num;
mod quota;
mod retain;
mod scripts;

pub use quota::{
    DEFAULT_MAX_COMPONENT_BYTES, DEFAULT_MAX_CONTEXT_BYTES, DEFAULT_MAX_STATE_BYTES,
    ITEM_OVERHEAD_BYTES, Stored,
};
pub use retain::{LEDGER_FOLD_BATCH, LedgerCheckpoint, Retained};

use crate::model::{ErrorKind, Job, JobError, JobState, Limits, Usage, now_ms, rfc3339_ms};
use conn::{Conn, Target};
use keys::KeySpace;
use redis::{AsyncCommands, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Prices turn usage into integer credits. An attempt is charged
///
/// ```text
/// ceil(fuel * credits_per_mfuel / 10^6)
///   + ceil(wall_ms * (credits_per_slot_second * (1 + gpus * gpu_slot_weight)
///                     + gpus * credits_per_gpu_second) / 1000)
/// ```
///
/// capped at what CLAIM reserved: the same formula with all the job's fuel
/// and its whole timeout (`lua/lib.lua`, `charge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    /// Credits per million units of fuel.
    pub credits_per_mfuel: u64,
    /// Credits per GPU-second of wall time.
    pub credits_per_gpu_second: u64,
    /// How much slot-time one GPU weighs in fair share and in the slot
    /// price, relative to a CPU slot.
    pub gpu_slot_weight: u64,
    /// Credits per slot-second of wall time: capacity is paid for even
    /// when the guest burns no fuel (parked in a host call, sleeping).
    pub credits_per_slot_second: u64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            credits_per_mfuel: 1,
            credits_per_gpu_second: 100,
            gpu_slot_weight: 10,
            credits_per_slot_second: 1,
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
    /// How long finished jobs (with their logs and idempotency keys) and
    /// ledger entries are kept before the scheduler's sweep removes them
    /// (ledger entries are folded into the tenant's checkpoint).
    pub retention_ms: u64,
    /// Node faults (runs a node could not start or finish for reasons of
    /// its own) a job may meet before it fails with `node_fault`. Each one
    /// is uncharged and uncounted; the bound stops a job no node can run
    /// from cycling through the queue forever.
    pub max_node_faults: u32,
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
            retention_ms: 7 * 24 * 3600 * 1000,
            max_node_faults: DEFAULT_MAX_NODE_FAULTS,
        }
    }
}

/// `POST /v1/tenants` body. Unknown fields are refused; every integer is
/// bounded by [`num`] (|n| <= 2^53 - 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub id: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, deserialize_with = "num::i53")]
    pub credits: i64,
    #[serde(default = "big")]
    pub max_running: u32,
    #[serde(default = "big")]
    pub max_queued: u32,
    #[serde(default)]
    pub max_gpus: u32,
    #[serde(default)]
    pub limits: Option<LimitsPatch>,
    /// Bytes of components the tenant may store (default 1 GiB).
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub max_component_bytes: Option<u64>,
    /// Bytes of contexts the tenant may store (default 4 GiB).
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub max_context_bytes: Option<u64>,
    /// Bytes of agent state the tenant may store, all agents together
    /// (default 1 GiB).
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub max_state_bytes: Option<u64>,
}

fn one() -> u32 {
    1
}
fn big() -> u32 {
    1_000_000
}

/// Optional limits (tenant creation and `PATCH`), each at most 2^53 - 1.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub fuel: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub memory_bytes: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub timeout_ms: Option<u64>,
}

/// `PATCH /v1/tenants/{id}` body (unknown fields refused).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    pub weight: Option<u32>,
    pub max_running: Option<u32>,
    pub max_queued: Option<u32>,
    pub max_gpus: Option<u32>,
    pub limits: Option<LimitsPatch>,
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub max_component_bytes: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub max_context_bytes: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub max_state_bytes: Option<u64>,
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
    /// Why the tenant's next queued job is not being handed out, when it
    /// is not: `max_running`, `max_gpus`, `credits` (its reservation is
    /// above the free balance; running jobs will settle, or grant
    /// credits) or `stream_out_of_step`. Absent while eligible or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
    /// Byte quotas and what is stored against them.
    pub storage: Storage,
}

/// A tenant's byte quotas and usage (`GET /v1/tenants/{id}` `storage`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Storage {
    pub max_component_bytes: u64,
    pub max_context_bytes: u64,
    pub max_state_bytes: u64,
    pub component_bytes: u64,
    pub context_bytes: u64,
    pub state_bytes: u64,
}

/// `POST /v1/jobs` body.
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
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u53")]
    pub fuel: Option<u64>,
    #[serde(default, deserialize_with = "num::u53")]
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
    /// The run number: every claim of a job takes the next one, so the
    /// ledger names each run uniquely (not the count toward `max_attempts`).
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
    Succeeded {
        output: String,
    },
    Failed {
        kind: ErrorKind,
        message: String,
    },
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
    Retrying {
        delay_ms: u64,
    },
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
    /// Redis refused a write at its `maxmemory` (OOM). Scripts validate
    /// before they write and Redis refuses a script's first write, so
    /// nothing was half-written.
    #[error("redis is at its maxmemory")]
    StorageFull,
    /// A per-tenant byte quota (`max_component_bytes`, `max_context_bytes`,
    /// `max_state_bytes`) would be exceeded; the message names it.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    #[error("internal: {0}")]
    Internal(String),
    /// Maintenance (PROMOTE, REAP) failed on some shards after trying all
    /// of them; `done` jobs were moved on the others.
    #[error("{done} done; failed on {}", failed.join("; "))]
    Shards { done: u32, failed: Vec<String> },
}

/// The answer of a per-shard maintenance pass: the count, or every
/// shard's failure once all were tried.
fn shards_result(done: u32, failed: Vec<String>) -> Result<u32, CpError> {
    if failed.is_empty() {
        Ok(done)
    } else {
        Err(CpError::Shards { done, failed })
    }
}

/// The command may have run and only its answer was lost: the connection
/// dropped or the answer timed out.
fn answer_lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout()
}

impl From<redis::RedisError> for CpError {
    fn from(e: redis::RedisError) -> Self {
        // `OOM command not allowed when used memory > 'maxmemory'`, also
        // when raised inside a script (then prefixed by the script's name).
        if e.code() == Some("OOM") || e.to_string().contains("OOM command not allowed") {
            CpError::StorageFull
        } else {
            CpError::Redis(e)
        }
    }
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

/// Default of [`ControlConfig::max_node_faults`].
pub const DEFAULT_MAX_NODE_FAULTS: u32 = 5;

/// The largest integer the scripts hold exactly (Lua numbers are doubles):
/// every amount and count stays within ±this.
pub const MAX_EXACT_INT: i64 = (1 << 53) - 1;

/// Bytes of a node-fault message kept on the job.
const FAULT_MESSAGE_MAX: usize = 1024;

/// Attempts a job may lose to agent-state conflicts before it fails: each
/// conflicting attempt did run (and was charged), so this bounds the bill.
const MAX_STATE_CONFLICTS: u32 = 16;

/// Largest page of `list_jobs` (the API answers 400 above it): a page is
/// one pipelined read, so its size bounds what one request costs Redis.
pub const MAX_PAGE: usize = 1_000;

/// Handle to the control plane; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    cfg: Arc<ControlConfig>,
    keys: KeySpace,
    target: Target,
    conn: Conn,
    /// Dedicated connection for blocking waits, opened on first use.
    waiter: Arc<tokio::sync::Mutex<WaitState>>,
}

fn bad(msg: impl Into<String>) -> CpError {
    CpError::Internal(msg.into())
}

fn v_str(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

fn v_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        other => v_str(other).into_bytes(),
    }
}

fn v_u64(v: &Value) -> u64 {
    match v {
        Value::Int(i) => (*i).max(0) as u64,
        other => v_str(other).parse::<f64>().map(|f| f as u64).unwrap_or(0),
    }
}

fn v_i64(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => v_str(other).parse::<f64>().map(|f| f as i64).unwrap_or(0),
    }
}

fn v_arr(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) => a,
        _ => &[],
    }
}

/// `[status, ...]` answers of the scripts.
fn status(v: &Value) -> (String, &[Value]) {
    let a = v_arr(v);
    match a.split_first() {
        Some((s, rest)) => (v_str(s), rest),
        None => (String::new(), &[]),
    }
}

/// An integer the scripts wrote (credits, counters), read exactly: a value
/// that is not plain integer digits is an error, never a silent 0 (Lua's
/// `1e+14` once read as 0 and lost money from the books).
fn exact_int(k: &str, s: Option<&str>) -> Result<i64, CpError> {
    match s {
        None | Some("") => Ok(0),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|v| v.abs() <= MAX_EXACT_INT)
            .ok_or_else(|| bad(format!("`{k}` is not an exact integer: {s:?}"))),
    }
}

fn num(h: &HashMap<String, String>, k: &str) -> i64 {
    h.get(k)
        .and_then(|s| s.parse::<f64>().ok())
        .map(|f| f as i64)
        .unwrap_or(0)
}

fn opt_time(h: &HashMap<String, String>, k: &str) -> Option<String> {
    let ms = num(h, k);
    (ms > 0).then(|| rfc3339_ms(ms as u64))
}

/// sha256 hex, used for idempotency keys and state blobs.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl ControlPlane {
    /// Connects to `redis://`, `rediss://`, `redis+unix://` or
    /// `redis+cluster://h:p,h:p`.
    pub async fn connect(url: &str, cfg: ControlConfig) -> Result<Self, CpError> {
        if cfg.prefix.is_empty() || cfg.prefix.contains(['{', '}', ':']) {
            return Err(CpError::Invalid(
                "prefix must be non-empty without `{`, `}` or `:`".into(),
            ));
        }
        let target = Target::parse(url)?;
        let conn = target.connect().await?;
        Ok(ControlPlane {
            keys: KeySpace::new(&cfg.prefix, cfg.shards),
            cfg: Arc::new(cfg),
            target,
            conn,
            waiter: Arc::new(tokio::sync::Mutex::new(WaitState::default())),
        })
    }

    pub fn config(&self) -> &ControlConfig {
        &self.cfg
    }

    /// The key schema, for tools and tests that inspect Redis directly.
    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Runs a script on `shard`: declares the shard's
    /// [`absent`](KeySpace::absent) key last (lib.lua refuses a call
    /// without it), so a cluster never runs the script while the shard's
    /// slot is split between two nodes.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        inv: &mut redis::ScriptInvocation<'_>,
        shard: u32,
    ) -> Result<T, CpError> {
        inv.key(self.keys.absent(shard));
        Ok(inv.invoke_async(&mut self.conn()).await?)
    }

    fn prices(&self) -> [u64; 4] {
        let p = self.cfg.prices;
        [
            p.credits_per_mfuel,
            p.credits_per_gpu_second,
            p.gpu_slot_weight,
            p.credits_per_slot_second,
        ]
    }

    pub async fn ping(&self) -> Result<(), CpError> {
        // Any shard's key routes a cluster PING to a live node.
        let _: u64 = redis::cmd("EXISTS")
            .arg(self.keys.wake(0))
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    // --- tenants (admin) ---

    fn tenant_fields(limits: Option<&LimitsPatch>, out: &mut Vec<(String, u64)>) {
        if let Some(l) = limits {
            if let Some(v) = l.fuel {
                out.push(("fuel".into(), v));
            }
            if let Some(v) = l.memory_bytes {
                out.push(("memory_bytes".into(), v));
            }
            if let Some(v) = l.timeout_ms {
                out.push(("timeout_ms".into(), v));
            }
        }
    }

    async fn tenant_script(
        &self,
        tenant: &str,
        op: &str,
        extra: &[String],
    ) -> Result<Value, CpError> {
        let mut inv = scripts::TENANT.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.tenant(tenant))
            .arg(op)
            .arg(tenant);
        for p in self.prices() {
            inv.arg(p);
        }
        for e in extra {
            inv.arg(e);
        }
        self.eval(&mut inv, self.keys.shard_of(tenant)).await
    }

    pub async fn create_tenant(&self, spec: &TenantSpec, token_hash: &str) -> Result<(), CpError> {
        if !crate::model::valid_tenant_id(&spec.id) {
            return Err(CpError::Invalid(
                "tenant id must be 1-64 characters of a-z, 0-9, `-` and `_`".into(),
            ));
        }
        if spec.weight == 0 {
            return Err(CpError::Invalid("weight must be at least 1".into()));
        }
        if spec.credits < 0 {
            return Err(CpError::Invalid("credits must not be negative".into()));
        }
        if spec.credits > MAX_EXACT_INT {
            return Err(CpError::Invalid(format!(
                "credits must be at most {MAX_EXACT_INT}"
            )));
        }
        let d = self.cfg.default_limits;
        let mut fields: Vec<(String, u64)> = vec![
            ("weight".into(), spec.weight as u64),
            ("max_running".into(), spec.max_running as u64),
            ("max_queued".into(), spec.max_queued as u64),
            ("max_gpus".into(), spec.max_gpus as u64),
            (
                "max_component_bytes".into(),
                spec.max_component_bytes
                    .unwrap_or(DEFAULT_MAX_COMPONENT_BYTES),
            ),
            (
                "max_context_bytes".into(),
                spec.max_context_bytes.unwrap_or(DEFAULT_MAX_CONTEXT_BYTES),
            ),
            (
                "max_state_bytes".into(),
                spec.max_state_bytes.unwrap_or(DEFAULT_MAX_STATE_BYTES),
            ),
            ("fuel".into(), d.fuel),
            ("memory_bytes".into(), d.memory_bytes),
            ("timeout_ms".into(), d.timeout_ms),
        ];
        Self::tenant_fields(spec.limits.as_ref(), &mut fields);
        let mut extra = vec![token_hash.to_string(), spec.credits.to_string()];
        for (k, v) in fields {
            extra.push(k);
            extra.push(v.to_string());
        }
        let v = self.tenant_script(&spec.id, "create", &extra).await?;
        match status(&v).0.as_str() {
            "ok" => Ok(()),
            "exists" => Err(CpError::TenantExists),
            other => Err(bad(format!("TENANT create answered {other}"))),
        }
    }

    pub async fn update_tenant(&self, id: &str, patch: &TenantPatch) -> Result<(), CpError> {
        if patch.weight == Some(0) {
            return Err(CpError::Invalid("weight must be at least 1".into()));
        }
        let mut fields: Vec<(String, u64)> = Vec::new();
        for (k, v) in [
            ("weight", patch.weight),
            ("max_running", patch.max_running),
            ("max_queued", patch.max_queued),
            ("max_gpus", patch.max_gpus),
        ] {
            if let Some(v) = v {
                fields.push((k.into(), v as u64));
            }
        }
        for (k, v) in [
            ("max_component_bytes", patch.max_component_bytes),
            ("max_context_bytes", patch.max_context_bytes),
            ("max_state_bytes", patch.max_state_bytes),
        ] {
            if let Some(v) = v {
                fields.push((k.into(), v));
            }
        }
        Self::tenant_fields(patch.limits.as_ref(), &mut fields);
        let extra: Vec<String> = fields
            .into_iter()
            .flat_map(|(k, v)| [k, v.to_string()])
            .collect();
        let v = self.tenant_script(id, "update", &extra).await?;
        match status(&v).0.as_str() {
            "ok" => Ok(()),
            "not_found" => Err(CpError::NotFound),
            other => Err(bad(format!("TENANT update answered {other}"))),
        }
    }

    /// Adds `amount` (may be negative) and answers the new balance. A
    /// negative grant may not take the balance below what is reserved.
    pub async fn grant_credits(&self, id: &str, amount: i64) -> Result<i64, CpError> {
        if amount.abs() > MAX_EXACT_INT {
            return Err(CpError::Invalid(format!(
                "amount must be within ±{MAX_EXACT_INT}"
            )));
        }
        let v = self
            .tenant_script(id, "grant", &[amount.to_string()])
            .await?;
        let (s, rest) = status(&v);
        match s.as_str() {
            "ok" => Ok(rest.first().map(v_i64).unwrap_or(0)),
            "not_found" => Err(CpError::NotFound),
            "insufficient" => Err(CpError::InsufficientCredits),
            "out_of_range" => Err(CpError::Invalid(format!(
                "the grant would take the tenant's credits past ±{MAX_EXACT_INT}"
            ))),
            other => Err(bad(format!("TENANT grant answered {other}"))),
        }
    }

    async fn hgetall(&self, key: &str) -> Result<HashMap<String, String>, CpError> {
        Ok(self.conn().hgetall(key).await?)
    }

    pub async fn tenant(&self, id: &str) -> Result<Option<TenantInfo>, CpError> {
        if !crate::model::valid_tenant_id(id) {
            return Ok(None);
        }
        let h = self.hgetall(&self.keys.tenant(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let int = |k: &str| exact_int(k, h.get(k).map(String::as_str));
        let granted = int("granted")?;
        let settled = int("settled")?;
        Ok(Some(TenantInfo {
            id: id.to_string(),
            weight: num(&h, "weight") as u32,
            max_running: num(&h, "max_running") as u32,
            max_queued: num(&h, "max_queued") as u32,
            max_gpus: num(&h, "max_gpus") as u32,
            limits: Limits {
                fuel: num(&h, "fuel") as u64,
                memory_bytes: num(&h, "memory_bytes") as u64,
                timeout_ms: num(&h, "timeout_ms") as u64,
            },
            credits: Credits {
                balance: granted - settled,
                reserved: int("reserved")?,
            },
            running: num(&h, "running") as u32,
            queued: num(&h, "queued") as u32,
            gpus_in_use: num(&h, "gpus") as u32,
            granted,
            settled,
            storage: Storage {
                max_component_bytes: h
                    .get("max_component_bytes")
                    .map_or(DEFAULT_MAX_COMPONENT_BYTES, |_| {
                        num(&h, "max_component_bytes") as u64
                    }),
                max_context_bytes: h
                    .get("max_context_bytes")
                    .map_or(DEFAULT_MAX_CONTEXT_BYTES, |_| {
                        num(&h, "max_context_bytes") as u64
                    }),
                max_state_bytes: h
                    .get("max_state_bytes")
                    .map_or(DEFAULT_MAX_STATE_BYTES, |_| {
                        num(&h, "max_state_bytes") as u64
                    }),
                component_bytes: num(&h, "component_bytes") as u64,
                context_bytes: num(&h, "context_bytes") as u64,
                state_bytes: num(&h, "state_bytes") as u64,
            },
            parked: h
                .get("parked")
                .filter(|p| !p.is_empty() && p.as_str() != "empty")
                .cloned(),
        }))
    }

    /// The stored sha256 hex of the tenant's token, for authentication.
    pub async fn tenant_token_hash(&self, id: &str) -> Result<Option<String>, CpError> {
        if !crate::model::valid_tenant_id(id) {
            return Ok(None);
        }
        Ok(self.conn().hget(self.keys.tenant(id), "token_hash").await?)
    }

    // --- components and contexts ---

    pub async fn put_component(
        &self,
        tenant: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<ComponentMeta, CpError> {
        // The quota first: a refused upload writes nothing; a write that
        // fails gives the charge back.
        let charge = self
            .charge_bytes(tenant, Stored::Component, digest, bytes.len() as u64)
            .await?;
        let write = self.write_component(tenant, digest, bytes).await;
        self.refund_on_err(charge, write).await
    }

    async fn write_component(
        &self,
        tenant: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<ComponentMeta, CpError> {
        let mut c = self.conn();
        // The blob first: metadata must never point at missing bytes.
        let blob = self.keys.blob("comp", digest);
        let _: () = c.set(&blob, bytes).await?;
        let meta = ComponentMeta {
            digest: digest.to_string(),
            size: bytes.len() as u64,
            created_at: rfc3339_ms(now_ms()),
        };
        let key = self.keys.component(tenant, digest);
        let _: () = c
            .hset_multiple(
                &key,
                &[
                    ("size", meta.size.to_string()),
                    ("created_at", meta.created_at.clone()),
                ],
            )
            .await?;
        Ok(meta)
    }

    pub async fn component_meta(
        &self,
        tenant: &str,
        digest: &str,
    ) -> Result<Option<ComponentMeta>, CpError> {
        let h = self.hgetall(&self.keys.component(tenant, digest)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(Some(ComponentMeta {
            digest: digest.to_string(),
            size: num(&h, "size") as u64,
            created_at: h.get("created_at").cloned().unwrap_or_default(),
        }))
    }

    pub async fn component_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, CpError> {
        Ok(self.conn().get(self.keys.blob("comp", digest)).await?)
    }

    pub async fn put_context(
        &self,
        tenant: &str,
        meta: &ContextMeta,
        bytes: &[u8],
    ) -> Result<(), CpError> {
        let charge = self
            .charge_bytes(tenant, Stored::Context, &meta.name, bytes.len() as u64)
            .await?;
        let write = self.write_context(tenant, meta, bytes).await;
        self.refund_on_err(charge, write).await
    }

    async fn write_context(
        &self,
        tenant: &str,
        meta: &ContextMeta,
        bytes: &[u8],
    ) -> Result<(), CpError> {
        let mut c = self.conn();
        let _: () = c.set(self.keys.blob("ctx", &meta.digest), bytes).await?;
        let _: () = c
            .hset_multiple(
                self.keys.context(tenant, &meta.name),
                &[
                    ("digest", meta.digest.clone()),
                    ("documents", meta.documents.to_string()),
                    ("dim", meta.dim.to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn context_meta(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<ContextMeta>, CpError> {
        let h = self.hgetall(&self.keys.context(tenant, name)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(Some(ContextMeta {
            name: name.to_string(),
            digest: h.get("digest").cloned().unwrap_or_default(),
            documents: num(&h, "documents") as u64,
            dim: num(&h, "dim") as u64,
        }))
    }

    pub async fn context_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, CpError> {
        Ok(self.conn().get(self.keys.blob("ctx", digest)).await?)
    }

    // --- jobs ---

    pub async fn submit(&self, tenant: &str, spec: &SubmitSpec) -> Result<Submitted, CpError> {
        if !crate::model::valid_tenant_id(tenant) {
            return Err(CpError::NotFound);
        }
        if spec.max_attempts == 0 {
            return Err(CpError::Invalid("max_attempts must be at least 1".into()));
        }
        let id = ulid::Ulid::new().to_string();
        let (idem_key, body_hash) = match &spec.idempotency {
            Some((k, h)) => (
                self.keys.idempotency(tenant, &sha256_hex(k.as_bytes())),
                h.clone(),
            ),
            None => (self.keys.idempotency(tenant, "-"), String::new()),
        };
        let contexts = serde_json::to_string(&spec.contexts).map_err(|e| bad(e.to_string()))?;
        let mut inv = scripts::SUBMIT.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.tenant(tenant))
            .key(self.keys.job(tenant, &id))
            .key(idem_key)
            .arg(tenant)
            .arg(&id)
            .arg(&spec.component)
            .arg(&spec.input)
            .arg(spec.agent_id.clone().unwrap_or_default())
            .arg(contexts)
            .arg(spec.gpus)
            .arg(spec.max_attempts)
            .arg(spec.timeout_ms.map(|v| v.to_string()).unwrap_or_default())
            .arg(spec.fuel.map(|v| v.to_string()).unwrap_or_default())
            .arg(spec.delay_ms)
            .arg(body_hash)
            .arg(self.idempotency_ttl_s());
        for p in self.prices() {
            inv.arg(p);
        }
        let v: Value = self.eval(&mut inv, self.keys.shard_of(tenant)).await?;
        let (s, rest) = status(&v);
        let state_of = |v: Option<&Value>| {
            v.map(v_str)
                .and_then(|s| s.parse::<JobState>().ok())
                .unwrap_or(JobState::Queued)
        };
        match s.as_str() {
            "created" | "exists" => Ok(Submitted {
                id: rest.first().map(v_str).unwrap_or_default(),
                state: state_of(rest.get(1)),
                created: s == "created",
            }),
            "conflict" => Err(CpError::IdempotencyConflict),
            "no_tenant" => Err(CpError::NotFound),
            "queue_full" => Err(CpError::QueueFull),
            "credits" => Err(CpError::InsufficientCredits),
            other => Err(bad(format!("SUBMIT answered {other}"))),
        }
    }

    fn job_from_hash(id: &str, h: &HashMap<String, String>) -> Option<Job> {
        let state = h.get("state")?.parse::<JobState>().ok()?;
        let kind = h
            .get("ekind")
            .filter(|k| !k.is_empty())
            .and_then(|k| k.parse::<ErrorKind>().ok());
        // A job shows its last error only while it is not succeeded; a
        // retrying (delayed/queued) job shows why its last attempt failed.
        let error = kind
            .filter(|_| state != JobState::Succeeded)
            .map(|kind| JobError {
                kind,
                message: h.get("emsg").cloned().unwrap_or_default(),
            });
        Some(Job {
            id: id.to_string(),
            tenant: h.get("tenant").cloned().unwrap_or_default(),
            state,
            component: h.get("component").cloned().unwrap_or_default(),
            // Attempts that count toward max_attempts; `attempts` in Redis
            // numbers every run (the ledger's run numbers).
            attempts: if h.contains_key("counted") {
                num(h, "counted")
            } else {
                num(h, "attempts")
            } as u32,
            output: (state == JobState::Succeeded)
                .then(|| h.get("output").cloned().unwrap_or_default()),
            error,
            usage: Usage {
                fuel: num(h, "u_fuel") as u64,
                wall_ms: num(h, "u_wall") as u64,
                credits: num(h, "u_credits"),
            },
            created_at: rfc3339_ms(num(h, "created") as u64),
            started_at: opt_time(h, "started"),
            finished_at: opt_time(h, "finished"),
            agent_id: h.get("agent_id").filter(|a| !a.is_empty()).cloned(),
            gpus: num(h, "gpus") as u32,
            max_attempts: num(h, "max_attempts") as u32,
        })
    }

    /// The fields of a job hash that [`Job`] shows, never the input (up to
    /// 1 MiB each: a page of whole records was 105 MB for 100 jobs).
    const JOB_VIEW: [&'static str; 17] = [
        "tenant",
        "state",
        "component",
        "attempts",
        "counted",
        "output",
        "ekind",
        "emsg",
        "u_fuel",
        "u_wall",
        "u_credits",
        "created",
        "started",
        "finished",
        "agent_id",
        "gpus",
        "max_attempts",
    ];

    fn view_cmd(&self, tenant: &str, id: &str) -> redis::Cmd {
        let mut c = redis::cmd("HMGET");
        c.arg(self.keys.job(tenant, id)).arg(&Self::JOB_VIEW[..]);
        c
    }

    fn view_map(vals: Vec<Option<String>>) -> HashMap<String, String> {
        Self::JOB_VIEW
            .iter()
            .zip(vals)
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect()
    }

    /// The tenant's job `id`; `None` when absent or another tenant's.
    pub async fn job(&self, tenant: &str, id: &str) -> Result<Option<Job>, CpError> {
        if !crate::model::valid_tenant_id(tenant) || ulid::Ulid::from_string(id).is_err() {
            return Ok(None);
        }
        let vals: Vec<Option<String>> = self
            .view_cmd(tenant, id)
            .query_async(&mut self.conn())
            .await?;
        let h = Self::view_map(vals);
        if h.get("tenant").map(String::as_str) != Some(tenant) {
            return Ok(None);
        }
        Ok(Self::job_from_hash(id, &h))
    }

    pub async fn job_log(&self, tenant: &str, id: &str) -> Result<Option<String>, CpError> {
        if self.job(tenant, id).await?.is_none() {
            return Ok(None);
        }
        let log: Option<String> = self.conn().get(self.keys.job_log(tenant, id)).await?;
        Ok(Some(log.unwrap_or_default()))
    }

    /// Newest first; `cursor` is the last id of the previous page.
    pub async fn list_jobs(
        &self,
        tenant: &str,
        state: Option<JobState>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<Job>, Option<String>), CpError> {
        if !crate::model::valid_tenant_id(tenant) {
            return Ok((Vec::new(), None));
        }
        if let Some(c) = cursor
            && ulid::Ulid::from_string(c).is_err()
        {
            return Err(CpError::Invalid("cursor is not a job id".into()));
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let index = match state {
            Some(s) => self.keys.jobs_in_state(tenant, s.as_str()),
            None => self.keys.jobs(tenant),
        };
        let max = cursor
            .map(|c| format!("({c}"))
            .unwrap_or_else(|| "+".into());
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&index)
            .arg(&max)
            .arg("-")
            .arg("BYLEX")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .query_async(&mut self.conn())
            .await?;
        let more = ids.len() > limit;
        let ids = &ids[..ids.len().min(limit)];
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.add_command(self.view_cmd(tenant, id));
        }
        let hashes: Vec<HashMap<String, String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
            rows.into_iter().map(Self::view_map).collect()
        };
        let jobs: Vec<Job> = ids
            .iter()
            .zip(hashes.iter())
            .filter_map(|(id, h)| Self::job_from_hash(id, h))
            .collect();
        let next = if more { ids.last().cloned() } else { None };
        Ok((jobs, next))
    }

    /// Queued/delayed → cancelled now; running → cancelled at the next
    /// lease check. Answers the state the job was in.
    pub async fn cancel(&self, tenant: &str, id: &str) -> Result<JobState, CpError> {
        if !crate::model::valid_tenant_id(tenant) || ulid::Ulid::from_string(id).is_err() {
            return Err(CpError::NotFound);
        }
        let mut inv = scripts::CANCEL.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.job(tenant, id))
            .arg(tenant)
            .arg(id);
        for p in self.prices() {
            inv.arg(p);
        }
        let v: Value = self.eval(&mut inv, self.keys.shard_of(tenant)).await?;
        let (s, rest) = status(&v);
        match s.as_str() {
            "ok" => rest
                .first()
                .map(v_str)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("CANCEL answered no state")),
            "not_found" => Err(CpError::NotFound),
            other => Err(bad(format!("CANCEL answered {other}"))),
        }
    }

    // --- workers ---

    /// Up to `max` jobs for worker `worker` with `free_gpus` GPU slots free,
    /// taken from the shards in turn starting at a random one (so workers
    /// spread over shards and none is favoured).
    ///
    /// Every job CLAIM leased is in the answer or already handed back: a
    /// shard whose CLAIM fails does not stop the others (its error is
    /// answered only when no shard gave a job, so the worker backs off),
    /// and a job whose agent state cannot be read fails alone (see
    /// `claim_shard`). Dropping a leased job would burn an attempt and end
    /// it `lease_expired` without ever running.
    pub async fn claim(
        &self,
        worker: &str,
        max: u32,
        free_gpus: u32,
    ) -> Result<Vec<Claim>, CpError> {
        let shards = self.keys.shards();
        let start = rand::random::<u32>() % shards;
        let mut out = Vec::new();
        let mut gpus_left = free_gpus;
        let mut first_err = None;
        for i in 0..shards {
            if out.len() as u32 >= max {
                break;
            }
            let shard = (start + i) % shards;
            let got = match self
                .claim_shard(shard, worker, max - out.len() as u32, gpus_left)
                .await
            {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(shard, error = %e, "CLAIM failed on a shard; trying the others");
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            for c in got {
                gpus_left = gpus_left.saturating_sub(c.gpus);
                out.push(c);
            }
        }
        match first_err {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// A claimed job that cannot be handed to a run: its attempt fails as
    /// `agent_error` with `why`, uncharged (no fuel, no wall time), and
    /// retries with backoff up to `max_attempts` like any agent error (a
    /// state pointer read during a concurrent commit heals on the retry).
    /// If even FINALIZE fails, RELEASE is tried; failing both, the lease
    /// runs out and the reaper takes the job back.
    async fn fail_claimed(&self, lease: &Lease, why: String) {
        tracing::warn!(job = %lease.job_id, tenant = %lease.tenant, error = %why, "claimed job cannot run");
        let finish = Finish {
            outcome: AttemptOutcome::Failed {
                kind: ErrorKind::AgentError,
                message: why,
            },
            fuel: 0,
            wall_ms: 0,
            log: String::new(),
            new_state: None,
        };
        if let Err(e) = self.finalize(lease, &finish).await {
            tracing::warn!(job = %lease.job_id, error = %e, "FINALIZE of an unrunnable claim failed; releasing");
            if let Err(e) = self.release(lease).await {
                tracing::warn!(job = %lease.job_id, error = %e, "RELEASE failed too; the reaper will take it back");
            }
        }
    }

    async fn claim_shard(
        &self,
        shard: u32,
        worker: &str,
        max: u32,
        free_gpus: u32,
    ) -> Result<Vec<Claim>, CpError> {
        // A call whose answer is lost (the connection drops, or the answer
        // times out, after the script ran) leased jobs this worker never
        // heard of. It is retried under the same claim id, and CLAIM then
        // answers those jobs again instead of leasing more, within half a
        // lease (the jobs' leases are renewed by the retry).
        let cid = ulid::Ulid::new().to_string();
        let deadline = std::time::Instant::now() + Duration::from_millis(self.cfg.lease_ms / 2);
        let mut step = Duration::from_millis(20);
        let v: Value = loop {
            let mut inv = scripts::CLAIM.prepare_invoke();
            inv.key(self.keys.anchor(shard))
                .arg(worker)
                .arg(max)
                .arg(free_gpus)
                .arg(self.cfg.lease_ms);
            for p in self.prices() {
                inv.arg(p);
            }
            inv.arg(&cid);
            match self.eval(&mut inv, shard).await {
                Ok(v) => break v,
                Err(CpError::Redis(e))
                    if answer_lost(&e) && std::time::Instant::now() + step < deadline =>
                {
                    tracing::warn!(shard, error = %e, "CLAIM answer lost; asking again for the same claim");
                    tokio::time::sleep(step).await;
                    step = (step * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        };
        let mut out = Vec::new();
        // From here on every record is a leased job: none may be dropped
        // with a `?` (see `claim`).
        for c in v_arr(&v) {
            let f = v_arr(c);
            let lease = Lease {
                job_id: f.first().map(v_str).unwrap_or_default(),
                tenant: f.get(1).map(v_str).unwrap_or_default(),
                token: f.get(2).map(v_u64).unwrap_or_default(),
            };
            if f.len() < 15 {
                if !lease.job_id.is_empty() {
                    self.fail_claimed(&lease, "CLAIM answered a short record".into())
                        .await;
                }
                continue;
            }
            let contexts: Vec<(String, String)> =
                serde_json::from_str(&v_str(&f[6])).unwrap_or_default();
            let agent_id = Some(v_str(&f[11])).filter(|a| !a.is_empty());
            let inline = v_bytes(&f[12]);
            let ptr = v_str(&f[13]);
            let state = if !ptr.is_empty() {
                let blob: Result<Option<Vec<u8>>, _> =
                    self.conn().get(self.keys.blob("state", &ptr)).await;
                match blob {
                    Ok(Some(b)) => Some(b),
                    Ok(None) => {
                        let why = format!("agent state blob {ptr} is missing");
                        self.fail_claimed(&lease, why).await;
                        continue;
                    }
                    Err(e) => {
                        let why = format!("agent state blob {ptr} could not be read: {e}");
                        self.fail_claimed(&lease, why).await;
                        continue;
                    }
                }
            } else if agent_id.is_some() && v_u64(&f[14]) > 0 {
                Some(inline)
            } else {
                None
            };
            out.push(Claim {
                lease,
                attempt: v_u64(&f[3]) as u32,
                component: v_str(&f[4]),
                input: v_str(&f[5]),
                contexts,
                gpus: v_u64(&f[7]) as u32,
                limits: Limits {
                    fuel: v_u64(&f[8]),
                    memory_bytes: v_u64(&f[9]),
                    timeout_ms: v_u64(&f[10]),
                },
                agent_id,
                state,
                state_version: v_u64(&f[14]),
            });
        }
        Ok(out)
    }

    /// Extends the lease; `LeaseLost` or `Cancelled` tell the worker to stop.
    pub async fn renew(&self, lease: &Lease) -> Result<(), CpError> {
        let mut inv = scripts::RENEW.key(self.keys.tenant_anchor(&lease.tenant));
        inv.key(self.keys.job(&lease.tenant, &lease.job_id))
            .arg(&lease.job_id)
            .arg(lease.token)
            .arg(self.cfg.lease_ms);
        let v: Value = self
            .eval(&mut inv, self.keys.shard_of(&lease.tenant))
            .await?;
        match status(&v).0.as_str() {
            "ok" => Ok(()),
            "lost" => Err(CpError::LeaseLost),
            "cancelled" => Err(CpError::Cancelled),
            other => Err(bad(format!("RENEW answered {other}"))),
        }
    }

    pub async fn finalize(&self, lease: &Lease, finish: &Finish) -> Result<Finalized, CpError> {
        // Over `max_state_bytes`, the attempt fails and no state is written.
        let (over_quota, charge) = self.charge_state(lease, finish).await?;
        let finish = over_quota.as_ref().unwrap_or(finish);
        let done = self.finalize_script(lease, finish).await;
        // A state FINALIZE did not commit (lost, conflict, cancel wins) is
        // not kept counted; any other error leaves it unknown (the script
        // may have run), so the charge stays.
        let committed = matches!(done, Ok(Finalized::Succeeded)) || done.is_err();
        if let Some(charge) = charge
            && (!committed || matches!(done, Err(CpError::LeaseLost)))
        {
            // The job's outcome stands either way: a failed refund is logged.
            if let Err(e) = self.refund_bytes(&charge).await {
                tracing::warn!(error = %e, "byte quota refund failed");
            }
        }
        done
    }

    async fn finalize_script(&self, lease: &Lease, finish: &Finish) -> Result<Finalized, CpError> {
        let (outcome, kind, text) = match &finish.outcome {
            AttemptOutcome::Succeeded { output } => ("ok", "", output.as_str()),
            AttemptOutcome::Failed { kind, message } => ("failed", kind.as_str(), message.as_str()),
            AttemptOutcome::Cancelled => ("cancelled", "", ""),
        };
        if matches!(kind, "lease_expired" | "cancelled" | "unschedulable") {
            return Err(CpError::Invalid(format!(
                "`{kind}` is decided by the control plane, not reported by a worker"
            )));
        }
        // Large states go to their own key, written by the script itself
        // with the commit (and the superseded version deleted in the same
        // step): nothing is written for a state that loses its race.
        let (smode, svalue): (&str, &[u8]) = match (&finish.new_state, &finish.outcome) {
            (Some(s), AttemptOutcome::Succeeded { .. }) if s.len() > self.cfg.state_inline_max => {
                ("blob", s)
            }
            (Some(s), AttemptOutcome::Succeeded { .. }) => ("inline", s),
            _ => ("none", &[]),
        };
        let log = truncate_utf8(&finish.log, self.cfg.log_max_bytes);
        let mut inv = scripts::FINALIZE.prepare_invoke();
        inv.key(self.keys.tenant_anchor(&lease.tenant))
            .key(self.keys.job(&lease.tenant, &lease.job_id))
            .arg(&lease.job_id)
            .arg(lease.token)
            .arg(outcome)
            .arg(kind)
            .arg(text)
            .arg(finish.fuel)
            .arg(finish.wall_ms)
            .arg(log)
            .arg(smode)
            .arg(svalue)
            .arg(self.cfg.retry_base_ms)
            .arg(self.cfg.retry_max_ms)
            .arg(rand::random::<u32>() % 1000)
            .arg(MAX_STATE_CONFLICTS);
        for p in self.prices() {
            inv.arg(p);
        }
        inv.arg(self.cfg.max_node_faults);
        let v: Value = self
            .eval(&mut inv, self.keys.shard_of(&lease.tenant))
            .await?;
        let (s, rest) = status(&v);
        match s.as_str() {
            "succeeded" => Ok(Finalized::Succeeded),
            "failed" => Ok(Finalized::Failed),
            "cancelled" => Ok(Finalized::Cancelled),
            "retry" => Ok(Finalized::Retrying {
                delay_ms: rest.first().map(v_u64).unwrap_or(0),
            }),
            "conflict" => Ok(Finalized::StateConflict),
            "lost" => Err(CpError::LeaseLost),
            other => Err(bad(format!("FINALIZE answered {other}"))),
        }
    }

    /// Hands a claimed job back to the queue uncharged (worker draining).
    /// Unbounded: draining is the operator's doing, never the job's.
    pub async fn release(&self, lease: &Lease) -> Result<(), CpError> {
        match self.release_script(lease, "drain", "").await? {
            Finalized::Failed => Err(bad("RELEASE failed a drained job")),
            _ => Ok(()),
        }
    }

    /// Hands back a job the node could not start (a node fault: a
    /// component or context it could not load, a failure of its own).
    /// Uncharged and not counted toward `max_attempts`; the job runs again
    /// after a backoff, until it has met `max_node_faults` of them: then it
    /// fails with `node_fault` (answered as [`Finalized::Failed`]).
    pub async fn release_fault(&self, lease: &Lease, message: &str) -> Result<Finalized, CpError> {
        self.release_script(lease, "fault", truncate_utf8(message, FAULT_MESSAGE_MAX))
            .await
    }

    async fn release_script(
        &self,
        lease: &Lease,
        mode: &str,
        message: &str,
    ) -> Result<Finalized, CpError> {
        let mut inv = scripts::RELEASE.prepare_invoke();
        inv.key(self.keys.tenant_anchor(&lease.tenant))
            .key(self.keys.job(&lease.tenant, &lease.job_id))
            .arg(&lease.job_id)
            .arg(lease.token);
        for p in self.prices() {
            inv.arg(p);
        }
        inv.arg(mode)
            .arg(message)
            .arg(self.cfg.max_node_faults)
            .arg(self.cfg.retry_base_ms)
            .arg(self.cfg.retry_max_ms)
            .arg(rand::random::<u32>() % 1000);
        let v: Value = self
            .eval(&mut inv, self.keys.shard_of(&lease.tenant))
            .await?;
        let (s, rest) = status(&v);
        match s.as_str() {
            // Back in the ready queue at once.
            "ok" => Ok(Finalized::Retrying { delay_ms: 0 }),
            "retry" => Ok(Finalized::Retrying {
                delay_ms: rest.first().map(v_u64).unwrap_or(0),
            }),
            "failed" => Ok(Finalized::Failed),
            "cancelled" => Ok(Finalized::Cancelled),
            "lost" => Err(CpError::LeaseLost),
            other => Err(bad(format!("RELEASE answered {other}"))),
        }
    }

    /// Waits until work may be there (a wake-up signal on a shard's list)
    /// or `timeout` passes. A lost signal costs at most `timeout`.
    ///
    /// Cancellation-safe: the BLPOP runs in its own task that holds the
    /// wait connection, so a caller that stops waiting (a `select!` whose
    /// other branch won) neither loses a signal the server already handed
    /// over nor leaves a blocked BLPOP queued ahead of the next one on the
    /// same connection; the next call finds the signal and returns at once.
    pub async fn wait_for_work(&self, timeout: Duration) -> Result<(), CpError> {
        let mut st = self.waiter.clone().lock_owned().await;
        if std::mem::take(&mut st.woken) {
            return Ok(());
        }
        if st.conn.is_none() {
            st.conn = Some(self.target.connect_blocking(timeout).await?);
        }
        // BLPOP takes one slot's keys on a cluster: wait on one shard, picked
        // at random, and let the timeout cover the others.
        let key = self.keys.wake(rand::random::<u32>() % self.keys.shards());
        let secs = timeout.as_secs_f64().max(0.01);
        let task = tokio::spawn(async move {
            let Some(conn) = st.conn.as_mut() else {
                return Ok(());
            };
            let r: redis::RedisResult<Option<(String, String)>> = redis::cmd("BLPOP")
                .arg(key)
                .arg(secs)
                .query_async(conn)
                .await;
            match r {
                Ok(popped) => {
                    st.woken = popped.is_some();
                    Ok(())
                }
                Err(e) => {
                    st.conn = None;
                    Err(e)
                }
            }
        });
        match task.await {
            Ok(r) => {
                // This caller saw the answer: the signal is consumed.
                self.waiter.lock().await.woken = false;
                Ok(r?)
            }
            Err(e) => Err(CpError::Internal(format!("wake-up wait task: {e}"))),
        }
    }

    // --- scheduler ---

    /// Moves due delayed jobs to their queues on every shard; answers how
    /// many. A failing shard does not stop the others: every shard is tried,
    /// then the failures are answered together ([`CpError::Shards`]).
    pub async fn promote(&self, batch: u32) -> Result<u32, CpError> {
        let mut total = 0;
        let mut failed = Vec::new();
        for shard in 0..self.keys.shards() {
            let mut inv = scripts::PROMOTE.prepare_invoke();
            inv.key(self.keys.anchor(shard)).arg(batch.max(1));
            for p in self.prices() {
                inv.arg(p);
            }
            match self.eval::<u32>(&mut inv, shard).await {
                Ok(n) => total += n,
                Err(e) => failed.push(format!("shard {shard}: {e}")),
            }
        }
        shards_result(total, failed)
    }

    /// Reclaims expired leases on every shard; answers how many. Like
    /// [`promote`](Self::promote), a failing shard does not stop the others.
    pub async fn reap(&self, batch: u32) -> Result<u32, CpError> {
        let mut total = 0;
        let mut failed = Vec::new();
        for shard in 0..self.keys.shards() {
            let mut inv = scripts::REAP.prepare_invoke();
            inv.key(self.keys.anchor(shard))
                .arg(batch.max(1))
                .arg(self.cfg.retry_base_ms)
                .arg(self.cfg.retry_max_ms)
                .arg(rand::random::<u32>() % 1000);
            for p in self.prices() {
                inv.arg(p);
            }
            match self.eval::<u32>(&mut inv, shard).await {
                Ok(n) => total += n,
                Err(e) => failed.push(format!("shard {shard}: {e}")),
            }
        }
        shards_result(total, failed)
    }

    /// Consumers and pending (delivered, unacknowledged) entries of the
    /// tenant's ready-queue consumer group, for operators and tests.
    pub async fn queue_group(&self, tenant: &str) -> Result<(usize, usize), CpError> {
        let info: redis::streams::StreamInfoGroupsReply =
            self.conn().xinfo_groups(self.keys.queue(tenant)).await?;
        Ok(info
            .groups
            .first()
            .map(|g| (g.consumers, g.pending))
            .unwrap_or((0, 0)))
    }

    /// The tenant's remaining credit ledger, oldest first: `(op, job,
    /// attempt, amount)`. Entries older than the retention are folded into
    /// [`ControlPlane::ledger_checkpoint`].
    pub async fn ledger(&self, tenant: &str) -> Result<Vec<LedgerEntry>, CpError> {
        let entries: redis::streams::StreamRangeReply =
            self.conn().xrange_all(self.keys.ledger(tenant)).await?;
        entries
            .ids
            .into_iter()
            .map(|e| {
                let get = |k: &str| e.map.get(k).map(v_str).unwrap_or_default();
                let attempt = exact_int("attempt", Some(&get("attempt")))?;
                Ok(LedgerEntry {
                    op: get("op"),
                    job: get("job"),
                    attempt: u32::try_from(attempt)
                        .map_err(|_| bad(format!("ledger attempt {attempt} out of range")))?,
                    amount: exact_int("amount", Some(&get("amount")))?,
                })
            })
            .collect()
    }
}

/// The blocking wake-up connection and whether a signal it received is
/// still unconsumed (its waiter went away before reading it).
#[derive(Default)]
struct WaitState {
    conn: Option<Conn>,
    woken: bool,
}

/// One entry of a tenant's credit ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    /// `grant`, `reserve`, `settle` or `release`.
    pub op: String,
    pub job: String,
    pub attempt: u32,
    pub amount: i64,
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_integers_or_a_loud_error() {
        assert_eq!(exact_int("a", None).unwrap(), 0);
        assert_eq!(exact_int("a", Some("")).unwrap(), 0);
        assert_eq!(
            exact_int("a", Some("9007199254740991")).unwrap(),
            MAX_EXACT_INT
        );
        assert_eq!(exact_int("a", Some("-42")).unwrap(), -42);
        // What Lua's tostring wrote for 10^14, and what was once read as 0.
        for bad in [
            "1e+14",
            "1.2345678901234e+14",
            "12.5",
            "9007199254740992",
            "x",
        ] {
            assert!(exact_int("amount", Some(bad)).is_err(), "{bad}");
        }
    }
}
