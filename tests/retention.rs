//! Growth without bound (issue 8 item 8): finished jobs, their logs, their
//! idempotency keys and old ledger entries go after the retention; reads and
//! scripts touch only the fields they need; a full Redis is answered with a
//! clear 503 and nothing half-written.
//!
//! The test drives the control plane itself as the worker (CLAIM/FINALIZE
//! through `ControlPlane`), so no guest component is built here.

mod common;

use crate::common::fixtures::tid;
use agentplane::api::ApiConfig;
use agentplane::control::{
    AttemptOutcome, ControlConfig, ControlPlane, Finish, ITEM_OVERHEAD_BYTES, LedgerCheckpoint,
    SubmitSpec, TenantSpec,
};
use common::fixtures;
use common::redis::RedisServer;
use common::stack::{Opts, Stack, error_code};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const FAKE_DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn spec(input: String, delay_ms: u64, idem: Option<&str>) -> SubmitSpec {
    SubmitSpec {
        component: FAKE_DIGEST.into(),
        delay_ms,
        idempotency: idem.map(|k| (k.to_string(), format!("body-of-{k}"))),
        ..fixtures::submit_spec(&input)
    }
}

fn tenant_spec(id: &str) -> TenantSpec {
    fixtures::tenant_spec(id, 1_000_000_000)
}

