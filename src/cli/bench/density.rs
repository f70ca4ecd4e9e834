//! `agentplane bench density`: N concurrent sleeping agents, each mounting
//! the same heavy context, on one real worker with N slots. Reports the
//! worker's resident memory before the jobs, at the most agents seen
//! running at once, and its peak, so the per-agent cost and the context's
//! (held once per node) can be read apart.
//!
//! The agents are spread over tenants (`--tenants`, default one per 1,000
//! agents) because a tenant's instances share a per-node memory budget;
//! every tenant uploads the same context, which is stored and cached once
//! by digest.

use super::local::{self, BenchRedis, LocalArgs, WorkerProc};
use crate::context::{ContextUpload, Document, encode};
use crate::control::ContextMeta;
use crate::model::JobState;
use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct DensityArgs {
    #[command(flatten)]
    pub local: LocalArgs,
    /// Sleeping agents at once (also the worker's slots).
    #[arg(long, default_value_t = 1_000)]
    pub agents: u32,
    /// Size of the context every agent mounts, in MiB (384-dim embeddings).
    #[arg(long, default_value_t = 256)]
    pub context_mb: u32,
    /// Tenants the agents are spread over (0: one per 1,000 agents).
    #[arg(long, default_value_t = 0)]
    pub tenants: u32,
    /// How long each agent sleeps, in ms: long enough for all to be
    /// running at once.
    #[arg(long, default_value_t = 5_000)]
    pub sleep_ms: u64,
    /// The sleeping agent.
    #[arg(
        long,
        default_value = "guest-examples/target/wasm32-wasip2/release/sleeper.wasm"
    )]
    pub component: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

/// Bytes one document of the generated context takes (384 f32 + text).
const DIM: usize = 384;

fn context(mb: u32) -> anyhow::Result<(ContextMeta, Vec<u8>)> {
    let docs = ((mb as usize) << 20) / (DIM * 4 + 32);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // xorshift: cheap, deterministic filler for the embeddings.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let documents = (0..docs.max(1))
        .map(|i| Document {
            id: format!("d{i}"),
            text: format!("document {i} of the density bench"),
            embedding: Some((0..DIM).map(|_| next()).collect()),
        })
        .collect();
    let upload = ContextUpload {
        name: "density".into(),
        documents,
        tools: Vec::new(),
    };
    let enc = encode(&upload).map_err(|e| anyhow::anyhow!("encoding the context: {e:?}"))?;
    let meta = ContextMeta {
        name: upload.name,
        digest: enc.digest,
        documents: enc.documents as u64,
        dim: enc.dim as u64,
    };
    Ok((meta, enc.bytes))
}

pub async fn density(args: DensityArgs) -> anyhow::Result<()> {
    let wasm = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let redis = BenchRedis::open(&args.local)?;
    let cp = redis.control().await?;
    let cache = super::drain::tempdir("ap-bench-cache")?;
    let timeout = Duration::from_secs(args.timeout_s);
    let n_tenants = if args.tenants == 0 {
        args.agents.div_ceil(1_000).max(1)
    } else {
        args.tenants
    };
    let (meta, blob) = context(args.context_mb)?;
    let mut tenants = Vec::new();
    let mut digests = Vec::new();
    for i in 0..n_tenants {
        let id = local::create_tenant(&cp, &format!("dense-{i}"), 1).await?;
        digests.push(local::put_component(&cp, &id, &wasm).await?);
        cp.put_context(&id, &meta, &blob).await?;
        tenants.push(id);
    }
    let context_bytes = blob.len();
    drop(blob);

    // The measured worker starts idle: its RSS then is the baseline.
    let mut worker = WorkerProc::spawn(&redis, args.agents, &cache)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.check_alive()?;
    let (rss_idle, _) = worker.rss().context("reading the worker's RSS")?;

    let input = args.sleep_ms.to_string();
    let jobs = (0..args.agents as usize)
        .map(|i| {
            let t = i % tenants.len();
            let mut s = local::job(&digests[t], &input);
            s.contexts = vec![(meta.name.clone(), meta.digest.clone())];
            (tenants[t].clone(), s)
        })
        .collect();
    let t0 = Instant::now();
    let ids = local::submit_all(&cp, jobs, 64).await?;

    // Watch the ramp: the most agents running at once, and RSS there.
    let (mut most, mut rss_at_most, mut all_at) = (0u32, 0u64, None);
    let deadline = Instant::now() + timeout;
    loop {
        let mut running = 0;
        let mut left = 0;
        for t in &tenants {
            let info = cp.tenant(t).await?.context("bench tenant vanished")?;
            running += info.running;
            left += info.running + info.queued;
        }
        let (rss, _) = worker.rss().unwrap_or((0, 0));
        if running > most || (running == most && rss > rss_at_most) {
            most = running;
            rss_at_most = rss;
        }
        if running >= args.agents && all_at.is_none() {
            all_at = Some(t0.elapsed().as_secs_f64());
        }
        if left == 0 {
            break;
        }
        worker.check_alive()?;
        if Instant::now() > deadline {
            bail!("agents still queued or running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, rss_peak) = worker.rss().unwrap_or((0, 0));
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&cache);
    let jobs = local::read_jobs(&cp, &ids).await?;
    let failed: Vec<_> = jobs
        .iter()
        .filter(|j| j.state != JobState::Succeeded)
        .collect();

    let mib = |b: u64| (b as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0;
    let report = json!({
        "mode": "density",
        "system": "agentplane",
        "agents": args.agents,
        "tenants": tenants.len(),
        "context_bytes": context_bytes,
        "context_documents": meta.documents,
        "sleep_ms": args.sleep_ms,
        "most_running_at_once": most,
        "all_running_after_s": all_at,
        "worker_rss_mib": {
            "idle": mib(rss_idle),
            "at_most_running": mib(rss_at_most),
            "peak": mib(rss_peak),
        },
        "rss_above_idle_per_agent_kib": if most > 0 {
            json!(((rss_at_most.saturating_sub(rss_idle)) as f64 / 1024.0 / most as f64).round())
        } else { json!(null) },
        "succeeded": jobs.len() - failed.len(),
        "failed": failed.len(),
        "first_failure": failed.first().map(|j| json!(j.error)),
    });
    eprintln!(
        "density: {most} of {} agents running at once, worker RSS {} MiB (idle {} MiB, peak {} MiB)",
        args.agents,
        mib(rss_at_most),
        mib(rss_idle),
        mib(rss_peak)
    );
    local::report("density", args.local.out.as_deref(), &report)?;
    if !failed.is_empty() {
        bail!("{} agents failed", failed.len());
    }
    Ok(())
}
