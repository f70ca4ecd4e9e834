//! The host side of `agentplane:agent/inference`: a run's calls into the
//! node's shared models, checked against its tenant's grants and its job's
//! token allowance, and counted for its bill.
//!
//! Every refusal is a value (`error`), decided before the model runs: a
//! model the tenant was not granted is `not-allowed` (whether or not this
//! node has it), one it was granted that this node lacks `unknown-model`, a
//! call whose prompt its allowance cannot pay `over-budget`. A completion's
//! answer is cut to what the allowance has left (`finish: length`). The
//! call waits on the model within the job's wall clock: a run dropped at
//! its deadline drops the call, and the model's scheduler drops its work.

use super::bindings::agentplane::agent::inference as wit;
use super::limits::{
    CALL_FUEL, MAX_EMBED_TEXTS, MAX_PROMPT_BYTES, MAX_RESULT_BYTES, TOKENIZE_FUEL_PER_BYTE,
};
use super::state::{RunState, byte_fuel};
use crate::inference::{Model, Models, Prompt};
use crate::model::grants::{ModelGrant, TokenUse};
use std::sync::Arc;

/// What a job may do with the node's models.
#[derive(Debug, Clone, Default)]
pub struct InferenceGrant {
    /// The models its tenant may call, at the tenant's prices, as of the
    /// claim.
    pub models: Arc<Vec<ModelGrant>>,
    /// Tokens in and out the job may spend over all its calls (its
    /// reservation holds their price).
    pub max_tokens: u64,
    /// Its tenant's weight: a call of a tenant of weight w gets w times
    /// the model's time per round of a tenant of weight 1 (0 reads as 1).
    pub weight: u32,
}

/// A run's part of the node's models.
#[derive(Default)]
pub(crate) struct InferenceJob {
    grant: InferenceGrant,
    node: Arc<Models>,
    tenant: Arc<str>,
    used: TokenUse,
}

impl InferenceJob {
    pub(crate) fn new(grant: InferenceGrant, node: Arc<Models>, tenant: &str) -> InferenceJob {
        InferenceJob {
            grant,
            node,
            tenant: Arc::from(tenant),
            used: TokenUse::default(),
        }
    }

    /// What the run's calls used.
    pub(crate) fn used(&self) -> TokenUse {
        self.used
    }

    fn left(&self) -> u64 {
        self.grant.max_tokens.saturating_sub(self.used.tokens())
    }

    /// The model `name` and the tenant's grant of it.
    fn resolve(&self, name: &str) -> Result<(Arc<Model>, ModelGrant), wit::Error> {
        let Some(grant) = self.grant.models.iter().find(|g| g.model == name) else {
            return Err(wit::Error::NotAllowed(format!(
                "this tenant may not use a model named `{}`",
                name.escape_default()
            )));
        };
        match self.node.get(name) {
            Some(m) => Ok((m.clone(), grant.clone())),
            None => Err(wit::Error::UnknownModel(format!(
                "no model `{name}` is loaded on this node"
            ))),
        }
    }

    /// Counts a call's tokens at `grant`'s prices.
    fn bill(&mut self, grant: &ModelGrant, tokens_in: u64, tokens_out: u64) {
        self.used.tokens_in += tokens_in;
        self.used.tokens_out += tokens_out;
        self.used.millicredits = self
            .used
            .millicredits
            .saturating_add(grant.millicredits(tokens_in, tokens_out));
        let tenant = self.tenant.to_string();
        for (direction, n) in [("in", tokens_in), ("out", tokens_out)] {
            metrics::counter!("agentplane_inference_tokens_total",
                "tenant" => tenant.clone(), "model" => grant.model.clone(), "direction" => direction)
            .increment(n);
        }
    }

    /// Counts a call's outcome; `model` only once resolved (a guest's
    /// made-up names must not become label values).
    fn count<T>(&self, model: Option<&str>, answer: &Result<T, wit::Error>) {
        let outcome = match answer {
            Ok(_) => "ok",
            Err(wit::Error::UnknownModel(_)) => "unknown_model",
            Err(wit::Error::NotAllowed(_)) => "not_allowed",
            Err(wit::Error::OverBudget(_)) => "over_budget",
            Err(wit::Error::TooLong(_)) => "too_long",
            Err(wit::Error::Unsupported(_)) => "unsupported",
            Err(wit::Error::Failed(_)) => "failed",
        };
        metrics::counter!("agentplane_inference_calls_total",
            "tenant" => self.tenant.to_string(), "model" => model.unwrap_or("-").to_string(),
            "outcome" => outcome)
        .increment(1);
    }
}