fn ok_finish(log: &str) -> Finish {
    Finish {
        outcome: AttemptOutcome::Succeeded {
            output: "done".into(),
        },
        fuel: 3_000_000,
        wall_ms: 7,
        log: log.into(),
        new_state: None,
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

async fn info_field(c: &mut redis::aio::MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has no {field}"))
}

/// Server-side microseconds spent in FCALL (the scripts) since the last CONFIG RESETSTAT.
async fn fcall_usec(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall:"))
        .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("usec=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sums of the tenant's remaining ledger entries by op.
async fn ledger_sums(cp: &ControlPlane, t: &str) -> HashMap<String, i64> {
    let mut sums = HashMap::new();
    for e in cp.ledger(&tid(t)).await.unwrap() {
        // A settle's `released` is a release carried in the same entry.
        *sums.entry("release".into()).or_insert(0) += e.released;
        *sums.entry(e.op).or_insert(0) += e.amount;
    }
    sums
}

/// balance = checkpoint + remaining entries, exactly, for every counter.
async fn assert_ledger_exact(cp: &ControlPlane, t: &str) -> (LedgerCheckpoint, usize) {
    let info = cp.tenant(&tid(t)).await.unwrap().unwrap();
    let ck = cp.ledger_checkpoint(&tid(t)).await.unwrap();
    let s = ledger_sums(cp, t).await;
    let g = |k: &str| s.get(k).copied().unwrap_or(0);
    assert_eq!(info.granted, ck.grant + g("grant"), "granted {ck:?} {s:?}");
    assert_eq!(
        info.settled,
        ck.settle + g("settle"),
        "settled {ck:?} {s:?}"
    );
    assert_eq!(
        info.credits.reserved,
        (ck.reserve + g("reserve")) - (ck.settle + g("settle")) - (ck.release + g("release")),
        "reserved {ck:?} {s:?}"
    );
    assert_eq!(info.credits.balance, info.granted - info.settled);
    (ck, cp.ledger(&tid(t)).await.unwrap().len())
}

/// With retention at two seconds, finished jobs, their logs, index entries,
/// idempotency keys and ledger entries go; the books stay exact; live jobs
/// and the tenant stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_removes_finished_jobs_logs_keys_and_old_ledger_entries() {
    let r = RedisServer::start();
    let c = raw(&r.url).await;
    retention_body(&r.url, 1, c).await;
}

/// The same on a 3-master Redis Cluster with tenants over 4 shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_works_on_a_cluster() {
    let cluster = common::redis::RedisCluster::start(3);
    let client = redis::cluster::ClusterClient::new(
        cluster
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let c = client.get_async_connection().await.unwrap();
    retention_body(&cluster.url, 4, c).await;
}

async fn retention_body<C>(url: &str, shards: u32, mut c: C)
where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    let cfg = ControlConfig {
        retention_ms: 2_000,
        lease_ms: 60_000,
        shards,
        ..ControlConfig::default()
    };
    let cp = ControlPlane::connect(url, cfg).await.unwrap();
    let t = "keeper";
    cp.create_tenant(&tenant_spec(t), "h").await.unwrap();
    let mut done = Vec::new();
    for i in 0..6 {
        let key = format!("k{i}");
        let s = cp
            .submit(&tid(t), &spec(format!("input {i}"), 0, Some(&key)))
            .await
            .unwrap();
        done.push(s.id);
    }
    // Four succeed (with logs), one is cancelled while queued, one stays
    // queued (live: must survive any retention).
    for _ in 0..4 {
        let claim = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
        cp.finalize(&claim.lease, &ok_finish("a log line"))
            .await
            .unwrap();
    }
    cp.cancel(&tid(t), &done[4]).await.unwrap();
    let live = done.pop().unwrap();
    let ks = cp.keys().clone();
    for id in &done {
        assert!(c.exists::<_, bool>(ks.job(t, id)).await.unwrap());
    }
    assert!(c.exists::<_, bool>(ks.job_log(t, &done[0])).await.unwrap());
    let (_, before) = assert_ledger_exact(&cp, t).await;
    assert!(before >= 9, "grant + 4 reserve/settle pairs: {before}");

    // Nothing is due yet: a sweep now removes nothing.
    assert_eq!(cp.retain(100).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let mut removed = 0;
    loop {
        let n = cp.retain(2).await.unwrap();
        assert!(n <= 2, "a sweep is bounded by its batch: {n}");
        removed += n;
        if n == 0 {
            break;
        }
    }
    assert_eq!(removed, 5, "four succeeded and one cancelled job expire");
    for id in &done {
        assert!(!c.exists::<_, bool>(ks.job(t, id)).await.unwrap(), "{id}");
        assert!(!c.exists::<_, bool>(ks.job_log(t, id)).await.unwrap());
        assert!(cp.job(&tid(t), id).await.unwrap().is_none());
    }
    for st in ["succeeded", "cancelled", "failed"] {
        let n: u64 = c.zcard(ks.jobs_in_state(t, st)).await.unwrap();
        assert_eq!(n, 0, "index js:{t}:{st} keeps expired jobs");
    }
    let all: Vec<String> = c.zrange(ks.jobs(t), 0, -1).await.unwrap();
    assert_eq!(all, vec![live.clone()], "jobs:{t} keeps only the live job");
    for i in 0..6 {
        let key = ks.idempotency(
            t,
            &agentplane::control::sha256_hex(format!("k{i}").as_bytes()),
        );
        assert!(
            !c.exists::<_, bool>(&key).await.unwrap(),
            "idempotency key k{i} kept"
        );
    }
    // The live job is untouched and still runs.
    assert!(cp.job(&tid(t), &live).await.unwrap().is_some());
    // Old ledger entries are folded into the checkpoint; the books are exact.
    let (ck, after) = assert_ledger_exact(&cp, t).await;
    assert!(after < before, "ledger not compacted: {before} -> {after}");
    assert!(ck.grant == 1_000_000_000 && ck.settle > 0, "{ck:?}");
    // Work goes on after compaction, and the books stay exact.
    let claim = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
    assert_eq!(claim.lease.job_id, live);
    assert_ledger_exact(&cp, t).await;
    cp.finalize(&claim.lease, &ok_finish("x")).await.unwrap();
    cp.grant_credits(&tid(t), 5).await.unwrap();
    assert_ledger_exact(&cp, t).await;
    assert!(cp.tenant(&tid(t)).await.unwrap().is_some());
}

/// The scheduler runs the sweep: through the API, a finished job answers 404
/// once the retention has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scheduler_expires_finished_jobs() {
    let stack = Stack::start(Opts {
        worker_slots: None,
        retention_ms: Some(1_000),
        ..Opts::default()
    })
    .await;
    let token = stack.tenant("sched").await;
    let cp = ControlPlane::connect(&stack.url, ControlConfig::default())
        .await
        .unwrap();
    cp.put_component(&tid("sched"), FAKE_DIGEST, b"not wasm", Default::default())
        .await
        .unwrap();
    let id = stack
        .submit(&token, json!({"component": FAKE_DIGEST, "input": "x"}))
        .await;
    let claim = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
    cp.finalize(&claim.lease, &ok_finish("log")).await.unwrap();
    let (st, _) = stack.get(&format!("/v1/jobs/{id}"), &token).await;
    assert_eq!(st, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, v) = stack.get(&format!("/v1/jobs/{id}"), &token).await;
        if st == StatusCode::NOT_FOUND {
            assert_eq!(error_code(&v), "not_found");
            break;
        }
        assert!(Instant::now() < deadline, "job still there: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, v) = stack.get("/v1/jobs", &token).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["jobs"].as_array().unwrap().len(), 0, "{v}");
    stack.stop().await;
}

/// `GET /v1/jobs` reads only what it returns: listing 20 jobs with 1 MiB
/// inputs must not pull 20 MiB out of Redis. Pages above 1,000 are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_reads_no_inputs_and_pages_are_capped() {
    let stack = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let token = stack.tenant("lister").await;
    let cp = ControlPlane::connect(&stack.url, ControlConfig::default())
        .await
        .unwrap();
    let big = "x".repeat(1 << 20);
    for _ in 0..20 {
        cp.submit(&tid("lister"), &spec(big.clone(), 0, None))
            .await
            .unwrap();
    }
    let mut c = raw(&stack.url).await;
    let before = info_field(&mut c, "stats", "total_net_output_bytes").await;
    let (st, v) = stack.get("/v1/jobs?limit=1000", &token).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["jobs"].as_array().unwrap().len(), 20);
    let sent = info_field(&mut c, "stats", "total_net_output_bytes").await - before;
    assert!(
        sent < 256 << 10,
        "listing 20 jobs made Redis send {sent} bytes (the inputs)"
    );
    // One job, with its long-poll: the shown fields only.
    let id = v["jobs"][0]["id"].as_str().unwrap().to_string();
    let before = info_field(&mut c, "stats", "total_net_output_bytes").await;
    let (st, v) = stack.get(&format!("/v1/jobs/{id}?wait=1"), &token).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let sent = info_field(&mut c, "stats", "total_net_output_bytes").await - before;
    assert!(
        sent < 256 << 10,
        "GET of one job made Redis send {sent} bytes"
    );
    let (st, v) = stack.get("/v1/jobs?limit=1001", &token).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_code(&v), "invalid_request");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("1000"),
        "{v}"
    );
    stack.stop().await;
}

