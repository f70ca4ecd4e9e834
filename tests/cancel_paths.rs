//! A cancel wins on every path an attempt can end by (README "Jobs"): a
//! worker drained by SIGTERM, a worker SIGKILLed and its lease reaped, an
//! attempt that fails on its own. The job ends `cancelled`, is never
//! requeued, and pays only what a finished attempt used. And cancelling a
//! job that already finished answers its state and changes nothing.

mod common;

use crate::common::fixtures::tid;
use agentplane::control::{
    AttemptOutcome, ControlConfig, ControlPlane, Finalized, Finish, LedgerEntry,
};
use agentplane::model::ErrorKind;
use common::stack::{PROC_LEASE_MS, Stack, WorkerProc, proc_opts, state};
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

async fn cp(s: &Stack) -> ControlPlane {
    ControlPlane::connect(
        &s.url,
        ControlConfig {
            lease_ms: PROC_LEASE_MS,
            ..ControlConfig::default()
        },
    )
    .await
    .unwrap()
}

fn ops(l: &[LedgerEntry], job: &str, op: &str) -> Vec<(u32, i64)> {
    l.iter()
        .filter(|e| e.job == job && e.op == op)
        .map(|e| (e.attempt, e.amount))
        .collect()
}

async fn cancel(s: &Stack, token: &str, id: &str) -> (StatusCode, serde_json::Value) {
    s.post(&format!("/v1/jobs/{id}/cancel"), token, json!({}))
        .await
}

/// SIGKILL the worker, cancel, and let the lease run out: the reaper ends
/// the job `cancelled` instead of requeuing it, the lost attempt uncharged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_then_reap_ends_cancelled_uncharged_and_never_requeued() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let sleeper = s.push(&token, "sleeper").await;
    let echo = s.push(&token, "echo").await;
    let mut w = WorkerProc::spawn(&s.url, 1, 1_000, &s.dir.join("w1.log"));
    let id = s
        .submit(
            &token,
            json!({"component": sleeper, "input": "60000", "max_attempts": 3}),
        )
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    w.signal(libc::SIGKILL);
    w.wait_exit(Duration::from_secs(5));
    let (st, v) = cancel(&s, &token, &id).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        v,
        json!({"id": id, "state": "running"}),
        "flagged, not ended"
    );
    // A live worker, so a requeued job would be run again.
    let w2 = WorkerProc::spawn(&s.url, 1, 1_000, &s.dir.join("w2.log"));
    let job = s.wait_terminal(&token, &id, 30).await;
    assert_eq!(state(&job), "cancelled", "{job}");
    assert_eq!(
        job["usage"]["credits"], 0,
        "the lost attempt is free: {job}"
    );
    // w2 runs what it is given: the cancelled job was never among it.
    let after = s
        .submit(&token, json!({"component": echo, "input": "after"}))
        .await;
    assert_eq!(
        state(&s.wait_terminal(&token, &after, 30).await),
        "succeeded"
    );
    let l = cp(&s).await.ledger(&tid("acme")).await.unwrap();
    let reserved = ops(&l, &id, "reserve");
    assert_eq!(reserved.len(), 1, "run once, never requeued: {l:?}");
    assert_eq!(ops(&l, &id, "release"), reserved, "released whole: {l:?}");
    assert!(ops(&l, &id, "settle").is_empty(), "{l:?}");
    let log = std::fs::read_to_string(&w2.log).unwrap();
    assert!(log.contains(&after), "the log names what w2 ran:\n{log}");
    assert!(!log.contains(&id), "w2 never claimed it:\n{log}");
    s.assert_books_balance("acme").await;
    drop(w2);
    s.stop().await;
}

