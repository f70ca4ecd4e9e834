//! Attacks from inside a guest: see `hostile.rs`.
//!
//! Hostile guests used here: `deadline` (sleep-at-deadline), the pool hog,
//! nine-memories and compile-bomb components (WAT, built below),
//! `toolsamp` (tools() amplification), `callflood` (host-call flood),
//! `bigstate` (huge state.set), `searchk` (huge search k), `flood` (output
//! and log flood), `recurse` (deep recursion), `hog` (memory growth),
//! `runaway` (endless loop) and `escape` (files, env, network).

use crate::common::fixtures::tid;
use crate::common::stack::*;
use agentplane::control::{ControlConfig, ControlPlane};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Digest;
use std::time::{Duration, Instant};

/// What a victim's job may take end to end on a loaded 2-core CI machine
/// while an attack runs next to it (an echo takes milliseconds when idle).
const VICTIM_LATENCY: Duration = Duration::from_secs(10);

/// Uploads raw component bytes; answers status and body.
async fn push_bytes(s: &Stack, token: &str, bytes: Vec<u8>) -> (StatusCode, Value, Duration) {
    let t0 = Instant::now();
    let resp = s
        .http
        .post(format!("{}/v1/components", s.base))
        .bearer_auth(token)
        .timeout(Duration::from_secs(20))
        .body(bytes)
        .send()
        .await
        .expect("upload answered within 20 s");
    let st = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (st, v, t0.elapsed())
}

/// Runs `n` echo jobs of the victim at once; each must succeed within
/// [`VICTIM_LATENCY`] of its submission.
async fn victim_runs(s: &Stack, token: &str, echo: &str, n: usize) {
    let mut ids = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let id = s
            .submit(token, json!({"component": echo, "input": format!("v{i}")}))
            .await;
        ids.push((id, t0, i));
    }
    for (id, t0, i) in ids {
        let job = s
            .wait_terminal(token, &id, VICTIM_LATENCY.as_secs() + 20)
            .await;
        assert_eq!(state(&job), "succeeded", "victim job: {job}");
        assert_eq!(job["output"], format!("v{i}"), "{job}");
        assert!(
            t0.elapsed() < VICTIM_LATENCY,
            "victim job took {:?}: {job}",
            t0.elapsed()
        );
    }
}

/// A component exporting `run` (answers `ok` after `body` runs), plus
/// `extra` (more core modules and instances) inside it.
fn component(body: &str, extra: &str) -> Vec<u8> {
    let wat = format!(
        r#"(component
  (core module $m
    (memory (export "memory") 1)
    (table 4 funcref)
    (global $bump (mut i32) (i32.const 4096))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (global.get $bump))
      (global.set $bump (i32.add (global.get $bump) (i32.add (local.get 3) (i32.const 8))))
      (local.get $p))
    (data (i32.const 100) "ok")
    (func (export "run") (param i32 i32) (result i32)
      {body}
      (i32.store (i32.const 0) (i32.const 0))
      (i32.store (i32.const 4) (i32.const 100))
      (i32.store (i32.const 8) (i32.const 2))
      (i32.const 0)))
  (core instance $i (instantiate $m))
  {extra}
  (func (export "run") (param "input" string) (result (result string (error string)))
    (canon lift (core func $i "run") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
)"#
    );
    wat::parse_str(&wat).expect("valid component text")
}

