//! Inference through an agent against the same model called directly from
//! Rust, in the same run: tokens per second of one generation (a model of
//! 4 layers, 256 wide), and the cost of a call (a prompt and one token) on
//! the smallest model (2 layers, 64 wide), where the host's part shows
//! most.
//!
//! `direct/*` loads the model directory with candle and tokenizers and
//! runs the forward loop itself; `agent/*` runs the `infer` guest on a
//! host that loaded the same directory with `--model`'s code, so the
//! difference is the host's part: instantiating the agent, the WIT calls,
//! tokenizing on the blocking pool, the model's scheduler thread.
//!
//! `cargo bench --bench inference -- --warm-up-time 1 --measurement-time 5`

#[path = "../tests/common/guests.rs"]
#[allow(dead_code)]
mod guests;

use agentplane::host::{Host, HostConfig, InferenceGrant, RunOutcome, RunRequest};
use agentplane::inference::ModelSpec;
use agentplane::inference::random::{self, Shape};
use agentplane::model::Limits;
use agentplane::model::grants::ModelGrant;
use candle_core::{DType, Device, Tensor};
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::path::Path;
use std::sync::Arc;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// A model slow enough that a few hundred tokens take seconds.
const SHAPE: Shape = Shape::SMALL;
const PROMPT: &str = "once upon a time";
const TOKENS: usize = 64;
const CALLS: usize = 16;

/// The model called directly: what an application embedding candle does.
struct Direct {
    model: Llama,
    config: candle_transformers::models::llama::Config,
    tokenizer: tokenizers::Tokenizer,
}

impl Direct {
    fn load(dir: &Path) -> Direct {
        let config: LlamaConfig =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let config = config.into_config(false);
        let tensors =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Direct {
            model: Llama::load(vb, &config).unwrap(),
            config,
            tokenizer: tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap(),
        }
    }

    /// Tokenizes `prompt`, generates `n` tokens greedily, detokenizes.
    fn generate(&self, prompt: &str, n: usize) -> String {
        let mut tokens = self
            .tokenizer
            .encode(prompt, true)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut cache = Cache::new(true, DType::F32, &self.config, &Device::Cpu).unwrap();
        let mut sampler = LogitsProcessor::new(0, None, None);
        let (mut pos, mut out) = (0, Vec::with_capacity(n));
        for _ in 0..n {
            let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = self.model.forward(&input, pos, &mut cache).unwrap();
            pos += tokens.len();
            let next = sampler.sample(&logits.squeeze(0).unwrap()).unwrap();
            out.push(next);
            tokens = vec![next];
        }
        self.tokenizer.decode(&out, true).unwrap()
    }
}

fn request(c: &Arc<agentplane::host::LoadedComponent>, input: String) -> RunRequest {
    RunRequest {
        tenant: "bench".parse().unwrap(),
        job_id: "j".into(),
        component: c.clone(),
        input,
        limits: Limits {
            fuel: u64::MAX / 2,
            memory_bytes: 64 << 20,
            timeout_ms: 60_000,
        },
        contexts: Vec::new(),
        state: None,
        cancel: CancellationToken::new(),
        egress: Default::default(),
        config: Vec::new(),
        inference: InferenceGrant {
            models: Arc::new(
                ["m", "t"]
                    .map(|m| ModelGrant {
                        model: m.into(),
                        credits_per_1k_tokens_in: 1,
                        credits_per_1k_tokens_out: 1,
                    })
                    .to_vec(),
            ),
            max_tokens: 1_000_000,
            weight: 1,
        },
    }
}

fn calls(model: &str, n: usize, max_tokens: usize) -> String {
    let one = serde_json::json!({"complete": {"model": model, "prompt": PROMPT,
                                              "max_tokens": max_tokens}});
    serde_json::json!({"calls": [one], "repeat": n}).to_string()
}

fn inference(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    random::write(dir.path(), SHAPE, 1).unwrap();
    let direct = Direct::load(dir.path());
    let tiny_dir = tempfile::tempdir().unwrap();
    random::write(tiny_dir.path(), Shape::TINY, 1).unwrap();
    let tiny = Direct::load(tiny_dir.path());
    let rt = Runtime::new().unwrap();
    let host = Host::new(HostConfig {
        max_instances: 8,
        models: vec![
            ModelSpec::dir("m", dir.path().to_path_buf()),
            ModelSpec::dir("t", tiny_dir.path().to_path_buf()),
        ],
        ..HostConfig::default()
    })
    .unwrap();
    let bytes = guests::guest_bytes("infer");
    let digest = host.admit(&bytes).unwrap().digest;
    let infer = rt
        .block_on(host.component(&digest, || async move { Ok(Some(bytes)) }))
        .unwrap();
    let run = |input: String| {
        let r = rt.block_on(host.run(request(&infer, input)));
        assert!(matches!(r.outcome, RunOutcome::Ok(_)), "{:?}", r.outcome);
    };

    let mut g = c.benchmark_group("generate");
    g.throughput(Throughput::Elements(TOKENS as u64));
    g.bench_function("direct", |b| b.iter(|| direct.generate(PROMPT, TOKENS)));
    g.bench_function("agent", |b| b.iter(|| run(calls("m", 1, TOKENS))));
    g.finish();

    // A call of one token: a prompt read and one token out. The agent's
    // figure is one run of CALLS calls, so instantiation is shared.
    let mut g = c.benchmark_group("call");
    g.throughput(Throughput::Elements(CALLS as u64));
    g.bench_function("direct", |b| {
        b.iter(|| {
            for _ in 0..CALLS {
                tiny.generate(PROMPT, 1);
            }
        })
    });
    g.bench_function("agent", |b| b.iter(|| run(calls("t", CALLS, 1))));
    g.finish();
}

criterion_group!(benches, inference);
criterion_main!(benches);
