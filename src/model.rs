//! The types every box shares: job states, error kinds, limits, usage and the
//! job/tenant records the API returns. They serialize exactly as the README's
//! "The HTTP API" section spells them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub mod grants;
mod ids;
pub use ids::{InvalidTenantId, TenantId};

/// Writes each variant's wire name once and derives from that table
/// `ALL`, `as_str`, `Display` and `FromStr` (whose error names `what`).
/// The serde names (`rename_all = "snake_case"`) are the same strings; a
/// unit test checks they agree.
macro_rules! wire_names {
    ($ty:ident, $what:literal, { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: [$ty; [$($s),+].len()] = [$($ty::$v),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$v => $s),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::ALL
                    .into_iter()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!(concat!("unknown ", $what, " `{}`"), s))
            }
        }
    };
}

/// Life cycle of a job (README, "The HTTP API").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Delayed,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

wire_names!(JobState, "job state", {
    Queued => "queued",
    Delayed => "delayed",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl JobState {
    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Why an attempt or a job failed (README, "Jobs: error kinds").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// `run` returned `Err`: retried up to `max_attempts`.
    AgentError,
    /// The guest trapped (unreachable, out-of-bounds, stack overflow): retried.
    Trap,
    /// The attempt used its fuel: final.
    FuelExhausted,
    /// The instance or the tenant's node budget refused more memory: final.
    MemoryLimit,
    /// Wall-clock deadline: final.
    Timeout,
    /// Attempts lost to dead workers used up `max_attempts`.
    LeaseExpired,
    /// Cancelled by the tenant.
    Cancelled,
    /// The node, not the guest, failed the run (it could not load or
    /// instantiate what the job needs for reasons of its own). Never
    /// charged, never counted toward `max_attempts`; the job runs again
    /// until it has met the deployment's bound of node faults (default 5),
    /// then fails with this kind.
    NodeFault,
    /// The component can never compile or instantiate under the workers'
    /// engine: final.
    InvalidComponent,
    /// The control plane found the queued job can never run as its tenant
    /// stands (needs more GPUs than `max_gpus`, or reserves more than the
    /// whole balance): failed at once so it does not block the queue.
    Unschedulable,
}

wire_names!(ErrorKind, "error kind", {
    AgentError => "agent_error",
    Trap => "trap",
    FuelExhausted => "fuel_exhausted",
    MemoryLimit => "memory_limit",
    Timeout => "timeout",
    LeaseExpired => "lease_expired",
    Cancelled => "cancelled",
    NodeFault => "node_fault",
    InvalidComponent => "invalid_component",
    Unschedulable => "unschedulable",
});

impl ErrorKind {
    /// Whether another attempt may succeed. Limits are final: running the
    /// same code under the same limits would hit them again and bill again.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::AgentError | ErrorKind::Trap)
    }
}

/// Per-attempt resource limits. A tenant has defaults; a job may only lower them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Limits {
    /// Wasm fuel (roughly instructions) one attempt may burn.
    pub fuel: u64,
    /// Linear memory one instance may grow to.
    pub memory_bytes: u64,
    /// Wall-clock time one attempt may hold a slot.
    pub timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 1_000_000_000,
            memory_bytes: 64 << 20,
            timeout_ms: 30_000,
        }
    }
}

/// What an attempt (or the whole job) consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub fuel: u64,
    pub wall_ms: u64,
    pub credits: i64,
    /// Outgoing HTTP requests its agent sent (`wasi:http`), all attempts.
    #[serde(default)]
    pub http_requests: u64,
    /// Their bytes, both ways (heads and bodies).
    #[serde(default)]
    pub http_bytes: u64,
    /// Tokens its inference calls read (prompts, embedded texts), all
    /// attempts.
    #[serde(default)]
    pub tokens_in: u64,
    /// Tokens they generated.
    #[serde(default)]
    pub tokens_out: u64,
}

/// `{"kind", "message"}` of a failed job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    pub kind: ErrorKind,
    pub message: String,
}

/// A job as the API shows it (`GET /v1/jobs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: String,
    pub tenant: String,
    pub state: JobState,
    pub component: String,
    pub attempts: u32,
    pub output: Option<String>,
    pub error: Option<JobError>,
    pub usage: Usage,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub max_attempts: u32,
    /// The job's `callback_url` and its delivery, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
}

/// A job's callback: where its result is delivered and how that went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Callback {
    pub url: String,
    /// `pending` (owed, not tried yet), `retrying`, `delivered`, `failed`
    /// (every attempt failed) or `refused` (the egress rules refused it).
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
}

/// Agent ids and context names share the same bound: printable, no
/// separators that could forge another key.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' || b == b'/')
}

/// Milliseconds since the Unix epoch, formatted as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(ms as i64);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_else(|_| ms.to_string())
}

/// The wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// --- tenant request shapes (API bodies, the control plane's arguments) ---

/// `POST /v1/tenants` body. Unknown fields are refused; every integer is
/// bounded by [`crate::num`] (|n| <= 2^53 - 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub id: TenantId,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, deserialize_with = "crate::num::i53")]
    pub credits: i64,
    #[serde(default = "big")]
    pub max_running: u32,
    #[serde(default = "big")]
    pub max_queued: u32,
    #[serde(default)]
    pub max_gpus: u32,
    #[serde(default)]
    pub limits: Option<LimitsPatch>,
    /// Bytes of components the tenant may store (default 1 GiB).
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_component_bytes: Option<u64>,
    /// Bytes of contexts the tenant may store (default 4 GiB).
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_context_bytes: Option<u64>,
    /// Bytes of agent state the tenant may store, all agents together
    /// (default 1 GiB).
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_state_bytes: Option<u64>,
    /// Where the tenant's agents may send HTTP requests (`wasi:http`):
    /// `scheme://host[:port]` rules, `*.` for any subdomain (default: none,
    /// every request refused). See README, "Outbound HTTP".
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// The node models its agents may call (`inference`), each at a price
    /// per 1,000 tokens in and out (default: none).
    #[serde(default)]
    pub models: Vec<grants::ModelGrant>,
    /// Tokens in and out one job may spend on inference: a job may ask
    /// for fewer (`max_tokens`), never more (default 4096).
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_tokens_per_job: Option<u64>,
}

fn one() -> u32 {
    1
}
fn big() -> u32 {
    1_000_000
}

/// Optional limits (tenant creation and `PATCH`), each at most 2^53 - 1.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub fuel: Option<u64>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub memory_bytes: Option<u64>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub timeout_ms: Option<u64>,
}

/// `PATCH /v1/tenants/{id}` body (unknown fields refused).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    pub weight: Option<u32>,
    pub max_running: Option<u32>,
    pub max_queued: Option<u32>,
    pub max_gpus: Option<u32>,
    pub limits: Option<LimitsPatch>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_component_bytes: Option<u64>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_context_bytes: Option<u64>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_state_bytes: Option<u64>,
    /// Replaces the whole list (`[]` allows nothing again).
    pub allowed_outbound_hosts: Option<Vec<String>>,
    /// Replaces the whole list of model grants (`[]` allows none again).
    pub models: Option<Vec<grants::ModelGrant>>,
    #[serde(default, deserialize_with = "crate::num::opt_u53")]
    pub max_tokens_per_job: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_kinds_round_trip_through_their_names() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        for k in ErrorKind::ALL {
            assert_eq!(k.as_str().parse::<ErrorKind>().unwrap(), k);
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert_eq!(ErrorKind::ALL.len(), 10);
        assert!("running2".parse::<JobState>().is_err());
    }

    #[test]
    fn rfc3339_has_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
