//! Credits and the ledger: the money invariants under random operations,
//! exact integer amounts, slot-time billing.

use crate::common::books::{check_credits, check_runs_are_unique};
use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{
    AttemptOutcome, Claim, ControlConfig, CpError, Finalized, Finish, SubmitSpec,
};
use agentplane::model::{ErrorKind, JobState};
use std::collections::BTreeMap;
use std::time::Duration;

pub(crate) async fn credit_invariant_under_random_operations(url: &str, shards: u32) {
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
    // How often each branch was reached, over all seeds: a sequence that
    // never settled, released or capped anything would prove nothing.
    let mut reached: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut hit = |what: &'static str| *reached.entry(what).or_default() += 1;
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
                    match cp.submit(&tid(&t), &j).await {
                        Ok(s) => {
                            hit("submitted");
                            jobs.push(s.id);
                        }
                        Err(CpError::InsufficientCredits) => hit("submit refused: credits"),
                        Err(e) => panic!("submit: {e}"),
                    }
                }
                2 => {
                    let got = cp.claim("w", 2, rng.random_range(0..3)).await.unwrap();
                    hit(if got.is_empty() {
                        "claim: none"
                    } else {
                        "claimed"
                    });
                    held.extend(got);
                }
                3 if !held.is_empty() => {
                    let c = held.swap_remove(rng.random_range(0..held.len()));
                    match cp.renew(&c.lease).await {
                        Ok(()) => hit("renewed"),
                        Err(CpError::LeaseLost) => hit("renew refused: lost"),
                        Err(CpError::Cancelled) => hit("renew refused: cancelled"),
                        Err(e) => panic!("renew: {e}"),
                    }
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
                    match cp.finalize(&c.lease, &f).await {
                        Ok(Finalized::Succeeded) => hit("finalized: succeeded"),
                        Ok(Finalized::Failed) => hit("finalized: failed"),
                        Ok(Finalized::Retrying { .. }) => hit("finalized: retrying"),
                        Ok(Finalized::Cancelled) => hit("finalized: cancelled"),
                        Ok(Finalized::StateConflict) => hit("finalized: state conflict"),
                        Err(CpError::LeaseLost) => hit("finalize refused: lost"),
                        Err(e) => panic!("finalize: {e}"),
                    }
                }
                5 => {
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    if cp.reap(10).await.unwrap() > 0 {
                        hit("reaped");
                    }
                    if cp.promote(10).await.unwrap() > 0 {
                        hit("promoted");
                    }
                }
                6 if !jobs.is_empty() => {
                    let id = &jobs[rng.random_range(0..jobs.len())];
                    hit(match cp.cancel(&tid(&t), id).await.unwrap() {
                        JobState::Running => "cancelled: running",
                        JobState::Queued | JobState::Delayed => "cancelled: waiting",
                        _ => "cancelled: already over",
                    });
                }
                7 => {
                    // Now and then, take back more than the balance: refused.
                    let amount = if rng.random_bool(0.2) {
                        let info = cp.tenant(&tid(&t)).await.unwrap().unwrap();
                        -(info.credits.balance + 1)
                    } else {
                        rng.random_range(-20..30)
                    };
                    match cp.grant_credits(&tid(&t), amount).await {
                        Ok(_) => hit("granted"),
                        Err(CpError::InsufficientCredits) => hit("grant refused: credits"),
                        Err(e) => panic!("grant: {e}"),
                    }
                }
                8 if !held.is_empty() => {
                    let c = held.swap_remove(rng.random_range(0..held.len()));
                    if rng.random_bool(0.5) {
                        match cp.release(&c.lease).await {
                            Ok(()) => hit("released"),
                            Err(CpError::LeaseLost) => hit("release refused: lost"),
                            Err(e) => panic!("release: {e}"),
                        }
                    } else {
                        match cp.release_fault(&c.lease, "node").await {
                            Ok(_) => hit("released: node fault"),
                            Err(CpError::LeaseLost) => hit("release refused: lost"),
                            Err(e) => panic!("release_fault: {e}"),
                        }
                    }
                }
                _ => {}
            }
            check_credits(&cp, &t).await;
            check_runs_are_unique(&cp, &t).await;
            let info = cp.tenant(&tid(&t)).await.unwrap().unwrap();
            let mut waiting = 0;
            for st in [JobState::Queued, JobState::Delayed] {
                waiting += cp
                    .list_jobs(&tid(&t), Some(st), 1000, None)
                    .await
                    .unwrap()
                    .0
                    .len() as u32;
            }
            assert_eq!(info.queued, waiting, "the queued counter drifted");
            let running = cp
                .list_jobs(&tid(&t), Some(JobState::Running), 1000, None)
                .await;
            assert_eq!(info.running, running.unwrap().0.len() as u32);
        }
        // Nothing stuck: with credits to spare, every job ends.
        cp.grant_credits(&tid(&t), 1_000_000).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(60)).await;
            cp.reap(100).await.unwrap();
            cp.promote(100).await.unwrap();
            for c in cp.claim("w2", 10, 4).await.unwrap() {
                let _ = cp.finalize(&c.lease, &ok("", 1)).await;
            }
            let (jl, _) = cp.list_jobs(&tid(&t), None, 1000, None).await.unwrap();
            if jl.iter().all(|j| j.state.is_terminal()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "stuck: {jl:?}");
        }
        check_credits(&cp, &t).await;
        check_runs_are_unique(&cp, &t).await;
        let info = cp.tenant(&tid(&t)).await.unwrap().unwrap();
        assert_eq!(
            (info.queued, info.running, info.credits.reserved),
            (0, 0, 0)
        );
        // What the money did to each run, from the ledger: settled below its
        // reservation (the rest released), capped at it, or released whole.
        let ledger = cp.ledger(&tid(&t)).await.unwrap();
        let entry = |op: &str, job: &str, attempt: u32| {
            ledger
                .iter()
                .find(|e| e.op == op && e.job == job && e.attempt == attempt)
        };
        for r in ledger.iter().filter(|e| e.op == "reserve") {
            // One entry ends a run: a settle carrying what it released, or
            // a release of it all.
            let settle = entry("settle", &r.job, r.attempt).map(|e| (e.amount, e.released));
            let release = entry("release", &r.job, r.attempt).map(|e| e.amount);
            hit(match (settle, release) {
                (Some((s, 0)), None) if s == r.amount => "run: capped at its reservation",
                (Some((s, l)), None) if l > 0 && s + l == r.amount => "run: settled, rest released",
                (None, Some(l)) if l == r.amount => "run: released whole",
                other => panic!("run {r:?} ended as {other:?}: {ledger:?}"),
            });
        }
    }
    // Every branch was taken, and the money moved every way it can: a
    // change that made (say) every FINALIZE fail would show up here.
    // About half of what the 12 seeds reach today (the sequences barely
    // depend on timing), so a change of path shows, not a change of luck.
    for (what, min) in [
        ("submitted", 30),
        ("submit refused: credits", 20),
        ("claimed", 15),
        ("renewed", 5),
        ("renew refused: lost", 1),
        ("finalized: succeeded", 3),
        ("finalized: failed", 2),
        ("finalized: retrying", 1),
        ("finalized: cancelled", 1),
        ("finalize refused: lost", 2),
        ("reaped", 3),
        ("promoted", 2),
        ("cancelled: running", 1),
        ("cancelled: waiting", 10),
        ("granted", 30),
        ("grant refused: credits", 2),
        ("released", 2),
        ("released: node fault", 3),
        ("release refused: lost", 1),
        ("run: capped at its reservation", 5),
        ("run: settled, rest released", 10),
        ("run: released whole", 10),
    ] {
        let n = reached.get(what).copied().unwrap_or(0);
        assert!(
            n >= min,
            "`{what}` reached {n} times, want >= {min}: {reached:#?}"
        );
    }
}

