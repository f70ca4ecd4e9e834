//! `agentplane tenant …`: tenants, their credits, ledger and usage,
//! egress rules and secrets (admin commands, and a tenant's own reads).

use super::super::output::finish;
use super::{Conn, PageArgs, client};
use crate::client::{NewTenant, Page, UsageWindow};
use crate::control::{LimitsPatch, TenantPatch};
use crate::model::grants::ModelGrant;
use clap::{Args, Subcommand};
use std::process::ExitCode;

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
        /// Where its agents may send HTTP requests: `scheme://host[:port]`,
        /// `*.` for any subdomain (repeat for more; default none).
        #[arg(long = "allow-outbound", value_name = "RULE")]
        allow_outbound: Vec<String>,
        /// A node model its agents may call, at credits per 1,000 tokens
        /// in and out (repeat for more; default none).
        #[arg(long = "model", value_name = "MODEL:IN:OUT")]
        models: Vec<ModelGrant>,
        /// Tokens one job may spend on inference (default 4096).
        #[arg(long)]
        max_tokens_per_job: Option<u64>,
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
        /// Makes the grant safe to retry: a replay credits nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Changes a tenant's weight, quotas or limits (only what is given).
    Patch(PatchArgs),
    /// Sets a secret its agents read through `wasi:config/store`; the value
    /// is read from standard input (never an argument, which `ps` shows).
    SecretSet {
        /// Tenant id.
        id: String,
        /// Secret name: 1-64 characters of a-z, A-Z, 0-9 and _.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deletes one of a tenant's secrets.
    SecretDelete {
        /// Tenant id.
        id: String,
        /// Secret name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Lists a tenant's secrets by name (values are never shown).
    Secrets {
        /// Tenant id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Prints a page of the tenant's ledger, oldest first (admin, or the
    /// tenant itself).
    Ledger {
        /// Tenant id.
        id: String,
        #[command(flatten)]
        page: PageArgs,
        /// Print the page as CSV, as the API writes it.
        #[arg(long)]
        csv: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Prints the tenant's usage by hour or day (admin, or the tenant).
    Usage {
        /// Tenant id.
        id: String,
        /// Start (RFC 3339 or Unix ms).
        #[arg(long)]
        from: Option<String>,
        /// End, excluded (RFC 3339 or Unix ms).
        #[arg(long)]
        to: Option<String>,
        /// Bucket: `hour` or `day`.
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `agentplane tenant patch`.
#[derive(Debug, Args)]
pub struct PatchArgs {
    /// Tenant id.
    pub id: String,
    /// Share of capacity relative to other tenants.
    #[arg(long)]
    pub weight: Option<u32>,
    /// Jobs running at once.
    #[arg(long)]
    pub max_running: Option<u32>,
    /// Jobs waiting at once.
    #[arg(long)]
    pub max_queued: Option<u32>,
    /// GPU slots in use at once.
    #[arg(long)]
    pub max_gpus: Option<u32>,
    /// Default fuel per attempt.
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Default memory per instance.
    #[arg(long)]
    pub memory_bytes: Option<u64>,
    /// Default wall-clock limit per attempt.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Largest component upload.
    #[arg(long)]
    pub max_component_bytes: Option<u64>,
    /// Largest context upload.
    #[arg(long)]
    pub max_context_bytes: Option<u64>,
    /// Largest agent state.
    #[arg(long)]
    pub max_state_bytes: Option<u64>,
    /// Replaces where its agents may send HTTP requests (repeat for more).
    #[arg(long = "allow-outbound", value_name = "RULE")]
    pub allow_outbound: Vec<String>,
    /// Allows its agents no HTTP request at all.
    #[arg(long, conflicts_with = "allow_outbound")]
    pub no_outbound: bool,
    /// Replaces the node models its agents may call (repeat for more).
    #[arg(long = "model", value_name = "MODEL:IN:OUT")]
    pub models: Vec<ModelGrant>,
    /// Allows its agents no model at all.
    #[arg(long, conflicts_with = "models")]
    pub no_models: bool,
    /// Tokens one job may spend on inference.
    #[arg(long)]
    pub max_tokens_per_job: Option<u64>,
    #[command(flatten)]
    pub conn: Conn,
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
            allow_outbound,
            models,
            max_tokens_per_job,
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
                allowed_outbound_hosts: (!allow_outbound.is_empty()).then_some(allow_outbound),
                models: (!models.is_empty()).then_some(models),
                max_tokens_per_job,
                ..NewTenant::default()
            };
            finish(conn.output, client(&conn)?.create_tenant(&spec).await)
        }
        TenantCmd::Get { id, conn } => finish(conn.output, client(&conn)?.tenant(&id).await),
        TenantCmd::Credits {
            id,
            amount,
            idempotency_key,
            conn,
        } => {
            let c = client(&conn)?;
            let r = match idempotency_key {
                Some(k) => c.grant_credits_once(&id, amount, &k).await,
                None => c.grant_credits(&id, amount).await,
            };
            finish(conn.output, r)
        }
        TenantCmd::SecretSet { id, name, conn } => {
            let mut value = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)?;
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let r = client(&conn)?.set_secret(&id, &name, value).await;
            finish(conn.output, r.map(|()| serde_json::json!({ "name": name })))
        }
        TenantCmd::SecretDelete { id, name, conn } => {
            let r = client(&conn)?.delete_secret(&id, &name).await;
            finish(
                conn.output,
                r.map(|()| serde_json::json!({ "deleted": name })),
            )
        }
        TenantCmd::Secrets { id, conn } => finish(conn.output, client(&conn)?.secrets(&id).await),
        TenantCmd::Patch(a) => {
            let limits = LimitsPatch {
                fuel: a.fuel,
                memory_bytes: a.memory_bytes,
                timeout_ms: a.timeout_ms,
            };
            let patch = TenantPatch {
                weight: a.weight,
                max_running: a.max_running,
                max_queued: a.max_queued,
                max_gpus: a.max_gpus,
                limits: (limits != LimitsPatch::default()).then_some(limits),
                max_component_bytes: a.max_component_bytes,
                max_context_bytes: a.max_context_bytes,
                max_state_bytes: a.max_state_bytes,
                allowed_outbound_hosts: (a.no_outbound || !a.allow_outbound.is_empty())
                    .then_some(a.allow_outbound),
                models: (a.no_models || !a.models.is_empty()).then_some(a.models),
                max_tokens_per_job: a.max_tokens_per_job,
            };
            finish(
                a.conn.output,
                client(&a.conn)?.patch_tenant(&a.id, &patch).await,
            )
        }
        TenantCmd::Ledger {
            id,
            page,
            csv,
            conn,
        } => {
            let c = client(&conn)?;
            let page = Page::from(page);
            if csv {
                match c.ledger_csv(&id, &page).await {
                    Ok(text) => {
                        print!("{text}");
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => finish::<()>(conn.output, Err(e)),
                }
            } else {
                finish(conn.output, c.ledger(&id, &page).await)
            }
        }
        TenantCmd::Usage {
            id,
            from,
            to,
            by,
            conn,
        } => {
            let window = UsageWindow { from, to, by };
            finish(conn.output, client(&conn)?.usage(&id, &window).await)
        }
    }
}
