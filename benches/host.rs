//! Host benchmarks: instantiate-and-run per job (pooling vs on-demand, and
//! a warm instance reused), fuel
//! metering's cost on a CPU-bound agent, and loading a precompiled component
//! from the disk cache vs compiling it.
//!
//! `cargo bench --bench host -- --warm-up-time 1 --measurement-time 3`

// The tests' guest builder: one way to build `guest-examples/`.
#[path = "../tests/common/guests.rs"]
#[allow(dead_code)]
mod guests;

use agentplane::host::{Host, HostConfig, LoadedComponent, RunOutcome, RunRequest};
use agentplane::model::Limits;
use criterion::{Criterion, criterion_group, criterion_main};
use std::path::Path;
use std::sync::Arc;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

fn host(pooling: bool, fuel: bool, cache_dir: Option<&Path>) -> Host {
    warm_host(pooling, fuel, cache_dir, 0)
}

fn warm_host(pooling: bool, fuel: bool, cache_dir: Option<&Path>, warm_instances: usize) -> Host {
    Host::new(HostConfig {
        max_instances: 64,
        pooling,
        fuel,
        cache_dir: cache_dir.map(Path::to_path_buf),
        warm_instances,
        ..HostConfig::default()
    })
    .unwrap()
}

fn load(rt: &Runtime, host: &Host, bytes: &[u8]) -> Arc<LoadedComponent> {
    let digest = host.admit(bytes).unwrap().digest;
    let bytes = bytes.to_vec();
    rt.block_on(host.component(&digest, || async move { Ok(Some(bytes)) }))
        .unwrap()
}

fn request(c: &Arc<LoadedComponent>, input: &str) -> RunRequest {
    RunRequest {
        tenant: "bench".parse().unwrap(),
        job_id: "j".into(),
        component: c.clone(),
        input: input.into(),
        limits: Limits {
            fuel: u64::MAX / 2,
            memory_bytes: 64 << 20,
            timeout_ms: 60_000,
        },
        contexts: Vec::new(),
        state: None,
        cancel: CancellationToken::new(),
        egress: Default::default(),
        config: Vec::new(),
        inference: Default::default(),
    }
}

fn run_ok(rt: &Runtime, host: &Host, c: &Arc<LoadedComponent>, input: &str) {
    let r = rt.block_on(host.run(request(c, input)));
    assert!(matches!(r.outcome, RunOutcome::Ok(_)), "{:?}", r.outcome);
}

fn per_job(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let echo = guests::guest_bytes("echo");
    let mut g = c.benchmark_group("echo_per_job");
    // `warm`: the same tenant's next job on the instance the last one left
    // (`--warm-instances`), every limit still set per run.
    for (name, pooling, warm) in [
        ("pooling", true, 0),
        ("on_demand", false, 0),
        ("warm", true, 1),
    ] {
        let h = warm_host(pooling, true, None, warm);
        let comp = load(&rt, &h, &echo);
        g.bench_function(name, |b| b.iter(|| run_ok(&rt, &h, &comp, "hello")));
    }
    g.finish();
}

fn fuel(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let compute = guests::guest_bytes("compute");
    let mut g = c.benchmark_group("compute_100k_rounds");
    for (name, fuel) in [("fuel_on", true), ("fuel_off", false)] {
        let h = host(true, fuel, None);
        let comp = load(&rt, &h, &compute);
        g.bench_function(name, |b| b.iter(|| run_ok(&rt, &h, &comp, "100000")));
    }
    g.finish();
}

fn disk_cache(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let bytes = guests::guest_bytes("rag-qa");
    let dir = tempfile::tempdir().unwrap();
    let digest = host(true, true, None).admit(&bytes).unwrap().digest;
    // Fill the disk cache once.
    load(&rt, &host(true, true, Some(dir.path())), &bytes);
    let mut g = c.benchmark_group("component_load_rag_qa");
    g.sample_size(10);
    g.bench_function("compile", |b| {
        b.iter(|| {
            let h = host(false, true, None);
            let bytes = bytes.clone();
            rt.block_on(h.component(&digest, || async move { Ok(Some(bytes)) }))
                .unwrap();
            assert_eq!(h.compile_count(), 1);
        })
    });
    g.bench_function("disk_cache", |b| {
        b.iter(|| {
            let h = host(false, true, Some(dir.path()));
            rt.block_on(h.component(&digest, || async { Ok(None) }))
                .unwrap();
            assert_eq!(h.compile_count(), 0);
        })
    });
    g.finish();
}

criterion_group!(benches, per_job, fuel, disk_cache);
criterion_main!(benches);
