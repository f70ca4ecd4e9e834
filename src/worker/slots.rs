//! Starting claimed jobs on the worker's slots: those the loop's CLAIM
//! got, and those a FINALIZE claimed for the slots its ended runs let go of
//! (`finalizer::Handoff`).

use super::{RunEnd, Shared, run_claim};
use crate::control::Claim;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Returns GPU slots when a run ends, however it ends.
struct GpuGuard {
    shared: Arc<Shared>,
    n: u32,
}

impl Drop for GpuGuard {
    fn drop(&mut self) {
        self.shared.free_gpus.fetch_add(self.n, Ordering::SeqCst);
    }
}

/// Starts a claimed job's run on its slot; its GPUs are counted taken
/// until the run ends, however it ends.
pub(super) fn start_run(
    shared: &Arc<Shared>,
    runs: &mut JoinSet<RunEnd>,
    claim: Claim,
    permit: OwnedSemaphorePermit,
    hard_stop: &CancellationToken,
) {
    // Saturating: CLAIM respects `free_gpus`, but a control-plane
    // bug must not wrap the counter into "billions free".
    let _ = shared
        .free_gpus
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |g| {
            Some(g.saturating_sub(claim.gpus))
        });
    let guard = GpuGuard {
        shared: shared.clone(),
        n: claim.gpus,
    };
    let shared = shared.clone();
    let stop = hard_stop.child_token();
    let span = tracing::info_span!(
        "run",
        job = %claim.lease.job_id,
        tenant = %claim.lease.tenant,
        attempt = claim.attempt
    );
    runs.spawn(
        async move {
            let end = run_claim(&shared, claim, stop).await;
            drop(guard);
            drop(permit);
            end
        }
        .instrument(span),
    );
}

/// Starts a job FINALIZE claimed for a slot its ended run is letting go of
/// (it does right after its answer, which follows the claim).
pub(super) async fn start_handed(
    shared: &Arc<Shared>,
    runs: &mut JoinSet<RunEnd>,
    slots: &Arc<Semaphore>,
    claim: Claim,
    hard_stop: &CancellationToken,
) {
    let Ok(permit) = slots.clone().acquire_owned().await else {
        return hand_back(shared, claim).await;
    };
    if let Some(h) = &shared.handoff {
        h.settled_one();
    }
    start_run(shared, runs, claim, permit, hard_stop);
}

/// Gives back a job FINALIZE claimed that this worker will not run.
pub(super) async fn hand_back(shared: &Shared, claim: Claim) {
    if let Some(h) = &shared.handoff {
        h.settled_one();
    }
    if let Err(e) = shared.control.release(&claim.lease).await {
        tracing::warn!(job = %claim.lease.job_id, error = %e, "RELEASE failed; the reaper will take it back");
    }
}

/// The next job FINALIZE claimed; never, on a worker that has none.
pub(super) async fn recv(handed: &mut Option<mpsc::UnboundedReceiver<Claim>>) -> Option<Claim> {
    match handed {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
