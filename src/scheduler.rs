//! The scheduler: promotes due delayed jobs, reaps expired leases and
//! sweeps what is older than the retention (finished jobs, their logs and
//! index entries; old ledger entries folded into a checkpoint).
//!
//! Both are single atomic control-plane scripts, so any number of schedulers
//! may run at once (one per `serve`, or dedicated `scheduler` processes):
//! they only share the work. The period is a fifth of the lease, and at
//! most [`MAX_PERIOD`], so a dead worker's job is back in the queue within
//! one lease plus a quarter second, and a delayed job is promoted within a
//! quarter second of its due time.

use crate::control::ControlPlane;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Jobs moved per script call: bounds how long one script holds Redis.
pub const BATCH: u32 = 500;

/// Ticks per lease: at least 4 so expiry is noticed well within a lease.
const TICKS_PER_LEASE: u32 = 5;

/// The longest tick: bounds how late after its lease a dead worker's job
/// is requeued, and how late after its due time a delayed job is promoted.
/// Each tick costs every shard three short scripts that find nothing to do
/// in O(log n) when idle.
pub const MAX_PERIOD: Duration = Duration::from_millis(250);

/// The tick period for a lease length.
pub fn period(lease_ms: u64) -> Duration {
    Duration::from_millis(lease_ms / TICKS_PER_LEASE as u64)
        .clamp(Duration::from_millis(20), MAX_PERIOD)
}

/// Runs until `shutdown` is cancelled.
pub async fn run_scheduler(
    control: ControlPlane,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let every = period(control.config().lease_ms);
    tracing::info!(period = ?every, "scheduler started");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        drain(&control, Step::Promote).await;
        drain(&control, Step::Reap).await;
        drain(&control, Step::Retain).await;
    }
    tracing::info!("scheduler stopped");
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Promote,
    Reap,
    Retain,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Promote => "promote",
            Step::Reap => "reap",
            Step::Retain => "retain",
        }
    }
}

/// Runs `step` until it moves less than a full batch (a backlog is cleared
/// in one tick, a batch at a time), recording how many it moved.
async fn drain(control: &ControlPlane, step: Step) {
    // Bounded so a step that keeps answering full batches cannot starve the
    // other step of the tick.
    for _ in 0..20 {
        let moved = match step {
            Step::Promote => control.promote(BATCH).await,
            Step::Reap => control.reap(BATCH).await,
            Step::Retain => control.retain(BATCH).await,
        };
        let n = match moved {
            Ok(n) => n,
            // Some shards failed; the others were still served, so a broken
            // shard does not slow the healthy ones' backlog (the failing
            // ones are tried again next round).
            Err(crate::control::CpError::Shards { done, failed }) => {
                tracing::warn!(
                    ?failed,
                    step = step.name(),
                    "scheduler step failed on some shards"
                );
                done
            }
            Err(e) => {
                tracing::warn!(error = %e, step = step.name(), "scheduler step failed");
                return;
            }
        };
        if n > 0 {
            tracing::debug!(n, step = step.name(), "scheduler step");
            metrics::counter!("agentplane_scheduler_moved_total", "step" => step.name())
                .increment(n as u64);
        }
        if n < BATCH {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_four_ticks_per_lease() {
        for lease in [100u64, 1_000, 10_000] {
            assert!(period(lease) * 4 <= Duration::from_millis(lease));
        }
        assert_eq!(period(10_000), MAX_PERIOD);
    }
}
