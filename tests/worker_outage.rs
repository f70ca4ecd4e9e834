//! A real `agentplane worker` process while its Redis is down and after it
//! comes back: its claims back off (doubling from 100 ms, never a spin),
//! and once a fresh `redis-server` (empty script cache) is up it
//! reconnects, reloads its scripts and runs a job submitted after the
//! restart. (Renewals and FINALIZE during an outage: `worker_faults.rs`.)

mod common;

use common::stack::{Opts, Stack, WorkerProc, proc_opts, state};
use serde_json::json;
use std::time::{Duration, Instant};

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since midnight of a log line's timestamp
/// (`2026-01-01T12:34:56.789012Z ...`).
fn at(line: &str) -> f64 {
    let t = &line[11..26];
    let (h, m, s) = (&t[0..2], &t[3..5], &t[6..]);
    h.parse::<f64>().unwrap() * 3600.0
        + m.parse::<f64>().unwrap() * 60.0
        + s.parse::<f64>().unwrap()
}

/// When each "claim failed" line was logged (s) and its `retry_in` (ms).
fn claim_backoffs(log: &str) -> Vec<(f64, u64)> {
    strip_ansi(log)
        .lines()
        .filter(|l| l.contains("claim failed"))
        .map(|l| {
            let v = l
                .split("retry_in=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("no retry_in in {l:?}"));
            let ms = if let Some(ms) = v.strip_suffix("ms") {
                ms.parse::<f64>().unwrap() as u64
            } else {
                let s = v.strip_suffix('s').unwrap_or_else(|| panic!("{v}"));
                (s.parse::<f64>().unwrap() * 1000.0).round() as u64
            };
            (at(l), ms)
        })
        .collect()
}

/// Every line the worker logged about talking to Redis failing.
fn redis_warnings(log: &str) -> usize {
    strip_ansi(log)
        .lines()
        .filter(|l| l.contains("WARN") && (l.contains("CLAIM") || l.contains("claim failed")))
        .count()
}

async fn log_has(w: &WorkerProc, needle: &str, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let log = std::fs::read_to_string(&w.log).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(t0.elapsed() < within, "no `{needle}` in:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_back_off_while_redis_is_down_and_resume_after_a_restart() {
    let mut s = Stack::start(Opts {
        durable_redis: true,
        ..proc_opts()
    })
    .await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let w = WorkerProc::spawn(&s.url, 1, 1_000, &s.dir.join("worker.log"));
    // Up and claiming: it ran a job before the outage.
    let before = s
        .submit(&token, json!({"component": echo, "input": "before"}))
        .await;
    assert_eq!(
        state(&s.wait_terminal(&token, &before, 30).await),
        "succeeded"
    );

    s.redis.as_mut().unwrap().kill();
    let down = Duration::from_millis(4_500);
    tokio::time::sleep(down).await;
    let log = std::fs::read_to_string(&w.log).unwrap();
    let backoffs = claim_backoffs(&log);
    // Each failed claim waits twice as long as the one before (from 100 ms,
    // at most 5 s) before the next one starts: never a spin.
    assert!(backoffs.len() >= 2, "{backoffs:?}\n{log}");
    let want: Vec<u64> = (0..backoffs.len() as u32)
        .map(|i| (100u64 << i).min(5_000))
        .collect();
    let got: Vec<u64> = backoffs.iter().map(|b| b.1).collect();
    assert_eq!(got, want, "each retry waits twice as long");
    for w in backoffs.windows(2) {
        assert!(
            w[1].0 - w[0].0 >= w[0].1 as f64 / 1000.0,
            "the next claim started before its backoff was over: {backoffs:?}"
        );
    }
    // Every attempt to reach Redis is logged: a handful in 4.5 s (a spin
    // would log thousands).
    let tries = redis_warnings(&log);
    assert!(tries <= 20, "{tries} failed tries in {down:?}:\n{log}");

    // A fresh redis-server: the data is back from the append-only file.
    s.redis.as_mut().unwrap().restart();
    // Submit as soon as the API answers again.
    let t0 = Instant::now();
    let after = loop {
        let (st, v) = s
            .post(
                "/v1/jobs",
                &token,
                json!({"component": echo, "input": "after"}),
            )
            .await;
        if st == reqwest::StatusCode::CREATED {
            break v["id"].as_str().unwrap().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{st} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let job = s.wait_terminal(&token, &after, 30).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["output"], "after");
    // This worker ran it (the only one): it reconnected and reloaded.
    log_has(&w, &after, Duration::from_secs(5)).await;
    let failed_by_then = claim_backoffs(&std::fs::read_to_string(&w.log).unwrap()).len();
    // Claims succeed again: no more failures while it idles.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = std::fs::read_to_string(&w.log).unwrap();
    assert_eq!(claim_backoffs(&log).len(), failed_by_then, "{log}");
    // The restarted server is a fresh process: the parts' scripts (one
    // function library) are there again, from the append-only file or
    // loaded by the first call that missed them.
    let mut c = redis::Client::open(s.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let libs: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        format!("{libs:?}").contains("agentplane_"),
        "scripts there: {libs:?}"
    );
    s.assert_books_balance("acme").await;
    drop(w);
    s.stop().await;
}
