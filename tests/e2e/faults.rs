//! Process-level faults with the real `agentplane worker` binary: SIGKILL,
//! SIGSTOP past the lease, SIGTERM drains, kills in a loop. Each job is
//! charged once, checked against the ledger.

use crate::common::books::{assert_charged_once, reader};
use crate::common::stack::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_worker_job_finishes_elsewhere_charged_once() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let hold = s.push(&token, "hold").await;
    let dir = s.dir.clone();
    let mut w1 = WorkerProc::spawn(&s.url, 1, 5_000, &dir.join("w1.log"));
    let before = s.assert_books_balance("acme").await;

    // `hold` busy-works for the given ms: long enough to be killed mid-run.
    let id = s
        .submit(&token, json!({"component": hold, "input": "0,3000"}))
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w1.signal(libc::SIGKILL);
    w1.wait_exit(Duration::from_secs(5));
    let killed_at = Instant::now();

    let _w2 = WorkerProc::spawn(&s.url, 1, 5_000, &dir.join("w2.log"));
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert!(job["attempts"].as_u64().unwrap() >= 2, "{job}");
    // Reclaimed within lease + a reaper period, then a full run.
    assert!(killed_at.elapsed() < Duration::from_secs(20));
    let after = s.assert_books_balance("acme").await;
    let charged = after["settled"].as_i64().unwrap() - before["settled"].as_i64().unwrap();
    // The ledger, not the job's own usage, says it was charged once.
    let settled = assert_charged_once(&reader(&s.url).await, "acme", &[id]).await;
    assert_eq!(vec![charged], settled, "{job} {after}");
    s.stop().await;
}

/// A killed worker's job runs again on another, idle worker within one
/// lease and a second of the kill (README: one lease plus one scheduler
/// tick of at most 250 ms, with no backoff): the reaper wakes at most a
/// quarter second late and puts the job straight back in its queue, and
/// the waiting worker is woken, not left to its next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_job_runs_again_within_a_lease_and_a_second() {
    // A lease long enough that a scheduler tick of a fifth of it would be
    // more than a second.
    const LEASE_MS: u64 = 6_000;
    let lease = LEASE_MS.to_string();
    let extra = ["--lease-ms", lease.as_str()];
    let s = Stack::start(Opts {
        lease_ms: LEASE_MS,
        ..proc_opts()
    })
    .await;
    let token = s.tenant("acme").await;
    let hold = s.push(&token, "hold").await;
    let dir = s.dir.clone();
    let mut w1 = WorkerProc::spawn_with(&s.url, 1, 5_000, &extra, &dir.join("w1.log"));
    let id = s
        .submit(&token, json!({"component": hold, "input": "0,20000"}))
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    // The second worker is up and idle before the kill.
    let _w2 = WorkerProc::spawn_with(&s.url, 1, 5_000, &extra, &dir.join("w2.log"));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    w1.signal(libc::SIGKILL);
    let killed_at = Instant::now();
    w1.wait_exit(Duration::from_secs(5));
    let job = s
        .wait_for(&token, &id, 30, |j| {
            state(j) == "running" && j["attempts"].as_u64() == Some(2)
        })
        .await;
    let back = killed_at.elapsed();
    eprintln!("a killed worker's job ran again after {back:?} (lease {LEASE_MS} ms)");
    assert!(
        back <= Duration::from_millis(LEASE_MS + 1_000),
        "ran again {back:?} after the kill, lease {LEASE_MS} ms: {job}"
    );
    s.stop().await;
}

