//! Search latency over one large context: 100,000 documents of synthetic text
//! from a small, skewed vocabulary, with 384-dimensional embeddings (the size
//! of common sentence-embedding models), k = 10.
//!
//! `cargo bench --bench context -- --warm-up-time 1 --measurement-time 3`

use agentplane::context::{ContextUpload, Document, HeavyContext, encode};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Instant;

const DOCUMENTS: usize = 100_000;
const DIM: usize = 384;
const VOCABULARY: usize = 2_000;
const WORDS_PER_DOCUMENT: usize = 40;
const K: usize = 10;

/// xorshift64: deterministic across runs, so every run ranks the same corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn word(i: usize) -> String {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fu", "go", "hi", "ja", "pe",
        "zu",
    ];
    let mut w = String::new();
    let mut n = i + 16;
    while n > 0 {
        w.push_str(SYLLABLES[n % 16]);
        n /= 16;
    }
    w
}

fn corpus() -> HeavyContext {
    let words: Vec<String> = (0..VOCABULARY).map(word).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let documents = (0..DOCUMENTS)
        .map(|i| {
            // Squaring a uniform draw skews towards low indices: a few common
            // words and a long tail, roughly like natural text.
            let text = (0..WORDS_PER_DOCUMENT)
                .map(|_| words[(rng.unit().powi(2) * VOCABULARY as f64) as usize].as_str())
                .collect::<Vec<_>>()
                .join(" ");
            let embedding = (0..DIM).map(|_| rng.unit() as f32 - 0.5).collect();
            Document {
                id: format!("doc-{i}"),
                text,
                embedding: Some(embedding),
            }
        })
        .collect();
    let upload = ContextUpload {
        name: "bench".into(),
        documents,
        tools: vec![],
    };
    let started = Instant::now();
    let enc = encode(&upload).expect("the synthetic corpus is valid");
    let encoded = started.elapsed();
    let started = Instant::now();
    let ctx = HeavyContext::decode(&enc.digest, &enc.bytes).expect("it decodes");
    eprintln!(
        "context: {} documents, dim {}, blob {} MB, held {} MB; encode {:?}, decode {:?}",
        ctx.documents(),
        ctx.dim(),
        enc.bytes.len() >> 20,
        ctx.size_bytes() >> 20,
        encoded,
        started.elapsed()
    );
    ctx
}

fn bench(c: &mut Criterion) {
    let ctx = corpus();
    let mut rng = Rng(42);
    let query: Vec<f32> = (0..DIM).map(|_| rng.unit() as f32 - 0.5).collect();
    // A common word, a mid-frequency one and a rare one.
    let text_query = format!("{} {} {}", word(3), word(300), word(1900));

    c.bench_function("search cosine 100k x 384d k=10", |b| {
        b.iter(|| ctx.search(black_box(&query), K).unwrap())
    });
    c.bench_function("search_text bm25 100k 3 terms k=10", |b| {
        b.iter(|| ctx.search_text(black_box(&text_query), K))
    });
    let one_rare = word(1900);
    c.bench_function("search_text bm25 100k 1 rare term k=10", |b| {
        b.iter(|| ctx.search_text(black_box(&one_rare), K))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
