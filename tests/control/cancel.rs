//! CANCEL: queued, delayed and running jobs, and cancel winning on every
//! path out of FINALIZE.

use crate::common::books::{check_credits, check_runs_are_unique};
use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{AttemptOutcome, CpError, Finalized, Finish, SubmitSpec};
use agentplane::model::{ErrorKind, JobState};

pub(crate) async fn cancel_queued_and_running(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("c", 1_000_000), "h")
        .await
        .unwrap();
    cp.create_tenant(&tenant("other", 1_000_000), "h")
        .await
        .unwrap();
    let queued = cp.submit(&tid("c"), &job("q")).await.unwrap();
    assert!(matches!(
        cp.cancel(&tid("other"), &queued.id).await,
        Err(CpError::NotFound)
    ));
    assert!(cp.job(&tid("other"), &queued.id).await.unwrap().is_none());
    assert_eq!(
        cp.cancel(&tid("c"), &queued.id).await.unwrap(),
        JobState::Queued
    );
    let j = cp.job(&tid("c"), &queued.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.error.unwrap().kind, ErrorKind::Cancelled);
    assert!(cp.claim("w", 5, 0).await.unwrap().is_empty());
    assert_eq!(cp.tenant(&tid("c")).await.unwrap().unwrap().queued, 0);

    let running = cp.submit(&tid("c"), &job("r")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(
        cp.cancel(&tid("c"), &running.id).await.unwrap(),
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
    let j = cp.job(&tid("c"), &running.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    let info = cp.tenant(&tid("c")).await.unwrap().unwrap();
    assert_eq!((info.running, info.credits.reserved), (0, 0));
    // 1 Mfuel + 40 ms of a slot (rounded up to 1 credit).
    assert_eq!(info.settled, 2, "the cancelled attempt pays what it used");

    let delayed = cp
        .submit(
            &tid("c"),
            &SubmitSpec {
                delay_ms: 60_000,
                ..job("d")
            },
        )
        .await
        .unwrap();
    assert_eq!(
        cp.cancel(&tid("c"), &delayed.id).await.unwrap(),
        JobState::Delayed
    );
    assert_eq!(
        cp.job(&tid("c"), &delayed.id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    let (list, next) = cp
        .list_jobs(&tid("c"), Some(JobState::Cancelled), 2, None)
        .await
        .unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].id, delayed.id, "newest first");
    let (rest, _) = cp
        .list_jobs(&tid("c"), Some(JobState::Cancelled), 2, next.as_deref())
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, queued.id);
}

pub(crate) async fn cancel_wins_on_every_path_out_of_finalize(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("k", 1_000_000), "h")
        .await
        .unwrap();
    // The state-conflict path.
    let a = cp.submit(&tid("k"), &with_agent("a")).await.unwrap();
    let b = cp.submit(&tid("k"), &with_agent("b")).await.unwrap();
    let ca = claim_one(&cp).await;
    let cb = claim_one(&cp).await;
    assert_eq!((&ca.lease.job_id, &cb.lease.job_id), (&a.id, &b.id));
    assert_eq!(
        cp.finalize(&ca.lease, &set_state(b"1")).await.unwrap(),
        Finalized::Succeeded
    );
    assert_eq!(
        cp.cancel(&tid("k"), &b.id).await.unwrap(),
        JobState::Running
    );
    assert_eq!(
        cp.finalize(&cb.lease, &set_state(b"2")).await.unwrap(),
        Finalized::Cancelled,
        "a cancelled job must not be requeued on a state conflict"
    );
    let j = cp.job(&tid("k"), &b.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.error.unwrap().kind, ErrorKind::Cancelled);
    assert!(
        cp.claim("w", 5, 0).await.unwrap().is_empty(),
        "nothing requeued"
    );
    // The success path: the flag wins and nothing is committed.
    let c = cp.submit(&tid("k"), &with_agent("c")).await.unwrap();
    let cc = claim_one(&cp).await;
    cp.cancel(&tid("k"), &c.id).await.unwrap();
    assert_eq!(
        cp.finalize(&cc.lease, &set_state(b"3")).await.unwrap(),
        Finalized::Cancelled
    );
    // The retryable-failure path.
    let d = cp.submit(&tid("k"), &with_agent("d")).await.unwrap();
    let cd = claim_one(&cp).await;
    assert_eq!(
        cd.state.as_deref(),
        Some(&b"1"[..]),
        "no cancelled job committed"
    );
    cp.cancel(&tid("k"), &d.id).await.unwrap();
    assert_eq!(
        cp.finalize(&cd.lease, &failed(ErrorKind::AgentError))
            .await
            .unwrap(),
        Finalized::Cancelled
    );
    let info = cp.tenant(&tid("k")).await.unwrap().unwrap();
    assert_eq!(
        (info.running, info.queued, info.credits.reserved),
        (0, 0, 0)
    );
    check_credits(&cp, "k").await;
    check_runs_are_unique(&cp, "k").await;
}
