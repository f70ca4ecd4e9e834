//! A Python agent built with componentize-py (which imports all of WASI 0.2)
//! is admitted and runs. Its own binary: building and compiling the
//! 18 MB component takes a while and should not slow the other host tests.

mod common;

use agentplane::host::{Host, HostConfig, RunOutcome, RunRequest};
use agentplane::model::Limits;
use std::path::Path;
use std::process::Command;
use tokio_util::sync::CancellationToken;

const APP: &str = r#""""Python echo agent: logs a line and answers its input upper-cased."""
import wit_world
from wit_world.imports import log, state


class WitWorld(wit_world.WitWorld):
    def run(self, input: str) -> str:
        log.write(log.Level.INFO, "python agent got " + input)
        if input.startswith("fail:"):
            raise wit_world.Err(input[5:])
        previous = state.get()
        state.set(b"seen")
        return "py:" + input.upper() + (" again" if previous else "")
"#;

/// Whether the `componentize-py` tool runs, installing it with pip when it
/// is missing. `Err` says why it is unavailable (not installed, and pip
/// could not install it: no pip, or the package registry unreachable).
fn componentize_py(tool: &str) -> Result<(), String> {
    let works = || {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        return Ok(());
    }
    // The one tool this test needs from outside cargo; PyPI has it.
    let pip = Command::new("python3")
        // Bounded: an unreachable registry answers within ~20 s, not the
        // minutes of pip's default retries.
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--retries",
            "1",
            "--timeout",
            "10",
            tool,
        ])
        .output();
    if works() {
        return Ok(());
    }
    let why = match pip {
        Err(e) => format!("`{tool}` is not installed and python3 cannot run ({e})"),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            format!(
                "`{tool}` is not installed and `pip install {tool}` failed ({}): {last}",
                o.status
            )
        }
    };
    Err(why)
}

/// Only the tool being unavailable skips the test, and says so; set
/// `AGENTPLANE_REQUIRE_COMPONENTIZE_PY` to fail instead (a CI that must run it).
fn skip_unless_available(tool: &str) -> bool {
    match componentize_py(tool) {
        Ok(()) => false,
        Err(why) if std::env::var_os("AGENTPLANE_REQUIRE_COMPONENTIZE_PY").is_none() => {
            println!("SKIPPED: componentize-py unavailable: {why}");
            eprintln!("SKIPPED: componentize-py unavailable: {why}");
            true
        }
        Err(why) => panic!("componentize-py unavailable: {why}"),
    }
}

/// Builds the Python agent. Any failure of a tool that is there fails the
/// test: only a missing tool is a reason to skip.
fn build_python_agent(dir: &Path) -> Vec<u8> {
    std::fs::write(dir.join("app.py"), APP).unwrap();
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
    let out = Command::new("componentize-py")
        .current_dir(dir)
        .arg("-d")
        .arg(&wit)
        .args(["-w", "agent", "componentize", "app", "-o", "app.wasm"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "componentize-py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(dir.join("app.wasm")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_componentize_py_agent_is_admitted_and_runs() {
    if skip_unless_available("componentize-py") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bytes = build_python_agent(dir.path());
    let host = Host::new(HostConfig {
        max_instances: 8,
        ..HostConfig::default()
    })
    .unwrap();
    let digest = host.admit(&bytes).expect("python agent admitted").digest;
    let agent = host
        .component(&digest, || async move { Ok(Some(bytes)) })
        .await
        .unwrap();
    let req = |input: &str, state: Option<Vec<u8>>| RunRequest {
        tenant: "py".parse().unwrap(),
        job_id: "j".into(),
        component: agent.clone(),
        input: input.into(),
        limits: Limits {
            fuel: 50_000_000_000,
            memory_bytes: 256 << 20,
            timeout_ms: 60_000,
        },
        contexts: Vec::new(),
        state,
        cancel: CancellationToken::new(),
        egress: Default::default(),
        config: Vec::new(),
        inference: Default::default(),
    };
    let r = host.run(req("hello", None)).await;
    assert_eq!(
        r.outcome,
        RunOutcome::Ok("py:HELLO".into()),
        "log:\n{}",
        r.log
    );
    assert!(r.log.contains("[info] python agent got hello"), "{}", r.log);
    assert_eq!(r.new_state.as_deref(), Some(&b"seen"[..]));
    let r = host.run(req("x", Some(b"seen".to_vec()))).await;
    assert_eq!(
        r.outcome,
        RunOutcome::Ok("py:X again".into()),
        "log:\n{}",
        r.log
    );
    let r = host.run(req("fail:nope", None)).await;
    assert_eq!(
        r.outcome,
        RunOutcome::Failed {
            kind: agentplane::model::ErrorKind::AgentError,
            message: "nope".into()
        },
        "log:\n{}",
        r.log
    );
}