/// The WIT prompt as the node's models take it.
fn prompt(p: wit::Prompt) -> Prompt {
    match p {
        wit::Prompt::Text(t) => Prompt::Text(t),
        wit::Prompt::Messages(ms) => {
            Prompt::Chat(ms.into_iter().map(|m| (m.role, m.content)).collect())
        }
    }
}

impl RunState {
    async fn complete_inner(
        &mut self,
        model: &str,
        prompt: Prompt,
        max_tokens: u32,
        temperature: f32,
    ) -> wasmtime::Result<Result<wit::Completion, wit::Error>> {
        let bytes = prompt.bytes();
        if bytes > MAX_PROMPT_BYTES {
            return Ok(Err(wit::Error::TooLong(format!(
                "the prompt is {bytes} bytes; at most {MAX_PROMPT_BYTES} are accepted"
            ))));
        }
        let (m, grant) = match self.inference.resolve(model) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        self.charge(TOKENIZE_FUEL_PER_BYTE * bytes as u64)?;
        let prepared = match m.prepare(prompt, self.deadline).await {
            Ok(p) => p,
            Err(e) => return Ok(Err(wit::Error::Failed(e.to_string()))),
        };
        let n_in = prepared.tokens_in;
        if n_in == 0 {
            return Ok(Err(wit::Error::Failed(
                "the prompt has no tokens; nothing was run".into(),
            )));
        }
        // 0: a model server's own limit, which it enforces itself.
        let context = match u64::from(m.info().context_length) {
            0 => u64::MAX,
            c => c,
        };
        if n_in >= context {
            return Ok(Err(wit::Error::TooLong(format!(
                "the prompt is {n_in} tokens; `{model}` reads at most {context} with its answer"
            ))));
        }
        let left = self.inference.left();
        let max_new = u64::from(max_tokens)
            .min(left.saturating_sub(n_in))
            .min(context - n_in);
        if n_in > left || (max_new == 0 && max_tokens > 0) {
            return Ok(Err(wit::Error::OverBudget(left)));
        }
        // The call's key/value cache lives on the host while it runs: the
        // tenant's node memory pays for it, or the call does not run.
        let kv = m.info().kv_bytes_per_token.saturating_mul(n_in + max_new);
        let Some(_kv) = self.limiter.hold(kv) else {
            return Ok(Err(wit::Error::Failed(format!(
                "the call's key/value cache ({kv} bytes) does not fit this tenant's memory \
                 on this node; nothing was run"
            ))));
        };
        let tenant = self.inference.tenant.clone();
        let made = m
            .complete(
                tenant,
                self.inference.grant.weight,
                prepared,
                max_new,
                temperature,
                self.deadline,
            )
            .await;
        let (g, read) = match made {
            Ok(x) => x,
            Err(e) => return Ok(Err(wit::Error::Failed(e.to_string()))),
        };
        // A model server counts for itself: never bill past the allowance
        // (its count can only differ from the one checked above for a
        // server without `/tokenize`, where that one was an upper bound).
        let tokens_in = read.min(left);
        let tokens_out = g.tokens_out.min(left - tokens_in);
        self.inference.bill(&grant, tokens_in, tokens_out);
        self.result_bytes(g.text.len())?;
        self.charge(byte_fuel(g.text.len()))?;
        Ok(Ok(wit::Completion {
            text: g.text,
            tokens_in: u32::try_from(tokens_in).unwrap_or(u32::MAX),
            tokens_out: u32::try_from(tokens_out).unwrap_or(u32::MAX),
            finish: if g.stopped {
                wit::FinishReason::Stop
            } else {
                wit::FinishReason::Length
            },
        }))
    }

