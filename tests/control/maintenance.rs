//! Maintenance: PROMOTE and REAP, racing and past a failing shard.

use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{ControlConfig, CpError};
use agentplane::model::JobState;
use std::time::Duration;

pub(crate) async fn racing_schedulers_promote_once(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut ids = Vec::new();
    let t0 = std::time::Instant::now();
    for t in ["r1", "r2", "r3", "r4"] {
        cp.create_tenant(&tenant(t, 1_000_000), "h").await.unwrap();
        for _ in 0..50 {
            let mut j = job("d");
            j.delay_ms = 300;
            let s = cp.submit(&tid(t), &j).await.unwrap();
            assert_eq!(s.state, JobState::Delayed);
            ids.push(s.id);
        }
    }
    // (On a loaded machine the submissions may outlast the delay: then
    // the first jobs are due already and this check says nothing.)
    if t0.elapsed() < Duration::from_millis(250) {
        assert_eq!(cp.promote(1000).await.unwrap(), 0, "nothing due yet");
    }
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

/// A shard whose scripts fail (here: a key of the wrong type) stops neither
/// CLAIM nor PROMOTE nor REAP on the other shards.
pub(crate) async fn claims_and_maintenance_go_on_past_a_failing_shard(url: &str, shards: u32) {
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
    cp.submit(&tid(&a), &job("stuck")).await.unwrap();
    let mut mine = Vec::new();
    for i in 0..8 {
        mine.push(
            cp.submit(&tid(&b), &job(&format!("b{i}")))
                .await
                .unwrap()
                .id,
        );
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
    // Straight back in their queue on the good shard (no backoff: their
    // worker died, they did not fail).
    for id in &mine {
        let j = cp.job(&tid(&b), id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Queued, "{j:?}");
    }
    assert_eq!(cp.tenant(&tid(&b)).await.unwrap().unwrap().queued, 8);
}

/// The scripts live in Redis as a function library. A node that lost it
/// (a Redis restarted without persistence, `FUNCTION FLUSH`, a node added
/// to a cluster) gets it back on the first call that misses it: that call
/// and every later one run as if nothing happened.
pub(crate) async fn a_node_without_the_scripts_gets_them_back(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("fl", 1_000_000), "h")
        .await
        .unwrap();
    let first = cp.submit(&tid("fl"), &job("a")).await.unwrap();
    let mut raw = raw(url).await;
    let libs = |v: redis::Value| format!("{v:?}").matches("agentplane_").count();
    let listed: redis::Value = raw.q(&cmd(&["FUNCTION", "LIST"])).await.unwrap();
    assert!(libs(listed) >= 1, "the library is loaded");
    let _: () = raw.q(&cmd(&["FUNCTION", "FLUSH"])).await.unwrap();
    let listed: redis::Value = raw.q(&cmd(&["FUNCTION", "LIST"])).await.unwrap();
    assert_eq!(libs(listed), 0, "flushed");

    let second = cp.submit(&tid("fl"), &job("b")).await.unwrap();
    assert_eq!(second.state, JobState::Queued);
    let mut claimed: Vec<String> = Vec::new();
    for _ in 0..10 {
        for c in cp.claim("w", 10, 0).await.unwrap() {
            claimed.push(c.lease.job_id.clone());
        }
        if claimed.len() == 2 {
            break;
        }
    }
    claimed.sort();
    let mut want = vec![first.id, second.id];
    want.sort();
    assert_eq!(claimed, want, "both jobs, each once");
    let listed: redis::Value = raw.q(&cmd(&["FUNCTION", "LIST"])).await.unwrap();
    assert!(libs(listed) >= 1, "loaded again");
}
