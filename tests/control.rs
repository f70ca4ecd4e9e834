//! Control-plane conformance suite. Every test runs twice: against a
//! standalone `redis-server` and against a 3-master Redis Cluster (with the
//! tenants spread over 4 shards), both real processes started here.

mod common;

use agentplane::control::{
    AttemptOutcome, Claim, ControlConfig, ControlPlane, CpError, Finalized, Finish, SubmitSpec,
    TenantPatch, TenantSpec,
};
use agentplane::model::{ErrorKind, JobState};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Starts the backend, runs `$body(url, shards)` under it.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let r = crate::common::redis::RedisServer::start();
                    super::$name(&r.url, 1).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let c = crate::common::redis::RedisCluster::start(3);
                    super::$name(&c.url, 4).await;
                }
            )*
        }
    };
}

conformance!(
    exactly_once_with_8_claimers,
    reaped_lease_fences_the_old_token,
    credit_invariant_under_random_operations,
    weights_share_capacity,
    idle_tenant_gets_no_burst,
    tenant_at_max_running_does_not_slow_others,
    light_tenant_is_not_stuck_behind_a_flood,
    quotas_and_gpu_slots_hold_at_every_claim,
    idempotency_keys,
    failing_job_returns_after_backoff,
    racing_schedulers_promote_once,
    cancel_queued_and_running,
    agent_state_commits_only_on_current_version,
    released_job_goes_back_uncharged,
    malformed_arguments_write_nothing,
    wake_up_signals_survive_an_abandoned_wait,
    large_agent_states_never_delete_themselves,
    cancel_wins_on_every_path_out_of_finalize,
    every_run_has_its_own_attempt_number,
    requeues_bypass_admission_and_the_queue_stays_bounded,
    virtual_time_is_corrected_at_the_claim_weight,
    release_and_reap_refund_the_claim_estimate,
    ledger_amounts_stay_exact_integers,
    node_faults_are_bounded_and_never_charged,
    missing_state_blob_fails_its_job_alone,
    claims_and_maintenance_go_on_past_a_failing_shard,
    slot_time_is_billed_exactly,
    stream_out_of_step_is_repaired,
    impossible_head_fails_and_frees_its_queue,
    gpu_tenant_that_fits_is_found_behind_many_that_do_not,
);

fn cfg(shards: u32) -> ControlConfig {
    ControlConfig {
        shards,
        lease_ms: 2_000,
        retry_base_ms: 100,
        retry_max_ms: 1_000,
        ..ControlConfig::default()
    }
}

async fn connect(url: &str, cfg: ControlConfig) -> ControlPlane {
    ControlPlane::connect(url, cfg).await.expect("connect")
}

fn tenant(id: &str, credits: i64) -> TenantSpec {
    common::fixtures::tenant_spec(id, credits)
}

fn job(input: &str) -> SubmitSpec {
    common::fixtures::submit_spec(input)
}

fn ok(output: &str, wall_ms: u64) -> Finish {
    Finish {
        outcome: AttemptOutcome::Succeeded {
            output: output.into(),
        },
        fuel: 1_000_000,
        wall_ms,
        log: String::new(),
        new_state: None,
    }
}

fn failed(kind: ErrorKind) -> Finish {
    Finish {
        outcome: AttemptOutcome::Failed {
            kind,
            message: "boom".into(),
        },
        fuel: 2_000_000,
        wall_ms: 5,
        log: "log line".into(),
        new_state: None,
    }
}

/// Claims one job, panicking if none is there.
async fn claim_one(cp: &ControlPlane) -> Claim {
    let mut c = cp.claim("w1", 1, 0).await.unwrap();
    assert_eq!(c.len(), 1, "expected a job to claim");
    c.pop().unwrap()
}

