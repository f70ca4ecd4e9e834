//! Agents over a mounted heavy context: rag-qa's search and tools, and a
//! thousand concurrent instances sharing one context without copying it.
//! Its own binary, so the RSS measurement sees only this test.

mod common;

use agentplane::context::{ContextUpload, Document, HeavyContext, MAX_DIM, Tool, encode};
use agentplane::host::{Host, HostConfig, LoadedComponent, RunOutcome, RunRequest};
use agentplane::model::{ErrorKind, Limits};
use common::host::{load, rss_bytes};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

/// A context of `n` documents; document 0 is the one about lighthouses.
/// With `dim > 0` every document carries an embedding of that dimension.
fn upload(n: usize, dim: usize) -> ContextUpload {
    // Deterministic, non-zero, varied vectors (a tiny LCG).
    let mut seed = 0x2545_f491_u32;
    let mut embedding = move || -> Option<Vec<f32>> {
        (dim > 0).then(|| {
            (0..dim)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        })
    };
    let mut documents = vec![Document {
        id: "lighthouse".into(),
        text: "The lighthouse keeper lights the lamp at dusk".into(),
        embedding: embedding(),
    }];
    for i in 1..n {
        documents.push(Document {
            id: format!("doc-{i}"),
            text: format!(
                "filler document number {i} about nothing in particular {}",
                "word ".repeat(20)
            ),
            embedding: embedding(),
        });
    }
    ContextUpload {
        name: "docs".into(),
        documents,
        tools: vec![Tool {
            name: "calculator".into(),
            description: "adds numbers".into(),
            schema: "{}".into(),
        }],
    }
}

async fn mounted(host: &Host, n: usize, dim: usize) -> Arc<HeavyContext> {
    let enc = encode(&upload(n, dim)).expect("context encodes");
    let bytes = enc.bytes.clone();
    host.context(&enc.digest, || async move { Ok(bytes) })
        .await
        .expect("context loads")
}

fn request(c: &Arc<LoadedComponent>, input: &str, ctx: &Arc<HeavyContext>) -> RunRequest {
    RunRequest {
        contexts: vec![("docs".into(), ctx.clone())],
        ..request_without_context(c, input)
    }
}

fn request_without_context(c: &Arc<LoadedComponent>, input: &str) -> RunRequest {
    RunRequest {
        tenant: "rag".parse().unwrap(),
        job_id: "j".into(),
        component: c.clone(),
        input: input.into(),
        limits: Limits {
            fuel: 10_000_000_000,
            memory_bytes: 64 * MIB,
            timeout_ms: 120_000,
        },
        contexts: Vec::new(),
        state: None,
        cancel: CancellationToken::new(),
        egress: Default::default(),
        config: Vec::new(),
        inference: Default::default(),
    }
}