pub(crate) async fn ledger_amounts_stay_exact_integers(url: &str, shards: u32) {
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
    cp.submit(&tid("big"), &j).await.unwrap();
    let c = claim_one(&cp).await;
    let mut f = ok("", 1);
    f.fuel = 300_000_000_000;
    cp.finalize(&c.lease, &f).await.unwrap();
    let ledger = cp.ledger(&tid("big")).await.unwrap();
    let amounts: Vec<(&str, i64, i64)> = ledger
        .iter()
        .map(|e| (e.op.as_str(), e.amount, e.released))
        .collect();
    assert_eq!(
        amounts,
        vec![
            ("grant", two52, 0),
            ("reserve", 1_000_000_000_000_000, 0),
            ("settle", 300_000_000_000_000, 700_000_000_000_000),
        ]
    );
    let info = cp.tenant(&tid("big")).await.unwrap().unwrap();
    assert_eq!(info.settled, 300_000_000_000_000);
    assert_eq!(info.credits.balance, two52 - 300_000_000_000_000);
    check_credits(&cp, "big").await;
    // A grant that would take the books past 2^53 - 1 is refused, unwritten.
    let max = (1i64 << 53) - 1;
    assert!(matches!(
        cp.grant_credits(&tid("big"), max).await,
        Err(CpError::Invalid(_))
    ));
    assert_eq!(cp.tenant(&tid("big")).await.unwrap().unwrap(), info);
    assert_eq!(cp.ledger(&tid("big")).await.unwrap().len(), 3);
    let top = max - info.granted;
    assert_eq!(
        cp.grant_credits(&tid("big"), top).await.unwrap(),
        max - info.settled
    );
    check_credits(&cp, "big").await;
}

