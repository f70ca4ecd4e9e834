//! `agentplane bench tenants`: many tenants with weights 1, 2, 3, … each
//! queuing a mix of agents (echo, a compute loop, a counter with durable
//! state, a short sleep), drained by one real worker. Reports throughput,
//! run time per agent, Redis cost per job, and how closely the completions
//! follow the weights while every tenant is still backlogged.

use super::local::{self, BenchRedis, LocalArgs, RedisStats, WorkerProc};
use crate::model::JobState;
use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct TenantsArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Tenants, with weights 1, 2, 3, 1, 2, 3, …
    #[arg(long, default_value_t = 100)]
    pub tenants: u32,
    /// Jobs in all, spread evenly over the tenants and, per tenant, over
    /// the agents.
    #[arg(long, default_value_t = 4_000)]
    pub jobs: u32,
    /// Worker slots.
    #[arg(long, default_value_t = 8)]
    pub slots: u32,
    /// Where the example agents are built.
    #[arg(long, default_value = "guest-examples/target/wasm32-wasip2/release")]
    pub agents_dir: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// The mix: (agent, input, durable agent state?).
const MIX: [(&str, &str, bool); 4] = [
    ("echo", "hello", false),
    ("compute", "20000", false),
    ("counter", "", true),
    ("sleeper", "5", false),
];

pub async fn tenants(args: TenantsArgs) -> anyhow::Result<()> {
    let mut wasm = Vec::new();
    for (name, _, _) in MIX {
        let path = args.agents_dir.join(format!("{name}.wasm"));
        wasm.push(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    let redis = BenchRedis::open(&args.local)?;
    let cp = redis.control().await?;
    let mut raw = redis.raw().await?;
    let cache = super::drain::tempdir("ap-bench-cache")?;
    let timeout = Duration::from_secs(args.timeout_s);

    let mut ids = Vec::new();
    let mut weights = HashMap::new();
    let mut digests: Vec<Vec<String>> = Vec::new();
    for i in 0..args.tenants.max(1) {
        let weight = 1 + i % 3;
        let id = local::create_tenant(&cp, &format!("mix-{i}"), weight).await?;
        let mut d = Vec::new();
        for w in &wasm {
            d.push(local::put_component(&cp, &id, w).await?);
        }
        digests.push(d);
        weights.insert(id.clone(), weight);
        ids.push(id);
    }
    let spec = |t: usize, k: usize| {
        let (_, input, stateful) = MIX[k];
        let mut s = local::job(&digests[t][k], input);
        if stateful {
            // One agent per tenant: its runs serialise on its state.
            s.agent_id = Some("counter".into());
        }
        s
    };

    // Warm-up: every agent compiled once into the cache.
    let mut warm = WorkerProc::spawn(&redis, args.slots, &cache)?;
    let jobs = (0..MIX.len())
        .map(|k| (ids[0].clone(), spec(0, k)))
        .collect();
    local::submit_all(&cp, jobs, 4).await?;
    local::wait_idle(&cp, &ids[..1], &mut warm, timeout).await?;
    warm.stop().await;

    let before = RedisStats::take(&mut raw).await?;
    // Round-robin over tenants, then over agents within each tenant.
    let jobs = (0..args.jobs as usize)
        .map(|i| {
            let t = i % ids.len();
            let k = (i / ids.len()) % MIX.len();
            (ids[t].clone(), spec(t, k))
        })
        .collect();
    let t_submit = Instant::now();
    let submitted = local::submit_all(&cp, jobs, 64).await?;
    let submit_s = t_submit.elapsed().as_secs_f64();
    let mut worker = WorkerProc::spawn(&redis, args.slots, &cache)?;
    local::wait_idle(&cp, &ids, &mut worker, timeout).await?;
    let after = RedisStats::take(&mut raw).await?;
    worker.stop().await;
    let jobs = local::read_jobs(&cp, &submitted).await?;
    let _ = std::fs::remove_dir_all(&cache);

    // Per agent: run time (first start → finish) and outcome.
    let mut per_agent: Vec<(Vec<f64>, u32, u32)> = vec![(Vec::new(), 0, 0); MIX.len()];
    let mut finishes = Vec::new();
    let mut first_start = i64::MAX;
    for (i, job) in jobs.iter().enumerate() {
        let k = (i / ids.len()) % MIX.len();
        let started = local::millis(job.started_at.as_deref());
        let finished = local::millis(job.finished_at.as_deref());
        if let (Some(s), Some(f)) = (started, finished) {
            per_agent[k].0.push((f - s) as f64);
            first_start = first_start.min(s);
            finishes.push((f, job.tenant.clone()));
        }
        if job.state == JobState::Succeeded {
            per_agent[k].1 += 1;
        } else {
            per_agent[k].2 += 1;
        }
    }
    if finishes.is_empty() {
        bail!("no job finished");
    }
    finishes.sort();
    let drain_s = ((finishes[finishes.len() - 1].0 - first_start) as f64 / 1e3).max(1e-3);

    // Fairness: completions per unit of weight at the moment half the jobs
    // were done (every tenant still has a backlog then when the jobs are
    // spread evenly), relative to the mean; 1.0 everywhere is exact.
    let mut done: HashMap<&str, f64> = ids.iter().map(|t| (t.as_str(), 0.0)).collect();
    for (_, t) in &finishes[..finishes.len() / 2] {
        *done.entry(t.as_str()).or_default() += 1.0;
    }
    let per_weight: Vec<f64> = ids
        .iter()
        .map(|t| done[t.as_str()] / f64::from(weights[t]))
        .collect();
    let mean = per_weight.iter().sum::<f64>() / per_weight.len() as f64;
    let rel: Vec<f64> = per_weight.iter().map(|x| x / mean.max(1e-9)).collect();
    let jain = per_weight.iter().sum::<f64>().powi(2)
        / (per_weight.len() as f64 * per_weight.iter().map(|x| x * x).sum::<f64>()).max(1e-9);
    let min = rel.iter().copied().fold(f64::MAX, f64::min);
    let max = rel.iter().copied().fold(0.0, f64::max);

    let agents: serde_json::Map<_, _> = MIX
        .iter()
        .zip(per_agent.iter_mut())
        .map(|((name, _, _), (run, ok, bad))| {
            run.sort_by(f64::total_cmp);
            let v = json!({"succeeded": ok, "failed": bad,
                "run_ms": {"p50": local::percentile(run, 0.5), "p99": local::percentile(run, 0.99)}});
            (name.to_string(), v)
        })
        .collect();
    let failed: u32 = per_agent.iter().map(|a| a.2).sum();
    let report = json!({
        "mode": "tenants",
        "system": "agentplane",
        "tenants": ids.len(),
        "jobs": args.jobs,
        "slots": args.slots,
        "submit_s": submit_s,
        "drain_s": drain_s,
        "jobs_per_s": (args.jobs as f64 / drain_s).round(),
        "agents": agents,
        "fairness_at_half": {
            "completions_per_weight_min_over_mean": min,
            "completions_per_weight_max_over_mean": max,
            "jain_index": jain,
        },
        "submit_and_drain": before.per_job(&after, args.jobs as u64),
    });
    eprintln!(
        "tenants: {} tenants, {} jobs: {:.0} jobs/s, fairness (Jain) {jain:.3}",
        ids.len(),
        args.jobs,
        args.jobs as f64 / drain_s
    );
    local::report("tenants", args.local.out.as_deref(), &report)?;
    if failed > 0 {
        bail!("{failed} jobs failed");
    }
    Ok(())
}
