//! A real `agentplane worker` process that cannot prepare a run: the
//! component's bytes or a context's bytes are gone from Redis (no fault of
//! the tenant's). Each run it cannot start is a node fault: uncharged, not
//! counted toward `max_attempts`, and bounded per job by
//! `--max-node-faults`; a context that comes back before the bound lets
//! the job run and be charged once.

mod common;

use crate::common::fixtures::tid;
use agentplane::control::keys::KeySpace;
use agentplane::control::{ControlConfig, ControlPlane, LedgerEntry};
use common::stack::{Stack, WorkerProc, proc_opts, state};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Not the default (5): the bound must come from the flag.
const MAX_NODE_FAULTS: u32 = 2;

fn worker(s: &Stack, max_faults: u32) -> WorkerProc {
    WorkerProc::spawn_with(
        &s.url,
        1,
        1_000,
        &[
            "--max-node-faults",
            &max_faults.to_string(),
            // Short backoffs between faults keep the test in seconds.
            "--retry-base-ms",
            "50",
            "--retry-max-ms",
            "200",
        ],
        &s.dir.join("worker.log"),
    )
}

async fn raw(s: &Stack) -> redis::aio::MultiplexedConnection {
    redis::Client::open(s.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn ledger(s: &Stack, tenant: &str) -> Vec<LedgerEntry> {
    let cp = ControlPlane::connect(&s.url, ControlConfig::default())
        .await
        .unwrap();
    cp.ledger(&tid(tenant)).await.unwrap()
}

fn ops<'a>(l: &'a [LedgerEntry], job: &str, op: &str) -> Vec<&'a LedgerEntry> {
    l.iter().filter(|e| e.job == job && e.op == op).collect()
}

/// A job that no node can prepare ends `node_fault` after exactly
/// `max_faults` runs, each released whole, none settled or counted.
async fn assert_bounded_fault(s: &Stack, token: &str, tenant: &str, id: &str, stage: &str) {
    let job = s.wait_terminal(token, id, 30).await;
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["error"]["kind"], "node_fault", "{job}");
    let msg = job["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!(
            "nodes failed to run this job {MAX_NODE_FAULTS} times; last: the node failed {stage}"
        )),
        "{msg}"
    );
    assert!(!msg.contains("sha256:"), "no internals: {msg}");
    assert_eq!(job["attempts"], 0, "node faults are not attempts: {job}");
    assert_eq!(job["usage"]["credits"], 0, "{job}");
    let l = ledger(s, tenant).await;
    let runs: Vec<u32> = ops(&l, id, "reserve").iter().map(|e| e.attempt).collect();
    assert_eq!(runs, vec![1, 2], "one run per fault, each its own: {l:?}");
    let released: Vec<(u32, i64)> = ops(&l, id, "release")
        .iter()
        .map(|e| (e.attempt, e.amount))
        .collect();
    let reserved: Vec<(u32, i64)> = ops(&l, id, "reserve")
        .iter()
        .map(|e| (e.attempt, e.amount))
        .collect();
    assert_eq!(released, reserved, "every reservation released whole");
    assert!(ops(&l, id, "settle").is_empty(), "nothing settled: {l:?}");
    let t = s.assert_books_balance(tenant).await;
    assert_eq!(t["settled"], 0, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_component_gone_from_redis_fails_node_fault_after_the_flag_s_bound() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let id = s
        .submit(
            &token,
            json!({"component": echo, "input": "hi", "max_attempts": 1}),
        )
        .await;
    let gone: u32 = redis::cmd("DEL")
        .arg(KeySpace::new("ap", 1).blob("comp", &echo))
        .query_async(&mut raw(&s).await)
        .await
        .unwrap();
    assert_eq!(gone, 1);
    let w = worker(&s, MAX_NODE_FAULTS);
    assert_bounded_fault(&s, &token, "acme", &id, "loading the component").await;
    drop(w);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_context_gone_from_redis_fails_node_fault_after_the_flag_s_bound() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let ctx = context(&s, &token).await;
    let mut c = raw(&s).await;
    let gone: u32 = redis::cmd("DEL")
        .arg(KeySpace::new("ap", 1).blob("ctx", &ctx))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(gone, 1);
    let id = s
        .submit(
            &token,
            json!({"component": echo, "input": "hi", "contexts": ["kb"], "max_attempts": 1}),
        )
        .await;
    let w = worker(&s, MAX_NODE_FAULTS);
    assert_bounded_fault(&s, &token, "acme", &id, "loading context `kb`").await;
    // The worker is unharmed: a job it can prepare runs.
    let ok = s
        .submit(&token, json!({"component": echo, "input": "after"}))
        .await;
    let job = s.wait_terminal(&token, &ok, 30).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    drop(w);
    s.stop().await;
}

/// A context missing for a moment (a replica that lags, a restore under
/// way): the first run is a node fault, handed back uncharged; once the
/// bytes are back the job runs, counted once and charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_context_missing_for_a_while_costs_one_node_fault_then_runs() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let ctx = context(&s, &token).await;
    let key = KeySpace::new("ap", 1).blob("ctx", &ctx);
    let mut c = raw(&s).await;
    let bytes: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    let _: u32 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    let id = s
        .submit(
            &token,
            json!({"component": echo, "input": "hi", "contexts": ["kb"], "max_attempts": 1}),
        )
        .await;
    // A high bound: the job must not fail before the bytes are back.
    let w = worker(&s, 50);
    let t0 = Instant::now();
    let job_key = KeySpace::new("ap", 1).job("acme", &id);
    loop {
        let faults: Option<u32> = redis::cmd("HGET")
            .arg(&job_key)
            .arg("faults")
            .query_async(&mut c)
            .await
            .unwrap();
        if faults.unwrap_or(0) >= 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no node fault");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(bytes)
        .query_async(&mut c)
        .await
        .unwrap();
    let job = s.wait_terminal(&token, &id, 30).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["output"], "hi", "{job}");
    assert_eq!(job["attempts"], 1, "the faults were not counted: {job}");
    let l = ledger(&s, "acme").await;
    let settles = ops(&l, &id, "settle");
    assert_eq!(settles.len(), 1, "charged once: {l:?}");
    assert_eq!(settles[0].amount, job["usage"]["credits"].as_i64().unwrap());
    let faults = ops(&l, &id, "reserve").len() - 1;
    assert!(faults >= 1, "{l:?}");
    // Every run but the one that settled was released whole; that one's
    // unused rest went back with its settle.
    assert_eq!(ops(&l, &id, "release").len(), faults, "{l:?}");
    let reserve = ops(&l, &id, "reserve").last().unwrap().amount;
    assert_eq!(settles[0].amount + settles[0].released, reserve, "{l:?}");
    let t = s.assert_books_balance("acme").await;
    assert_eq!(t["settled"], settles[0].amount, "{t}");
    drop(w);
    s.stop().await;
}

/// Uploads context `kb`; answers its digest.
async fn context(s: &Stack, token: &str) -> String {
    let (st, v): (_, Value) = s
        .post(
            "/v1/contexts",
            token,
            json!({"name": "kb", "documents": [{"id": "d1", "text": "hello"}]}),
        )
        .await;
    assert_eq!(st, reqwest::StatusCode::CREATED, "{v}");
    v["digest"].as_str().unwrap().to_string()
}