/// A worker stopped (SIGSTOP) past its lease wakes while the job's next
/// run holds it: its RENEW and FINALIZE must be refused. Each run of `hold
/// …,stamp` reports when it started, so the kept output shows whose run
/// finalized: the new holder's, started after the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_worker_past_its_lease_cannot_finalize() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let hold = s.push(&token, "hold").await;
    let dir = s.dir.clone();
    let w1 = WorkerProc::spawn(&s.url, 1, 5_000, &dir.join("w1.log"));
    // A first job compiles `hold` on w1, so the next run starts its guest
    // as soon as it is claimed (well before the stop below).
    let warm = s
        .submit(&token, json!({"component": hold, "input": "0,1"}))
        .await;
    assert_eq!(
        state(&s.wait_terminal(&token, &warm, 60).await),
        "succeeded"
    );

    let id = s
        .submit(&token, json!({"component": hold, "input": "0,2000,stamp"}))
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    w1.signal(libc::SIGSTOP);
    let stopped_at = agentplane::model::now_ms();
    // Past the lease and a reaper period: the job is reclaimed.
    let _w2 = WorkerProc::spawn(&s.url, 1, 5_000, &dir.join("w2.log"));
    s.wait_for(&token, &id, 30, |j| {
        j["attempts"].as_u64().unwrap_or(0) >= 2 && state(j) == "running"
    })
    .await;
    // The stale worker wakes while the new attempt runs: its RENEW and
    // FINALIZE must be refused.
    w1.signal(libc::SIGCONT);
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    // Whose run is this? w1's started before the stop, w2's after it.
    let output = job["output"].as_str().unwrap_or_default();
    let started: u64 = output
        .rsplit("started at ")
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no start stamp in {job}"));
    assert!(
        started > stopped_at,
        "the stopped worker's run (started {started}, stopped {stopped_at}) finalized: {job}"
    );
    // Give the stale worker time to try whatever it would.
    tokio::time::sleep(Duration::from_millis(3 * PROC_LEASE_MS)).await;
    let (_, again) = s.get(&format!("/v1/jobs/{id}"), &token).await;
    assert_eq!(again, job, "a stale worker changed a finished job");
    s.assert_books_balance("acme").await;
    let cp = reader(&s.url).await;
    let settled = assert_charged_once(&cp, "acme", &[warm, id]).await;
    assert_eq!(settled[1], job["usage"]["credits"].as_i64().unwrap());
    drop(w1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_then_hands_back_unfinished_jobs_uncharged() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let runaway = s.push(&token, "runaway").await;
    let hold = s.push(&token, "hold").await;
    let dir = s.dir.clone();
    let mut w = WorkerProc::spawn(&s.url, 3, 2_000, &dir.join("w.log"));

    let done = s
        .submit(&token, json!({"component": echo, "input": "early"}))
        .await;
    assert_eq!(
        state(&s.wait_terminal(&token, &done, 60).await),
        "succeeded"
    );
    let before = s.assert_books_balance("acme").await;

    let stuck = s
        .submit(&token, json!({"component": runaway, "input": ""}))
        .await;
    // Finishes inside the 2 s drain.
    let short = s
        .submit(&token, json!({"component": hold, "input": "0,800"}))
        .await;
    s.wait_for(&token, &stuck, 30, |j| state(j) == "running")
        .await;
    s.wait_for(&token, &short, 30, |j| state(j) == "running")
        .await;
    w.signal(libc::SIGTERM);
    let status = w.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");

    // Finished before or during the drain: finished.
    let (_, j) = s.get(&format!("/v1/jobs/{done}"), &token).await;
    assert_eq!(state(&j), "succeeded");
    let (_, j) = s.get(&format!("/v1/jobs/{short}"), &token).await;
    assert_eq!(state(&j), "succeeded", "{j}");
    // Unfinished at the drain timeout: back in the queue, uncharged.
    let (_, j) = s.get(&format!("/v1/jobs/{stuck}"), &token).await;
    assert_eq!(state(&j), "queued", "{j}");
    assert_eq!(j["usage"]["credits"].as_i64().unwrap_or(0), 0, "{j}");
    let after = s.assert_books_balance("acme").await;
    let (_, short_job) = s.get(&format!("/v1/jobs/{short}"), &token).await;
    assert_eq!(
        after["settled"].as_i64().unwrap() - before["settled"].as_i64().unwrap(),
        short_job["usage"]["credits"].as_i64().unwrap(),
        "only the finished job is charged"
    );
    let (st, _) = s
        .post(&format!("/v1/jobs/{stuck}/cancel"), &token, json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

/// Workers SIGKILLed again and again while jobs run: every accepted job
/// still ends, and the books show each job charged exactly what it reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_worker_kills_lose_nothing_and_charge_once() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let hold = s.push(&token, "hold").await;
    let dir = s.dir.clone();
    let mut ids = Vec::new();
    for _ in 0..36 {
        ids.push(
            s.submit(
                &token,
                json!({"component": hold, "input": "0,300", "max_attempts": 20}),
            )
            .await,
        );
    }
    let mut workers: Vec<WorkerProc> = (0..3)
        .map(|i| WorkerProc::spawn(&s.url, 2, 1_000, &dir.join(format!("w{i}.log"))))
        .collect();
    // Kill one worker every 700 ms for a while, replacing it at once.
    for round in 0..8 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let victim = round % workers.len();
        workers[victim].signal(libc::SIGKILL);
        workers[victim].wait_exit(Duration::from_secs(5));
        workers[victim] = WorkerProc::spawn(
            &s.url,
            2,
            1_000,
            &dir.join(format!("w{victim}-{round}.log")),
        );
    }
    let (mut charged, mut retried) = (Vec::new(), 0);
    for id in &ids {
        let job = s.wait_terminal(&token, id, 120).await;
        assert_eq!(state(&job), "succeeded", "{job}");
        charged.push(job["usage"]["credits"].as_i64().unwrap());
        retried += usize::from(job["attempts"].as_u64().unwrap() > 1);
    }
    // The kills did land on running jobs.
    assert!(retried > 0, "no job was ever interrupted");
    s.assert_books_balance("acme").await;
    // One settle per job, for the run that ran to the end, and the ledger
    // adds up to what the tenant paid; each job shows what it was charged.
    let settled = assert_charged_once(&reader(&s.url).await, "acme", &ids).await;
    assert_eq!(settled, charged);
    drop(workers);
    s.stop().await;
}
