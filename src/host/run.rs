//! One attempt: a fresh store under the job's limits (or a warm instance of
//! the same tenant and component, see `warm`), instantiate, call `run`, and
//! classify exactly how it ended.

use super::bindings::{Agent, AgentPre};
use super::budget::{MemoryLimiter, RunFlags, TenantBudget};
use super::classify::{classify, classify_instantiation, host_failure};
use super::config::EgressLimits;
use super::engine::{EPOCH_TICK, ticks_for};
use super::http::{Egress, EgressGrant, EgressUse};
use super::inference::{InferenceGrant, InferenceJob};
use super::sandbox::{self, Capture, LiveLog};
use super::state::{JobData, LoadedComponent, RunState};
use super::warm::{Warm, WarmKey, WarmPool};
use crate::context::HeavyContext;
use crate::inference::Models;
use crate::model::grants::TokenUse;
use crate::model::{ErrorKind, Limits, TenantId};
use crate::secrets::Redactor;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap, UpdateDeadline};

/// One attempt to run.
pub struct RunRequest {
    /// Whose job: its instances share the tenant's node memory budget.
    pub tenant: TenantId,
    /// For the log and traces only.
    pub job_id: String,
    /// What to run, from [`Host::component`].
    pub component: Arc<LoadedComponent>,
    /// The argument of the guest's `run`.
    pub input: String,
    /// Fuel, memory and wall clock of this attempt.
    pub limits: Limits,
    /// Mounted contexts by name (the names the job gave).
    pub contexts: Vec<(String, Arc<HeavyContext>)>,
    /// The agent's durable state as of the claim, if any.
    pub state: Option<Vec<u8>>,
    /// Cancelled when the lease is lost or the job cancelled: the instance stops at once.
    pub cancel: CancellationToken,
    /// Where its `wasi:http` requests may go (the tenant's
    /// `allowed_outbound_hosts`) and how many bytes and requests it may
    /// spend; the default allows none.
    pub egress: EgressGrant,
    /// What its agent reads through `wasi:config/store`: its tenant's
    /// secrets, by name. Every value is replaced by `[redacted]` in what
    /// the run hands back (log, output, error message).
    pub config: Vec<(String, String)>,
    /// The models it may call (its tenant's grants) and how many tokens it
    /// may spend; the default allows none.
    pub inference: InferenceGrant,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// `run` returned `Ok` with this output.
    Ok(String),
    /// `run` returned `Err` (`AgentError`), trapped or hit a limit.
    Failed { kind: ErrorKind, message: String },
    /// Stopped through `RunRequest::cancel`.
    Interrupted,
}

/// Everything the worker needs to finalize an attempt.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: RunOutcome,
    /// Fuel burnt (0 with fuel off, or when the run had to be dropped from
    /// outside while parked in a host call).
    pub fuel_used: u64,
    /// Wall-clock time from the start of instantiation to the end.
    pub wall_ms: u64,
    /// `log.write` lines and captured stdout/stderr, bounded.
    pub log: String,
    /// `Some` when the guest called `state.set` and the run succeeded.
    pub new_state: Option<Vec<u8>>,
    /// The most linear memory the instance held (bytes). Shows which bound
    /// stopped a guest: the limits all end as the same `memory_limit`.
    pub memory_peak: u64,
    /// What its outgoing HTTP requests used.
    pub egress: EgressUse,
    /// What its inference calls used.
    pub tokens: TokenUse,
}

impl RunReport {
    /// The report of an attempt that never ran: nothing used, no log.
    pub fn unrun(outcome: RunOutcome, wall_ms: u64) -> RunReport {
        RunReport {
            outcome,
            fuel_used: 0,
            wall_ms,
            log: String::new(),
            new_state: None,
            memory_peak: 0,
            egress: EgressUse::default(),
            tokens: TokenUse::default(),
        }
    }
}

/// How often a running guest checks its deadline and cancellation token.
/// Bounds the delay between `cancel()` and the instance stopping.
const CHECK_EVERY: Duration = Duration::from_millis(10);

/// Extra time past `timeout_ms` before the outer `tokio` timeout drops the
/// run. The epoch check stops wasm code; this stops a guest parked in a host
/// call (e.g. a WASI sleep), where no epoch check runs.
const BACKSTOP_GRACE: Duration = Duration::from_millis(200);