async fn exactly_once_with_8_claimers(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let tenants: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    for t in &tenants {
        cp.create_tenant(&tenant(t, 1_000_000_000), "h")
            .await
            .unwrap();
    }
    let mut submitted = Vec::new();
    for i in 0..5000 {
        let t = &tenants[i % tenants.len()];
        let s = cp.submit(t, &job(&format!("job {i}"))).await.unwrap();
        submitted.push((t.clone(), s.id));
    }
    let claims: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let finals: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let cp = cp.clone();
        let claims = claims.clone();
        let finals = finals.clone();
        tasks.push(tokio::spawn(async move {
            let worker = format!("worker-{w}");
            let mut idle = 0;
            while idle < 3 {
                let got = cp.claim(&worker, 4, 0).await.unwrap();
                if got.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                idle = 0;
                for c in got {
                    *claims
                        .lock()
                        .unwrap()
                        .entry(c.lease.job_id.clone())
                        .or_default() += 1;
                    let r = cp.finalize(&c.lease, &ok(&c.input, 3)).await.unwrap();
                    assert_eq!(r, Finalized::Succeeded);
                    *finals
                        .lock()
                        .unwrap()
                        .entry(c.lease.job_id.clone())
                        .or_default() += 1;
                    // A second FINALIZE of the same attempt changes nothing.
                    assert!(matches!(
                        cp.finalize(&c.lease, &ok("again", 3)).await,
                        Err(CpError::LeaseLost)
                    ));
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let claims = claims.lock().unwrap().clone();
    let finals = finals.lock().unwrap().clone();
    assert_eq!(claims.len(), 5000, "every job claimed");
    assert!(claims.values().all(|&n| n == 1), "no job claimed twice");
    assert!(finals.values().all(|&n| n == 1), "no job finalized twice");
    for (t, id) in submitted.iter().step_by(97) {
        let j = cp.job(t, id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.attempts, 1);
        assert!(j.output.as_deref().unwrap().starts_with("job "));
    }
    for t in &tenants {
        let info = cp.tenant(t).await.unwrap().unwrap();
        assert_eq!(info.running, 0);
        assert_eq!(info.queued, 0);
        assert_eq!(info.credits.reserved, 0);
        // 250 jobs × (1 Mfuel × 1 credit/Mfuel + 3 ms of a slot at
        // 1 credit/slot-s, rounded up to 1).
        assert_eq!(info.settled, 500);
        // Nothing pending, and no consumer left behind by the 8 workers.
        assert_eq!(cp.queue_group(t).await.unwrap(), (0, 0), "{t}");
    }
}

async fn reaped_lease_fences_the_old_token(url: &str, shards: u32) {
    let cp = connect(
        url,
        ControlConfig {
            lease_ms: 300,
            ..cfg(shards)
        },
    )
    .await;
    cp.create_tenant(&tenant("a", 1_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit("a", &job("x")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.lease.job_id, s.id);
    cp.renew(&c.lease).await.unwrap();
    let before = cp.tenant("a").await.unwrap().unwrap();
    assert!(before.credits.reserved > 0);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(cp.reap(100).await.unwrap(), 1);
    let after = cp.tenant("a").await.unwrap().unwrap();
    assert_eq!(after.credits.reserved, 0, "reservation released");
    assert_eq!(after.settled, 0, "lost attempt not charged");
    assert!(matches!(cp.renew(&c.lease).await, Err(CpError::LeaseLost)));
    assert!(matches!(
        cp.finalize(&c.lease, &ok("late", 10)).await,
        Err(CpError::LeaseLost)
    ));
    let t2 = cp.tenant("a").await.unwrap().unwrap();
    assert_eq!(t2, after, "a stale token changes nothing");
    assert_eq!(cp.queue_group("a").await.unwrap(), (0, 0), "PEL reclaimed");
    let j = cp.job("a", &s.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Delayed);
    assert_eq!(j.usage.credits, 0);
    // It runs again after its backoff, with a newer token.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(cp.promote(100).await.unwrap(), 1);
    let c2 = claim_one(&cp).await;
    assert_eq!(c2.lease.job_id, s.id);
    assert!(c2.lease.token > c.lease.token);
    assert_eq!(c2.attempt, 2);
    assert_eq!(
        cp.finalize(&c2.lease, &ok("done", 10)).await.unwrap(),
        Finalized::Succeeded
    );
    // Attempts lost to dead workers fail the job once max_attempts are spent.
    let mut spec = job("y");
    spec.max_attempts = 1;
    let s = cp.submit("a", &spec).await.unwrap();
    let _c = claim_one(&cp).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(cp.reap(100).await.unwrap(), 1);
    let j = cp.job("a", &s.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.unwrap().kind, ErrorKind::LeaseExpired);
}

/// balance = granted − settled, 0 ≤ reserved ≤ balance, and the ledger
/// accounts for both, checked after every step.
async fn check_credits(cp: &ControlPlane, t: &str) {
    let info = cp.tenant(t).await.unwrap().unwrap();
    assert_eq!(info.credits.balance, info.granted - info.settled);
    assert!(info.credits.reserved >= 0, "{info:?}");
    assert!(info.credits.reserved <= info.credits.balance, "{info:?}");
    let ledger = cp.ledger(t).await.unwrap();
    let sum = |op: &str| -> i64 { ledger.iter().filter(|e| e.op == op).map(|e| e.amount).sum() };
    assert_eq!(sum("grant"), info.granted, "grants in the ledger");
    assert_eq!(sum("settle"), info.settled, "settles in the ledger");
    assert_eq!(
        sum("reserve") - sum("settle") - sum("release"),
        info.credits.reserved,
        "reservations in the ledger"
    );
    for e in ledger.iter().filter(|e| e.op != "grant") {
        assert!(
            !e.job.is_empty() && e.attempt >= 1,
            "{e:?} names job and attempt"
        );
    }
}

async fn credit_invariant_under_random_operations(url: &str, shards: u32) {
    use rand::{Rng, SeedableRng};
    let cp = connect(
        url,
        ControlConfig {
            lease_ms: 50,
            retry_base_ms: 1,
            retry_max_ms: 5,
            ..cfg(shards)
        },
    )
    .await;
    for seed in 0..12u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t = format!("p{seed}");
        let mut spec = tenant(&t, 40);
        spec.max_gpus = 2;
        spec.limits = Some(agentplane::control::LimitsPatch {
            fuel: Some(10_000_000),
            memory_bytes: None,
            timeout_ms: Some(1_000),
        });
        cp.create_tenant(&spec, "h").await.unwrap();
        let mut held: Vec<Claim> = Vec::new();
        let mut jobs: Vec<String> = Vec::new();
        for _step in 0..60 {
            match rng.random_range(0..10) {
                0 | 1 => {
                    let mut j = job("p");
                    if rng.random_bool(0.5) {
                        j.agent_id = Some("bot".into());
                    }
                    j.gpus = rng.random_range(0..2);
                    j.fuel = Some(rng.random_range(1..10) * 1_000_000);
                    if let Ok(s) = cp.submit(&t, &j).await {
                        jobs.push(s.id);
                    }
                }
                2 => held.extend(cp.claim("w", 2, rng.random_range(0..3)).await.unwrap()),
                3 if !held.is_empty() => {
                    let c = held.swap_remove(rng.random_range(0..held.len()));
                    let _ = cp.renew(&c.lease).await;
                    held.push(c);
                }
                4 if !held.is_empty() => {
                    let c = held.swap_remove(rng.random_range(0..held.len()));
                    let mut f = ok("o", rng.random_range(0..3000));
                    f.fuel = rng.random_range(0..20_000_000);
                    if rng.random_bool(0.5) {
                        let big = rng.random_bool(0.3);
                        f.new_state = Some(vec![b's'; if big { 70_000 } else { 3 }]);
                    }
                    if rng.random_bool(0.4) {
                        let kinds = [
                            ErrorKind::Trap,
                            ErrorKind::AgentError,
                            ErrorKind::NodeFault,
                            ErrorKind::InvalidComponent,
                        ];
                        f.outcome = AttemptOutcome::Failed {
                            kind: kinds[rng.random_range(0..kinds.len())],
                            message: "t".into(),
                        };
                    }
                    let _ = cp.finalize(&c.lease, &f).await;
                }
                5 => {
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    cp.reap(10).await.unwrap();
                    cp.promote(10).await.unwrap();
                }
                6 if !jobs.is_empty() => {
                    let id = &jobs[rng.random_range(0..jobs.len())];
                    cp.cancel(&t, id).await.unwrap();
                }
                7 => {
                    let amount = rng.random_range(-20..30);
                    match cp.grant_credits(&t, amount).await {
                        Ok(_) | Err(CpError::InsufficientCredits) => {}
                        Err(e) => panic!("grant: {e}"),
                    }
                }
                8 if !held.is_empty() => {
                    let c = held.swap_remove(rng.random_range(0..held.len()));
                    if rng.random_bool(0.5) {
                        let _ = cp.release(&c.lease).await;
                    } else {
                        let _ = cp.release_fault(&c.lease, "node").await;
                    }
                }
                _ => {}
            }
            check_credits(&cp, &t).await;
            check_runs_are_unique(&cp, &t).await;
            let info = cp.tenant(&t).await.unwrap().unwrap();
            let mut waiting = 0;
            for st in [JobState::Queued, JobState::Delayed] {
                waiting += cp
                    .list_jobs(&t, Some(st), 1000, None)
                    .await
                    .unwrap()
                    .0
                    .len() as u32;
            }
            assert_eq!(info.queued, waiting, "the queued counter drifted");
            let running = cp.list_jobs(&t, Some(JobState::Running), 1000, None).await;
            assert_eq!(info.running, running.unwrap().0.len() as u32);
        }
        // Nothing stuck: with credits to spare, every job ends.
        cp.grant_credits(&t, 1_000_000).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(60)).await;
            cp.reap(100).await.unwrap();
            cp.promote(100).await.unwrap();
            for c in cp.claim("w2", 10, 4).await.unwrap() {
                let _ = cp.finalize(&c.lease, &ok("", 1)).await;
            }
            let (jl, _) = cp.list_jobs(&t, None, 1000, None).await.unwrap();
            if jl.iter().all(|j| j.state.is_terminal()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "stuck: {jl:?}");
        }
        check_credits(&cp, &t).await;
        check_runs_are_unique(&cp, &t).await;
        let info = cp.tenant(&t).await.unwrap().unwrap();
        assert_eq!(
            (info.queued, info.running, info.credits.reserved),
            (0, 0, 0)
        );
    }
}

/// Runs `n` sequential claim → finalize cycles; answers claims per tenant.
async fn serve_sequentially(cp: &ControlPlane, n: usize, wall_ms: u64) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let c = claim_one(cp).await;
        *counts.entry(c.lease.tenant.clone()).or_default() += 1;
        cp.finalize(&c.lease, &ok("", wall_ms)).await.unwrap();
    }
    counts
}

async fn backlog(cp: &ControlPlane, t: &str, weight: u32, jobs: usize) {
    let mut spec = tenant(t, 1_000_000_000);
    spec.weight = weight;
    cp.create_tenant(&spec, "h").await.unwrap();
    for i in 0..jobs {
        cp.submit(t, &job(&i.to_string())).await.unwrap();
    }
}

async fn weights_share_capacity(url: &str, _shards: u32) {
    // One shard: fairness is decided per shard.
    let cp = connect(url, cfg(1)).await;
    for (t, w) in [("w1", 1), ("w2", 2), ("w3", 3)] {
        backlog(&cp, t, w, 400).await;
    }
    let counts = serve_sequentially(&cp, 600, 100).await;
    for (t, want) in [("w1", 1.0 / 6.0), ("w2", 2.0 / 6.0), ("w3", 3.0 / 6.0)] {
        let share = counts[t] as f64 / 600.0;
        assert!(
            (share - want).abs() <= 0.05 * want,
            "{t}: share {share:.3}, want {want:.3} ± 5% ({counts:?})"
        );
    }
}

async fn idle_tenant_gets_no_burst(url: &str, _shards: u32) {
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "a", 1, 400).await;
    backlog(&cp, "b", 1, 400).await;
    cp.create_tenant(&tenant("c", 1_000_000_000), "h")
        .await
        .unwrap();
    serve_sequentially(&cp, 200, 50).await;
    for i in 0..100 {
        cp.submit("c", &job(&i.to_string())).await.unwrap();
    }
    let counts = serve_sequentially(&cp, 30, 50).await;
    let c = counts.get("c").copied().unwrap_or(0);
    // A fair third of 30 is 10; the idle time must not buy more than one extra.
    assert!((9..=11).contains(&c), "c got {c} of 30 ({counts:?})");
}

async fn tenant_at_max_running_does_not_slow_others(url: &str, _shards: u32) {
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "x", 1, 100).await;
    cp.update_tenant(
        "x",
        &TenantPatch {
            max_running: Some(1),
            ..TenantPatch::default()
        },
    )
    .await
    .unwrap();
    backlog(&cp, "y", 1, 100).await;
    backlog(&cp, "z", 1, 100).await;
    let mut held = Vec::new();
    for _ in 0..40 {
        // Every claim finds work while y and z have some: x's quota costs nothing.
        let c = claim_one(&cp).await;
        let info = cp.tenant(&c.lease.tenant).await.unwrap().unwrap();
        assert!(info.running <= info.max_running);
        held.push(c);
    }
    let x = held.iter().filter(|c| c.lease.tenant == "x").count();
    assert_eq!(x, 1, "x holds exactly its max_running");
    // When x's job ends, x is unparked and served again.
    let xc = held.iter().find(|c| c.lease.tenant == "x").unwrap();
    cp.finalize(&xc.lease, &ok("", 1)).await.unwrap();
    assert_eq!(cp.tenant("x").await.unwrap().unwrap().running, 0);
    let mut seen_x = false;
    for _ in 0..3 {
        seen_x |= claim_one(&cp).await.lease.tenant == "x";
    }
    assert!(seen_x, "x was unparked when its job ended");
}

