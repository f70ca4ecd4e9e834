//! The heavy-context module through its public interface: validation,
//! encode → decode round trips, exact cosine and BM25 rankings, hostile
//! blobs, and the node cache (single flight, LRU under a byte budget).

use agentplane::context::{ContextError, ContextUpload, Document, HeavyContext, Tool, encode};
use agentplane::host::ContextCache;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn doc(id: &str, text: &str, embedding: Option<Vec<f32>>) -> Document {
    Document {
        id: id.into(),
        text: text.into(),
        embedding,
    }
}

fn upload(documents: Vec<Document>) -> ContextUpload {
    ContextUpload {
        name: "tenant-a/kb".into(),
        documents,
        tools: vec![Tool {
            name: "search_web".into(),
            description: "searches".into(),
            schema: r#"{"type":"object"}"#.into(),
        }],
    }
}

fn load(u: &ContextUpload) -> HeavyContext {
    let enc = encode(u).unwrap();
    HeavyContext::decode(&enc.digest, &enc.bytes).unwrap()
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn ids(hits: &[agentplane::context::Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.id.as_str()).collect()
}

// ---------------------------------------------------------------------------
// Validation and round trip.

#[test]
fn the_upload_json_of_the_contract_parses_and_encodes() {
    let body = r#"{"name":"docs","documents":[{"id":"1","text":"hello","embedding":[0.5,0.5]},
        {"id":"2","text":"world","embedding":[1,0]}],"tools":[{"name":"t","description":"d","schema":"{}"}]}"#;
    let u: ContextUpload = serde_json::from_str(body).unwrap();
    let enc = encode(&u).unwrap();
    assert_eq!((enc.documents, enc.dim), (2, 2));
    assert_eq!(enc.digest, digest_of(&enc.bytes));
    // Content addressed: same content, same digest, whatever the name.
    let mut renamed = u.clone();
    renamed.name = "other".into();
    assert_eq!(encode(&renamed).unwrap().digest, enc.digest);
}

#[test]
fn invalid_uploads_are_refused_with_the_problem_named() {
    let cases: Vec<(ContextUpload, &str)> = vec![
        (
            upload(vec![doc("x", "a", None), doc("x", "b", None)]),
            "repeats an id",
        ),
        (
            upload(vec![
                doc("x", "a", Some(vec![1.0, 0.0, 0.0])),
                doc("y", "b", Some(vec![1.0, 0.0])),
            ]),
            "dimension 2, expected 3",
        ),
        (
            upload(vec![doc("x", "a", None), doc("y", "b", Some(vec![1.0]))]),
            "all or none",
        ),
        (
            upload(vec![doc("x", "a", Some(vec![f32::INFINITY]))]),
            "non-finite",
        ),
        (
            ContextUpload {
                name: String::new(),
                ..upload(vec![])
            },
            "context name",
        ),
    ];
    for (u, expected) in cases {
        match encode(&u) {
            Err(ContextError::Invalid(m)) => assert!(m.contains(expected), "{m:?} ≠ {expected}"),
            other => panic!("expected Invalid naming {expected:?}, got {other:?}"),
        }
    }
}

#[test]
fn a_context_without_documents_still_carries_its_tools() {
    let ctx = load(&upload(vec![]));
    assert_eq!((ctx.documents(), ctx.dim()), (0, 0));
    assert_eq!(ctx.tools()[0].name, "search_web");
    assert!(ctx.search_text("anything", 10).is_empty());
    assert!(ctx.search(&[1.0], 10).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever valid upload goes in comes back out: ids, texts and tools
    /// unchanged, and each document is its own nearest neighbour.
    #[test]
    fn round_trip_preserves_the_upload(
        texts in prop::collection::vec("[a-z ]{0,40}", 1..20),
        seed in 1u32..100,
    ) {
        let docs: Vec<Document> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // Distinct directions: a one-hot component per document.
                let mut e = vec![0.001 * seed as f32; 24];
                e[i] = 1.0;
                doc(&format!("doc-{i}"), t, Some(e))
            })
            .collect();
        let u = upload(docs);
        let ctx = load(&u);
        prop_assert_eq!(ctx.documents(), u.documents.len());
        prop_assert_eq!(ctx.tools(), &u.tools[..]);
        for (i, d) in u.documents.iter().enumerate() {
            prop_assert_eq!(ctx.document(i), Some((d.id.as_str(), d.text.as_str())));
            let best = ctx.search(d.embedding.as_ref().unwrap(), 1).unwrap();
            prop_assert_eq!(&best[0].id, &d.id);
        }
    }
}

