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

mod admin;
mod blobs;
mod cancel;
mod claim;
mod config;
mod error;
mod jobs;
mod lease;
mod maintenance;
mod reply;
mod report;
mod submit;
mod tenant;
mod wake;

pub use admin::TenantRow;
pub use blobs::{ComponentMeta, ContextMeta};
pub use claim::{Claim, Lease};
pub use config::{ControlConfig, Prices};
pub use error::CpError;
use error::answer_lost;
pub use jobs::LedgerEntry;
pub use lease::{AttemptOutcome, Finalized, Finish, truncate_utf8};
use reply::*;
pub use report::{LedgerPage, LedgerRow, UsageBucket, UsageReport};
pub use submit::{JobRequest, SubmitSpec, Submitted};
use wake::WaitState;

pub use tenant::{Credits, LimitsPatch, Storage, TenantInfo, TenantPatch, TenantSpec};

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