async fn light_tenant_is_not_stuck_behind_a_flood(url: &str, _shards: u32) {
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "heavy", 1, 1000).await;
    serve_sequentially(&cp, 50, 20).await;
    cp.create_tenant(&tenant("light", 1_000_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit("light", &job("me")).await.unwrap();
    let mut waited = 0;
    loop {
        let c = claim_one(&cp).await;
        cp.finalize(&c.lease, &ok("", 20)).await.unwrap();
        if c.lease.job_id == s.id {
            break;
        }
        waited += 1;
    }
    assert!(
        waited <= 1,
        "light waited {waited} jobs behind a flood of 950"
    );
}

async fn quotas_and_gpu_slots_hold_at_every_claim(url: &str, shards: u32) {
    use rand::{Rng, SeedableRng};
    let cp = connect(url, cfg(shards)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for t in ["g1", "g2", "g3"] {
        let mut spec = tenant(t, 1_000_000_000);
        spec.max_running = 3;
        spec.max_gpus = 2;
        spec.max_queued = 60;
        cp.create_tenant(&spec, "h").await.unwrap();
        for _ in 0..60 {
            let mut j = job("g");
            j.gpus = rng.random_range(0..3);
            cp.submit(t, &j).await.unwrap();
        }
        // max_queued holds at submission.
        assert!(matches!(
            cp.submit(t, &job("over")).await,
            Err(CpError::QueueFull)
        ));
    }
    let mut held: Vec<Claim> = Vec::new();
    let mut finished = 0;
    while finished < 180 {
        let free = rng.random_range(0..4u32);
        let got = cp.claim("gw", 3, free).await.unwrap();
        let used: u32 = got.iter().map(|c| c.gpus).sum();
        assert!(used <= free, "worker with {free} free GPUs got {used}");
        held.extend(got);
        for t in ["g1", "g2", "g3"] {
            let info = cp.tenant(t).await.unwrap().unwrap();
            assert!(info.running <= 3, "{t} running {}", info.running);
            assert!(info.gpus_in_use <= 2, "{t} gpus {}", info.gpus_in_use);
            let mine: u32 = held
                .iter()
                .filter(|c| c.lease.tenant == t)
                .map(|c| c.gpus)
                .sum();
            assert_eq!(mine, info.gpus_in_use);
        }
        if !held.is_empty() && (rng.random_bool(0.5) || held.len() > 6) {
            let c = held.swap_remove(rng.random_range(0..held.len()));
            cp.finalize(&c.lease, &ok("", 10)).await.unwrap();
            finished += 1;
        }
    }
    // Credits: a job whose reservation exceeds the balance is refused.
    cp.create_tenant(&tenant("poor", 1), "h").await.unwrap();
    let mut j = job("expensive");
    j.fuel = Some(50_000_000);
    assert!(matches!(
        cp.submit("poor", &j).await,
        Err(CpError::InsufficientCredits)
    ));
}

async fn idempotency_keys(url: &str, shards: u32) {
    let cp = connect(
        url,
        ControlConfig {
            idempotency_ttl_s: 1,
            ..cfg(shards)
        },
    )
    .await;
    cp.create_tenant(&tenant("i", 1_000_000), "h")
        .await
        .unwrap();
    let mut j = job("same");
    j.idempotency = Some(("key-1".into(), "bodyhash-A".into()));
    let first = cp.submit("i", &j).await.unwrap();
    assert!(first.created);
    let again = cp.submit("i", &j).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.id, first.id);
    let mut other = j.clone();
    other.idempotency = Some(("key-1".into(), "bodyhash-B".into()));
    assert!(matches!(
        cp.submit("i", &other).await,
        Err(CpError::IdempotencyConflict)
    ));
    // Keys are per tenant.
    cp.create_tenant(&tenant("i2", 1_000_000), "h")
        .await
        .unwrap();
    assert!(cp.submit("i2", &j).await.unwrap().created);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = cp.submit("i", &j).await.unwrap();
    assert!(later.created);
    assert_ne!(later.id, first.id);
}

async fn failing_job_returns_after_backoff(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("f", 1_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit("f", &job("x")).await.unwrap();
    let c = claim_one(&cp).await;
    let r = cp
        .finalize(&c.lease, &failed(ErrorKind::AgentError))
        .await
        .unwrap();
    let Finalized::Retrying { delay_ms } = r else {
        panic!("expected a retry, got {r:?}")
    };
    assert!((50..=100).contains(&delay_ms), "first backoff {delay_ms}");
    let j = cp.job("f", &s.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Delayed);
    assert_eq!(j.error.as_ref().unwrap().kind, ErrorKind::AgentError);
    assert!(cp.claim("w", 1, 0).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(delay_ms + 20)).await;
    assert_eq!(cp.promote(10).await.unwrap(), 1);
    let c2 = claim_one(&cp).await;
    assert_eq!((c2.lease.job_id.as_str(), c2.attempt), (s.id.as_str(), 2));
    // A trap also retries; the last attempt's failure is final.
    assert!(matches!(
        cp.finalize(&c2.lease, &failed(ErrorKind::Trap))
            .await
            .unwrap(),
        Finalized::Retrying { .. }
    ));
    tokio::time::sleep(Duration::from_millis(250)).await;
    cp.promote(10).await.unwrap();
    let c3 = claim_one(&cp).await;
    assert_eq!(
        cp.finalize(&c3.lease, &failed(ErrorKind::AgentError))
            .await
            .unwrap(),
        Finalized::Failed
    );
    let j = cp.job("f", &s.id).await.unwrap().unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Failed, 3));
    assert_eq!(
        j.usage.credits, 9,
        "three attempts of 2 Mfuel and 5 ms of a slot (ceil: 1 credit) each"
    );
    // Limits are final at once.
    for kind in [
        ErrorKind::FuelExhausted,
        ErrorKind::MemoryLimit,
        ErrorKind::Timeout,
    ] {
        let s = cp.submit("f", &job("y")).await.unwrap();
        let c = claim_one(&cp).await;
        assert_eq!(
            cp.finalize(&c.lease, &failed(kind)).await.unwrap(),
            Finalized::Failed
        );
        let j = cp.job("f", &s.id).await.unwrap().unwrap();
        assert_eq!(j.error.unwrap().kind, kind);
    }
    assert_eq!(cp.job_log("f", &s.id).await.unwrap().unwrap(), "log line");
}

