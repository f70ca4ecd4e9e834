//! SUBMIT: idempotency keys, argument checks that write nothing, and the
//! wake-up signal a submission sends to idle workers.

use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{ControlConfig, CpError, TenantPatch};
use std::time::Duration;

pub(crate) async fn idempotency_keys(url: &str, shards: u32) {
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
    let first = cp.submit(&tid("i"), &j).await.unwrap();
    assert!(first.created);
    let again = cp.submit(&tid("i"), &j).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.id, first.id);
    let mut other = j.clone();
    other.idempotency = Some(("key-1".into(), "bodyhash-B".into()));
    assert!(matches!(
        cp.submit(&tid("i"), &other).await,
        Err(CpError::IdempotencyConflict)
    ));
    // Keys are per tenant.
    cp.create_tenant(&tenant("i2", 1_000_000), "h")
        .await
        .unwrap();
    assert!(cp.submit(&tid("i2"), &j).await.unwrap().created);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = cp.submit(&tid("i"), &j).await.unwrap();
    assert!(later.created);
    assert_ne!(later.id, first.id);
}

pub(crate) async fn malformed_arguments_write_nothing(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("m", 100), "h").await.unwrap();
    assert!(matches!(
        cp.create_tenant(&tenant("m", 100), "h").await,
        Err(CpError::TenantExists)
    ));
    // A malformed id cannot even be put to the control plane: it takes a
    // `TenantId`, which only a valid id parses into.
    assert!(agentplane::model::TenantId::parse("Bad:Id").is_err());
    let before = cp.tenant(&tid("m")).await.unwrap().unwrap();
    let mut j = job("x");
    j.max_attempts = 0;
    assert!(matches!(
        cp.submit(&tid("m"), &j).await,
        Err(CpError::Invalid(_))
    ));
    assert!(matches!(
        cp.submit(&tid("nobody"), &job("x")).await,
        Err(CpError::NotFound)
    ));
    assert!(matches!(
        cp.update_tenant(
            &tid("m"),
            &TenantPatch {
                weight: Some(0),
                ..TenantPatch::default()
            }
        )
        .await,
        Err(CpError::Invalid(_))
    ));
    assert!(matches!(
        cp.grant_credits(&tid("m"), -101).await,
        Err(CpError::InsufficientCredits)
    ));
    assert_eq!(cp.tenant(&tid("m")).await.unwrap().unwrap(), before);
    assert_eq!(cp.grant_credits(&tid("m"), -40).await.unwrap(), 60);
    let (jobs, _) = cp.list_jobs(&tid("m"), None, 10, None).await.unwrap();
    assert!(jobs.is_empty());
}

pub(crate) async fn wake_up_signals_survive_an_abandoned_wait(url: &str, _shards: u32) {
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
    let c = cp.submit(&tid("wk"), &job("a")).await.unwrap();
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
    cp.submit(&tid("wk"), &job("b")).await.unwrap();
    let t0 = std::time::Instant::now();
    cp.wait_for_work(Duration::from_secs(5)).await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the signal was lost: waited {:?}",
        t0.elapsed()
    );
}

/// A batch SUBMIT decides each job as if it came alone, in order: a key
/// repeated within the batch finds the first job, a queue that fills up
/// refuses the rest, and every job is answered in its place.
pub(crate) async fn a_batch_submit_decides_each_job_in_order(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut spec = tenant("bs", 1_000_000);
    spec.max_queued = 3;
    cp.create_tenant(&spec, "h").await.unwrap();
    let keyed = |k: &str, h: &str| {
        let mut j = job("k");
        j.idempotency = Some((k.into(), h.into()));
        j
    };
    let batch = vec![
        keyed("a", "hash-1"),
        keyed("a", "hash-1"), // the same key and body: the first job
        keyed("a", "hash-2"), // the same key, another body
        job("plain"),
        job("third"),
        job("over"), // the queue holds 3
    ];
    let got = cp.submit_many(&tid("bs"), &batch).await.unwrap();
    assert_eq!(got.len(), 6);
    let first = got[0].as_ref().unwrap();
    assert!(first.created);
    let again = got[1].as_ref().unwrap();
    assert!(!again.created);
    assert_eq!(again.id, first.id);
    assert!(
        matches!(got[2], Err(CpError::IdempotencyConflict)),
        "{:?}",
        got[2]
    );
    assert!(got[3].as_ref().unwrap().created);
    assert!(got[4].as_ref().unwrap().created);
    assert!(matches!(got[5], Err(CpError::QueueFull)), "{:?}", got[5]);
    let info = cp.tenant(&tid("bs")).await.unwrap().unwrap();
    assert_eq!(info.queued, 3, "three jobs entered the queue");
    // They run in submission order.
    let claimed = cp.claim("w", 10, 0).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|c| c.lease.job_id.as_str()).collect();
    let want: Vec<&str> = [0, 3, 4]
        .iter()
        .map(|&i| got[i].as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(ids, want);
    // A batch for a tenant that does not exist answers each job.
    let none = cp
        .submit_many(&tid("nobody"), &[job("x"), job("y")])
        .await
        .unwrap();
    assert!(
        none.iter().all(|r| matches!(r, Err(CpError::NotFound))),
        "{none:?}"
    );
}
