//! Warm instances (`HostConfig::warm_instances`) against real components:
//! the `tally` guest counts its runs in a global, so `runs=1` is a fresh
//! instance and `runs=N` the N-th run of a reused one. Reuse stays within
//! one tenant and component, every limit holds on a reused instance, an
//! unclean end drops it, and nothing of one run's log reaches the next.

mod common;

use agentplane::host::{Host, HostConfig, LoadedComponent, RunOutcome, RunReport};
use agentplane::model::{ErrorKind, Limits};
use common::host::{limits, load, request};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A small pool (tests run in parallel, each with its own host), warm
/// instances on.
fn warm_cfg(n: usize) -> HostConfig {
    HostConfig {
        max_instances: 16,
        max_memory_per_instance: 128 * MIB,
        tenant_memory_budget: 1 << 30,
        warm_instances: n,
        ..HostConfig::default()
    }
}

async fn run(host: &Host, tenant: &str, c: &Arc<LoadedComponent>, input: &str) -> RunReport {
    host.run(request(tenant, c, input, limits())).await
}

/// The run succeeded as the `n`-th run of its instance.
fn nth(r: &RunReport, n: u64) {
    assert_eq!(
        r.outcome,
        RunOutcome::Ok(format!("runs={n}")),
        "log:\n{}",
        r.log
    );
}

fn failed(r: &RunReport) -> ErrorKind {
    match &r.outcome {
        RunOutcome::Failed { kind, .. } => *kind,
        other => panic!("expected a failure, got {other:?}; log:\n{}", r.log),
    }
}

#[tokio::test]
async fn a_tenants_next_job_reuses_the_instance_with_a_log_of_its_own() {
    let host = Host::new(warm_cfg(4)).unwrap();
    let tally = load(&host, "tally").await;
    let first = run(&host, "t1", &tally, "log:first-run-line").await;
    nth(&first, 1);
    assert!(first.log.contains("[info] first-run-line"), "{}", first.log);
    assert!(
        first.log.contains("[stdout] first-run-line"),
        "{}",
        first.log
    );
    assert_eq!((host.warm_reuses(), host.warm_idle()), (0, 1));

    let second = run(&host, "t1", &tally, "log:second-run-line").await;
    nth(&second, 2);
    assert_eq!(host.warm_reuses(), 1);
    assert!(
        second.log.contains("[info] second-run-line"),
        "{}",
        second.log
    );
    assert!(
        second.log.contains("[stdout] second-run-line"),
        "{}",
        second.log
    );
    assert!(
        !second.log.contains("first-run-line"),
        "run 1's log and stdout never reach run 2:\n{}",
        second.log
    );
    // An agent error is a clean end: the instance stays warm.
    let r = run(&host, "t1", &tally, "fail").await;
    assert_eq!(failed(&r), ErrorKind::AgentError);
    nth(&run(&host, "t1", &tally, "").await, 4);
}

#[tokio::test]
async fn a_warm_instance_never_serves_another_tenant() {
    let host = Host::new(warm_cfg(4)).unwrap();
    let tally = load(&host, "tally").await;
    nth(&run(&host, "t1", &tally, "").await, 1);
    nth(&run(&host, "t2", &tally, "").await, 1);
    nth(&run(&host, "t1", &tally, "").await, 2);
    nth(&run(&host, "t2", &tally, "").await, 2);
    // Another component of the same tenant never gets it either.
    let echo = load(&host, "echo").await;
    let r = run(&host, "t1", &echo, "hi").await;
    assert_eq!(r.outcome, RunOutcome::Ok("hi".into()));
    nth(&run(&host, "t1", &tally, "").await, 3);
    // Nor a job of the tenant under another memory limit.
    let lower = Limits {
        memory_bytes: 32 * MIB,
        ..limits()
    };
    nth(&host.run(request("t1", &tally, "", lower)).await, 1);
}

#[tokio::test]
async fn agent_state_comes_from_the_job_not_the_instance() {
    let host = Host::new(warm_cfg(4)).unwrap();
    let counter = load(&host, "counter").await;
    let r = run(&host, "t1", &counter, "").await;
    assert_eq!(r.outcome, RunOutcome::Ok("1".into()));
    assert_eq!(r.new_state.as_deref(), Some(&b"1"[..]));
    let mut req = request("t1", &counter, "", limits());
    req.state = Some(b"41".to_vec());
    let r = host.run(req).await;
    assert_eq!(r.outcome, RunOutcome::Ok("42".into()));
    assert_eq!(host.warm_reuses(), 1);
    // A reused run given no state sees none.
    let r = run(&host, "t1", &counter, "").await;
    assert_eq!(r.outcome, RunOutcome::Ok("1".into()));
}