// ---------------------------------------------------------------------------
// Cosine search.

#[test]
fn cosine_returns_the_exact_top_k_on_a_constructed_set() {
    // Unit vectors at 0°, 10°, …, 170°; some given un-normalized lengths.
    let docs = (0..18)
        .map(|i| {
            let a = (i as f32 * 10.0).to_radians();
            let len = 1.0 + i as f32;
            doc(
                &format!("d{i}"),
                "",
                Some(vec![len * a.cos(), len * a.sin()]),
            )
        })
        .collect();
    let ctx = load(&upload(docs));
    let q = 33f32.to_radians();
    let hits = ctx.search(&[q.cos() * 5.0, q.sin() * 5.0], 4).unwrap();
    // Angular distances 3°, 7°, 13°, 17°.
    assert_eq!(ids(&hits), ["d3", "d4", "d2", "d5"]);
    for (hit, deg) in hits.iter().zip([3f32, 7.0, 13.0, 17.0]) {
        assert!((hit.score - deg.to_radians().cos()).abs() < 1e-5, "{hit:?}");
    }
}

#[test]
fn cosine_matches_a_brute_force_full_sort() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let dim = 48;
    let vectors: Vec<Vec<f32>> = (0..700)
        .map(|_| (0..dim).map(|_| next()).collect())
        .collect();
    let query: Vec<f32> = (0..dim).map(|_| next()).collect();
    let docs = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| doc(&i.to_string(), "", Some(v.clone())))
        .collect();
    let ctx = load(&upload(docs));

    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let mut expected: Vec<(usize, f64)> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let dot: f64 = v
                .iter()
                .zip(&query)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            (i, dot / (norm(v) * norm(&query)))
        })
        .collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));

    let hits = ctx.search(&query, 10).unwrap();
    assert_eq!(hits.len(), 10);
    for (hit, (i, score)) in hits.iter().zip(&expected) {
        assert_eq!(hit.id, i.to_string());
        assert!((f64::from(hit.score) - score).abs() < 1e-5);
    }
}

#[test]
fn equal_cosines_break_ties_by_document_order() {
    let docs = ["z", "y", "x"]
        .iter()
        .map(|id| doc(id, "", Some(vec![1.0, 1.0])))
        .collect();
    let ctx = load(&upload(docs));
    assert_eq!(ids(&ctx.search(&[1.0, 1.0], 2).unwrap()), ["z", "y"]);
}

// ---------------------------------------------------------------------------
// BM25.

#[test]
fn bm25_ranks_the_obviously_relevant_document_first() {
    let ctx = load(&upload(vec![
        doc(
            "cooking",
            "How to bake bread: flour, water, salt and yeast.",
            None,
        ),
        doc(
            "rust",
            "The Rust borrow checker enforces ownership; the borrow checker rejects data races.",
            None,
        ),
        doc(
            "garden",
            "Water the tomatoes daily and check the soil.",
            None,
        ),
        doc(
            "go",
            "Go has a garbage collector instead of a borrow checker.",
            None,
        ),
    ]));
    let hits = ctx.search_text("Rust borrow-checker", 10);
    assert_eq!(ids(&hits), ["rust", "go"]);
    assert!(hits[0].score > hits[1].score);
    assert_eq!(hits[0].text, ctx.document(1).unwrap().1);
    assert!(ctx.search_text("quantum", 10).is_empty());
}

/// N = 4, |d| = 2, 4, 1, 1, avgdl = 2. "apple" is in d0 (tf 1) and d1 (tf 2),
/// "pie" in d0 only.
#[test]
fn bm25_scores_match_hand_computation() {
    let ctx = load(&upload(vec![
        doc("d0", "apple pie", None),
        doc("d1", "apple apple banana cherry", None),
        doc("d2", "banana", None),
        doc("d3", "date", None),
    ]));
    let (k1, b, n, avgdl) = (1.2f64, 0.75f64, 4.0f64, 2.0f64);
    let idf = |df: f64| (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
    let term = |tf: f64, len: f64, df: f64| {
        idf(df) * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * len / avgdl))
    };
    let d0 = term(1.0, 2.0, 2.0) + term(1.0, 2.0, 1.0);
    let d1 = term(2.0, 4.0, 2.0);
    let hits = ctx.search_text("apple pie", 10);
    assert_eq!(ids(&hits), ["d0", "d1"]);
    assert!(
        (f64::from(hits[0].score) - d0).abs() < 1e-5,
        "{} vs {d0}",
        hits[0].score
    );
    assert!(
        (f64::from(hits[1].score) - d1).abs() < 1e-5,
        "{} vs {d1}",
        hits[1].score
    );
}

