//! The two tasks beside each run, both fenced by its lease: the renewal
//! of the lease, and the store of the agent's log lines while it runs.

use super::decide::Verdict;
use crate::control::{ControlPlane, CpError, Lease, LogStored};
use crate::host::LiveLog;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Renews `lease` every `lease/3` until `stop`; on `LeaseLost` or
/// `Cancelled` cancels `run` and says which. If Redis cannot be reached for
/// a whole lease, the lease has expired for sure: treated as lost.
pub(super) async fn renew_loop(
    control: ControlPlane,
    lease: Lease,
    run: CancellationToken,
    stop: CancellationToken,
) -> Verdict {
    let lease_len = Duration::from_millis(control.config().lease_ms.max(3));
    let period = lease_len / 3;
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return Verdict::Held,
        }
        match control.renew(&lease).await {
            Ok(()) => {
                last_ok = Instant::now();
                metrics::counter!("agentplane_lease_renewals_total").increment(1);
            }
            Err(CpError::LeaseLost) => {
                metrics::counter!("agentplane_lease_lost_total").increment(1);
                tracing::warn!(job = %lease.job_id, "lease lost: stopping the run");
                run.cancel();
                return Verdict::Lost;
            }
            Err(CpError::Cancelled) => {
                tracing::info!(job = %lease.job_id, "job cancelled: stopping the run");
                run.cancel();
                return Verdict::Cancelled;
            }
            Err(e) => {
                tracing::warn!(job = %lease.job_id, error = %e, "renew failed");
                if last_ok.elapsed() >= lease_len {
                    metrics::counter!("agentplane_lease_lost_total").increment(1);
                    run.cancel();
                    return Verdict::Lost;
                }
            }
        }
    }
}

/// How often a running attempt's new log lines are stored (sooner once
/// [`crate::host::LIVE_FLUSH_BYTES`] are waiting).
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Stores what the agent of `lease` logs while it runs, in batches: every
/// [`LOG_FLUSH_EVERY`], or as soon as [`crate::host::LIVE_FLUSH_BYTES`] are waiting;
/// never per line, and nothing when nothing is new. Stops at `stop` (even
/// mid-call: the run's end never waits on it), when the lease is lost, or
/// when the log is full. A failed store is tried again a tick later (the
/// log is only a view: FINALIZE stores the whole of it).
pub(super) async fn flush_log(
    control: ControlPlane,
    lease: Lease,
    live: LiveLog,
    stop: CancellationToken,
) {
    let mut stored = 0usize;
    let mut failed = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOG_FLUSH_EVERY) => {}
            // Not after a failure: a full batch must not retry in a loop.
            _ = live.grown(), if !failed => {}
            _ = stop.cancelled() => return,
        }
        let chunk = live.since(stored);
        if chunk.is_empty() {
            continue;
        }
        let answer = tokio::select! {
            a = control.append_log(&lease, stored, &chunk) => a,
            _ = stop.cancelled() => return,
        };
        failed = false;
        match answer {
            Ok(LogStored::Stored(len)) => {
                stored = len;
                live.taken(stored);
            }
            // Not what this run stored (a retried call, or a log replaced
            // under it): send it all again.
            Ok(LogStored::Conflict(_)) => stored = 0,
            Ok(LogStored::Full) | Err(CpError::LeaseLost) => return,
            Err(e) => {
                failed = true;
                tracing::debug!(error = %e, "storing the live log failed");
            }
        }
    }
}