/// PROMOTE (and the refresh of every script) reads only the job fields it
/// needs: promoting heads with 1 MiB inputs costs Redis about what promoting
/// heads with tiny inputs costs, not a copy of every input into Lua.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripts_do_not_copy_job_inputs() {
    let r = RedisServer::start();
    let cp = ControlPlane::connect(&r.url, ControlConfig::default())
        .await
        .unwrap();
    let mut c = raw(&r.url).await;
    let n = 40;
    let mut usec = Vec::new();
    for (t, size) in [("small", 16usize), ("large", 1 << 20)] {
        cp.create_tenant(&tenant_spec(t), "h").await.unwrap();
        let input = "y".repeat(size);
        for _ in 0..n {
            cp.submit(&tid(t), &spec(input.clone(), 1, None))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(cp.promote(500).await.unwrap(), n);
        // CANCEL reads the job too.
        for id in cp
            .list_jobs(&tid(t), None, 5, None)
            .await
            .unwrap()
            .0
            .iter()
            .map(|j| j.id.clone())
        {
            cp.cancel(&tid(t), &id).await.unwrap();
        }
        usec.push(fcall_usec(&mut c).await);
    }
    eprintln!(
        "promote+cancel of {n} heads: small inputs {} us, 1 MiB inputs {} us",
        usec[0], usec[1]
    );
    assert!(
        usec[1] < usec[0] * 4 + 20_000,
        "1 MiB inputs made the scripts {}x slower ({} us vs {} us): they copy the inputs",
        usec[1] / usec[0].max(1),
        usec[1],
        usec[0]
    );
    // CLAIM still hands the input over, once.
    let claims = cp.claim("w", 2, 0).await.unwrap();
    assert_eq!(claims.len(), 2);
    assert!(
        claims
            .iter()
            .all(|cl| cl.input.len() == 16 || cl.input.len() == 1 << 20)
    );
}