/// Cancel and SIGTERM reach a stopped worker together (drain 0: the run is
/// stopped at once and handed back). Whichever the worker acts on first,
/// the renewal's `cancelled` or the drain's RELEASE, the job ends
/// `cancelled` and is not requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_during_a_drain_ends_cancelled_not_requeued() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let sleeper = s.push(&token, "sleeper").await;
    let mut w = WorkerProc::spawn(&s.url, 1, 0, &s.dir.join("w1.log"));
    let id = s
        .submit(
            &token,
            json!({"component": sleeper, "input": "60000", "max_attempts": 3}),
        )
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    w.signal(libc::SIGSTOP);
    let (st, v) = cancel(&s, &token, &id).await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("running")));
    w.signal(libc::SIGTERM);
    w.signal(libc::SIGCONT);
    let status = w.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "a drain exits cleanly: {status:?}");
    let job = s.wait_terminal(&token, &id, 10).await;
    assert_eq!(state(&job), "cancelled", "{job}");
    let l = cp(&s).await.ledger(&tid("acme")).await.unwrap();
    assert_eq!(ops(&l, &id, "reserve").len(), 1, "not requeued: {l:?}");
    // Charged what it used if the renewal won (FINALIZE), nothing if the
    // drain's RELEASE did; never both, never more than the formula.
    let settled = ops(&l, &id, "settle");
    let log = std::fs::read_to_string(&w.log).unwrap();
    assert!(settled.len() <= 1, "{l:?}");
    let credits = job["usage"]["credits"].as_i64().unwrap();
    assert_eq!(settled.first().map_or(0, |e| e.1), credits, "{job} {l:?}");
    if settled.is_empty() {
        assert!(log.contains("releasing"), "released by the drain:\n{log}");
    }
    s.assert_books_balance("acme").await;
    s.stop().await;
}

/// A cancel that lands while the attempt fails on its own (an `agent_error`
/// with attempts to spare): no retry, the job ends `cancelled`, and it pays
/// what the attempt used, by the formula.
#[tokio::test]
async fn a_cancel_during_a_failing_attempt_ends_cancelled_without_a_retry() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let id = s
        .submit(
            &token,
            json!({"component": echo, "input": "x", "max_attempts": 5}),
        )
        .await;
    // This test is the worker: it holds the lease while the tenant cancels.
    let cp = cp(&s).await;
    let claimed = cp.claim("test-worker", 1, 0).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let (st, v) = cancel(&s, &token, &id).await;
    assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("running")));
    let finish = Finish {
        outcome: AttemptOutcome::Failed {
            kind: ErrorKind::AgentError,
            message: "boom".into(),
        },
        fuel: 5_000_001,
        wall_ms: 2_001,
        log: String::new(),
        new_state: None,
        http: Default::default(),
        tokens: Default::default(),
    };
    let f = cp.finalize(&claimed[0].lease, &finish).await.unwrap();
    assert_eq!(f, Finalized::Cancelled);
    let job = s.wait_terminal(&token, &id, 5).await;
    assert_eq!(state(&job), "cancelled", "{job}");
    // ceil(5,000,001 / 10^6) + ceil(2,001 / 1000) = 6 + 3.
    assert_eq!(job["usage"]["credits"], 9, "{job}");
    assert!(
        cp.claim("test-worker", 1, 0).await.unwrap().is_empty(),
        "not retried"
    );
    let l = cp.ledger(&tid("acme")).await.unwrap();
    assert_eq!(ops(&l, &id, "settle"), vec![(1, 9)], "{l:?}");
    assert_eq!(ops(&l, &id, "reserve").len(), 1, "{l:?}");
    s.assert_books_balance("acme").await;
    s.stop().await;
}

/// Cancelling a finished job answers its state as it is, and changes
/// nothing: not the record, not the books.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_finished_job_answers_its_state_and_changes_nothing() {
    let s = Stack::start(common::stack::Opts::default()).await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let trap = s.push(&token, "trap").await;
    let ok = s
        .submit(&token, json!({"component": echo, "input": "done"}))
        .await;
    let failed = s
        .submit(
            &token,
            json!({"component": trap, "input": "", "max_attempts": 1}),
        )
        .await;
    for (id, want) in [(&ok, "succeeded"), (&failed, "failed")] {
        let before = s.wait_terminal(&token, id, 30).await;
        assert_eq!(state(&before), want, "{before}");
        let books = s.tenant_info("acme").await;
        let ledger = cp(&s).await.ledger(&tid("acme")).await.unwrap().len();
        let (st, v) = cancel(&s, &token, id).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v, json!({"id": id, "state": want}));
        let (_, after) = s.get(&format!("/v1/jobs/{id}"), &token).await;
        assert_eq!(after, before, "the record is unchanged");
        assert_eq!(s.tenant_info("acme").await, books);
        assert_eq!(
            cp(&s).await.ledger(&tid("acme")).await.unwrap().len(),
            ledger
        );
    }
    // Another tenant's finished job is not found, as if it did not exist.
    let other = s.tenant("other").await;
    let (st, v) = cancel(&s, &other, &ok).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    s.stop().await;
}
