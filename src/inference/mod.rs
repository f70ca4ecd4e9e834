//! Models as node resources: loaded once per worker, shared read-only by
//! every instance that calls `agentplane:agent/inference`.
//!
//! - [`ModelSpec`]: `--model NAME=PATH`, a Hugging Face model directory of
//!   the Llama architecture (`config.json`, `tokenizer.json`,
//!   `*.safetensors`), or `--model NAME=URL`, an OpenAI-compatible server
//!   on the node.
//! - [`Models`]: the node's models by name.
//! - `local`: the weights and tokenizer in this process (candle).
//! - `scheduler`: the one thread per local model that serves tenants in
//!   turn.
//! - `remote`: a model behind a URL, each tenant's requests there bounded.
//! - [`random`]: a model directory of random weights, to try it all out.
//!
//! Who may call which model, at what price, and how many tokens a job may
//! spend is the control plane's (`model::grants`); the host's `inference`
//! import checks and counts each call (`host::inference`).
//!
//! Metrics: `agentplane_inference_calls_total{tenant,model,outcome}`,
//! `agentplane_inference_tokens_total{tenant,model,direction}`.

mod local;
pub mod random;
mod remote;
mod scheduler;

use anyhow::Context as _;
use local::LocalModel;
use remote::Remote;
use scheduler::{Done, Driver, Work};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// Where a model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A model directory on this node, loaded into this process.
    Dir(PathBuf),
    /// An OpenAI-compatible server (`http://host:port/v1`), asked for the
    /// model by its name.
    Url(String),
}

/// One `--model` flag: a name and where the model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub source: Source,
}

impl ModelSpec {
    /// A model directory loaded into this process.
    pub fn dir(name: &str, path: impl Into<PathBuf>) -> ModelSpec {
        ModelSpec {
            name: name.to_string(),
            source: Source::Dir(path.into()),
        }
    }
}

impl FromStr for ModelSpec {
    type Err = String;

    /// `NAME=PATH` or `NAME=URL` (`http://` or `https://`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, at) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not NAME=PATH or NAME=URL"))?;
        if !crate::model::valid_name(name) {
            return Err(format!(
                "`{name}` is not a model name (1-64 of A-Z a-z 0-9 . _ -)"
            ));
        }
        if at.is_empty() {
            return Err(format!("`{s}` names no path"));
        }
        let source = if at.starts_with("http://") || at.starts_with("https://") {
            let url = reqwest::Url::parse(at).map_err(|e| format!("`{at}`: {e}"))?;
            Source::Url(url.as_str().trim_end_matches('/').to_string())
        } else {
            Source::Dir(PathBuf::from(at))
        };
        Ok(ModelSpec {
            name: name.to_string(),
            source,
        })
    }
}

/// What a model can do, as `inference.models` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    /// Longest prompt plus answer, in tokens (0: the server's own limit,
    /// unknown here).
    pub context_length: u32,
    pub can_complete: bool,
    pub can_embed: bool,
    /// Length of an embedding (0: unknown until one is made).
    pub dimensions: u32,
    /// Bytes of weights held in this process.
    pub bytes: u64,
    /// Bytes of key/value cache a token of a call holds in this process
    /// (0 for a model server's).
    pub kv_bytes_per_token: u64,
}

/// What an agent asks a model to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    /// `(role, content)` messages.
    Chat(Vec<(String, String)>),
}

impl Prompt {
    /// Bytes of text it carries.
    pub fn bytes(&self) -> usize {
        match self {
            Prompt::Text(t) => t.len(),
            Prompt::Chat(ms) => ms.iter().map(|(r, c)| r.len() + c.len()).sum(),
        }
    }

    /// The text a model without a chat template reads: one `role: content`
    /// line per message, then `assistant:`.
    pub fn render(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Prompt::Text(t) => std::borrow::Cow::Borrowed(t),
            Prompt::Chat(ms) => {
                let mut s = String::new();
                for (role, content) in ms {
                    s.push_str(role);
                    s.push_str(": ");
                    s.push_str(content);
                    s.push('\n');
                }
                s.push_str("assistant:");
                std::borrow::Cow::Owned(s)
            }
        }
    }
}