#[tokio::test]
async fn rag_qa_searches_the_mounted_index_and_lists_tools() {
    let _serial = SERIAL.lock().await;
    let host = Host::new(HostConfig {
        max_instances: 16,
        ..HostConfig::default()
    })
    .unwrap();
    let ctx = mounted(&host, 50, 0).await;
    let rag = load(&host, "rag-qa").await;
    for input in [
        r#"{"question":"who lights the lamp?","index":"docs","k":2}"#,
        r#"{"question":"lighthouse keeper"}"#,
    ] {
        let r = host.run(request(&rag, input, &ctx)).await;
        let RunOutcome::Ok(out) = &r.outcome else {
            panic!("{:?}\n{}", r.outcome, r.log);
        };
        let v: serde_json::Value = serde_json::from_str(out).unwrap();
        assert_eq!(v["hits"][0]["id"], "lighthouse", "{v}");
        assert_eq!(v["tools"], serde_json::json!(["calculator"]));
    }
    let r = host
        .run(request(&rag, r#"{"question":"x","index":"nope"}"#, &ctx))
        .await;
    match &r.outcome {
        RunOutcome::Failed { message, .. } => assert!(message.contains("`nope`"), "{message}"),
        other => panic!("{other:?}"),
    }
}

/// The tests of this binary measure RSS: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs 1000 instances at once (every tenth one a rag-qa search when a
/// context is given) and answers how much the process's RSS peaked above
/// where it started. The others are sleepers, parked in a host call until
/// all of them are live at the same time; only then are they cancelled.
/// (Instances that each lived a fixed time never showed they overlapped:
/// on a loaded machine the first ones ended before the last ones started.)
async fn thousand_at_once(ctx: Option<Arc<HeavyContext>>, host: Arc<Host>) -> u64 {
    let sleeper = load(&host, "sleeper").await;
    let rag = load(&host, "rag-qa").await;
    let parked = match &ctx {
        Some(_) => 900,
        None => 1000,
    };
    let per_instance = parked_instance_bytes(&host, &sleeper).await;
    let before = rss_bytes();
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let host = host.clone();
        // With a context, all of them mount it.
        let mut req = match &ctx {
            Some(ctx) if i % 10 == 0 => request(&rag, r#"{"question":"lighthouse keeper"}"#, ctx),
            _ => RunRequest {
                tenant: "parked".parse().unwrap(),
                cancel: stop.clone(),
                ..request_without_context(&sleeper, "120000")
            },
        };
        if let Some(ctx) = &ctx {
            req.contexts = vec![("docs".into(), ctx.clone())];
        }
        tasks.push(tokio::spawn(async move { host.run(req).await }));
    }
    let (mut peak, mut live) = (0, 0);
    let t0 = std::time::Instant::now();
    while live < parked {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(100),
            "at most {live} of {parked} instances were live at once"
        );
        peak = peak.max(rss_bytes());
        live = live.max(host.tenant_memory_in_use("parked") / per_instance);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    peak = peak.max(rss_bytes());
    stop.cancel();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(
            matches!(r.outcome, RunOutcome::Ok(_) | RunOutcome::Interrupted),
            "{:?}\n{}",
            r.outcome,
            r.log
        );
        if matches!(r.outcome, RunOutcome::Interrupted) {
            assert!(r.wall_ms > 0, "a sleeper was cancelled before it ran");
        }
    }
    assert_eq!(host.tenant_memory_in_use("parked"), 0);
    eprintln!("rss before {} MiB, peak {} MiB", before / MIB, peak / MIB);
    peak.saturating_sub(before)
}

/// Bytes one sleeper holds while parked: the unit in which a tenant's
/// memory in use counts its live instances.
async fn parked_instance_bytes(host: &Arc<Host>, sleeper: &Arc<LoadedComponent>) -> u64 {
    let req = RunRequest {
        tenant: "solo".parse().unwrap(),
        ..request_without_context(sleeper, "120000")
    };
    let cancel = req.cancel.clone();
    let h = host.clone();
    let run = tokio::spawn(async move { h.run(req).await });
    let t0 = std::time::Instant::now();
    let bytes = loop {
        let b = host.tenant_memory_in_use("solo");
        if b > 0 {
            break b;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    // Parked in its sleep by now; its memory no longer changes.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let bytes = bytes.max(host.tenant_memory_in_use("solo"));
    cancel.cancel();
    assert_eq!(run.await.unwrap().outcome, RunOutcome::Interrupted);
    bytes
}

fn thousand_slot_host() -> Arc<Host> {
    Arc::new(
        Host::new(HostConfig {
            max_instances: 1100,
            max_memory_per_instance: 64 * MIB,
            tenant_memory_budget: 64 << 30,
            ..HostConfig::default()
        })
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_instances_fit_the_pool() {
    let _serial = SERIAL.lock().await;
    let growth = thousand_at_once(None, thousand_slot_host()).await;
    assert!(
        growth < 1024 * MIB,
        "1000 instances added {} MiB",
        growth / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_instances_share_one_context() {
    let _serial = SERIAL.lock().await;
    let host = thousand_slot_host();
    // 70k documents with 384-dim embeddings: over 100 MB decoded. A copy
    // per instance would need 100 GB for 1000 instances.
    let ctx = mounted(&host, 70_000, 384).await;
    assert!(
        ctx.size_bytes() >= 100 * MIB as usize,
        "context holds only {} MiB",
        ctx.size_bytes() as u64 / MIB
    );
    let growth = thousand_at_once(Some(ctx), host).await;
    assert!(
        growth < 1024 * MIB,
        "1000 instances added {} MiB",
        growth / MIB
    );
}

/// The longest query embedding a guest may pass is the longest a context
/// may hold (`context::MAX_DIM`), one bound in one place: the host used to
/// accept queries of up to 65,536 floats (and charge a scan for them) that
/// no context could ever match.
#[tokio::test]
async fn a_query_embedding_over_the_context_bound_is_refused_up_front() {
    let host = Host::new(HostConfig {
        max_instances: 8,
        ..HostConfig::default()
    })
    .unwrap();
    let ctx = mounted(&host, 4, 2).await;
    let searchk = load(&host, "searchk").await;
    let over = MAX_DIM + 1;
    let r = host
        .run(request(&searchk, &format!("1,{over}"), &ctx))
        .await;
    match &r.outcome {
        RunOutcome::Failed {
            kind: ErrorKind::AgentError,
            message,
        } => assert!(
            message.contains(&format!("at most {MAX_DIM} are accepted")),
            "{message}"
        ),
        other => panic!("expected the guest to see the bound, got {other:?}"),
    }
}