/// A full Redis (maxmemory, noeviction) is answered with 503 `storage_full`
/// and leaves no half-written job: every job Redis holds was answered 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_redis_is_a_clear_503_and_writes_nothing() {
    let stack = Stack::start(Opts {
        worker_slots: None,
        api: ApiConfig {
            max_input_bytes: 1 << 20,
            ..ApiConfig::default()
        },
        ..Opts::default()
    })
    .await;
    let token = stack.tenant("filler").await;
    let cp = ControlPlane::connect(&stack.url, ControlConfig::default())
        .await
        .unwrap();
    cp.put_component(&tid("filler"), FAKE_DIGEST, b"not wasm", Default::default())
        .await
        .unwrap();
    let mut c = raw(&stack.url).await;
    let used = info_field(&mut c, "memory", "used_memory").await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + (6 << 20))
        .query_async(&mut c)
        .await
        .unwrap();
    let input = "z".repeat(900 << 10);
    let mut created = Vec::new();
    let mut full = None;
    for _ in 0..40 {
        let (st, v) = stack
            .post(
                "/v1/jobs",
                &token,
                json!({"component": FAKE_DIGEST, "input": input}),
            )
            .await;
        if st == StatusCode::CREATED {
            created.push(v["id"].as_str().unwrap().to_string());
        } else {
            full = Some((st, v));
            break;
        }
    }
    let (st, v) = full.expect("Redis never filled up");
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(error_code(&v), "storage_full", "{v}");
    assert!(!created.is_empty());
    // Exactly the answered jobs exist, in every index and counter.
    let ks = cp.keys().clone();
    let ids: Vec<String> = c.zrange(ks.jobs("filler"), 0, -1).await.unwrap();
    assert_eq!(ids.len(), created.len());
    let queued: Vec<String> = c
        .zrange(ks.jobs_in_state("filler", "queued"), 0, -1)
        .await
        .unwrap();
    assert_eq!(queued.len(), created.len());
    let info = cp.tenant(&tid("filler")).await.unwrap().unwrap();
    assert_eq!(info.queued as usize, created.len());
    let xlen: usize = c.xlen(ks.queue("filler")).await.unwrap();
    assert_eq!(xlen, created.len());
    // Reads still work, and so does the API's own error path.
    let (st, _) = stack.get("/v1/jobs?limit=10", &token).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = stack.get(&format!("/v1/jobs/{}", created[0]), &token).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // With room again, submissions are accepted again.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    let (st, v) = stack
        .post(
            "/v1/jobs",
            &token,
            json!({"component": FAKE_DIGEST, "input": input}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let info = cp.tenant(&tid("filler")).await.unwrap().unwrap();
    assert_eq!(info.queued as usize, created.len() + 1);
    stack.stop().await;
}

/// Bytes of Redis memory per finished job, before and after retention
/// (a measurement, printed; run with `--ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn redis_bytes_per_finished_job() {
    for input_size in [100usize, 1 << 20] {
        let r = RedisServer::start();
        let cp = ControlPlane::connect(
            &r.url,
            ControlConfig {
                retention_ms: 1_000,
                lease_ms: 60_000,
                ..ControlConfig::default()
            },
        )
        .await
        .unwrap();
        let mut c = raw(&r.url).await;
        cp.create_tenant(&tenant_spec("bench"), "h").await.unwrap();
        let n = if input_size > 1000 { 100 } else { 1000 };
        let base = info_field(&mut c, "memory", "used_memory").await;
        let input = "i".repeat(input_size);
        let log = "l".repeat(200);
        for k in 0..n {
            cp.submit(
                &tid("bench"),
                &spec(input.clone(), 0, Some(&format!("key-{k}"))),
            )
            .await
            .unwrap();
            let claim = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
            cp.finalize(&claim.lease, &ok_finish(&log)).await.unwrap();
        }
        let full = info_field(&mut c, "memory", "used_memory").await;
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        while cp.retain(500).await.unwrap() > 0 {}
        let after = info_field(&mut c, "memory", "used_memory").await;
        let mut it: redis::AsyncIter<String> = c.scan().await.unwrap();
        let mut keys = Vec::new();
        while let Some(k) = it.next_item().await {
            keys.push(k.unwrap());
        }
        drop(it);
        for k in keys {
            let m: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap_or(0);
            println!("  left: {k} {m} bytes");
        }
        println!(
            "input {input_size} B, {n} finished echo-like jobs: {} bytes/job kept before retention, {} bytes/job left after (used_memory {base} -> {full} -> {after})",
            (full - base) / n as u64,
            after.saturating_sub(base) / n as u64,
        );
    }
}