async fn racing_schedulers_promote_once(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut ids = Vec::new();
    for t in ["r1", "r2", "r3", "r4"] {
        cp.create_tenant(&tenant(t, 1_000_000), "h").await.unwrap();
        for _ in 0..50 {
            let mut j = job("d");
            j.delay_ms = 300;
            let s = cp.submit(t, &j).await.unwrap();
            assert_eq!(s.state, JobState::Delayed);
            ids.push(s.id);
        }
    }
    assert_eq!(cp.promote(1000).await.unwrap(), 0, "nothing due yet");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let cp = cp.clone();
        tasks.push(tokio::spawn(async move {
            let mut total = 0;
            loop {
                let n = cp.promote(7).await.unwrap();
                if n == 0 {
                    return total;
                }
                total += n;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 200, "each job promoted exactly once");
    let mut claimed = std::collections::HashSet::new();
    loop {
        let got = cp.claim("w", 50, 0).await.unwrap();
        if got.is_empty() {
            break;
        }
        for c in got {
            assert!(claimed.insert(c.lease.job_id.clone()), "claimed twice");
        }
    }
    assert_eq!(claimed.len(), 200);
}

async fn cancel_queued_and_running(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("c", 1_000_000), "h")
        .await
        .unwrap();
    cp.create_tenant(&tenant("other", 1_000_000), "h")
        .await
        .unwrap();
    let queued = cp.submit("c", &job("q")).await.unwrap();
    assert!(matches!(
        cp.cancel("other", &queued.id).await,
        Err(CpError::NotFound)
    ));
    assert!(cp.job("other", &queued.id).await.unwrap().is_none());
    assert_eq!(cp.cancel("c", &queued.id).await.unwrap(), JobState::Queued);
    let j = cp.job("c", &queued.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.error.unwrap().kind, ErrorKind::Cancelled);
    assert!(cp.claim("w", 5, 0).await.unwrap().is_empty());
    assert_eq!(cp.tenant("c").await.unwrap().unwrap().queued, 0);

    let running = cp.submit("c", &job("r")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(
        cp.cancel("c", &running.id).await.unwrap(),
        JobState::Running
    );
    assert!(matches!(cp.renew(&c.lease).await, Err(CpError::Cancelled)));
    let f = Finish {
        outcome: AttemptOutcome::Cancelled,
        ..ok("", 40)
    };
    assert_eq!(
        cp.finalize(&c.lease, &f).await.unwrap(),
        Finalized::Cancelled
    );
    let j = cp.job("c", &running.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    let info = cp.tenant("c").await.unwrap().unwrap();
    assert_eq!((info.running, info.credits.reserved), (0, 0));
    // 1 Mfuel + 40 ms of a slot (rounded up to 1 credit).
    assert_eq!(info.settled, 2, "the cancelled attempt pays what it used");

    let delayed = cp
        .submit(
            "c",
            &SubmitSpec {
                delay_ms: 60_000,
                ..job("d")
            },
        )
        .await
        .unwrap();
    assert_eq!(
        cp.cancel("c", &delayed.id).await.unwrap(),
        JobState::Delayed
    );
    assert_eq!(
        cp.job("c", &delayed.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    let (list, next) = cp
        .list_jobs("c", Some(JobState::Cancelled), 2, None)
        .await
        .unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].id, delayed.id, "newest first");
    let (rest, _) = cp
        .list_jobs("c", Some(JobState::Cancelled), 2, next.as_deref())
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, queued.id);
}

async fn agent_state_commits_only_on_current_version(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("s", 1_000_000), "h")
        .await
        .unwrap();
    let with_agent = |input: &str| SubmitSpec {
        agent_id: Some("bot".into()),
        ..job(input)
    };
    let a = cp.submit("s", &with_agent("a")).await.unwrap();
    let b = cp.submit("s", &with_agent("b")).await.unwrap();
    let ca = claim_one(&cp).await;
    let cb = claim_one(&cp).await;
    assert_eq!((ca.state.clone(), cb.state.clone()), (None, None));
    let set = |s: &[u8]| Finish {
        new_state: Some(s.to_vec()),
        ..ok("", 5)
    };
    assert_eq!(
        cp.finalize(&ca.lease, &set(b"1")).await.unwrap(),
        Finalized::Succeeded
    );
    // b read version 0, a committed version 1 since: b must run again.
    assert_eq!(
        cp.finalize(&cb.lease, &set(b"1")).await.unwrap(),
        Finalized::StateConflict
    );
    assert_eq!(
        cp.job("s", &b.id).await.unwrap().unwrap().state,
        JobState::Queued
    );
    let cb2 = claim_one(&cp).await;
    assert_eq!(cb2.lease.job_id, b.id);
    assert_eq!(cb2.state.as_deref(), Some(&b"1"[..]));
    assert_eq!(cb2.attempt, 2, "a new run number for the rerun");
    assert_eq!(
        cp.job("s", &b.id).await.unwrap().unwrap().attempts,
        1,
        "a conflict does not use up an attempt"
    );
    // A large state goes to the blob tier and comes back whole.
    let big = vec![7u8; 200_000];
    assert_eq!(
        cp.finalize(&cb2.lease, &set(&big)).await.unwrap(),
        Finalized::Succeeded
    );
    cp.submit("s", &with_agent("c")).await.unwrap();
    let cc = claim_one(&cp).await;
    assert_eq!(cc.state.as_deref(), Some(&big[..]));
    assert_eq!(cc.state_version, 2);
    // A failed job commits nothing.
    let f = Finish {
        new_state: Some(b"nope".to_vec()),
        ..failed(ErrorKind::FuelExhausted)
    };
    cp.finalize(&cc.lease, &f).await.unwrap();
    cp.submit("s", &with_agent("d")).await.unwrap();
    assert_eq!(claim_one(&cp).await.state.as_deref(), Some(&big[..]));
    assert_eq!(
        cp.job("s", &a.id).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
}

async fn released_job_goes_back_uncharged(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("d", 1_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit("d", &job("x")).await.unwrap();
    let c = claim_one(&cp).await;
    cp.release(&c.lease).await.unwrap();
    assert!(matches!(
        cp.release(&c.lease).await,
        Err(CpError::LeaseLost)
    ));
    let j = cp.job("d", &s.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.usage.credits),
        (JobState::Queued, 0, 0)
    );
    let info = cp.tenant("d").await.unwrap().unwrap();
    assert_eq!(
        (info.running, info.credits.reserved, info.settled),
        (0, 0, 0)
    );
    let c2 = claim_one(&cp).await;
    // The second run has its own number, but only one attempt counts.
    assert_eq!((c2.lease.job_id.as_str(), c2.attempt), (s.id.as_str(), 2));
    assert_eq!(cp.job("d", &s.id).await.unwrap().unwrap().attempts, 1);
}

async fn malformed_arguments_write_nothing(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("m", 100), "h").await.unwrap();
    assert!(matches!(
        cp.create_tenant(&tenant("m", 100), "h").await,
        Err(CpError::TenantExists)
    ));
    assert!(matches!(
        cp.create_tenant(&tenant("Bad:Id", 1), "h").await,
        Err(CpError::Invalid(_))
    ));
    let before = cp.tenant("m").await.unwrap().unwrap();
    let mut j = job("x");
    j.max_attempts = 0;
    assert!(matches!(cp.submit("m", &j).await, Err(CpError::Invalid(_))));
    assert!(matches!(
        cp.submit("nobody", &job("x")).await,
        Err(CpError::NotFound)
    ));
    assert!(matches!(
        cp.update_tenant(
            "m",
            &TenantPatch {
                weight: Some(0),
                ..TenantPatch::default()
            }
        )
        .await,
        Err(CpError::Invalid(_))
    ));
    assert!(matches!(
        cp.grant_credits("m", -101).await,
        Err(CpError::InsufficientCredits)
    ));
    assert_eq!(cp.tenant("m").await.unwrap().unwrap(), before);
    assert_eq!(cp.grant_credits("m", -40).await.unwrap(), 60);
    let (jobs, _) = cp.list_jobs("m", None, 10, None).await.unwrap();
    assert!(jobs.is_empty());
}

async fn wake_up_signals_survive_an_abandoned_wait(url: &str, _shards: u32) {
    // One shard: a waiter listens on one shard's list at a time.
    let cp = connect(url, cfg(1)).await;
    cp.create_tenant(&tenant("wk", 1_000_000), "h")
        .await
        .unwrap();
    // Nothing to do: the wait runs to its timeout.
    let t0 = std::time::Instant::now();
    cp.wait_for_work(Duration::from_millis(300)).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(250));
    // A submission wakes a waiter at once.
    let waiter = {
        let cp = cp.clone();
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            cp.wait_for_work(Duration::from_secs(5)).await.unwrap();
            t0.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = cp.submit("wk", &job("a")).await.unwrap();
    assert!(waiter.await.unwrap() < Duration::from_secs(2));
    let claimed = claim_one(&cp).await;
    assert_eq!(claimed.lease.job_id, c.id);
    cp.finalize(&claimed.lease, &ok("", 1)).await.unwrap();
    cp.wait_for_work(Duration::from_millis(10)).await.unwrap(); // drain FINALIZE's signal
    // A waiter that gives up (a select! whose other branch won) must not
    // swallow the next signal.
    tokio::select! {
        _ = cp.wait_for_work(Duration::from_secs(5)) => panic!("no work was signalled"),
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
    cp.submit("wk", &job("b")).await.unwrap();
    let t0 = std::time::Instant::now();
    cp.wait_for_work(Duration::from_secs(5)).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the signal was lost: waited {:?}",
        t0.elapsed()
    );
}

fn with_agent(input: &str) -> SubmitSpec {
    SubmitSpec {
        agent_id: Some("bot".into()),
        ..job(input)
    }
}

fn set_state(s: &[u8]) -> Finish {
    Finish {
        new_state: Some(s.to_vec()),
        ..ok("", 5)
    }
}

/// No two runs of a job share an attempt number in the ledger: at most one
/// reserve per (job, attempt), and every settle/release follows its reserve.
async fn check_runs_are_unique(cp: &ControlPlane, t: &str) {
    let ledger = cp.ledger(t).await.unwrap();
    let mut reserves: HashMap<(String, u32), u32> = HashMap::new();
    let mut settles: HashMap<(String, u32), u32> = HashMap::new();
    for e in &ledger {
        let k = (e.job.clone(), e.attempt);
        match e.op.as_str() {
            "reserve" => *reserves.entry(k).or_default() += 1,
            "settle" => {
                assert!(reserves.contains_key(&k), "{e:?} settles no reserve");
                *settles.entry(k).or_default() += 1;
            }
            "release" => assert!(reserves.contains_key(&k), "{e:?} releases no reserve"),
            _ => {}
        }
    }
    for (k, n) in reserves.iter().chain(settles.iter()) {
        assert_eq!(*n, 1, "{k:?} names {n} runs in the ledger: {ledger:?}");
    }
}

async fn large_agent_states_never_delete_themselves(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    for t in ["sa", "sb"] {
        cp.create_tenant(&tenant(t, 1_000_000), "h").await.unwrap();
    }
    let big = vec![9u8; 100_000];
    // An agent that writes its large state back unchanged keeps it.
    for round in 0..3 {
        cp.submit("sa", &with_agent("x")).await.unwrap();
        let c = claim_one(&cp).await;
        let want = (round > 0).then(|| big.clone());
        assert_eq!(c.state, want, "round {round}");
        assert_eq!(
            cp.finalize(&c.lease, &set_state(&big)).await.unwrap(),
            Finalized::Succeeded
        );
    }
    // Another tenant whose state happens to be identical...
    cp.submit("sb", &with_agent("x")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.state, None);
    cp.finalize(&c.lease, &set_state(&big)).await.unwrap();
    // ...is untouched when the first tenant's agent moves on.
    let big2 = vec![3u8; 90_000];
    cp.submit("sa", &with_agent("y")).await.unwrap();
    let c = claim_one(&cp).await;
    cp.finalize(&c.lease, &set_state(&big2)).await.unwrap();
    cp.submit("sb", &with_agent("z")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.lease.tenant, "sb");
    assert_eq!(c.state.as_deref(), Some(&big[..]), "sb's state survived");
    cp.finalize(&c.lease, &ok("", 1)).await.unwrap();
    cp.submit("sa", &with_agent("w")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.state.as_deref(), Some(&big2[..]));
    // A claim that read the old version keeps its bytes while a newer
    // version commits (the read is atomic with the pointer).
    cp.submit("sa", &with_agent("v")).await.unwrap();
    let old_reader = claim_one(&cp).await;
    assert_eq!(
        cp.finalize(&c.lease, &set_state(&big)).await.unwrap(),
        Finalized::Succeeded
    );
    assert_eq!(old_reader.state.as_deref(), Some(&big2[..]));
    assert_eq!(
        cp.finalize(&old_reader.lease, &set_state(&big2))
            .await
            .unwrap(),
        Finalized::StateConflict
    );
    let again = claim_one(&cp).await;
    assert_eq!(again.state.as_deref(), Some(&big[..]));
    // Back to the small tier: the next claim sees the inline state.
    cp.finalize(&again.lease, &set_state(b"small"))
        .await
        .unwrap();
    cp.submit("sa", &with_agent("u")).await.unwrap();
    assert_eq!(claim_one(&cp).await.state.as_deref(), Some(&b"small"[..]));
}

async fn cancel_wins_on_every_path_out_of_finalize(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("k", 1_000_000), "h")
        .await
        .unwrap();
    // The state-conflict path.
    let a = cp.submit("k", &with_agent("a")).await.unwrap();
    let b = cp.submit("k", &with_agent("b")).await.unwrap();
    let ca = claim_one(&cp).await;
    let cb = claim_one(&cp).await;
    assert_eq!((&ca.lease.job_id, &cb.lease.job_id), (&a.id, &b.id));
    assert_eq!(
        cp.finalize(&ca.lease, &set_state(b"1")).await.unwrap(),
        Finalized::Succeeded
    );
    assert_eq!(cp.cancel("k", &b.id).await.unwrap(), JobState::Running);
    assert_eq!(
        cp.finalize(&cb.lease, &set_state(b"2")).await.unwrap(),
        Finalized::Cancelled,
        "a cancelled job must not be requeued on a state conflict"
    );
    let j = cp.job("k", &b.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.error.unwrap().kind, ErrorKind::Cancelled);
    assert!(
        cp.claim("w", 5, 0).await.unwrap().is_empty(),
        "nothing requeued"
    );
    // The success path: the flag wins and nothing is committed.
    let c = cp.submit("k", &with_agent("c")).await.unwrap();
    let cc = claim_one(&cp).await;
    cp.cancel("k", &c.id).await.unwrap();
    assert_eq!(
        cp.finalize(&cc.lease, &set_state(b"3")).await.unwrap(),
        Finalized::Cancelled
    );
    // The retryable-failure path.
    let d = cp.submit("k", &with_agent("d")).await.unwrap();
    let cd = claim_one(&cp).await;
    assert_eq!(
        cd.state.as_deref(),
        Some(&b"1"[..]),
        "no cancelled job committed"
    );
    cp.cancel("k", &d.id).await.unwrap();
    assert_eq!(
        cp.finalize(&cd.lease, &failed(ErrorKind::AgentError))
            .await
            .unwrap(),
        Finalized::Cancelled
    );
    let info = cp.tenant("k").await.unwrap().unwrap();
    assert_eq!(
        (info.running, info.queued, info.credits.reserved),
        (0, 0, 0)
    );
    check_credits(&cp, "k").await;
    check_runs_are_unique(&cp, "k").await;
}

async fn every_run_has_its_own_attempt_number(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("n", 1_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit("n", &with_agent("x")).await.unwrap();
    // Run 1: handed back by a draining worker.
    let c1 = claim_one(&cp).await;
    cp.release(&c1.lease).await.unwrap();
    // Run 2: another job of the agent commits meanwhile (state conflict).
    let other = cp.submit("n", &with_agent("y")).await.unwrap();
    let c2 = claim_one(&cp).await;
    let co = claim_one(&cp).await;
    assert_eq!((&c2.lease.job_id, &co.lease.job_id), (&s.id, &other.id));
    cp.finalize(&co.lease, &set_state(b"o")).await.unwrap();
    assert_eq!(
        cp.finalize(&c2.lease, &set_state(b"x")).await.unwrap(),
        Finalized::StateConflict
    );
    // Run 3 fails and retries; run 4 succeeds.
    let c3 = claim_one(&cp).await;
    let r = cp
        .finalize(&c3.lease, &failed(ErrorKind::AgentError))
        .await
        .unwrap();
    let Finalized::Retrying { delay_ms } = r else {
        panic!("expected a retry, got {r:?}")
    };
    tokio::time::sleep(Duration::from_millis(delay_ms + 30)).await;
    assert_eq!(cp.promote(10).await.unwrap(), 1);
    let c4 = claim_one(&cp).await;
    assert_eq!(
        cp.finalize(&c4.lease, &set_state(b"x")).await.unwrap(),
        Finalized::Succeeded
    );
    for c in [&c1, &c2, &c3, &c4] {
        assert_eq!(c.lease.job_id, s.id);
    }
    let runs: Vec<u32> = [&c1, &c2, &c3, &c4].iter().map(|c| c.attempt).collect();
    assert_eq!(runs, vec![1, 2, 3, 4], "each run has its own number");
    let j = cp.job("n", &s.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts),
        (JobState::Succeeded, 2),
        "`attempts` counts only what counts toward max_attempts"
    );
    let reserves: Vec<u32> = cp
        .ledger("n")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.op == "reserve" && e.job == s.id)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(reserves, vec![1, 2, 3, 4]);
    check_runs_are_unique(&cp, "n").await;
    check_credits(&cp, "n").await;
}