#[tokio::test]
async fn a_trap_a_limit_a_timeout_or_a_cancel_drops_the_instance() {
    let host = Host::new(warm_cfg(4)).unwrap();
    let tally = load(&host, "tally").await;

    nth(&run(&host, "t1", &tally, "").await, 1);
    let r = run(&host, "t1", &tally, "trap").await;
    assert_eq!(failed(&r), ErrorKind::Trap);
    assert_eq!(host.warm_idle(), 0);
    nth(&run(&host, "t1", &tally, "").await, 1);

    // Fuel: the reused run gets its own job's fuel, all of it, no more.
    let reuses = host.warm_reuses();
    let fuel = Limits {
        fuel: 20_000_000,
        ..limits()
    };
    let r = host.run(request("t1", &tally, "spin", fuel)).await;
    assert_eq!(failed(&r), ErrorKind::FuelExhausted, "{}", r.log);
    assert_eq!(r.fuel_used, fuel.fuel, "the limit of this job, all used");
    assert_eq!(host.warm_reuses(), reuses + 1, "it ran on the warm one");
    nth(&run(&host, "t1", &tally, "").await, 1);

    // The wall clock of this job, on a reused instance.
    let short = Limits {
        timeout_ms: 300,
        ..limits()
    };
    let t0 = Instant::now();
    let r = host.run(request("t1", &tally, "spin", short)).await;
    assert_eq!(failed(&r), ErrorKind::Timeout, "{}", r.log);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(host.warm_reuses(), reuses + 2);
    nth(&run(&host, "t1", &tally, "").await, 1);

    // Cancelled mid-run.
    let req = request("t1", &tally, "spin", limits());
    let cancel = req.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
    });
    assert_eq!(host.run(req).await.outcome, RunOutcome::Interrupted);
    assert_eq!(host.warm_reuses(), reuses + 3);
    nth(&run(&host, "t1", &tally, "").await, 1);
}

#[tokio::test]
async fn the_memory_limit_holds_across_runs_of_a_reused_instance() {
    let host = Host::new(warm_cfg(4)).unwrap();
    let tally = load(&host, "tally").await;
    nth(&run(&host, "t1", &tally, "grow:40").await, 1);
    assert!(host.tenant_memory_in_use("t1") >= 40 * MIB);
    // The instance still holds the first run's 40 MiB: 40 more pass the
    // job's 64 MiB.
    let r = run(&host, "t1", &tally, "grow:40").await;
    assert_eq!(failed(&r), ErrorKind::MemoryLimit, "{}", r.log);
    assert_eq!(host.warm_reuses(), 1);
    assert_eq!((host.warm_idle(), host.tenant_memory_in_use("t1")), (0, 0));
    nth(&run(&host, "t1", &tally, "grow:40").await, 1);
}

#[tokio::test]
async fn idle_instances_count_against_their_tenant_and_give_way_to_its_jobs() {
    let host = Host::new(HostConfig {
        tenant_memory_budget: 100 * MIB,
        ..warm_cfg(4)
    })
    .unwrap();
    let tally = load(&host, "tally").await;
    let big = |mib| Limits {
        memory_bytes: mib * MIB,
        ..limits()
    };
    nth(
        &host.run(request("t1", &tally, "grow:60", big(96))).await,
        1,
    );
    let held = host.tenant_memory_in_use("t1");
    assert!(held >= 60 * MIB, "the idle instance still counts: {held}");
    // Another key of the same tenant needing 60 MiB fits only once the
    // idle instance is gone: it is dropped, the job runs.
    nth(
        &host.run(request("t1", &tally, "grow:60", big(80))).await,
        1,
    );
    assert_eq!(host.warm_idle(), 1, "the first one made way for the second");
    nth(&host.run(request("t1", &tally, "", big(80))).await, 2);
    nth(&host.run(request("t1", &tally, "", big(96))).await, 1);
}

#[tokio::test]
async fn the_pool_is_bounded_and_least_recently_used_go_first() {
    let host = Host::new(warm_cfg(2)).unwrap();
    let tally = load(&host, "tally").await;
    for t in ["t1", "t2", "t3"] {
        nth(&run(&host, t, &tally, "").await, 1);
    }
    assert_eq!(host.warm_idle(), 2);
    nth(&run(&host, "t3", &tally, "").await, 2);
    nth(&run(&host, "t2", &tally, "").await, 2);
    nth(&run(&host, "t1", &tally, "").await, 1);
}

#[tokio::test]
async fn idle_instances_never_take_the_slot_a_fresh_job_needs() {
    let host = Host::new(HostConfig {
        max_instances: 2,
        ..warm_cfg(4)
    })
    .unwrap();
    let tally = load(&host, "tally").await;
    nth(&run(&host, "t1", &tally, "").await, 1);
    nth(&run(&host, "t2", &tally, "").await, 1);
    // Both pool slots are held by idle instances: the oldest makes way.
    nth(&run(&host, "t3", &tally, "").await, 1);
    nth(&run(&host, "t2", &tally, "").await, 2);
}

#[tokio::test]
async fn idle_instances_expire_and_give_their_memory_back() {
    let host = Host::new(HostConfig {
        warm_idle_ttl: Duration::from_millis(200),
        ..warm_cfg(4)
    })
    .unwrap();
    let tally = load(&host, "tally").await;
    nth(&run(&host, "t1", &tally, "grow:8").await, 1);
    assert!(host.tenant_memory_in_use("t1") >= 8 * MIB);
    let t0 = Instant::now();
    while host.warm_idle() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(host.tenant_memory_in_use("t1"), 0);
    nth(&run(&host, "t1", &tally, "").await, 1);
}

#[tokio::test]
async fn without_warm_instances_every_job_runs_on_a_fresh_one() {
    let host = Host::new(warm_cfg(0)).unwrap();
    let tally = load(&host, "tally").await;
    nth(&run(&host, "t1", &tally, "grow:8").await, 1);
    nth(&run(&host, "t1", &tally, "").await, 1);
    assert_eq!((host.warm_reuses(), host.warm_idle()), (0, 0));
    assert_eq!(host.tenant_memory_in_use("t1"), 0);
}
