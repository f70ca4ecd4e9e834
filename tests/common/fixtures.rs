//! Control-plane fixtures shared by the tests that drive `ControlPlane`
//! directly: a tenant with room for anything and a plain job spec. Tests
//! change the one field they are about with struct-update syntax.

use agentplane::control::{SubmitSpec, TenantSpec};
use agentplane::model::TenantId;

/// A component digest nothing needs to exist for (the control plane never
/// reads the component; only the API checks it was uploaded).
pub const ZERO_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// `s` as a tenant id; the tests' ids are all valid, so a bad one is the
/// test's own bug.
pub fn tid(s: &str) -> TenantId {
    TenantId::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

/// Tenant `id` with `credits`, weight 1 and no quota in the way.
pub fn tenant_spec(id: &str, credits: i64) -> TenantSpec {
    TenantSpec {
        id: tid(id),
        weight: 1,
        credits,
        max_running: 1_000_000,
        max_queued: 1_000_000,
        max_gpus: 0,
        limits: None,
        max_component_bytes: None,
        max_context_bytes: None,
        max_state_bytes: None,
        allowed_outbound_hosts: Default::default(),
        models: Vec::new(),
        max_tokens_per_job: None,
    }
}

/// A CPU job of [`ZERO_DIGEST`] with `input`, 3 attempts, the tenant's limits.
pub fn submit_spec(input: &str) -> SubmitSpec {
    SubmitSpec {
        component: ZERO_DIGEST.into(),
        input: input.into(),
        agent_id: None,
        contexts: vec![],
        gpus: 0,
        max_attempts: 3,
        timeout_ms: None,
        fuel: None,
        delay_ms: 0,
        idempotency: None,
        callback_url: None,
        outbound_http: false,
        max_tokens: 0,
        tokens_reserve: 0,
    }
}