/// A prompt counted, ready to run.
pub struct Prepared {
    /// Its tokens (an upper bound for a server without `/tokenize`).
    pub tokens_in: u64,
    inner: PreparedInner,
}

enum PreparedInner {
    Tokens(Vec<u32>),
    Remote(Prompt),
}

/// Texts counted, ready to embed.
pub struct PreparedTexts {
    /// Their tokens in all, and the longest one's.
    pub tokens_in: u64,
    pub longest: u64,
    inner: PreparedTextsInner,
}

enum PreparedTextsInner {
    Tokens(Vec<Vec<u32>>),
    Remote(Vec<String>),
}

/// A completion as the model produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub text: String,
    pub tokens_out: u64,
    /// The model ended the answer itself (false: it reached its limit).
    pub stopped: bool,
}

enum Backend {
    Local {
        weights: Arc<LocalModel>,
        driver: Driver,
    },
    Remote(Remote),
}

/// One model of the node.
pub struct Model {
    info: ModelInfo,
    backend: Backend,
}

impl Model {
    fn load(spec: &ModelSpec, device: &candle_core::Device) -> anyhow::Result<Model> {
        match &spec.source {
            Source::Dir(path) => {
                let weights = Arc::new(LocalModel::load(path, device)?);
                let info = ModelInfo {
                    name: spec.name.clone(),
                    context_length: u32::try_from(weights.context_length()).unwrap_or(u32::MAX),
                    can_complete: true,
                    can_embed: true,
                    dimensions: u32::try_from(weights.dimensions()).unwrap_or(u32::MAX),
                    bytes: weights.bytes(),
                    kv_bytes_per_token: weights.kv_bytes_per_token(),
                };
                let driver = Driver::start(&spec.name, weights.clone())?;
                Ok(Model {
                    info,
                    backend: Backend::Local { weights, driver },
                })
            }
            Source::Url(url) => Ok(Model {
                info: ModelInfo {
                    name: spec.name.clone(),
                    context_length: 0,
                    can_complete: true,
                    can_embed: true,
                    dimensions: 0,
                    bytes: 0,
                    kv_bytes_per_token: 0,
                },
                backend: Backend::Remote(Remote::new(&spec.name, url)?),
            }),
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Counts `prompt`'s tokens: with the model's tokenizer, off the async
    /// threads, or with the model server's.
    pub async fn prepare(&self, prompt: Prompt, deadline: Instant) -> anyhow::Result<Prepared> {
        match &self.backend {
            Backend::Local { weights, .. } => {
                let w = weights.clone();
                let tokens = tokio::task::spawn_blocking(move || w.encode(&prompt.render()))
                    .await
                    .context("the tokenizer task failed")??;
                Ok(Prepared {
                    tokens_in: tokens.len() as u64,
                    inner: PreparedInner::Tokens(tokens),
                })
            }
            Backend::Remote(r) => Ok(Prepared {
                tokens_in: r.count(&prompt, deadline).await,
                inner: PreparedInner::Remote(prompt),
            }),
        }
    }

    /// Counts each text's tokens with the model's tokenizer; for a model
    /// server, bounds them from above (one token per byte and a few).
    pub async fn prepare_texts(&self, texts: Vec<String>) -> anyhow::Result<PreparedTexts> {
        let counts: Vec<u64>;
        let inner = match &self.backend {
            Backend::Local { weights, .. } => {
                let w = weights.clone();
                let tokens = tokio::task::spawn_blocking(move || {
                    texts
                        .iter()
                        .map(|t| w.encode(t))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .await
                .context("the tokenizer task failed")??;
                counts = tokens.iter().map(|t| t.len() as u64).collect();
                PreparedTextsInner::Tokens(tokens)
            }
            Backend::Remote(_) => {
                // Not one `/tokenize` per text: the upper bound is checked,
                // and the server's own count billed.
                counts = texts.iter().map(|t| remote::upper_bound(t)).collect();
                PreparedTextsInner::Remote(texts)
            }
        };
        Ok(PreparedTexts {
            tokens_in: counts.iter().sum(),
            longest: counts.iter().copied().max().unwrap_or(0),
            inner,
        })
    }

    /// Generates at most `max_new` tokens after `prompt` (queued behind
    /// other tenants' turns, `weight` the tenant's share of them, or sent
    /// to the model's server); gives up at `deadline`. Answers the completion and the tokens read, as the
    /// model counted them.
    pub async fn complete(
        &self,
        tenant: Arc<str>,
        weight: u32,
        prompt: Prepared,
        max_new: u64,
        temperature: f32,
        deadline: Instant,
    ) -> anyhow::Result<(Generated, u64)> {
        match (&self.backend, prompt.inner) {
            (Backend::Local { weights, driver }, PreparedInner::Tokens(tokens)) => {
                let work = Work::Complete {
                    prompt: tokens,
                    max_new: usize::try_from(max_new).unwrap_or(usize::MAX),
                    temperature,
                    seed: rand::random(),
                };
                let Done::Completion { tokens, stopped } =
                    driver.call(tenant, weight, work, deadline).await?
                else {
                    anyhow::bail!("the model answered a completion with embeddings");
                };
                let w = weights.clone();
                let n = tokens.len() as u64;
                let text = tokio::task::spawn_blocking(move || w.decode(&tokens))
                    .await
                    .context("the detokenizer task failed")??;
                let g = Generated {
                    text,
                    tokens_out: n,
                    stopped,
                };
                Ok((g, prompt.tokens_in))
            }
            (Backend::Remote(r), PreparedInner::Remote(p)) => {
                r.complete(tenant, &p, max_new, temperature, deadline).await
            }
            _ => anyhow::bail!("a prompt prepared for another model"),
        }
    }

    /// One embedding per text, and the tokens read as the model counted
    /// them.
    pub async fn embed(
        &self,
        tenant: Arc<str>,
        weight: u32,
        texts: PreparedTexts,
        deadline: Instant,
    ) -> anyhow::Result<(Vec<Vec<f32>>, u64)> {
        match (&self.backend, texts.inner) {
            (Backend::Local { driver, .. }, PreparedTextsInner::Tokens(t)) => {
                match driver
                    .call(tenant, weight, Work::Embed { texts: t }, deadline)
                    .await?
                {
                    Done::Embeddings(v) => Ok((v, texts.tokens_in)),
                    Done::Completion { .. } => {
                        anyhow::bail!("the model answered embeddings with a completion")
                    }
                }
            }
            (Backend::Remote(r), PreparedTextsInner::Remote(t)) => {
                r.embed(tenant, &t, deadline).await
            }
            _ => anyhow::bail!("texts prepared for another model"),
        }
    }
}

/// The node's models by name, loaded once at start.
#[derive(Default)]
pub struct Models {
    by_name: BTreeMap<String, Arc<Model>>,
}

impl Models {
    /// Loads every model of `specs` on the first GPU when there is one (and
    /// the binary was built with `--features cuda`), on the CPU otherwise.
    pub fn load(specs: &[ModelSpec]) -> anyhow::Result<Models> {
        let mut by_name = BTreeMap::new();
        if specs.is_empty() {
            return Ok(Models { by_name });
        }
        let local = specs.iter().any(|s| matches!(s.source, Source::Dir(_)));
        let device = if local {
            candle_core::Device::cuda_if_available(0)?
        } else {
            candle_core::Device::Cpu
        };
        for spec in specs {
            if by_name.contains_key(&spec.name) {
                anyhow::bail!("model `{}` is given twice", spec.name);
            }
            let model = Model::load(spec, &device)
                .with_context(|| format!("loading model `{}` from {:?}", spec.name, spec.source))?;
            tracing::info!(
                model = spec.name,
                bytes = model.info.bytes,
                device = match (&spec.source, device.is_cuda()) {
                    (Source::Url(_), _) => "remote",
                    (_, true) => "cuda",
                    _ => "cpu",
                },
                "model loaded"
            );
            by_name.insert(spec.name.clone(), Arc::new(model));
        }
        Ok(Models { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Model>> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Every model, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.by_name.values()
    }
}