/// The rule: `max_queued` bounds new submissions only. A job the tenant
/// already got accepted is never refused on its way back to the queue
/// (retry, RELEASE, state conflict, REAP), so `queued` may exceed
/// `max_queued`, but never `max_queued + max_running`.
async fn requeues_bypass_admission_and_the_queue_stays_bounded(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut spec = tenant("q", 1_000_000);
    spec.max_queued = 2;
    spec.max_running = 4;
    cp.create_tenant(&spec, "h").await.unwrap();
    let bound = |i: &agentplane::control::TenantInfo| {
        assert!(
            i.queued + i.running <= i.max_queued + i.max_running,
            "queue past its bound: {i:?}"
        );
    };
    // Four running (one commits its agent state, three take a path back),
    // two queued: the queue is full.
    let mut held = Vec::new();
    for i in 0..4 {
        cp.submit("q", &with_agent(&i.to_string())).await.unwrap();
        held.push(claim_one(&cp).await);
    }
    for _ in 0..2 {
        cp.submit("q", &job("later")).await.unwrap();
    }
    assert!(matches!(
        cp.submit("q", &job("over")).await,
        Err(CpError::QueueFull)
    ));
    // Each accepted job comes back however full the queue is.
    let c3 = held.pop().unwrap();
    let c2 = held.pop().unwrap();
    let c1 = held.pop().unwrap();
    let c0 = held.pop().unwrap();
    assert_eq!(
        cp.finalize(&c0.lease, &set_state(b"s")).await.unwrap(),
        Finalized::Succeeded
    );
    assert!(matches!(
        cp.finalize(&c1.lease, &failed(ErrorKind::Trap))
            .await
            .unwrap(),
        Finalized::Retrying { .. }
    ));
    cp.release(&c2.lease).await.unwrap();
    assert_eq!(
        cp.finalize(&c3.lease, &set_state(b"t")).await.unwrap(),
        Finalized::StateConflict
    );
    let info = cp.tenant("q").await.unwrap().unwrap();
    assert_eq!((info.queued, info.running), (5, 0), "{info:?}");
    bound(&info);
    // New submissions are still refused until the queue drains below max_queued.
    assert!(matches!(
        cp.submit("q", &job("over")).await,
        Err(CpError::QueueFull)
    ));
    // The counter is exact: it is the number of queued and delayed jobs.
    let mut n = 0;
    for st in [JobState::Queued, JobState::Delayed] {
        n += cp
            .list_jobs("q", Some(st), 100, None)
            .await
            .unwrap()
            .0
            .len() as u32;
    }
    assert_eq!(n, info.queued);
    // Drain: everything ends, every counter back to zero.
    let mut done = 0;
    for _ in 0..200 {
        cp.promote(100).await.unwrap();
        let got = cp.claim("w", 3, 0).await.unwrap();
        bound(&cp.tenant("q").await.unwrap().unwrap());
        for c in got {
            cp.finalize(&c.lease, &ok("", 1)).await.unwrap();
            done += 1;
        }
        if done == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(done, 5);
    let info = cp.tenant("q").await.unwrap().unwrap();
    assert_eq!(
        (info.queued, info.running, info.credits.reserved),
        (0, 0, 0)
    );
    assert!(cp.submit("q", &job("fits")).await.is_ok());
}

async fn virtual_time_is_corrected_at_the_claim_weight(url: &str, _shards: u32) {
    // One shard: fairness is decided per shard.
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "hw", 1000, 21).await;
    // Claimed at weight 1000 (estimate 1 s / 1000)...
    let c = claim_one(&cp).await;
    assert_eq!(c.lease.tenant, "hw");
    // ...finalized after the weight fell to 1: the correction must use the
    // weight the estimate was charged at, or hw banks ~1 s of priority.
    cp.update_tenant(
        "hw",
        &TenantPatch {
            weight: Some(1),
            ..TenantPatch::default()
        },
    )
    .await
    .unwrap();
    backlog(&cp, "lw", 1, 20).await;
    cp.finalize(&c.lease, &ok("", 1)).await.unwrap();
    let counts = serve_sequentially(&cp, 20, 100).await;
    let hw = counts.get("hw").copied().unwrap_or(0);
    assert!(
        (9..=11).contains(&hw),
        "equal weights now, but hw got {hw} of 20 ({counts:?})"
    );
}

