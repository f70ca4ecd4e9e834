//! `agentplane bench`: load generators, each printing its figures as JSON.
//!
//! - `agentplane bench [api] …`: over the HTTP API of a running deployment
//!   (tenants, uploads, submissions, long-polls).
//! - `drain`, `tenants`, `density`, `claim`: straight against a Redis (their
//!   own private `redis-server` unless given `--redis`), with a real
//!   `agentplane worker` child process running real Wasm where jobs run.
//!   Each also writes its report to `target/bench/<mode>.json`, and reads
//!   Redis's `INFO cpu` and `INFO commandstats` before and after to report
//!   Redis CPU and commands per job.
//!
//! Figures are measured, never asserted: compare runs made on the same
//! machine in one sitting (`scripts/bench-peer.sh` runs BullMQ's drain and
//! ours in one go and prints the ratio).

mod api;
mod claim;
mod density;
mod drain;
mod local;
mod tenants;

use clap::{Args, Subcommand};
use std::process::ExitCode;

/// `agentplane bench …`: a mode, or the API load generator's flags alone.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCmd {
    #[command(subcommand)]
    pub mode: Option<Mode>,
    #[command(flatten)]
    pub api: api::BenchArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Mode {
    /// Over the HTTP API (the default when no mode is named): creates
    /// tenants, submits jobs, waits for them.
    Api(api::BenchArgs),
    /// N queued echo jobs drained by one real worker with S slots.
    Drain(drain::DrainArgs),
    /// Many tenants (weights 1, 2, 3) with mixed agents, one worker.
    Tenants(tenants::TenantsArgs),
    /// N concurrent sleeping agents mounting one context: worker RSS.
    Density(density::DensityArgs),
    /// CLAIM latency against queue depth and tenant count.
    Claim(claim::ClaimArgs),
}

pub async fn bench(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    match cmd.mode {
        None => api::bench(cmd.api).await,
        Some(Mode::Api(a)) => api::bench(a).await,
        Some(Mode::Drain(a)) => drain::drain(a).await.map(|()| ExitCode::SUCCESS),
        Some(Mode::Tenants(a)) => tenants::tenants(a).await.map(|()| ExitCode::SUCCESS),
        Some(Mode::Density(a)) => density::density(a).await.map(|()| ExitCode::SUCCESS),
        Some(Mode::Claim(a)) => claim::claim(a).await.map(|()| ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn mode(args: &[&str]) -> super::BenchCmd {
        match Cli::try_parse_from(args).expect("parses").command {
            Command::Bench(b) => b,
            other => panic!("not bench: {other:?}"),
        }
    }

    #[test]
    fn the_api_load_generator_keeps_its_flags_and_modes_have_theirs() {
        let b = mode(&["agentplane", "bench", "--tenants", "3", "--jobs", "60"]);
        assert!(b.mode.is_none());
        assert_eq!((b.api.tenants, b.api.jobs), (3, 60));
        let b = mode(&[
            "agentplane",
            "bench",
            "drain",
            "--jobs",
            "7",
            "--slots",
            "2",
        ]);
        match b.mode {
            Some(super::Mode::Drain(d)) => assert_eq!((d.jobs, d.slots), (7, 2)),
            other => panic!("{other:?}"),
        }
        let b = mode(&["agentplane", "bench", "claim", "--tenants", "10,1000"]);
        match b.mode {
            Some(super::Mode::Claim(c)) => assert_eq!(c.tenants, vec![10, 1000]),
            other => panic!("{other:?}"),
        }
        // A mode's flags are not the load generator's.
        assert!(Cli::try_parse_from(["agentplane", "bench", "--tenants", "3", "drain"]).is_err());
    }
}
