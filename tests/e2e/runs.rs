//! How runs end and what they cost: cancellation within a renewal,
//! slot-time billing, GPU placement.

use crate::common::stack::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_a_running_job_within_a_renewal() {
    let s = Stack::start(Opts::default()).await;
    let token = s.tenant("acme").await;
    let runaway = s.push(&token, "runaway").await;
    let id = s
        .submit(&token, json!({"component": runaway, "input": ""}))
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    // Let it burn a little so the instance is really executing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (st, v) = s
        .post(&format!("/v1/jobs/{id}/cancel"), &token, json!({}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let job = s.wait_terminal(&token, &id, 30).await;
    let took = t0.elapsed();
    assert_eq!(state(&job), "cancelled", "{job}");
    // One renewal period is lease/3; allow scheduling slack on a busy box.
    assert!(
        took < Duration::from_millis(s.lease_ms / 3 + 1500),
        "cancel took {took:?}"
    );
    // The slot is free again: a new job runs.
    let echo = s.push(&token, "echo").await;
    let id2 = s
        .submit(&token, json!({"component": echo, "input": "after"}))
        .await;
    let job2 = s.wait_terminal(&token, &id2, 30).await;
    assert_eq!(state(&job2), "succeeded", "{job2}");
    // Queued jobs cancel at once.
    let id3 = s
        .submit(
            &token,
            json!({"component": echo, "input": "later", "delay_ms": 60_000}),
        )
        .await;
    let (st, v) = s
        .post(&format!("/v1/jobs/{id3}/cancel"), &token, json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["state"], "cancelled");
    s.assert_books_balance("acme").await;
    s.stop().await;
}

/// Slot-time is billed however the run ends: a guest asleep in a host call
/// burns no fuel, yet pays for the wall time its slot was held (1 credit
/// per slot-second by default), whether it times out or is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slot_time_is_billed_however_the_run_ends() {
    let s = Stack::start(Opts::default()).await;
    let token = s.tenant("acme").await;
    let sleeper = s.push(&token, "sleeper").await;
    // The documented formula for a CPU job at the default prices.
    let formula = |job: &Value| -> i64 {
        let fuel = job["usage"]["fuel"].as_i64().unwrap();
        let wall = job["usage"]["wall_ms"].as_i64().unwrap();
        (fuel + 999_999) / 1_000_000 + (wall + 999) / 1000
    };

    let id = s
        .submit(
            &token,
            json!({"component": sleeper, "input": "60000", "timeout_ms": 1500}),
        )
        .await;
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(job["error"]["kind"], "timeout", "{job}");
    assert!(job["usage"]["wall_ms"].as_i64().unwrap() >= 1500, "{job}");
    let timed_out = job["usage"]["credits"].as_i64().unwrap();
    assert_eq!(timed_out, formula(&job), "{job}");
    assert!(timed_out >= 2, "1.5 s of a slot is not free: {job}");

    let id = s
        .submit(&token, json!({"component": sleeper, "input": "60000"}))
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    let (st, _) = s
        .post(&format!("/v1/jobs/{id}/cancel"), &token, json!({}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(state(&job), "cancelled", "{job}");
    assert!(job["usage"]["wall_ms"].as_i64().unwrap() > 0, "{job}");
    let credits = job["usage"]["credits"].as_i64().unwrap();
    assert_eq!(credits, formula(&job), "{job}");
    assert!(credits >= 1, "a cancelled run paid for its slot: {job}");
    let t = s.assert_books_balance("acme").await;
    assert_eq!(t["settled"].as_i64().unwrap(), timed_out + credits, "{t}");
    s.stop().await;
}

/// GPU jobs go only to workers that offer free GPU slots, and a tenant
/// waiting for a GPU does not hold up another tenant's CPU jobs. (Within one
/// tenant jobs start in order, so the test uses two tenants.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gpu_jobs_wait_for_a_worker_with_free_gpus() {
    let s = Stack::start(proc_opts()).await;
    let gpu_t = s.tenant_with("gpu-t", json!({"max_gpus": 1})).await;
    let cpu_t = s.tenant("cpu-t").await;
    let echo_g = s.push(&gpu_t, "echo").await;
    let echo_c = s.push(&cpu_t, "echo").await;
    let dir = s.dir.clone();
    let _cpu = WorkerProc::spawn(&s.url, 2, 1_000, &dir.join("cpu.log"));
    let gpu_job = s
        .submit(
            &gpu_t,
            json!({"component": echo_g, "input": "on a gpu", "gpus": 1}),
        )
        .await;
    let cpu_job = s
        .submit(&cpu_t, json!({"component": echo_c, "input": "on a cpu"}))
        .await;
    let job = s.wait_terminal(&cpu_t, &cpu_job, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    // Why the GPU job did not run, shown rather than waited for: the CPU
    // worker (2 free slots, no GPUs) claimed the CPU job, submitted after
    // the GPU job, so its CLAIM saw the GPU job queued and left it.
    let (_, job) = s.get(&format!("/v1/jobs/{gpu_job}"), &gpu_t).await;
    assert_eq!(
        state(&job),
        "queued",
        "a worker without GPUs took it: {job}"
    );
    assert_eq!(job["attempts"], 0, "{job}");

    let _gpu = WorkerProc::spawn_with(&s.url, 1, 1_000, &["--gpus", "1"], &dir.join("gpu.log"));
    let job = s.wait_terminal(&gpu_t, &gpu_job, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["output"], "on a gpu");
    assert_eq!(job["gpus"], 1);
    s.assert_books_balance("gpu-t").await;
    s.assert_books_balance("cpu-t").await;
    s.stop().await;
}
