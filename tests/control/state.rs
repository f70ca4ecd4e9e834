//! Agent state: versioned commits, the blob tier, a missing blob.

use crate::common::books::check_credits;
use crate::common::fixtures::tid;
use crate::support::*;
use agentplane::control::{Finalized, Finish, SubmitSpec};
use agentplane::model::{ErrorKind, JobState};

pub(crate) async fn agent_state_commits_only_on_current_version(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    cp.create_tenant(&tenant("s", 1_000_000), "h")
        .await
        .unwrap();
    let with_agent = |input: &str| SubmitSpec {
        agent_id: Some("bot".into()),
        ..job(input)
    };
    let a = cp.submit(&tid("s"), &with_agent("a")).await.unwrap();
    let b = cp.submit(&tid("s"), &with_agent("b")).await.unwrap();
    let ca = claim_one(&cp).await;
    let cb = claim_one(&cp).await;
    assert_eq!((ca.state.clone(), cb.state.clone()), (None, None));
    let set = |s: &[u8]| Finish {
        new_state: Some(s.to_vec()),
        ..ok("", 5)
    };
    assert_eq!(
        cp.finalize(&ca.lease, &set(b"1")).await.unwrap(),
        Finalized::Succeeded
    );
    // b read version 0, a committed version 1 since: b must run again.
    assert_eq!(
        cp.finalize(&cb.lease, &set(b"1")).await.unwrap(),
        Finalized::StateConflict
    );
    assert_eq!(
        cp.job(&tid("s"), &b.id).await.unwrap().unwrap().state,
        JobState::Queued
    );
    let cb2 = claim_one(&cp).await;
    assert_eq!(cb2.lease.job_id, b.id);
    assert_eq!(cb2.state.as_deref(), Some(&b"1"[..]));
    assert_eq!(cb2.attempt, 2, "a new run number for the rerun");
    assert_eq!(
        cp.job(&tid("s"), &b.id).await.unwrap().unwrap().attempts,
        1,
        "a conflict does not use up an attempt"
    );
    // A large state goes to the blob tier and comes back whole.
    let big = vec![7u8; 200_000];
    assert_eq!(
        cp.finalize(&cb2.lease, &set(&big)).await.unwrap(),
        Finalized::Succeeded
    );
    cp.submit(&tid("s"), &with_agent("c")).await.unwrap();
    let cc = claim_one(&cp).await;
    assert_eq!(cc.state.as_deref(), Some(&big[..]));
    assert_eq!(cc.state_version, 2);
    // A failed job commits nothing.
    let f = Finish {
        new_state: Some(b"nope".to_vec()),
        ..failed(ErrorKind::FuelExhausted)
    };
    cp.finalize(&cc.lease, &f).await.unwrap();
    cp.submit(&tid("s"), &with_agent("d")).await.unwrap();
    assert_eq!(claim_one(&cp).await.state.as_deref(), Some(&big[..]));
    assert_eq!(
        cp.job(&tid("s"), &a.id).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
}

pub(crate) async fn large_agent_states_never_delete_themselves(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    for t in ["sa", "sb"] {
        cp.create_tenant(&tenant(t, 1_000_000), "h").await.unwrap();
    }
    let big = vec![9u8; 100_000];
    // An agent that writes its large state back unchanged keeps it.
    for round in 0..3 {
        cp.submit(&tid("sa"), &with_agent("x")).await.unwrap();
        let c = claim_one(&cp).await;
        let want = (round > 0).then(|| big.clone());
        assert_eq!(c.state, want, "round {round}");
        assert_eq!(
            cp.finalize(&c.lease, &set_state(&big)).await.unwrap(),
            Finalized::Succeeded
        );
    }
    // Another tenant whose state happens to be identical...
    cp.submit(&tid("sb"), &with_agent("x")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.state, None);
    cp.finalize(&c.lease, &set_state(&big)).await.unwrap();
    // ...is untouched when the first tenant's agent moves on.
    let big2 = vec![3u8; 90_000];
    cp.submit(&tid("sa"), &with_agent("y")).await.unwrap();
    let c = claim_one(&cp).await;
    cp.finalize(&c.lease, &set_state(&big2)).await.unwrap();
    cp.submit(&tid("sb"), &with_agent("z")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.lease.tenant, "sb");
    assert_eq!(c.state.as_deref(), Some(&big[..]), "sb's state survived");
    cp.finalize(&c.lease, &ok("", 1)).await.unwrap();
    cp.submit(&tid("sa"), &with_agent("w")).await.unwrap();
    let c = claim_one(&cp).await;
    assert_eq!(c.state.as_deref(), Some(&big2[..]));
    // A claim that read the old version keeps its bytes while a newer
    // version commits (the read is atomic with the pointer).
    cp.submit(&tid("sa"), &with_agent("v")).await.unwrap();
    let old_reader = claim_one(&cp).await;
    assert_eq!(
        cp.finalize(&c.lease, &set_state(&big)).await.unwrap(),
        Finalized::Succeeded
    );
    assert_eq!(old_reader.state.as_deref(), Some(&big2[..]));
    assert_eq!(
        cp.finalize(&old_reader.lease, &set_state(&big2))
            .await
            .unwrap(),
        Finalized::StateConflict
    );
    let again = claim_one(&cp).await;
    assert_eq!(again.state.as_deref(), Some(&big[..]));
    // Back to the small tier: the next claim sees the inline state.
    cp.finalize(&again.lease, &set_state(b"small"))
        .await
        .unwrap();
    cp.submit(&tid("sa"), &with_agent("u")).await.unwrap();
    assert_eq!(claim_one(&cp).await.state.as_deref(), Some(&b"small"[..]));
}

/// A job whose agent state blob is gone fails alone: the healthy jobs of
/// its CLAIM batch run, none is left leased to no one.
pub(crate) async fn missing_state_blob_fails_its_job_alone(url: &str, shards: u32) {
    let cp = connect(url, cfg(shards)).await;
    let mut r = raw(url).await;
    cp.create_tenant(&tenant("s", 1_000_000), "h")
        .await
        .unwrap();
    let with_agent = |input: &str| SubmitSpec {
        agent_id: Some("bot".into()),
        max_attempts: 1,
        ..job(input)
    };
    cp.submit(&tid("s"), &with_agent("first")).await.unwrap();
    let c = claim_one(&cp).await;
    let big = vec![7u8; 200_000];
    let commit = Finish {
        new_state: Some(big),
        ..ok("", 5)
    };
    assert_eq!(
        cp.finalize(&c.lease, &commit).await.unwrap(),
        Finalized::Succeeded
    );
    let version: String = r
        .q(&cmd(&["HGET", &cp.keys().agent("s", "bot"), "blob"]))
        .await
        .unwrap();
    assert!(!version.is_empty(), "a 200 KB state lives in the blob tier");
    let blob = cp
        .keys()
        .agent_state_blob("s", "bot", version.parse().unwrap());
    let n: u32 = r.q(&cmd(&["DEL", &blob])).await.unwrap();
    assert_eq!(n, 1);

    let h1 = cp.submit(&tid("s"), &job("h1")).await.unwrap();
    let bad = cp.submit(&tid("s"), &with_agent("bad")).await.unwrap();
    let h2 = cp.submit(&tid("s"), &job("h2")).await.unwrap();
    let got = cp
        .claim("w1", 3, 0)
        .await
        .expect("one bad job must not fail the batch");
    let ids: Vec<&str> = got.iter().map(|c| c.lease.job_id.as_str()).collect();
    assert_eq!(ids, [h1.id.as_str(), h2.id.as_str()]);
    let j = cp.job(&tid("s"), &bad.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let e = j.error.unwrap();
    assert_eq!(e.kind, ErrorKind::AgentError);
    assert!(e.message.contains("missing"), "{}", e.message);
    assert_eq!(j.usage.credits, 0, "an attempt that never ran is free");
    let info = cp.tenant(&tid("s")).await.unwrap().unwrap();
    assert_eq!(info.running, 2, "only the jobs handed out hold a lease");
    for c in &got {
        cp.finalize(&c.lease, &ok("", 5)).await.unwrap();
    }
    assert_eq!(
        cp.queue_group(&tid("s")).await.unwrap().1,
        0,
        "no stray PEL entry"
    );
    check_credits(&cp, "s").await;
}
