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

/// Resolves a `$ref` to `#/components/schemas/…`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            let s = &doc["components"]["schemas"][name];
            assert!(!s.is_null(), "{r} is not in the document");
            resolve(doc, s)
        }
        None => schema,
    }
}

/// Property names a schema declares, its `allOf` parts included.
fn declared<'a>(doc: &'a Value, schema: &'a Value, out: &mut BTreeSet<&'a str>) {
    let schema = resolve(doc, schema);
    if let Some(p) = schema["properties"].as_object() {
        out.extend(p.keys().map(String::as_str));
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        declared(doc, part, out);
    }
}

fn type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => panic!("unknown JSON type {other}"),
    }
}

/// A structural check of `v` against `schema`: types (with `null` where
/// the schema allows it), enums, required properties, items, `allOf`,
/// `oneOf`/`anyOf`, and no property the schema does not declare (a field
/// added to an answer without its schema fails here). Errors are pushed
/// as `at: what`.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str, strict: bool, errs: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type {t}"),
        };
        if !types.iter().any(|ty| type_ok(ty, v)) {
            errs.push(format!("{at}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(v)
    {
        errs.push(format!("{at}: {v} is not one of {schema}"));
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        check(doc, part, v, at, false, errs);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = schema[key].as_array() {
            let ok = alts.iter().any(|alt| {
                let mut e = Vec::new();
                check(doc, alt, v, at, strict, &mut e);
                e.is_empty()
            });
            if !ok {
                errs.push(format!("{at}: {v} matches none of {key} {}", schema[key]));
            }
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{at}: required `{r}` is missing"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, val) in obj {
            let here = format!("{at}.{k}");
            if let Some(p) = props.and_then(|p| p.get(k)) {
                check(doc, p, val, &here, true, errs);
            } else if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object())
            {
                check(doc, extra, val, &here, true, errs);
            }
        }
        let open = schema
            .get("additionalProperties")
            .is_some_and(|a| a.is_object() || a == &Value::Bool(true));
        if strict && !open && (props.is_some() || schema.get("allOf").is_some()) {
            let mut known = BTreeSet::new();
            declared(doc, schema, &mut known);
            for k in obj.keys() {
                if !known.contains(k.as_str()) {
                    errs.push(format!("{at}: `{k}` is not in the schema"));
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"), true, errs);
        }
    }
}

/// The operation of `method path` in the document.
fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not in the document");
    op
}

/// The declared answer of an operation for `status` (exact, else `4XX`…).
fn declared_response(op: &Value, status: u16) -> Option<&Value> {
    let r = &op["responses"];
    r.get(status.to_string())
        .or_else(|| r.get(format!("{}XX", status / 100)))
}

/// Sends a request to a route of the document and checks the answer
/// against what the document declares for it: the status is declared,
/// the media type is declared, and a JSON body validates against its
/// schema. Answers the status and the body.
async fn checked(
    s: &Stack,
    doc: &Value,
    method: &str,
    path: &str,
    args: &[(&str, &str)],
    token: &str,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, Value) {
    let mut url = path.to_string();
    for (k, v) in args {
        url = url.replace(&format!("{{{k}}}"), v);
    }
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = s
        .http
        .request(m, format!("{}{url}", s.base))
        .bearer_auth(token);
    if let Some((ct, bytes)) = body {
        req = req.header("content-type", ct).body(bytes);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| {
            v.to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let op = operation(doc, method, path);
    let declared = declared_response(op, status)
        .unwrap_or_else(|| panic!("{method} {path} answered {status}, not declared: {text}"));
    let media = &declared["content"][&ct];
    assert!(
        media.is_object(),
        "{method} {path} {status}: `{ct}` is not a declared media type of {declared}"
    );
    if ct != "application/json" {
        return (status, Value::String(text));
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut errs = Vec::new();
    check(doc, &media["schema"], &v, "$", true, &mut errs);
    assert!(
        errs.is_empty(),
        "{method} {path} {status}: the answer does not match its schema:\n{}\n{v}",
        errs.join("\n")
    );
    (status, v)
}

/// Operations that take no body (the rest must declare one).
const NO_BODY: [&str; 3] = [
    "POST /v1/jobs/{id}/cancel",
    "POST /v1/jobs/{id}/retry",
    "POST /v1/admin/tenants/{tenant}/jobs/{id}/retry",
];

#[test]
fn every_body_a_route_takes_or_answers_has_a_schema() {
    let doc = serde_json::to_value(agentplane::api::openapi()).unwrap();
    let mut missing = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let name = format!("{} {path}", method.to_uppercase());
            if ["post", "patch", "put"].contains(&method.as_str())
                && !NO_BODY.contains(&name.as_str())
            {
                let content = op["requestBody"]["content"].as_object();
                match content {
                    None => missing.push(format!("{name}: no request body")),
                    Some(c) => {
                        for (mt, m) in c {
                            if m["schema"].is_null() {
                                missing.push(format!("{name}: request `{mt}` has no schema"));
                            }
                        }
                    }
                }
            }
            for (status, r) in op["responses"].as_object().unwrap() {
                let content = r["content"].as_object();
                match content {
                    None => missing.push(format!("{name} {status}: no media type")),
                    Some(c) => {
                        for (mt, m) in c {
                            if m["schema"].is_null() {
                                missing.push(format!("{name} {status}: `{mt}` has no schema"));
                            }
                            if mt == "application/json"
                                && m["schema"]["$ref"].is_null()
                                && path != "/v1/openapi.json"
                            {
                                missing
                                    .push(format!("{name} {status}: JSON without a named schema"));
                            }
                        }
                    }
                }
            }
            if method != "get" || !path.starts_with("/v1/") || path == "/v1/openapi.json" {
                continue;
            }
            if op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"]
                != "#/components/schemas/ErrorBody"
            {
                missing.push(format!("{name}: errors without the ErrorBody schema"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    // The schemas themselves: what a client relies on is required.
    let schemas = &doc["components"]["schemas"];
    for (name, fields) in [
        (
            "Job",
            &[
                "id",
                "tenant",
                "state",
                "component",
                "attempts",
                "usage",
                "created_at",
            ][..],
        ),
        ("JobRequest", &["component", "input"]),
        ("ErrorDetail", &["code", "message", "request_id"]),
        (
            "TenantInfo",
            &["id", "weight", "credits", "limits", "storage"],
        ),
    ] {
        let req: Vec<&str> = schemas[name]["required"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {}", schemas[name]))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for f in fields {
            assert!(req.contains(f), "{name} does not require `{f}`: {req:?}");
        }
    }
}

/// The schema checker catches what it must: a missing required field, a
/// wrong type, an undeclared field, a value outside an enum.
#[test]
fn the_schema_check_can_fail() {
    let doc = serde_json::to_value(agentplane::api::openapi()).unwrap();
    let job_ref = serde_json::json!({"$ref": "#/components/schemas/JobRef"});
    let errs = |v: Value| {
        let mut e = Vec::new();
        check(&doc, &job_ref, &v, "$", true, &mut e);
        e
    };
    assert!(errs(serde_json::json!({"id": "j", "state": "queued"})).is_empty());
    assert!(!errs(serde_json::json!({"id": "j"})).is_empty());
    assert!(!errs(serde_json::json!({"id": 1, "state": "queued"})).is_empty());
    assert!(!errs(serde_json::json!({"id": "j", "state": "lost"})).is_empty());
    assert!(!errs(serde_json::json!({"id": "j", "state": "queued", "x": 1})).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_their_schemas() {
    let s = Stack::start(Opts::default()).await;
    let doc: Value = s
        .http
        .get(format!("{}/v1/openapi.json", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let json = |v: Value| Some(("application/json", serde_json::to_vec(&v).unwrap()));
    let (st, created) = checked(
        &s,
        &doc,
        "POST",
        "/v1/tenants",
        &[],
        ADMIN,
        json(serde_json::json!({"id": "acme", "credits": 1_000_000_000i64, "max_gpus": 0})),
    )
    .await;
    assert_eq!(st, 201);
    let tok = created["token"].as_str().unwrap().to_string();
    let (st, _) = checked(
        &s,
        &doc,
        "GET",
        "/v1/tenants/{id}",
        &[("id", "acme")],
        &tok,
        None,
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = checked(
        &s,
        &doc,
        "PATCH",
        "/v1/tenants/{id}",
        &[("id", "acme")],
        ADMIN,
        json(serde_json::json!({"weight": 2})),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = checked(
        &s,
        &doc,
        "POST",
        "/v1/tenants/{id}/credits",
        &[("id", "acme")],
        ADMIN,
        json(serde_json::json!({"amount": 5})),
    )
    .await;
    assert_eq!(st, 200);
    let wasm = common::guests::guest_bytes("echo");
    let (st, meta) = checked(
        &s,
        &doc,
        "POST",
        "/v1/components",
        &[],
        &tok,
        Some(("application/wasm", wasm)),
    )
    .await;
    assert_eq!(st, 201);
    let digest = meta["digest"].as_str().unwrap().to_string();
    let (st, _) = checked(
        &s,
        &doc,
        "GET",
        "/v1/components/{digest}",
        &[("digest", &digest)],
        &tok,
        None,
    )
    .await;
    assert_eq!(st, 200);
    let ctx = serde_json::json!({"name": "docs", "documents": [{"id": "a", "text": "hello"}]});
    let (st, _) = checked(&s, &doc, "POST", "/v1/contexts", &[], &tok, json(ctx)).await;
    assert_eq!(st, 201);
    let (st, _) = checked(
        &s,
        &doc,
        "GET",
        "/v1/contexts/{name}",
        &[("name", "docs")],
        &tok,
        None,
    )
    .await;
    assert_eq!(st, 200);
    let (st, sub) = checked(
        &s,
        &doc,
        "POST",
        "/v1/jobs",
        &[],
        &tok,
        json(serde_json::json!({"component": digest, "input": "hi", "agent_id": "a1"})),
    )
    .await;
    assert_eq!(st, 201);
    let ok_id = sub["id"].as_str().unwrap().to_string();
    let (st, sub) = checked(
        &s,
        &doc,
        "POST",
        "/v1/jobs",
        &[],
        &tok,
        json(serde_json::json!({"component": digest, "input": "fail:no", "max_attempts": 1})),
    )
    .await;
    assert_eq!(st, 201);
    let failed_id = sub["id"].as_str().unwrap().to_string();
    s.wait_terminal(&tok, &ok_id, 60).await;
    s.wait_terminal(&tok, &failed_id, 60).await;
    for id in [&ok_id, &failed_id] {
        let (st, _) = checked(&s, &doc, "GET", "/v1/jobs/{id}", &[("id", id)], &tok, None).await;
        assert_eq!(st, 200);
        let (st, _) = checked(
            &s,
            &doc,
            "GET",
            "/v1/jobs/{id}/log",
            &[("id", id)],
            &tok,
            None,
        )
        .await;
        assert_eq!(st, 200);
    }
    let (st, batch) = checked(
        &s,
        &doc,
        "POST",
        "/v1/jobs/batch",
        &[],
        &tok,
        json(serde_json::json!({"jobs": [
            {"job": {"component": digest, "input": "x", "delay_ms": 60_000}, "idempotency_key": "k1"},
            {"job": {"component": digest, "input": "x", "gpus": 9}},
        ]})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(batch["results"][1]["error"]["param"], "gpus", "{batch}");
    let delayed = batch["results"][0]["id"].as_str().unwrap().to_string();
    let (st, _) = checked(
        &s,
        &doc,
        "POST",
        "/v1/jobs/{id}/cancel",
        &[("id", &delayed)],
        &tok,
        None,
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = checked(
        &s,
        &doc,
        "POST",
        "/v1/jobs/{id}/retry",
        &[("id", &failed_id)],
        &tok,
        None,
    )
    .await;
    assert_eq!(st, 200, "queued again as its next attempt");
    let (st, _) = checked(
        &s,
        &doc,
        "POST",
        "/v1/admin/tenants/{tenant}/jobs/{id}/retry",
        &[("tenant", "acme"), ("id", &ok_id)],
        ADMIN,
        None,
    )
    .await;
    // (Not the job just retried: the worker may run it and fail it again
    // before this call, and then a retry is a 200 again.)
    assert_eq!(st, 409, "a succeeded job is not failed: not_failed");
    for (path, token) in [
        ("/v1/jobs", tok.as_str()),
        ("/v1/admin/jobs", ADMIN),
        ("/v1/admin/tenants", ADMIN),
        ("/readyz", ADMIN),
        ("/healthz", ADMIN),
        ("/metrics", ADMIN),
        ("/ui", ADMIN),
    ] {
        let (st, _) = checked(&s, &doc, "GET", path, &[], token, None).await;
        assert_eq!(st, 200, "{path}");
    }
    for path in [
        "/v1/tenants/{id}/ledger",
        "/v1/tenants/{id}/usage",
        "/v1/tenants/{id}/callback-key",
    ] {
        let (st, _) = checked(&s, &doc, "GET", path, &[("id", "acme")], &tok, None).await;
        assert_eq!(st, 200, "{path}");
    }
    // Errors: the error body, `param` included.
    let (st, e) = checked(
        &s,
        &doc,
        "POST",
        "/v1/jobs",
        &[],
        &tok,
        json(serde_json::json!({"component": digest, "input": "x", "max_attempts": 0})),
    )
    .await;
    assert_eq!(
        (st, e["error"]["param"].as_str()),
        (400, Some("max_attempts"))
    );
    let (st, _) = checked(
        &s,
        &doc,
        "GET",
        "/v1/jobs/{id}",
        &[("id", "nope")],
        &tok,
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = checked(&s, &doc, "GET", "/v1/admin/jobs", &[], &tok, None).await;
    assert_eq!(st, 403);
    s.stop().await;
}
