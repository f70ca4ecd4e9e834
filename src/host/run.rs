//! One attempt: a fresh store under the job's limits, instantiate, call
//! `run`, and classify exactly how it ended.

use super::bindings::AgentPre;
use super::engine::{EPOCH_TICK, ticks_for};
use super::limits::{MemoryLimiter, RunFlags, TenantBudget};
use super::sandbox::{self, Capture, LogLines};
use super::{RunOutcome, RunReport, RunRequest};
use crate::context::HeavyContext;
use crate::model::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

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

/// Longest wall clock honoured, whatever the limits say. Keeps the deadline
/// arithmetic (`Instant + timeout`) far from overflowing on a tenant's
/// `u64::MAX`, and no agent job legitimately holds a slot for a week.
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// Host-side resources (streams, pollables, sockets...) one run may hold at
/// once. Each lives in host memory, outside the guest's memory limit: a guest
/// leaking pollables in a loop would otherwise grow the host by ~100 B each.
const MAX_HOST_RESOURCES: usize = 10_000;

/// Longest trap message kept in the report; backtraces of deep recursion
/// can be megabytes.
const MAX_MESSAGE: usize = 4 << 10;

/// The store data of one run: what its host functions may see and nothing
/// more.
pub(crate) struct RunState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    pub(crate) contexts: Vec<(String, Arc<HeavyContext>)>,
    pub(crate) state: Option<Vec<u8>>,
    pub(crate) new_state: Option<Vec<u8>>,
    pub(crate) log: Arc<Mutex<LogLines>>,
    flags: Arc<RunFlags>,
    cancel: CancellationToken,
    deadline: Instant,
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// What the node gives every run besides the request.
pub(crate) struct RunEnv {
    pub fuel: bool,
    pub max_memory_per_instance: u64,
    pub capture_bytes: usize,
    pub tenant: Arc<TenantBudget>,
}

/// Runs `req` to its end; never panics on anything the guest does.
pub(crate) async fn run(env: RunEnv, req: RunRequest) -> RunReport {
    let span = tracing::debug_span!("run", tenant = %req.tenant, job = %req.job_id);
    let report = tracing::Instrument::instrument(run_inner(env, req), span).await;
    let outcome = match &report.outcome {
        RunOutcome::Ok(_) => "ok",
        RunOutcome::Failed { kind, .. } => kind.as_str(),
        RunOutcome::Interrupted => "interrupted",
    };
    tracing::debug!(
        outcome,
        fuel = report.fuel_used,
        wall_ms = report.wall_ms,
        "run ended"
    );
    metrics::counter!("agentplane_host_runs_total", "outcome" => outcome).increment(1);
    metrics::histogram!("agentplane_host_run_seconds").record(report.wall_ms as f64 / 1000.0);
    report
}

async fn run_inner(env: RunEnv, mut req: RunRequest) -> RunReport {
    let started = Instant::now();
    req.limits.timeout_ms = req.limits.timeout_ms.min(MAX_TIMEOUT_MS);
    if req.cancel.is_cancelled() {
        // Cancelled before it started (lease already lost): don't run at all.
        return RunReport {
            outcome: RunOutcome::Interrupted,
            fuel_used: 0,
            wall_ms: 0,
            log: String::new(),
            new_state: None,
        };
    }
    let timeout = Duration::from_millis(req.limits.timeout_ms);
    let cancel = req.cancel.clone();
    let stdout = Capture::new(env.capture_bytes);
    let stderr = Capture::new(env.capture_bytes);
    let log = Arc::new(Mutex::new(LogLines::new(env.capture_bytes)));
    let pieces = (stdout.clone(), stderr.clone(), log.clone());

    let attempt = attempt(env, req, started, &stdout, &stderr, log.clone());
    let early = tokio::select! {
        biased;
        r = tokio::time::timeout(timeout + BACKSTOP_GRACE, attempt) => match r {
            Ok(done) => Ok(done),
            Err(_) => Err(RunOutcome::Failed {
                kind: ErrorKind::Timeout,
                message: format!("wall-clock limit of {} ms exceeded", timeout.as_millis()),
            }),
        },
        _ = async { cancel.cancelled().await; tokio::time::sleep(CANCEL_GRACE).await } => {
            Err(RunOutcome::Interrupted)
        }
    };
    let (outcome, fuel_used, new_state) = match early {
        Ok(done) => done,
        // Dropped from outside: the store is gone with its fuel counter.
        Err(outcome) => (outcome, 0, None),
    };
    let (stdout, stderr, log) = pieces;
    RunReport {
        outcome,
        fuel_used,
        wall_ms: started.elapsed().as_millis() as u64,
        log: assemble_log(&log, &stdout, &stderr),
        new_state,
    }
}

