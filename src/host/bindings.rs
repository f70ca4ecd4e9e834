//! Bindings of the `agent` world (`wit/agent.wit`), generated once here, and
//! the host side of its imports. Each import sees only its own run's data
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

use super::run::RunState;
use crate::context::HeavyContext;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

wasmtime::component::bindgen!({
    world: "agent",
    path: "wit",
    // Search may scan a large index: it runs on the blocking pool while the
    // guest is suspended, so the host functions are async. Every import may
    // trap: a host call the guest cannot pay for (fuel, memory) stops it.
    imports: { default: async | trappable },
    exports: { default: async },
});

pub(crate) use self::agentplane::agent::{context, log, state};

// Results per search and the longest query embedding are the context's
// own bounds (`crate::context::{MAX_K, MAX_DIM}`): a query longer than any
// context may hold can never match, so it is refused before a scan is paid.
use crate::context::{MAX_DIM, MAX_K};

/// Longest text query accepted (bytes), same threat as above for BM25.
pub(crate) const MAX_QUERY_BYTES: usize = 64 << 10;

/// Largest state an agent may store. State travels through Redis on every
/// job of its agent; this keeps one agent from bloating the control plane.
pub(crate) const MAX_STATE_BYTES: usize = 16 << 20;

/// Longest `log.write` message kept (bytes); longer ones are cut.
const MAX_LOG_MESSAGE: usize = 8 << 10;

/// Bytes one host call may build for the guest (hits of one search, the
/// tool list). Beyond it the call traps as `memory_limit`: the host must not
/// build for one call more than a guest's memory could ever take.
pub(crate) const MAX_RESULT_BYTES: usize = 8 << 20;

/// Fuel every call of an `agentplane:agent` import costs, whatever it does:
/// a call is ~1 µs of host CPU, about a thousand wasm instructions. Stops a
/// guest from flooding the host with free calls.
pub(crate) const CALL_FUEL: u64 = 1_000;

/// Bytes copied in or out of the guest per unit of fuel (state, log lines,
/// hits, tools).
pub(crate) const BYTES_PER_FUEL: u64 = 4;

/// Fuel for `bytes` copied.
fn byte_fuel(bytes: usize) -> u64 {
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
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(level, &message[..end]);
        Ok(())
    }
}
