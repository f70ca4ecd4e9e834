//! Every client command of the real `agentplane` binary against a live API:
//! its output and its exit status (0 done, 1 refused by the API or
//! unreachable, 2 a usage error, 3 auth, 4 not found, 5 the job failed). `tenant create`, `component push`,
//! `context push`, `job submit --wait` and `job get` of a missing job are
//! in `e2e.rs`; this file has the rest.

mod common;

use common::stack::{ADMIN, Opts, Stack, bin};
use serde_json::{Value, json};
use std::process::{Command, Output};

/// Runs the CLI with `token` against `base`; answers its output.
async fn cli(base: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env("AGENTPLANE_URL", base)
        .env_remove("AGENTPLANE_TOKEN");
    if let Some(t) = token {
        cmd.env("AGENTPLANE_TOKEN", t);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run agentplane"))
        .await
        .unwrap()
}

/// The JSON it printed, after checking it exited 0.
fn json(out: &Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// Checks it exited with `status` (see `refused`) and the API's error
/// `code` on stderr and nothing on stdout.
fn refused_with(out: &Output, code: &str, status: i32) {
    assert_eq!(out.status.code(), Some(status), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(code), "expected {code}: {err}");
}

/// `refused_with` the status the CLI gives the API's error `code`.
fn refused(out: &Output, code: &str) {
    let status = match code {
        "unauthorized" | "forbidden" => 3,
        "not_found" => 4,
        _ => 1,
    };
    refused_with(out, code, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_get_and_credits() {
    let s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    s.tenant("acme").await;
    let base = s.base.clone();
    let admin = Some(ADMIN);

    let t = json(&cli(&base, admin, &["tenant", "get", "acme"]).await);
    assert_eq!(t["id"], "acme");
    let before = t["credits"]["balance"].as_i64().unwrap();
    assert_eq!(before, 1_000_000_000);

    let b = json(&cli(&base, admin, &["tenant", "credits", "acme", "250"]).await);
    assert_eq!(
        (b["id"].as_str(), b["balance"].as_i64()),
        (Some("acme"), Some(before + 250))
    );
    // A negative amount takes credits back (not parsed as a flag).
    let b = json(&cli(&base, admin, &["tenant", "credits", "acme", "-1000"]).await);
    assert_eq!(b["balance"].as_i64(), Some(before - 750));
    let t = json(&cli(&base, admin, &["tenant", "get", "acme"]).await);
    assert_eq!(t["credits"]["balance"].as_i64(), Some(before - 750));

    refused(
        &cli(&base, admin, &["tenant", "get", "nobody"]).await,
        "not_found",
    );
    refused(
        &cli(&base, admin, &["tenant", "credits", "nobody", "5"]).await,
        "not_found",
    );
    // A tenant sees itself and nobody else, and cannot grant itself credits.
    let acme2 = s.tenant("acme2").await;
    let me = json(&cli(&base, Some(&acme2), &["tenant", "get", "acme2"]).await);
    assert_eq!(me["id"], "acme2");
    refused(
        &cli(&base, Some(&acme2), &["tenant", "get", "acme"]).await,
        "not_found",
    );
    refused(
        &cli(&base, Some(&acme2), &["tenant", "credits", "acme2", "5"]).await,
        "forbidden",
    );
    refused(
        &cli(&base, None, &["tenant", "get", "acme"]).await,
        "unauthorized",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_commands_and_their_flags() {
    let s = Stack::start(Opts::default()).await;
    let token = s.tenant("acme").await;
    let digest = s.push(&token, "echo").await;
    let base = s.base.clone();
    let tok = Some(token.as_str());

    // --input-file: the file's bytes are the input, newlines included.
    let input = s.dir.join("input.txt");
    std::fs::write(&input, "from a file\nsecond line\n").unwrap();
    let file = input.to_str().unwrap();
    let submit = |key: &'static str, input_flag: &'static str, value: String| {
        let (base, digest) = (base.clone(), digest.clone());
        async move {
            let args = [
                "job",
                "submit",
                "--component",
                &digest,
                input_flag,
                &value,
                "--idempotency-key",
                key,
            ];
            cli(&base, tok, &args).await
        }
    };
    let first = json(&submit("k1", "--input-file", file.into()).await);
    let id = first["id"].as_str().unwrap().to_string();
    // --idempotency-key: the same key and body answer the same job...
    let again = json(&submit("k1", "--input-file", file.into()).await);
    assert_eq!(again["id"], first["id"]);
    // ...the same key with another body is refused, exit 1.
    refused(
        &submit("k1", "--input", "another".into()).await,
        "idempotency_conflict",
    );

    let done = json(&cli(&base, tok, &["job", "get", &id, "--wait", "30"]).await);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["output"], "from a file\nsecond line\n");

    // job log prints the log as text, not JSON.
    let log = cli(&base, tok, &["job", "log", &id]).await;
    assert_eq!(log.status.code(), Some(0), "{log:?}");
    let text = String::from_utf8_lossy(&log.stdout);
    assert!(text.contains("[info] echo got 24 bytes"), "{text}");

    // job cancel: a delayed job is cancelled at once...
    let delayed = json(
        &cli(
            &base,
            tok,
            &[
                "job",
                "submit",
                "--component",
                &digest,
                "--input",
                "later",
                "--delay-ms",
                "600000",
            ],
        )
        .await,
    );
    assert_eq!(delayed["state"], "delayed");
    let did = delayed["id"].as_str().unwrap().to_string();
    let c = json(&cli(&base, tok, &["job", "cancel", &did]).await);
    assert_eq!(
        (c["id"].as_str(), c["state"].as_str()),
        (Some(did.as_str()), Some("cancelled"))
    );
    // ...and a finished job is left as it finished.
    let c = json(&cli(&base, tok, &["job", "cancel", &id]).await);
    assert_eq!(c["state"], "succeeded");
    let still = json(&cli(&base, tok, &["job", "get", &id]).await);
    assert_eq!(still["output"], done["output"]);
    refused(
        &cli(&base, tok, &["job", "cancel", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]).await,
        "not_found",
    );

    // job list: newest first, filtered by state, paged by cursor.
    let all = json(&cli(&base, tok, &["job", "list"]).await);
    let ids: Vec<&str> = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [did.as_str(), id.as_str()], "{all}");
    let page = json(&cli(&base, tok, &["job", "list", "--limit", "1"]).await);
    assert_eq!(page["jobs"][0]["id"].as_str(), Some(did.as_str()));
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let next = json(
        &cli(
            &base,
            tok,
            &["job", "list", "--limit", "1", "--cursor", &cursor],
        )
        .await,
    );
    assert_eq!(next["jobs"][0]["id"].as_str(), Some(id.as_str()), "{next}");
    let ok = json(&cli(&base, tok, &["job", "list", "--state", "succeeded"]).await);
    assert_eq!(ok["jobs"].as_array().unwrap().len(), 1, "{ok}");
    assert_eq!(ok["jobs"][0]["id"].as_str(), Some(id.as_str()));
    refused(
        &cli(&base, tok, &["job", "list", "--cursor", "not-a-cursor"]).await,
        "invalid",
    );
    s.assert_books_balance("acme").await;
    s.stop().await;
}

/// Usage errors exit 2 before any request; an API that cannot be reached,
/// or an input file that cannot be read, exit 1 with the reason.
#[tokio::test]
async fn exit_statuses() {
    // Nothing listens here (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let usage = [
        vec!["job", "submit", "--input", "x"],
        vec!["job", "submit", "--component", "sha256:x"],
        vec![
            "job",
            "submit",
            "--component",
            "c",
            "--input",
            "x",
            "--input-file",
            "f",
        ],
        vec!["job", "list", "--state", "sleeping"],
        vec!["tenant", "credits", "acme", "lots"],
        vec!["no-such-command"],
    ];
    for args in usage {
        let out = cli(&base, Some("t"), &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    let out = cli(
        &base,
        Some("t"),
        &["job", "get", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error:"),
        "{out:?}"
    );
    let out = cli(
        &base,
        Some("t"),
        &[
            "job",
            "submit",
            "--component",
            "c",
            "--input-file",
            "/nonexistent/input",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/input"),
        "{out:?}"
    );
}

/// The commands for the routes beyond jobs (tenant patch, ledger, usage,
/// component and context get, admin listings and log, retry, batch), `--output
/// table`, and the exit statuses: 5 for a job that failed under `--wait`,
/// 3 for the wrong token, 4 for what does not exist, 2 for a bad file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_has_a_command_and_exit_statuses_differ() {
    let s = Stack::start(Opts::default()).await;
    let token = s.tenant("acme").await;
    let digest = s.push(&token, "echo").await;
    let base = s.base.clone();
    let (tok, admin) = (Some(token.as_str()), Some(ADMIN));
    let submit = |input: &'static str| {
        let (base, digest, token) = (base.clone(), digest.clone(), token.clone());
        async move {
            let args = [
                "job",
                "submit",
                "--component",
                &digest,
                "--input",
                input,
                "--max-attempts",
                "1",
                "--wait",
            ];
            cli(&base, Some(&token), &args).await
        }
    };

    // --wait: a job that fails is printed, and the status says so.
    let failed = submit("fail:boom").await;
    assert_eq!(failed.status.code(), Some(5), "{failed:?}");
    let failed: Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(failed["state"], "failed");
    let fid = failed["id"].as_str().unwrap().to_string();
    let ok = json(&submit("fine").await);
    assert_eq!(ok["state"], "succeeded");

    // Retry, by the tenant: the same job, queued again as its next attempt.
    let r = json(&cli(&base, tok, &["job", "retry", &fid]).await);
    assert_eq!(r["id"], json!(fid));
    let job = s.wait_terminal(&token, &fid, 60).await;
    assert_eq!(job["state"], "failed", "{job}");
    // Then by the admin; retrying a job that is not failed is 409 (status 1).
    let again = json(&cli(&base, admin, &["admin", "retry", "acme", &fid]).await);
    assert_eq!(again["id"], json!(fid));
    let oid = ok["id"].as_str().unwrap();
    let refused_retry = cli(&base, tok, &["job", "retry", oid]).await;
    assert_eq!(refused_retry.status.code(), Some(1), "{refused_retry:?}");
    let err: Value = serde_json::from_slice(&refused_retry.stderr).unwrap_or(Value::Null);
    assert!(
        err.to_string().contains("not_failed")
            || String::from_utf8_lossy(&refused_retry.stderr).contains("not_failed"),
        "{refused_retry:?}"
    );
    s.wait_terminal(&token, &fid, 60).await;
    // The admin reads any tenant's job's log.
    let log = cli(&base, admin, &["admin", "log", "acme", &fid]).await;
    assert_eq!(log.status.code(), Some(0), "{log:?}");
    assert!(!log.stdout.is_empty(), "{log:?}");

    // Admin listings, as JSON and as a table.
    let jobs = json(
        &cli(
            &base,
            admin,
            &["admin", "jobs", "--error-kind", "agent_error"],
        )
        .await,
    );
    // The failed job, once however often it was retried.
    let ids: Vec<&Value> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| &j["id"])
        .collect();
    assert_eq!(ids, [&json!(fid)], "{jobs}");
    let table = cli(&base, admin, &["admin", "tenants", "--output", "table"]).await;
    assert_eq!(table.status.code(), Some(0), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("id ") && header.contains("share_1m"),
        "{text}"
    );
    assert!(lines.next().unwrap().starts_with("acme "), "{text}");
    let one = cli(&base, tok, &["job", "get", &fid, "-o", "table"]).await;
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("error.kind") && l.ends_with("agent_error")),
        "{text}"
    );
    // The admin routes refuse a tenant: auth, 3.
    refused(&cli(&base, tok, &["admin", "tenants"]).await, "forbidden");

    // Tenant patch, ledger (JSON and CSV) and usage.
    let t = json(
        &cli(
            &base,
            admin,
            &[
                "tenant", "patch", "acme", "--weight", "4", "--fuel", "5000000",
            ],
        )
        .await,
    );
    assert_eq!(
        (t["weight"].as_u64(), t["limits"]["fuel"].as_u64()),
        (Some(4), Some(5_000_000))
    );
    let ledger = json(&cli(&base, tok, &["tenant", "ledger", "acme"]).await);
    assert!(ledger["entries"].as_array().unwrap().len() >= 3, "{ledger}");
    let csv = cli(
        &base,
        admin,
        &["tenant", "ledger", "acme", "--csv", "--limit", "2"],
    )
    .await;
    assert_eq!(csv.status.code(), Some(0), "{csv:?}");
    let csv = String::from_utf8_lossy(&csv.stdout);
    assert_eq!(csv.lines().count(), 3, "a header and 2 entries: {csv}");
    let usage = json(&cli(&base, tok, &["tenant", "usage", "acme", "--by", "day"]).await);
    // The failed job once, however often it was retried.
    assert_eq!(usage["total"]["jobs"]["failed"], 1, "{usage}");
    refused(
        &cli(&base, tok, &["tenant", "usage", "other"]).await,
        "not_found",
    );

    // Component and context get; what does not exist is 4.
    let c = json(&cli(&base, tok, &["component", "get", &digest]).await);
    assert_eq!(c["digest"], json!(digest));
    let none = format!("sha256:{}", "0".repeat(64));
    refused(
        &cli(&base, tok, &["component", "get", &none]).await,
        "not_found",
    );
    refused(
        &cli(&base, tok, &["context", "get", "nothing"]).await,
        "not_found",
    );

    // Batch from a file: one result per job; any refusal exits 1.
    let file = s.dir.join("batch.json");
    let body = json!({"jobs": [
        {"job": {"component": digest, "input": "one"}, "idempotency_key": "b1"},
        {"job": {"component": digest, "input": "two"}},
    ]});
    std::fs::write(&file, body.to_string()).unwrap();
    let b = json(&cli(&base, tok, &["job", "batch", file.to_str().unwrap()]).await);
    assert_eq!(b["results"].as_array().unwrap().len(), 2, "{b}");
    assert_eq!(b["results"][0]["created"], true);
    let bare = json!([{"job": {"component": none, "input": "x"}}]);
    std::fs::write(&file, bare.to_string()).unwrap();
    let out = cli(&base, tok, &["job", "batch", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let b: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(b["results"][0]["error"].is_object(), "{b}");
    std::fs::write(&file, "not json").unwrap();
    let out = cli(&base, tok, &["job", "batch", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Off a terminal no spinner is drawn: stderr stays empty.
    let quiet = submit("quiet").await;
    assert!(quiet.stderr.is_empty(), "{quiet:?}");
    s.stop().await;
}

/// `tenant secret-set` reads the value from stdin (never an argument);
/// `tenant secrets` lists names only; `tenant patch --allow-outbound` sets
/// the egress policy in normal form.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_secrets_and_outbound_rules() {
    let s = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let token = s.tenant("acme").await;
    let base = s.base.clone();
    let value = "sk-cli-0123456789";
    let out = {
        let mut cmd = Command::new(bin());
        cmd.args(["tenant", "secret-set", "acme", "api_key"])
            .env("AGENTPLANE_URL", &base)
            .env("AGENTPLANE_TOKEN", &token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap();
            use std::io::Write;
            writeln!(child.stdin.take().unwrap(), "{value}").unwrap();
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(json(&out)["name"], "api_key");
    let list = cli(&base, Some(&token), &["tenant", "secrets", "acme"]).await;
    let l = json(&list);
    assert_eq!(l["secrets"][0]["name"], "api_key", "{l}");
    assert!(!String::from_utf8_lossy(&list.stdout).contains(value));
    refused(
        &cli(
            &base,
            Some(&token),
            &["tenant", "secret-delete", "acme", "nope"],
        )
        .await,
        "not_found",
    );
    let d = json(
        &cli(
            &base,
            Some(&token),
            &["tenant", "secret-delete", "acme", "api_key"],
        )
        .await,
    );
    assert_eq!(d["deleted"], "api_key");

    let t = json(
        &cli(
            &base,
            Some(ADMIN),
            &[
                "tenant",
                "patch",
                "acme",
                "--allow-outbound",
                "https://*.Example.com",
                "--allow-outbound",
                "http://10.0.0.5:8080",
            ],
        )
        .await,
    );
    assert_eq!(
        t["allowed_outbound_hosts"],
        json!(["https://*.example.com:443", "http://10.0.0.5:8080"])
    );
    let t = json(
        &cli(
            &base,
            Some(ADMIN),
            &["tenant", "patch", "acme", "--no-outbound"],
        )
        .await,
    );
    assert_eq!(t["allowed_outbound_hosts"], json!([]));
    refused(
        &cli(
            &base,
            Some(ADMIN),
            &[
                "tenant",
                "patch",
                "acme",
                "--allow-outbound",
                "ftp://x.test",
            ],
        )
        .await,
        "invalid_request",
    );

    // Model grants: `--model NAME:IN:OUT`, the allowance, then none again.
    let t = json(
        &cli(
            &base,
            Some(ADMIN),
            &[
                "tenant",
                "patch",
                "acme",
                "--model",
                "tiny:3:7",
                "--model",
                "big:10:20",
                "--max-tokens-per-job",
                "500",
            ],
        )
        .await,
    );
    assert_eq!(t["models"][1]["model"], "big", "{t}");
    assert_eq!(t["models"][1]["credits_per_1k_tokens_out"], 20, "{t}");
    assert_eq!(t["max_tokens_per_job"], 500, "{t}");
    let out = cli(
        &base,
        Some(ADMIN),
        &["tenant", "patch", "acme", "--model", "tiny:3"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let t = json(
        &cli(
            &base,
            Some(ADMIN),
            &["tenant", "patch", "acme", "--no-models"],
        )
        .await,
    );
    assert_eq!(t["models"], json!([]), "{t}");
    s.stop().await;
}
