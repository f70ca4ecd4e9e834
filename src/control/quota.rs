//! Per-tenant byte quotas on what a tenant stores: component uploads
//! (`max_component_bytes`), context uploads (`max_context_bytes`) and agent
//! states (`max_state_bytes`). Each is charged by `lua/usage.lua` before the
//! bytes are written, so a refused upload writes nothing; a charge whose
//! bytes end up not stored (the write failed, FINALIZE did not commit the
//! state) is refunded, so usage is what is stored.

use super::limits::{
    DEFAULT_MAX_COMPONENT_BYTES, DEFAULT_MAX_CONTEXT_BYTES, DEFAULT_MAX_STATE_BYTES,
    ITEM_OVERHEAD_BYTES,
};
use super::reply::{Reply, Status};
use super::{AttemptOutcome, ControlPlane, CpError, Finish, Lease, scripts};
use crate::model::{ErrorKind, TenantId};
use redis::{AsyncCommands, Value};

/// What a byte quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Component,
    Context,
    State,
}

impl Stored {
    fn kind(self) -> &'static str {
        match self {
            Stored::Component => "component",
            Stored::Context => "context",
            Stored::State => "state",
        }
    }

    fn default_quota(self) -> u64 {
        match self {
            Stored::Component => DEFAULT_MAX_COMPONENT_BYTES,
            Stored::Context => DEFAULT_MAX_CONTEXT_BYTES,
            Stored::State => DEFAULT_MAX_STATE_BYTES,
        }
    }
}

/// One charge made by [`ControlPlane::charge_bytes`]: what it needs to be
/// undone exactly ([`ControlPlane::refund_bytes`]) when the bytes it paid
/// for are not stored after all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    tenant: String,
    what: Stored,
    item: String,
    /// What the item counted before (0: nothing).
    before: u64,
    /// What this charge set it to.
    charged: u64,
}

/// ARGV of `lua/usage.lua`, in its header's order. A refund sets the item
/// back to `size` (its size before) only if it is still at `refund_of`.
struct UsageArgs<'a> {
    tenant: &'a str,
    what: Stored,
    item: &'a str,
    size: u64,
    refund_of: Option<u64>,
}

impl UsageArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.tenant)
            .arg(self.what.kind())
            .arg(self.item)
            .arg(self.size)
            .arg(self.what.default_quota());
        if let Some(charged) = self.refund_of {
            inv.arg("refund").arg(charged);
        }
    }
}

impl ControlPlane {
    /// Charges `size` bytes of `item` (plus [`ITEM_OVERHEAD_BYTES`]) to the
    /// tenant's quota for `what`; `QuotaExceeded` (naming the quota) when it
    /// does not fit. The caller refunds the [`Charge`] if the write fails.
    pub async fn charge_bytes(
        &self,
        tenant: &TenantId,
        what: Stored,
        item: &str,
        size: u64,
    ) -> Result<Charge, CpError> {
        let charged = size.saturating_add(ITEM_OVERHEAD_BYTES);
        let mut inv = scripts::USAGE.key(self.keys.tenant_anchor(tenant));
        inv.key(self.keys.tenant(tenant));
        UsageArgs {
            tenant,
            what,
            item,
            size: charged,
            refund_of: None,
        }
        .write(&mut inv);
        let v: Value = self.eval(&mut inv, self.keys.shard_of(tenant)).await?;
        let (s, mut r) = Reply::status("USAGE", &v)?;
        match s {
            Status::Ok => {
                let _used = r.int("used")?;
                let before = r.uint("size before")?;
                r.end()?;
                Ok(Charge {
                    tenant: tenant.to_string(),
                    what,
                    item: item.to_string(),
                    before,
                    charged,
                })
            }
            Status::NoTenant => Err(CpError::NotFound),
            Status::Quota => {
                let (limit, used, extra) = (r.int("limit")?, r.int("used")?, r.int("extra")?);
                r.end()?;
                Err(CpError::QuotaExceeded(format!(
                    "quota `max_{}_bytes` exceeded: the tenant's limit is {limit} bytes, {used} \
                     are in use and this needs {extra} more",
                    what.kind(),
                )))
            }
            other => Err(r.unexpected(other)),
        }
    }

    /// Undoes `charge` (its bytes were not stored: the write failed, or
    /// FINALIZE did not commit the state), unless a later charge of the
    /// same item moved it since (that one then counts the item). Without
    /// this the bytes stayed counted until the item was stored again.
    pub async fn refund_bytes(&self, charge: &Charge) -> Result<(), CpError> {
        let mut inv = scripts::USAGE.key(self.keys.tenant_anchor(&charge.tenant));
        inv.key(self.keys.tenant(&charge.tenant));
        UsageArgs {
            tenant: &charge.tenant,
            what: charge.what,
            item: &charge.item,
            size: charge.before,
            refund_of: Some(charge.charged),
        }
        .write(&mut inv);
        let v: Value = self
            .eval(&mut inv, self.keys.shard_of(&charge.tenant))
            .await?;
        match Reply::status("USAGE refund", &v)? {
            (Status::Ok | Status::Moved | Status::NoTenant, _) => Ok(()),
            (other, r) => Err(r.unexpected(other)),
        }
    }

    /// Runs `write` after `charge`; if it fails, refunds the charge (best
    /// effort: a refund that fails too is logged) and answers the write's
    /// error.
    pub(super) async fn refund_on_err<T>(
        &self,
        charge: Charge,
        write: Result<T, CpError>,
    ) -> Result<T, CpError> {
        if write.is_err()
            && let Err(e) = self.refund_bytes(&charge).await
        {
            tracing::warn!(error = %e, "byte quota refund failed");
        }
        write
    }

    /// Before FINALIZE commits a new agent state: charges it to
    /// `max_state_bytes`. Over the quota, the attempt fails instead
    /// (`agent_error`, retried: the tenant's other agents may shrink) and
    /// the state is not written. Answers that replacement finish, or the
    /// charge made (to refund if FINALIZE does not commit the state).
    pub(super) async fn charge_state(
        &self,
        lease: &Lease,
        finish: &Finish,
    ) -> Result<(Option<Finish>, Option<Charge>), CpError> {
        let (Some(state), AttemptOutcome::Succeeded { .. }) = (&finish.new_state, &finish.outcome)
        else {
            return Ok((None, None));
        };
        let agent: Option<String> = self
            .conn()
            .hget(self.keys.job(&lease.tenant, &lease.job_id), "agent_id")
            .await?;
        let Some(agent) = agent.filter(|a| !a.is_empty()) else {
            return Ok((None, None));
        };
        match self
            .charge_bytes(&lease.tenant, Stored::State, &agent, state.len() as u64)
            .await
        {
            Ok(charge) => Ok((None, Some(charge))),
            Err(CpError::QuotaExceeded(msg)) => Ok((
                Some(Finish {
                    outcome: AttemptOutcome::Failed {
                        kind: ErrorKind::AgentError,
                        message: format!("quota_exceeded: the agent state was not saved: {msg}"),
                    },
                    new_state: None,
                    ..finish.clone()
                }),
                None,
            )),
            Err(e) => Err(e),
        }
    }
}
