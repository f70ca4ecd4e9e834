//! The state of one run and the host side of everything it imports.
//! Each import sees only its own run's data
//! ([`RunState`]): the contexts the job mounted, the state it was given.
//!
//! Traps and answers are kept apart: a guest-visible problem (unknown index,
//! oversized state) is the inner WIT `result`'s `Err`. A call traps only on a
//! limit: the fuel it costs (see `CALL_FUEL`, `BYTES_PER_FUEL` and each
//! function) is more than the guest has left (`fuel_exhausted`), or its
//! answer is larger than `MAX_RESULT_BYTES`, than the instance's memory
//! limit leaves room for, or than its tenant's node memory budget holds
//! (`memory_limit`). An answer is charged to that budget while the host
//! holds it: from when it is measured to the guest's next host call.

use super::bindings::AgentPre;
use super::bindings::agentplane::agent::{context, log, state};
use super::budget::{MemoryLimiter, RunFlags};
use super::http::{Egress, EgressJob};
use super::inference::InferenceJob;
use super::limits::{
    BYTES_PER_FUEL, CALL_FUEL, MAX_LOG_MESSAGE, MAX_QUERY_BYTES, MAX_RESULT_BYTES, MAX_STATE_BYTES,
};
use super::sandbox::{Capture, LiveLog};
// Results per search and the longest query embedding are the context's
// own bounds: a query longer than any context may hold can never match, so
// it is refused before a scan is paid.
use crate::context::{HeavyContext, MAX_DIM, MAX_K};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use wasmtime::Trap;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::WasiConfigVariables;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// A compiled component ready to instantiate.
pub struct LoadedComponent {
    pub(crate) digest: String,
    pub(crate) pre: AgentPre<RunState>,
    /// Bytes it holds in memory (what the component cache budget counts).
    pub(crate) size: usize,
    /// It imports `wasi:http/outgoing-handler`.
    pub(crate) outbound_http: bool,
    /// It imports `wasi:config/store`.
    pub(crate) reads_config: bool,
    /// It imports `agentplane:agent/inference`.
    pub(crate) inference: bool,
}

impl LoadedComponent {
    /// `sha256:<hex>` of the uploaded bytes it was compiled from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Whether it can make outgoing HTTP requests (imports
    /// `wasi:http/outgoing-handler`): its jobs reserve for them.
    pub fn outbound_http(&self) -> bool {
        self.outbound_http
    }

    /// Whether it reads `wasi:config/store`: its runs need their tenant's
    /// secrets.
    pub fn reads_config(&self) -> bool {
        self.reads_config
    }

    /// Whether it can call the node's models (imports
    /// `agentplane:agent/inference`): its jobs reserve for tokens.
    pub fn inference(&self) -> bool {
        self.inference
    }

    /// Approximate bytes of compiled code and metadata held in memory.
    pub fn size_bytes(&self) -> usize {
        self.size
    }
}

/// The store data of one run: what its host functions may see and nothing
/// more.
pub(crate) struct RunState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    /// `wasi:http`'s own state, and the hooks that send its requests
    /// under the tenant's egress policy.
    pub(crate) http: WasiHttpCtx,
    pub(crate) egress: Egress,
    /// What `wasi:config/store` answers: the job's tenant's secrets.
    pub(crate) config: Arc<WasiConfigVariables>,
    /// Its calls into the node's models, and what they used.
    pub(crate) inference: InferenceJob,
    /// Where `wasi` sends the guest's stdout and stderr: kept beside it so
    /// a warm instance's next run starts them empty.
    pub(crate) stdout: Capture,
    pub(crate) stderr: Capture,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) contexts: Vec<(String, Arc<HeavyContext>)>,
    pub(crate) state: Option<Vec<u8>>,
    pub(crate) new_state: Option<Vec<u8>>,
    pub(crate) log: LiveLog,
    pub(crate) flags: Arc<RunFlags>,
    pub(crate) cancel: CancellationToken,
    pub(crate) deadline: Instant,
    /// Fuel metering is on.
    pub(crate) fuel_on: bool,
    /// Fuel the guest may still spend as of the last epoch check, less what
    /// host calls charged since: what a host call may still spend.
    pub(crate) fuel_left: u64,
    /// Fuel host calls charged in all. Kept beside the store's own counter,
    /// not taken from it: compiled wasm caches its fuel in a register across
    /// the epoch check, so a `set_fuel` there would be lost.
    pub(crate) host_fuel: u64,
}

