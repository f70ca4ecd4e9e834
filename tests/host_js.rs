//! A JavaScript agent built with componentize-js and its default features
//! (`guest-examples/js-fetch`: it imports `wasi:http/outgoing-handler`, and
//! calls out with `fetch`) is admitted and runs under its tenant's egress
//! policy, against real HTTP servers on the loopback range. (StarlingMonkey's
//! `fetch` hands a redirect back as it came, and the host follows none.) Its own binary:
//! installing the tool, building and compiling the 12 MB component take a
//! while and should not slow the other host tests.

mod common;

use agentplane::egress::Policy;
use agentplane::host::{EgressGrant, Host, HostConfig, RunOutcome, RunRequest};
use common::upstream::Upstream;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Where the agent is built: a copy of `guest-examples/js-fetch` under
/// `target/`, whose `node_modules` stays between runs.
fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/js-fetch")
}

/// Why the build tools are unavailable, if they are (no `npm`, or the
/// package registry unreachable); installs componentize-js when missing.
fn tools(dir: &Path) -> Result<(), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-examples/js-fetch");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["package.json", "agent.js"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let cli = dir.join("node_modules/@bytecodealliance/componentize-js/src/cli.js");
    if cli.exists() {
        return Ok(());
    }
    let out = Command::new("npm")
        .current_dir(dir)
        .args(["install", "--no-audit", "--no-fund", "--fetch-retries", "1"])
        .output()
        .map_err(|e| format!("npm cannot run ({e})"))?;
    if !out.status.success() || !cli.exists() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "`npm install` failed ({}): {}",
            out.status,
            err.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
        ));
    }
    Ok(())
}

/// Builds the agent; only unavailable tools skip the test (and say so),
/// unless `AGENTPLANE_REQUIRE_COMPONENTIZE_JS` is set.
fn build() -> Option<Vec<u8>> {
    let dir = build_dir();
    if let Err(why) = tools(&dir) {
        if std::env::var_os("AGENTPLANE_REQUIRE_COMPONENTIZE_JS").is_some() {
            panic!("componentize-js unavailable: {why}");
        }
        println!("SKIPPED: componentize-js unavailable: {why}");
        eprintln!("SKIPPED: componentize-js unavailable: {why}");
        return None;
    }
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
    let out = Command::new("node")
        .current_dir(&dir)
        .arg("node_modules/@bytecodealliance/componentize-js/src/cli.js")
        .arg("agent.js")
        .arg("--wit")
        .arg(&wit)
        .args(["--world-name", "agent", "-o", "agent.wasm"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "componentize-js failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(std::fs::read(dir.join("agent.wasm")).unwrap())
}

fn grant(rules: &[String]) -> EgressGrant {
    EgressGrant {
        policy: Arc::new(Policy::parse(rules).unwrap()),
        max_requests: 8,
        max_bytes: 1 << 20,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_componentize_js_agent_fetches_under_the_policy() {
    let Some(bytes) = build() else { return };
    let (up, other) = (Upstream::start().await, Upstream::start().await);
    let host = Host::new(HostConfig {
        max_instances: 8,
        ..HostConfig::default()
    })
    .unwrap();
    let admitted = host.admit(&bytes).expect("js agent admitted");
    assert!(admitted.outbound_http, "default features import wasi:http");
    let agent = host
        .component(&admitted.digest, || async move { Ok(Some(bytes)) })
        .await
        .unwrap();
    let run = |rules: Vec<String>, url: String| {
        let (host, agent) = (&host, agent.clone());
        async move {
            let input = json!({ "url": url }).to_string();
            let req = RunRequest {
                egress: grant(&rules),
                ..common::host::request("t1", &agent, &input, common::host::limits())
            };
            host.run(req).await
        }
    };

    // Allowed: fetch goes through, and its answer comes back.
    let r = run(vec![up.base()], format!("{}/hello", up.base())).await;
    let out: Value = match &r.outcome {
        RunOutcome::Ok(o) => serde_json::from_str(o).unwrap(),
        other => panic!("{other:?}; log:\n{}", r.log),
    };
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["body"], "hello from upstream; x-key=");
    assert_eq!(r.egress.requests, 1);
    assert!(r.log.contains("fetched"), "{}", r.log);

    // Refused: another server.
    let url = format!("{}/hello", other.base());
    let r = run(vec![up.base()], url.clone()).await;
    match &r.outcome {
        RunOutcome::Failed { message, .. } => {
            assert!(message.starts_with(&format!("fetch {url}")), "{message}")
        }
        other => panic!("{url}: {other:?}; log:\n{}", r.log),
    }
    assert!(
        r.log.contains("[egress]") && r.log.contains("allowed_outbound_hosts"),
        "{}",
        r.log
    );
    // A redirect to it is an answer: the host follows none.
    let url = format!("{}/redirect?to={}/hello", up.base(), other.base());
    let r = run(vec![up.base()], url).await;
    match &r.outcome {
        RunOutcome::Ok(o) => assert!(o.contains("\"status\":302"), "{o}"),
        other => panic!("{other:?}; log:\n{}", r.log),
    }
    assert_eq!(other.hits(), 0, "nothing reached the other server");
}