// ---------------------------------------------------------------------------
// Hostile blobs.

fn sample_blob() -> (String, Vec<u8>) {
    let enc = encode(&upload(vec![
        doc("a", "alpha beta", Some(vec![1.0, 2.0, 3.0])),
        doc("b", "gamma", Some(vec![-1.0, 0.5, 0.0])),
    ]))
    .unwrap();
    (enc.digest, enc.bytes)
}

fn is_corrupt<T>(r: Result<T, ContextError>) -> bool {
    matches!(r, Err(ContextError::Corrupt(_)))
}

#[test]
fn every_truncation_is_corrupt() {
    let (digest, bytes) = sample_blob();
    for len in 0..bytes.len() {
        let cut = &bytes[..len];
        assert!(is_corrupt(HeavyContext::decode(&digest, cut)), "len {len}");
        // Even with a matching digest, the parser sees the missing bytes.
        assert!(
            is_corrupt(HeavyContext::decode(&digest_of(cut), cut)),
            "len {len}"
        );
    }
}

#[test]
fn every_bit_flip_is_caught_by_the_digest_and_never_panics_the_parser() {
    let (digest, bytes) = sample_blob();
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(is_corrupt(HeavyContext::decode(&digest, &b)), "bit {bit}");
        // With the digest recomputed the flip reaches the parser: it may be
        // harmless (a letter of a text) but must be decoded or refused.
        if let Ok(ctx) = HeavyContext::decode(&digest_of(&b), &b) {
            assert_eq!(ctx.documents(), 2);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_blobs_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let (digest, mut b) = sample_blob();
        for (at, byte, kind) in edits {
            if b.is_empty() {
                break;
            }
            let i = at.index(b.len());
            match kind {
                0 => b[i] = byte,
                1 => { b.remove(i); }
                _ => b.insert(i, byte),
            }
        }
        let original = HeavyContext::decode(&digest, &b);
        prop_assert!(original.is_ok() == (digest == digest_of(&b)));
        let _ = HeavyContext::decode(&digest_of(&b), &b);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        counts in prop::array::uniform3(any::<u32>()),
        tail in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut b = b"APCTX\0\0\0".to_vec();
        b.extend_from_slice(&1u32.to_le_bytes());
        for c in counts {
            // Small counts reach deeper into the parser than random ones.
            b.extend_from_slice(&(c % 4).to_le_bytes());
        }
        b.extend_from_slice(&tail);
        let r = HeavyContext::decode(&digest_of(&b), &b);
        prop_assert!(r.is_ok() || is_corrupt(r));
    }
}

// ---------------------------------------------------------------------------
// Cache.

fn context_blob(text: &str) -> (String, Vec<u8>) {
    let enc = encode(&upload(vec![doc("only", text, Some(vec![1.0, 0.0]))])).unwrap();
    (enc.digest, enc.bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_callers_load_once_and_share_one_copy() {
    let cache = Arc::new(ContextCache::new(64 << 20));
    let (digest, bytes) = context_blob("shared");
    let ran = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (cache, digest, bytes, ran) =
            (cache.clone(), digest.clone(), bytes.clone(), ran.clone());
        tasks.spawn(async move {
            cache
                .get_or_load(&digest, || async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(bytes)
                })
                .await
                .unwrap()
        });
    }
    let all: Vec<Arc<HeavyContext>> = tasks.join_all().await;
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(cache.loads(), 1);
    assert!(all.iter().all(|c| Arc::ptr_eq(c, &all[0])));
    // A later call is a hit: the very same copy.
    let again = cache
        .get_or_load(&digest, || async {
            panic!("a cached context must not load again")
        })
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&again, &all[0]));
    assert_eq!((cache.len(), cache.bytes()), (1, all[0].size_bytes()));
}