/// A component of `instances` core instances holding `memories` memories
/// and `tables` tables in all (`tables` a multiple of 4), spinning in `run`.
fn pool_hog(instances: usize, memories: usize, tables: usize) -> Vec<u8> {
    // The main module holds 1 memory and 4 tables; each `$mem` 1 and 4.
    let mem_modules = memories - 1;
    let extra_tables = tables - 4 - 4 * mem_modules;
    assert_eq!(extra_tables % 4, 0);
    let tab_modules = extra_tables / 4;
    let empties = instances - 1 - mem_modules - tab_modules;
    let mut extra = String::from(
        "(core module $mem (memory 1) (table 4 funcref))\n\
         (core module $tab (table 4 funcref))\n(core module $e)\n",
    );
    for _ in 0..mem_modules {
        extra.push_str("(core instance (instantiate $mem))\n");
    }
    for _ in 0..tab_modules {
        extra.push_str("(core instance (instantiate $tab))\n");
    }
    for _ in 0..empties {
        extra.push_str("(core instance (instantiate $e))\n");
    }
    component("(loop $spin (br $spin))", &extra)
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// 7.1: a guest that computes, logs its answer and then sleeps past its
/// deadline in a host call used to be billed 0 fuel (and 0 credits): the run
/// was dropped with its store. Now it is billed what it burnt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_at_deadline_is_billed_the_fuel_it_burnt() {
    let s = Stack::start(Opts::default()).await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let deadline = s.push(&mallory, "deadline").await;
    let echo = s.push(&victim, "echo").await;

    // What the work costs when the guest returns at once.
    let id = s
        .submit(
            &mallory,
            json!({"component": deadline, "input": "3000000,0"}),
        )
        .await;
    let honest = s.wait_terminal(&mallory, &id, 60).await;
    assert_eq!(state(&honest), "succeeded", "{honest}");
    let fuel = honest["usage"]["fuel"].as_u64().unwrap();
    assert!(fuel > 3_000_000, "{honest}");

    // The same work, then a sleep past the deadline.
    let id = s
        .submit(
            &mallory,
            json!({"component": deadline, "input": "3000000,600000", "timeout_ms": 1500, "max_attempts": 1}),
        )
        .await;
    victim_runs(&s, &victim, &echo, 3).await;
    let free = s.wait_terminal(&mallory, &id, 60).await;
    assert_eq!(state(&free), "failed", "{free}");
    assert_eq!(free["error"]["kind"], "timeout", "{free}");
    let billed = free["usage"]["fuel"].as_u64().unwrap();
    assert!(
        billed >= fuel - fuel / 100 && billed <= fuel + fuel / 10,
        "the sleeper burnt ~{fuel} fuel and was billed {billed}: {free}"
    );
    assert!(
        free["usage"]["credits"].as_i64().unwrap() >= honest["usage"]["credits"].as_i64().unwrap(),
        "{free} vs {honest}"
    );
    let log = s.get(&format!("/v1/jobs/{id}/log"), &mallory).await.1;
    assert!(log.to_string().contains("result"), "{log}");
    s.assert_books_balance("mallory").await;
    s.stop().await;
}

/// 7.2: a component declaring the per-component maximums of old (64 core
/// instances, 8 memories, 32 tables) took 4 slots' worth of the node's
/// pool; a few of them at once made every other tenant's job fail with
/// "maximum concurrent limit reached" (as the victim's `trap`). Now a
/// component may hold one slot's share at most: the old hog is refused at
/// upload, and as many share-sized hogs as there are slots leave the victims
/// unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_hogs_cannot_take_their_neighbours_instance_slots() {
    let s = Stack::start(Opts {
        worker_slots: Some(6),
        ..Opts::default()
    })
    .await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = s.push(&victim, "echo").await;

    let (st, v, _) = push_bytes(&s, &mallory, pool_hog(64, 8, 32)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "old-maximum hog admitted: {v}");
    assert_eq!(error_code(&v), "invalid_component", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("maximum"),
        "{v}"
    );

    // The largest hog admission lets through: 32 core instances, 2
    // memories, 8 tables. Five at once (the Stack's pool has 16 instance
    // slots) plus the victims' jobs.
    let (st, v, _) = push_bytes(&s, &mallory, pool_hog(32, 2, 8)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let hog = v["digest"].as_str().unwrap().to_string();
    let mut hogs = Vec::new();
    for _ in 0..5 {
        hogs.push(
            s.submit(
                &mallory,
                json!({"component": hog, "input": "", "timeout_ms": 5000, "max_attempts": 1}),
            )
            .await,
        );
    }
    for id in &hogs {
        s.wait_for(&mallory, id, 30, |j| state(j) != "queued").await;
    }
    victim_runs(&s, &victim, &echo, 4).await;
    for id in &hogs {
        let job = s.wait_terminal(&mallory, id, 60).await;
        assert_eq!(job["error"]["kind"], "timeout", "{job}");
        // It spun for its whole timeout: billed for it, not ~0.
        assert!(job["usage"]["fuel"].as_u64().unwrap() > 10_000_000, "{job}");
    }
    s.assert_books_balance("victim").await;
    s.stop().await;
}

