//! A busy worker without GPUs claims its next jobs in the FINALIZE call
//! that ends its runs (`src/worker/finalizer.rs`, `Handoff`), as BullMQ's
//! worker fetches its next job with the one it completes: its own CLAIM
//! calls stay few however many jobs it runs. A worker with GPUs claims in
//! its loop as before (FINALIZE claims no GPU jobs), and makes one CLAIM
//! per handful of jobs. Either way every job runs once and the books
//! balance.

mod common;

use common::stack::{Stack, WorkerProc, proc_opts, state};
use serde_json::json;

/// The sum of a metric's samples in a Prometheus text page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Queues `jobs` echo jobs, then drains them with one real worker process
/// of 4 slots (`extra` flags); answers its CLAIM calls and jobs claimed.
async fn drain(s: &Stack, tenant: &str, jobs: usize, extra: &[&str]) -> (f64, f64) {
    let token = s.tenant(tenant).await;
    let echo = s.push(&token, "echo").await;
    let mut ids = Vec::new();
    for i in 0..jobs {
        let (st, v) = s
            .post(
                "/v1/jobs",
                &token,
                json!({"component": echo, "input": format!("j{i}")}),
            )
            .await;
        assert_eq!(st, reqwest::StatusCode::CREATED, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let addr_s = addr.to_string();
    let mut flags = vec!["--metrics-listen", addr_s.as_str()];
    flags.extend_from_slice(extra);
    let log = s.dir.join(format!("worker-{tenant}.log"));
    let w = WorkerProc::spawn_with(&s.url, 4, 2000, &flags, &log);
    for id in &ids {
        let job = s.wait_terminal(&token, id, 120).await;
        assert_eq!(state(&job), "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
    }
    // A job shows `succeeded` as soon as its FINALIZE ran in Redis; the
    // worker counts the claims that call made once its answer is back, so
    // the page is read until it has caught up (or the wait runs out).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let page = loop {
        let page = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metric(&page, "agentplane_claimed_total") >= jobs as f64
            || std::time::Instant::now() > deadline
        {
            break page;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    drop(w);
    s.assert_books_balance(tenant).await;
    (
        metric(&page, "agentplane_claim_seconds_count"),
        metric(&page, "agentplane_claimed_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_claims_its_next_jobs_with_the_finalize_that_ends_its_runs() {
    agentplane::client::tls_provider();
    let s = Stack::start(proc_opts()).await;
    let jobs = 120;

    // Without GPUs: after filling its slots, the worker's loop hardly
    // claims; FINALIZE hands each freed slot its next job.
    let (loop_claims, claimed) = drain(&s, "cpu", jobs, &[]).await;
    eprintln!("without GPUs: {loop_claims} CLAIM calls of its own for {jobs} jobs");
    assert_eq!(claimed, jobs as f64);
    assert!(
        loop_claims <= 12.0,
        "{loop_claims} CLAIM calls of its own for {jobs} jobs"
    );

    // With a GPU, the loop claims every job itself: at most 4 per call.
    let (loop_claims, claimed) = drain(&s, "gpu", jobs, &["--gpus", "1"]).await;
    eprintln!("with a GPU: {loop_claims} CLAIM calls for {jobs} jobs");
    assert_eq!(claimed, jobs as f64);
    assert!(
        loop_claims >= (jobs / 4) as f64,
        "{loop_claims} CLAIM calls for {jobs} jobs on 4 slots"
    );
}
