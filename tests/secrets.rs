//! Tenants' secrets through the real API, a real worker and the real
//! `fetch` guest calling a real HTTP server: a secret set through the API
//! reaches the agent (through `wasi:config/store`) and the server it calls,
//! and nowhere else: not in any API answer, not in the job's output, error
//! or log, not in any Redis key or value, not in Redis's append-only file.

mod common;

use common::stack::{ADMIN, Opts, Stack};
use common::upstream::Upstream;
use reqwest::Method;
use serde_json::{Value, json};

const SECRET: &str = "sk-live-4f1c9a7e2b6d";

/// Every key of the Redis at `url`, and everything each holds, as bytes.
async fn everything_in_redis(url: &str) -> Vec<(String, Vec<u8>)> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        let _ = kind;
        out.push((k, dump.unwrap_or_default()));
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_reaches_its_agent_and_nowhere_else() {
    let up = Upstream::start().await;
    let s = Stack::start(Opts {
        durable_redis: true,
        ..Opts::default()
    })
    .await;
    let token = s
        .tenant_with("acme", json!({"allowed_outbound_hosts": [up.base()]}))
        .await;
    let other = s.tenant("beta").await;
    let path = "/v1/tenants/acme/secrets/api_key";

    // Write-only, checked: a short value, a bad name, another tenant.
    let put = |tok: &str, p: &str, v: &str| {
        let (tok, p, body) = (tok.to_string(), p.to_string(), json!({ "value": v }));
        let s = &s;
        async move { s.call(Method::PUT, &p, Some(&tok), Some(body)).await }
    };
    let (st, v) = put(&token, path, "short").await;
    assert_eq!(
        (st.as_u16(), common::stack::error_code(&v)),
        (400, "invalid_request"),
        "{v}"
    );
    let (st, v) = put(&token, "/v1/tenants/acme/secrets/api-key", SECRET).await;
    assert_eq!(
        (st.as_u16(), common::stack::error_code(&v)),
        (400, "invalid_request"),
        "{v}"
    );
    let (st, _) = put(&other, path, SECRET).await;
    assert_eq!(
        st.as_u16(),
        404,
        "another tenant's secrets do not exist for beta"
    );
    let (st, v) = put(&token, path, SECRET).await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(v["secrets"][0]["name"], "api_key", "{v}");
    assert!(!v.to_string().contains(SECRET), "{v}");
    // The admin may set them too.
    let (st, _) = put(
        ADMIN,
        "/v1/tenants/acme/secrets/spare_key",
        "spare-value-123",
    )
    .await;
    assert_eq!(st.as_u16(), 200);

    // Listed by name, never by value.
    let (st, list) = s
        .call(Method::GET, "/v1/tenants/acme/secrets", Some(&token), None)
        .await;
    assert_eq!(st.as_u16(), 200, "{list}");
    let names: Vec<&str> = list["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["api_key", "spare_key"], "{list}");
    assert!(
        list["secrets"][0]["updated_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    // An agent reads it and sends it; its output, error and log show it
    // redacted.
    let fetch = s.push(&token, "fetch").await;
    let input = json!({
        "url": format!("{}/hello", up.base()),
        "secret_headers": [["x-key", "api_key"]],
    })
    .to_string();
    let id = s
        .submit(&token, json!({"component": fetch, "input": input}))
        .await;
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(up.keys(), [SECRET], "the server got the secret itself");
    let out: Value = serde_json::from_str(job["output"].as_str().unwrap()).unwrap();
    assert_eq!(
        out["body"], "hello from upstream; x-key=[redacted]",
        "{job}"
    );
    let log = s.as_caller(&token).log(&id).await.unwrap();
    assert!(log.contains("sending x-key: [redacted]"), "{log}");

    // Nothing the API answers carries it.
    let mut answers = vec![job.to_string(), log, list.to_string()];
    for p in [
        "/v1/tenants/acme",
        "/v1/tenants/acme/usage",
        "/v1/tenants/acme/ledger",
        &format!("/v1/jobs/{id}"),
        "/v1/jobs",
    ] {
        let (_, v) = s.call(Method::GET, p, Some(&token), None).await;
        answers.push(v.to_string());
    }
    let (_, v) = s
        .call(Method::GET, "/v1/admin/jobs", Some(ADMIN), None)
        .await;
    answers.push(v.to_string());
    for a in &answers {
        assert!(!a.contains(SECRET), "an API answer carries the secret: {a}");
    }

    // Nor does Redis: no key, no value, not its append-only file.
    let all = everything_in_redis(&s.url).await;
    assert!(
        all.iter().any(|(k, _)| k.contains(":secrets:acme")),
        "stored"
    );
    for (k, v) in &all {
        assert!(
            !k.contains(SECRET) && !contains(v, SECRET),
            "in Redis at {k}"
        );
    }
    let mut aof_bytes = 0;
    for entry in walk(&s.dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        aof_bytes += bytes.len();
        assert!(!contains(&bytes, SECRET), "in {}", entry.display());
    }
    assert!(
        aof_bytes > 0,
        "Redis wrote its files under {}",
        s.dir.display()
    );

    // At most 64 per tenant: the 65th name is refused, nothing written;
    // replacing one that exists is still allowed.
    for i in 0..62 {
        let (st, v) = put(
            &token,
            &format!("/v1/tenants/acme/secrets/k{i}"),
            "value-12345",
        )
        .await;
        assert_eq!(st.as_u16(), 200, "{i}: {v}");
    }
    let (st, v) = put(
        &token,
        "/v1/tenants/acme/secrets/one_too_many",
        "value-12345",
    )
    .await;
    assert_eq!(
        (st.as_u16(), common::stack::error_code(&v)),
        (413, "quota_exceeded"),
        "{v}"
    );
    let (st, _) = put(&token, path, SECRET).await;
    assert_eq!(st.as_u16(), 200, "replacing is not adding");
    for i in 0..62 {
        let p = format!("/v1/tenants/acme/secrets/k{i}");
        assert_eq!(
            s.call(Method::DELETE, &p, Some(&token), None)
                .await
                .0
                .as_u16(),
            200
        );
    }

    // Deleted: the next run reads none.
    let (st, v) = s.call(Method::DELETE, path, Some(&token), None).await;
    assert_eq!(st.as_u16(), 200);
    assert_eq!(
        v["secrets"].as_array().unwrap().len(),
        1,
        "spare_key is left: {v}"
    );
    let (st, _) = s.call(Method::DELETE, path, Some(&token), None).await;
    assert_eq!(st.as_u16(), 404);
    let id = s
        .submit(
            &token,
            json!({"component": fetch, "input": input, "max_attempts": 1}),
        )
        .await;
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["message"], "no secret named api_key", "{job}");
    s.stop().await;
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
