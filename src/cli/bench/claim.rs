//! `agentplane bench claim`: CLAIM latency against queue depth and tenant
//! count. For every (tenants, depth) pair: that many tenants, `depth` jobs
//! queued over them (SUBMIT scripts), then `--samples` CLAIMs of one job
//! each from one client, each followed by its FINALIZE (so the backlog
//! stays at its depth). No worker and no Wasm: this is the control plane
//! alone, as a worker's claim loop sees it.

use super::local::{self, BenchRedis, LocalArgs, RedisStats};
use crate::control::{AttemptOutcome, Finish};
use clap::Args;
use serde_json::json;
use std::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct ClaimArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Tenant counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,1000")]
    pub tenants: Vec<u32>,
    /// Queue depths (jobs queued over all tenants), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub depth: Vec<u32>,
    /// CLAIMs measured per pair.
    #[arg(long, default_value_t = 1_000)]
    pub samples: u32,
    /// SUBMITs in flight while filling the queues.
    #[arg(long, default_value_t = 64)]
    pub fill_in_flight: usize,
}

fn done() -> Finish {
    Finish {
        outcome: AttemptOutcome::Succeeded {
            output: "ok".into(),
        },
        fuel: 1_000,
        wall_ms: 1,
        log: String::new(),
        new_state: None,
        http: Default::default(),
        tokens: Default::default(),
    }
}

pub async fn claim(args: ClaimArgs) -> anyhow::Result<()> {
    let redis = BenchRedis::open(&args.local)?;
    let mut raw = redis.raw().await?;
    // CLAIM never looks at the component: a digest nobody uploaded will do.
    let digest = format!("sha256:{}", "0".repeat(64));
    let mut rows = Vec::new();
    for &tenants in &args.tenants {
        for &depth in &args.depth {
            if redis.is_private() {
                // Our own Redis: start each pair from an empty one, so the
                // memory of the last pair does not weigh on this one.
                let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await?;
            }
            let prefix = format!("{}t{tenants}d{depth}", redis.prefix);
            let cp = redis.control_at(&prefix).await?;
            let mut ids = Vec::new();
            for i in 0..tenants.max(1) as usize {
                ids.push(local::create_tenant(&cp, &format!("c{i}"), 1 + (i % 3) as u32).await?);
            }
            let spec = local::job(&digest, "bench");
            // The samples are claimed and finalized, so queue that many more.
            let total = depth as usize + args.samples as usize;
            let jobs = (0..total)
                .map(|i| (ids[i % ids.len()].clone(), spec.clone()))
                .collect();
            let t_fill = Instant::now();
            local::submit_all(&cp, jobs, args.fill_in_flight).await?;
            let fill_s = t_fill.elapsed().as_secs_f64();

            let before = RedisStats::take(&mut raw).await?;
            let mut lat = Vec::with_capacity(args.samples as usize);
            let mut fin = Vec::with_capacity(args.samples as usize);
            for _ in 0..args.samples {
                let t0 = Instant::now();
                let got = cp.claim("bench-claim", 1, 0).await?;
                lat.push(t0.elapsed().as_secs_f64() * 1e6);
                for c in got {
                    let t1 = Instant::now();
                    cp.finalize(&c.lease, &done()).await?;
                    fin.push(t1.elapsed().as_secs_f64() * 1e6);
                }
            }
            let after = RedisStats::take(&mut raw).await?;
            lat.sort_by(f64::total_cmp);
            fin.sort_by(f64::total_cmp);
            let p = |v: &[f64], q| local::percentile(v, q).round();
            eprintln!(
                "claim: {tenants} tenants x {depth} queued: CLAIM p50 {} µs, p99 {} µs",
                p(&lat, 0.5),
                p(&lat, 0.99)
            );
            rows.push(json!({
                "tenants": tenants,
                "depth": depth,
                "samples": args.samples,
                "claimed": fin.len(),
                "fill_s": fill_s,
                "fill_submits_per_s": (total as f64 / fill_s.max(1e-6)).round(),
                "claim_us": {"p50": p(&lat, 0.5), "p90": p(&lat, 0.9), "p99": p(&lat, 0.99),
                             "max": p(&lat, 1.0)},
                "finalize_us": {"p50": p(&fin, 0.5), "p99": p(&fin, 0.99)},
                "redis_per_claim_and_finalize": before.per_job(&after, fin.len() as u64),
            }));
        }
    }
    let report = json!({"mode": "claim", "system": "agentplane", "runs": rows});
    local::report("claim", args.local.out.as_deref(), &report)
}
