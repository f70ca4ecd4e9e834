//! CLAIM: exactly-once hand-out, fair share between tenants (weights, no
//! burst after idling, estimate corrections) and finding work past obstacles.

use crate::common::books::check_credits;
use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{Claim, ControlConfig, CpError, Finalized, SubmitSpec, TenantPatch};
use agentplane::model::JobState;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) async fn exactly_once_with_8_claimers(url: &str, shards: u32) {
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
        let s = cp.submit(&tid(t), &job(&format!("job {i}"))).await.unwrap();
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
        let j = cp.job(&tid(t), id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.attempts, 1);
        assert!(j.output.as_deref().unwrap().starts_with("job "));
    }
    for t in &tenants {
        let info = cp.tenant(&tid(t)).await.unwrap().unwrap();
        assert_eq!(info.running, 0);
        assert_eq!(info.queued, 0);
        assert_eq!(info.credits.reserved, 0);
        // 250 jobs × (1 Mfuel × 1 credit/Mfuel + 3 ms of a slot at
        // 1 credit/slot-s, rounded up to 1).
        assert_eq!(info.settled, 500);
        // Nothing pending, and no consumer left behind by the 8 workers.
        assert_eq!(cp.queue_group(&tid(t)).await.unwrap(), (0, 0), "{t}");
    }
}

pub(crate) async fn weights_share_capacity(url: &str, _shards: u32) {
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

pub(crate) async fn idle_tenant_gets_no_burst(url: &str, _shards: u32) {
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "a", 1, 400).await;
    backlog(&cp, "b", 1, 400).await;
    cp.create_tenant(&tenant("c", 1_000_000_000), "h")
        .await
        .unwrap();
    serve_sequentially(&cp, 200, 50).await;
    for i in 0..100 {
        cp.submit(&tid("c"), &job(&i.to_string())).await.unwrap();
    }
    let counts = serve_sequentially(&cp, 30, 50).await;
    let c = counts.get("c").copied().unwrap_or(0);
    // A fair third of 30 is 10; the idle time must not buy more than one extra.
    assert!((9..=11).contains(&c), "c got {c} of 30 ({counts:?})");
}

pub(crate) async fn light_tenant_is_not_stuck_behind_a_flood(url: &str, _shards: u32) {
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "heavy", 1, 1000).await;
    serve_sequentially(&cp, 50, 20).await;
    cp.create_tenant(&tenant("light", 1_000_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit(&tid("light"), &job("me")).await.unwrap();
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

pub(crate) async fn virtual_time_is_corrected_at_the_claim_weight(url: &str, _shards: u32) {
    // One shard: fairness is decided per shard.
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "hw", 1000, 21).await;
    // Claimed at weight 1000 (estimate 1 s / 1000)...
    let c = claim_one(&cp).await;
    assert_eq!(c.lease.tenant, "hw");
    // ...finalized after the weight fell to 1: the correction must use the
    // weight the estimate was charged at, or hw banks ~1 s of priority.
    cp.update_tenant(
        &tid("hw"),
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

pub(crate) async fn release_and_reap_refund_the_claim_estimate(url: &str, _shards: u32) {
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
        cp.submit(&tid("ra"), &j).await.unwrap();
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
        *counts.entry(c.lease.tenant.to_string()).or_default() += 1;
        cp.finalize(&c.lease, &ok("", 100)).await.unwrap();
    }
    let ra = counts.get("ra").copied().unwrap_or(0);
    assert!(
        (9..=11).contains(&ra),
        "ra paid for runs it never had: {ra} of 20 ({counts:?})"
    );
}

/// The tenant's consumer group and its head part ways (a delivery nobody
/// recorded, or a group set back): CLAIM repairs, hands out the right
/// job, and leaves no stray PEL entry.
pub(crate) async fn stream_out_of_step_is_repaired(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut r = raw(url).await;
    cp.create_tenant(&tenant("o", 1_000_000), "h")
        .await
        .unwrap();
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(
                cp.submit(&tid("o"), &job(&format!("o{i}")))
                    .await
                    .unwrap()
                    .id,
            );
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
    let first = cp.job(&tid("o"), &ids[0]).await.unwrap().unwrap();
    assert_eq!(first.state, JobState::Running, "CLAIM repaired the group");
    let (_, pending) = cp.queue_group(&tid("o")).await.unwrap();
    let running = cp.tenant(&tid("o")).await.unwrap().unwrap().running as usize;
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
    let (_, pending) = cp.queue_group(&tid("o")).await.unwrap();
    assert_eq!(pending, 3, "every job running, one PEL entry each");
    for id in &ids {
        let j = cp.job(&tid("o"), id).await.unwrap().unwrap();
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
    assert_eq!(
        cp.queue_group(&tid("o")).await.unwrap().1,
        0,
        "no PEL entry left"
    );
    check_credits(&cp, "o").await;

    // The group itself lost (a partial restore): recreated on the head.
    let a = cp.submit(&tid("o"), &job("a")).await.unwrap();
    let b = cp.submit(&tid("o"), &job("b")).await.unwrap();
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
    assert_eq!(cp.queue_group(&tid("o")).await.unwrap().1, 0);
    check_credits(&cp, "o").await;
}

/// 20 tenants whose GPU jobs need more GPUs than a worker has free sit
/// ahead of one whose job fits: CLAIM still finds it.
pub(crate) async fn gpu_tenant_that_fits_is_found_behind_many_that_do_not(url: &str, shards: u32) {
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
            &tid(t),
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
            &tid("zsmall"),
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
