//! Bindings of the `agent` world (`wit/agent.wit`), generated once here, and
//! the host side of its imports. Each import sees only its own run's data
//! ([`RunState`]): the contexts the job mounted, the state it was given.
//!
//! Traps and answers are kept apart: a guest-visible problem (unknown index,
//! oversized state) is the inner WIT `result`'s `Err`; nothing here traps.

use super::run::RunState;
use crate::context::HeavyContext;
use std::sync::Arc;

wasmtime::component::bindgen!({
    world: "agent",
    path: "wit",
    // Search may scan a large index: it runs on the blocking pool while the
    // guest is suspended, so the host functions are async.
    imports: { default: async },
    exports: { default: async },
});

pub(crate) use self::agentplane::agent::{context, log, state};

/// Results one search may ask for. Stops a guest from making the host sort
/// and copy a whole index into its memory in one call.
pub(crate) const MAX_K: u32 = 1000;

/// Longest embedding accepted (floats). Real models stay far below; the bound
/// stops a guest from making the host compare gigantic vectors.
pub(crate) const MAX_EMBEDDING_DIM: usize = 1 << 16;

/// Longest text query accepted (bytes), same threat as above for BM25.
pub(crate) const MAX_QUERY_BYTES: usize = 64 << 10;

/// Largest state an agent may store. State travels through Redis on every
/// job of its agent; this keeps one agent from bloating the control plane.
pub(crate) const MAX_STATE_BYTES: usize = 16 << 20;

/// Longest `log.write` message kept (bytes); longer ones are cut.
const MAX_LOG_MESSAGE: usize = 8 << 10;

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

impl context::Host for RunState {
    async fn search(
        &mut self,
        index: String,
        embedding: Vec<f32>,
        k: u32,
    ) -> Result<Vec<context::Hit>, String> {
        if embedding.len() > MAX_EMBEDDING_DIM {
            return Err(format!(
                "embedding has {} dimensions; at most {MAX_EMBEDDING_DIM} are accepted",
                embedding.len()
            ));
        }
        let ctx = self.index(&index)?;
        let k = k.min(MAX_K) as usize;
        tokio::task::spawn_blocking(move || ctx.search(&embedding, k))
            .await
            .map_err(|_| "search failed inside the host".to_string())?
            .map(to_wit)
    }

    async fn search_text(
        &mut self,
        index: String,
        query: String,
        k: u32,
    ) -> Result<Vec<context::Hit>, String> {
        if query.len() > MAX_QUERY_BYTES {
            return Err(format!(
                "query is {} bytes; at most {MAX_QUERY_BYTES} are accepted",
                query.len()
            ));
        }
        let ctx = self.index(&index)?;
        let k = k.min(MAX_K) as usize;
        tokio::task::spawn_blocking(move || ctx.search_text(&query, k))
            .await
            .map(to_wit)
            .map_err(|_| "search failed inside the host".to_string())
    }

    async fn tools(&mut self) -> Vec<context::Tool> {
        self.contexts
            .iter()
            .flat_map(|(_, ctx)| ctx.tools().iter())
            .map(|t| context::Tool {
                name: t.name.clone(),
                description: t.description.clone(),
                schema: t.schema.clone(),
            })
            .collect()
    }
}

impl state::Host for RunState {
    async fn get(&mut self) -> Option<Vec<u8>> {
        self.state.clone()
    }

    async fn set(&mut self, value: Vec<u8>) -> Result<(), String> {
        if value.len() > MAX_STATE_BYTES {
            return Err(format!(
                "state is {} bytes; at most {MAX_STATE_BYTES} are accepted",
                value.len()
            ));
        }
        self.new_state = Some(value);
        Ok(())
    }
}

impl log::Host for RunState {
    async fn write(&mut self, level: log::Level, message: String) {
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
    }
}