/// What one job brings to a store: all of a run's own state. A fresh store
/// starts with it; a warm one swaps it in for the last run's
/// ([`RunState::begin`]).
pub(crate) struct JobData {
    pub contexts: Vec<(String, Arc<HeavyContext>)>,
    pub state: Option<Vec<u8>>,
    pub log: LiveLog,
    pub flags: Arc<RunFlags>,
    pub cancel: CancellationToken,
    pub deadline: Instant,
    /// The job's fuel limit.
    pub fuel: u64,
    /// Where and how much it may send and receive over HTTP.
    pub egress: super::http::EgressGrant,
    /// What it reads through `wasi:config/store`: its tenant's secrets.
    pub config: Arc<WasiConfigVariables>,
    /// The models it may call and its token allowance.
    pub inference: InferenceJob,
}

impl JobData {
    /// The job's part of the store's [`Egress`].
    fn egress(&self) -> EgressJob {
        EgressJob {
            grant: self.egress.clone(),
            log: self.log.clone(),
        }
    }
}

impl RunState {
    /// The store data of a fresh instance for `job`; `egress` makes its
    /// [`Egress`] from the job's part of it.
    pub(crate) fn new(
        wasi: WasiCtx,
        table: ResourceTable,
        (stdout, stderr): (Capture, Capture),
        limiter: MemoryLimiter,
        fuel_on: bool,
        egress: impl FnOnce(EgressJob) -> Egress,
        job: JobData,
    ) -> RunState {
        RunState {
            wasi,
            table,
            http: WasiHttpCtx::new(),
            egress: egress(job.egress()),
            config: job.config,
            inference: job.inference,
            stdout,
            stderr,
            limiter,
            contexts: job.contexts,
            state: job.state,
            new_state: None,
            log: job.log,
            flags: job.flags,
            cancel: job.cancel,
            deadline: job.deadline,
            fuel_on,
            fuel_left: job.fuel,
            host_fuel: 0,
        }
    }

    /// Starts `job` on a warm instance: nothing of the last run's own state
    /// (log, captured output, flags, fuel, deadline, cancellation, agent
    /// state, mounts) is left. The WASI context and its resource table stay:
    /// the guest holds handles into them (its stdout stream, say).
    pub(crate) fn begin(&mut self, job: JobData) {
        self.egress.begin(job.egress());
        self.config = job.config;
        self.inference = job.inference;
        self.stdout.clear();
        self.stderr.clear();
        self.limiter.reuse(job.flags.clone());
        self.contexts = job.contexts;
        self.state = job.state;
        self.new_state = None;
        self.log = job.log;
        self.flags = job.flags;
        self.cancel = job.cancel;
        self.deadline = job.deadline;
        self.fuel_left = job.fuel;
        self.host_fuel = 0;
    }

