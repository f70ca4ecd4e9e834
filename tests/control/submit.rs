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
