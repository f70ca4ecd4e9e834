//! The job request body and the answers of the API that have no type
//! elsewhere (jobs, tenants and
//! metadata are `model::Job`, `control::TenantInfo`, `control::ComponentMeta`
//! and `control::ContextMeta`). The handlers serialize them and
//! `client::ApiClient` parses them, so both sides share one shape.

use crate::model::{Job, JobState};
use serde::{Deserialize, Serialize};

/// `POST /v1/jobs` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub component: String,
    pub input: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub contexts: Vec<String>,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub fuel: Option<u64>,
    #[serde(default, deserialize_with = "crate::num::u53")]
    pub delay_ms: u64,
    /// Where the finished job is POSTed, signed (README, "Callbacks"):
    /// `http://` or `https://`, allowed by the deployment's egress rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Tokens in and out each attempt may spend on inference; at most the
    /// tenant's `max_tokens_per_job` (the default). Only a component that
    /// imports `agentplane:agent/inference` reserves for them.
    #[serde(
        default,
        deserialize_with = "crate::num::opt_u53",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_tokens: Option<u64>,
}

/// `POST /v1/jobs` and `POST /v1/jobs/{id}/cancel`: `{"id","state"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRef {
    pub id: String,
    pub state: JobState,
}

/// `GET /v1/jobs`: one page, newest first; `next_cursor` names the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    pub next_cursor: Option<String>,
}

/// `POST /v1/tenants`: the new tenant's token, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantToken {
    pub id: String,
    pub token: String,
}

/// `GET /v1/tenants/{id}/callback-key`: the key that signs the tenant's
/// callbacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallbackKey {
    pub tenant: String,
    /// 64 hex digits; the HMAC-SHA256 key is this text.
    pub key: String,
}

/// `POST /v1/tenants/{id}/credits`: the balance after the grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Balance {
    pub id: String,
    pub balance: i64,
}

/// `GET /v1/admin/tenants`: one page of tenants by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantPage {
    pub tenants: Vec<crate::control::TenantRow>,
    pub next_cursor: Option<String>,
}
