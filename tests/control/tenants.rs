//! Tenant quotas: max_running, max_gpus, max_queued and credits, at every
//! claim and on every way back to the queue.

use crate::common::books::check_credits;
use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{Claim, CpError, Finalized, SubmitSpec, TenantPatch};
use agentplane::model::{ErrorKind, JobState};
use std::time::Duration;

pub(crate) async fn tenant_at_max_running_does_not_slow_others(url: &str, _shards: u32) {
    let cp = connect(url, cfg(1)).await;
    backlog(&cp, "x", 1, 100).await;
    cp.update_tenant(
        &tid("x"),
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
    assert_eq!(cp.tenant(&tid("x")).await.unwrap().unwrap().running, 0);
    let mut seen_x = false;
    for _ in 0..3 {
        seen_x |= claim_one(&cp).await.lease.tenant == "x";
    }
    assert!(seen_x, "x was unparked when its job ended");
}

pub(crate) async fn quotas_and_gpu_slots_hold_at_every_claim(url: &str, shards: u32) {
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
            cp.submit(&tid(t), &j).await.unwrap();
        }
        // max_queued holds at submission.
        assert!(matches!(
            cp.submit(&tid(t), &job("over")).await,
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
            let info = cp.tenant(&tid(t)).await.unwrap().unwrap();
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
        cp.submit(&tid("poor"), &j).await,
        Err(CpError::InsufficientCredits)
    ));
}

/// The rule: `max_queued` bounds new submissions only. A job the tenant
/// already got accepted is never refused on its way back to the queue
/// (retry, RELEASE, state conflict, REAP), so `queued` may exceed
/// `max_queued`, but never `max_queued + max_running`.
pub(crate) async fn requeues_bypass_admission_and_the_queue_stays_bounded(url: &str, shards: u32) {
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
        cp.submit(&tid("q"), &with_agent(&i.to_string()))
            .await
            .unwrap();
        held.push(claim_one(&cp).await);
    }
    for _ in 0..2 {
        cp.submit(&tid("q"), &job("later")).await.unwrap();
    }
    assert!(matches!(
        cp.submit(&tid("q"), &job("over")).await,
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
    let info = cp.tenant(&tid("q")).await.unwrap().unwrap();
    assert_eq!((info.queued, info.running), (5, 0), "{info:?}");
    bound(&info);
    // New submissions are still refused until the queue drains below max_queued.
    assert!(matches!(
        cp.submit(&tid("q"), &job("over")).await,
        Err(CpError::QueueFull)
    ));
    // The counter is exact: it is the number of queued and delayed jobs.
    let mut n = 0;
    for st in [JobState::Queued, JobState::Delayed] {
        n += cp
            .list_jobs(&tid("q"), Some(st), 100, None)
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
        bound(&cp.tenant(&tid("q")).await.unwrap().unwrap());
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
    let info = cp.tenant(&tid("q")).await.unwrap().unwrap();
    assert_eq!(
        (info.queued, info.running, info.credits.reserved),
        (0, 0, 0)
    );
    assert!(cp.submit(&tid("q"), &job("fits")).await.is_ok());
}

/// A head job that can never run as its tenant now stands fails at once
/// with `unschedulable`; the tenant's other jobs go on.
pub(crate) async fn impossible_head_fails_and_frees_its_queue(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut spec = tenant("i", 1_000_000_000);
    spec.max_gpus = 2;
    cp.create_tenant(&spec, "h").await.unwrap();
    let big = cp
        .submit(
            &tid("i"),
            &SubmitSpec {
                gpus: 2,
                callback_url: Some("http://hooks.example/done".into()),
                ..job("big")
            },
        )
        .await
        .unwrap();
    let small = cp.submit(&tid("i"), &job("small")).await.unwrap();
    cp.update_tenant(
        &tid("i"),
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
    let j = cp.job(&tid("i"), &big.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::Unschedulable);
    assert!(e.message.contains("max_gpus"), "{}", e.message);
    // A job failed this way is finished like any other: its callback is owed.
    let mut owed = Vec::new();
    for shard in 0..shards {
        owed.extend(cp.take_hooks(shard, 100, 60_000).await.unwrap());
    }
    let owed: Vec<&str> = owed.iter().map(|h| h.job.as_str()).collect();
    assert_eq!(
        owed,
        [big.id.as_str()],
        "the unschedulable job's callback is owed"
    );

    // Credits: the whole balance fell below the head's reservation.
    cp.create_tenant(&tenant("k", 2_000), "h").await.unwrap();
    let costly = cp
        .submit(
            &tid("k"),
            &SubmitSpec {
                fuel: Some(1_500_000_000),
                ..job("costly")
            },
        )
        .await
        .unwrap();
    let cheap = cp
        .submit(
            &tid("k"),
            &SubmitSpec {
                fuel: Some(1_000_000),
                timeout_ms: Some(1_000),
                ..job("cheap")
            },
        )
        .await
        .unwrap();
    cp.grant_credits(&tid("k"), -1_900).await.unwrap();
    let got = cp.claim("w", 2, 0).await.unwrap();
    let ids: Vec<&str> = got.iter().map(|c| c.lease.job_id.as_str()).collect();
    assert_eq!(ids, [cheap.id.as_str()]);
    let j = cp.job(&tid("k"), &costly.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::Unschedulable);
    assert!(e.message.contains("credits"), "{}", e.message);
    let info = cp.tenant(&tid("k")).await.unwrap().unwrap();
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
    cp.submit(&tid("wait"), &heavy).await.unwrap();
    let second = cp.submit(&tid("wait"), &heavy).await.unwrap();
    let first = claim_one(&cp).await;
    assert!(cp.claim("w", 1, 0).await.unwrap().is_empty());
    let info = cp.tenant(&tid("wait")).await.unwrap().unwrap();
    assert_eq!(info.parked.as_deref(), Some("credits"), "{info:?}");
    cp.finalize(&first.lease, &ok("", 5)).await.unwrap();
    let next = claim_one(&cp).await;
    assert_eq!(next.lease.job_id, second.id);
    assert_eq!(cp.tenant(&tid("wait")).await.unwrap().unwrap().parked, None);
}
