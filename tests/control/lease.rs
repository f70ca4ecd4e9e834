//! Leases: fencing tokens, FINALIZE outcomes and retries, RELEASE, run
//! numbers and node faults.

use crate::common::books::{check_credits, check_runs_are_unique};
use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{ControlConfig, CpError, Finalized};
use agentplane::model::{ErrorKind, JobState};
use std::time::Duration;

pub(crate) async fn reaped_lease_fences_the_old_token(url: &str, shards: u32) {
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
    let s = cp.submit(&tid("a"), &job("x")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.lease.job_id, s.id);
    cp.renew(&c.lease).await.unwrap();
    let before = cp.tenant(&tid("a")).await.unwrap().unwrap();
    assert!(before.credits.reserved > 0);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(cp.reap(100).await.unwrap(), 1);
    let after = cp.tenant(&tid("a")).await.unwrap().unwrap();
    assert_eq!(after.credits.reserved, 0, "reservation released");
    assert_eq!(after.settled, 0, "lost attempt not charged");
    assert!(matches!(cp.renew(&c.lease).await, Err(CpError::LeaseLost)));
    assert!(matches!(
        cp.finalize(&c.lease, &ok("late", 10)).await,
        Err(CpError::LeaseLost)
    ));
    let t2 = cp.tenant(&tid("a")).await.unwrap().unwrap();
    assert_eq!(t2, after, "a stale token changes nothing");
    assert_eq!(
        cp.queue_group(&tid("a")).await.unwrap(),
        (0, 0),
        "PEL reclaimed"
    );
    let j = cp.job(&tid("a"), &s.id).await.unwrap().unwrap();
    // Straight back in the queue (its worker died; it did not fail), and
    // it runs again with a newer token.
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.usage.credits, 0);
    let c2 = claim_one(&cp).await;
    assert_eq!(c2.lease.job_id, s.id);
    assert!(c2.lease.token > c.lease.token);
    assert_eq!(c2.attempt, 2);
    // The job is running again, so only the token tells the two runs apart:
    // the old one's RENEW, FINALIZE and RELEASE are still refused.
    assert!(matches!(cp.renew(&c.lease).await, Err(CpError::LeaseLost)));
    assert!(matches!(
        cp.finalize(&c.lease, &ok("stale", 10)).await,
        Err(CpError::LeaseLost)
    ));
    assert!(matches!(
        cp.release(&c.lease).await,
        Err(CpError::LeaseLost)
    ));
    assert_eq!(
        cp.finalize(&c2.lease, &ok("done", 10)).await.unwrap(),
        Finalized::Succeeded
    );
    let j = cp.job(&tid("a"), &s.id).await.unwrap().unwrap();
    assert_eq!(j.output.as_deref(), Some("done"), "the new run's result");
    // Attempts lost to dead workers fail the job once max_attempts are spent.
    let mut spec = job("y");
    spec.max_attempts = 1;
    let s = cp.submit(&tid("a"), &spec).await.unwrap();
    let _c = claim_one(&cp).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(cp.reap(100).await.unwrap(), 1);
    let j = cp.job(&tid("a"), &s.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.unwrap().kind, ErrorKind::LeaseExpired);
}

pub(crate) async fn failing_job_returns_after_backoff(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("f", 1_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit(&tid("f"), &job("x")).await.unwrap();
    let c = claim_one(&cp).await;
    let r = cp
        .finalize(&c.lease, &failed(ErrorKind::AgentError))
        .await
        .unwrap();
    let Finalized::Retrying { delay_ms } = r else {
        panic!("expected a retry, got {r:?}")
    };
    assert!((50..=100).contains(&delay_ms), "first backoff {delay_ms}");
    let j = cp.job(&tid("f"), &s.id).await.unwrap().unwrap();
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
    let j = cp.job(&tid("f"), &s.id).await.unwrap().unwrap();
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
        let s = cp.submit(&tid("f"), &job("y")).await.unwrap();
        let c = claim_one(&cp).await;
        assert_eq!(
            cp.finalize(&c.lease, &failed(kind)).await.unwrap(),
            Finalized::Failed
        );
        let j = cp.job(&tid("f"), &s.id).await.unwrap().unwrap();
        assert_eq!(j.error.unwrap().kind, kind);
    }
    assert_eq!(
        cp.job_log(&tid("f"), &s.id).await.unwrap().unwrap(),
        "log line"
    );
}