/// Capacity is slot-time: every attempt pays for its wall time on a slot
/// (GPUs weighted as in fair share, plus their own price) besides fuel,
/// capped at the reservation, which SUBMIT checks and CLAIM takes.
pub(crate) async fn slot_time_is_billed_exactly(url: &str, shards: u32) {
    use agentplane::control::Prices;
    let cp = connect(
        url,
        ControlConfig {
            prices: Prices {
                credits_per_mfuel: 1,
                credits_per_gpu_second: 100,
                gpu_slot_weight: 10,
                credits_per_slot_second: 7,
                ..Prices::default()
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
            cp.submit(&tid("p"), &gpu_job).await,
            Err(CpError::InsufficientCredits)
        ),
        "SUBMIT's 402 uses the slot-time reservation"
    );
    cp.grant_credits(&tid("p"), 1).await.unwrap();
    let g = cp.submit(&tid("p"), &gpu_job).await.unwrap();
    let c = cp.claim("w", 1, 1).await.unwrap().pop().expect("claimed");
    assert_eq!(c.lease.job_id, g.id);
    assert_eq!(
        cp.tenant(&tid("p"))
            .await
            .unwrap()
            .unwrap()
            .credits
            .reserved,
        reservation
    );
    // 2.5 Mfuel, 1234 ms: 3 + ceil(1234 * 177 / 1000 = 218.418) = 222.
    let f = Finish {
        fuel: 2_500_000,
        ..ok("", 1234)
    };
    cp.finalize(&c.lease, &f).await.unwrap();
    let j = cp.job(&tid("p"), &g.id).await.unwrap().unwrap();
    assert_eq!((j.usage.credits, j.usage.wall_ms), (222, 1234));
    let info = cp.tenant(&tid("p")).await.unwrap().unwrap();
    assert_eq!((info.settled, info.credits.reserved), (222, 0));

    // No fuel at all (a guest asleep in a host call): the slot still costs.
    cp.grant_credits(&tid("p"), 10_000).await.unwrap();
    let s = cp.submit(&tid("p"), &job("sleeper")).await.unwrap();
    let c = claim_one(&cp).await;
    let f = Finish {
        fuel: 0,
        ..ok("", 999)
    };
    cp.finalize(&c.lease, &f).await.unwrap();
    // ceil(999 * 7 / 1000 = 6.993) = 7.
    assert_eq!(
        cp.job(&tid("p"), &s.id)
            .await
            .unwrap()
            .unwrap()
            .usage
            .credits,
        7
    );

    // Capped at the reservation: timeout 1 s, 1 Mfuel -> 1 + 7 = 8.
    let capped = SubmitSpec {
        timeout_ms: Some(1_000),
        fuel: Some(1_000_000),
        ..job("capped")
    };
    let s = cp.submit(&tid("p"), &capped).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(
        cp.tenant(&tid("p"))
            .await
            .unwrap()
            .unwrap()
            .credits
            .reserved,
        8
    );
    cp.finalize(&c.lease, &ok("", 5_000)).await.unwrap();
    assert_eq!(
        cp.job(&tid("p"), &s.id)
            .await
            .unwrap()
            .unwrap()
            .usage
            .credits,
        8
    );
    let info = cp.tenant(&tid("p")).await.unwrap().unwrap();
    assert_eq!(info.settled, 222 + 7 + 8);
    check_credits(&cp, "p").await;
}
