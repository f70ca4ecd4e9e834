//! Client commands: thin wrappers over [`crate::client::ApiClient`] that
//! print its typed answers as JSON. A non-2xx answer prints the error and
//! exits with status 1.

use crate::api::JobRequest;
use crate::client::{ApiClient, ClientError, ClientResult, JobsFilter, NewTenant};
use crate::control::LimitsPatch;
use crate::model::JobState;
use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the API is and who we are.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Base URL of the API.
    #[arg(long, env = "AGENTPLANE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token (admin token for `tenant`, a tenant token otherwise).
    #[arg(long, env = "AGENTPLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `agentplane tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Creates a tenant and prints its token (shown once).
    Create {
        /// Tenant id: 1-64 characters of a-z, 0-9, `-`, `_`.
        id: String,
        /// Share of capacity relative to other tenants (default 1).
        #[arg(long)]
        weight: Option<u32>,
        /// Initial credits.
        #[arg(long, allow_negative_numbers = true)]
        credits: Option<i64>,
        /// Jobs running at once.
        #[arg(long)]
        max_running: Option<u32>,
        /// Jobs waiting (queued or delayed) at once.
        #[arg(long)]
        max_queued: Option<u32>,
        /// GPU slots in use at once.
        #[arg(long)]
        max_gpus: Option<u32>,
        /// Default fuel per attempt.
        #[arg(long)]
        fuel: Option<u64>,
        /// Default memory per instance.
        #[arg(long)]
        memory_bytes: Option<u64>,
        /// Default wall-clock limit per attempt.
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Shows a tenant's settings, credits and counters.
    Get {
        /// Tenant id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Grants credits (negative to take back) and prints the new balance.
    Credits {
        /// Tenant id.
        id: String,
        /// Credits to add (negative to take back).
        #[arg(allow_negative_numbers = true)]
        amount: i64,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `agentplane component …`
#[derive(Debug, Subcommand)]
pub enum ComponentCmd {
    /// Uploads a Wasm component (`.wasm`) and prints its digest.
    Push {
        /// The `.wasm` component file.
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `agentplane context …`
#[derive(Debug, Subcommand)]
pub enum ContextCmd {
    /// Uploads a context from a JSON file `{"name","documents","tools"}`.
    Push {
        /// The JSON file.
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `agentplane job …`
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Submits a job and prints `{"id","state"}` (or the finished job with `--wait`).
    Submit(SubmitArgs),
    /// Prints a job.
    Get {
        /// Job id.
        id: String,
        /// Hold the answer until the job is terminal or this many seconds passed.
        #[arg(long)]
        wait: Option<f64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancels a job.
    Cancel {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Prints a job's log.
    Log {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Lists jobs, newest first.
    List {
        /// Only jobs in this state (queued, delayed, running, succeeded,
        /// failed, cancelled).
        #[arg(long)]
        state: Option<JobState>,
        /// Page size (default 100, at most 10000).
        #[arg(long)]
        limit: Option<usize>,
        /// `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `agentplane job submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Component digest `sha256:…` (from `component push`).
    #[arg(long)]
    pub component: String,
    /// The input string handed to `run`.
    #[arg(
        long,
        conflicts_with = "input_file",
        required_unless_present = "input_file"
    )]
    pub input: Option<String>,
    /// Read the input from a file instead.
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    /// The agent whose durable state the job reads and may set.
    #[arg(long)]
    pub agent_id: Option<String>,
    /// A context to mount (repeatable).
    #[arg(long = "context")]
    pub contexts: Vec<String>,
    /// GPU slots the job needs (at most the tenant's `max_gpus`).
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Attempts before the job fails for good (default 3).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Wall-clock limit per attempt (only lower than the tenant's).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Fuel limit per attempt (only lower than the tenant's).
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Start no earlier than this many ms from now.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// Makes the submission safe to retry: the same key and body give the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait until the job is terminal and print it.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// Prints an answer as pretty JSON, or the error; exit status 1 on an error.
fn finish<T: Serialize>(r: ClientResult<T>) -> anyhow::Result<ExitCode> {
    match r {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ ClientError::Api { .. }) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
        // No answer at all (or one of the wrong shape) is not the API's
        // refusal: reported as the command's own failure, as before.
        Err(e) => Err(e.into()),
    }
}

fn client(conn: &Conn) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(&conn.url, conn.token.clone())?)
}

/// `agentplane tenant …`
pub async fn tenant(cmd: TenantCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TenantCmd::Create {
            id,
            weight,
            credits,
            max_running,
            max_queued,
            max_gpus,
            fuel,
            memory_bytes,
            timeout_ms,
            conn,
        } => {
            let limits = LimitsPatch {
                fuel,
                memory_bytes,
                timeout_ms,
            };
            let spec = NewTenant {
                id,
                weight,
                credits,
                max_running,
                max_queued,
                max_gpus,
                limits: (limits != LimitsPatch::default()).then_some(limits),
                ..NewTenant::default()
            };
            finish(client(&conn)?.create_tenant(&spec).await)
        }
        TenantCmd::Get { id, conn } => finish(client(&conn)?.tenant(&id).await),
        TenantCmd::Credits { id, amount, conn } => {
            finish(client(&conn)?.grant_credits(&id, amount).await)
        }
    }
}

/// `agentplane component …`
pub async fn component(cmd: ComponentCmd) -> anyhow::Result<ExitCode> {
    let ComponentCmd::Push { file, conn } = cmd;
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    finish(client(&conn)?.push_component(bytes).await)
}

/// `agentplane context …`
pub async fn context(cmd: ContextCmd) -> anyhow::Result<ExitCode> {
    let ContextCmd::Push { file, conn } = cmd;
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    finish(client(&conn)?.push_context(bytes).await)
}

/// `agentplane job …`
pub async fn job(cmd: JobCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        JobCmd::Submit(a) => {
            let input = match (&a.input, &a.input_file) {
                (Some(s), _) => s.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?,
                (None, None) => anyhow::bail!("give --input or --input-file"),
            };
            let req = JobRequest {
                component: a.component,
                input,
                agent_id: a.agent_id,
                contexts: a.contexts,
                gpus: a.gpus.unwrap_or(0),
                max_attempts: a.max_attempts,
                timeout_ms: a.timeout_ms,
                fuel: a.fuel,
                delay_ms: a.delay_ms.unwrap_or(0),
            };
            let c = client(&a.conn)?;
            let submitted = c.submit(&req, a.idempotency_key.as_deref()).await;
            match submitted {
                Ok(job) if a.wait => finish(c.wait_terminal(&job.id).await),
                other => finish(other),
            }
        }
        JobCmd::Get { id, wait, conn } => finish(client(&conn)?.job(&id, wait).await),
        JobCmd::Cancel { id, conn } => finish(client(&conn)?.cancel(&id).await),
        JobCmd::Log { id, conn } => match client(&conn)?.log(&id).await {
            Ok(text) => {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => finish::<()>(Err(e)),
        },
        JobCmd::List {
            state,
            limit,
            cursor,
            conn,
        } => {
            let filter = JobsFilter {
                state,
                limit,
                cursor,
            };
            finish(client(&conn)?.jobs(&filter).await)
        }
    }
}
