//! `agentplane bench [api]`: a load generator over the HTTP API.
//!
//! Creates `--tenants` fresh tenants (admin token), uploads the component
//! for each, submits `--jobs` jobs spread over them with `--concurrency`
//! requests in flight, waits until every job is terminal, and prints one
//! JSON report: submit rate and latency, end-to-end latency (the jobs' own
//! `created_at` → `finished_at`), throughput, and per-tenant counts (as
//! aligned `field  value` lines with `--output table`). The report is
//! measured, never asserted: compare runs on the same machine.

use crate::api::JobRequest;
use crate::client::{ApiClient, NewTenant};
use crate::model::JobState;
use anyhow::Context;
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// `agentplane bench …`
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub conn: super::super::client::Conn,
    /// The agent to run (a `.wasm` component).
    #[arg(
        long,
        default_value = "guest-examples/target/wasm32-wasip2/release/echo.wasm"
    )]
    pub component: PathBuf,
    /// Tenants to create, with weights 1, 2, 3, 1, 2, 3, ...
    #[arg(long, default_value_t = 10)]
    pub tenants: u32,
    /// Jobs to submit in all.
    #[arg(long, default_value_t = 2_000)]
    pub jobs: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: u32,
    /// Input of every job.
    #[arg(long, default_value = "hello")]
    pub input: String,
    /// Give up waiting for the jobs after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn millis(s: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as f64)
}

/// Runs the load and prints the report.
pub async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let admin = args
        .conn
        .token
        .clone()
        .context("set AGENTPLANE_TOKEN (or --token) to the admin token")?;
    let wasm = std::fs::read(&args.component)
        .with_context(|| format!("reading {}", args.component.display()))?;
    let api = ApiClient::new(&args.conn.url, Some(admin))?;
    let run = format!("{:x}", rand::random::<u32>());
    let mut tenants = Vec::new();
    for i in 0..args.tenants.max(1) {
        let id = format!("bench-{run}-{i}");
        let weight = 1 + i % 3;
        let created = api
            .create_tenant(&NewTenant {
                id: id.clone(),
                weight: Some(weight),
                credits: Some(1_000_000_000_000),
                ..NewTenant::default()
            })
            .await?;
        let tenant = api.with_token(&created.token);
        let digest = tenant.push_component(wasm.clone()).await?.digest;
        tenants.push((id, weight, tenant, digest));
    }
    let tenants = Arc::new(tenants);

    // Submissions.
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1) as usize));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.jobs {
        let permit = gate.clone().acquire_owned().await?;
        let (tenants, input) = (tenants.clone(), args.input.clone());
        set.spawn(async move {
            let _permit = permit;
            let t = i as usize % tenants.len();
            let (_, _, api, digest) = &tenants[t];
            let req = JobRequest {
                component: digest.clone(),
                input,
                agent_id: None,
                contexts: Vec::new(),
                gpus: 0,
                max_attempts: None,
                timeout_ms: None,
                fuel: None,
                delay_ms: 0,
                callback_url: None,
                max_tokens: None,
            };
            let start = Instant::now();
            let r = api.submit(&req, None).await;
            (t, r.map(|job| job.id), start.elapsed())
        });
    }
    let mut ids = Vec::new();
    let mut submit_lat = Vec::new();
    let mut submit_errors = 0u32;
    while let Some(r) = set.join_next().await {
        let (t, id, lat) = r?;
        submit_lat.push(lat.as_secs_f64() * 1e3);
        match id {
            Ok(id) => ids.push((t, id)),
            Err(e) => {
                submit_errors += 1;
                if submit_errors <= 3 {
                    eprintln!("submit failed: {e:#}");
                }
            }
        }
    }
    let submit_secs = t0.elapsed().as_secs_f64();

    // Completion: long-poll each job until terminal.
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut set = tokio::task::JoinSet::new();
    for (t, id) in ids {
        let permit = gate.clone().acquire_owned().await?;
        let tenants = tenants.clone();
        set.spawn(async move {
            let _permit = permit;
            let api = &tenants[t].2;
            loop {
                match api.job(&id, Some(30.0)).await {
                    Ok(job) if job.state.is_terminal() => return (t, Some(job)),
                    _ if Instant::now() > deadline => return (t, None),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    let mut e2e = Vec::new();
    let mut per_tenant = vec![(0u32, 0u32); tenants.len()];
    let (mut first_created, mut last_finished) = (f64::MAX, 0f64);
    let (mut succeeded, mut failed, mut unfinished) = (0u32, 0u32, 0u32);
    while let Some(r) = set.join_next().await {
        let (t, job) = r?;
        let Some(job) = job else {
            unfinished += 1;
            continue;
        };
        if job.state == JobState::Succeeded {
            succeeded += 1;
            per_tenant[t].0 += 1;
        } else {
            failed += 1;
            per_tenant[t].1 += 1;
        }
        let finished = job.finished_at.as_deref().and_then(millis);
        if let (Some(c), Some(f)) = (millis(&job.created_at), finished) {
            e2e.push(f - c);
            first_created = first_created.min(c);
            last_finished = last_finished.max(f);
        }
    }
    submit_lat.sort_by(f64::total_cmp);
    e2e.sort_by(f64::total_cmp);
    let span_s = ((last_finished - first_created) / 1e3).max(1e-3);
    let report = json!({
        "jobs": args.jobs,
        "tenants": tenants.len(),
        "concurrency": args.concurrency,
        "submitted": args.jobs - submit_errors,
        "submit_errors": submit_errors,
        "submits_per_s": ((args.jobs - submit_errors) as f64 / submit_secs).round(),
        "submit_ms": {"p50": percentile(&submit_lat, 0.5), "p99": percentile(&submit_lat, 0.99)},
        "succeeded": succeeded,
        "failed": failed,
        "unfinished": unfinished,
        "end_to_end_ms": {"p50": percentile(&e2e, 0.5), "p99": percentile(&e2e, 0.99)},
        "throughput_jobs_per_s": ((succeeded + failed) as f64 / span_s).round(),
        "per_tenant": tenants.iter().zip(&per_tenant).map(|((id, w, _, _), (ok, bad))| {
            json!({"id": id, "weight": w, "succeeded": ok, "failed": bad})
        }).collect::<Vec<_>>(),
    });
    // `--output table` (`-o table`): the same figures as aligned lines.
    super::super::output::print(args.conn.output, &report)?;
    Ok(if unfinished == 0 && submit_errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