/// After `cancel`, how long the run gets to stop through its epoch check
/// (which keeps its fuel count) before it is dropped outright. Running wasm
/// stops within one check (`CHECK_EVERY`); only a guest parked in a host
/// call (a WASI sleep or poll) waits this long. Kept well under the ~100 ms
/// the worker relies on.
const CANCEL_GRACE: Duration = Duration::from_millis(20);

/// Fuel between two points where compiled wasm writes its fuel counter back
/// to the store. Wasm keeps the counter in a register and writes it back
/// only at calls, returns and these points, so a loop stopped by its
/// deadline (an epoch interrupt) would otherwise report almost no fuel: a
/// runaway billed ~0 for its whole timeout. This bounds the error to this
/// much fuel (~1 ms of wasm) at the cost of one cheap yield per interval.
const FUEL_SYNC_INTERVAL: u64 = 1_000_000;

/// Longest wall clock honoured, whatever the limits say. Keeps the deadline
/// arithmetic (`Instant + timeout`) far from overflowing on a tenant's
/// `u64::MAX`, and no agent job legitimately holds a slot for a week.
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// Host-side resources (streams, pollables, sockets...) one run may hold at
/// once. Each lives in host memory, outside the guest's memory limit: a guest
/// leaking pollables in a loop would otherwise grow the host by ~100 B each.
const MAX_HOST_RESOURCES: usize = 10_000;

/// What the node gives every run besides the request.
pub(crate) struct RunEnv {
    pub fuel: bool,
    pub max_memory_per_instance: u64,
    pub capture_bytes: usize,
    pub tenant: Arc<TenantBudget>,
    /// Bounds of outgoing HTTP requests.
    pub egress: EgressLimits,
    /// Idle instances to take from and park in (`None`: every run fresh).
    pub warm: Option<Arc<WarmPool>>,
    /// The node's models.
    pub models: Arc<Models>,
}

/// Runs `req` to its end; never panics on anything the guest does.
pub(crate) async fn run(env: RunEnv, req: RunRequest, log: LiveLog) -> RunReport {
    let report = run_inner(env, req, log).await;
    let outcome = label(&report.outcome);
    metrics::counter!("agentplane_host_runs_total", "outcome" => outcome).increment(1);
    metrics::histogram!("agentplane_host_run_seconds").record(report.wall_ms as f64 / 1000.0);
    report
}

async fn run_inner(env: RunEnv, mut req: RunRequest, log: LiveLog) -> RunReport {
    let started = Instant::now();
    req.limits.timeout_ms = req.limits.timeout_ms.min(MAX_TIMEOUT_MS);
    if req.cancel.is_cancelled() {
        // Cancelled before it started (lease already lost): don't run at all.
        return RunReport::unrun(RunOutcome::Interrupted, 0);
    }
    let (tenant, job) = (req.tenant.clone(), req.job_id.clone());
    // The tenant's secret values never leave in what the run hands back.
    let secrets = Redactor::new(req.config.iter().map(|(_, v)| v.as_str()));
    let secrets = (!secrets.is_empty()).then(|| Arc::new(secrets));
    if let Some(r) = &secrets {
        log.redact_with(r.clone());
    }
    let ended = attempt(env, req, started, log.clone()).await;
    let mut report = RunReport {
        outcome: ended.outcome,
        fuel_used: ended.fuel_used,
        wall_ms: started.elapsed().as_millis() as u64,
        log: assemble_log(&log, &ended.stdout, &ended.stderr),
        new_state: ended.new_state,
        memory_peak: ended.memory_peak,
        egress: ended.egress,
        tokens: ended.tokens,
    };
    if let Some(r) = &secrets {
        report.log = r.redact(&report.log);
        match &mut report.outcome {
            RunOutcome::Ok(text) | RunOutcome::Failed { message: text, .. } => {
                *text = r.redact(text)
            }
            RunOutcome::Interrupted => {}
        }
    }
    report.egress.record(&tenant);
    // Built here, not as a span around the run: a span per run cost more
    // than a warm run itself, and only its end is worth a line.
    tracing::debug!(
        %tenant,
        job,
        warm = ended.warm,
        outcome = label(&report.outcome),
        fuel = report.fuel_used,
        wall_ms = report.wall_ms,
        "run ended"
    );
    report
}

/// The outcome as the metrics and traces name it.
fn label(outcome: &RunOutcome) -> &'static str {
    match outcome {
        RunOutcome::Ok(_) => "ok",
        RunOutcome::Failed { kind, .. } => kind.as_str(),
        RunOutcome::Interrupted => "interrupted",
    }
}

