//! Retention: finished jobs (with their logs, index entries and
//! idempotency keys) and ledger entries older than `retention_ms` are
//! removed by bounded sweeps the scheduler runs (`lua/retain.lua`); the
//! ledger's folded amounts are kept as a per-tenant checkpoint, so balances
//! stay exactly equal to checkpoint + remaining entries.

use super::limits::LEDGER_FOLD_BATCH;
use super::reply::Reply;
use super::{ControlPlane, CpError, scripts};
use crate::model::TenantId;
use redis::Value;
use serde::Serialize;

/// Sums of the ledger entries folded away, up to stream id `id` (empty when
/// nothing was folded yet). `granted = grant + Σ grant entries`, likewise
/// for `settled`; `reserved = (reserve + Σ reserve) − (settle + Σ settle)
/// − (release + Σ release)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LedgerCheckpoint {
    pub id: String,
    pub grant: i64,
    pub reserve: i64,
    pub settle: i64,
    pub release: i64,
}

/// What one sweep over every shard removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retained {
    /// Finished jobs removed (with their logs and index entries).
    pub jobs: u32,
    /// Ledger entries folded into checkpoints.
    pub ledger_entries: u32,
}

/// ARGV of `lua/retain.lua`, in its header's order.
struct RetainArgs {
    batch: u32,
    retention_ms: u64,
    fold_batch: u32,
}

impl RetainArgs {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.batch)
            .arg(self.retention_ms)
            .arg(self.fold_batch);
    }
}

impl ControlPlane {
    /// Removes up to `batch` expired finished jobs per shard and folds old
    /// ledger entries; answers how many jobs went. A failing shard is
    /// logged and skipped: the others are still swept.
    pub async fn retain(&self, batch: u32) -> Result<u32, CpError> {
        Ok(self.retain_all(batch).await?.jobs)
    }

    /// [`ControlPlane::retain`] with both counts. Errs only when every
    /// shard failed.
    pub async fn retain_all(&self, batch: u32) -> Result<Retained, CpError> {
        let mut total = Retained::default();
        let mut last_err = None;
        let mut ok = false;
        for shard in 0..self.keys.shards() {
            let mut inv = scripts::RETAIN.key(self.keys.anchor(shard));
            RetainArgs {
                batch: batch.max(1),
                retention_ms: self.cfg.retention_ms,
                fold_batch: LEDGER_FOLD_BATCH,
            }
            .write(&mut inv);
            let v: Result<Value, _> = self.eval(&mut inv, shard).await;
            match v {
                Ok(v) => {
                    ok = true;
                    let mut r = Reply::new("RETAIN", &v)?;
                    total.jobs += r.uint::<u32>("jobs removed")?;
                    total.ledger_entries += r.uint::<u32>("ledger entries folded")?;
                    r.end()?;
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "retention sweep failed on a shard");
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            Some(e) if !ok => Err(e),
            _ => Ok(total),
        }
    }

    /// The tenant's ledger checkpoint (all zero before the first fold).
    pub async fn ledger_checkpoint(&self, tenant: &TenantId) -> Result<LedgerCheckpoint, CpError> {
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.tenant(tenant))
            .arg(&["ck_id", "ck_grant", "ck_reserve", "ck_settle", "ck_release"])
            .query_async(&mut self.conn())
            .await?;
        let num = |i: usize| {
            v.get(i)
                .cloned()
                .flatten()
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(0)
        };
        Ok(LedgerCheckpoint {
            id: v.first().cloned().flatten().unwrap_or_default(),
            grant: num(1),
            reserve: num(2),
            settle: num(3),
            release: num(4),
        })
    }

    /// The idempotency TTL SUBMIT uses: never longer than the retention, so
    /// a key never outlives the job it names.
    pub(super) fn idempotency_ttl_s(&self) -> u64 {
        self.cfg
            .idempotency_ttl_s
            .min(self.cfg.retention_ms.div_ceil(1000))
            .max(1)
    }
}
