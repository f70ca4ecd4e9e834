//! The books of a tenant, read from the control plane: the credit
//! invariants and the ledger checks shared by the control-plane suite and
//! the service-level tests (which connect a `ControlPlane` to their stack's
//! Redis to read the ledger).

use crate::common::fixtures::tid;
use agentplane::control::ControlPlane;
use std::collections::HashMap;

/// balance = granted − settled, 0 ≤ reserved ≤ balance, and the ledger
/// accounts for both, checked after every step.
pub async fn check_credits(cp: &ControlPlane, t: &str) {
    let t = &tid(t);
    let info = cp.tenant(t).await.unwrap().unwrap();
    assert_eq!(info.credits.balance, info.granted - info.settled);
    assert!(info.credits.reserved >= 0, "{info:?}");
    assert!(info.credits.reserved <= info.credits.balance, "{info:?}");
    let ledger = cp.ledger(t).await.unwrap();
    let sum = |op: &str| -> i64 { ledger.iter().filter(|e| e.op == op).map(|e| e.amount).sum() };
    let released: i64 = ledger.iter().map(|e| e.released).sum();
    assert!(
        ledger.iter().all(|e| e.released == 0 || e.op == "settle"),
        "only a settle releases with it: {ledger:?}"
    );
    assert_eq!(sum("grant"), info.granted, "grants in the ledger");
    assert_eq!(sum("settle"), info.settled, "settles in the ledger");
    assert_eq!(
        sum("reserve") - sum("settle") - released - sum("release"),
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
/// A run is ended by one entry: a settle (carrying what it released) or a
/// release, never both, never twice.
pub async fn check_runs_are_unique(cp: &ControlPlane, t: &str) {
    let t = &tid(t);
    let ledger = cp.ledger(t).await.unwrap();
    let mut reserves: HashMap<(String, u32), u32> = HashMap::new();
    let mut ends: HashMap<(String, u32), u32> = HashMap::new();
    for e in &ledger {
        let k = (e.job.clone(), e.attempt);
        match e.op.as_str() {
            "reserve" => *reserves.entry(k).or_default() += 1,
            "settle" | "release" => {
                assert!(reserves.contains_key(&k), "{e:?} ends no reserve");
                *ends.entry(k).or_default() += 1;
            }
            _ => {}
        }
    }
    for (k, n) in reserves.iter().chain(ends.iter()) {
        assert_eq!(*n, 1, "{k:?} names {n} runs in the ledger: {ledger:?}");
    }
}

/// "Charged once", from the ledger alone. Not from the jobs' own
/// `usage.credits`: FINALIZE raises it in the same script as the tenant's
/// `settled`, so a double FINALIZE would still balance against it.
///
/// Each of `jobs` has exactly one `settle` entry, and it names the job's
/// last run (the one that ran to the end; runs lost to a dead or stopped
/// worker have a `reserve` and a `release`, never a `settle`). All the
/// tenant's settles add up to granted − balance. Answers each job's settled
/// amount, in the order of `jobs`.
pub async fn assert_charged_once(cp: &ControlPlane, tenant: &str, jobs: &[String]) -> Vec<i64> {
    let tenant = &tid(tenant);
    let ledger = cp.ledger(tenant).await.expect("read the ledger");
    let info = cp
        .tenant(tenant)
        .await
        .expect("read the tenant")
        .expect("the tenant exists");
    let mut amounts = Vec::with_capacity(jobs.len());
    for job in jobs {
        let settles: Vec<_> = ledger
            .iter()
            .filter(|e| e.op == "settle" && &e.job == job)
            .collect();
        assert_eq!(
            settles.len(),
            1,
            "job {job} settled {} times: {ledger:?}",
            settles.len()
        );
        let last_run = ledger
            .iter()
            .filter(|e| e.op == "reserve" && &e.job == job)
            .map(|e| e.attempt)
            .max();
        assert_eq!(
            Some(settles[0].attempt),
            last_run,
            "job {job}: the settle is not its last run's: {ledger:?}"
        );
        amounts.push(settles[0].amount);
    }
    let settled: i64 = ledger
        .iter()
        .filter(|e| e.op == "settle")
        .map(|e| e.amount)
        .sum();
    assert_eq!(
        settled,
        info.granted - info.credits.balance,
        "the ledger's settles are not what the tenant paid: {info:?}"
    );
    amounts
}

/// A control plane on a standalone stack's Redis, to read its books.
pub async fn reader(url: &str) -> ControlPlane {
    ControlPlane::connect(url, agentplane::control::ControlConfig::default())
        .await
        .expect("connect a ledger reader")
}

/// `tenant`'s ledger, read from the Redis at `url`.
pub async fn ledger(url: &str, tenant: &str) -> Vec<agentplane::control::LedgerEntry> {
    reader(url).await.ledger(&tid(tenant)).await.unwrap()
}

/// The amounts of `job`'s ledger entries of kind `op` (`reserve`,
/// `settle`, ...), in order.
pub fn amounts(l: &[agentplane::control::LedgerEntry], job: &str, op: &str) -> Vec<i64> {
    l.iter()
        .filter(|e| e.job == job && e.op == op)
        .map(|e| e.amount)
        .collect()
}
