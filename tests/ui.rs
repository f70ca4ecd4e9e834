//! The dashboard (`GET /ui`) in a real headless Chromium, against a real
//! stack: the page is loaded, the token typed in, and what it shows is
//! checked against the API's own answers. `tests/ui/drive.mjs` drives the
//! browser over the DevTools protocol with Node (no npm packages).
//!
//! Needs Debian's `chromium` (or `CHROMIUM=/path`) and `node`; without
//! them the test prints "SKIPPED: chromium unavailable" and passes.
//! `UPDATE_SCREENSHOT=1` writes the admin's view to `docs/dashboard.png`.

mod common;

use agentplane::client::Page;
use common::stack::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::PathBuf;

fn find(name: &str, env: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_what_the_api_answers() {
    let s = Stack::start(Opts::default()).await;

    // Served to anyone, as HTML that loads nothing from elsewhere.
    let resp = s.http.get(format!("{}/ui", s.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = resp.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page must not load anything external"
    );
    assert!(!html.contains("localStorage.setItem") && !html.contains("document.cookie ="));

    let (Some(chromium), Some(node)) = (find("chromium", "CHROMIUM"), find("node", "NODE")) else {
        eprintln!(
            "SKIPPED: chromium unavailable (install Debian's `chromium` and `node`, or set CHROMIUM)"
        );
        s.stop().await;
        return;
    };

    let Scene { acme, ok_a: ok, .. } = s.three_finished_jobs("hello dashboard").await;

    let shot = if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/dashboard.png"))
    } else {
        std::env::temp_dir().join(format!("agentplane-dashboard-{}.png", std::process::id()))
    };
    let out = tokio::process::Command::new(node)
        .arg("--experimental-websocket")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ui/drive.mjs"))
        .arg(&chromium)
        .arg(format!("{}/ui", s.base))
        .arg(&shot)
        // Tokens in the environment: never in a URL or an argument.
        .env("UI_TOKENS", json!([ADMIN, acme]).to_string())
        .env("UI_JOB", &ok)
        .output()
        .await
        .expect("node runs");
    assert!(
        out.status.success(),
        "driving chromium failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let seen: Vec<Value> = serde_json::from_slice(&out.stdout).expect("the driver's JSON");
    assert_eq!(seen.len(), 2);

    // The admin's view: every tenant, with what /v1/admin/tenants says.
    let admin_view = &seen[0];
    assert!(
        admin_view["who"].as_str().unwrap().starts_with("admin"),
        "{admin_view}"
    );
    let page = s
        .as_caller(ADMIN)
        .admin_tenants(&Page::default())
        .await
        .unwrap();
    let rows = admin_view["rows"].as_array().unwrap();
    assert_eq!(rows.len(), page.tenants.len(), "{admin_view}");
    for (row, t) in rows.iter().zip(&page.tenants) {
        let cells: Vec<&str> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cells[0], t.info.id);
        assert_eq!(cells[1], t.info.weight.to_string());
        assert_eq!(cells[2], t.info.running.to_string());
        assert_eq!(cells[3], t.info.queued.to_string());
        assert_eq!(cells[4], t.info.credits.balance.to_string());
        assert_eq!(cells[6], format!("{:.1}%", 100.0 * t.weight_share));
    }
    // Plots drawn: a share and a weight line per tenant, queue lines, a
    // credit bar per tenant, and the failure by its kind.
    assert_eq!(admin_view["share_paths"], json!(2 * page.tenants.len()));
    assert_eq!(admin_view["queue_paths"], json!(3));
    assert_eq!(admin_view["credit_bars"], json!(page.tenants.len()));
    let failures: Vec<&str> = admin_view["failure_bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(failures, ["agent_error", "1"], "{admin_view}");
    // The admin opens any tenant's job, with its log.
    let job: Value = serde_json::from_str(admin_view["job"].as_str().unwrap()).unwrap();
    assert_eq!(job["id"], json!(ok));
    let (_, log) = s.get(&format!("/v1/jobs/{ok}/log"), &acme).await;
    assert!(!log.as_str().unwrap().is_empty());
    assert_eq!(admin_view["log"], log);

    // A tenant sees only itself, read-only, and a job with its log.
    let tenant_view = &seen[1];
    assert!(
        tenant_view["who"].as_str().unwrap().contains("tenant acme"),
        "{tenant_view}"
    );
    let rows = tenant_view["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{tenant_view}");
    assert_eq!(rows[0][0], "acme");
    let job: Value = serde_json::from_str(tenant_view["job"].as_str().unwrap()).unwrap();
    assert_eq!(job["id"], json!(ok));
    assert_eq!(job["state"], "succeeded");
    let (_, log) = s.get(&format!("/v1/jobs/{ok}/log"), &acme).await;
    assert_eq!(tenant_view["log"], log);

    // The token was never kept: not in the field, storage, cookies or URL.
    for v in &seen {
        assert_eq!(v["token_field"], "");
        assert_eq!(v["stored"], 0);
        assert_eq!(v["href"], json!(format!("{}/ui", s.base)));
    }
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    s.stop().await;
}
