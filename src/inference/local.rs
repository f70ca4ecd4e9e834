//! A model loaded into this process with candle: a Hugging Face model
//! directory of the Llama architecture (`config.json`, `tokenizer.json` and
//! one or more `*.safetensors`), on the GPU when the worker has one and was
//! built with `--features cuda`, on the CPU otherwise.
//!
//! The weights are read once and never written: every sequence in flight
//! shares them and keeps only its own key/value cache ([`Sequence`]).

use anyhow::{Context as _, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig, LlamaEosToks};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Longest prompt plus answer served, whatever the model's configuration
/// says (candle's Llama attends to at most this many positions).
pub(crate) const MAX_CONTEXT: usize = candle_transformers::models::llama::DEFAULT_MAX_SEQ_LEN;

/// One loaded model: weights, tokenizer and what a sequence needs to start.
pub(crate) struct LocalModel {
    model: Llama,
    config: Config,
    tokenizer: Tokenizer,
    device: Device,
    dtype: DType,
    /// Tokens that end an answer (none: answers run to their limit).
    eos: Vec<u32>,
    /// Bytes of weights held (on the device).
    bytes: u64,
}

impl LocalModel {
    /// Loads the model directory `dir` onto `device`.
    pub(crate) fn load(dir: &Path, device: &Device) -> anyhow::Result<LocalModel> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        let config: LlamaConfig =
            serde_json::from_slice(&read("config.json")?).context("config.json")?;
        let eos = match &config.eos_token_id {
            Some(LlamaEosToks::Single(t)) => vec![*t],
            Some(LlamaEosToks::Multiple(ts)) => ts.clone(),
            None => Vec::new(),
        };
        let mut config = config.into_config(false);
        // Each sequence precomputes its rotary tables for the whole context
        // (a 128k-token model: 64 MiB per call) and candle's attention
        // keeps at most this many positions anyway.
        config.max_position_embeddings = config.max_position_embeddings.min(MAX_CONTEXT);
        if config.hidden_size == 0
            || config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
            || config.max_position_embeddings == 0
        {
            bail!("config.json: hidden_size must be a positive multiple of num_attention_heads");
        }
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
        // Half precision on a GPU; the CPU computes in f32.
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let mut tensors = HashMap::new();
        for file in weight_files(dir)? {
            let loaded = candle_core::safetensors::load(&file, device)
                .with_context(|| format!("reading {}", file.display()))?;
            tensors.extend(loaded);
        }
        let bytes = tensors
            .values()
            .map(|t| (t.elem_count() * dtype.size_in_bytes()) as u64)
            .sum();
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        // candle's loader unwraps a missing layer instead of answering an
        // error: a malformed directory must not take the worker down.
        let model =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Llama::load(vb, &config)))
                .map_err(|_| {
                    anyhow::anyhow!("the weights do not match config.json (a layer is missing)")
                })?
                .context("the weights do not match config.json")?;
        Ok(LocalModel {
            model,
            config,
            tokenizer,
            device: device.clone(),
            dtype,
            eos,
            bytes,
        })
    }

    /// Longest prompt plus answer, in tokens.
    pub(crate) fn context_length(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// Length of an embedding.
    pub(crate) fn dimensions(&self) -> usize {
        self.config.hidden_size
    }

    /// Bytes of key/value cache one token of a sequence holds.
    pub(crate) fn kv_bytes_per_token(&self) -> u64 {
        let c = &self.config;
        let head = c.hidden_size / c.num_attention_heads;
        (2 * c.num_hidden_layers * c.num_key_value_heads * head * self.dtype.size_in_bytes()) as u64
    }

    /// Bytes of weights this model holds.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The tokens of `text`, special tokens (a BOS) included as the
    /// tokenizer adds them: what the call is billed for.
    pub(crate) fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// The text of `tokens`, special tokens left out.
    pub(crate) fn decode(&self, tokens: &[u32]) -> anyhow::Result<String> {
        self.tokenizer
            .decode(tokens, true)
            .map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }

    /// A new sequence over `prompt` that may add `max_new` tokens.
    pub(crate) fn sequence(
        &self,
        prompt: Vec<u32>,
        max_new: usize,
        temperature: f32,
        seed: u64,
    ) -> anyhow::Result<Sequence> {
        let temperature = (temperature > 0.0).then_some(f64::from(temperature));
        Ok(Sequence {
            cache: Cache::new(true, self.dtype, &self.config, &self.device)?,
            pending: prompt,
            pos: 0,
            out: Vec::new(),
            max_new,
            sampler: LogitsProcessor::new(seed, temperature, None),
            stopped: false,
        })
    }

    /// The embedding of `tokens`: the mean of their input embeddings,
    /// scaled to unit length (a decoder model has no pooled output).
    pub(crate) fn embed(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        if tokens.is_empty() {
            return Ok(vec![0.0; self.dimensions()]);
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mean = self
            .model
            .embed(&input)?
            .mean(1)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let norm = mean.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let v = mean.to_vec1::<f32>()?;
        Ok(if norm > 0.0 {
            v.into_iter().map(|x| x / norm).collect()
        } else {
            v
        })
    }
}

/// The `*.safetensors` files of `dir`, in name order (sharded checkpoints
/// are `model-00001-of-00002.safetensors`, ...).
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no *.safetensors file", dir.display());
    }
    Ok(files)
}

/// One answer being generated: its own key/value cache over the shared
/// weights, fed a few tokens per turn of the model's scheduler.
pub(crate) struct Sequence {
    cache: Cache,
    /// Tokens not yet fed to the model (the prompt, then each new token).
    pending: Vec<u32>,
    /// Position of the first pending token.
    pos: usize,
    out: Vec<u32>,
    max_new: usize,
    sampler: LogitsProcessor,
    stopped: bool,
}

impl Sequence {
    /// Feeds the model until `steps` tokens were generated or the answer
    /// ended; answers whether it ended. The prompt goes in one step.
    pub(crate) fn advance(&mut self, model: &LocalModel, steps: usize) -> anyhow::Result<bool> {
        for _ in 0..steps {
            if self.done() {
                break;
            }
            let input = Tensor::new(self.pending.as_slice(), &model.device)?.unsqueeze(0)?;
            let logits = model
                .model
                .forward(&input, self.pos, &mut self.cache)?
                .squeeze(0)?;
            self.pos += self.pending.len();
            let next = self.sampler.sample(&logits)?;
            if model.eos.contains(&next) {
                self.stopped = true;
                break;
            }
            self.out.push(next);
            self.pending = vec![next];
        }
        Ok(self.done())
    }

    fn done(&self) -> bool {
        self.stopped || self.out.len() >= self.max_new
    }

    /// The tokens generated, and whether the model ended the answer itself
    /// (false: it reached its limit).
    pub(crate) fn finish(self) -> (Vec<u32>, bool) {
        (self.out, self.stopped)
    }
}
