//! Faults between the control plane and Redis: answers lost after the
//! command ran. A real `redis-server` sits behind a TCP proxy that drops
//! the connection once a chosen request has reached Redis, before its
//! answer comes back.

mod common;

use crate::common::fixtures::tid;
use agentplane::control::{AttemptOutcome, ControlConfig, ControlPlane, Finalized, Finish};
use agentplane::model::JobState;
use common::fixtures;
use common::proxy::Proxy;
use common::redis::RedisServer;

fn succeed(output: &str) -> Finish {
    Finish {
        outcome: AttemptOutcome::Succeeded {
            output: output.into(),
        },
        fuel: 1_000,
        wall_ms: 10,
        log: String::new(),
        new_state: None,
        http: Default::default(),
        tokens: Default::default(),
    }
}

/// CLAIM ran and leased three jobs, then its answer was lost. Before the
/// fix the caller got an I/O error, the jobs sat leased to a worker that
/// never heard of them until the lease ran out, and each burnt a run
/// (`attempt` 2 on the next claim). Now the call is retried under the same
/// claim id and CLAIM answers the same three jobs, first run, leases
/// renewed; nothing else is leased twice.
#[tokio::test]
async fn a_claim_whose_answer_is_lost_hands_its_jobs_to_the_retry() {
    let r = RedisServer::start();
    let proxy = Proxy::start(&r.socket).await;
    let cfg = ControlConfig {
        lease_ms: 10_000,
        ..ControlConfig::default()
    };
    let direct = ControlPlane::connect(&r.url, cfg.clone()).await.unwrap();
    let cp = ControlPlane::connect(&proxy.url, cfg).await.unwrap();
    direct
        .create_tenant(&fixtures::tenant_spec("acme", 1_000_000_000), "h")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let s = fixtures::submit_spec(&format!("job {i}"));
        ids.push(direct.submit(&tid("acme"), &s).await.unwrap().id);
    }

    proxy.lose_answer_to(b"worker-that-loses-answers");
    let got = cp
        .claim("worker-that-loses-answers", 8, 0)
        .await
        .expect("the claim is retried, not failed");
    assert_eq!(proxy.cuts(), 1, "the first answer was lost");
    let mut claimed: Vec<String> = got.iter().map(|c| c.lease.job_id.clone()).collect();
    claimed.sort();
    ids.sort();
    assert_eq!(
        claimed, ids,
        "the retry answers the jobs the lost call leased"
    );
    for c in &got {
        assert_eq!(c.attempt, 1, "{}: no run was burnt", c.lease.job_id);
        assert!(c.input.starts_with("job "), "{}", c.input);
    }
    // Nothing more is queued, and another worker finds nothing to take.
    assert!(direct.claim("other", 8, 0).await.unwrap().is_empty());
    for c in &got {
        let f = direct.finalize(&c.lease, &succeed(&c.input)).await.unwrap();
        assert_eq!(f, Finalized::Succeeded);
        let j = direct
            .job(&tid("acme"), &c.lease.job_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.attempts, 1);
    }
    let t = direct.tenant(&tid("acme")).await.unwrap().unwrap();
    assert_eq!(t.credits.reserved, 0);
    assert_eq!(t.running, 0);
    let report = direct.audit(Default::default()).await.unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

/// A claim id is good for one call's jobs only: a later claim (a new id)
/// leases new jobs, and the record of the old one never re-answers a job
/// that has since finished.
#[tokio::test]
async fn a_finished_job_is_never_answered_again() {
    let r = RedisServer::start();
    let proxy = Proxy::start(&r.socket).await;
    let cp = ControlPlane::connect(&proxy.url, ControlConfig::default())
        .await
        .unwrap();
    cp.create_tenant(&fixtures::tenant_spec("acme", 1_000_000_000), "h")
        .await
        .unwrap();
    let a = cp
        .submit(&tid("acme"), &fixtures::submit_spec("a"))
        .await
        .unwrap()
        .id;
    let first = cp.claim("w", 1, 0).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].lease.job_id, a);
    cp.finalize(&first[0].lease, &succeed("a")).await.unwrap();
    let b = cp
        .submit(&tid("acme"), &fixtures::submit_spec("b"))
        .await
        .unwrap()
        .id;
    let second = cp.claim("w", 8, 0).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].lease.job_id, b);
    assert_eq!(proxy.cuts(), 0);
}
