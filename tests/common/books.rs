//! The books of a tenant, read from the control plane: the credit
//! invariants and the ledger checks shared by the control-plane suite and
//! the service-level tests (which connect a `ControlPlane` to their stack's
//! Redis to read the ledger).

use agentplane::control::ControlPlane;
use std::collections::HashMap;

/// balance = granted − settled, 0 ≤ reserved ≤ balance, and the ledger
/// accounts for both, checked after every step.
pub async fn check_credits(cp: &ControlPlane, t: &str) {
    let info = cp.tenant(t).await.unwrap().unwrap();
    assert_eq!(info.credits.balance, info.granted - info.settled);
    assert!(info.credits.reserved >= 0, "{info:?}");
    assert!(info.credits.reserved <= info.credits.balance, "{info:?}");
    let ledger = cp.ledger(t).await.unwrap();
    let sum = |op: &str| -> i64 { ledger.iter().filter(|e| e.op == op).map(|e| e.amount).sum() };
    assert_eq!(sum("grant"), info.granted, "grants in the ledger");
    assert_eq!(sum("settle"), info.settled, "settles in the ledger");
    assert_eq!(
        sum("reserve") - sum("settle") - sum("release"),
        info.credits.reserved,
        "reservations in the ledger"
    );
    for e in ledger.iter().filter(|e| e.op != "grant") {
        assert!(
            !e.job.is_empty() && e.attempt >= 1,
            "{e:?} names job and attempt"
        );
    }
}

/// No two runs of a job share an attempt number in the ledger: at most one
/// reserve per (job, attempt), and every settle/release follows its reserve.
pub async fn check_runs_are_unique(cp: &ControlPlane, t: &str) {
    let ledger = cp.ledger(t).await.unwrap();
    let mut reserves: HashMap<(String, u32), u32> = HashMap::new();
    let mut settles: HashMap<(String, u32), u32> = HashMap::new();
    for e in &ledger {
        let k = (e.job.clone(), e.attempt);
        match e.op.as_str() {
            "reserve" => *reserves.entry(k).or_default() += 1,
            "settle" => {
                assert!(reserves.contains_key(&k), "{e:?} settles no reserve");
                *settles.entry(k).or_default() += 1;
            }
            "release" => assert!(reserves.contains_key(&k), "{e:?} releases no reserve"),
            _ => {}
        }
    }
    for (k, n) in reserves.iter().chain(settles.iter()) {
        assert_eq!(*n, 1, "{k:?} names {n} runs in the ledger: {ledger:?}");
    }
}