/// Byte quotas: components, contexts and agent states are charged before
/// they are stored; over the quota the answer is 413 `quota_exceeded`
/// naming the quota (a job whose state would not fit fails its attempt with
/// that message, and no state is written). Admin can raise a quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn byte_quotas_refuse_what_does_not_fit() {
    use common::guests::guest_bytes;
    use common::stack::ADMIN;
    let stack = Stack::start(Opts {
        worker_slots: None,
        ..Opts::default()
    })
    .await;
    let echo = guest_bytes("echo");
    let token = stack
        .tenant_with(
            "quota",
            json!({
                "max_component_bytes": echo.len() as u64 + ITEM_OVERHEAD_BYTES + 10,
                "max_context_bytes": 3_000,
                "max_state_bytes": 100_000,
            }),
        )
        .await;
    let upload = |bytes: Vec<u8>| {
        stack
            .http
            .post(format!("{}/v1/components", stack.base))
            .bearer_auth(&token)
            .body(bytes)
            .send()
    };
    // Components: the same digest twice is charged once; another one is refused.
    for _ in 0..2 {
        let r = upload(echo.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = upload(guest_bytes("counter")).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "quota_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_component_bytes"),
        "{v}"
    );
    let info = stack.tenant_info("quota").await;
    assert_eq!(
        info["storage"]["component_bytes"],
        echo.len() as u64 + ITEM_OVERHEAD_BYTES,
        "{info}"
    );

    // Contexts: a replacement is charged by its new size.
    let ctx = |n: usize| json!({"name": "docs", "documents": (0..n).map(|i| json!({"id": format!("d{i}"), "text": "lorem ipsum dolor sit amet"})).collect::<Vec<_>>()});
    let (st, v) = stack.post("/v1/contexts", &token, ctx(3)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let (st, v) = stack.post("/v1/contexts", &token, ctx(200)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(error_code(&v), "quota_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_context_bytes"),
        "{v}"
    );
    let (st, v) = stack.get("/v1/contexts/docs", &token).await;
    assert_eq!(
        (st, v["documents"].as_u64()),
        (StatusCode::OK, Some(3)),
        "{v}"
    );

    // Agent states, all agents together.
    let cp = ControlPlane::connect(&stack.url, ControlConfig::default())
        .await
        .unwrap();
    let run = |agent: &'static str, state_len: usize| {
        let cp = cp.clone();
        async move {
            let mut s = spec("x".into(), 0, None);
            s.agent_id = Some(agent.into());
            let id = cp.submit(&tid("quota"), &s).await.unwrap().id;
            let claim = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
            assert_eq!(claim.lease.job_id, id);
            let mut f = ok_finish("");
            f.new_state = Some(vec![b'q'; state_len]);
            (id, cp.finalize(&claim.lease, &f).await.unwrap())
        }
    };
    let (_, r) = run("a", 60_000).await;
    assert_eq!(r, agentplane::control::Finalized::Succeeded);
    let (id, r) = run("b", 60_000).await;
    assert!(
        matches!(r, agentplane::control::Finalized::Retrying { .. }),
        "{r:?}"
    );
    let job = cp.job(&tid("quota"), &id).await.unwrap().unwrap();
    let err = job.error.unwrap();
    assert_eq!(err.kind.as_str(), "agent_error");
    assert!(
        err.message.contains("quota_exceeded") && err.message.contains("max_state_bytes"),
        "{}",
        err.message
    );
    let mut c = raw(&stack.url).await;
    assert!(
        !c.exists::<_, bool>(cp.keys().agent("quota", "b"))
            .await
            .unwrap(),
        "state written over quota"
    );
    cp.cancel(&tid("quota"), &id).await.unwrap();
    // A smaller state for `a` gives bytes back; then `b` fits.
    let (_, r) = run("a", 10_000).await;
    assert_eq!(r, agentplane::control::Finalized::Succeeded);
    let (_, r) = run("b", 60_000).await;
    assert_eq!(r, agentplane::control::Finalized::Succeeded);
    let info = stack.tenant_info("quota").await;
    assert_eq!(
        info["storage"]["state_bytes"],
        70_000 + 2 * ITEM_OVERHEAD_BYTES,
        "{info}"
    );
    // Many tiny states cannot hide inside the quota: each costs its overhead.
    let mut refused = false;
    for i in 0..200 {
        let agent: &'static str = Box::leak(format!("tiny{i}").into_boxed_str());
        let (id, r) = run(agent, 0).await;
        if r != agentplane::control::Finalized::Succeeded {
            refused = true;
            cp.cancel(&tid("quota"), &id).await.unwrap();
            break;
        }
    }
    assert!(refused, "200 empty states fit in 30 KB of quota");
    // The admin raises the component quota; the upload goes through.
    let (st, v) = stack
        .call(
            reqwest::Method::PATCH,
            "/v1/tenants/quota",
            Some(ADMIN),
            Some(json!({"max_component_bytes": 64u64 << 20})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["storage"]["max_component_bytes"], 64u64 << 20);
    let r = upload(guest_bytes("counter")).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    stack.stop().await;
}

