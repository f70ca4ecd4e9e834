//! Control-plane benchmarks against a real `redis-server` started here.
//!
//! - criterion: one claim + finalize pair (the per-job cost of the control
//!   plane), with 10 tenants × 1,000 queued jobs.
//! - a latency report: CLAIM p50/p99 with a small backlog (10 tenants × 1,000
//!   jobs) against a large one (`AP_BENCH_TENANTS` × `AP_BENCH_JOBS`,
//!   default 1,000 × 1,000,000), beside `redis-benchmark`'s EVALSHA rate for
//!   a no-op script measured in the same run (the floor any script pays).
//!
//! `cargo bench --bench control_plane`

#[path = "../tests/common/redis.rs"]
#[allow(dead_code)]
mod redis_proc;
// The tests' control fixtures: one definition of "a plain tenant and job".
#[path = "../tests/common/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

use agentplane::control::{
    AttemptOutcome, ControlConfig, ControlPlane, Finish, SubmitSpec, TenantSpec,
};
use criterion::{Criterion, criterion_group};
use fixtures::tid;
use std::time::{Duration, Instant};

fn job() -> SubmitSpec {
    fixtures::submit_spec("bench")
}

fn done() -> Finish {
    Finish {
        outcome: AttemptOutcome::Succeeded {
            output: "ok".into(),
        },
        fuel: 1_000_000,
        wall_ms: 10,
        log: String::new(),
        new_state: None,
        http: Default::default(),
        tokens: Default::default(),
    }
}

async fn populate(cp: &ControlPlane, tenants: usize, jobs: usize) {
    for t in 0..tenants {
        cp.create_tenant(
            &TenantSpec {
                weight: 1 + (t % 3) as u32,
                max_queued: u32::MAX,
                ..fixtures::tenant_spec(&format!("t{t}"), i64::MAX / 4)
            },
            "h",
        )
        .await
        .unwrap();
    }
    // Submissions in flight at once: enough to keep Redis busy.
    let spec = job();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..jobs {
        let cp = cp.clone();
        let spec = spec.clone();
        let t = format!("t{}", i % tenants);
        set.spawn(async move { cp.submit(&tid(&t), &spec).await.unwrap() });
        if set.len() >= 64 {
            set.join_next().await;
        }
    }
    while set.join_next().await.is_some() {}
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

/// Claims `n` jobs one by one (finalizing each) and answers CLAIM p50/p99.
async fn claim_latency(cp: &ControlPlane, n: usize) -> (Duration, Duration) {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let c = cp.claim("bench", 1, 0).await.unwrap();
        lat.push(t0.elapsed());
        for c in c {
            cp.finalize(&c.lease, &done()).await.unwrap();
        }
    }
    lat.sort();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

fn redis_benchmark_noop(socket: &std::path::Path) -> String {
    let load = std::process::Command::new("redis-cli")
        .arg("-s")
        .arg(socket)
        .args(["SCRIPT", "LOAD", "return 1"])
        .output()
        .expect("redis-cli");
    let sha = String::from_utf8_lossy(&load.stdout).trim().to_string();
    let mut out = String::new();
    for clients in ["1", "50"] {
        let r = std::process::Command::new("redis-benchmark")
            .arg("-s")
            .arg(socket)
            .args(["-n", "100000", "-c", clients, "-q", "EVALSHA", &sha, "0"])
            .output()
            .expect("redis-benchmark");
        let text = String::from_utf8_lossy(&r.stdout);
        let line = text
            .split(['\r', '\n'])
            .rfind(|l| l.contains("requests per second"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push_str(&format!("  redis-benchmark -c {clients}: {line}\n"));
    }
    out
}

fn claim_finalize_pair(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = redis_proc::RedisServer::start();
    let cp = rt.block_on(async {
        let cp = ControlPlane::connect(&server.url, ControlConfig::default())
            .await
            .unwrap();
        populate(&cp, 10, 1_000).await;
        cp
    });
    let mut refills = 0;
    c.bench_function("claim+finalize pair (10 tenants x 1000 jobs)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut got = cp.claim("bench", 1, 0).await.unwrap();
                if got.is_empty() {
                    refills += 1;
                    populate_more(&cp).await;
                    got = cp.claim("bench", 1, 0).await.unwrap();
                }
                for c in got {
                    cp.finalize(&c.lease, &done()).await.unwrap();
                }
            })
        })
    });
}

async fn populate_more(cp: &ControlPlane) {
    for i in 0..1_000 {
        cp.submit(&tid(&format!("t{}", i % 10)), &job())
            .await
            .unwrap();
    }
}

fn latency_report() {
    let tenants: usize = std::env::var("AP_BENCH_TENANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let jobs: usize = std::env::var("AP_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut report = String::from("\nCLAIM latency (one claim of one job, then its finalize):\n");
    for (t, j) in [(10, 1_000), (tenants, jobs)] {
        let server = redis_proc::RedisServer::start();
        let (p50, p99, fill) = rt.block_on(async {
            let cp = ControlPlane::connect(&server.url, ControlConfig::default())
                .await
                .unwrap();
            let t0 = Instant::now();
            populate(&cp, t, j).await;
            let fill = t0.elapsed();
            let (p50, p99) = claim_latency(&cp, 2_000.min(j)).await;
            (p50, p99, fill)
        });
        report.push_str(&format!(
            "  {t:>5} tenants x {j:>8} queued jobs: p50 {:>7.1} us  p99 {:>7.1} us  (filled in {:.1} s)\n",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            fill.as_secs_f64()
        ));
        if t == 10 {
            report.push_str(&redis_benchmark_noop(&server.socket));
        }
    }
    println!("{report}");
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(50);
    targets = claim_finalize_pair
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::var("AP_BENCH_SKIP_LATENCY").is_err() {
        latency_report();
    }
}
