//! Group commit of FINALIZE: run tasks hand the end of their attempt to
//! one task per worker, which sends every end that piled up while its
//! previous call was in flight in one FINALIZE call (per shard).
//!
//! Nothing waits for a batch to fill: a lone end goes out at once, and
//! batches grow only while Redis is busy, which is when they help (each
//! call's fixed work: the shard gate, the tenant's read and re-decision,
//! the wake-up, the round trip, is paid once per batch). Each attempt is
//! still settled on its own, with its own fencing token, so a batch
//! changes no guarantee: see `lua/finalize.lua`.
//!
//! On a worker without GPUs the same call also claims the next jobs for
//! the slots the ended runs free ([`Handoff`]), as BullMQ's worker fetches
//! its next job with the one it completes: a busy worker then makes one
//! call per batch, not a FINALIZE and a CLAIM.

use crate::control::{Claim, ControlPlane, CpError, Finish, Lease, NextClaim, Settled};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Slots handed from ended runs to the jobs FINALIZE claims for them.
pub(super) struct Handoff {
    worker: String,
    /// Off once the worker stops claiming (shutdown).
    enabled: AtomicBool,
    /// Slots of ended runs that a FINALIZE in flight is claiming for: the
    /// runs still hold them until their answers, then they are the claimed
    /// jobs'. The worker loop counts them as taken until those jobs start.
    spoken_for: AtomicU32,
    /// The claimed jobs, to the worker loop, which starts them.
    tx: mpsc::UnboundedSender<Claim>,
}

impl Handoff {
    pub(super) fn new(worker: String) -> (Arc<Handoff>, mpsc::UnboundedReceiver<Claim>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let h = Handoff {
            worker,
            enabled: AtomicBool::new(true),
            spoken_for: AtomicU32::new(0),
            tx,
        };
        (Arc::new(h), rx)
    }

    /// Slots spoken for by claims not started yet.
    pub(super) fn spoken_for(&self) -> u32 {
        self.spoken_for.load(Ordering::SeqCst)
    }

    /// One handed-over job started, or handed back.
    pub(super) fn settled_one(&self) {
        self.unspeak(1);
    }

    /// `n` slots no longer spoken for.
    fn unspeak(&self, n: u32) {
        let _ = self
            .spoken_for
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                Some(s.saturating_sub(n))
            });
    }

    /// No more claims with FINALIZE (the worker is stopping).
    pub(super) fn disable(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }
}

/// Most attempts in one FINALIZE call: bounds one script's run time (each
/// attempt costs Redis tens of microseconds).
pub(super) const MAX_BATCH: usize = 64;

struct End {
    lease: Arc<Lease>,
    finish: Arc<Finish>,
    answer: oneshot::Sender<Result<Settled, CpError>>,
}

/// The handle run tasks finalize through; cheap to clone.
#[derive(Clone)]
pub(super) struct Finalizer {
    // Unbounded, yet bounded by the worker's slots: each run task has at
    // most one end in it at a time, and waits for its answer.
    tx: mpsc::UnboundedSender<End>,
}

impl Finalizer {
    /// Starts the task that sends the ends; it stops when every handle is
    /// dropped.
    /// With `handoff`, each call also claims for the slots it frees.
    pub(super) fn start(control: ControlPlane, handoff: Option<Arc<Handoff>>) -> Finalizer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_ends(control, rx, handoff));
        Finalizer { tx }
    }

    /// FINALIZE of one attempt, in whichever call it joins.
    pub(super) async fn finalize(
        &self,
        lease: Arc<Lease>,
        finish: Arc<Finish>,
    ) -> Result<Settled, CpError> {
        let (answer, rx) = oneshot::channel();
        let end = End {
            lease,
            finish,
            answer,
        };
        if self.tx.send(end).is_err() {
            return Err(CpError::Internal("the finalizer task has stopped".into()));
        }
        rx.await.unwrap_or_else(|_| {
            Err(CpError::Internal(
                "the finalizer task dropped an attempt".into(),
            ))
        })
    }
}

async fn send_ends(
    control: ControlPlane,
    mut rx: mpsc::UnboundedReceiver<End>,
    handoff: Option<Arc<Handoff>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // attempts / calls is the group commit's batch size.
        metrics::counter!("agentplane_finalize_calls_total").increment(1);
        metrics::counter!("agentplane_finalize_attempts_total").increment(batch.len() as u64);
        let ends: Vec<(&Lease, &Finish)> = batch
            .iter()
            .map(|e| (e.lease.as_ref(), e.finish.as_ref()))
            .collect();
        // The slots these runs hold are spoken for before the call, so the
        // worker loop does not claim for them too once the runs let go.
        let ask = handoff
            .as_ref()
            .filter(|h| h.enabled.load(Ordering::SeqCst))
            .map(|h| {
                let n = batch.len() as u32;
                h.spoken_for.fetch_add(n, Ordering::SeqCst);
                (h, n)
            });
        let next = ask.map(|(h, max)| NextClaim {
            worker: &h.worker,
            max,
        });
        let (answers, claims) = control.finalize_many_then_claim(&ends, next).await;
        if let Some((h, n)) = ask {
            let got = claims.len() as u32;
            h.unspeak(n.saturating_sub(got));
            metrics::counter!("agentplane_claimed_total").increment(got as u64);
            for claim in claims {
                // Before the answers: the runs let go of their slots only then.
                if let Err(mpsc::error::SendError(claim)) = h.tx.send(claim) {
                    // The worker loop is gone: hand the job back.
                    h.settled_one();
                    if let Err(e) = control.release(&claim.lease).await {
                        tracing::warn!(job = %claim.lease.job_id, error = %e, "RELEASE failed; the reaper will take it back");
                    }
                }
            }
        }
        for (end, answer) in batch.drain(..).zip(answers) {
            // The run task may be gone (its worker stopping): nothing to tell.
            let _ = end.answer.send(answer);
        }
    }
}