    async fn embed_inner(
        &mut self,
        model: &str,
        texts: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Vec<f32>>, wit::Error>> {
        let bytes: usize = texts.iter().map(String::len).sum();
        if texts.len() > MAX_EMBED_TEXTS || bytes > MAX_PROMPT_BYTES {
            return Ok(Err(wit::Error::TooLong(format!(
                "{} texts of {bytes} bytes; at most {MAX_EMBED_TEXTS} texts of \
                 {MAX_PROMPT_BYTES} bytes in all are accepted",
                texts.len()
            ))));
        }
        let (m, grant) = match self.inference.resolve(model) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        if !m.info().can_embed {
            return Ok(Err(wit::Error::Unsupported(format!(
                "`{model}` does not embed"
            ))));
        }
        // An answer of a known size is refused before it is built; one of
        // a model server is measured when it comes.
        let known = texts.len() * (m.info().dimensions as usize * 4 + 8);
        if known > MAX_RESULT_BYTES {
            return Ok(Err(wit::Error::TooLong(format!(
                "{} embeddings would be {known} bytes; at most {MAX_RESULT_BYTES} are accepted",
                texts.len()
            ))));
        }
        self.charge(TOKENIZE_FUEL_PER_BYTE * bytes as u64)?;
        let prepared = match m.prepare_texts(texts).await {
            Ok(p) => p,
            Err(e) => return Ok(Err(wit::Error::Failed(e.to_string()))),
        };
        let context = match u64::from(m.info().context_length) {
            0 => u64::MAX,
            c => c,
        };
        if prepared.longest > context {
            return Ok(Err(wit::Error::TooLong(format!(
                "a text is {} tokens; `{model}` reads at most {context}",
                prepared.longest
            ))));
        }
        let left = self.inference.left();
        if prepared.tokens_in > left {
            return Ok(Err(wit::Error::OverBudget(left)));
        }
        let tenant = self.inference.tenant.clone();
        let weight = self.inference.grant.weight;
        let (vectors, read) = match m.embed(tenant, weight, prepared, self.deadline).await {
            Ok(v) => v,
            Err(e) => return Ok(Err(wit::Error::Failed(e.to_string()))),
        };
        self.inference.bill(&grant, read.min(left), 0);
        let answer: usize = vectors.iter().map(|v| v.len() * 4 + 8).sum();
        self.result_bytes(answer)?;
        self.charge(byte_fuel(answer))?;
        Ok(Ok(vectors))
    }
}

impl wit::Host for RunState {
    async fn complete(
        &mut self,
        model: String,
        prompt: wit::Prompt,
        max_tokens: u32,
        temperature: f32,
    ) -> wasmtime::Result<Result<wit::Completion, wit::Error>> {
        let prompt = self::prompt(prompt);
        self.begin_call(CALL_FUEL + byte_fuel(prompt.bytes() + model.len()))?;
        let answer = self
            .complete_inner(&model, prompt, max_tokens, temperature)
            .await?;
        let known = self.inference.node.get(&model).map(|_| model.as_str());
        self.inference.count(known, &answer);
        Ok(answer)
    }

    async fn embed(
        &mut self,
        model: String,
        texts: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Vec<f32>>, wit::Error>> {
        let bytes: usize = texts.iter().map(|t| t.len() + 8).sum();
        self.begin_call(CALL_FUEL + byte_fuel(bytes + model.len()))?;
        let answer = self.embed_inner(&model, texts).await?;
        let known = self.inference.node.get(&model).map(|_| model.as_str());
        self.inference.count(known, &answer);
        Ok(answer)
    }

    async fn models(&mut self) -> wasmtime::Result<Vec<wit::ModelInfo>> {
        self.begin_call(CALL_FUEL)?;
        let list: Vec<wit::ModelInfo> = self
            .inference
            .grant
            .models
            .iter()
            .filter_map(|g| {
                let info = self.inference.node.get(&g.model)?.info();
                Some(wit::ModelInfo {
                    name: info.name.clone(),
                    context_length: info.context_length,
                    can_complete: info.can_complete,
                    can_embed: info.can_embed,
                    dimensions: info.dimensions,
                    credits_per_1k_in: g.credits_per_1k_tokens_in,
                    credits_per_1k_out: g.credits_per_1k_tokens_out,
                })
            })
            .collect();
        let bytes: usize = list.iter().map(|m| m.name.len() + 40).sum();
        self.result_bytes(bytes)?;
        Ok(list)
    }

    async fn tokens_left(&mut self) -> wasmtime::Result<u64> {
        self.begin_call(CALL_FUEL)?;
        Ok(self.inference.left())
    }
}