async fn release_and_reap_refund_the_claim_estimate(url: &str, _shards: u32) {
    let cp = connect(
        url,
        ControlConfig {
            lease_ms: 150,
            retry_base_ms: 1,
            retry_max_ms: 2,
            ..cfg(1)
        },
    )
    .await;
    let mut spec = tenant("ra", 1_000_000_000);
    spec.max_running = 1;
    cp.create_tenant(&spec, "h").await.unwrap();
    for i in 0..20 {
        let mut j = job(&i.to_string());
        j.max_attempts = 10;
        cp.submit("ra", &j).await.unwrap();
    }
    // ra's head is handed back three times and lost to a dead worker twice:
    // none of it is ra's slot-time, so none of it may cost ra its share.
    for _ in 0..3 {
        let c = claim_one(&cp).await;
        cp.release(&c.lease).await.unwrap();
    }
    for _ in 0..2 {
        let c = claim_one(&cp).await;
        assert_eq!(c.lease.tenant, "ra");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(cp.reap(10).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        cp.promote(10).await.unwrap();
    }
    backlog(&cp, "rb", 1, 20).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..20 {
        cp.promote(10).await.unwrap();
        let c = claim_one(&cp).await;
        *counts.entry(c.lease.tenant.clone()).or_default() += 1;
        cp.finalize(&c.lease, &ok("", 100)).await.unwrap();
    }
    let ra = counts.get("ra").copied().unwrap_or(0);
    assert!(
        (9..=11).contains(&ra),
        "ra paid for runs it never had: {ra} of 20 ({counts:?})"
    );
}

async fn ledger_amounts_stay_exact_integers(url: &str, shards: u32) {
    let cp = connect(
        url,
        ControlConfig {
            // 1,000 credits per unit of fuel: amounts beyond 10^14 quickly.
            prices: agentplane::control::Prices {
                credits_per_mfuel: 1_000_000_000,
                // Fuel alone, so the amounts are the round figures below.
                credits_per_slot_second: 0,
                ..agentplane::control::Prices::default()
            },
            ..cfg(shards)
        },
    )
    .await;
    let two52: i64 = 1 << 52;
    let mut spec = tenant("big", two52);
    spec.limits = Some(agentplane::control::LimitsPatch {
        fuel: Some(1_000_000_000_000),
        memory_bytes: None,
        timeout_ms: None,
    });
    cp.create_tenant(&spec, "h").await.unwrap();
    let mut j = job("x");
    j.fuel = Some(1_000_000_000_000);
    cp.submit("big", &j).await.unwrap();
    let c = claim_one(&cp).await;
    let mut f = ok("", 1);
    f.fuel = 300_000_000_000;
    cp.finalize(&c.lease, &f).await.unwrap();
    let ledger = cp.ledger("big").await.unwrap();
    let amounts: Vec<(&str, i64)> = ledger.iter().map(|e| (e.op.as_str(), e.amount)).collect();
    assert_eq!(
        amounts,
        vec![
            ("grant", two52),
            ("reserve", 1_000_000_000_000_000),
            ("settle", 300_000_000_000_000),
            ("release", 700_000_000_000_000),
        ]
    );
    let info = cp.tenant("big").await.unwrap().unwrap();
    assert_eq!(info.settled, 300_000_000_000_000);
    assert_eq!(info.credits.balance, two52 - 300_000_000_000_000);
    check_credits(&cp, "big").await;
    // A grant that would take the books past 2^53 - 1 is refused, unwritten.
    let max = (1i64 << 53) - 1;
    assert!(matches!(
        cp.grant_credits("big", max).await,
        Err(CpError::Invalid(_))
    ));
    assert_eq!(cp.tenant("big").await.unwrap().unwrap(), info);
    assert_eq!(cp.ledger("big").await.unwrap().len(), 4);
    let top = max - info.granted;
    assert_eq!(
        cp.grant_credits("big", top).await.unwrap(),
        max - info.settled
    );
    check_credits(&cp, "big").await;
}

async fn node_faults_are_bounded_and_never_charged(url: &str, shards: u32) {
    let cp = connect(
        url,
        ControlConfig {
            max_node_faults: 3,
            retry_base_ms: 1,
            retry_max_ms: 5,
            ..cfg(shards)
        },
    )
    .await;
    cp.create_tenant(&tenant("nf", 1_000_000), "h")
        .await
        .unwrap();
    let claim_after_backoff = || async {
        for _ in 0..100 {
            cp.promote(100).await.unwrap();
            if let Some(c) = cp.claim("w", 1, 0).await.unwrap().pop() {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the job never came back");
    };
    // A job no node can start (the worker hands it back every time) ends
    // after 3 node faults, even with max_attempts 1, and costs nothing.
    let mut spec = job("x");
    spec.max_attempts = 1;
    let s = cp.submit("nf", &spec).await.unwrap();
    for i in 1..=3u32 {
        let c = claim_after_backoff().await;
        assert_eq!((c.lease.job_id.as_str(), c.attempt), (s.id.as_str(), i));
        let r = cp
            .release_fault(&c.lease, "the pool allocator is exhausted")
            .await
            .unwrap();
        if i < 3 {
            assert!(matches!(r, Finalized::Retrying { .. }), "{r:?}");
            let j = cp.job("nf", &s.id).await.unwrap().unwrap();
            assert_eq!((j.state, j.attempts), (JobState::Delayed, 0));
        } else {
            assert_eq!(r, Finalized::Failed);
        }
    }
    let j = cp.job("nf", &s.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.usage.credits),
        (JobState::Failed, 0, 0)
    );
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::NodeFault);
    assert!(e.message.contains("pool allocator"), "{}", e.message);
    let info = cp.tenant("nf").await.unwrap().unwrap();
    assert_eq!(
        (
            info.settled,
            info.credits.reserved,
            info.queued,
            info.running
        ),
        (0, 0, 0, 0)
    );
    // A worker that reports a node fault through FINALIZE: same rule, even
    // though the run burnt fuel on the node.
    let s = cp.submit("nf", &job("y")).await.unwrap();
    let c = claim_after_backoff().await;
    let r = cp
        .finalize(&c.lease, &failed(ErrorKind::NodeFault))
        .await
        .unwrap();
    assert!(matches!(r, Finalized::Retrying { .. }), "{r:?}");
    let j = cp.job("nf", &s.id).await.unwrap().unwrap();
    assert_eq!((j.attempts, j.usage.credits), (0, 0));
    assert_eq!(cp.tenant("nf").await.unwrap().unwrap().settled, 0);
    // ...and a cancel still wins over it.
    let c = claim_after_backoff().await;
    cp.cancel("nf", &s.id).await.unwrap();
    assert_eq!(
        cp.release_fault(&c.lease, "again").await.unwrap(),
        Finalized::Cancelled
    );
    // A draining worker's hand-back is no fault and never fails the job.
    let s = cp.submit("nf", &spec).await.unwrap();
    for _ in 0..5 {
        let c = claim_after_backoff().await;
        cp.release(&c.lease).await.unwrap();
    }
    let c = claim_after_backoff().await;
    assert_eq!((c.lease.job_id.as_str(), c.attempt), (s.id.as_str(), 6));
    cp.finalize(&c.lease, &ok("done", 1)).await.unwrap();
    // A component that can never instantiate is final at once, and charged
    // like any failure (it is the tenant's component).
    let s = cp.submit("nf", &job("z")).await.unwrap();
    let c = claim_after_backoff().await;
    assert_eq!(
        cp.finalize(&c.lease, &failed(ErrorKind::InvalidComponent))
            .await
            .unwrap(),
        Finalized::Failed
    );
    let j = cp.job("nf", &s.id).await.unwrap().unwrap();
    assert_eq!(j.error.unwrap().kind, ErrorKind::InvalidComponent);
    assert_eq!(j.attempts, 1);
    check_credits(&cp, "nf").await;
    check_runs_are_unique(&cp, "nf").await;
}

/// Service level (API + scheduler + worker over a real redis-server): a job
/// no node can prepare (the bytes of a context it mounts are gone from
/// Redis, no fault of the tenant's) was handed back uncounted and uncharged
/// forever, even with `max_attempts: 1`. Now each hand-back is a node fault:
/// uncharged, not counted, and after the bound the job fails `node_fault`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_bounds_a_job_no_node_can_start() {
    use common::stack::{Opts, Stack, state};
    use serde_json::json;
    let stack = Stack::start(Opts::default()).await;
    let tok = stack.tenant("nfs").await;
    let comp = stack.push(&tok, "echo").await;
    let (st, ctx) = stack
        .post(
            "/v1/contexts",
            &tok,
            json!({"name": "kb", "documents": [{"id": "d1", "text": "hello"}]}),
        )
        .await;
    assert_eq!(st, reqwest::StatusCode::CREATED, "{ctx}");
    let key = agentplane::control::keys::KeySpace::new("ap", 1)
        .blob("ctx", ctx["digest"].as_str().unwrap());
    let client = ::redis::Client::open(stack.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let gone: u32 = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone, 1, "{key}");
    let id = stack
        .submit(
            &tok,
            json!({"component": comp, "input": "hi", "contexts": ["kb"], "max_attempts": 1}),
        )
        .await;
    let job = stack.wait_terminal(&tok, &id, 30).await;
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["error"]["kind"], "node_fault", "{job}");
    // The stage that failed, not the node's internals.
    let msg = job["error"]["message"].as_str().unwrap();
    assert!(msg.contains("loading context `kb`"), "{msg}");
    assert!(!msg.contains("sha256:"), "{msg}");
    assert_eq!(
        (job["attempts"].as_u64(), job["usage"]["credits"].as_i64()),
        (Some(0), Some(0))
    );
    let t = stack.assert_books_balance("nfs").await;
    assert_eq!(t["settled"], 0, "{t}");
    // Exactly max_node_faults (5) runs, each its own, each released whole.
    let cp = connect(&stack.url, ControlConfig::default()).await;
    let ledger = cp.ledger("nfs").await.unwrap();
    let runs: Vec<u32> = ledger
        .iter()
        .filter(|e| e.op == "reserve")
        .map(|e| e.attempt)
        .collect();
    assert_eq!(runs, vec![1, 2, 3, 4, 5], "{ledger:?}");
    check_credits(&cp, "nfs").await;
    // A neighbour's job on the same worker is unharmed.
    let tok2 = stack.tenant("victim").await;
    let comp2 = stack.push(&tok2, "echo").await;
    let id2 = stack
        .submit(&tok2, json!({"component": comp2, "input": "ok"}))
        .await;
    let job2 = stack.wait_terminal(&tok2, &id2, 30).await;
    assert_eq!(state(&job2), "succeeded", "{job2}");
    stack.stop().await;
}

