//! The worker loop: claims jobs from the control plane and runs them in the
//! Wasm host, one slot per run.
//!
//! - Slots are a [`Semaphore`]; GPU slots a counter returned by a drop guard,
//!   so a panicking run still gives its capacity back.
//! - Beside each run a renew task extends the lease every `lease/3`. RENEW
//!   answering `LeaseLost` stops the instance and the worker changes nothing
//!   more (the job belongs to someone else now); `Cancelled` stops the
//!   instance and finalizes the attempt as cancelled.
//! - Beside each run a log task stores the agent's new log lines every
//!   250 ms (or 4 KiB), so readers see them while it runs (`lua/log.lua`).
//! - Without GPUs, the FINALIZE of ended runs also claims jobs for their
//!   slots (`finalizer::Handoff`): one call per batch, not two.
//! - Shutdown: stop claiming, let runs finish for up to the drain timeout,
//!   then stop the rest and RELEASE their leases, which puts the jobs back
//!   in the queue uncharged.

use crate::control::{Claim, ControlPlane, CpError, Finalized, Finish, HttpUse, Lease, Settled};
use crate::host::{Host, RunOutcome, RunReport};
use crate::model::JobState;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod decide;
mod finalizer;
mod lease;
mod prepare;
mod slots;
use decide::{Decision, decide};
use finalizer::{Finalizer, Handoff};
use lease::{flush_log, renew_loop};
use prepare::{PrepError, prepare};
use slots::{hand_back, recv, start_handed, start_run};

/// Longest a worker with runs in flight waits to gather half its slots
/// free before it claims: bounds the latency batching adds.
const CLAIM_GATHER: Duration = Duration::from_millis(2);

/// How long a slot waits after a node fault before handing its job back.
const NODE_FAULT_BACKOFF: Duration = Duration::from_millis(200);

/// Settings of one worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Stable-for-the-process identity shown in leases and logs.
    pub id: String,
    /// Runs at once.
    pub slots: u32,
    /// GPU slots this node offers.
    pub gpus: u32,
    /// How long running jobs may keep going after shutdown is asked.
    pub drain_timeout: Duration,
    /// Longest sleep between claims when the queues look empty (a wake-up
    /// signal usually cuts it short).
    pub idle_wait: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: worker_id(),
            slots: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
            gpus: 0,
            drain_timeout: Duration::from_secs(30),
            idle_wait: Duration::from_secs(1),
        }
    }
}

/// `hostname-pid-random`: unique per process even when a pid is reused
/// after a restart on the same machine.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// What a run task reports back to the loop (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// FINALIZE accepted the attempt.
    Finalized(Finalized),
    /// The lease was lost: the attempt changed nothing.
    LeaseLost,
    /// Handed back to the queue (drain, or a transient failure before the run).
    Released,
    /// FINALIZE or RELEASE could not reach Redis; the reaper will recover it.
    Abandoned,
}

struct Shared {
    cfg: WorkerConfig,
    control: ControlPlane,
    host: Arc<Host>,
    free_gpus: AtomicU32,
    finalizer: Finalizer,
    /// Jobs FINALIZE claims for the slots it frees (workers without GPUs).
    handoff: Option<Arc<Handoff>>,
}

/// A worker: owns its slots and its runs.
pub struct Worker {
    shared: Arc<Shared>,
    handed: Option<mpsc::UnboundedReceiver<Claim>>,
}

impl Worker {
    /// Needs a Tokio runtime (it starts the task that sends FINALIZEs).
    pub fn new(cfg: WorkerConfig, control: ControlPlane, host: Arc<Host>) -> Worker {
        let gpus = cfg.gpus;
        // FINALIZE claims CPU jobs only: a GPU worker's claims stay with the
        // loop, which counts its free GPUs.
        let (handoff, handed) = (gpus == 0).then(|| Handoff::new(cfg.id.clone())).unzip();
        Worker {
            shared: Arc::new(Shared {
                cfg,
                finalizer: Finalizer::start(control.clone(), handoff.clone()),
                control,
                host,
                free_gpus: AtomicU32::new(gpus),
                handoff,
            }),
            handed,
        }
    }

