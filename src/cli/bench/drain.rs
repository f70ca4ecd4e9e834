//! `agentplane bench drain`: N queued echo jobs drained by one real
//! `agentplane worker --slots S` (a Wasm instance per job), the figure
//! `scripts/bench-peer.sh` sets beside BullMQ's drain of the same N jobs.
//!
//! Steps, mirrored by `benches/peer/drain.js`:
//! 1. a warm-up worker runs one job, so the component is compiled into the
//!    disk cache, and stops (compilation is a one-off per node, not a
//!    per-job cost);
//! 2. `INFO` is read, the N jobs are submitted (SUBMIT scripts, 64 in
//!    flight), then the measured worker starts and drains them;
//! 3. when every job is done, `INFO` is read again: Redis CPU and command
//!    counts over submit + drain, per job.
//!
//! The drain rate is N over the span from the first job's start to the last
//! job's finish (both stamped by Redis), so the worker's process start is
//! not counted; the wall time including it is reported beside.

use super::local::{self, BenchRedis, LocalArgs, RedisStats, WorkerProc};
use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Jobs to queue and drain.
    #[arg(long, default_value_t = 5_000)]
    pub jobs: u32,
    /// Worker slots (jobs run at once).
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// Tenants the jobs are spread over.
    #[arg(long, default_value_t = 1)]
    pub tenants: u32,
    /// The agent (a `.wasm` component).
    #[arg(
        long,
        default_value = "guest-examples/target/wasm32-wasip2/release/echo.wasm"
    )]
    pub component: PathBuf,
    /// Input of every job.
    #[arg(long, default_value = "hello")]
    pub input: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let wasm = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let redis = BenchRedis::open(&args.local)?;
    let cp = redis.control().await?;
    let mut raw = redis.raw().await?;
    let cache = tempdir("ap-bench-cache")?;
    let timeout = Duration::from_secs(args.timeout_s);

    let mut tenants = Vec::new();
    let mut digests = Vec::new();
    for i in 0..args.tenants.max(1) {
        let id = local::create_tenant(&cp, &format!("drain-{i}"), 1).await?;
        digests.push(local::put_component(&cp, &id, &wasm).await?);
        tenants.push(id);
    }

    // 1. Warm-up: compile once into the cache, then that worker goes.
    let mut warm = WorkerProc::spawn(&redis, args.slots, &cache)?;
    local::submit_all(
        &cp,
        vec![(tenants[0].clone(), local::job(&digests[0], &args.input))],
        1,
    )
    .await?;
    local::wait_idle(&cp, &tenants[..1], &mut warm, timeout).await?;
    warm.stop().await;

    // 2. Submit, then drain with a fresh worker.
    let before = RedisStats::take(&mut raw).await?;
    let specs = (0..args.jobs as usize)
        .map(|i| {
            let t = i % tenants.len();
            (tenants[t].clone(), local::job(&digests[t], &args.input))
        })
        .collect();
    let t_submit = Instant::now();
    let ids = local::submit_all(&cp, specs, 64).await?;
    let submit_s = t_submit.elapsed().as_secs_f64();
    let after_submit = RedisStats::take(&mut raw).await?;
    let t_worker = Instant::now();
    let mut worker = WorkerProc::spawn(&redis, args.slots, &cache)?;
    let idle_at = local::wait_idle(&cp, &tenants, &mut worker, timeout).await?;
    let after = RedisStats::take(&mut raw).await?;
    let wall_s = (idle_at - t_worker).as_secs_f64();
    worker.stop().await;

    // 3. Read the jobs back (not counted) for the span and the outcome.
    let jobs = local::read_jobs(&cp, &ids).await?;
    let succeeded = jobs
        .iter()
        .filter(|j| j.state == crate::model::JobState::Succeeded)
        .count();
    let first_start = jobs
        .iter()
        .filter_map(|j| local::millis(j.started_at.as_deref()))
        .min();
    let last_finish = jobs
        .iter()
        .filter_map(|j| local::millis(j.finished_at.as_deref()))
        .max();
    let (Some(first_start), Some(last_finish)) = (first_start, last_finish) else {
        bail!("no job has start and finish times");
    };
    let drain_s = ((last_finish - first_start) as f64 / 1e3).max(1e-3);
    let n = args.jobs as f64;
    let report = json!({
        "mode": "drain",
        "system": "agentplane",
        "jobs": args.jobs,
        "slots": args.slots,
        "tenants": tenants.len(),
        "component": args.component.display().to_string(),
        "succeeded": succeeded,
        "failed": jobs.len() - succeeded,
        "submit_s": submit_s,
        "submits_per_s": (n / submit_s.max(1e-6)).round(),
        "drain_s": drain_s,
        "jobs_per_s": (n / drain_s).round(),
        "wall_with_worker_start_s": wall_s,
        "submit": before.per_job(&after_submit, args.jobs as u64),
        "submit_and_drain": before.per_job(&after, args.jobs as u64),
    });
    let _ = std::fs::remove_dir_all(&cache);
    eprintln!(
        "agentplane drain: {} jobs, {} slots: {:.0} jobs/s, Redis CPU {} µs/job (submit + drain)",
        args.jobs,
        args.slots,
        n / drain_s,
        report["submit_and_drain"]["redis_cpu_us_per_job"]
    );
    local::report("drain", args.local.out.as_deref(), &report)?;
    if succeeded != jobs.len() {
        bail!(
            "{} of {} jobs did not succeed",
            jobs.len() - succeeded,
            jobs.len()
        );
    }
    Ok(())
}

/// A fresh private dir under the system temp dir.
pub fn tempdir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{name}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