fn assemble_log(log: &Mutex<LogLines>, stdout: &Capture, stderr: &Capture) -> String {
    let mut out = log.lock().unwrap_or_else(|e| e.into_inner()).text();
    for (tag, cap) in [("stdout", stdout), ("stderr", stderr)] {
        for line in cap.text().lines() {
            out.push_str(&format!("[{tag}] {line}\n"));
        }
    }
    out
}

async fn attempt(
    env: RunEnv,
    req: RunRequest,
    started: Instant,
    stdout: &Capture,
    stderr: &Capture,
    log: Arc<Mutex<LogLines>>,
) -> (RunOutcome, u64, Option<Vec<u8>>) {
    let RunRequest {
        component,
        input,
        limits,
        contexts,
        state,
        cancel,
        ..
    } = req;
    let pre: &AgentPre<RunState> = &component.pre;
    let engine = pre.engine();
    let flags = Arc::new(RunFlags::default());
    let data = RunState {
        wasi: sandbox::wasi_ctx(stdout, stderr),
        table: {
            let mut t = ResourceTable::new();
            t.set_max_capacity(MAX_HOST_RESOURCES);
            t
        },
        limiter: MemoryLimiter::new(
            limits.memory_bytes.min(env.max_memory_per_instance),
            env.tenant,
            flags.clone(),
        ),
        contexts,
        state,
        new_state: None,
        log,
        flags: flags.clone(),
        cancel,
        deadline: started + Duration::from_millis(limits.timeout_ms),
    };
    let mut store = Store::new(engine, data);
    store.limiter(|s| &mut s.limiter);
    if env.fuel
        && let Err(e) = store.set_fuel(limits.fuel)
    {
        return (host_failure(e), 0, None);
    }
    // Every few ticks the guest stops to check its cancellation token and
    // deadline, then yields to the executor so one busy guest cannot starve
    // the other tasks of its tokio worker thread.
    let every = ticks_for(CHECK_EVERY.max(EPOCH_TICK));
    store.set_epoch_deadline(every);
    store.epoch_deadline_callback(move |ctx| {
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

    let result = match pre.instantiate_async(&mut store).await {
        Ok(agent) => agent.call_run(&mut store, &input).await,
        Err(e) => Err(e),
    };
    let fuel_used = if env.fuel {
        limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0))
    } else {
        0
    };
    let outcome = match result {
        Ok(Ok(output)) => RunOutcome::Ok(output),
        Ok(Err(message)) => RunOutcome::Failed {
            kind: ErrorKind::AgentError,
            message,
        },
        Err(e) => classify(&e, &flags, limits.timeout_ms),
    };
    let new_state = match outcome {
        RunOutcome::Ok(_) => store.data_mut().new_state.take(),
        // Only a success commits state (contract §5.6); don't hand the
        // worker something it must not write.
        _ => None,
    };
    (outcome, fuel_used, new_state)
}

/// Maps how the guest stopped to the contract's error kinds. The flags
/// recorded at the point of the stop are checked first: a limit that made
/// the guest trap is reported as that limit, not as the trap it caused.
fn classify(e: &wasmtime::Error, flags: &RunFlags, timeout_ms: u64) -> RunOutcome {
    if flags.cancelled.load(Ordering::Acquire) {
        return RunOutcome::Interrupted;
    }
    let trap = e.downcast_ref::<Trap>().copied();
    if flags.timed_out.load(Ordering::Acquire) || trap == Some(Trap::Interrupt) {
        return RunOutcome::Failed {
            kind: ErrorKind::Timeout,
            message: format!("wall-clock limit of {timeout_ms} ms exceeded"),
        };
    }
    if trap == Some(Trap::OutOfFuel) {
        return RunOutcome::Failed {
            kind: ErrorKind::FuelExhausted,
            message: "fuel limit exhausted".to_string(),
        };
    }
    if flags.memory_denied.load(Ordering::Acquire) {
        return RunOutcome::Failed {
            kind: ErrorKind::MemoryLimit,
            message: format!("memory limit reached: {}", describe(e)),
        };
    }
    RunOutcome::Failed {
        kind: ErrorKind::Trap,
        message: describe(e),
    }
}

/// The error and its causes on one line, bounded.
fn describe(e: &wasmtime::Error) -> String {
    let mut s = e
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(" [...]");
    }
    s
}

/// A failure of the host itself around a run (not the guest's doing).
fn host_failure(e: wasmtime::Error) -> RunOutcome {
    RunOutcome::Failed {
        kind: ErrorKind::Trap,
        message: format!("host error: {}", describe(&e)),
    }
}
