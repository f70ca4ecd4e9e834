//! The HTTP surface end to end: the round trip over HTTP and the CLI,
//! idempotency, tenant isolation, every error answer, readiness, and the
//! `bench` load generator through the API.

use crate::common::guests::guest_wasm;
use crate::common::stack::*;
use agentplane::api::ApiConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::process::Command;

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
    // A 404: the error on stderr, exit status 4 (not found).
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");
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

    // `--output table`: the same report as `field  value` lines.
    let (base, echo) = (s.base.clone(), guest_wasm("echo"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(["bench", "--url", &base, "--tenants", "2", "--jobs", "6"])
            .args(["--output", "table", "--timeout-s", "120", "--component"])
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
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no `{name}` line: {text}"))
    };
    assert_eq!(field("succeeded"), "6", "{text}");
    assert_eq!(field("unfinished"), "0", "{text}");
    assert!(
        field("end_to_end_ms.p99").parse::<f64>().unwrap() > 0.0,
        "{text}"
    );
    s.stop().await;
}
