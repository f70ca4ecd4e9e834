//! A model directory of random weights, in the exact layout of a Hugging
//! Face Llama checkpoint: for trying inference out, for the tests and the
//! benchmark, with nothing to download (`agentplane random-model DIR`).
//!
//! Its tokenizer is byte-level with no merges, so every byte of a text is
//! one token: a prompt of n bytes is n tokens in. It has no end-of-text
//! token, so a completion always runs to its `max_tokens`.

use anyhow::Context as _;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The dimensions of a random model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// Width of each layer's MLP.
    pub intermediate: usize,
    /// Longest prompt plus answer.
    pub context: usize,
}

impl Shape {
    /// A few hundred KB: fast enough for tests that count tokens.
    pub const TINY: Shape = Shape {
        hidden: 64,
        layers: 2,
        heads: 4,
        intermediate: 128,
        context: 1024,
    };

    /// About 12 MB: a few hundred tokens take a second or more on a CPU.
    pub const SMALL: Shape = Shape {
        hidden: 256,
        layers: 4,
        heads: 4,
        intermediate: 512,
        context: 1024,
    };

    /// Bytes of f32 weights a model of this shape holds.
    pub fn bytes(&self) -> u64 {
        let (h, i) = (self.hidden as u64, self.intermediate as u64);
        let per_layer = 4 * h * h + 3 * h * i + 2 * h;
        4 * (2 * VOCAB as u64 * h + h + self.layers as u64 * per_layer)
    }
}

/// Tokens of the byte-level vocabulary.
const VOCAB: usize = 256;

/// Writes `config.json`, `tokenizer.json` and `model.safetensors` of a
/// Llama model of `shape` with weights drawn from `seed` into `dir`.
pub fn write(dir: &Path, shape: Shape, seed: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        shape.heads > 0
            && shape.hidden.is_multiple_of(shape.heads)
            && (shape.hidden / shape.heads).is_multiple_of(2),
        "hidden must be a multiple of heads with an even head size"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "vocab_size": VOCAB,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": shape.context,
        "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&byte_tokenizer())?,
    )?;

    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (h, i) = (shape.hidden, shape.intermediate);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut rand = |name: String, dims: (usize, usize)| -> anyhow::Result<()> {
        let values: Vec<f32> = (0..dims.0 * dims.1)
            .map(|_| rng.random_range(-0.08f32..0.08))
            .collect();
        t.insert(name, Tensor::from_vec(values, dims, &dev)?);
        Ok(())
    };
    rand("model.embed_tokens.weight".into(), (VOCAB, h))?;
    rand("lm_head.weight".into(), (VOCAB, h))?;
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        for w in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            rand(format!("{p}.self_attn.{w}.weight"), (h, h))?;
        }
        rand(format!("{p}.mlp.gate_proj.weight"), (i, h))?;
        rand(format!("{p}.mlp.up_proj.weight"), (i, h))?;
        rand(format!("{p}.mlp.down_proj.weight"), (h, i))?;
    }
    let ones = |n: usize| Tensor::ones(n, DType::F32, &dev);
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        t.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
    }
    t.insert("model.norm.weight".into(), ones(h)?);
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

/// A byte-level BPE tokenizer with no merges, in `tokenizer.json`'s form.
fn byte_tokenizer() -> serde_json::Value {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), json!(id)))
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    })
}