/// A plain connection for tests that break the data on purpose.
enum Raw {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

async fn raw(url: &str) -> Raw {
    match url.strip_prefix("redis+cluster://") {
        Some(rest) => {
            let nodes: Vec<String> = rest.split(',').map(|h| format!("redis://{h}")).collect();
            let client = redis::cluster::ClusterClient::new(nodes).unwrap();
            Raw::Cluster(client.get_async_connection().await.unwrap())
        }
        None => Raw::Single(
            redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        ),
    }
}

impl Raw {
    async fn q<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Raw::Single(c) => cmd.query_async(c).await,
            Raw::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// A job whose agent state blob is gone fails alone: the healthy jobs of
/// its CLAIM batch run, none is left leased to no one.
async fn missing_state_blob_fails_its_job_alone(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut r = raw(url).await;
    cp.create_tenant(&tenant("s", 1_000_000), "h")
        .await
        .unwrap();
    let with_agent = |input: &str| SubmitSpec {
        agent_id: Some("bot".into()),
        max_attempts: 1,
        ..job(input)
    };
    cp.submit("s", &with_agent("first")).await.unwrap();
    let c = claim_one(&cp).await;
    let big = vec![7u8; 200_000];
    let commit = Finish {
        new_state: Some(big),
        ..ok("", 5)
    };
    assert_eq!(
        cp.finalize(&c.lease, &commit).await.unwrap(),
        Finalized::Succeeded
    );
    let version: String = r
        .q(&cmd(&["HGET", &cp.keys().agent("s", "bot"), "blob"]))
        .await
        .unwrap();
    assert!(!version.is_empty(), "a 200 KB state lives in the blob tier");
    let blob = cp
        .keys()
        .agent_state_blob("s", "bot", version.parse().unwrap());
    let n: u32 = r.q(&cmd(&["DEL", &blob])).await.unwrap();
    assert_eq!(n, 1);

    let h1 = cp.submit("s", &job("h1")).await.unwrap();
    let bad = cp.submit("s", &with_agent("bad")).await.unwrap();
    let h2 = cp.submit("s", &job("h2")).await.unwrap();
    let got = cp
        .claim("w1", 3, 0)
        .await
        .expect("one bad job must not fail the batch");
    let ids: Vec<&str> = got.iter().map(|c| c.lease.job_id.as_str()).collect();
    assert_eq!(ids, [h1.id.as_str(), h2.id.as_str()]);
    let j = cp.job("s", &bad.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::AgentError);
    assert!(e.message.contains("missing"), "{}", e.message);
    assert_eq!(j.usage.credits, 0, "an attempt that never ran is free");
    let info = cp.tenant("s").await.unwrap().unwrap();
    assert_eq!(info.running, 2, "only the jobs handed out hold a lease");
    for c in &got {
        cp.finalize(&c.lease, &ok("", 5)).await.unwrap();
    }
    assert_eq!(
        cp.queue_group("s").await.unwrap().1,
        0,
        "no stray PEL entry"
    );
    check_credits(&cp, "s").await;
}

/// Two tenants on different shards, the first on the lower shard.
fn tenants_on_two_shards(cp: &ControlPlane) -> (String, String) {
    let k = cp.keys();
    let a = (0..)
        .map(|i| format!("a{i}"))
        .find(|t| k.shard_of(t) == 0)
        .unwrap();
    let b = (0..)
        .map(|i| format!("b{i}"))
        .find(|t| k.shard_of(t) == 1)
        .unwrap();
    (a, b)
}

/// A shard whose scripts fail (here: a key of the wrong type) stops neither
/// CLAIM nor PROMOTE nor REAP on the other shards.
async fn claims_and_maintenance_go_on_past_a_failing_shard(url: &str, shards: u32) {
    let cp = connect(
        url,
        ControlConfig {
            lease_ms: 200,
            ..cfg(shards.max(2))
        },
    )
    .await;
    let mut r = raw(url).await;
    let (a, b) = tenants_on_two_shards(&cp);
    for t in [&a, &b] {
        cp.create_tenant(&tenant(t, 1_000_000), "h").await.unwrap();
    }
    cp.submit(&a, &job("stuck")).await.unwrap();
    let mut mine = Vec::new();
    for i in 0..8 {
        mine.push(cp.submit(&b, &job(&format!("b{i}"))).await.unwrap().id);
    }
    let tag0 = cp.keys().tag(0);
    for suffix in ["act:cpu", "delayed", "leases"] {
        let key = format!("{tag0}:{suffix}");
        let _: () = r.q(&cmd(&["DEL", &key])).await.unwrap();
        let _: () = r.q(&cmd(&["SET", &key, "junk"])).await.unwrap();
    }
    let mut claimed = Vec::new();
    for _ in 0..8 {
        let got = cp
            .claim("w1", 1, 0)
            .await
            .expect("a failing shard must not stop claims on the others");
        assert_eq!(got.len(), 1);
        claimed.extend(got);
    }
    let mut ids: Vec<String> = claimed.iter().map(|c| c.lease.job_id.clone()).collect();
    ids.sort();
    mine.sort();
    assert_eq!(ids, mine);
    // Nothing left anywhere but the broken shard: now the error shows.
    assert!(cp.claim("w1", 1, 0).await.is_err());

    // REAP: the leases of b's jobs expire (the worker "died").
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut reaped = 0;
    while reaped < 8 {
        assert!(std::time::Instant::now() < deadline, "reaped {reaped} of 8");
        match cp.reap(100).await {
            Err(CpError::Shards { done, failed }) => {
                assert_eq!(failed.len(), 1, "{failed:?}");
                assert!(failed[0].starts_with("shard 0"), "{failed:?}");
                reaped += done;
            }
            other => panic!("expected the broken shard's error, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &mine {
        let j = cp.job(&b, id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Delayed, "{j:?}");
    }
    // PROMOTE: their backoff runs out; they come back on the good shard.
    let mut promoted = 0;
    while promoted < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "promoted {promoted} of 8"
        );
        match cp.promote(100).await {
            Err(CpError::Shards { done, .. }) => promoted += done,
            other => panic!("expected the broken shard's error, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cp.tenant(&b).await.unwrap().unwrap().queued, 8);
}

/// Capacity is slot-time: every attempt pays for its wall time on a slot
/// (GPUs weighted as in fair share, plus their own price) besides fuel,
/// capped at the reservation, which SUBMIT checks and CLAIM takes.
async fn slot_time_is_billed_exactly(url: &str, shards: u32) {
    use agentplane::control::Prices;
    let cp = connect(
        url,
        ControlConfig {
            prices: Prices {
                credits_per_mfuel: 1,
                credits_per_gpu_second: 100,
                gpu_slot_weight: 10,
                credits_per_slot_second: 7,
            },
            ..cfg(shards)
        },
    )
    .await;
    // gpus 1, timeout 10 s, fuel 5 M:
    //   ceil(5e6 * 1 / 1e6) + ceil(10_000 * (7 * (1 + 1 * 10) + 1 * 100) / 1000)
    // = 5 + 1770 = 1775
    let reservation = 1775;
    let mut spec = tenant("p", reservation - 1);
    spec.max_gpus = 2;
    cp.create_tenant(&spec, "h").await.unwrap();
    let gpu_job = SubmitSpec {
        gpus: 1,
        timeout_ms: Some(10_000),
        fuel: Some(5_000_000),
        ..job("g")
    };
    assert!(
        matches!(
            cp.submit("p", &gpu_job).await,
            Err(CpError::InsufficientCredits)
        ),
        "SUBMIT's 402 uses the slot-time reservation"
    );
    cp.grant_credits("p", 1).await.unwrap();
    let g = cp.submit("p", &gpu_job).await.unwrap();
    let c = cp.claim("w", 1, 1).await.unwrap().pop().expect("claimed");
    assert_eq!(c.lease.job_id, g.id);
    assert_eq!(
        cp.tenant("p").await.unwrap().unwrap().credits.reserved,
        reservation
    );
    // 2.5 Mfuel, 1234 ms: 3 + ceil(1234 * 177 / 1000 = 218.418) = 222.
    let f = Finish {
        fuel: 2_500_000,
        ..ok("", 1234)
    };
    cp.finalize(&c.lease, &f).await.unwrap();
    let j = cp.job("p", &g.id).await.unwrap().unwrap();
    assert_eq!((j.usage.credits, j.usage.wall_ms), (222, 1234));
    let info = cp.tenant("p").await.unwrap().unwrap();
    assert_eq!((info.settled, info.credits.reserved), (222, 0));

    // No fuel at all (a guest asleep in a host call): the slot still costs.
    cp.grant_credits("p", 10_000).await.unwrap();
    let s = cp.submit("p", &job("sleeper")).await.unwrap();
    let c = claim_one(&cp).await;
    let f = Finish {
        fuel: 0,
        ..ok("", 999)
    };
    cp.finalize(&c.lease, &f).await.unwrap();
    // ceil(999 * 7 / 1000 = 6.993) = 7.
    assert_eq!(cp.job("p", &s.id).await.unwrap().unwrap().usage.credits, 7);

    // Capped at the reservation: timeout 1 s, 1 Mfuel -> 1 + 7 = 8.
    let capped = SubmitSpec {
        timeout_ms: Some(1_000),
        fuel: Some(1_000_000),
        ..job("capped")
    };
    let s = cp.submit("p", &capped).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(cp.tenant("p").await.unwrap().unwrap().credits.reserved, 8);
    cp.finalize(&c.lease, &ok("", 5_000)).await.unwrap();
    assert_eq!(cp.job("p", &s.id).await.unwrap().unwrap().usage.credits, 8);
    let info = cp.tenant("p").await.unwrap().unwrap();
    assert_eq!(info.settled, 222 + 7 + 8);
    check_credits(&cp, "p").await;
}

/// The tenant's consumer group and its head part ways (a delivery nobody
/// recorded, or a group set back): CLAIM repairs, hands out the right
/// job, and leaves no stray PEL entry.
async fn stream_out_of_step_is_repaired(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut r = raw(url).await;
    cp.create_tenant(&tenant("o", 1_000_000), "h")
        .await
        .unwrap();
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(cp.submit("o", &job(&format!("o{i}"))).await.unwrap().id);
        }
        v
    };
    let q = cp.keys().queue("o");
    // A delivery the control plane never recorded: the group runs ahead.
    let _: redis::Value = r
        .q(&cmd(&[
            "XREADGROUP",
            "GROUP",
            "g",
            "ghost",
            "COUNT",
            "1",
            "STREAMS",
            &q,
            ">",
        ]))
        .await
        .unwrap();
    let mut held: Vec<Claim> = Vec::new();
    for _ in 0..3 {
        if let Ok(got) = cp.claim("w1", 1, 0).await {
            held.extend(got);
            break;
        }
    }
    let first = cp.job("o", &ids[0]).await.unwrap().unwrap();
    assert_eq!(first.state, JobState::Running, "CLAIM repaired the group");
    let (_, pending) = cp.queue_group("o").await.unwrap();
    let running = cp.tenant("o").await.unwrap().unwrap().running as usize;
    assert_eq!(pending, running, "one PEL entry per running job, no more");

    // The group set back behind jobs that are running: their deliveries go
    // back to their owners, the next head is delivered.
    let _: () = r.q(&cmd(&["XGROUP", "SETID", &q, "g", "0"])).await.unwrap();
    loop {
        let got = cp.claim("w2", 1, 0).await.expect("claim");
        if got.is_empty() {
            break;
        }
        held.extend(got);
    }
    let (_, pending) = cp.queue_group("o").await.unwrap();
    assert_eq!(pending, 3, "every job running, one PEL entry each");
    for id in &ids {
        let j = cp.job("o", id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Running, "{j:?}");
    }
    // Every lease still finalizes, the first one's too (its delivery was
    // given back to w1): the repair kept each PEL entry whole.
    assert_eq!(held.len(), 3);
    for c in held {
        assert_eq!(
            cp.finalize(&c.lease, &ok("", 5)).await.unwrap(),
            Finalized::Succeeded
        );
    }
    assert_eq!(cp.queue_group("o").await.unwrap().1, 0, "no PEL entry left");
    check_credits(&cp, "o").await;

    // The group itself lost (a partial restore): recreated on the head.
    let a = cp.submit("o", &job("a")).await.unwrap();
    let b = cp.submit("o", &job("b")).await.unwrap();
    let ca = claim_one(&cp).await;
    assert_eq!(ca.lease.job_id, a.id);
    let _: () = r.q(&cmd(&["XGROUP", "DESTROY", &q, "g"])).await.unwrap();
    let cb = cp
        .claim("w1", 1, 0)
        .await
        .expect("a lost group must not fail CLAIM");
    assert_eq!(cb.len(), 1);
    assert_eq!(cb[0].lease.job_id, b.id, "the head, not a job already run");
    for l in [&ca.lease, &cb[0].lease] {
        assert_eq!(
            cp.finalize(l, &ok("", 5)).await.unwrap(),
            Finalized::Succeeded
        );
    }
    assert_eq!(cp.queue_group("o").await.unwrap().1, 0);
    check_credits(&cp, "o").await;
}

/// A head job that can never run as its tenant now stands fails at once
/// with `unschedulable`; the tenant's other jobs go on.
async fn impossible_head_fails_and_frees_its_queue(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut spec = tenant("i", 1_000_000_000);
    spec.max_gpus = 2;
    cp.create_tenant(&spec, "h").await.unwrap();
    let big = cp
        .submit(
            "i",
            &SubmitSpec {
                gpus: 2,
                ..job("big")
            },
        )
        .await
        .unwrap();
    let small = cp.submit("i", &job("small")).await.unwrap();
    cp.update_tenant(
        "i",
        &TenantPatch {
            max_gpus: Some(1),
            ..TenantPatch::default()
        },
    )
    .await
    .unwrap();
    let got = cp.claim("w", 2, 4).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|c| c.lease.job_id.as_str()).collect();
    assert_eq!(ids, [small.id.as_str()], "the tenant's queue moves on");
    let j = cp.job("i", &big.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::Unschedulable);
    assert!(e.message.contains("max_gpus"), "{}", e.message);

    // Credits: the whole balance fell below the head's reservation.
    cp.create_tenant(&tenant("k", 2_000), "h").await.unwrap();
    let costly = cp
        .submit(
            "k",
            &SubmitSpec {
                fuel: Some(1_500_000_000),
                ..job("costly")
            },
        )
        .await
        .unwrap();
    let cheap = cp
        .submit(
            "k",
            &SubmitSpec {
                fuel: Some(1_000_000),
                timeout_ms: Some(1_000),
                ..job("cheap")
            },
        )
        .await
        .unwrap();
    cp.grant_credits("k", -1_900).await.unwrap();
    let got = cp.claim("w", 2, 0).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|c| c.lease.job_id.as_str()).collect();
    assert_eq!(ids, [cheap.id.as_str()]);
    let j = cp.job("k", &costly.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::Unschedulable);
    assert!(e.message.contains("credits"), "{}", e.message);
    let info = cp.tenant("k").await.unwrap().unwrap();
    assert_eq!((info.queued, info.running), (0, 1));
    check_credits(&cp, "k").await;

