//! The router in-process with `tower::ServiceExt::oneshot` (no socket), over
//! a real control plane on a real `redis-server`: routing, authentication,
//! error bodies, limits.

mod common;

use agentplane::api::{self, ApiConfig, AppState, token_hash};
use agentplane::control::{ControlConfig, ControlPlane};
use agentplane::host::{Host, HostConfig};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::redis::RedisServer;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

const ADMIN: &str = "admin-secret";

async fn app(cfg: ApiConfig) -> (RedisServer, axum::Router) {
    let redis = RedisServer::start();
    let control = ControlPlane::connect(&redis.url, ControlConfig::default())
        .await
        .expect("control plane");
    let host = Arc::new(Host::new(HostConfig::admission()).expect("host"));
    let router = api::app(AppState::new(control, host, ADMIN.into(), cfg));
    (redis, router)
}

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, v)
}

fn req(method: &str, uri: &str, token: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(body.into()).unwrap()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn errors_are_json_with_a_code() {
    let (_r, app) = app(ApiConfig::default()).await;
    let (st, v) = send(&app, req("GET", "/nope", None, Body::empty())).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(code(&v), "not_found");
    let (st, v) = send(&app, req("DELETE", "/v1/jobs", None, Body::empty())).await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(code(&v), "method_not_allowed");
    let (st, v) = send(&app, req("GET", "/v1/jobs", None, Body::empty())).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(code(&v), "unauthorized");
    assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    let (st, _) = send(
        &app,
        req("GET", "/v1/jobs", Some("admin-secreT"), Body::empty()),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = send(&app, req("GET", "/healthz", None, Body::empty())).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = send(&app, req("GET", "/readyz", None, Body::empty())).await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn tenant_lifecycle_as_admin() {
    let (_r, app) = app(ApiConfig::default()).await;
    let body = json!({"id": "acme", "weight": 2, "credits": 500, "limits": {"fuel": 1000000}});
    let (st, v) = send(
        &app,
        req("POST", "/v1/tenants", Some(ADMIN), body.to_string()),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "acme");
    let token = v["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("acme.") && token.len() == 5 + 64);
    assert_ne!(token_hash(&token), token);

    // The tenant reads itself; the admin reads it too.
    for t in [token.as_str(), ADMIN] {
        let (st, v) = send(&app, req("GET", "/v1/tenants/acme", Some(t), Body::empty())).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["weight"], 2);
        assert_eq!(v["credits"]["balance"], 500);
        assert_eq!(v["limits"]["fuel"], 1000000);
    }
    // Patch and grant as admin; a tenant may do neither.
    let patch = json!({"weight": 5, "max_running": 3});
    let (st, v) = send(
        &app,
        req("PATCH", "/v1/tenants/acme", Some(ADMIN), patch.to_string()),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["weight"], 5);
    assert_eq!(v["max_running"], 3);
    let (st, _) = send(
        &app,
        req("PATCH", "/v1/tenants/acme", Some(&token), patch.to_string()),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, v) = send(
        &app,
        req(
            "POST",
            "/v1/tenants/acme/credits",
            Some(ADMIN),
            r#"{"amount": -200}"#,
        ),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["balance"], 300);
    let (st, v) = send(
        &app,
        req(
            "POST",
            "/v1/tenants/ghost/credits",
            Some(ADMIN),
            r#"{"amount": 1}"#,
        ),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    let (st, v) = send(
        &app,
        req(
            "POST",
            "/v1/tenants/acme/credits",
            Some(ADMIN),
            r#"{"amount": "lots"}"#,
        ),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("amount"));
    // Bad ids and values are named.
    for (body, field) in [
        (json!({"id": "Bad Id"}), "id"),
        (json!({"id": "ok", "weight": 0}), "weight"),
        (json!({"id": "ok", "limits": {"fuel": 0}}), "fuel"),
        (json!({"id": "ok", "limits": {"fule": 5}}), "fule"),
    ] {
        let (st, v) = send(
            &app,
            req("POST", "/v1/tenants", Some(ADMIN), body.to_string()),
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
}

#[tokio::test]
async fn declared_oversize_bodies_are_refused_before_reading() {
    let (_r, app) = app(ApiConfig {
        max_component_bytes: 1024,
        ..ApiConfig::default()
    })
    .await;
    let (_, v) = send(
        &app,
        req("POST", "/v1/tenants", Some(ADMIN), r#"{"id":"acme"}"#),
    )
    .await;
    let token = v["token"].as_str().unwrap().to_string();
    // A body that claims 1 GiB but sends nothing: refused on the header.
    let r = Request::builder()
        .method("POST")
        .uri("/v1/components")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_LENGTH, (1u64 << 30).to_string())
        .body(Body::empty())
        .unwrap();
    let (st, v) = send(&app, r).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(code(&v), "payload_too_large");
}

#[tokio::test]
async fn rejections_media_types_and_big_heads_answer_json() {
    let (_r, app) = app(ApiConfig::default()).await;
    let (_, v) = send(
        &app,
        req("POST", "/v1/tenants", Some(ADMIN), r#"{"id":"acme"}"#),
    )
    .await;
    let token = v["token"].as_str().unwrap().to_string();
    // axum's own rejection of a path it cannot decode, rewritten to JSON.
    let (st, v) = send(
        &app,
        req("GET", "/v1/jobs/%FF", Some(&token), Body::empty()),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(code(&v), "invalid_request");
    // A form body on a JSON route.
    let r = Request::builder()
        .method("POST")
        .uri("/v1/tenants")
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(r#"{"id":"b"}"#))
        .unwrap();
    let (st, v) = send(&app, r).await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    assert_eq!(code(&v), "unsupported_media_type");
    // A head over the limit.
    let r = Request::builder()
        .method("GET")
        .uri("/v1/jobs")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header("x-pad", "p".repeat(20 << 10))
        .body(Body::empty())
        .unwrap();
    let (st, v) = send(&app, r).await;
    assert_eq!(st, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "{v}");
    assert_eq!(code(&v), "headers_too_large");
    // Metrics are the admin's.
    let (st, v) = send(&app, req("GET", "/metrics", Some(&token), Body::empty())).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
}