/// A full Redis recovers by itself: RETAIN deletes before it writes, so it
/// runs at maxmemory, and the memory it frees takes submissions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_frees_a_full_redis() {
    let r = RedisServer::start();
    let cp = ControlPlane::connect(
        &r.url,
        ControlConfig {
            retention_ms: 1_000,
            lease_ms: 60_000,
            ..ControlConfig::default()
        },
    )
    .await
    .unwrap();
    let mut c = raw(&r.url).await;
    cp.create_tenant(&tenant_spec("full"), "h").await.unwrap();
    let big = "b".repeat(1 << 20);
    for _ in 0..5 {
        cp.submit(&tid("full"), &spec(big.clone(), 0, None))
            .await
            .unwrap();
        let claim = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
        cp.finalize(&claim.lease, &ok_finish("log")).await.unwrap();
    }
    let used = info_field(&mut c, "memory", "used_memory").await;
    for (k, v) in [
        ("maxmemory-policy", "noeviction".to_string()),
        ("maxmemory", (used - (1 << 20)).to_string()),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let err = cp.submit(&tid("full"), &spec("x".into(), 0, None)).await;
    assert!(
        matches!(err, Err(agentplane::control::CpError::StorageFull)),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        cp.retain(100).await.unwrap(),
        5,
        "RETAIN must run at maxmemory"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    // UNLINK frees in the background: wait until the memory is back.
    loop {
        match cp.submit(&tid("full"), &spec("x".into(), 0, None)).await {
            Ok(_) => break,
            Err(agentplane::control::CpError::StorageFull) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("submission after the sweep: {e:?}"),
        }
    }
    assert_ledger_exact(&cp, "full").await;
}

/// Audit finds nothing wrong.
async fn assert_audit_clean(cp: &ControlPlane) {
    let report = cp
        .audit(agentplane::control::audit::AuditOptions::default())
        .await
        .unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

/// Usage recorded for a tenant: (`<kind>_bytes` of the tenant, sum of its
/// `usage:<t>` entries of that kind).
async fn usage_of(cp: &ControlPlane, url: &str, t: &str, kind: &str) -> (u64, u64) {
    let info = cp.tenant(&tid(t)).await.unwrap().unwrap();
    let total = match kind {
        "component" => info.storage.component_bytes,
        "context" => info.storage.context_bytes,
        _ => info.storage.state_bytes,
    };
    let mut c = raw(url).await;
    let key = format!("{}:usage:{t}", cp.keys().tenant_tag(t));
    let h: HashMap<String, u64> = c.hgetall(key).await.unwrap();
    let sum = h
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{kind}:")))
        .map(|(_, v)| *v)
        .sum();
    (total, sum)
}

/// A tenant that only ever got admin grants (no job of it ever expires)
/// still has its ledger entries folded once they pass the retention, in
/// bounded calls, with the books exact and the audit clean; a tenant with a
/// job still queued likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledgers_of_tenants_without_expiring_jobs_are_compacted() {
    let r = RedisServer::start();
    let cfg = ControlConfig {
        retention_ms: 1_500,
        ..ControlConfig::default()
    };
    let cp = ControlPlane::connect(&r.url, cfg).await.unwrap();
    cp.create_tenant(&tenant_spec("grants"), "h").await.unwrap();
    cp.create_tenant(&tenant_spec("queued"), "h").await.unwrap();
    // More entries than one call folds: the rest must be finished later.
    let n = agentplane::control::LEDGER_FOLD_BATCH as i64 + 200;
    for i in 0..n {
        cp.grant_credits(&tid("grants"), 1 + i % 3).await.unwrap();
    }
    let id = cp
        .submit(&tid("queued"), &spec("x".into(), 0, None))
        .await
        .unwrap()
        .id;
    assert_ledger_exact(&cp, "grants").await;
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    // One newer grant that must stay.
    cp.grant_credits(&tid("grants"), 7).await.unwrap();
    let mut calls = 0;
    loop {
        let got = cp.retain_all(100).await.unwrap();
        assert!(got.ledger_entries <= agentplane::control::LEDGER_FOLD_BATCH);
        calls += 1;
        if got.ledger_entries == 0 || calls > 10 {
            break;
        }
    }
    let (ck, left) = assert_ledger_exact(&cp, "grants").await;
    assert_eq!(
        left, 1,
        "old grant entries kept: {left} left, checkpoint {ck:?}"
    );
    assert!(ck.grant > 1_000_000_000, "{ck:?}");
    let (ck, left) = assert_ledger_exact(&cp, "queued").await;
    assert_eq!((left, ck.grant), (0, 1_000_000_000), "{ck:?}");
    assert!(cp.job(&tid("queued"), &id).await.unwrap().is_some());
    assert_audit_clean(&cp).await;
    // Later writes are folded in their turn.
    cp.grant_credits(&tid("queued"), 3).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    cp.retain_all(100).await.unwrap();
    let (ck, left) = assert_ledger_exact(&cp, "queued").await;
    assert_eq!((left, ck.grant), (0, 1_000_000_003), "{ck:?}");
    assert_audit_clean(&cp).await;
}

/// An upload that fails after its quota was charged gives the bytes back:
/// the tenant's usage is exactly what it stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_upload_is_not_counted() {
    let r = RedisServer::start();
    let cp = ControlPlane::connect(&r.url, ControlConfig::default())
        .await
        .unwrap();
    let t = "uploader";
    cp.create_tenant(&tenant_spec(t), "h").await.unwrap();
    let mut c = raw(&r.url).await;
    // The metadata write fails (the key holds the wrong type) after the
    // quota was charged and the blob written.
    let meta = cp.keys().component(t, FAKE_DIGEST);
    let _: () = c.set(&meta, "in the way").await.unwrap();
    assert!(
        cp.put_component(&tid(t), FAKE_DIGEST, &[7u8; 5_000], Default::default())
            .await
            .is_err()
    );
    assert_eq!(usage_of(&cp, &r.url, t, "component").await, (0, 0));
    let _: () = c.del(&meta).await.unwrap();
    cp.put_component(&tid(t), FAKE_DIGEST, &[7u8; 5_000], Default::default())
        .await
        .unwrap();
    let want = 5_000 + ITEM_OVERHEAD_BYTES;
    assert_eq!(usage_of(&cp, &r.url, t, "component").await, (want, want));
    // A context replaced by a failing upload stays counted at what is stored.
    let ctx = |n: u64| agentplane::control::ContextMeta {
        name: "docs".into(),
        digest: format!("sha256:{n:064}"),
        documents: n,
        dim: 4,
    };
    cp.put_context(&tid(t), &ctx(1), &[1u8; 1_000])
        .await
        .unwrap();
    let ckey = cp.keys().context(t, "docs");
    let _: () = c.del(&ckey).await.unwrap();
    let _: () = c.set(&ckey, "in the way").await.unwrap();
    assert!(
        cp.put_context(&tid(t), &ctx(2), &[2u8; 9_000])
            .await
            .is_err()
    );
    let want = 1_000 + ITEM_OVERHEAD_BYTES;
    assert_eq!(usage_of(&cp, &r.url, t, "context").await, (want, want));
    assert_audit_clean(&cp).await;
}