#[tokio::test]
async fn evicts_the_least_recently_used_under_the_byte_budget() {
    // Same shape, so the same size: room for two, not three.
    let blobs: Vec<(String, Vec<u8>)> = ["aaaa", "bbbb", "cccc"]
        .iter()
        .map(|t| context_blob(t))
        .collect();
    let size = HeavyContext::decode(&blobs[0].0, &blobs[0].1)
        .unwrap()
        .size_bytes();
    for (d, b) in &blobs {
        assert_eq!(HeavyContext::decode(d, b).unwrap().size_bytes(), size);
    }
    let cache = ContextCache::new(size * 2 + size / 2);
    let get = |i: usize| {
        let (d, b) = blobs[i].clone();
        let cache = &cache;
        async move {
            cache
                .get_or_load(&d, || async move { Ok(b) })
                .await
                .unwrap()
        }
    };
    let a = get(0).await;
    get(1).await;
    // Touch a: b becomes the least recently used.
    assert!(Arc::ptr_eq(&get(0).await, &a));
    get(2).await;
    assert_eq!(cache.loads(), 3);
    assert_eq!((cache.len(), cache.bytes()), (2, 2 * size));
    assert!(cache.contains(&blobs[0].0) && cache.contains(&blobs[2].0));
    assert!(!cache.contains(&blobs[1].0));
    // b is loaded again; now a is the least recently used and goes.
    get(1).await;
    assert_eq!(cache.loads(), 4);
    assert!(!cache.contains(&blobs[0].0));
    assert!(cache.bytes() <= cache.budget());
}

#[tokio::test]
async fn a_context_larger_than_the_budget_is_served_but_not_kept() {
    let cache = ContextCache::new(16);
    let (digest, bytes) = context_blob("too big for sixteen bytes");
    for round in 1..=2 {
        let b = bytes.clone();
        let ctx = cache
            .get_or_load(&digest, || async move { Ok(b) })
            .await
            .unwrap();
        assert_eq!(ctx.documents(), 1);
        assert_eq!((cache.len(), cache.bytes(), cache.loads()), (0, 0, round));
    }
}

#[tokio::test]
async fn a_failed_load_is_shared_with_waiters_then_retried() {
    let cache = Arc::new(ContextCache::new(64 << 20));
    let (digest, bytes) = context_blob("retry");
    let (release, gate) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let (cache, digest) = (cache.clone(), digest.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&digest, || async move {
                    gate.await.ok();
                    anyhow::bail!("redis is down")
                })
                .await
        })
    };
    let waiter = {
        let (cache, digest) = (cache.clone(), digest.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&digest, || async {
                    panic!("the waiter must not run its loader")
                })
                .await
        })
    };
    // Current-thread runtime: yielding lets both tasks run up to their waits.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    release.send(()).unwrap();
    let first = first.await.unwrap().unwrap_err();
    assert_eq!(first.to_string(), "redis is down");
    let waiter = waiter.await.unwrap().unwrap_err();
    assert!(waiter.to_string().contains("redis is down"), "{waiter}");
    assert_eq!(cache.loads(), 1);
    // Failures are not cached: the next caller loads.
    let ctx = cache
        .get_or_load(&digest, || async move { Ok(bytes) })
        .await
        .unwrap();
    assert_eq!(ctx.digest(), digest);
    assert_eq!(cache.loads(), 2);
}

#[tokio::test]
async fn a_corrupt_blob_is_an_error_and_is_not_kept() {
    let cache = ContextCache::new(64 << 20);
    let (digest, mut bytes) = context_blob("x");
    bytes[20] ^= 1;
    let err = cache
        .get_or_load(&digest, || async move { Ok(bytes) })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<ContextError>(),
            Some(ContextError::Corrupt(_))
        ),
        "{err:#}"
    );
    assert!(cache.is_empty());
}

#[tokio::test]
async fn a_cancelled_loader_hands_over_to_a_waiter() {
    let cache = Arc::new(ContextCache::new(64 << 20));
    let (digest, bytes) = context_blob("handover");
    let stuck = {
        let (cache, digest) = (cache.clone(), digest.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&digest, || {
                    std::future::pending::<anyhow::Result<Vec<u8>>>()
                })
                .await
        })
    };
    let waiter = {
        let (cache, digest) = (cache.clone(), digest.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(&digest, || async move { Ok(bytes) })
                .await
        })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(cache.loads(), 1, "the waiter joins the stuck load");
    stuck.abort();
    let ctx = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter took over")
        .unwrap()
        .unwrap();
    assert_eq!(ctx.digest(), digest);
    assert_eq!(cache.loads(), 2);
    assert!(cache.contains(&digest));
}
