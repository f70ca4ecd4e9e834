//! A real `agentplane worker` process while its Redis is down: renewals
//! failing for a whole lease stop the run, a FINALIZE that cannot get
//! through gives up and leaves the job to the reaper, and in both cases the
//! job runs again once Redis is back, charged once. (Reconnection and
//! script reload after a Redis restart under load are in `chaos.rs`.)

mod common;

use common::stack::{Opts, Stack, WorkerProc, proc_opts};
use serde_json::json;
use std::time::{Duration, Instant};

fn durable() -> Opts {
    Opts {
        durable_redis: true,
        ..proc_opts()
    }
}

/// Waits until the worker's log holds `line`; answers the whole log.
async fn log_has(w: &WorkerProc, line: &str, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(&w.log).unwrap_or_default();
        if log.contains(line) {
            return log;
        }
        assert!(
            t0.elapsed() < within,
            "no `{line}` in the worker log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewals_failing_for_a_whole_lease_stop_the_run() {
    let mut s = Stack::start(durable()).await;
    let token = s.tenant("acme").await;
    let sleeper = s.push(&token, "sleeper").await;
    let w = WorkerProc::spawn(&s.url, 1, 1_000, &s.dir.join("worker.log"));
    let id = s
        .submit(&token, json!({"component": sleeper, "input": "6000"}))
        .await;
    s.wait_for(&token, &id, 30, |j| j["state"] == "running")
        .await;
    s.redis.as_mut().unwrap().kill();
    // With Redis still down, the worker gives the attempt up: no renewal
    // got through for a whole lease (2 s), long before the 6 s sleep ends.
    let killed = Instant::now();
    let log = log_has(&w, "lease lost; attempt discarded", Duration::from_secs(5)).await;
    assert!(killed.elapsed() < Duration::from_secs(5));
    assert!(log.contains("renew failed"), "{log}");
    assert!(!log.contains("finalize"), "the run was not stopped:\n{log}");

    s.redis.as_mut().unwrap().restart();
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    s.assert_books_balance("acme").await;
    drop(w);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finalize_that_cannot_get_through_leaves_the_job_to_the_reaper() {
    let mut s = Stack::start(durable()).await;
    let token = s.tenant("acme").await;
    let sleeper = s.push(&token, "sleeper").await;
    let w = WorkerProc::spawn(&s.url, 1, 1_000, &s.dir.join("worker.log"));
    let id = s
        .submit(&token, json!({"component": sleeper, "input": "800"}))
        .await;
    s.wait_for(&token, &id, 30, |j| j["state"] == "running")
        .await;
    s.redis.as_mut().unwrap().kill();
    // The run ends inside its lease; FINALIZE is retried for one lease and
    // then given up (the reaper owns the job by then).
    let log = log_has(
        &w,
        "finalize failed; leaving it to the reaper",
        Duration::from_secs(10),
    )
    .await;
    assert!(log.contains("finalize failed; retrying"), "{log}");

    s.redis.as_mut().unwrap().restart();
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["output"], "slept 800 ms", "{job}");
    assert_eq!(job["attempts"], 2, "the reaper handed it out again: {job}");
    s.assert_books_balance("acme").await;
    drop(w);
    s.stop().await;
}
