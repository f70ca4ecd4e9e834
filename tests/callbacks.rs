//! Job callbacks over real HTTP: receivers this test starts on loopback
//! (allowed by naming their address in the rules), the API, the worker and
//! the dispatcher over a real Redis. Delivered and signed; retried after a
//! failure; refused at submission outside the rules and at delivery when a
//! name resolves to a private address; durable across a killed API
//! process; and one tenant's receiver that never answers does not hold up
//! another tenant's callbacks.

mod common;

use agentplane::api::ApiConfig;
use agentplane::callbacks::{Callbacks, signature};
use common::stack::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Got {
    signature: String,
    delivery: String,
    attempt: u32,
    body: Vec<u8>,
}

/// A receiver on loopback: answers each request with the next status of
/// `script` (the last one repeats), or never answers when `hang`, or 503
/// while `closed` is set.
struct Receiver {
    url: String,
    rule: String,
    got: Arc<Mutex<Vec<Got>>>,
    closed: Arc<AtomicBool>,
}

async fn receiver(script: Vec<u16>, hang: bool) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let closed = Arc::new(AtomicBool::new(false));
    let (g, c) = (got.clone(), closed.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (g, c, script) = (g.clone(), c.clone(), script.clone());
                async move {
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let n = {
                        let mut g = g.lock().unwrap();
                        g.push(Got {
                            signature: h("x-agentplane-signature"),
                            delivery: h("x-agentplane-delivery"),
                            attempt: h("x-agentplane-attempt").parse().unwrap_or(0),
                            body: body.to_vec(),
                        });
                        g.len()
                    };
                    if hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    let status = if c.load(Ordering::SeqCst) {
                        503
                    } else {
                        script[(n - 1).min(script.len() - 1)]
                    };
                    StatusCode::from_u16(status).unwrap()
                }
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Receiver {
        url: format!("http://{addr}/hook"),
        rule: format!("http://{addr}"),
        got,
        closed,
    }
}

impl Receiver {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until it got `n` requests.
    async fn wait(&self, n: usize, secs: u64) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} requests after {secs} s, {n} expected",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A stack whose callbacks may go to `rules`, retried quickly.
async fn stack(rules: &[&str]) -> Stack {
    stack_with(rules, None).await
}

async fn stack_with(rules: &[&str], retention_ms: Option<u64>) -> Stack {
    let mut cb = Callbacks::new(rules.iter().map(|r| r.parse().unwrap()).collect(), [42; 32]);
    cb.delivery.backoff_base = Duration::from_millis(200);
    cb.delivery.timeout = Duration::from_secs(5);
    cb.delivery.poll = Duration::from_millis(50);
    cb.delivery.per_tenant = 2;
    Stack::start(Opts {
        api: ApiConfig {
            callbacks: cb,
            ..ApiConfig::default()
        },
        retention_ms,
        ..Opts::default()
    })
    .await
}

