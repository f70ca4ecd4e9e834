//! Moving a shard's slot between the masters of a live Redis Cluster, key by
//! key, while jobs are submitted, claimed, renewed and finalized: no lease
//! is lost, no job is stranded, no caller sees a Redis error, and the books
//! balance. The move is made both ways docs/OPERATIONS.md ("Moving a
//! shard") allows: with the pause (anchor `moving`, migrate, hand the slot
//! over, resume) and as a plain key-by-key migration with no pause.

mod common;

use crate::common::fixtures::tid;
use agentplane::control::{
    AttemptOutcome, ControlConfig, ControlPlane, CpError, Finish, SubmitSpec, TenantSpec,
};
use agentplane::model::JobState;
use common::fixtures;
use common::redis::{RedisCluster, move_slot, node, owner};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn tenant(id: &str) -> TenantSpec {
    fixtures::tenant_spec(id, 1_000_000_000)
}

fn job(i: usize) -> SubmitSpec {
    fixtures::submit_spec(&format!("job {i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_a_shard_under_load_loses_nothing() {
    move_under_load(true).await;
}

/// The same move without the pause, as a plain `redis-cli --cluster
/// reshard` does it. Every script declares the shard's `absent` key, so the
/// cluster runs none while the slot is split (ASK, then TRYAGAIN) and the
/// callers' retries carry them over the move. Before that, scripts ran on
/// half-moved data: "Script attempted to access a non local key" after some
/// of their writes, and jobs stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moving_a_shard_without_the_pause_loses_nothing() {
    move_under_load(false).await;
}

async fn move_under_load(paused: bool) {
    let cluster = RedisCluster::start(3);
    let cfg = ControlConfig {
        shards: 4,
        lease_ms: 5_000,
        retry_base_ms: 100,
        retry_max_ms: 1_000,
        ..ControlConfig::default()
    };
    let cp = ControlPlane::connect(&cluster.url, cfg).await.unwrap();
    // Four tenants on the shard that moves, two on others (bystanders).
    let mut moving = Vec::new();
    let mut others = Vec::new();
    for i in 0.. {
        let t = format!("t{i}");
        if cp.keys().shard_of(&t) == 0 {
            if moving.len() < 4 {
                moving.push(t);
            }
        } else if others.len() < 2 {
            others.push(t);
        }
        if moving.len() == 4 && others.len() == 2 {
            break;
        }
    }
    let tenants: Vec<String> = moving.iter().chain(others.iter()).cloned().collect();
    for t in &tenants {
        cp.create_tenant(&tenant(t), "h").await.unwrap();
    }

    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let lost = Arc::new(AtomicU64::new(0));
    let submitted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();

    // Submitter: 300 jobs over about 3 s, most on the moving shard.
    {
        let (cp, errors, submitted, done) =
            (cp.clone(), errors.clone(), submitted.clone(), done.clone());
        let tenants = tenants.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..300 {
                let t = &tenants[i % tenants.len()];
                match cp.submit(&tid(t), &job(i)).await {
                    Ok(s) => submitted.lock().unwrap().push((t.clone(), s.id)),
                    Err(e) => errors.lock().unwrap().push(format!("submit: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            done.store(true, Ordering::SeqCst);
        }));
    }
    // Three workers: claim, renew twice over ~200 ms, finalize.
    for w in 0..3 {
        let (cp, errors, lost, stop) = (cp.clone(), errors.clone(), lost.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let worker = format!("w{w}");
            let mut runs = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let got = match cp.claim(&worker, 4, 0).await {
                    Ok(g) => g,
                    Err(e) => {
                        errors.lock().unwrap().push(format!("claim: {e}"));
                        Vec::new()
                    }
                };
                if got.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                for c in got {
                    let (cp, errors, lost) = (cp.clone(), errors.clone(), lost.clone());
                    runs.push(tokio::spawn(async move {
                        for _ in 0..2 {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            match cp.renew(&c.lease).await {
                                Ok(()) => {}
                                Err(CpError::LeaseLost) => {
                                    lost.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Err(e) => errors.lock().unwrap().push(format!("renew: {e}")),
                            }
                        }
                        let fin = Finish {
                            outcome: AttemptOutcome::Succeeded {
                                output: c.input.clone(),
                            },
                            fuel: 1_000_000,
                            wall_ms: 200,
                            log: String::new(),
                            new_state: None,
                            http: Default::default(),
                            tokens: Default::default(),
                        };
                        match cp.finalize(&c.lease, &fin).await {
                            Ok(_) => {}
                            Err(CpError::LeaseLost) => {
                                lost.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => errors.lock().unwrap().push(format!("finalize: {e}")),
                        }
                    }));
                }
            }
            for r in runs {
                let _ = r.await;
            }
        }));
    }
    // Scheduler: promote and reap (a lost lease would show as a retry).
    {
        let (cp, errors, stop) = (cp.clone(), errors.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Err(e) = cp.promote(100).await {
                    errors.lock().unwrap().push(format!("promote: {e}"));
                }
                if let Err(e) = cp.reap(100).await {
                    errors.lock().unwrap().push(format!("reap: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    // Move shard 0's slot while all that runs.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let anchor = cp.keys().anchor(0);
    let slot: u16 = {
        let mut c = node(cluster.ports[0]).await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&anchor)
            .query_async(&mut c)
            .await
            .unwrap()
    };
    let from = owner(&cluster.ports, slot).await;
    let to = (from + 1) % 3;
    let t0 = Instant::now();
    let moved = move_slot(
        &cluster.ports,
        slot,
        from,
        to,
        paused.then_some(anchor.as_str()),
        5,
        Duration::from_millis(10),
    )
    .await;
    let window = t0.elapsed();
    eprintln!("moved {moved} keys of slot {slot} in {window:?}");
    assert!(moved >= 20, "the slot held only {moved} keys");
    assert_eq!(owner(&cluster.ports, slot).await, to);

    // Every accepted job ends, once, without a lost lease.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jobs = submitted.lock().unwrap().clone();
    let mut pending: Vec<(String, String)> = jobs.clone();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (t, id) in pending {
            let j = cp.job(&tid(&t), &id).await.unwrap();
            if !j.map(|j| j.state.is_terminal()).unwrap_or(false) {
                still.push((t, id));
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} errors reached callers, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(
        pending.len(),
        0,
        "{} jobs stranded, e.g. {:?}",
        pending.len(),
        pending.first()
    );
    assert_eq!(jobs.len(), 300, "every submission accepted");
    assert_eq!(lost.load(Ordering::SeqCst), 0, "leases lost");
    for (t, id) in &jobs {
        let j = cp.job(&tid(t), id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Succeeded, "{id}");
        assert_eq!(j.attempts, 1, "{id} ran more than once");
    }
    for t in &tenants {
        let info = cp.tenant(&tid(t)).await.unwrap().unwrap();
        assert_eq!(info.credits.balance, info.granted - info.settled, "{t}");
        assert_eq!(info.credits.reserved, 0, "{t}");
        assert_eq!(info.running, 0, "{t}");
        assert_eq!(info.queued, 0, "{t}");
    }
}

/// The pause itself: while a shard's anchor says `moving`, every script on
/// it refuses (a claim waits, retrying, and takes nothing), the audit names
/// the paused shard, and setting it back lets the waiting claim through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_shard_runs_no_script_until_resumed() {
    use agentplane::control::audit::AuditOptions;
    let r = common::redis::RedisServer::start();
    let cp = ControlPlane::connect(&r.url, ControlConfig::default())
        .await
        .unwrap();
    cp.create_tenant(&tenant("acme"), "h").await.unwrap();
    let id = cp.submit(&tid("acme"), &job(0)).await.unwrap().id;
    let mut raw = redis::Client::open(r.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let anchor = cp.keys().anchor(0);
    let v: String = redis::cmd("GET")
        .arg(&anchor)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(v, "ready", "scripts create the anchor");
    let _: () = redis::cmd("SET")
        .arg(&anchor)
        .arg("moving")
        .query_async(&mut raw)
        .await
        .unwrap();

    // A script answers TRYAGAIN before touching anything: RENEW of the
    // queued job, called by hand from the library the calls above loaded.
    let libs: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut raw)
        .await
        .unwrap();
    let libs = format!("{libs:?}");
    let at = libs.find("agentplane_").expect("the library is loaded");
    let lib = &libs[at..at + "agentplane_".len() + 16];
    let e = redis::cmd("FCALL")
        .arg(format!("{lib}_renew"))
        .arg(3)
        .arg(&anchor)
        .arg(cp.keys().job("acme", &id))
        .arg(cp.keys().absent(0))
        .arg(&id)
        .arg(1)
        .arg(1000)
        .query_async::<redis::Value>(&mut raw)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("TRYAGAIN"), "{e}");

    let report = cp.audit(AuditOptions::default()).await.unwrap();
    assert!(
        report.violations.iter().any(|v| v.kind == "shard_paused"),
        "{:?}",
        report.violations
    );

    let claimer = {
        let cp = cp.clone();
        tokio::spawn(async move { cp.claim("w", 1, 0).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!claimer.is_finished(), "a claim on a paused shard waits");
    let j = cp.job(&tid("acme"), &id).await.unwrap().unwrap();
    assert_eq!(
        j.state,
        JobState::Queued,
        "nothing was claimed while paused"
    );

    let _: () = redis::cmd("SET")
        .arg(&anchor)
        .arg("ready")
        .query_async(&mut raw)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), claimer)
        .await
        .expect("the claim goes through once resumed")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].lease.job_id, id);
    let report = cp.audit(AuditOptions::default()).await.unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}