pub(crate) async fn released_job_goes_back_uncharged(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("d", 1_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit(&tid("d"), &job("x")).await.unwrap();
    let c = claim_one(&cp).await;
    cp.release(&c.lease).await.unwrap();
    assert!(matches!(
        cp.release(&c.lease).await,
        Err(CpError::LeaseLost)
    ));
    let j = cp.job(&tid("d"), &s.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.usage.credits),
        (JobState::Queued, 0, 0)
    );
    let info = cp.tenant(&tid("d")).await.unwrap().unwrap();
    assert_eq!(
        (info.running, info.credits.reserved, info.settled),
        (0, 0, 0)
    );
    let c2 = claim_one(&cp).await;
    // The second run has its own number, but only one attempt counts.
    assert_eq!((c2.lease.job_id.as_str(), c2.attempt), (s.id.as_str(), 2));
    assert_eq!(cp.job(&tid("d"), &s.id).await.unwrap().unwrap().attempts, 1);
}

pub(crate) async fn every_run_has_its_own_attempt_number(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("n", 1_000_000), "h")
        .await
        .unwrap();
    let s = cp.submit(&tid("n"), &with_agent("x")).await.unwrap();
    // Run 1: handed back by a draining worker.
    let c1 = claim_one(&cp).await;
    cp.release(&c1.lease).await.unwrap();
    // Run 2: another job of the agent commits meanwhile (state conflict).
    let other = cp.submit(&tid("n"), &with_agent("y")).await.unwrap();
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
    let j = cp.job(&tid("n"), &s.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts),
        (JobState::Succeeded, 2),
        "`attempts` counts only what counts toward max_attempts"
    );
    let reserves: Vec<u32> = cp
        .ledger(&tid("n"))
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

pub(crate) async fn node_faults_are_bounded_and_never_charged(url: &str, shards: u32) {
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
    let s = cp.submit(&tid("nf"), &spec).await.unwrap();
    for i in 1..=3u32 {
        let c = claim_after_backoff().await;
        assert_eq!((c.lease.job_id.as_str(), c.attempt), (s.id.as_str(), i));
        let r = cp
            .release_fault(&c.lease, "the pool allocator is exhausted")
            .await
            .unwrap();
        if i < 3 {
            assert!(matches!(r, Finalized::Retrying { .. }), "{r:?}");
            let j = cp.job(&tid("nf"), &s.id).await.unwrap().unwrap();
            assert_eq!((j.state, j.attempts), (JobState::Delayed, 0));
        } else {
            assert_eq!(r, Finalized::Failed);
        }
    }
    let j = cp.job(&tid("nf"), &s.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.usage.credits),
        (JobState::Failed, 0, 0)
    );
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::NodeFault);
    assert!(e.message.contains("pool allocator"), "{}", e.message);
    let info = cp.tenant(&tid("nf")).await.unwrap().unwrap();
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
    let s = cp.submit(&tid("nf"), &job("y")).await.unwrap();
    let c = claim_after_backoff().await;
    let r = cp
        .finalize(&c.lease, &failed(ErrorKind::NodeFault))
        .await
        .unwrap();
    assert!(matches!(r, Finalized::Retrying { .. }), "{r:?}");
    let j = cp.job(&tid("nf"), &s.id).await.unwrap().unwrap();
    assert_eq!((j.attempts, j.usage.credits), (0, 0));
    assert_eq!(cp.tenant(&tid("nf")).await.unwrap().unwrap().settled, 0);
    // ...and a cancel still wins over it.
    let c = claim_after_backoff().await;
    cp.cancel(&tid("nf"), &s.id).await.unwrap();
    assert_eq!(
        cp.release_fault(&c.lease, "again").await.unwrap(),
        Finalized::Cancelled
    );
    // A draining worker's hand-back is no fault and never fails the job.
    let s = cp.submit(&tid("nf"), &spec).await.unwrap();
    for _ in 0..5 {
        let c = claim_after_backoff().await;
        cp.release(&c.lease).await.unwrap();
    }
    let c = claim_after_backoff().await;
    assert_eq!((c.lease.job_id.as_str(), c.attempt), (s.id.as_str(), 6));
    cp.finalize(&c.lease, &ok("done", 1)).await.unwrap();
    // A component that can never instantiate is final at once, and charged
    // like any failure (it is the tenant's component).
    let s = cp.submit(&tid("nf"), &job("z")).await.unwrap();
    let c = claim_after_backoff().await;
    assert_eq!(
        cp.finalize(&c.lease, &failed(ErrorKind::InvalidComponent))
            .await
            .unwrap(),
        Finalized::Failed
    );
    let j = cp.job(&tid("nf"), &s.id).await.unwrap().unwrap();
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
    use crate::common::stack::{Opts, Stack, state};
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
    let ledger = cp.ledger(&tid("nfs")).await.unwrap();
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