/// Checks a request's signature with the tenant's key as the API gives it.
async fn assert_signed(s: &Stack, tenant: &str, token: &str, got: &Got) {
    let (st, k) = s
        .get(&format!("/v1/tenants/{tenant}/callback-key"), token)
        .await;
    assert_eq!(st, StatusCode::OK, "{k}");
    let key = k["key"].as_str().unwrap();
    let t: u64 = got
        .signature
        .strip_prefix("t=")
        .and_then(|r| r.split(',').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in `{}`", got.signature));
    assert_eq!(got.signature, signature(key, t, &got.body));
    let now = agentplane::model::now_ms() / 1000;
    assert!(t.abs_diff(now) < 60, "signed at {t}, now {now}");
}

fn job_with_callback(digest: &str, input: &str, url: &str) -> Value {
    json!({"component": digest, "input": input, "callback_url": url})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_delivered_signed() {
    let r = receiver(vec![200], false).await;
    let s = stack(&[&r.rule]).await;
    let tok = s.tenant("acme").await;
    let d = s.push(&tok, "echo").await;
    let (st, sub) = s
        .post("/v1/jobs", &tok, job_with_callback(&d, "hello", &r.url))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{sub}");
    let id = sub["id"].as_str().unwrap().to_string();
    let got = r.wait(1, 30).await;
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["event"], "job.finished");
    assert_eq!(body["job"]["id"], id.as_str());
    assert_eq!(body["job"]["state"], "succeeded");
    assert_eq!(body["job"]["output"], "hello");
    assert_eq!(got[0].delivery, id);
    assert_eq!(got[0].attempt, 1);
    assert_signed(&s, "acme", &tok, &got[0]).await;
    // Another tenant's key does not verify it.
    let other = s.tenant("beta").await;
    let (_, k) = s.get("/v1/tenants/beta/callback-key", &other).await;
    assert_ne!(k["key"], json!(null));
    let t = got[0].signature[2..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        got[0].signature,
        signature(k["key"].as_str().unwrap(), t, &got[0].body)
    );
    // Nor may a tenant read another's key.
    let (st, _) = s.get("/v1/tenants/acme/callback-key", &other).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let job = s
        .wait_for(&tok, &id, 10, |j| j["callback"]["state"] == "delivered")
        .await;
    assert_eq!(job["callback"]["attempts"], 1, "{job}");
    assert_eq!(job["callback"]["url"], r.url.as_str());
    // Delivered once: nothing more comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.got().len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_with_backoff() {
    let r = receiver(vec![500, 500, 200], false).await;
    let s = stack(&[&r.rule]).await;
    let tok = s.tenant("acme").await;
    let d = s.push(&tok, "echo").await;
    let id = s
        .submit(&tok, job_with_callback(&d, "fail:boom", &r.url))
        .await;
    let got = r.wait(3, 30).await;
    assert_eq!(
        got.iter().map(|g| g.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let body: Value = serde_json::from_slice(&got[2].body).unwrap();
    assert_eq!(
        body["job"]["state"], "failed",
        "a failed job is called back too"
    );
    for g in &got {
        assert_eq!(g.delivery, id);
        assert_signed(&s, "acme", &tok, g).await;
    }
    let job = s
        .wait_for(&tok, &id, 10, |j| j["callback"]["state"] == "delivered")
        .await;
    assert_eq!(job["callback"]["attempts"], 3, "{job}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_outside_the_rules_are_refused() {
    let r = receiver(vec![200], false).await;
    let port = r.rule.rsplit(':').next().unwrap().to_string();
    let by_name = format!("http://localhost:{port}");
    let s = stack(&[&r.rule, &by_name]).await;
    let tok = s.tenant("acme").await;
    let d = s.push(&tok, "echo").await;
    for (url, why) in [
        ("http://127.0.0.1:1/hook".to_string(), "another port"),
        (r.url.replace("http://", "https://"), "another scheme"),
        ("http://169.254.169.254/latest/meta-data".into(), "metadata"),
        ("file:///etc/passwd".into(), "not http"),
        (
            format!("http://user:pw@127.0.0.1:{port}/hook"),
            "credentials",
        ),
        (format!("{}?{}", r.url, "x".repeat(3000)), "too long"),
    ] {
        let (st, e) = s
            .post("/v1/jobs", &tok, job_with_callback(&d, "x", &url))
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{why}: {e}");
        assert_eq!(e["error"]["code"], "callback_not_allowed", "{why}: {e}");
        assert_eq!(e["error"]["param"], "callback_url", "{why}: {e}");
    }
    // The batch refuses it per job, with the same code.
    let (st, b) = s
        .post(
            "/v1/jobs/batch",
            &tok,
            json!({"jobs": [{"job": job_with_callback(&d, "x", "http://127.0.0.1:1/")}]}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        b["results"][0]["error"]["code"], "callback_not_allowed",
        "{b}"
    );
    // Nothing was written.
    let (_, page) = s.get("/v1/jobs", &tok).await;
    assert_eq!(page["jobs"], json!([]), "{page}");

    // A name the rules allow, but that resolves to loopback: accepted at
    // submission, refused at delivery (never sent).
    let id = s
        .submit(&tok, job_with_callback(&d, "x", &format!("{by_name}/hook")))
        .await;
    let job = s
        .wait_for(&tok, &id, 30, |j| j["callback"]["state"] == "refused")
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        r.got().is_empty(),
        "a loopback name was called: {:?}",
        r.got()
    );
    s.stop().await;

    // A deployment without rules refuses every callback.
    let s = stack(&[]).await;
    let tok = s.tenant("acme").await;
    let (st, e) = s
        .post("/v1/jobs", &tok, job_with_callback(&d, "x", &r.url))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "callback_not_allowed", "{e}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_stall_other_tenants() {
    let tar = receiver(vec![200], true).await;
    let good = receiver(vec![200], false).await;
    let s = stack(&[&tar.rule, &good.rule]).await;
    let evil = s.tenant("evil").await;
    let nice = s.tenant("nice").await;
    let de = s.push(&evil, "echo").await;
    let dn = s.push(&nice, "echo").await;
    for i in 0..20 {
        s.submit(&evil, job_with_callback(&de, &format!("e{i}"), &tar.url))
            .await;
    }
    // The tar pit holds the evil tenant's places (2), not more.
    tar.wait(2, 30).await;
    let t0 = Instant::now();
    let id = s
        .submit(&nice, job_with_callback(&dn, "n", &good.url))
        .await;
    let got = good.wait(1, 10).await;
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the nice tenant's callback took {:?}",
        t0.elapsed()
    );
    assert_eq!(got[0].delivery, id);
    assert!(
        tar.got().len() <= 2,
        "the evil tenant held more than its places: {}",
        tar.got().len()
    );
    s.stop().await;
}

/// Retention removes a callback still owed with its job: a receiver that
/// always fails is not called for ever after the job is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_an_owed_callback_with_its_job() {
    let r = receiver(vec![500], false).await;
    let s = stack_with(&[&r.rule], Some(1_500)).await;
    let tok = s.tenant("acme").await;
    let d = s.push(&tok, "echo").await;
    let id = s.submit(&tok, job_with_callback(&d, "x", &r.url)).await;
    r.wait(1, 30).await;
    let hooks = || async {
        let c = redis::Client::open(s.url.as_str()).unwrap();
        let mut con = c.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("ZCARD")
            .arg("{ap:s0}:hooks")
            .query_async::<u64>(&mut con)
            .await
            .unwrap()
    };
    assert_eq!(hooks().await, 1, "owed while the job is kept");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, _) = s.get(&format!("/v1/jobs/{id}"), &tok).await;
        if st == StatusCode::NOT_FOUND {
            break;
        }
        assert!(Instant::now() < deadline, "job still kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(hooks().await, 0, "the hook outlived its job");
    let n = r.got().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        r.got().len() <= n + 1,
        "still called after its job was removed"
    );
    s.stop().await;
}

/// `agentplane serve` over an external Redis, its callbacks allowed to `rule`.
fn serve(redis: &str, data: &std::path::Path, rule: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(bin())
        .args([
            "serve",
            "--redis",
            redis,
            "--listen",
            "127.0.0.1:0",
            "--slots",
            "1",
        ])
        .arg("--data")
        .arg(data)
        .args(["--callback-allow", rule])
        .env("AGENTPLANE_ADMIN_TOKEN", ADMIN)
        .env_remove("AGENTPLANE_CALLBACK_SECRET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(data.join("serve.log")).unwrap())
        .spawn()
        .expect("spawn agentplane serve");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut base = None;
    for line in lines.by_ref() {
        if let Some(rest) = line.unwrap().strip_prefix("agentplane is listening on ") {
            base = Some(rest.trim().to_string());
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (child, base.expect("serve printed its address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_survives_the_api_process_being_killed() {
    let redis = common::redis::RedisServer::start_durable();
    let data = tempfile::tempdir().unwrap();
    let r = receiver(vec![200], false).await;
    r.closed.store(true, Ordering::SeqCst);
    let (data_dir, url, rule) = (data.path().to_path_buf(), redis.url.clone(), r.rule.clone());
    let (mut first, base) = tokio::task::spawn_blocking(move || serve(&url, &data_dir, &rule))
        .await
        .unwrap();
    agentplane::client::tls_provider();
    let http = reqwest::Client::new();
    let call =
        |base: &str, method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
            let mut req = http
                .request(method, format!("{base}{path}"))
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            async move {
                let resp = req.send().await.unwrap();
                let st = resp.status();
                (st, resp.json::<Value>().await.unwrap_or(Value::Null))
            }
        };
    let (st, t) = call(
        &base,
        reqwest::Method::POST,
        "/v1/tenants",
        ADMIN,
        Some(json!({"id": "acme", "credits": 1_000_000_000i64})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    let tok = t["token"].as_str().unwrap().to_string();
    let wasm = common::guests::guest_bytes("echo");
    let meta: Value = http
        .post(format!("{base}/v1/components"))
        .bearer_auth(&tok)
        .header("content-type", "application/wasm")
        .body(wasm)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let d = meta["digest"].as_str().unwrap();
    let (_, key_before) = call(
        &base,
        reqwest::Method::GET,
        "/v1/tenants/acme/callback-key",
        &tok,
        None,
    )
    .await;
    let (st, sub) = call(
        &base,
        reqwest::Method::POST,
        "/v1/jobs",
        &tok,
        Some(job_with_callback(d, "durable", &r.url)),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{sub}");
    let id = sub["id"].as_str().unwrap().to_string();
    // The job finished and the receiver refused a first attempt: the
    // delivery is owed, only in Redis.
    let log = data.path().join("serve.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.got().is_empty() {
        let (_, job) = call(
            &base,
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}"),
            &tok,
            None,
        )
        .await;
        assert!(
            Instant::now() < deadline,
            "no attempt: {job}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    r.closed.store(false, Ordering::SeqCst);
    let seen = r.got().len();
    let (data_dir, url, rule) = (data.path().to_path_buf(), redis.url.clone(), r.rule.clone());
    let (mut second, base) = tokio::task::spawn_blocking(move || serve(&url, &data_dir, &rule))
        .await
        .unwrap();
    let got = r.wait(seen + 1, 60).await;
    let last = got.last().unwrap();
    assert_eq!(last.delivery, id);
    assert!(last.attempt > 1, "{last:?}");
    // Signed with the same key as before the restart.
    let (_, key_after) = call(
        &base,
        reqwest::Method::GET,
        "/v1/tenants/acme/callback-key",
        &tok,
        None,
    )
    .await;
    assert_eq!(key_before, key_after);
    let t: u64 = last.signature[2..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        last.signature,
        signature(key_after["key"].as_str().unwrap(), t, &last.body)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, job) = call(
            &base,
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}"),
            &tok,
            None,
        )
        .await;
        if job["callback"]["state"] == "delivered" {
            break;
        }
        assert!(Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
}
