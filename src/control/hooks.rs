//! HOOKS (`lua/hooks.lua`): the callback deliveries owed for finished jobs
//! with a `callback_url`, taken under a lease by the API's dispatcher
//! (`crate::callbacks`) and then done or made due again.

use super::*;

/// A callback due now, taken under a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueHook {
    pub shard: u32,
    pub job: String,
    pub tenant: TenantId,
    pub url: String,
    /// Attempts already made (by any dispatcher).
    pub attempts: u32,
}

/// How a hook ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed.
    Failed,
    /// The egress rules refused the address (no attempt is made).
    Refused,
}

impl HookOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HookOutcome::Delivered => "delivered",
            HookOutcome::Failed => "failed",
            HookOutcome::Refused => "refused",
        }
    }
}

/// ARGV of `lua/hooks.lua`, in its header's order per op.
enum HooksArgs<'a> {
    Take {
        most: u32,
        lease_ms: u64,
    },
    Done {
        job: &'a str,
        outcome: HookOutcome,
        attempts: u32,
    },
    Later {
        job: &'a str,
        delay_ms: u64,
        attempts: u32,
        state: &'a str,
    },
}

impl HooksArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        match self {
            HooksArgs::Take { most, lease_ms } => {
                inv.arg("take").arg(*most).arg(*lease_ms);
            }
            HooksArgs::Done {
                job,
                outcome,
                attempts,
            } => {
                inv.arg("done")
                    .arg(*job)
                    .arg(outcome.as_str())
                    .arg(*attempts);
            }
            HooksArgs::Later {
                job,
                delay_ms,
                attempts,
                state,
            } => {
                inv.arg("later")
                    .arg(*job)
                    .arg(*delay_ms)
                    .arg(*attempts)
                    .arg(*state);
            }
        }
    }
}

impl ControlPlane {
    async fn hooks_call(&self, shard: u32, args: HooksArgs<'_>) -> Result<Value, CpError> {
        let mut inv = scripts::HOOKS.key(self.keys.anchor(shard));
        args.write(&mut inv);
        self.eval(&mut inv, shard).await
    }

    /// Takes up to `most` callbacks due now on `shard`; each is due again
    /// `lease_ms` later unless [`hook_done`](Self::hook_done) or
    /// [`hook_later`](Self::hook_later) is called first.
    pub async fn take_hooks(
        &self,
        shard: u32,
        most: u32,
        lease_ms: u64,
    ) -> Result<Vec<DueHook>, CpError> {
        let v = self
            .hooks_call(
                shard,
                HooksArgs::Take {
                    most: most.clamp(1, 1000),
                    lease_ms: lease_ms.max(1),
                },
            )
            .await?;
        let mut r = Reply::new("HOOKS", &v)?;
        let mut out = Vec::new();
        while !r.is_done() {
            out.push(DueHook {
                shard,
                job: r.string("job")?,
                tenant: TenantId::parse(&r.string("tenant")?)
                    .map_err(|e| bad(format!("HOOKS answered a bad tenant id: {e}")))?,
                url: r.string("callback_url")?,
                attempts: r.uint("attempts")?,
            });
        }
        r.end()?;
        Ok(out)
    }

    /// Ends a hook: removes it and records the outcome on the job. False
    /// when it was no longer owed (the job is gone).
    pub async fn hook_done(
        &self,
        hook: &DueHook,
        outcome: HookOutcome,
        attempts: u32,
    ) -> Result<bool, CpError> {
        let v = self
            .hooks_call(
                hook.shard,
                HooksArgs::Done {
                    job: &hook.job,
                    outcome,
                    attempts,
                },
            )
            .await?;
        Self::hook_status(&v)
    }

    /// Makes a hook due again in `delay_ms`; `retrying` after a failed
    /// attempt, `pending` when it was only put off.
    pub async fn hook_later(
        &self,
        hook: &DueHook,
        delay_ms: u64,
        attempts: u32,
        retrying: bool,
    ) -> Result<bool, CpError> {
        let v = self
            .hooks_call(
                hook.shard,
                HooksArgs::Later {
                    job: &hook.job,
                    delay_ms,
                    attempts,
                    state: if retrying { "retrying" } else { "pending" },
                },
            )
            .await?;
        Self::hook_status(&v)
    }

    fn hook_status(v: &Value) -> Result<bool, CpError> {
        let (s, r) = Reply::status("HOOKS", v)?;
        match s {
            Status::Ok => r.end().map(|()| true),
            Status::NotFound => r.end().map(|()| false),
            other => Err(r.unexpected(other)),
        }
    }
}
