//! `agentplane audit`: a deployment that ran real jobs audits clean (exit
//! 0); each way of corrupting Redis is named (exit 1).

mod common;

use crate::common::fixtures::tid;
use agentplane::control::{
    AttemptOutcome, ControlConfig, ControlPlane, Finish, SubmitSpec, TenantSpec,
};
use common::fixtures;
use common::redis::RedisCluster;
use common::stack::{Stack, WorkerProc, bin, proc_opts};
use redis::AsyncCommands;
use serde_json::json;
use std::process::Command;

const FAKE_DIGEST: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// Runs the real binary's audit; answers (exit code, stdout).
fn audit(url: &str, shards: u32) -> (i32, String) {
    let out = Command::new(bin())
        .args(["audit", "--redis", url, "--shards", &shards.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run agentplane audit");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{stdout}{}",
            if stderr.is_empty() {
                String::new()
            } else {
                format!("\n[stderr] {stderr}")
            }
        ),
    )
}

fn spec(agent: Option<&str>) -> SubmitSpec {
    SubmitSpec {
        component: FAKE_DIGEST.into(),
        agent_id: agent.map(str::to_string),
        ..fixtures::submit_spec("in")
    }
}

fn tenant_spec(id: &str) -> TenantSpec {
    fixtures::tenant_spec(id, 1_000_000_000)
}

fn finish_with_state(state: Option<Vec<u8>>) -> Finish {
    Finish {
        outcome: AttemptOutcome::Succeeded {
            output: "ok".into(),
        },
        fuel: 1_000_000,
        wall_ms: 3,
        log: "l".into(),
        new_state: state,
        http: Default::default(),
        tokens: Default::default(),
    }
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_deployment_audits_clean_and_each_corruption_is_named() {
    let stack = Stack::start(proc_opts()).await;
    let token = stack.tenant("acme").await;
    let digest = stack.push(&token, "echo").await;
    let counter = stack.push(&token, "counter").await;

    // Real jobs on a real worker process: echo, a failing input, a counter.
    let mut worker = WorkerProc::spawn(&stack.url, 2, 1000, &stack.dir.join("w.log"));
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            stack
                .submit(
                    &token,
                    json!({"component": digest, "input": format!("hello {i}")}),
                )
                .await,
        );
    }
    for _ in 0..3 {
        ids.push(
            stack
                .submit(
                    &token,
                    json!({"component": counter, "input": "", "agent_id": "tally"}),
                )
                .await,
        );
    }
    let cancel_me = stack
        .submit(
            &token,
            json!({"component": digest, "input": "late", "delay_ms": 60_000}),
        )
        .await;
    let (st, _) = stack
        .post(&format!("/v1/jobs/{cancel_me}/cancel"), &token, json!({}))
        .await;
    assert!(st.is_success());
    for id in &ids {
        let job = stack.wait_terminal(&token, id, 60).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    // The worker goes away: from here on the test is the only worker.
    worker.signal(libc::SIGKILL);
    worker.wait_exit(std::time::Duration::from_secs(10));

    // Control-plane work done by the test itself: a running job (long
    // lease), an agent whose state lives in a blob, an idle tenant with a
    // queued job.
    let cp = ControlPlane::connect(
        &stack.url,
        ControlConfig {
            lease_ms: 600_000,
            ..ControlConfig::default()
        },
    )
    .await
    .unwrap();
    for t in ["holder", "idle"] {
        cp.create_tenant(&tenant_spec(t), "h").await.unwrap();
    }
    cp.submit(&tid("holder"), &spec(Some("big"))).await.unwrap();
    let claim = cp.claim("test-worker", 1, 0).await.unwrap().pop().unwrap();
    cp.finalize(
        &claim.lease,
        &finish_with_state(Some(vec![b's'; 100 << 10])),
    )
    .await
    .unwrap();
    let held = cp.submit(&tid("holder"), &spec(None)).await.unwrap().id;
    let running = cp.claim("test-worker", 1, 0).await.unwrap().pop().unwrap();
    assert_eq!(running.lease.job_id, held);
    cp.submit(&tid("idle"), &spec(None)).await.unwrap();

    let (code, out) = audit(&stack.url, 1);
    assert_eq!(code, 0, "a clean deployment must audit clean:\n{out}");
    assert!(
        out.contains("clean") && out.contains("3 tenant(s)"),
        "{out}"
    );

    // Corrupt Redis in distinct ways.
    let ks = cp.keys().clone();
    let mut c = raw(&stack.url).await;
    // 1. money: settled moves without a ledger entry.
    let _: i64 = c.hincr(ks.tenant("acme"), "settled", 7).await.unwrap();
    // 2. a succeeded job also in the failed index.
    let _: i64 = c
        .zadd(ks.jobs_in_state("acme", "failed"), &ids[0], 0)
        .await
        .unwrap();
    // 3. a counter off by one.
    let _: i64 = c.hincr(ks.tenant("acme"), "queued", 1).await.unwrap();
    // 4. the running job loses its lease and its PEL entry.
    let tag = ks.tenant_tag("holder");
    let _: i64 = c.zrem(format!("{tag}:leases"), &held).await.unwrap();
    let sid: String = c.hget(ks.job("holder", &held), "sid").await.unwrap();
    let _: i64 = redis::cmd("XACK")
        .arg(ks.queue("holder"))
        .arg("g")
        .arg(&sid)
        .query_async(&mut c)
        .await
        .unwrap();
    // 5. the running job's reservation disagrees with the tenant's.
    let _: () = c
        .hset(ks.job("holder", &held), "reserved", 1)
        .await
        .unwrap();
    // 6. an eligible tenant is parked.
    let _: i64 = c
        .zrem(format!("{}:act:cpu", ks.tenant_tag("idle")), "idle")
        .await
        .unwrap();
    // 7. an agent's state blob is gone.
    let (version, ptr): (Option<String>, Option<String>) = c
        .hmget(ks.agent("holder", "big"), &["blob", "ptr"])
        .await
        .unwrap();
    let blob = agentplane::control::audit::state_blob_key(
        &cp,
        "holder",
        "big",
        version.as_deref(),
        ptr.as_deref(),
    )
    .expect("a 100 KiB state lives in a blob");
    let gone: i64 = c.del(&blob).await.unwrap();
    assert_eq!(
        gone, 1,
        "the blob the audit looks for is where FINALIZE put it"
    );
    // 8. a finished job the retention sweep would never see.
    let _: i64 = c
        .zrem(format!("{}:done", ks.tenant_tag("acme")), &ids[1])
        .await
        .unwrap();
    // 9. the key that must never exist does (scripts could then run while
    // the shard's slot moves).
    let _: () = c.set(ks.absent(0), 1).await.unwrap();
    let (code, out) = audit(&stack.url, 1);
    eprintln!("{out}");
    assert_eq!(code, 1, "{out}");
    for (kind, subject) in [
        ("ledger_mismatch", "tenant acme: settled"),
        ("job_in_two_states", ids[0].as_str()),
        ("counter_mismatch", "tenant acme: queued"),
        ("lease_missing", held.as_str()),
        ("pel_missing", held.as_str()),
        ("reserved_mismatch", "tenant holder"),
        ("tenant_parked_while_eligible", "tenant idle"),
        ("state_blob_missing", "agent big"),
        ("retention_missing", ids[1].as_str()),
        ("absent_key_exists", "shard 0"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("VIOLATION {kind}:")) && l.contains(subject)),
            "audit did not name {kind} ({subject}):\n{out}"
        );
    }
    stack.stop().await;
}