/// A state FINALIZE did not commit (stale token: `lost`; a newer version
/// committed first: `conflict`) is not counted: the tenant's state usage is
/// exactly the size of the state it stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_finalize_did_not_commit_is_not_counted() {
    let r = RedisServer::start();
    let cp = ControlPlane::connect(&r.url, ControlConfig::default())
        .await
        .unwrap();
    let t = "stateful";
    cp.create_tenant(&tenant_spec(t), "h").await.unwrap();
    let with_state = |n: usize| {
        let mut f = ok_finish("");
        f.new_state = Some(vec![b's'; n]);
        f
    };
    let mut s = spec("x".into(), 0, None);
    s.agent_id = Some("a".into());
    cp.submit(&tid(t), &s).await.unwrap();
    cp.submit(&tid(t), &s).await.unwrap();
    let first = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
    let second = cp.claim("w", 1, 0).await.unwrap().pop().unwrap();
    // Stale token: lost, nothing stored.
    let mut stale = first.lease.clone();
    stale.token += 1_000;
    let e = cp.finalize(&stale, &with_state(40_000)).await;
    assert!(
        matches!(e, Err(agentplane::control::CpError::LeaseLost)),
        "{e:?}"
    );
    assert_eq!(usage_of(&cp, &r.url, t, "state").await, (0, 0));
    // The first commits 10 kB; the second read the same version: conflict.
    let got = cp
        .finalize(&first.lease, &with_state(10_000))
        .await
        .unwrap();
    assert_eq!(got, agentplane::control::Finalized::Succeeded);
    let got = cp
        .finalize(&second.lease, &with_state(90_000))
        .await
        .unwrap();
    assert_eq!(got, agentplane::control::Finalized::StateConflict);
    let want = 10_000 + ITEM_OVERHEAD_BYTES;
    assert_eq!(usage_of(&cp, &r.url, t, "state").await, (want, want));
    assert_audit_clean(&cp).await;
}
