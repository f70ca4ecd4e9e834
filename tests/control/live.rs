//! LOG (an attempt's log stored while it runs) and RETRY (a failed job
//! queued again as its next attempt).

use crate::common::books::{check_credits, check_runs_are_unique};
use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{ControlConfig, CpError, Finalized, Lease, LogStored};
use agentplane::model::{ErrorKind, JobState};
use std::time::Duration;

pub(crate) async fn live_log_is_fenced_and_capped(url: &str, shards: u32) {
    let cp = connect(
        url,
        ControlConfig {
            log_max_bytes: 100,
            ..cfg(shards)
        },
    )
    .await;
    cp.create_tenant(&tenant("a", 1_000_000), "h")
        .await
        .unwrap();
    let mut spec = job("x");
    spec.max_attempts = 2;
    let s = cp.submit(&tid("a"), &spec).await.unwrap();
    let c = claim_one(&cp).await;
    let log = || async { cp.job_log(&tid("a"), &s.id).await.unwrap().unwrap() };

    // Batches append at the offset the worker has stored.
    assert_eq!(
        cp.append_log(&c.lease, 0, "one\n").await.unwrap(),
        LogStored::Stored(4)
    );
    assert_eq!(
        cp.append_log(&c.lease, 4, "two\n").await.unwrap(),
        LogStored::Stored(8)
    );
    // A retried call whose answer was lost stores nothing twice.
    assert_eq!(
        cp.append_log(&c.lease, 4, "two\n").await.unwrap(),
        LogStored::Stored(8)
    );
    assert_eq!(log().await, "one\ntwo\n");
    // A wrong offset is refused, with what is stored.
    assert_eq!(
        cp.append_log(&c.lease, 2, "zz\n").await.unwrap(),
        LogStored::Conflict(8)
    );
    let tail = cp.log_tail(&tid("a"), &s.id, 4).await.unwrap().unwrap();
    assert_eq!(
        (tail.state, tail.run, tail.logged_run, tail.text.as_str()),
        (JobState::Running, 1, Some(1), "two\n")
    );
    assert!(tail.is_current());
    assert!(cp.log_tail(&tid("b"), &s.id, 0).await.unwrap().is_none());

    // The cap holds in the script: a batch past it writes nothing.
    assert_eq!(
        cp.append_log(&c.lease, 8, &"x".repeat(93)).await.unwrap(),
        LogStored::Full
    );
    assert_eq!(log().await, "one\ntwo\n");
    assert_eq!(
        cp.append_log(&c.lease, 0, &"y".repeat(101)).await.unwrap(),
        LogStored::Full
    );
    assert_eq!(
        cp.append_log(&c.lease, 8, &"x".repeat(92)).await.unwrap(),
        LogStored::Stored(100)
    );
    assert_eq!(log().await.len(), 100);

    // A stale token writes nothing.
    let stale = Lease {
        token: c.lease.token + 1000,
        ..c.lease.clone()
    };
    assert!(matches!(
        cp.append_log(&stale, 0, "stale\n").await,
        Err(CpError::LeaseLost)
    ));
    assert_eq!(log().await.len(), 100);

    // FINALIZE replaces it with the attempt's whole log; after it the old
    // token writes nothing.
    assert!(matches!(
        cp.finalize(&c.lease, &failed(ErrorKind::AgentError))
            .await
            .unwrap(),
        Finalized::Retrying { .. }
    ));
    assert_eq!(log().await, "log line");
    assert!(matches!(
        cp.append_log(&c.lease, 0, "late\n").await,
        Err(CpError::LeaseLost)
    ));
    assert_eq!(log().await, "log line");

    // The next run: until its first batch, the stored log is the last
    // run's, and says so.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(cp.promote(100).await.unwrap(), 1);
    let c2 = claim_one(&cp).await;
    assert_eq!(c2.attempt, 2);
    let tail = cp.log_tail(&tid("a"), &s.id, 0).await.unwrap().unwrap();
    assert_eq!((tail.run, tail.logged_run), (2, Some(1)));
    assert!(!tail.is_current());
    // Its first batch must start at 0 (an offset into the last run's log
    // is refused), and replaces the last run's log.
    assert_eq!(
        cp.append_log(&c2.lease, 8, "two\n").await.unwrap(),
        LogStored::Conflict(0)
    );
    assert_eq!(
        cp.append_log(&c2.lease, 0, "second\n").await.unwrap(),
        LogStored::Stored(7)
    );
    assert_eq!(log().await, "second\n");
    let tail = cp.log_tail(&tid("a"), &s.id, 0).await.unwrap().unwrap();
    assert_eq!((tail.run, tail.logged_run), (2, Some(2)));
    assert!(matches!(
        cp.append_log(&c.lease, 7, "old\n").await,
        Err(CpError::LeaseLost)
    ));
    assert_eq!(log().await, "second\n");
    check_credits(&cp, "a").await;
}

