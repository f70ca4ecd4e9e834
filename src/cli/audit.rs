//! `agentplane audit --redis URL [--shards N --prefix P]`.

use super::ControlArgs;
use crate::control::audit::AuditOptions;
use crate::control::{ControlConfig, ControlPlane};
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

/// `agentplane audit`.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Redis URL of the deployment.
    #[arg(long)]
    pub redis: String,
    #[command(flatten)]
    pub control: ControlArgs,
    /// How long a running job's lease may have expired, unreaped, before it
    /// counts as a violation (the reaper runs every fifth of a lease).
    #[arg(long, default_value_t = 30_000)]
    pub lease_grace_ms: u64,
}

/// Prints one line per violation (`VIOLATION <kind>: <detail>`) and a
/// summary; exit status 1 when anything is wrong, 0 when clean.
pub async fn audit(a: AuditArgs) -> anyhow::Result<ExitCode> {
    let cfg = ControlConfig {
        prefix: a.control.prefix.clone(),
        shards: a.control.shards,
        ..ControlConfig::default()
    };
    let cp = ControlPlane::connect(&a.redis, cfg)
        .await
        .context("connecting to Redis")?;
    let report = cp
        .audit(AuditOptions {
            lease_grace: Duration::from_millis(a.lease_grace_ms),
        })
        .await
        .context("auditing")?;
    let mut out = std::io::stdout().lock();
    for v in &report.violations {
        writeln!(out, "VIOLATION {}: {}", v.kind, v.detail)?;
    }
    let summary = format!(
        "audit: {} shard(s), {} tenant(s), {} job(s), {} agent(s) checked: {}",
        report.shards,
        report.tenants,
        report.jobs,
        report.agents,
        if report.violations.is_empty() {
            "clean".to_string()
        } else {
            format!("{} violation(s)", report.violations.len())
        }
    );
    writeln!(out, "{summary}")?;
    Ok(if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