    /// Runs until `shutdown` is cancelled and the drain is over.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let shared = self.shared;
        let mut handed = self.handed;
        let cfg = &shared.cfg;
        let slots = Arc::new(Semaphore::new(cfg.slots.max(1) as usize));
        // Cancelled only when the drain timeout is over: stops what still runs.
        let hard_stop = CancellationToken::new();
        let mut runs: JoinSet<RunEnd> = JoinSet::new();
        let mut backoff = Duration::from_millis(100);
        // While gathering free slots for a batch CLAIM: when to stop.
        let mut gather_until: Option<Instant> = None;
        tracing::info!(worker = %cfg.id, slots = cfg.slots, gpus = cfg.gpus, "worker started");

        while !shutdown.is_cancelled() {
            while let Some(done) = runs.try_join_next() {
                log_join(done);
            }
            while let Some(claim) = handed.as_mut().and_then(|rx| rx.try_recv().ok()) {
                start_handed(&shared, &mut runs, &slots, claim, &hard_stop).await;
            }
            // Slots whose jobs a FINALIZE in flight is claiming are taken.
            let spoken_for = shared.handoff.as_ref().map_or(0, |h| h.spoken_for());
            let free = (slots.available_permits() as u32).saturating_sub(spoken_for);
            metrics::gauge!("agentplane_worker_busy_slots").set((cfg.slots.max(1) - free) as f64);
            if free == 0 {
                tokio::select! {
                    done = runs.join_next() => {
                        if let Some(done) = done {
                            log_join(done);
                        }
                    }
                    Some(claim) = recv(&mut handed) => {
                        start_handed(&shared, &mut runs, &slots, claim, &hard_stop).await;
                    }
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            // Claim in batches while runs are in flight: each CLAIM has a
            // fixed cost in Redis (the shard gate, the tenant's read, the
            // claim record), so fewer, larger calls cost less per job. With
            // fewer than half the slots free, wait up to CLAIM_GATHER for
            // more runs to end; an idle worker claims at once.
            if free < cfg.slots.max(1).div_ceil(2) && !runs.is_empty() {
                let until = *gather_until.get_or_insert_with(|| Instant::now() + CLAIM_GATHER);
                if Instant::now() < until {
                    tokio::select! {
                        done = runs.join_next() => {
                            if let Some(done) = done {
                                log_join(done);
                            }
                        }
                        Some(claim) = recv(&mut handed) => {
                            start_handed(&shared, &mut runs, &slots, claim, &hard_stop).await;
                        }
                        _ = tokio::time::sleep_until(until.into()) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            }
            gather_until = None;
            let free_gpus = shared.free_gpus.load(Ordering::SeqCst);
            // Not raced against shutdown: a CLAIM dropped mid-flight could
            // have leased jobs nobody would run until the reaper noticed.
            let t0 = Instant::now();
            let claimed = shared.control.claim(&cfg.id, free, free_gpus).await;
            metrics::histogram!("agentplane_claim_seconds").record(t0.elapsed().as_secs_f64());
            let claims = match claimed {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "claim failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if claims.is_empty() {
                tokio::select! {
                    r = shared.control.wait_for_work(cfg.idle_wait) => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "wait_for_work failed");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    done = runs.join_next(), if !runs.is_empty() => {
                        if let Some(done) = done { log_join(done) }
                    }
                    Some(claim) = recv(&mut handed) => {
                        start_handed(&shared, &mut runs, &slots, claim, &hard_stop).await;
                    }
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            metrics::counter!("agentplane_claimed_total").increment(claims.len() as u64);
            for claim in claims {
                // CLAIM never hands out more than `free`, and only this loop
                // takes permits, so this cannot fail; if it somehow does, the
                // job is handed back rather than run over capacity.
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::error!(job = %claim.lease.job_id, "claimed beyond free slots");
                    let _ = shared.control.release(&claim.lease).await;
                    continue;
                };
                start_run(&shared, &mut runs, claim, permit, &hard_stop);
            }
        }

        // Drain. FINALIZE claims no more; what it claimed meanwhile goes back.
        if let Some(h) = &shared.handoff {
            h.disable();
        }
        if !runs.is_empty() {
            tracing::info!(running = runs.len(), timeout = ?cfg.drain_timeout, "draining");
            let drained = tokio::time::timeout(cfg.drain_timeout, async {
                loop {
                    tokio::select! {
                        done = runs.join_next() => match done {
                            Some(done) => log_join(done),
                            None => break,
                        },
                        Some(claim) = recv(&mut handed) => hand_back(&shared, claim).await,
                    }
                }
            })
            .await;
            if drained.is_err() {
                tracing::info!(
                    left = runs.len(),
                    "drain timeout: stopping the remaining runs and releasing their jobs"
                );
                hard_stop.cancel();
                while let Some(done) = runs.join_next().await {
                    log_join(done);
                }
            }
        }
        while let Some(claim) = handed.as_mut().and_then(|rx| rx.try_recv().ok()) {
            hand_back(&shared, claim).await;
        }
        tracing::info!(worker = %cfg.id, "worker stopped");
        Ok(())
    }
}

/// Runs a worker until `shutdown` is cancelled and its drain is over.
pub async fn run_worker(
    cfg: WorkerConfig,
    control: ControlPlane,
    host: Arc<Host>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Worker::new(cfg, control, host).run(shutdown).await
}

fn log_join(done: Result<RunEnd, tokio::task::JoinError>) {
    match done {
        Ok(end) => tracing::debug!(?end, "run ended"),
        Err(e) => tracing::error!(error = %e, "run task panicked"),
    }
}

/// One attempt, from claim to FINALIZE (or to giving the job back).
async fn run_claim(shared: &Shared, claim: Claim, hard_stop: CancellationToken) -> RunEnd {
    let lease = claim.lease.clone();
    let tenant = lease.tenant.clone();
    tracing::info!("claimed");

    // `run` stops the instance: lease lost, cancelled, or the drain is over.
    // The lease is renewed, and the agent's log lines pushed, by futures
    // polled in this run's own task beside the attempt (`join!`): no task
    // is spawned per job for either. A guest yields to them at least every
    // epoch check, and whenever it waits in a host call.
    let run = hard_stop.child_token();
    let renew_stop = CancellationToken::new();
    let started = Instant::now();
    let attempt = async {
        let prepared = prepare(shared, &claim, run.clone()).await;
        let report = match prepared {
            Ok(req) => {
                // The agent's log lines go to the control plane in batches
                // while it runs; FINALIZE then stores the attempt's whole log.
                let live = shared.host.live_log();
                let flush_stop = CancellationToken::new();
                let (report, ()) = tokio::join!(
                    async {
                        let report = shared.host.run_live(req, live.clone()).await;
                        flush_stop.cancel();
                        report
                    },
                    flush_log(
                        shared.control.clone(),
                        lease.clone(),
                        live.clone(),
                        flush_stop.clone(),
                    ),
                );
                Ok(report)
            }
            Err(PrepError::Transient(msg)) => Err(msg),
            Err(PrepError::Fatal(kind, msg)) => Ok(RunReport::unrun(
                RunOutcome::Failed { kind, message: msg },
                started.elapsed().as_millis() as u64,
            )),
        };
        renew_stop.cancel();
        report
    };
    let (report, verdict) = tokio::join!(
        attempt,
        renew_loop(
            shared.control.clone(),
            lease.clone(),
            run.clone(),
            renew_stop.clone(),
        ),
    );
    let report = match report {
        Ok(report) => report,
        Err(msg) => {
            // The node's failure, not the guest's: handed back uncharged and
            // uncounted, but as a node fault, which the control plane bounds
            // per job (a job no node can start must not cycle forever).
            tracing::warn!(error = %msg, "could not prepare the run; releasing as a node fault");
            return release_fault(shared, &lease, &fault_for_tenant(&msg)).await;
        }
    };
    metrics::histogram!("agentplane_run_seconds", "tenant" => tenant.clone())
        .record(report.wall_ms as f64 / 1000.0);
    metrics::counter!("agentplane_fuel_total", "tenant" => tenant.clone())
        .increment(report.fuel_used);

    let outcome = match decide(verdict, report.outcome) {
        Decision::Discard => {
            tracing::warn!("lease lost; attempt discarded");
            return RunEnd::LeaseLost;
        }
        Decision::Finalize(outcome) => outcome,
        Decision::ReleaseFault(message) => {
            // The node failed, not the guest (e.g. its instance pool is
            // exhausted): the job goes back to the queue, and neither its
            // attempts nor its tenant's credits are charged.
            tracing::warn!(error = %message, "node fault; releasing");
            // Keep the slot a moment first: the fault (a full pool) clears
            // as other runs end, and claiming the job straight back would
            // only spin.
            tokio::time::sleep(NODE_FAULT_BACKOFF).await;
            return release_fault(shared, &lease, &fault_for_tenant(&message)).await;
        }
        Decision::Release => {
            tracing::info!("stopped by shutdown; releasing");
            return release(shared, &lease).await;
        }
    };
    let finish = Finish {
        outcome,
        fuel: report.fuel_used,
        // The slot was held from the claim on, however the run ended
        // (timeout, cancel, a failed preparation): slot-time is billed.
        wall_ms: report
            .wall_ms
            .max(started.elapsed().as_millis().try_into().unwrap_or(u64::MAX)),
        log: report.log,
        new_state: report.new_state,
        http: HttpUse {
            requests: report.egress.requests,
            bytes: report.egress.bytes(),
        },
        tokens: report.tokens,
    };
    finalize(shared, Arc::new(lease), Arc::new(finish)).await
}

/// FINALIZE, retried through transient Redis errors for up to one lease
/// (after that the reaper owns the job and FINALIZE would be refused).
async fn finalize(shared: &Shared, lease: Arc<Lease>, finish: Arc<Finish>) -> RunEnd {
    let give_up = Instant::now() + Duration::from_millis(shared.control.config().lease_ms);
    let mut pause = Duration::from_millis(50);
    loop {
        match shared
            .finalizer
            .finalize(lease.clone(), finish.clone())
            .await
        {
            Ok(Settled { result, credits }) => {
                tracing::info!(result = ?result, "finalized");
                record_terminal(&lease, &result, Some(credits));
                return RunEnd::Finalized(result);
            }
            Err(CpError::LeaseLost) => {
                metrics::counter!("agentplane_lease_lost_total").increment(1);
                tracing::warn!("finalize refused: lease lost");
                return RunEnd::LeaseLost;
            }
            Err(e) if Instant::now() < give_up => {
                tracing::warn!(error = %e, "finalize failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::error!(error = %e, "finalize failed; leaving it to the reaper");
                return RunEnd::Abandoned;
            }
        }
    }
}

/// Counts a job that reached a terminal state, with what it cost in all
/// (as FINALIZE answered it; RELEASE does not say, and charges nothing).
fn record_terminal(lease: &Lease, f: &Finalized, credits: Option<u64>) {
    let state = match f {
        Finalized::Succeeded => JobState::Succeeded,
        Finalized::Failed => JobState::Failed,
        Finalized::Cancelled => JobState::Cancelled,
        Finalized::Retrying { .. } | Finalized::StateConflict => return,
    };
    metrics::counter!(
        "agentplane_jobs_finished_total",
        "tenant" => lease.tenant.clone(),
        "state" => state.as_str()
    )
    .increment(1);
    // The settled total is the control plane's to compute, not re-derived
    // from prices here.
    if let Some(credits) = credits.filter(|&c| c > 0) {
        metrics::counter!("agentplane_credits_total", "tenant" => lease.tenant.clone())
            .increment(credits);
    }
}

/// What a tenant sees of a node fault: the stage that failed, never the
/// cause (a Redis error may name addresses or keys; the log has it all).
fn fault_for_tenant(msg: &str) -> String {
    let stage = msg.split(": ").next().unwrap_or(msg);
    format!("the node failed {stage} (a fault of the node, not the job; not charged)")
}

async fn release_fault(shared: &Shared, lease: &Lease, message: &str) -> RunEnd {
    match shared.control.release_fault(lease, message).await {
        Ok(f) => {
            metrics::counter!("agentplane_jobs_released_total").increment(1);
            // RELEASE answers no cost: a job it ended may have paid for
            // earlier attempts, so read what it cost in all.
            let credits = match f {
                Finalized::Failed | Finalized::Cancelled => shared
                    .control
                    .job(&lease.tenant, &lease.job_id)
                    .await
                    .ok()
                    .flatten()
                    .map(|j| j.usage.credits as u64),
                _ => None,
            };
            record_terminal(lease, &f, credits);
            RunEnd::Finalized(f)
        }
        Err(CpError::LeaseLost) => RunEnd::LeaseLost,
        Err(e) => {
            tracing::warn!(job = %lease.job_id, error = %e, "release failed; the reaper will requeue it");
            RunEnd::Abandoned
        }
    }
}

async fn release(shared: &Shared, lease: &Lease) -> RunEnd {
    match shared.control.release(lease).await {
        Ok(()) => {
            metrics::counter!("agentplane_jobs_released_total").increment(1);
            RunEnd::Released
        }
        Err(CpError::LeaseLost) => RunEnd::LeaseLost,
        Err(e) => {
            tracing::warn!(job = %lease.job_id, error = %e, "release failed; the reaper will requeue it");
            RunEnd::Abandoned
        }
    }
}