/// Resolves once the run must be dropped from outside: its wall clock plus
/// [`BACKSTOP_GRACE`] is over, or [`CANCEL_GRACE`] after `cancel`. The epoch
/// check stops running wasm before either; this stops a guest parked in a
/// host call (e.g. a WASI sleep), where no epoch check runs.
async fn backstop(started: Instant, timeout: Duration, cancel: &CancellationToken) -> RunOutcome {
    let until = tokio::time::Instant::from_std(started + timeout + BACKSTOP_GRACE);
    tokio::select! {
        biased;
        _ = tokio::time::sleep_until(until) => RunOutcome::Failed {
            kind: ErrorKind::Timeout,
            message: format!("wall-clock limit of {} ms exceeded", timeout.as_millis()),
        },
        _ = async { cancel.cancelled().await; tokio::time::sleep(CANCEL_GRACE).await } => {
            RunOutcome::Interrupted
        }
    }
}

fn assemble_log(log: &LiveLog, stdout: &str, stderr: &str) -> String {
    let mut out = log.text();
    for (tag, text) in [("stdout", stdout), ("stderr", stderr)] {
        for line in text.lines() {
            out.push_str(&format!("[{tag}] {line}\n"));
        }
    }
    out
}

/// How an attempt ended, with what its store had to say.
struct Ended {
    outcome: RunOutcome,
    fuel_used: u64,
    new_state: Option<Vec<u8>>,
    memory_peak: u64,
    egress: EgressUse,
    tokens: TokenUse,
    stdout: String,
    stderr: String,
    /// It ran on a warm instance.
    warm: bool,
}

impl Ended {
    fn before_start(outcome: RunOutcome) -> Ended {
        Ended {
            outcome,
            fuel_used: 0,
            new_state: None,
            memory_peak: 0,
            egress: EgressUse::default(),
            tokens: TokenUse::default(),
            stdout: String::new(),
            stderr: String::new(),
            warm: false,
        }
    }
}

/// A fresh store for `job`: a new WASI context and capture buffers, the
/// memory limiter, and the epoch callback that checks the deadline,
/// cancellation and fuel.
fn fresh_store(
    engine: &wasmtime::Engine,
    env: &RunEnv,
    memory_limit: u64,
    job: JobData,
) -> Store<RunState> {
    let stdio = (
        Capture::new(env.capture_bytes),
        Capture::new(env.capture_bytes),
    );
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_HOST_RESOURCES);
    let limiter = MemoryLimiter::new(memory_limit, env.tenant.clone(), job.flags.clone());
    let data = RunState::new(
        sandbox::wasi_ctx(&stdio.0, &stdio.1),
        table,
        stdio,
        limiter,
        env.fuel,
        |j| Egress::new(env.egress, env.tenant.egress.clone(), j),
        job,
    );
    let mut store = Store::new(engine, data);
    store.limiter(|s| &mut s.limiter);
    // Every few ticks the guest stops to check its cancellation token and
    // deadline, then yields to the executor so one busy guest cannot starve
    // the other tasks of its tokio worker thread.
    let every = ticks_for(CHECK_EVERY.max(EPOCH_TICK));
    store.epoch_deadline_callback(move |mut ctx| {
        if ctx.data().fuel_on {
            let fuel = ctx.get_fuel()?;
            if !ctx.data_mut().observe_fuel(fuel) {
                return Err(Trap::OutOfFuel.into());
            }
        }
        let d = ctx.data();
        if d.cancel.is_cancelled() {
            d.flags.cancelled.store(true, Ordering::Release);
            return Ok(UpdateDeadline::Interrupt);
        }
        if Instant::now() >= d.deadline {
            d.flags.timed_out.store(true, Ordering::Release);
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Yield(every))
    });
    store
}

/// Instantiates `pre`; when the node's instance pool is full and an idle
/// warm instance holds a slot, that one goes and the instantiation is tried
/// once more (an idle instance must never cost a job its run).
async fn instantiate(
    pre: &AgentPre<RunState>,
    store: &mut Store<RunState>,
    warm: Option<&WarmPool>,
) -> wasmtime::Result<Agent> {
    match pre.instantiate_async(&mut *store).await {
        Err(e)
            if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                .is_some()
                && warm.is_some_and(WarmPool::evict_oldest) =>
        {
            pre.instantiate_async(store).await
        }
        r => r,
    }
}