/// 7.4: the API admitted with pooling off while workers run with it on: a
/// component with 9 memories passed upload, then failed on every worker,
/// which released it as a transient failure forever (thousands of
/// recompiles a second). Now admission refuses it, and one that reaches a
/// worker anyway (stored before, or by another admission) fails once, for
/// good, as `invalid_component`, without being recompiled per claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_workers_cannot_run_is_refused_or_fails_for_good() {
    let s = Stack::start(Opts::default()).await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = s.push(&victim, "echo").await;
    let mut extra = String::from("(core module $mem (memory 1))\n");
    for _ in 0..8 {
        extra.push_str("(core instance (instantiate $mem))\n");
    }
    let nine = component("", &extra);
    let (st, v, _) = push_bytes(&s, &mallory, nine.clone()).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "9 memories admitted: {v}");
    assert_eq!(error_code(&v), "invalid_component", "{v}");

    // Stored behind admission's back (e.g. under an older release).
    let control = ControlPlane::connect(&s.url, ControlConfig::default())
        .await
        .unwrap();
    let digest = digest_of(&nine);
    control
        .put_component(&tid("mallory"), &digest, &nine, Default::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            s.submit(
                &mallory,
                json!({"component": digest, "input": "x", "max_attempts": 3}),
            )
            .await,
        );
    }
    victim_runs(&s, &victim, &echo, 3).await;
    for id in ids {
        let job = s.wait_terminal(&mallory, &id, 30).await;
        assert_eq!(state(&job), "failed", "{job}");
        assert_eq!(job["error"]["kind"], "invalid_component", "{job}");
        assert_eq!(job["attempts"], 1, "a final failure, not retried: {job}");
    }
    s.assert_books_balance("mallory").await;
    s.stop().await;
}

