//! `agentplane admin …`: what an operator sees across tenants, and the
//! log and the retry of any tenant's job (admin token).

use super::client::{Conn, PageArgs};
use super::output::finish;
use crate::client::{AdminJobsFilter, ApiClient, Page};
use crate::model::{ErrorKind, JobState};
use clap::Subcommand;
use std::process::ExitCode;

/// `agentplane admin …`
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Lists tenants by id with running and queued counts, credits, parked
    /// reason and share of capacity over the last minute.
    Tenants {
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
    },
    /// Lists jobs across tenants, newest first.
    Jobs {
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<JobState>,
        /// Only failed jobs of this error kind (`agent_error`, `trap`, …).
        #[arg(long)]
        error_kind: Option<ErrorKind>,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
    },
    /// Queues a tenant's failed job again as its next attempt (same job id,
    /// charged as usual).
    Retry {
        /// Tenant id.
        tenant: String,
        /// Job id of the failed job.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Prints any tenant's job's log.
    Log {
        /// Tenant id.
        tenant: String,
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `agentplane admin …`
pub async fn admin(cmd: AdminCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCmd::Tenants { page, conn } => {
            let c = ApiClient::new(&conn.url, conn.token.clone())?;
            finish(conn.output, c.admin_tenants(&Page::from(page)).await)
        }
        AdminCmd::Jobs {
            state,
            error_kind,
            page,
            conn,
        } => {
            let c = ApiClient::new(&conn.url, conn.token.clone())?;
            let filter = AdminJobsFilter {
                state,
                error_kind,
                limit: page.limit,
                cursor: page.cursor,
            };
            finish(conn.output, c.admin_jobs(&filter).await)
        }
        AdminCmd::Retry { tenant, id, conn } => {
            let c = ApiClient::new(&conn.url, conn.token.clone())?;
            finish(conn.output, c.admin_retry(&tenant, &id).await)
        }
        AdminCmd::Log { tenant, id, conn } => {
            let c = ApiClient::new(&conn.url, conn.token.clone())?;
            match c.admin_log(&tenant, &id).await {
                Ok(text) => {
                    print!("{text}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => finish::<()>(conn.output, Err(e)),
            }
        }
    }
}
