//! [`CpError`]: what callers of the control plane branch on.

/// Errors callers branch on. `Clone`: one error of a batched call (a
/// FINALIZE of several attempts) is every caller's, kind and all.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// RETRY: only a failed job runs again; the job is in this state.
    #[error("the job is {0}, not failed: only a failed job can be retried")]
    NotFailed(crate::model::JobState),
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

/// The command may have run and only its answer was lost: the connection
/// dropped or the answer timed out.
pub(super) fn answer_lost(e: &redis::RedisError) -> bool {
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
