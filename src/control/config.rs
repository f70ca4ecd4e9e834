//! What a control-plane process is configured with: prices and the
//! [`ControlConfig`] every script call reads its bounds from.

use super::*;

/// Prices turn usage into integer credits. An attempt is charged
///
/// ```text
/// ceil(fuel * credits_per_mfuel / 10^6)
///   + ceil(wall_ms * (credits_per_slot_second * (1 + gpus * gpu_slot_weight)
///                     + gpus * credits_per_gpu_second) / 1000)
/// ```
///
/// capped at what CLAIM reserved: the same formula with all the job's fuel
/// and its whole timeout (`lua/lib.lua`, `charge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    /// Credits per million units of fuel.
    pub credits_per_mfuel: u64,
    /// Credits per GPU-second of wall time.
    pub credits_per_gpu_second: u64,
    /// How much slot-time one GPU weighs in fair share and in the slot
    /// price, relative to a CPU slot.
    pub gpu_slot_weight: u64,
    /// Credits per slot-second of wall time: capacity is paid for even
    /// when the guest burns no fuel (parked in a host call, sleeping).
    pub credits_per_slot_second: u64,
    /// Credits per outgoing HTTP request an agent sends (`wasi:http`).
    pub credits_per_http_request: u64,
    /// Credits per KiB of outgoing HTTP traffic, both ways together
    /// (heads and bodies; a started KiB counts whole).
    pub credits_per_http_kib: u64,
}

impl Prices {
    /// What a run's outgoing requests cost: `requests` sent and `bytes`
    /// both ways.
    pub fn http_cost(&self, requests: u64, bytes: u64) -> u64 {
        requests
            .saturating_mul(self.credits_per_http_request)
            .saturating_add(
                bytes
                    .div_ceil(1024)
                    .saturating_mul(self.credits_per_http_kib),
            )
    }
}

/// What one job may spend on outgoing HTTP requests (`wasi:http`): the
/// host refuses past it, and a job that can make requests reserves its
/// price ([`Prices::http_cost`] of the whole budget) at the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressBudget {
    /// Requests one job may make, refused ones included.
    pub requests_per_job: u32,
    /// KiB one job may send and receive, heads and bodies, in all.
    pub kib_per_job: u64,
}

impl Default for EgressBudget {
    fn default() -> Self {
        EgressBudget {
            requests_per_job: 64,
            kib_per_job: 64 << 10,
        }
    }
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            credits_per_mfuel: 1,
            credits_per_gpu_second: 100,
            gpu_slot_weight: 10,
            credits_per_slot_second: 1,
            credits_per_http_request: 1,
            credits_per_http_kib: 0,
        }
    }
}

/// Deployment-wide control-plane settings. Every process of one deployment
/// must agree on `prefix` and `shards`.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub prefix: String,
    /// Tenants are spread over this many hash-tagged shards.
    pub shards: u32,
    pub lease_ms: u64,
    pub prices: Prices,
    /// What one job may spend on outgoing HTTP requests.
    pub egress: EgressBudget,
    /// Seals tenants' secrets (API) and opens them (workers); `None`: no
    /// secrets on this deployment. Every process must hold the same.
    pub secrets_key: Option<crate::secrets::SecretsKey>,
    pub idempotency_ttl_s: u64,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Agent states larger than this go to the blob tier.
    pub state_inline_max: usize,
    /// Tenant limits when a tenant is created without them.
    pub default_limits: Limits,
    /// Bytes of an attempt's log kept.
    pub log_max_bytes: usize,
    /// How long finished jobs (with their logs and idempotency keys) and
    /// ledger entries are kept before the scheduler's sweep removes them
    /// (ledger entries are folded into the tenant's checkpoint).
    pub retention_ms: u64,
    /// Node faults (runs a node could not start or finish for reasons of
    /// its own) a job may meet before it fails with `node_fault`. Each one
    /// is uncharged and uncounted; the bound stops a job no node can run
    /// from cycling through the queue forever.
    pub max_node_faults: u32,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            prefix: "ap".into(),
            shards: 1,
            lease_ms: 10_000,
            prices: Prices::default(),
            egress: EgressBudget::default(),
            secrets_key: None,
            idempotency_ttl_s: 24 * 3600,
            retry_base_ms: 500,
            retry_max_ms: 60_000,
            state_inline_max: 64 << 10,
            default_limits: Limits::default(),
            log_max_bytes: 128 << 10,
            retention_ms: 7 * 24 * 3600 * 1000,
            max_node_faults: DEFAULT_MAX_NODE_FAULTS,
        }
    }
}
