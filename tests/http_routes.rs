//! Routes over real HTTP that `hostile/http.rs`, `api.rs` and `e2e.rs` did
//! not cover: `?wait=` at its cap and absurd values, cursors that are bad
//! or another tenant's, one tenant's upload share (429 `too_many_uploads`)
//! and its release, and concurrent submits under one Idempotency-Key.
//! (Already covered elsewhere: a negative `wait`, the 408 of an idle job
//! body, PATCH of an unknown tenant and context upload errors, in
//! `hostile/http.rs`; a replayed and a conflicting Idempotency-Key in
//! `e2e.rs`.)

mod common;

use agentplane::api::ApiConfig;
use common::stack::{Opts, Stack, error_code};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn opts(api: ApiConfig) -> Opts {
    Opts {
        worker_slots: None,
        api,
        ..Opts::default()
    }
}

fn ids(page: &Value) -> Vec<&str> {
    page["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn wait_is_capped_and_absurd_values_are_refused() {
    let cap = Duration::from_millis(800);
    let s = Stack::start(opts(ApiConfig {
        max_wait: cap,
        ..ApiConfig::default()
    }))
    .await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    // No worker: the job stays queued, so every wait runs to its end.
    let id = s
        .submit(&token, json!({"component": echo, "input": "hi"}))
        .await;
    for wait in ["0", "0.2"] {
        let t0 = Instant::now();
        let (st, v) = s.get(&format!("/v1/jobs/{id}?wait={wait}"), &token).await;
        let took = t0.elapsed();
        assert_eq!((st, v["state"].as_str()), (StatusCode::OK, Some("queued")));
        let w: f64 = wait.parse().unwrap();
        assert!(
            took >= Duration::from_secs_f64(w) && took < Duration::from_secs_f64(w) + cap,
            "wait={wait} took {took:?}"
        );
    }
    // At the cap, far above it, and huge but finite: held for the cap only.
    for wait in ["0.8", "60", "61", "1e300", "99999999999999999999999"] {
        let t0 = Instant::now();
        let (st, v) = s.get(&format!("/v1/jobs/{id}?wait={wait}"), &token).await;
        let took = t0.elapsed();
        assert_eq!(st, StatusCode::OK, "wait={wait}: {v}");
        assert_eq!(v["state"], "queued");
        assert!(
            took >= cap && took < cap + Duration::from_secs(2),
            "wait={wait} held {took:?} (cap {cap:?})"
        );
    }
    for wait in [
        "-0.5", "1e400", "inf", "-inf", "NaN", "0x10", "1s", "", "%20",
    ] {
        let t0 = Instant::now();
        let (st, v) = s.get(&format!("/v1/jobs/{id}?wait={wait}"), &token).await;
        assert_eq!(
            (st, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "wait={wait}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("`wait`"), "wait={wait}: {msg}");
        assert!(t0.elapsed() < cap, "refused before any wait");
    }
    s.stop().await;
}

#[tokio::test]
async fn cursors_that_are_bad_or_another_tenant_s_show_only_the_caller_s_jobs() {
    let s = Stack::start(opts(ApiConfig::default())).await;
    let a = s.tenant("alice").await;
    let b = s.tenant("bob").await;
    let ea = s.push(&a, "echo").await;
    let eb = s.push(&b, "echo").await;
    let stack = &s;
    let submit = |tok: &str, d: &str| {
        let body = json!({"component": d, "input": "x"});
        let tok = tok.to_string();
        async move { stack.submit(&tok, body).await }
    };
    // Job ids are ULIDs, ordered by time: b1 < a1 < b2.
    let b1 = submit(&b, &eb).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let a1 = submit(&a, &ea).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let b2 = submit(&b, &eb).await;
    assert!(b1 < a1 && a1 < b2);

    // Alice's job id as Bob's cursor: a position, nothing more. Bob sees his
    // own jobs older than it, never Alice's.
    let (st, page) = s.get(&format!("/v1/jobs?cursor={a1}"), &b).await;
    assert_eq!(st, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), [b1.as_str()], "{page}");
    assert_eq!(page["next_cursor"], Value::Null);
    // Bob's own cursor pages through his jobs only.
    let (_, first) = s.get("/v1/jobs?limit=1", &b).await;
    assert_eq!(ids(&first), [b2.as_str()]);
    let cursor = first["next_cursor"].as_str().unwrap();
    assert_eq!(cursor, b2);
    let (_, second) = s
        .get(&format!("/v1/jobs?limit=1&cursor={cursor}"), &b)
        .await;
    assert_eq!(ids(&second), [b1.as_str()], "{second}");
    assert_eq!(second["next_cursor"], Value::Null);
    // A well-formed id older than everything: an empty page.
    let (st, page) = s
        .get("/v1/jobs?cursor=00000000000000000000000000", &b)
        .await;
    assert_eq!((st, ids(&page).len()), (StatusCode::OK, 0), "{page}");

    for bad in [
        "not-a-cursor",
        "0000000000000000000000000",   // 25 characters
        "000000000000000000000000000", // 27
        "01ARZ3NDEKTSV4RRFFQ69G5FA%21",
        "a:b",
    ] {
        let (st, v) = s.get(&format!("/v1/jobs?cursor={bad}"), &b).await;
        assert_eq!(
            (st, error_code(&v)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "cursor={bad}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().contains("`cursor`"),
            "{v}"
        );
    }
    s.stop().await;
}

/// Starts a component upload that sends `sent` bytes of a longer body and
/// stalls; answers the socket.
async fn stalled_upload(s: &Stack, token: &str, sent: usize) -> tokio::net::TcpStream {
    let addr = s.base.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/components HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/wasm\r\nContent-Length: 100000\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(&vec![0u8; sent]).await.unwrap();
    sock
}

async fn answer(sock: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn one_tenant_holds_at_most_its_share_of_upload_slots() {
    let s = Stack::start(opts(ApiConfig {
        max_concurrent_uploads: 2,
        uploads_per_tenant: 1,
        body_idle_timeout: Duration::from_millis(1500),
        ..ApiConfig::default()
    }))
    .await;
    let evil = s.tenant("evil").await;
    let other = s.tenant("other").await;
    let mut held = stalled_upload(&s, &evil, 10).await;
    // Wait until the stalled upload holds its slot.
    let t0 = Instant::now();
    loop {
        let (_, m) = s.get("/metrics", common::stack::ADMIN).await;
        let busy = m
            .as_str()
            .unwrap_or("")
            .lines()
            .any(|l| l == "agentplane_uploads_in_progress 1");
        if busy {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "upload not started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its second upload is refused at once, with the documented code.
    let resp = s
        .http
        .post(format!("{}/v1/components", s.base))
        .bearer_auth(&evil)
        .body(common::guests::guest_bytes("echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&v), "too_many_uploads", "{v}");
    // Another tenant still has the other slot.
    s.push(&other, "echo").await;
    // The stalled upload is cut (408) and its slot comes back.
    let a = answer(&mut held).await;
    assert!(a.starts_with("HTTP/1.1 408"), "{a}");
    assert!(a.contains("\"request_timeout\""), "{a}");
    s.push(&evil, "echo").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_with_one_idempotency_key_make_one_job() {
    let s = Stack::start(opts(ApiConfig::default())).await;
    let token = s.tenant("acme").await;
    let echo = s.push(&token, "echo").await;
    let body = json!({"component": echo, "input": "once"});
    let sends: Vec<_> = (0..12)
        .map(|_| {
            let req = s
                .http
                .post(format!("{}/v1/jobs", s.base))
                .bearer_auth(&token)
                .header("Idempotency-Key", "same-key")
                .json(&body);
            tokio::spawn(async move {
                let r = req.send().await.unwrap();
                let st = r.status();
                (st, r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut created = 0;
    let mut ids = Vec::new();
    for h in sends {
        let (st, v) = h.await.unwrap();
        match st {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("answered {other}: {v}"),
        }
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(created, 1, "exactly one submission created the job");
    ids.dedup();
    assert_eq!(ids.len(), 1, "every answer names the same job: {ids:?}");
    let (_, list) = s.get("/v1/jobs", &token).await;
    assert_eq!(self::ids(&list), [ids[0].as_str()]);
    let t = s.tenant_info("acme").await;
    assert_eq!(t["queued"], 1, "{t}");
    // The same key with another body, concurrently: all refused 422.
    let other = json!({"component": echo, "input": "twice"});
    let sends: Vec<_> = (0..6)
        .map(|_| {
            let req = s
                .http
                .post(format!("{}/v1/jobs", s.base))
                .bearer_auth(&token)
                .header("Idempotency-Key", "same-key")
                .json(&other);
            tokio::spawn(async move {
                let r = req.send().await.unwrap();
                (r.status(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    for h in sends {
        let (st, v) = h.await.unwrap();
        assert_eq!(
            (st, error_code(&v)),
            (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_conflict"),
            "{v}"
        );
    }
    assert_eq!(s.tenant_info("acme").await["queued"], 1);
    s.stop().await;
}
