//! A thousand failing jobs in a row leave the host as they found it: the
//! next job runs correctly and resident memory is back near the start. Its
//! own test binary, so no other test's memory pollutes the measurement.

mod common;

use agentplane::host::{Host, HostConfig, LoadedComponent, RunOutcome, RunRequest};
use agentplane::model::{ErrorKind, Limits};
use common::host::{load, rss_bytes};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

fn request(c: &Arc<LoadedComponent>, limits: Limits) -> RunRequest {
    RunRequest {
        tenant: "soak".parse().unwrap(),
        job_id: "j".into(),
        component: c.clone(),
        input: "x".into(),
        limits,
        contexts: Vec::new(),
        state: None,
        cancel: CancellationToken::new(),
        egress: Default::default(),
        config: Vec::new(),
        inference: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_failures_leave_no_residue() {
    let host = Arc::new(
        Host::new(HostConfig {
            max_instances: 16,
            max_memory_per_instance: 64 * MIB,
            tenant_memory_budget: 512 * MIB,
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let small = Limits {
        fuel: 2_000_000,
        memory_bytes: 16 * MIB,
        timeout_ms: 10_000,
    };
    // Filling 16 MiB byte by byte takes more than the runaway's fuel.
    let hog_limits = Limits {
        fuel: 1_000_000_000,
        ..small
    };
    let guests = [
        (
            load(&host, "runaway").await,
            small,
            ErrorKind::FuelExhausted,
        ),
        (load(&host, "hog").await, hog_limits, ErrorKind::MemoryLimit),
        (load(&host, "trap").await, small, ErrorKind::Trap),
    ];
    let echo = load(&host, "echo").await;
    // Warm up: the first runs map pool slots and code pages once.
    for (c, limits, _) in &guests {
        host.run(request(c, *limits)).await;
    }
    let before = rss_bytes();
    let guests = Arc::new(guests);
    // Four at a time, like a worker with four slots.
    let mut tasks = Vec::new();
    for lane in 0..4 {
        let (host, guests) = (host.clone(), guests.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                let (c, limits, kind) = &guests[(lane + i) % 3];
                let r = host.run(request(c, *limits)).await;
                match r.outcome {
                    RunOutcome::Failed { kind: k, .. } if k == *kind => {}
                    other => panic!("job {i}: expected {kind}, got {other:?}\n{}", r.log),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = host.run(request(&echo, small)).await;
    assert_eq!(r.outcome, RunOutcome::Ok("x".into()));
    assert_eq!(host.tenant_memory_in_use("soak"), 0);
    let after = rss_bytes();
    let growth = after.saturating_sub(before);
    eprintln!("rss before {} MiB, after {} MiB", before / MIB, after / MIB);
    assert!(
        growth < 100 * MIB,
        "RSS grew by {} MiB over 1000 failing jobs",
        growth / MIB
    );
}