/// A batch FINALIZE settles each attempt on its own: a stale token in the
/// batch is refused alone, the others are charged once each, and the books
/// balance.
pub(crate) async fn a_batch_finalize_settles_each_attempt_alone(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("bf", 1_000_000_000), "h")
        .await
        .unwrap();
    cp.create_tenant(&tenant("bg", 1_000_000_000), "h")
        .await
        .unwrap();
    for t in ["bf", "bg"] {
        for i in 0..3 {
            cp.submit(&tid(t), &job(&format!("{t}{i}"))).await.unwrap();
        }
    }
    let claims = cp.claim("w", 10, 0).await.unwrap();
    assert_eq!(claims.len(), 6);
    let mut stale = claims[0].lease.clone();
    stale.token += 1_000;
    let endings = [
        ok("a", 10),
        ok("b", 20),
        failed(ErrorKind::Trap),
        ok("d", 30),
        ok("e", 40),
    ];
    let mut ends: Vec<_> = claims[1..]
        .iter()
        .map(|c| &c.lease)
        .zip(endings.iter())
        .collect();
    ends.insert(0, (&stale, &endings[0]));
    let got = cp.finalize_many(&ends).await;
    assert_eq!(got.len(), 6);
    assert!(matches!(got[0], Err(CpError::LeaseLost)), "{:?}", got[0]);
    for (i, g) in got.iter().enumerate().skip(1) {
        let s = g.as_ref().unwrap();
        let want = if i == 3 {
            Finalized::Retrying { delay_ms: 0 }
        } else {
            Finalized::Succeeded
        };
        match (&s.result, &want) {
            (Finalized::Retrying { .. }, Finalized::Retrying { .. }) => {}
            (a, b) => assert_eq!(a, b, "attempt {i}"),
        }
        assert!(s.credits > 0, "attempt {i} was charged: {s:?}");
    }
    // The stale one's job is still running under its real token, and ends.
    assert!(matches!(
        cp.finalize(&claims[0].lease, &ok("late", 5)).await,
        Ok(Finalized::Succeeded)
    ));
    // Again: each attempt answers `lost` now.
    let again = cp.finalize_many(&ends[1..]).await;
    assert!(
        again.iter().all(|r| matches!(r, Err(CpError::LeaseLost))),
        "{again:?}"
    );
    for t in ["bf", "bg"] {
        check_credits(&cp, t).await;
        check_runs_are_unique(&cp, t).await;
        let info = cp.tenant(&tid(t)).await.unwrap().unwrap();
        assert_eq!(info.running, 0, "{t}: {info:?}");
        assert_eq!(info.credits.reserved, 0, "{t}: {info:?}");
    }
}