    // Within the balance but not its free part: the job waits, visibly,
    // until the running job settles.
    cp.create_tenant(&tenant("wait", 100), "h").await.unwrap();
    // 50 Mfuel + 30 s of a slot at 1 credit/s = 80 credits.
    let heavy = SubmitSpec {
        fuel: Some(50_000_000),
        ..job("heavy")
    };
    cp.submit("wait", &heavy).await.unwrap();
    let second = cp.submit("wait", &heavy).await.unwrap();
    let first = claim_one(&cp).await;
    assert!(cp.claim("w", 1, 0).await.unwrap().is_empty());
    let info = cp.tenant("wait").await.unwrap().unwrap();
    assert_eq!(info.parked.as_deref(), Some("credits"), "{info:?}");
    cp.finalize(&first.lease, &ok("", 5)).await.unwrap();
    let next = claim_one(&cp).await;
    assert_eq!(next.lease.job_id, second.id);
    assert_eq!(cp.tenant("wait").await.unwrap().unwrap().parked, None);
}

/// 20 tenants whose GPU jobs need more GPUs than a worker has free sit
/// ahead of one whose job fits: CLAIM still finds it.
async fn gpu_tenant_that_fits_is_found_behind_many_that_do_not(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let shard = cp.keys().shard_of("zsmall");
    let big: Vec<String> = (0..)
        .map(|i| format!("g{i:02}"))
        .filter(|t| cp.keys().shard_of(t) == shard)
        .take(20)
        .collect();
    for t in &big {
        let mut spec = tenant(t, 1_000_000_000);
        spec.max_gpus = 4;
        cp.create_tenant(&spec, "h").await.unwrap();
        cp.submit(
            t,
            &SubmitSpec {
                gpus: 4,
                ..job("wide")
            },
        )
        .await
        .unwrap();
    }
    let mut spec = tenant("zsmall", 1_000_000_000);
    spec.max_gpus = 4;
    cp.create_tenant(&spec, "h").await.unwrap();
    let s = cp
        .submit(
            "zsmall",
            &SubmitSpec {
                gpus: 1,
                ..job("narrow")
            },
        )
        .await
        .unwrap();
    let got = cp.claim("w", 4, 1).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|c| c.lease.job_id.as_str()).collect();
    assert_eq!(ids, [s.id.as_str()], "the job that fits one free GPU");
    // A worker with 4 free GPUs still serves the wide jobs, in turn.
    let got = cp.claim("w", 1, 4).await.unwrap();
    assert_eq!((got.len(), got[0].gpus), (1, 4));
}
