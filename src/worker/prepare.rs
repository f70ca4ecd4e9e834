//! From a claim to a run request: the component and contexts from the
//! host's caches (fetched from the control plane on a miss), and what the
//! job may spend on outgoing HTTP requests.

use super::Shared;
use crate::control::{Claim, CpError};
use crate::host::{EgressGrant, HostError, InferenceGrant, RunRequest};
use crate::model::ErrorKind;
use tokio_util::sync::CancellationToken;

/// Loads what the claim needs from the host caches.
pub(super) async fn prepare(
    shared: &Shared,
    claim: &Claim,
    cancel: CancellationToken,
) -> Result<RunRequest, PrepError> {
    let control = shared.control.clone();
    let digest = claim.component.clone();
    let component = shared
        .host
        .component(&claim.component, || async move {
            control
                .component_bytes(&digest)
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        .map_err(|e| match e {
            // Not the guest's doing (a store that lost it, a replica that
            // lags): a node fault, released uncharged and bounded per job
            // by the control plane, never a `trap` charged to the tenant.
            HostError::NotFound(d) => {
                // "stage: cause", as `fault_for_tenant` shows the tenant only the stage.
                PrepError::Fatal(
                    ErrorKind::NodeFault,
                    format!("loading the component: {d} not found"),
                )
            }
            // Will never compile here: a final failure, not a release (a
            // release would hand it to the next worker to fail again, forever).
            HostError::Invalid(why) => PrepError::Fatal(ErrorKind::InvalidComponent, why),
            HostError::Other(e) => PrepError::Transient(format!("loading the component: {e:#}")),
        })?;
    let mut contexts = Vec::with_capacity(claim.contexts.len());
    for (name, digest) in &claim.contexts {
        let control = shared.control.clone();
        let d = digest.clone();
        let ctx = shared
            .host
            .context(digest, || async move {
                control
                    .context_bytes(&d)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("context {d} not found"))
            })
            .await
            .map_err(|e| PrepError::Transient(format!("loading context `{name}`: {e:#}")))?;
        contexts.push((name.clone(), ctx));
    }
    // Its tenant's secrets, opened here, only for an agent that reads them.
    let config = if component.reads_config() {
        shared
            .control
            .open_secrets(&claim.lease.tenant)
            .await
            .map_err(|e| match e {
                // Sealed under another key: this node is misconfigured.
                CpError::Internal(why) | CpError::Invalid(why) => PrepError::Fatal(
                    ErrorKind::NodeFault,
                    format!("opening the tenant's secrets: {why}"),
                ),
                other => PrepError::Transient(format!("reading the tenant's secrets: {other}")),
            })?
    } else {
        Vec::new()
    };
    Ok(RunRequest {
        tenant: claim.lease.tenant.clone(),
        job_id: claim.lease.job_id.clone(),
        component,
        input: claim.input.clone(),
        limits: claim.limits,
        contexts,
        state: claim.state.clone(),
        cancel,
        egress: grant(shared, claim),
        config,
        inference: InferenceGrant {
            models: claim.models.clone(),
            max_tokens: claim.max_tokens,
            weight: claim.weight,
        },
    })
}

/// What the job may spend on outgoing HTTP requests: its tenant's policy
/// as of the claim, and the deployment's egress budget, whose price its
/// reservation holds.
fn grant(shared: &Shared, claim: &Claim) -> EgressGrant {
    let budget = shared.control.egress_budget();
    EgressGrant {
        policy: claim.egress.clone(),
        max_requests: budget.requests_per_job,
        max_bytes: budget.kib_per_job.saturating_mul(1024),
    }
}

pub(super) enum PrepError {
    /// Will not get better by retrying on this node soon (Redis hiccup,
    /// cache pressure): give the job back uncharged.
    Transient(String),
    /// The job cannot run at all: fail the attempt with this kind.
    Fatal(ErrorKind, String),
}