async fn attempt(env: RunEnv, req: RunRequest, started: Instant, log: LiveLog) -> Ended {
    let RunRequest {
        tenant,
        component,
        input,
        limits,
        contexts,
        state,
        cancel,
        egress,
        config,
        inference,
        ..
    } = req;
    let pre: &AgentPre<RunState> = &component.pre;
    let memory_limit = limits.memory_bytes.min(env.max_memory_per_instance);
    let key = env
        .warm
        .as_ref()
        .map(|_| WarmKey::new(tenant.as_str(), component.digest(), &contexts, memory_limit));
    let flags = Arc::new(RunFlags::default());
    let job = JobData {
        contexts,
        state,
        log,
        flags: flags.clone(),
        cancel: cancel.clone(),
        deadline: started + Duration::from_millis(limits.timeout_ms),
        fuel: limits.fuel,
        egress,
        config: Arc::new(config.into_iter().collect()),
        inference: InferenceJob::new(inference, env.models.clone(), tenant.as_str()),
    };
    let taken = match (&env.warm, &key) {
        (Some(pool), Some(key)) => pool.take(key),
        _ => None,
    };
    let reused = taken.is_some();
    let (mut store, agent) = match taken {
        Some(mut w) => {
            w.store.data_mut().begin(job);
            (w.store, Some(w.agent))
        }
        None => (fresh_store(pre.engine(), &env, memory_limit, job), None),
    };
    if env.fuel
        && let Err(e) = store
            .set_fuel(limits.fuel)
            .and_then(|()| store.fuel_async_yield_interval(Some(FUEL_SYNC_INTERVAL)))
    {
        return Ended::before_start(host_failure(e));
    }
    store.set_epoch_deadline(ticks_for(CHECK_EVERY.max(EPOCH_TICK)));

    // The call is raced against the backstop *inside* the store's owner:
    // dropping the call unwinds the guest's fiber but keeps the store, so
    // the fuel it burnt is still read below however the run ended. (A run
    // dropped while parked in a host call used to report 0 fuel: a guest
    // could compute, log its answer and sleep to its deadline for free.)
    let timeout = Duration::from_millis(limits.timeout_ms);
    let warm = env.warm.as_deref();
    let call = async {
        let agent = match agent {
            Some(a) => a,
            None => instantiate(pre, &mut store, warm)
                .await
                .map_err(Stop::Instantiate)?,
        };
        let out = agent
            .call_run(&mut store, &input)
            .await
            .map_err(Stop::Run)?;
        Ok((agent, out))
    };
    let result = tokio::select! {
        biased;
        r = call => Ok(r),
        stopped = backstop(started, timeout, &cancel) => Err(stopped),
    };
    let fuel_used = if env.fuel {
        // What wasm burnt plus what host calls charged, never past the
        // limit (a host call may find the guest a few instructions short).
        let wasm = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        wasm.saturating_add(store.data().host_fuel).min(limits.fuel)
    } else {
        0
    };
    let (outcome, agent) = match result {
        Ok(Ok((agent, Ok(output)))) => (RunOutcome::Ok(output), Some(agent)),
        Ok(Ok((agent, Err(message)))) => (
            RunOutcome::Failed {
                kind: ErrorKind::AgentError,
                message,
            },
            Some(agent),
        ),
        Ok(Err(Stop::Run(e))) => (classify(&e, &flags, limits.timeout_ms), None),
        Ok(Err(Stop::Instantiate(e))) => {
            (classify_instantiation(&e, &flags, limits.timeout_ms), None)
        }
        Err(stopped) => (stopped, None),
    };
    let data = store.data_mut();
    let new_state = match outcome {
        RunOutcome::Ok(_) => data.new_state.take(),
        // Only a success commits state (agent state is committed with success); don't hand the
        // worker something it must not write.
        _ => None,
    };
    let ended = Ended {
        outcome,
        fuel_used,
        new_state,
        memory_peak: data.limiter.linear_bytes(),
        egress: data.egress.used(),
        tokens: data.inference.used(),
        stdout: data.stdout.text(),
        stderr: data.stderr.text(),
        warm: reused,
    };
    // `run` returned a value: the instance is as the guest left it, with no
    // limit hit and no stop requested. Anything else drops it.
    if let (Some(pool), Some(key), Some(agent)) = (&env.warm, key, agent)
        && !flags.any()
        && !cancel.is_cancelled()
    {
        store.data_mut().park();
        pool.put(key, Warm { store, agent });
    }
    ended
}

/// Where a run stopped with an error.
enum Stop {
    /// Instantiating the component failed.
    Instantiate(wasmtime::Error),
    /// `run` trapped or a limit stopped it.
    Run(wasmtime::Error),
}
