//! The control plane: job state, fairness, quotas, credits, leases and
//! recovery, every transition one atomic Lua script (`lua/`).
//!
//! The Rust side is thin: one typed function per script ([`ControlPlane`]),
//! plain reads for what the API shows, and [`CpError`] for what callers
//! branch on. The key schema is [`keys::KeySpace`], documented in
//! `lua/README.md`.
//!
//! # Layout
//! One file per script or family, beside the script it drives:
//! - `tenant.rs` (`tenant.lua`): create, patch, grant credits, read.
//! - `submit.rs` (`submit.lua`), `cancel.rs` (`cancel.lua`).
//! - `claim.rs` (`claim.lua`): fair claims across shards, a lost answer
//!   asked again under the same claim id.
//! - `lease.rs` (`renew.lua`, `finalize.lua`, `release.lua`); `log.rs`
//!   (`log.lua`): an attempt's log stored while it runs.
//! - `retry.rs` (`retry.lua`): a failed job back in its queue.
//! - `maintenance.rs` (`promote.lua`, `reap.lua`), `retain.rs`
//!   (`retain.lua`), `quota.rs` (`usage.lua`).
//! - `jobs.rs`: reads for the API (jobs, logs, lists, the ledger);
//!   `blobs.rs`: components and contexts; `wake.rs`: waking idle workers.
//! - `reply.rs`: the strict reader of script answers (a cursor that names
//!   the script and field of anything malformed) and the status words;
//!   `scripts.rs`: loading, and naming `lua/<file>:<line>` in Lua errors.
//! - `config.rs`, `limits.rs` (every bound and default, once), `error.rs`,
//!   `conn.rs` (one connection type over Redis and Redis Cluster, with the
//!   retries of a moving slot), `keys.rs`, `num.rs` (the 2^53 − 1 bound on
//!   JSON integers), `audit.rs` (`agentplane audit`).
//!
//! Each script's `…Args` writes its ARGV in the order the script's header
//! documents, and every call goes through `ControlPlane::eval`, which
//! declares the shard's never-existing `absent` key last so that no script
//! runs while the shard's slot migrates.

pub mod audit;
mod conn;
pub mod keys;
pub use crate::num;
mod quota;
mod retain;
mod scripts;

pub mod limits;

mod admin;
mod blobs;
mod cancel;
mod claim;
mod config;
mod error;
mod hooks;
mod jobs;
mod lease;
mod log;
mod maintenance;
mod reply;
mod report;
mod retry;
mod secrets;
mod submit;
mod tenant;
mod wake;

pub use admin::TenantRow;
pub use blobs::{ComponentMeta, ContextMeta, Imports};
pub use claim::{Claim, Lease};
pub use config::{ControlConfig, EgressBudget, Prices};
pub use error::CpError;
use error::answer_lost;
pub use hooks::{DueHook, HookOutcome};
pub use jobs::LedgerEntry;
pub use lease::{AttemptOutcome, Finalized, Finish, HttpUse, NextClaim, Settled, truncate_utf8};
pub use log::{LogStored, LogTail};
use reply::*;
pub use report::{LedgerPage, LedgerRow, UsageBucket, UsageReport};
pub use secrets::SecretInfo;
pub use submit::{SubmitSpec, Submitted};
use wake::WaitState;

pub use crate::model::{LimitsPatch, TenantPatch, TenantSpec};
pub use tenant::{Credits, Storage, TenantInfo};

pub use limits::*;
pub use quota::Stored;
pub use retain::{LedgerCheckpoint, Retained};

use crate::model::{
    Callback, ErrorKind, Job, JobError, JobState, Limits, TenantId, Usage, now_ms, rfc3339_ms,
};
use conn::{Conn, Target};
use keys::KeySpace;
use redis::{AsyncCommands, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The arguments of lib.lua's one retry rule (`retry_or_fail`, `backoff`),
/// written as three ARGV in this order by every script that retries:
/// base delay, longest delay, jitter in 0..999.
#[derive(Debug, Clone, Copy)]
struct Retry {
    base_ms: u64,
    max_ms: u64,
    jitter: u32,
}

impl Retry {
    fn write(&self, inv: &mut scripts::Invocation) {
        inv.arg(self.base_ms).arg(self.max_ms).arg(self.jitter);
    }
}

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
        inv: &mut scripts::Invocation,
        shard: u32,
    ) -> Result<T, CpError> {
        inv.key(self.keys.absent(shard));
        match inv.invoke_async(&mut self.conn()).await {
            Ok(v) => Ok(v),
            Err(e) => match CpError::from(e) {
                // A Lua runtime error: name the file and line to open.
                CpError::Redis(e) => Err(scripts::locate(&e.to_string())
                    .map(CpError::Internal)
                    .unwrap_or(CpError::Redis(e))),
                other => Err(other),
            },
        }
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

    /// Credits an attempt that can make outgoing HTTP requests reserves
    /// for them: the price of the whole egress budget.
    fn http_reserve(&self) -> u64 {
        let b = self.cfg.egress;
        self.cfg.prices.http_cost(
            u64::from(b.requests_per_job),
            b.kib_per_job.saturating_mul(1024),
        )
    }

    /// What a claimed job of this deployment may spend on outgoing HTTP
    /// requests: the egress budget, as the host enforces it.
    pub fn egress_budget(&self) -> EgressBudget {
        self.cfg.egress
    }

    /// The retry rule's arguments for this call (a fresh jitter each time).
    fn retry(&self) -> Retry {
        Retry {
            base_ms: self.cfg.retry_base_ms,
            max_ms: self.cfg.retry_max_ms,
            jitter: rand::random::<u32>() % 1000,
        }
    }

    pub async fn ping(&self) -> Result<(), CpError> {
        // Any shard's key routes a cluster PING to a live node.
        let _: u64 = redis::cmd("EXISTS")
            .arg(self.keys.wake(0))
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn hgetall(&self, key: &str) -> Result<HashMap<String, String>, CpError> {
        Ok(self.conn().hgetall(key).await?)
    }
}
