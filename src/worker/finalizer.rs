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

use crate::control::{ControlPlane, CpError, Finish, Lease, Settled};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

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
    pub(super) fn start(control: ControlPlane) -> Finalizer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_ends(control, rx));
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

async fn send_ends(control: ControlPlane, mut rx: mpsc::UnboundedReceiver<End>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // attempts / calls is the group commit's batch size.
        metrics::counter!("agentplane_finalize_calls_total").increment(1);
        metrics::counter!("agentplane_finalize_attempts_total").increment(batch.len() as u64);
        let ends: Vec<(&Lease, &Finish)> = batch
            .iter()
            .map(|e| (e.lease.as_ref(), e.finish.as_ref()))
            .collect();
        let answers = control.finalize_many(&ends).await;
        for (end, answer) in batch.drain(..).zip(answers) {
            // The run task may be gone (its worker stopping): nothing to tell.
            let _ = end.answer.send(answer);
        }
    }
}
