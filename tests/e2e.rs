//! End-to-end: real HTTP over a socket, a real `redis-server` per test, the
//! real guest components, and for process-level faults the real
//! `agentplane` binary as child processes (SIGKILL, SIGSTOP, SIGTERM).

mod common;

use agentplane::api::ApiConfig;
use agentplane::client::ApiClient;
use agentplane::model::JobState;
use common::guests::guest_wasm;
use common::redis::RedisServer;
use common::stack::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_round_trip_over_http_and_cli() {
    let s = Stack::start(Opts::default()).await;
    let (st, _) = s.call(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(st, StatusCode::OK);

    let token = s.tenant("acme").await;
    let digest = s.push(&token, "echo").await;
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    let (st, meta) = s.get(&format!("/v1/components/{digest}"), &token).await;
    assert_eq!(st, StatusCode::OK, "{meta}");
    assert_eq!(meta["digest"], digest.as_str());

    let id = s
        .submit(&token, json!({"component": digest, "input": "hello"}))
        .await;
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["output"], "hello");
    assert_eq!(job["tenant"], "acme");
    assert_eq!(job["attempts"], 1);
    assert!(job["error"].is_null());
    assert!(job["usage"]["fuel"].as_u64().unwrap() > 0, "{job}");
    for t in ["created_at", "started_at", "finished_at"] {
        let ts = job[t].as_str().unwrap();
        assert!(
            ts.ends_with('Z') && ts.contains('.') && ts.len() == 24,
            "{t}: {ts}"
        );
    }
    let log = s
        .http
        .get(format!("{}/v1/jobs/{id}/log", s.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), StatusCode::OK);
    assert!(
        log.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let log = log.text().await.unwrap();
    assert!(log.contains("echo got 5 bytes"), "{log}");

    // An agent error is a failed job with its kind and message.
    let id2 = s
        .submit(
            &token,
            json!({"component": digest, "input": "fail:boom", "max_attempts": 1}),
        )
        .await;
    let job = s.wait_terminal(&token, &id2, 60).await;
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["error"]["kind"], "agent_error");
    assert!(job["error"]["message"].as_str().unwrap().contains("boom"));

    // Listing: newest first, filtered by state, paged.
    let (st, list) = s.get("/v1/jobs", &token).await;
    assert_eq!(st, StatusCode::OK);
    let ids: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id2.as_str(), id.as_str()]);
    let (_, list) = s.get("/v1/jobs?state=succeeded", &token).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let (_, page) = s.get("/v1/jobs?limit=1", &token).await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_str().expect("a next cursor");
    let (_, page2) = s
        .get(&format!("/v1/jobs?limit=1&cursor={cursor}"), &token)
        .await;
    assert_eq!(page2["jobs"][0]["id"], id.as_str());

    // Metrics are exposed in Prometheus text, to the admin.
    let (st, m) = s.get("/metrics", ADMIN).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        m.as_str()
            .unwrap()
            .contains("agentplane_jobs_submitted_total"),
        "{m}"
    );

    // The CLI over the same API.
    let base = s.base.clone();
    let wasm = guest_wasm("echo");
    let tok = token.clone();
    let ctx_file = s.dir.join("kb.json");
    std::fs::write(
        &ctx_file,
        json!({"name": "kb", "documents": [{"id": "d", "text": "some text"}]}).to_string(),
    )
    .unwrap();
    let (pushed, submitted, missing, created, ctx) = tokio::task::spawn_blocking(move || {
        let cli_as = |token: &str, args: &[&str]| {
            Command::new(bin())
                .args(args)
                .env("AGENTPLANE_URL", &base)
                .env("AGENTPLANE_TOKEN", token)
                .output()
                .unwrap()
        };
        let cli = |args: &[&str]| cli_as(&tok, args);
        let created = cli_as(ADMIN, &["tenant", "create", "cli-made", "--credits", "100"]);
        let ctx = cli(&["context", "push", ctx_file.to_str().unwrap()]);
        let pushed = cli(&["component", "push", wasm.to_str().unwrap()]);
        let d = serde_json::from_slice::<Value>(&pushed.stdout).unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let submitted = cli(&[
            "job",
            "submit",
            "--component",
            &d,
            "--input",
            "from cli",
            "--wait",
        ]);
        let missing = cli(&["job", "get", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
        (pushed, submitted, missing, created, ctx)
    })
    .await
    .unwrap();
    assert!(created.status.success(), "{created:?}");
    let t: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert!(t["token"].as_str().unwrap().starts_with("cli-made."));
    assert!(ctx.status.success(), "{ctx:?}");
    let c: Value = serde_json::from_slice(&ctx.stdout).unwrap();
    assert_eq!(c["documents"], 1);
    // A non-2xx answer: the error on stderr, exit status 1.
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not_found"));
    assert!(pushed.status.success());
    assert!(submitted.status.success(), "{submitted:?}");
    let job: Value = serde_json::from_slice(&submitted.stdout).unwrap();
    assert_eq!(job["output"], "from cli");
    assert_eq!(job["state"], "succeeded");

    s.assert_books_balance("acme").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_replays_and_conflicts() {
    let s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let token = s.tenant("acme").await;
    let digest = s.push(&token, "echo").await;
    let body = json!({"component": digest, "input": "once"});
    let send = |b: Value| {
        s.http
            .post(format!("{}/v1/jobs", s.base))
            .bearer_auth(&token)
            .header("Idempotency-Key", "k-1")
            .json(&b)
            .send()
    };
    let r1 = send(body.clone()).await.unwrap();
    assert_eq!(r1.status(), StatusCode::CREATED);
    let v1: Value = r1.json().await.unwrap();
    let r2 = send(body.clone()).await.unwrap();
    assert_eq!(r2.status(), StatusCode::OK);
    let v2: Value = r2.json().await.unwrap();
    assert_eq!(v1["id"], v2["id"]);
    let r3 = send(json!({"component": digest, "input": "twice"}))
        .await
        .unwrap();
    assert_eq!(r3.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v3: Value = r3.json().await.unwrap();
    assert_eq!(error_code(&v3), "idempotency_conflict");
    // Only one job exists.
    let (_, list) = s.get("/v1/jobs", &token).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_see_only_their_own_things() {
    let s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let a = s.tenant("alice").await;
    let b = s.tenant("bob").await;
    let digest = s.push(&a, "echo").await;
    let (st, ctx) = s
        .post(
            "/v1/contexts",
            &a,
            json!({"name": "kb", "documents": [{"id": "d1", "text": "hello world"}], "tools": []}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{ctx}");
    assert_eq!(ctx["name"], "kb");
    assert_eq!(ctx["documents"], 1);
    let job = s
        .submit(
            &a,
            json!({"component": digest, "input": "x", "contexts": ["kb"]}),
        )
        .await;

    for path in [
        format!("/v1/jobs/{job}"),
        format!("/v1/jobs/{job}/log"),
        format!("/v1/components/{digest}"),
        "/v1/contexts/kb".to_string(),
        "/v1/tenants/alice".to_string(),
    ] {
        let (st, v) = s.get(&path, &b).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(error_code(&v), "not_found");
    }
    let (st, _) = s
        .post(&format!("/v1/jobs/{job}/cancel"), &b, json!({}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // Bob cannot run Alice's component nor mount her context.
    let (st, v) = s
        .post("/v1/jobs", &b, json!({"component": digest, "input": "x"}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let bd = s.push(&b, "echo").await;
    let (st, v) = s
        .post(
            "/v1/jobs",
            &b,
            json!({"component": bd, "input": "x", "contexts": ["kb"]}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (_, list) = s.get("/v1/jobs", &b).await;
    assert!(list["jobs"].as_array().unwrap().is_empty());
    // Alice still sees hers.
    let (st, _) = s.get(&format!("/v1/jobs/{job}"), &a).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors_and_lose_nothing() {
    let s = Stack::start(Opts {
        worker_slots: None,
        api: ApiConfig {
            max_component_bytes: 4 << 20,
            ..ApiConfig::default()
        },
        ..Opts::default()
    })
    .await;
    use reqwest::Method;
    // 401 without or with a wrong token.
    let (st, v) = s.call(Method::GET, "/v1/jobs", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&v), "unauthorized");
    let (st, _) = s.get("/v1/jobs", "nobody.abc").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let token = s.tenant_with("acme", json!({"max_queued": 2})).await;
    let forged = format!("acme.{}", "0".repeat(64));
    let (st, _) = s.get("/v1/jobs", &forged).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // 403: a tenant on an admin route, the admin on a tenant route.
    let (st, v) = s.post("/v1/tenants", &token, json!({"id": "evil"})).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&v), "forbidden");
    let (st, _) = s.get("/v1/jobs", ADMIN).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    // 409 on a second creation.
    let (st, v) = s.post("/v1/tenants", ADMIN, json!({"id": "acme"})).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(error_code(&v), "tenant_exists");
    let (st, v) = s
        .post("/v1/tenants", ADMIN, json!({"id": "x", "wieght": 2}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("wieght"),
        "{v}"
    );

    // Component admission.
    let r = s
        .http
        .post(format!("{}/v1/components", s.base))
        .bearer_auth(&token)
        .body(b"not wasm at all".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "invalid_component");
    // Over the limit: refused on the declared length, before the body is
    // sent (a raw socket, since the answer comes while the client would
    // still be writing).
    let head = s
        .raw_head(&format!(
            "POST /v1/components HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: {}\r\n\r\n",
            5 << 20
        ))
        .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("payload_too_large"), "{head}");

    let digest = s.push(&token, "echo").await;
    // 400s naming the field.
    let r = s
        .http
        .post(format!("{}/v1/jobs", s.base))
        .bearer_auth(&token)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    for (body, field) in [
        (
            json!({"component": digest, "input": "x", "colour": 1}),
            "colour",
        ),
        (json!({"component": "sha256:zz", "input": "x"}), "component"),
        (
            json!({"component": digest, "input": "x", "fuel": 1_000_000_000_001u64}),
            "fuel",
        ),
        (
            json!({"component": digest, "input": "x", "timeout_ms": 999_999_999u64}),
            "timeout_ms",
        ),
        (
            json!({"component": digest, "input": "x", "gpus": 1}),
            "gpus",
        ),
        (json!({"component": digest}), "input"),
    ] {
        let (st, v) = s.post("/v1/jobs", &token, body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(error_code(&v), "invalid_request");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {v}"
        );
    }
    // 404 for an unknown component or context.
    let unknown = format!("sha256:{}", "ab".repeat(32));
    let (st, _) = s
        .post(
            "/v1/jobs",
            &token,
            json!({"component": unknown, "input": "x"}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = s
        .post(
            "/v1/jobs",
            &token,
            json!({"component": digest, "input": "x", "contexts": ["nope"]}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // 413 for an input over 1 MiB.
    let big = "x".repeat((1 << 20) + 1);
    let (st, v) = s
        .post(
            "/v1/jobs",
            &token,
            json!({"component": digest, "input": big}),
        )
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    // 429 at max_queued (no worker runs here).
    s.submit(&token, json!({"component": digest, "input": "1"}))
        .await;
    s.submit(&token, json!({"component": digest, "input": "2"}))
        .await;
    let (st, v) = s
        .post(
            "/v1/jobs",
            &token,
            json!({"component": digest, "input": "3"}),
        )
        .await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(error_code(&v), "queue_full");
    // 402 when credits do not cover the reservation.
    let poor = s.tenant_with("poor", json!({"credits": 0})).await;
    let pd = s.push(&poor, "echo").await;
    let (st, v) = s
        .post("/v1/jobs", &poor, json!({"component": pd, "input": "x"}))
        .await;
    assert_eq!(st, StatusCode::PAYMENT_REQUIRED, "{v}");
    assert_eq!(error_code(&v), "insufficient_credits");
    // Bad query values.
    let (st, _) = s.get("/v1/jobs?limit=10001", &token).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s.get("/v1/jobs?state=sleeping", &token).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // Nothing lost, the process is up.
    let (_, list) = s.get("/v1/jobs", &token).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
    let (st, _) = s.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_fails_when_redis_is_down() {
    let mut s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let (st, _) = s.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    s.redis.as_mut().unwrap().kill();
    let (st, v) = s.call(reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(error_code(&v), "unavailable");
    let (st, v) = s.get("/v1/jobs", "acme.abc").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        !v.to_string().contains("redis.sock"),
        "leaks internals: {v}"
    );
    let (st, _) = s.call(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

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
    assert_eq!(
        charged,
        job["usage"]["credits"].as_i64().unwrap(),
        "{job} {after}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_worker_past_its_lease_cannot_finalize() {
    let s = Stack::start(proc_opts()).await;
    let token = s.tenant("acme").await;
    let hold = s.push(&token, "hold").await;
    let dir = s.dir.clone();
    let w1 = WorkerProc::spawn(&s.url, 1, 5_000, &dir.join("w1.log"));
    let before = s.assert_books_balance("acme").await;

    let id = s
        .submit(&token, json!({"component": hold, "input": "0,2000"}))
        .await;
    s.wait_for(&token, &id, 30, |j| state(j) == "running").await;
    w1.signal(libc::SIGSTOP);
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
    // Give the stale worker time to try whatever it would.
    tokio::time::sleep(Duration::from_millis(3 * PROC_LEASE_MS)).await;
    let (_, again) = s.get(&format!("/v1/jobs/{id}"), &token).await;
    assert_eq!(again, job, "a stale worker changed a finished job");
    let after = s.assert_books_balance("acme").await;
    let charged = after["settled"].as_i64().unwrap() - before["settled"].as_i64().unwrap();
    assert_eq!(charged, job["usage"]["credits"].as_i64().unwrap());
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

/// `agentplane serve` as a user runs it: its own redis-server in the data
/// dir, the admin token written once, everything stopped on SIGTERM, the
/// data still there on the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_runs_its_own_redis_and_keeps_data_across_restarts() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (data_dir, logs) = (data.clone(), dir.path().to_path_buf());
    let start = move |log: &str| {
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--data")
            .arg(&data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--slots",
                "1",
                "--lease-ms",
                "1000",
            ])
            .env_remove("AGENTPLANE_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs.join(log)).unwrap())
            .spawn()
            .expect("spawn agentplane serve");
        // The banner's first line names the address it bound.
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut lines = out.lines();
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("agentplane is listening on ") {
                base = Some(rest.trim().to_string());
                break;
            }
        }
        // Keep reading what else it prints, as a terminal would.
        std::thread::spawn(move || lines.for_each(drop));
        (child, base.expect("serve printed its address"))
    };
    let (child, base) = tokio::task::spawn_blocking({
        let start = start.clone();
        move || start("serve1.log")
    })
    .await
    .unwrap();
    let mut guard = KillOnDrop(vec![child]);
    let child = &mut guard.0[0];
    let token_file = data.join("admin-token");
    let admin = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (acme, digest) = onboard_acme(&base, &admin).await;
    let id = acme
        .submit(&job_request(&digest, "embedded"), None)
        .await
        .unwrap()
        .id;
    let job = acme.job(&id, Some(30.0)).await.unwrap();
    assert_eq!(job.output.as_deref(), Some("embedded"), "{job:?}");

    // SIGTERM: everything stops, Redis included.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "serve did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let socket = data.join("redis.sock");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());
    assert!(data.join("appendonlydir").exists());

    // Restart on the same dir: same admin token, the tenant and job are there.
    let (child, base) = tokio::task::spawn_blocking(move || start("serve2.log"))
        .await
        .unwrap();
    let _guard2 = KillOnDrop(vec![child]);
    let admin2 = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(admin, admin2);
    let acme = ApiClient::new(&base, None)
        .unwrap()
        .with_token(acme.token().unwrap());
    let job = acme.job(&id, None).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
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
    tokio::time::sleep(Duration::from_millis(2 * PROC_LEASE_MS)).await;
    let (_, job) = s.get(&format!("/v1/jobs/{gpu_job}"), &gpu_t).await;
    assert_eq!(
        state(&job),
        "queued",
        "a worker without GPUs took it: {job}"
    );

    let _gpu = WorkerProc::spawn_with(&s.url, 1, 1_000, &["--gpus", "1"], &dir.join("gpu.log"));
    let job = s.wait_terminal(&gpu_t, &gpu_job, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["output"], "on a gpu");
    assert_eq!(job["gpus"], 1);
    s.assert_books_balance("gpu-t").await;
    s.assert_books_balance("cpu-t").await;
    s.stop().await;
}

/// The same service on a Redis Cluster: tenants spread over shards, API,
/// scheduler and worker against `redis+cluster://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_runs_on_a_redis_cluster() {
    let s = Stack::start(Opts {
        cluster: Some((3, 4)),
        ..Opts::default()
    })
    .await;
    assert!(s.url.starts_with("redis+cluster://"));
    let mut jobs = Vec::new();
    for t in ["t-a", "t-b", "t-c", "t-d"] {
        let token = s.tenant(t).await;
        let echo = s.push(&token, "echo").await;
        let id = s
            .submit(&token, json!({"component": echo, "input": t}))
            .await;
        jobs.push((t, token, id));
    }
    for (t, token, id) in &jobs {
        let job = s.wait_terminal(token, id, 60).await;
        assert_eq!(state(&job), "succeeded", "{job}");
        assert_eq!(job["output"], *t);
        s.assert_books_balance(t).await;
    }
    s.stop().await;
}

/// The parts one per process, as on many machines: `api`, `scheduler` and
/// two `worker`s against one Redis, each its own `agentplane` process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_run_as_separate_processes() {
    use std::io::BufRead;
    let redis = RedisServer::start();
    let dir = redis.dir.path().to_path_buf();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let mut api = Command::new(bin())
        .args(["api", "--redis", &redis.url, "--listen", "127.0.0.1:0"])
        .env("AGENTPLANE_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("api.log")).unwrap())
        .spawn()
        .unwrap();
    let out = api.stdout.take().unwrap();
    let base = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(out).lines();
        let line = lines.next().unwrap().unwrap();
        std::thread::spawn(move || lines.for_each(drop));
        line.strip_prefix("agentplane api is listening on ")
            .expect("api banner")
            .trim()
            .to_string()
    })
    .await
    .unwrap();
    let metrics_port = free_port();
    let mut children = KillOnDrop(vec![api]);
    children.0.push(
        Command::new(bin())
            .args(["scheduler", "--redis", &redis.url, "--lease-ms", "1000"])
            .stderr(std::fs::File::create(dir.join("sched.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    for (i, extra) in [
        vec![
            "--metrics-listen".to_string(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        vec![],
    ]
    .into_iter()
    .enumerate()
    {
        children.0.push(
            Command::new(bin())
                .args(["worker", "--redis", &redis.url, "--slots", "2"])
                .args(extra)
                .stderr(std::fs::File::create(dir.join(format!("w{i}.log"))).unwrap())
                .spawn()
                .unwrap(),
        );
    }

    let (acme, digest) = onboard_acme(&base, ADMIN).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let req = job_request(&digest, &format!("job {i}"));
        ids.push(acme.submit(&req, None).await.unwrap().id);
    }
    for (i, id) in ids.iter().enumerate() {
        let job = acme.job(id, Some(30.0)).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(job.output, Some(format!("job {i}")));
    }
    // The worker's own metrics endpoint counts what it ran.
    let m = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("agentplane_claim_seconds"), "{m}");
    drop(children);
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
    let (mut charged, mut retried) = (0, 0);
    for id in &ids {
        let job = s.wait_terminal(&token, id, 120).await;
        assert_eq!(state(&job), "succeeded", "{job}");
        charged += job["usage"]["credits"].as_i64().unwrap();
        retried += usize::from(job["attempts"].as_u64().unwrap() > 1);
    }
    // The kills did land on running jobs.
    assert!(retried > 0, "no job was ever interrupted");
    let t = s.assert_books_balance("acme").await;
    assert_eq!(t["settled"].as_i64().unwrap(), charged, "{t}");
    drop(workers);
    s.stop().await;
}

/// `agentplane bench` drives real load through the API and reports it: every
/// job it submitted finished, spread over its tenants.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_load_generator_runs_jobs_through_the_api() {
    let s = Stack::start(Opts {
        worker_slots: Some(4),
        ..Opts::default()
    })
    .await;
    let echo = guest_wasm("echo");
    let base = s.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(["bench", "--url", &base, "--tenants", "3", "--jobs", "60"])
            .args(["--concurrency", "8", "--timeout-s", "120", "--component"])
            .arg(echo)
            .env("AGENTPLANE_TOKEN", ADMIN)
            .output()
            .expect("run agentplane bench")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["succeeded"], 60, "{report}");
    assert_eq!(report["unfinished"], 0, "{report}");
    let per: Vec<u64> = report["per_tenant"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["succeeded"].as_u64().unwrap())
        .collect();
    assert_eq!(per, vec![20, 20, 20], "{report}");
    assert!(report["end_to_end_ms"]["p99"].as_f64().unwrap() > 0.0);
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