pub(crate) async fn retry_queues_a_failed_job_as_its_next_attempt(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut spec = tenant("a", 1_000_000_000);
    spec.max_queued = 2;
    cp.create_tenant(&spec, "h").await.unwrap();
    let mut one = job("x");
    one.max_attempts = 1;
    one.callback_url = Some("http://hooks.example/done".into());
    let s = cp.submit(&tid("a"), &one).await.unwrap();
    // Not failed yet: refused with its state, nothing changed.
    assert!(matches!(
        cp.retry_job(&tid("a"), &s.id).await,
        Err(CpError::NotFailed(JobState::Queued))
    ));
    let c = claim_one(&cp).await;
    assert!(matches!(
        cp.retry_job(&tid("a"), &s.id).await,
        Err(CpError::NotFailed(JobState::Running))
    ));
    assert_eq!(
        cp.finalize(&c.lease, &failed(ErrorKind::AgentError))
            .await
            .unwrap(),
        Finalized::Failed
    );
    // Its callback is owed; two deliveries fail before the retry.
    let owed = |cp: &agentplane::control::ControlPlane| {
        let cp = cp.clone();
        async move {
            let mut due = Vec::new();
            for shard in 0..shards {
                due.extend(cp.take_hooks(shard, 100, 60_000).await.unwrap());
            }
            due
        }
    };
    let due = owed(&cp).await;
    assert_eq!(due.len(), 1);
    assert!(cp.hook_later(&due[0], 0, 2, true).await.unwrap());
    // Another tenant's job, or none, is not found.
    cp.create_tenant(&tenant("b", 1_000), "h").await.unwrap();
    assert!(matches!(
        cp.retry_job(&tid("b"), &s.id).await,
        Err(CpError::NotFound)
    ));

    // Two retries at once: exactly one wins.
    let a = tid("a");
    let (r1, r2) = tokio::join!(cp.retry_job(&a, &s.id), cp.retry_job(&a, &s.id));
    let wins = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{r1:?} {r2:?}");
    assert!(
        [&r1, &r2]
            .iter()
            .any(|r| matches!(r, Err(CpError::NotFailed(JobState::Queued)))),
        "{r1:?} {r2:?}"
    );
    let j = cp.job(&tid("a"), &s.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.attempts, 0, "counted attempts reset");
    assert!(j.error.is_none() && j.finished_at.is_none(), "{j:?}");
    // A live job is owed no callback: the failed run's is dropped, and its
    // delivery record starts again for the next finish.
    assert!(owed(&cp).await.is_empty(), "no callback for a live job");
    let cb = j.callback.clone().unwrap();
    assert_eq!((cb.state.as_str(), cb.attempts), ("pending", 0), "{cb:?}");
    let t = cp.tenant(&tid("a")).await.unwrap().unwrap();
    assert_eq!(t.queued, 1);
    // Out of the `done` index: retention does not delete a live job.
    let mut r = raw(url).await;
    let done = format!("{}:done", cp.keys().tenant_tag("a"));
    let score: Option<String> = r.q(&cmd(&["ZSCORE", &done, &s.id])).await.unwrap();
    assert_eq!(score, None);

    // Its next claim is its next run, reserved and settled as any.
    let c2 = claim_one(&cp).await;
    assert_eq!(c2.lease.job_id, s.id);
    assert_eq!(c2.attempt, 2);
    assert_eq!(
        cp.finalize(&c2.lease, &ok("again", 10)).await.unwrap(),
        Finalized::Succeeded
    );
    let j = cp.job(&tid("a"), &s.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.output.as_deref()),
        (JobState::Succeeded, 1, Some("again"))
    );
    // The second finish owes its own callback, its delivery counted afresh.
    let due = owed(&cp).await;
    assert_eq!(
        due.iter()
            .map(|h| (h.job.as_str(), h.attempts))
            .collect::<Vec<_>>(),
        [(s.id.as_str(), 0)]
    );
    let ledger = cp.ledger(&tid("a")).await.unwrap();
    let runs: Vec<(String, u32)> = ledger
        .iter()
        .filter(|e| e.job == s.id && e.op == "settle")
        .map(|e| (e.op.clone(), e.attempt))
        .collect();
    assert_eq!(runs, [("settle".into(), 1), ("settle".into(), 2)]);
    check_runs_are_unique(&cp, "a").await;
    check_credits(&cp, "a").await;
    // A succeeded job is not retried.
    assert!(matches!(
        cp.retry_job(&tid("a"), &s.id).await,
        Err(CpError::NotFailed(JobState::Succeeded))
    ));

    // Admitted as SUBMIT admits: refused at max_queued.
    let f = cp.submit(&tid("a"), &one).await.unwrap();
    let c = claim_one(&cp).await;
    cp.finalize(&c.lease, &failed(ErrorKind::Trap))
        .await
        .unwrap();
    cp.submit(&tid("a"), &job("q1")).await.unwrap();
    cp.submit(&tid("a"), &job("q2")).await.unwrap();
    assert!(matches!(
        cp.retry_job(&tid("a"), &f.id).await,
        Err(CpError::QueueFull)
    ));
    let j = cp.job(&tid("a"), &f.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed, "nothing written on a refusal");
    check_credits(&cp, "a").await;
}
