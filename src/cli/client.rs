//! Client commands: thin wrappers over [`crate::client::ApiClient`] that
//! print its typed answers as JSON (or a table with `--output table`). A
//! non-2xx answer prints the error and exits with the status `output`
//! names for it (3 auth, 4 not found, 1 otherwise).

use super::output::{self, EXIT_JOB_FAILED, Format, Spinner, finish};
use crate::api::JobRequest;
use crate::client::{ApiClient, JobsFilter, Page};
use crate::model::JobState;
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod tenant;
pub use tenant::{TenantCmd, tenant};

/// Where the API is and who we are.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Base URL of the API.
    #[arg(long, env = "AGENTPLANE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token (admin token for `tenant`, a tenant token otherwise).
    #[arg(long, env = "AGENTPLANE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// `json` (default) or `table`.
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Json)]
    pub output: Format,
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
    /// Prints a component's metadata.
    Get {
        /// Digest `sha256:…`.
        digest: String,
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
    /// Prints a context's metadata.
    Get {
        /// Context name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `agentplane job …`
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Submits a job and prints `{"id","state"}` (or the finished job with `--wait`).
    Submit(Box<SubmitArgs>),
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
    /// Queues a failed job again as its next attempt (same job id, charged
    /// as usual).
    Retry {
        /// Job id of the failed job.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Submits up to 1,000 jobs from a JSON file: the `POST /v1/jobs/batch`
    /// body `{"jobs":[{"job":{…},"idempotency_key"?}]}` or just its list.
    /// Exits 1 when any job was refused (each has its own result).
    Batch {
        /// The JSON file.
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Lists jobs, newest first.
    List {
        /// Only jobs in this state (queued, delayed, running, succeeded,
        /// failed, cancelled).
        #[arg(long)]
        state: Option<JobState>,
        #[command(flatten)]
        page: PageArgs,
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
    /// POST the finished job here, signed (the deployment's
    /// `--callback-allow` rules must allow it).
    #[arg(long)]
    pub callback_url: Option<String>,
    /// Tokens each attempt may spend on inference (only lower than the
    /// tenant's `max_tokens_per_job`).
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Makes the submission safe to retry: the same key and body give the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Wait until the job is terminal and print it; exit 5 unless it
    /// succeeded.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// `--limit` and `--cursor` of every listing.
#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Page size (default 100, at most 1000).
    #[arg(long)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
}

impl From<PageArgs> for Page {
    fn from(p: PageArgs) -> Page {
        Page {
            limit: p.limit,
            cursor: p.cursor,
        }
    }
}

/// Reads `file` and uploads it with `upload` (a component or a context),
/// with a spinner while it goes.
async fn push_file<T: serde::Serialize>(
    file: &std::path::Path,
    conn: &Conn,
    upload: impl AsyncFnOnce(&ApiClient, Vec<u8>) -> crate::client::ClientResult<T>,
) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let spin = Spinner::start(format!("uploading {} bytes", bytes.len()));
    let r = upload(&client(conn)?, bytes).await;
    drop(spin);
    finish(conn.output, r)
}

fn client(conn: &Conn) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(&conn.url, conn.token.clone())?)
}

/// `agentplane component …`
pub async fn component(cmd: ComponentCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ComponentCmd::Push { file, conn } => {
            push_file(&file, &conn, async |c, b| c.push_component(b).await).await
        }
        ComponentCmd::Get { digest, conn } => {
            finish(conn.output, client(&conn)?.component(&digest).await)
        }
    }
}

/// `agentplane context …`
pub async fn context(cmd: ContextCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ContextCmd::Push { file, conn } => {
            push_file(&file, &conn, async |c, b| c.push_context(b).await).await
        }
        ContextCmd::Get { name, conn } => finish(conn.output, client(&conn)?.context(&name).await),
    }
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
                callback_url: a.callback_url,
                max_tokens: a.max_tokens,
            };
            let c = client(&a.conn)?;
            let submitted = c.submit(&req, a.idempotency_key.as_deref()).await;
            let out = a.conn.output;
            match submitted {
                Ok(job) if a.wait => {
                    let spin = Spinner::start(format!("waiting for job {}", job.id));
                    let r = c.wait_terminal(&job.id).await;
                    drop(spin);
                    match r {
                        // Printed like a success, but the status says the
                        // job did not do its work.
                        Ok(job) if job.state != JobState::Succeeded => {
                            output::print(out, &job)?;
                            Ok(ExitCode::from(EXIT_JOB_FAILED))
                        }
                        r => finish(out, r),
                    }
                }
                other => finish(out, other),
            }
        }
        JobCmd::Get { id, wait, conn } => finish(conn.output, client(&conn)?.job(&id, wait).await),
        JobCmd::Cancel { id, conn } => finish(conn.output, client(&conn)?.cancel(&id).await),
        JobCmd::Retry { id, conn } => finish(conn.output, client(&conn)?.retry(&id).await),
        JobCmd::Batch { file, conn } => batch(&file, &conn).await,
        JobCmd::Log { id, conn } => match client(&conn)?.log(&id).await {
            Ok(text) => {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => finish::<()>(conn.output, Err(e)),
        },
        JobCmd::List { state, page, conn } => {
            let filter = JobsFilter {
                state,
                limit: page.limit,
                cursor: page.cursor,
            };
            finish(conn.output, client(&conn)?.jobs(&filter).await)
        }
    }
}

/// `agentplane job batch FILE`.
async fn batch(file: &std::path::Path, conn: &Conn) -> anyhow::Result<ExitCode> {
    #[derive(serde::Deserialize)]
    struct Item {
        job: JobRequest,
        #[serde(default)]
        idempotency_key: Option<String>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Body {
        Wrapped { jobs: Vec<Item> },
        Bare(Vec<Item>),
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let body: Body = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        // The file is not what the command takes: a usage error.
        Err(e) => {
            eprintln!("error: {}: not a batch of jobs: {e}", file.display());
            return Ok(ExitCode::from(output::EXIT_USAGE));
        }
    };
    let items = match body {
        Body::Wrapped { jobs } | Body::Bare(jobs) => jobs,
    };
    let jobs: Vec<_> = items
        .into_iter()
        .map(|i| (i.job, i.idempotency_key))
        .collect();
    match client(conn)?.submit_batch(&jobs).await {
        Ok(results) => {
            let refused = results
                .iter()
                .any(|r| matches!(r, crate::api::BatchResult::Refused { .. }));
            output::print(conn.output, &serde_json::json!({ "results": results }))?;
            Ok(if refused {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Err(e) => finish::<()>(conn.output, Err(e)),
    }
}
