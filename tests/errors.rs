//! Error answers and batch submission over real HTTP and a real
//! `redis-server`: every error names its request (`request_id`, also the
//! `X-Request-Id` header) and the field at fault (`param`); 429 and 503
//! carry `Retry-After`; a batch of up to 1,000 jobs, each on its own.

mod common;

use agentplane::api::BatchResult;
use common::stack::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_carry_request_id_param_and_retry_after() {
    let s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let token = s.tenant_with("acme", json!({"max_queued": 1})).await;
    let d = s.push(&token, "echo").await;

    // A bad field: 400 naming it, with the request's id in body and header.
    let resp = s
        .http
        .post(format!("{}/v1/jobs", s.base))
        .bearer_auth(&token)
        .json(&json!({"component": d, "input": "x", "fule": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let header = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "fule", "{v}");
    assert_eq!(v["error"]["request_id"], header.as_str());
    assert_eq!(header.len(), 26, "a ULID: {header}");
    let (_, v) = s.get("/v1/jobs?limit=0", &token).await;
    assert_eq!(v["error"]["param"], "limit", "{v}");
    // A client's own request id is kept; unknown routes name theirs too.
    let resp = s
        .http
        .get(format!("{}/v1/nope", s.base))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["x-request-id"], "trace-42");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["request_id"], "trace-42");
    assert!(v["error"].get("param").is_none(), "{v}");
    // Successes carry the header too.
    let resp = s
        .http
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("x-request-id"));

    // A full queue is 429 with Retry-After (no worker runs the first job).
    s.submit(&token, json!({"component": d, "input": "1"}))
        .await;
    let resp = s
        .http
        .post(format!("{}/v1/jobs", s.base))
        .bearer_auth(&token)
        .json(&json!({"component": d, "input": "2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after >= 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_submits_each_job_on_its_own() {
    let s = Stack::start(Opts::default()).await;
    let token = s.tenant("acme").await;
    let d = s.push(&token, "echo").await;
    let api = s.as_caller(&token);
    let job = |input: &str| job_request(&d, input);
    let mut bad = job("x");
    bad.component = format!("sha256:{}", "0".repeat(64));
    let batch = vec![
        (job("one"), Some("k1".to_string())),
        (bad, None),
        (job("two"), None),
    ];
    let results = api.submit_batch(&batch).await.unwrap();
    assert_eq!(results.len(), 3);
    let ids: Vec<String> = results
        .iter()
        .filter_map(|r| match r {
            BatchResult::Submitted { id, created, .. } => {
                assert!(*created);
                Some(id.clone())
            }
            BatchResult::Refused { .. } => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    match &results[1] {
        BatchResult::Refused { error } => assert_eq!(error["code"], "not_found", "{error}"),
        other => panic!("{other:?}"),
    }
    for id in &ids {
        let j = s.wait_terminal(&token, id, 60).await;
        assert_eq!(state(&j), "succeeded", "{j}");
    }
    // The same key again is a replay of the first job, not a new one.
    let again = api
        .submit_batch(&[(job("one"), Some("k1".to_string()))])
        .await
        .unwrap();
    match &again[0] {
        BatchResult::Submitted { id, created, .. } => {
            assert_eq!(id, &ids[0]);
            assert!(!created);
        }
        other => panic!("{other:?}"),
    }
    // Bounds: empty and over 1,000 are refused whole.
    let (st, v) = s.post("/v1/jobs/batch", &token, json!({"jobs": []})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "jobs");
    let many: Vec<_> = (0..1001)
        .map(|i| json!({"job": {"component": d, "input": i.to_string()}}))
        .collect();
    let (st, _) = s
        .post("/v1/jobs/batch", &token, json!({"jobs": many}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    // A batch of 1,000 is taken.
    let full: Vec<_> = (0..1000)
        .map(|i| (job(&i.to_string()), Some(format!("full-{i}"))))
        .collect();
    let results = api.submit_batch(&full).await.unwrap();
    assert_eq!(results.len(), 1000);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, BatchResult::Submitted { created: true, .. }))
    );
    s.stop().await;
}

/// A tenant id is checked once, where the request enters: a path segment
/// that cannot be a tenant id is the same 404 `not_found` on every route
/// that takes one, exactly as an unknown tenant is (a malformed id and a
/// missing one cannot be told apart), and writes nothing. A token whose
/// tenant part is malformed is the same 401 as a wrong secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_tenant_id_is_the_same_answer_on_every_route() {
    use reqwest::Method;
    let s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let token = s.tenant("acme").await;
    let before = s.tenant_info("acme").await;
    let job = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let long = "a".repeat(65);
    for bad in ["ghost", "Acme", "a:b", "a%7Bb%7D", "a.b", long.as_str()] {
        let routes: [(Method, String, Option<serde_json::Value>, &str); 6] = [
            (Method::GET, format!("/v1/tenants/{bad}"), None, "tenant"),
            (
                Method::PATCH,
                format!("/v1/tenants/{bad}"),
                Some(json!({"weight": 2})),
                "tenant",
            ),
            (
                Method::POST,
                format!("/v1/tenants/{bad}/credits"),
                Some(json!({"amount": 5})),
                "tenant",
            ),
            (
                Method::GET,
                format!("/v1/tenants/{bad}/ledger"),
                None,
                "tenant",
            ),
            (
                Method::GET,
                format!("/v1/tenants/{bad}/usage"),
                None,
                "tenant",
            ),
            (
                Method::POST,
                format!("/v1/admin/tenants/{bad}/jobs/{job}/retry"),
                None,
                "job",
            ),
        ];
        for (method, path, body, what) in routes {
            let (st, v) = s.call(method.clone(), &path, Some(ADMIN), body).await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{method} {path}: {v}");
            assert_eq!(error_code(&v), "not_found", "{method} {path}: {v}");
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains(what), "{method} {path}: {v}");
        }
        // Another tenant's token is answered as for an unknown tenant too.
        let (st, v) = s.get(&format!("/v1/tenants/{bad}/ledger"), &token).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{bad}: {v}");
        // A token naming a malformed tenant is a wrong token.
        let (st, v) = s.get("/v1/jobs", &format!("{bad}.secret")).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{bad}: {v}");
    }
    // The malformed id of a new tenant is named.
    let (st, v) = s.post("/v1/tenants", ADMIN, json!({"id": "a:b"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "id", "{v}");
    assert_eq!(s.tenant_info("acme").await, before, "nothing written");
    s.stop().await;
}
