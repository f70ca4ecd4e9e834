//! One attempt: a fresh store under the job's limits, instantiate, call
//! `run`, and classify exactly how it ended.

use super::bindings::AgentPre;
use super::budget::{MemoryLimiter, RunFlags, TenantBudget};
use super::engine::{EPOCH_TICK, ticks_for};
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
    /// Fuel metering is on.
    fuel_on: bool,
    /// Fuel the guest may still spend as of the last epoch check, less what
    /// host calls charged since: what a host call may still spend.
    fuel_left: u64,
    /// Fuel host calls charged in all. Kept beside the store's own counter,
    /// not taken from it: compiled wasm caches its fuel in a register across
    /// the epoch check, so a `set_fuel` there would be lost.
    host_fuel: u64,
}

impl RunState {
    /// Charges host-side work to the guest's fuel. A guest that cannot pay
    /// traps at once with `fuel_exhausted`, and the work is not done.
    pub(crate) fn charge(&mut self, fuel: u64) -> wasmtime::Result<()> {
        if !self.fuel_on {
            return Ok(());
        }
        if fuel > self.fuel_left {
            self.host_fuel += std::mem::take(&mut self.fuel_left);
            return Err(Trap::OutOfFuel.into());
        }
        self.fuel_left -= fuel;
        self.host_fuel += fuel;
        Ok(())
    }

    /// The run's WASI context (for the imports this crate serves itself).
    pub(crate) fn wasi(&mut self) -> &mut WasiCtx {
        &mut self.wasi
    }

    /// Starts a host call into this crate's code (an `agentplane:agent`
    /// import or `wasi:random`): charges `fuel`, and gives back the answer
    /// of the previous call, which the guest must have taken by now (a host
    /// call cannot start while an answer is being copied in).
    pub(crate) fn begin_call(&mut self, fuel: u64) -> wasmtime::Result<()> {
        self.limiter.release_answer();
        self.charge(fuel)
    }

    /// Refuses (trapping as `memory_limit`) an answer of `bytes` larger
    /// than one host call may build, then holds it as
    /// [`RunState::hold_answer`] does.
    pub(crate) fn result_bytes(&mut self, bytes: usize) -> wasmtime::Result<()> {
        if bytes > super::bindings::MAX_RESULT_BYTES {
            return self.refuse_answer(bytes);
        }
        self.hold_answer(bytes)
    }

    /// Charges an answer of `bytes` a host call is about to hand the guest
    /// to its tenant's node memory budget, held until the guest's next host
    /// call or the end of the run. Refuses it (trapping as `memory_limit`)
    /// if the instance's memory limit leaves no room to take it or the
    /// tenant's budget does not hold it: the host must not hold what the
    /// tenant cannot pay for.
    pub(crate) fn hold_answer(&mut self, bytes: usize) -> wasmtime::Result<()> {
        if !self.limiter.reserve_answer(bytes as u64) {
            return self.refuse_answer(bytes);
        }
        Ok(())
    }

    /// Charges the `state.set` value of `bytes` the host keeps for the rest
    /// of the run to its tenant's node memory budget, in place of the one it
    /// replaces; traps as `memory_limit` if the budget does not hold it.
    pub(crate) fn keep_state(&mut self, bytes: usize) -> wasmtime::Result<()> {
        if !self.limiter.keep_state(bytes as u64) {
            return self.refuse("the state set", bytes);
        }
        Ok(())
    }

    /// Stops the run for a failure of the host's own (not the guest's
    /// doing): classified as `node_fault`, so the job is handed back
    /// uncharged instead of failing as a trap.
    pub(crate) fn host_fault(&mut self, why: String) -> wasmtime::Error {
        self.flags.host_fault.store(true, Ordering::Release);
        wasmtime::Error::msg(why)
    }

    fn refuse_answer(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.refuse("a host call's answer", bytes)
    }

    fn refuse(&mut self, what: &str, bytes: usize) -> wasmtime::Result<()> {
        self.flags.memory_denied.store(true, Ordering::Release);
        Err(wasmtime::Error::msg(format!(
            "{what} of {bytes} bytes exceeds what this job may hold"
        )))
    }

