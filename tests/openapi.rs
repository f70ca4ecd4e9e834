//! The OpenAPI document (`/v1/openapi.json`) against the API, the CI check
//! that they agree: every route the README's API table lists is in the
//! document with its method, and every operation of the document is a
//! route the server answers (not the unknown-route fallback).

mod common;

use common::stack::*;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeSet;

/// `(method, path)` of every route in the README's API table.
fn readme_routes() -> BTreeSet<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme.find("## The HTTP API").expect("an API section");
    let mut out = BTreeSet::new();
    for line in readme[start..].lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split(" | ").next().unwrap_or_default();
        let mut method = None;
        for item in cell.split('`').skip(1).step_by(2) {
            let (m, path) = match item.split_once(' ') {
                Some((m, p)) if m.chars().all(|c| c.is_ascii_uppercase()) => (m.to_string(), p),
                _ => match &method {
                    Some(m) => (String::clone(m), item),
                    None => continue,
                },
            };
            if !path.starts_with('/') {
                continue;
            }
            let path = path.split('?').next().unwrap().to_string();
            method = Some(m.clone());
            out.insert((m, path));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_in_the_openapi_document_and_served() {
    let s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let resp = s
        .http
        .get(format!("{}/v1/openapi.json", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let doc: Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let mut spec = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if ["get", "post", "patch", "put", "delete"].contains(&method.as_str()) {
                spec.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let listed = readme_routes();
    assert!(listed.len() >= 20, "README table not parsed: {listed:?}");
    let missing: Vec<_> = listed.difference(&spec).collect();
    assert!(
        missing.is_empty(),
        "README routes not in the OpenAPI document: {missing:?}"
    );
    let undocumented: Vec<_> = spec.difference(&listed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the README: {undocumented:?}"
    );

    // Every operation is served: whatever it answers without a token, it
    // is not the unknown-route fallback nor 405.
    for (method, path) in &spec {
        let url = format!("{}{}", s.base, path.replace(['{', '}'], ""));
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = s.http.request(m, &url).send().await.unwrap();
        let st = resp.status();
        let text = resp.text().await.unwrap();
        assert_ne!(
            st,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {text}"
        );
        assert!(
            !text.contains("route not found"),
            "{method} {path} is not routed: {text}"
        );
    }
    s.stop().await;
}