    /// Lets go of what the finished run held on the host (agent state, the
    /// mounts, its log, an answer charged to the tenant) before the
    /// instance waits idle: an idle instance holds its linear memory only.
    pub(crate) fn park(&mut self) {
        self.limiter.reuse(self.flags.clone());
        self.contexts = Vec::new();
        self.state = None;
        self.new_state = None;
        self.log = LiveLog::new(0);
        self.config = Arc::default();
        self.inference = InferenceJob::default();
        self.egress.begin(EgressJob {
            grant: Default::default(),
            log: self.log.clone(),
        });
    }

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
        if bytes > MAX_RESULT_BYTES {
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
    pub(crate) fn observe_fuel(&mut self, store: u64) -> bool {
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

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}

/// Fuel for `bytes` copied.
pub(crate) fn byte_fuel(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(BYTES_PER_FUEL)
}

impl RunState {
    /// The mounted context named `index`; `""` names the first one mounted.
    fn index(&self, index: &str) -> Result<Arc<HeavyContext>, String> {
        let found = if index.is_empty() {
            self.contexts.first()
        } else {
            self.contexts.iter().find(|(name, _)| name == index)
        };
        match found {
            Some((_, ctx)) => Ok(ctx.clone()),
            None if self.contexts.is_empty() => {
                Err("no context is mounted for this job".to_string())
            }
            None => Err(format!(
                "no context named `{index}` is mounted for this job (mounted: {})",
                self.contexts
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

fn to_wit(hits: Vec<crate::context::Hit>) -> Vec<context::Hit> {
    hits.into_iter()
        .map(|h| context::Hit {
            id: h.id,
            score: h.score,
            text: h.text,
        })
        .collect()
}

fn hit_bytes(hits: &[crate::context::Hit]) -> usize {
    hits.iter().map(|h| h.id.len() + h.text.len() + 4).sum()
}

/// Set when the host call that started a search is dropped (its job was
/// cancelled or timed out while the search ran): the scan stops early.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl RunState {
    /// Runs `f` on the blocking pool; `f` sees a flag set if this call is
    /// dropped before it ends.
    async fn blocking<T: Send + 'static>(
        f: impl FnOnce(&AtomicBool) -> T + Send + 'static,
    ) -> Result<T, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let _guard = StopOnDrop(stop.clone());
        tokio::task::spawn_blocking(move || f(&stop))
            .await
            .map_err(|e| format!("a search task failed inside the host: {e}"))
    }

    /// Charges the bytes of hits about to be handed to the guest; refuses
    /// answers larger than [`MAX_RESULT_BYTES`].
    fn deliver(&mut self, hits: Vec<crate::context::Hit>) -> wasmtime::Result<Vec<context::Hit>> {
        let bytes = hit_bytes(&hits);
        self.result_bytes(bytes)?;
        self.charge(byte_fuel(bytes))?;
        Ok(to_wit(hits))
    }
}

impl context::Host for RunState {
    async fn search(
        &mut self,
        index: String,
        embedding: Vec<f32>,
        k: u32,
    ) -> wasmtime::Result<Result<Vec<context::Hit>, String>> {
        self.begin_call(CALL_FUEL + byte_fuel(embedding.len() * 4))?;
        if embedding.len() > MAX_DIM {
            return Ok(Err(format!(
                "embedding has {} dimensions; at most {MAX_DIM} are accepted",
                embedding.len()
            )));
        }
        let ctx = match self.index(&index) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        // A scan multiplies and adds once per dimension of every document:
        // charged up front, so a guest that cannot pay never starts one.
        self.charge((ctx.documents() as u64).saturating_mul(ctx.dim().max(1) as u64))?;
        let k = (k as usize).min(MAX_K);
        match Self::blocking(move |stop| ctx.search_until(&embedding, k, stop)).await {
            Ok(Ok(hits)) => self.deliver(hits).map(Ok),
            Ok(Err(e)) => Ok(Err(e)),
            Err(e) => Err(self.host_fault(e)),
        }
    }

    async fn search_text(
        &mut self,
        index: String,
        query: String,
        k: u32,
    ) -> wasmtime::Result<Result<Vec<context::Hit>, String>> {
        self.begin_call(CALL_FUEL + byte_fuel(query.len()))?;
        if query.len() > MAX_QUERY_BYTES {
            return Ok(Err(format!(
                "query is {} bytes; at most {MAX_QUERY_BYTES} are accepted",
                query.len()
            )));
        }
        let ctx = match self.index(&index) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        // BM25 scores into an accumulator of one slot per document.
        self.charge(ctx.documents() as u64)?;
        let k = (k as usize).min(MAX_K);
        match Self::blocking(move |stop| ctx.search_text_until(&query, k, stop)).await {
            Ok(hits) => self.deliver(hits).map(Ok),
            Err(e) => Err(self.host_fault(e)),
        }
    }

    async fn tools(&mut self) -> wasmtime::Result<Vec<context::Tool>> {
        self.begin_call(CALL_FUEL)?;
        // A context is mounted once however many names the job gave it:
        // the same registry under 16 names used to be copied 16 times.
        let mut unique: Vec<Arc<HeavyContext>> = Vec::new();
        for (_, ctx) in &self.contexts {
            if !unique.iter().any(|u| Arc::ptr_eq(u, ctx)) {
                unique.push(ctx.clone());
            }
        }
        let bytes: usize = unique.iter().map(|c| c.tool_bytes()).sum();
        self.result_bytes(bytes)?;
        self.charge(byte_fuel(bytes))?;
        // Measured and paid before anything is copied: an answer the guest
        // cannot take is refused without building it.
        let tools: Vec<_> = unique
            .iter()
            .flat_map(|c| c.tools().iter().cloned())
            .collect();
        Ok(tools
            .into_iter()
            .map(|t| context::Tool {
                name: t.name,
                description: t.description,
                schema: t.schema,
            })
            .collect())
    }
}

impl state::Host for RunState {
    async fn get(&mut self) -> wasmtime::Result<Option<Vec<u8>>> {
        let bytes = self.state.as_ref().map_or(0, |s| s.len());
        self.begin_call(CALL_FUEL + byte_fuel(bytes))?;
        // The copy handed out is a second one, beside the state the run
        // keeps: paid for like any other answer (state may exceed
        // `MAX_RESULT_BYTES`: what a job may set, it may read back).
        self.hold_answer(bytes)?;
        Ok(self.state.clone())
    }

    async fn set(&mut self, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        self.begin_call(CALL_FUEL + byte_fuel(value.len()))?;
        if value.len() > MAX_STATE_BYTES {
            return Ok(Err(format!(
                "state is {} bytes; at most {MAX_STATE_BYTES} are accepted",
                value.len()
            )));
        }
        // The value it replaces is dropped here, so it stops counting.
        self.new_state = None;
        self.keep_state(value.len())?;
        self.new_state = Some(value);
        Ok(Ok(()))
    }
}

impl log::Host for RunState {
    async fn write(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        self.begin_call(CALL_FUEL + byte_fuel(message.len()))?;
        let level = match level {
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        let mut end = message.len().min(MAX_LOG_MESSAGE);
        // (Secret values are replaced in `LiveLog::push`.)
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.log.push(level, &message[..end]);
        Ok(())
    }
}