/// On a Redis Cluster the audit finds every shard's tenants (SCAN on the
/// node that owns each shard's slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_sees_every_shard_of_a_cluster() {
    let cluster = RedisCluster::start(3);
    let shards = 4;
    let cp = ControlPlane::connect(
        &cluster.url,
        ControlConfig {
            shards,
            ..ControlConfig::default()
        },
    )
    .await
    .unwrap();
    // One tenant on each shard, each with a finished job.
    let mut tenants = Vec::new();
    for i in 0.. {
        let t = format!("t{i}");
        if tenants
            .iter()
            .any(|u: &String| cp.keys().shard_of(u) == cp.keys().shard_of(&t))
        {
            continue;
        }
        cp.create_tenant(&tenant_spec(&t), "h").await.unwrap();
        cp.submit(&tid(&t), &spec(None)).await.unwrap();
        tenants.push(t);
        if tenants.len() == shards as usize {
            break;
        }
    }
    for _ in 0..shards {
        let c = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
        cp.finalize(&c.lease, &finish_with_state(None))
            .await
            .unwrap();
    }
    let (code, out) = audit(&cluster.url, shards);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{shards} tenant(s)")), "{out}");
    // Corrupt every tenant's running counter: each shard must be seen.
    let client = redis::cluster::ClusterClient::new(
        cluster
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut c = client.get_async_connection().await.unwrap();
    for t in &tenants {
        let _: i64 = c.hincr(cp.keys().tenant(t), "running", 2).await.unwrap();
    }
    let (code, out) = audit(&cluster.url, shards);
    assert_eq!(code, 1, "{out}");
    for t in &tenants {
        assert!(
            out.lines()
                .any(|l| l.starts_with("VIOLATION counter_mismatch:")
                    && l.contains(&format!("tenant {t}: running"))),
            "tenant {t} not audited:\n{out}"
        );
    }
}
