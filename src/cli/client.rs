//! Client commands: thin wrappers over the HTTP API that print its JSON
//! answers. A non-2xx answer prints the error and exits with status 1.

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
        /// Only jobs in this state.
        #[arg(long)]
        state: Option<String>,
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

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>, &'static str),
}

impl Client {
    fn new(conn: &Conn) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Long-polls are held up to 60 s by the server.
            .timeout(Duration::from_secs(600))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base: conn.url.trim_end_matches('/').to_string(),
            token: conn.token.clone(),
        })
    }

    /// Sends a request; `Ok(Err(text))` for a non-2xx answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Body,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Result<(StatusCode, String), String>> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(bytes, ct) => req.header("content-type", ct).body(bytes),
        };
        let resp = req
            .send()
            .await
            .with_context(|| format!("requesting {url}"))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the answer")?;
        if status.is_success() {
            Ok(Ok((status, text)))
        } else {
            Ok(Err(describe_error(status, &text)))
        }
    }
}

fn describe_error(status: StatusCode, text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    match parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .map(|e| (e.get("code"), e.get("message")))
    {
        Some((Some(Value::String(c)), Some(Value::String(m)))) => {
            format!("HTTP {}: {c}: {m}", status.as_u16())
        }
        _ => format!("HTTP {}: {}", status.as_u16(), text.trim()),
    }
}

/// Prints a JSON answer pretty, anything else as is.
fn print_answer(text: &str) {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => print!("{text}"),
    }
}

fn finish(r: Result<(StatusCode, String), String>) -> ExitCode {
    match r {
        Ok((_, text)) => {
            print_answer(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn put(m: &mut Map<String, Value>, k: &str, v: Option<impl Into<Value>>) {
    if let Some(v) = v {
        m.insert(k.into(), v.into());
    }
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
            let mut body = Map::new();
            body.insert("id".into(), id.into());
            put(&mut body, "weight", weight);
            put(&mut body, "credits", credits);
            put(&mut body, "max_running", max_running);
            put(&mut body, "max_queued", max_queued);
            put(&mut body, "max_gpus", max_gpus);
            let mut limits = Map::new();
            put(&mut limits, "fuel", fuel);
            put(&mut limits, "memory_bytes", memory_bytes);
            put(&mut limits, "timeout_ms", timeout_ms);
            if !limits.is_empty() {
                body.insert("limits".into(), Value::Object(limits));
            }
            let c = Client::new(&conn)?;
            let r = c
                .call(
                    Method::POST,
                    "/v1/tenants",
                    Body::Json(Value::Object(body)),
                    &[],
                )
                .await?;
            Ok(finish(r))
        }
        TenantCmd::Get { id, conn } => {
            let c = Client::new(&conn)?;
            Ok(finish(
                c.call(Method::GET, &format!("/v1/tenants/{id}"), Body::None, &[])
                    .await?,
            ))
        }
        TenantCmd::Credits { id, amount, conn } => {
            let c = Client::new(&conn)?;
            let r = c
                .call(
                    Method::POST,
                    &format!("/v1/tenants/{id}/credits"),
                    Body::Json(json!({"amount": amount})),
                    &[],
                )
                .await?;
            Ok(finish(r))
        }
    }
}

/// `agentplane component …`
pub async fn component(cmd: ComponentCmd) -> anyhow::Result<ExitCode> {
    let ComponentCmd::Push { file, conn } = cmd;
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let c = Client::new(&conn)?;
    let r = c
        .call(
            Method::POST,
            "/v1/components",
            Body::Raw(bytes, "application/wasm"),
            &[],
        )
        .await?;
    Ok(finish(r))
}

/// `agentplane context …`
pub async fn context(cmd: ContextCmd) -> anyhow::Result<ExitCode> {
    let ContextCmd::Push { file, conn } = cmd;
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let c = Client::new(&conn)?;
    let r = c
        .call(
            Method::POST,
            "/v1/contexts",
            Body::Raw(bytes, "application/json"),
            &[],
        )
        .await?;
    Ok(finish(r))
}

/// Holds `GET /v1/jobs/{id}?wait=` until the job is terminal.
async fn wait_terminal(
    c: &Client,
    id: &str,
) -> anyhow::Result<Result<(StatusCode, String), String>> {
    loop {
        let r = c
            .call(
                Method::GET,
                &format!("/v1/jobs/{id}?wait=60"),
                Body::None,
                &[],
            )
            .await?;
        let Ok((status, text)) = r else { return Ok(r) };
        let terminal = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("state").and_then(Value::as_str).map(str::to_string))
            .and_then(|s| s.parse::<crate::model::JobState>().ok())
            .is_some_and(|s| s.is_terminal());
        if terminal {
            return Ok(Ok((status, text)));
        }
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
            let mut body = Map::new();
            body.insert("component".into(), a.component.clone().into());
            body.insert("input".into(), input.into());
            put(&mut body, "agent_id", a.agent_id.clone());
            if !a.contexts.is_empty() {
                body.insert("contexts".into(), json!(a.contexts));
            }
            put(&mut body, "gpus", a.gpus);
            put(&mut body, "max_attempts", a.max_attempts);
            put(&mut body, "timeout_ms", a.timeout_ms);
            put(&mut body, "fuel", a.fuel);
            put(&mut body, "delay_ms", a.delay_ms);
            let headers: Vec<(&str, String)> = a
                .idempotency_key
                .iter()
                .map(|k| ("idempotency-key", k.clone()))
                .collect();
            let c = Client::new(&a.conn)?;
            let r = c
                .call(
                    Method::POST,
                    "/v1/jobs",
                    Body::Json(Value::Object(body)),
                    &headers,
                )
                .await?;
            if !a.wait {
                return Ok(finish(r));
            }
            let (_, text) = match r {
                Ok(ok) => ok,
                Err(e) => return Ok(finish(Err(e))),
            };
            let id = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
                .context("the submission answer has no job id")?;
            Ok(finish(wait_terminal(&c, &id).await?))
        }
        JobCmd::Get { id, wait, conn } => {
            let c = Client::new(&conn)?;
            let path = match wait {
                Some(w) => format!("/v1/jobs/{id}?wait={w}"),
                None => format!("/v1/jobs/{id}"),
            };
            Ok(finish(c.call(Method::GET, &path, Body::None, &[]).await?))
        }
        JobCmd::Cancel { id, conn } => {
            let c = Client::new(&conn)?;
            Ok(finish(
                c.call(
                    Method::POST,
                    &format!("/v1/jobs/{id}/cancel"),
                    Body::None,
                    &[],
                )
                .await?,
            ))
        }
        JobCmd::Log { id, conn } => {
            let c = Client::new(&conn)?;
            Ok(finish(
                c.call(Method::GET, &format!("/v1/jobs/{id}/log"), Body::None, &[])
                    .await?,
            ))
        }
        JobCmd::List {
            state,
            limit,
            cursor,
            conn,
        } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(format!("state={s}"));
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            if let Some(cur) = cursor {
                q.push(format!("cursor={cur}"));
            }
            let path = if q.is_empty() {
                "/v1/jobs".to_string()
            } else {
                format!("/v1/jobs?{}", q.join("&"))
            };
            let c = Client::new(&conn)?;
            Ok(finish(c.call(Method::GET, &path, Body::None, &[]).await?))
        }
    }
}