    /// Re-reads what the guest may spend from the store's counter (`store`:
    /// fuel the store has left). `false` once wasm and host calls together
    /// have spent the limit.
    fn observe_fuel(&mut self, store: u64) -> bool {
        self.fuel_left = store.saturating_sub(self.host_fuel);
        self.fuel_left > 0
    }
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
    let stdout = Capture::new(env.capture_bytes);
    let stderr = Capture::new(env.capture_bytes);
    let log = Arc::new(Mutex::new(LogLines::new(env.capture_bytes)));
    let (outcome, fuel_used, new_state) =
        attempt(env, req, started, &stdout, &stderr, log.clone()).await;
    RunReport {
        outcome,
        fuel_used,
        wall_ms: started.elapsed().as_millis() as u64,
        log: assemble_log(&log, &stdout, &stderr),
        new_state,
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
    let backstop_cancel = cancel.clone();
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
        cancel: cancel.clone(),
        deadline: started + Duration::from_millis(limits.timeout_ms),
        fuel_on: env.fuel,
        fuel_left: limits.fuel,
        host_fuel: 0,
    };
    let mut store = Store::new(engine, data);
    store.limiter(|s| &mut s.limiter);
    if env.fuel
        && let Err(e) = store
            .set_fuel(limits.fuel)
            .and_then(|()| store.fuel_async_yield_interval(Some(FUEL_SYNC_INTERVAL)))
    {
        return (host_failure(e), 0, None);
    }
    // Every few ticks the guest stops to check its cancellation token and
    // deadline, then yields to the executor so one busy guest cannot starve
    // the other tasks of its tokio worker thread.
    let every = ticks_for(CHECK_EVERY.max(EPOCH_TICK));
    store.set_epoch_deadline(every);
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

    // The call is raced against the backstop *inside* the store's owner:
    // dropping the call unwinds the guest's fiber but keeps the store, so
    // the fuel it burnt is still read below however the run ended. (A run
    // dropped while parked in a host call used to report 0 fuel: a guest
    // could compute, log its answer and sleep to its deadline for free.)
    let timeout = Duration::from_millis(limits.timeout_ms);
    let call = async {
        match pre.instantiate_async(&mut store).await {
            Ok(agent) => agent.call_run(&mut store, &input).await.map_err(Stop::Run),
            Err(e) => Err(Stop::Instantiate(e)),
        }
    };
    let result = tokio::select! {
        biased;
        r = call => Ok(r),
        stopped = backstop(started, timeout, &backstop_cancel) => Err(stopped),
    };
    let fuel_used = if env.fuel {
        // What wasm burnt plus what host calls charged, never past the
        // limit (a host call may find the guest a few instructions short).
        let wasm = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        wasm.saturating_add(store.data().host_fuel).min(limits.fuel)
    } else {
        0
    };
    let outcome = match result {
        Ok(Ok(Ok(output))) => RunOutcome::Ok(output),
        Ok(Ok(Err(message))) => RunOutcome::Failed {
            kind: ErrorKind::AgentError,
            message,
        },
        Ok(Err(Stop::Run(e))) => classify(&e, &flags, limits.timeout_ms),
        Ok(Err(Stop::Instantiate(e))) => classify_instantiation(&e, &flags, limits.timeout_ms),
        Err(stopped) => stopped,
    };
    let new_state = match outcome {
        RunOutcome::Ok(_) => store.data_mut().new_state.take(),
        // Only a success commits state (agent state is committed with success); don't hand the
        // worker something it must not write.
        _ => None,
    };
    (outcome, fuel_used, new_state)
}

/// Where a run stopped with an error.
enum Stop {
    /// Instantiating the component failed.
    Instantiate(wasmtime::Error),
    /// `run` trapped or a limit stopped it.
    Run(wasmtime::Error),
}

/// Instantiation failed. The pool being full is the node's fault (the job
/// goes back to the queue uncharged); a limit the start code hit is that
/// limit; anything else will fail the same way every time (a start function
/// that traps, a data segment out of bounds): the component is invalid.
fn classify_instantiation(e: &wasmtime::Error, flags: &RunFlags, timeout_ms: u64) -> RunOutcome {
    if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return RunOutcome::Failed {
            kind: ErrorKind::NodeFault,
            message: format!("this node is out of instance slots: {}", describe(e)),
        };
    }
    match classify(e, flags, timeout_ms) {
        RunOutcome::Failed {
            kind: ErrorKind::Trap,
            message,
        } => RunOutcome::Failed {
            kind: ErrorKind::InvalidComponent,
            message: format!("the component cannot be instantiated: {message}"),
        },
        other => other,
    }
}

/// Maps how the guest stopped to the contract's error kinds. The flags
/// recorded at the point of the stop are checked first: a limit that made
/// the guest trap is reported as that limit, not as the trap it caused.
fn classify(e: &wasmtime::Error, flags: &RunFlags, timeout_ms: u64) -> RunOutcome {
    if flags.cancelled.load(Ordering::Acquire) {
        return RunOutcome::Interrupted;
    }
    if flags.host_fault.load(Ordering::Acquire) {
        return RunOutcome::Failed {
            kind: ErrorKind::NodeFault,
            message: format!("host error: {}", describe(e)),
        };
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

/// A failure of the host itself around a run (not the guest's doing): a
/// node fault, released uncharged, never the guest's `trap`.
fn host_failure(e: wasmtime::Error) -> RunOutcome {
    RunOutcome::Failed {
        kind: ErrorKind::NodeFault,
        message: format!("host error: {}", describe(&e)),
    }
}