/// The compile bomb of 7.3: 4 functions of 10,000 locals live across 20
/// nested loops (~360 KB). It took ~50 s and ~100 CPU-seconds of the API
/// process to refuse; now the structural checks refuse it before compiling.
fn compile_bomb() -> Vec<u8> {
    let mut f = String::new();
    for _ in 0..4 {
        f.push_str("(func (param i32) (local");
        for _ in 0..10_000 {
            f.push_str(" i64");
        }
        f.push(')');
        for d in 0..20 {
            f.push_str(&format!("(loop $l{d} "));
        }
        for l in 1..=10_000 {
            f.push_str(&format!(
                "(local.set {l} (i64.add (local.get {l}) (i64.const 1)))"
            ));
        }
        for d in (0..20).rev() {
            f.push_str(&format!("(br_if $l{d} (local.get 0)))"));
        }
        f.push_str(")\n");
    }
    component(
        "",
        &format!("(core module $bomb {f})\n(core instance (instantiate $bomb))"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_bomb_is_refused_before_it_is_compiled() {
    let s = Stack::start(Opts::default()).await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = s.push(&victim, "echo").await;
    let bomb = compile_bomb();
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let (st, v, took) = push_bytes(&s, &mallory, bomb).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_code(&v), "invalid_component", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("locals"),
        "{v}"
    );
    assert!(took < Duration::from_secs(3), "refusing took {took:?}");
    victim_runs(&s, &victim, &echo, 2).await;
    s.stop().await;
}

/// 7.5: `tools()` copied every mounted context's registry, once per name it
/// was mounted under: one big registry under 16 names cost the host 16
/// copies per call, outside every limit, for 1 credit. Now a context is
/// mounted once however it is named, a registry is bounded at upload, and
/// the call is charged fuel for what it copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_amplification_copies_each_context_once() {
    let s = Stack::start(Opts::default()).await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = s.push(&victim, "echo").await;
    let amp = s.push(&mallory, "toolsamp").await;
    let tool = |i: usize, desc: usize| json!({"name": format!("t{i}"), "description": "d".repeat(desc), "schema": "{}"});
    // Over the per-context registry bound: refused at upload.
    let big: Vec<Value> = (0..100).map(|i| tool(i, 16 << 10)).collect();
    let (st, v) = s
        .post(
            "/v1/contexts",
            &mallory,
            json!({"name": "big", "tools": big}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_code(&v), "invalid_request", "{v}");

    let tools: Vec<Value> = (0..60).map(|i| tool(i, 16_000)).collect();
    let mut names = Vec::new();
    for n in 0..16 {
        let name = format!("kb{n}");
        let (st, v) = s
            .post(
                "/v1/contexts",
                &mallory,
                json!({"name": name, "tools": tools}),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        names.push(name);
    }
    let id = s
        .submit(
            &mallory,
            json!({"component": amp, "input": "3", "contexts": names}),
        )
        .await;
    victim_runs(&s, &victim, &echo, 2).await;
    let job = s.wait_terminal(&mallory, &id, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(
        job["output"].as_str().unwrap(),
        format!(
            "{} tools, {} bytes",
            3 * 60,
            3 * (0..60)
                .map(|i| format!("t{i}").len() + 16_000 + 2)
                .sum::<usize>()
        ),
        "{job}"
    );
    // 3 calls copying ~960 KB each: at least a quarter fuel per byte.
    let fuel = job["usage"]["fuel"].as_u64().unwrap();
    assert!(fuel > 3 * 960_000 / 4, "{job}");
    s.stop().await;
}

/// 7.5: host calls used to cost the guest only the few instructions of the
/// call itself. A flood of them is now charged per call (and per byte), so
/// fuel bounds it: the same loop that ran under the limit before runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_call_flood_is_charged_and_stopped_by_fuel() {
    let s = Stack::start(Opts::default()).await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = s.push(&victim, "echo").await;
    let flood = s.push(&mallory, "callflood").await;
    // 1,000 rounds of 3 calls: charged at least 3,000 calls' worth.
    let id = s
        .submit(&mallory, json!({"component": flood, "input": "1000"}))
        .await;
    let job = s.wait_terminal(&mallory, &id, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert!(
        job["usage"]["fuel"].as_u64().unwrap() >= 3_000_000,
        "3,000 host calls billed only {}",
        job["usage"]["fuel"]
    );
    // A million rounds under 100M fuel: stopped by its fuel.
    let id = s
        .submit(
            &mallory,
            json!({"component": flood, "input": "1000000", "fuel": 100_000_000u64, "max_attempts": 1}),
        )
        .await;
    victim_runs(&s, &victim, &echo, 3).await;
    let job = s.wait_terminal(&mallory, &id, 60).await;
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["error"]["kind"], "fuel_exhausted", "{job}");
    assert_eq!(job["usage"]["fuel"], 100_000_000u64, "{job}");
    s.assert_books_balance("mallory").await;
    s.stop().await;
}

/// 7.3: uploads are CPU work for the API; one tenant may only start so many
/// in a burst, then gets 429 `rate_limited` with `Retry-After`, while
/// another tenant's uploads go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_rate_limited_per_tenant() {
    let s = Stack::start(Opts {
        worker_slots: Some(1),
        api: agentplane::api::ApiConfig {
            upload_burst: 3,
            uploads_per_minute: 6,
            ..agentplane::api::ApiConfig::default()
        },
        ..Opts::default()
    })
    .await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = crate::common::guests::guest_bytes("echo");
    for _ in 0..3 {
        let (st, v, _) = push_bytes(&s, &mallory, echo.clone()).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
    }
    let resp = s
        .http
        .post(format!("{}/v1/components", s.base))
        .bearer_auth(&mallory)
        .body(echo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After: {retry}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&v), "rate_limited", "{v}");
    // Contexts count against the same rate.
    let (st, v) = s
        .post("/v1/contexts", &mallory, json!({"name": "kb"}))
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    // The neighbour is not affected.
    let digest = s.push(&victim, "echo").await;
    victim_runs(&s, &victim, &digest, 1).await;
    s.stop().await;
}

/// The rest of the hostile guests, all at once next to a victim: each ends
/// with its exact kind (or its bounded answer) and the victim is unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_other_hostile_guest_is_bounded_with_its_exact_kind() {
    let s = Stack::start(Opts {
        worker_slots: Some(4),
        ..Opts::default()
    })
    .await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = s.push(&victim, "echo").await;
    // 24 documents of 1 MiB each, every one matching the query.
    let text = "the ".repeat(256 << 10);
    let docs: Vec<Value> = (0..24)
        .map(|i| json!({"id": format!("d{i}"), "text": text}))
        .collect();
    let (st, v) = s
        .post(
            "/v1/contexts",
            &mallory,
            json!({"name": "big", "documents": docs}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");

    let mut jobs = Vec::new();
    for (guest, input, extra) in [
        ("recurse", "", json!({})),
        ("flood", "4", json!({})),
        ("bigstate", "17", json!({"max_attempts": 1})),
        ("searchk", "2", json!({"contexts": ["big"]})),
        ("hog", "", json!({})),
        ("escape", "", json!({})),
        ("runaway", "", json!({"timeout_ms": 1500})),
    ] {
        let digest = s.push(&mallory, guest).await;
        let mut body = json!({"component": digest, "input": input, "max_attempts": 1});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        jobs.push((guest, s.submit(&mallory, body).await));
    }
    victim_runs(&s, &victim, &echo, 4).await;
    for (guest, id) in jobs {
        let job = s.wait_terminal(&mallory, &id, 60).await;
        let kind = job["error"]["kind"].as_str().unwrap_or("");
        let out = job["output"].as_str().unwrap_or("");
        match guest {
            "recurse" => {
                assert_eq!(kind, "trap", "{job}");
                assert!(job["error"]["message"].as_str().unwrap().len() <= 5 << 10);
            }
            "flood" => {
                assert_eq!(state(&job), "succeeded", "{job}");
                let (_, log) = s.get(&format!("/v1/jobs/{id}/log"), &mallory).await;
                let log = log.as_str().map_or_else(|| log.to_string(), str::to_string);
                assert!(log.len() < 1 << 20, "log of {} bytes kept", log.len());
                assert!(log.contains("output truncated"), "no truncation marker");
            }
            "bigstate" => {
                assert_eq!(kind, "agent_error", "{job}");
                assert!(
                    job["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("at most")
                );
            }
            "searchk" => {
                // k = u32::MAX: at most 8 MiB of 1 MiB hits per search.
                assert_eq!(state(&job), "succeeded", "{job}");
                assert_eq!(out, "14 hits", "{job}");
                assert!(
                    job["usage"]["fuel"].as_u64().unwrap() > 14 * (1 << 20) / 4,
                    "{job}"
                );
            }
            "hog" => assert_eq!(kind, "memory_limit", "{job}"),
            "escape" => {
                assert_eq!(state(&job), "succeeded", "{job}");
                let r: Value = serde_json::from_str(out).unwrap();
                for probe in ["passwd", "list_root", "list_cwd", "tcp", "udp", "dns"] {
                    assert_eq!(r[probe]["ok"], false, "{probe}: {r}");
                }
                assert_eq!(r["env"], json!([]), "{r}");
            }
            "runaway" => {
                assert_eq!(kind, "timeout", "{job}");
                assert!(job["usage"]["fuel"].as_u64().unwrap() > 10_000_000, "{job}");
            }
            _ => unreachable!(),
        }
    }
    s.assert_books_balance("mallory").await;
    s.assert_books_balance("victim").await;
    s.stop().await;
}

/// 7.2: a run the node itself failed (its instance pool full) used to fail
/// the victim's job as its own `trap`. Now the job goes back to the queue,
/// its attempt not counted and nothing charged, and runs once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fault_hands_the_job_back_uncharged() {
    let s = Stack::start(Opts {
        worker_slots: Some(2),
        max_instances: 1,
        ..Opts::default()
    })
    .await;
    let victim = s.tenant("victim").await;
    let sleeper = s.push(&victim, "sleeper").await;
    let echo = s.push(&victim, "echo").await;
    let a = s
        .submit(
            &victim,
            json!({"component": sleeper, "input": "1500", "max_attempts": 1}),
        )
        .await;
    s.wait_for(&victim, &a, 30, |j| state(j) == "running").await;
    let b = s
        .submit(
            &victim,
            json!({"component": echo, "input": "b", "max_attempts": 1}),
        )
        .await;
    for id in [&a, &b] {
        let job = s.wait_terminal(&victim, id, 30).await;
        assert_eq!(state(&job), "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
    }
    s.assert_books_balance("victim").await;
    s.stop().await;
}

/// A component whose `run` calls `wasi:random/random.get-random-bytes` for
/// 64 KiB (the per-call bound) in an endless loop; every answer lands at the
/// same address, so the guest itself keeps nothing and grows nothing.
fn random_flood() -> Vec<u8> {
    let wat = r#"(component
  (import "wasi:random/random@0.2.0" (instance $rand
    (export "get-random-bytes" (func (param "len" u64) (result (list u8))))))
  (core module $libc
    (memory (export "memory") 2)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 4096)))
  (core instance $libc (instantiate $libc))
  (core func $get (canon lower (func $rand "get-random-bytes")
    (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))
  (core module $m
    (import "libc" "memory" (memory 1))
    (import "rand" "get" (func $get (param i64 i32)))
    (func (export "run") (param i32 i32) (result i32)
      (loop $l (call $get (i64.const 65536) (i32.const 16)) (br $l))
      unreachable))
  (core instance $i (instantiate $m
    (with "libc" (instance $libc))
    (with "rand" (instance (export "get" (func $get))))))
  (func (export "run") (param "input" string) (result (result string (error string)))
    (canon lift (core func $i "run") (memory (core memory $libc "memory"))
      (realloc (core func $libc "realloc"))))
)"#;
    wat::parse_str(wat).expect("valid component text")
}

/// 7.5: `wasi:random` answers were bounded per call (64 KiB) but free: a
/// loop of a few wasm instructions made the host generate 64 KiB per turn,
/// so 10M fuel bought ~2M calls (gigabytes of ChaCha output) and the guest
/// ran to its deadline. Now every call costs fuel like the host's own
/// imports, and each byte generated costs one more: fuel stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_bytes_flood_is_charged_and_stopped_by_fuel() {
    let s = Stack::start(Opts::default()).await;
    let mallory = s.tenant("mallory").await;
    let victim = s.tenant("victim").await;
    let echo = s.push(&victim, "echo").await;
    let (st, v, _) = push_bytes(&s, &mallory, random_flood()).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let flood = v["digest"].as_str().expect("digest").to_string();
    let id = s
        .submit(
            &mallory,
            json!({"component": flood, "input": "", "fuel": 10_000_000u64,
                   "timeout_ms": 5_000, "max_attempts": 1}),
        )
        .await;
    victim_runs(&s, &victim, &echo, 3).await;
    let job = s.wait_terminal(&mallory, &id, 60).await;
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["error"]["kind"], "fuel_exhausted", "{job}");
    assert_eq!(job["usage"]["fuel"], 10_000_000u64, "{job}");
    s.assert_books_balance("mallory").await;
    s.assert_books_balance("victim").await;
    s.stop().await;
}
