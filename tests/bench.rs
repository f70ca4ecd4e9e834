//! The `agentplane bench` modes that run against a Redis, at tiny sizes:
//! the real binary, a real `redis-server` per test, a real worker child
//! process running the real guest components. Figures are not asserted
//! (speed is measured, never tested); what is asserted is that each mode
//! runs every job it queued and reports what it claims to report.

mod common;

use common::guests::guest_wasm;
use common::redis::RedisServer;
use common::stack::bin;
use serde_json::Value;
use std::process::Command;

/// Runs `agentplane bench <args>` against `redis`, expects success, and
/// answers the report it wrote (and checks it is what it printed).
fn bench(redis: &RedisServer, mode: &str, args: &[&str]) -> Value {
    let out_path = redis.dir.path().join(format!("{mode}.json"));
    let out = Command::new(bin())
        .args(["bench", mode, "--redis", &redis.url, "--out"])
        .arg(&out_path)
        .args(args)
        .output()
        .expect("run agentplane bench");
    assert!(
        out.status.success(),
        "bench {mode} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Value =
        serde_json::from_slice(&std::fs::read(&out_path).expect("report file")).expect("JSON");
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(written, printed);
    assert_eq!(written["mode"], mode, "{written}");
    written
}

/// Redis work of a run was counted: CPU, and the scripts among the commands.
fn assert_redis_counted(stats: &Value) {
    assert!(
        stats["redis_cpu_us_per_job"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    assert!(
        stats["commandstats"]["fcall"]["calls"].as_u64().unwrap() > 0,
        "{stats}"
    );
}

#[test]
fn drain_runs_every_queued_job_on_a_real_worker() {
    let redis = RedisServer::start();
    let echo = guest_wasm("echo");
    let r = bench(
        &redis,
        "drain",
        &[
            "--jobs",
            "40",
            "--slots",
            "2",
            "--tenants",
            "2",
            "--timeout-s",
            "120",
            "--component",
            echo.to_str().unwrap(),
        ],
    );
    assert_eq!(r["succeeded"], 40, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["jobs_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert_redis_counted(&r["submit_and_drain"]);
    // Every job was submitted before the drain, each tenant's 20 in one
    // SUBMIT call (chunks of up to 100, as BullMQ's addBulk): 2 FCALLs,
    // and one job hash written (HSET) per job inside them.
    let submit = &r["submit"]["commandstats"];
    assert_eq!(submit["fcall"]["calls"], 2, "{r}");
    assert!(submit["hset"]["calls"].as_u64().unwrap() >= 40, "{r}");
}

#[test]
fn claim_measures_every_pair_of_tenants_and_depth() {
    let redis = RedisServer::start();
    let r = bench(
        &redis,
        "claim",
        &["--tenants", "1,5", "--depth", "30", "--samples", "20"],
    );
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{r}");
    for run in runs {
        assert_eq!(run["claimed"], 20, "{run}");
        assert!(run["claim_us"]["p99"].as_f64().unwrap() > 0.0, "{run}");
        assert_redis_counted(&run["redis_per_claim_and_finalize"]);
    }
    assert_eq!(runs[1]["tenants"], 5);
}

#[test]
fn tenants_runs_mixed_agents_over_weighted_tenants() {
    let redis = RedisServer::start();
    let dir = guest_wasm("echo").parent().unwrap().to_path_buf();
    let r = bench(
        &redis,
        "tenants",
        &[
            "--tenants",
            "6",
            "--jobs",
            "48",
            "--slots",
            "4",
            "--timeout-s",
            "120",
            "--agents-dir",
            dir.to_str().unwrap(),
        ],
    );
    for agent in ["echo", "compute", "counter", "sleeper"] {
        assert_eq!(r["agents"][agent]["succeeded"], 12, "{agent}: {r}");
    }
    let jain = r["fairness_at_half"]["jain_index"].as_f64().unwrap();
    assert!(jain > 0.0 && jain <= 1.0 + 1e-9, "{r}");
    assert_redis_counted(&r["submit_and_drain"]);
}

#[test]
fn density_holds_every_agent_asleep_at_once() {
    let redis = RedisServer::start();
    let sleeper = guest_wasm("sleeper");
    let r = bench(
        &redis,
        "density",
        &[
            "--agents",
            "12",
            "--context-mb",
            "2",
            "--sleep-ms",
            "1500",
            "--timeout-s",
            "120",
            "--component",
            sleeper.to_str().unwrap(),
        ],
    );
    assert_eq!(r["succeeded"], 12, "{r}");
    assert_eq!(r["most_running_at_once"], 12, "{r}");
    assert!(r["context_bytes"].as_u64().unwrap() > 2_000_000, "{r}");
    let rss = &r["worker_rss_mib"];
    assert!(
        rss["at_most_running"].as_f64().unwrap() >= rss["idle"].as_f64().unwrap(),
        "{r}"
    );
}
