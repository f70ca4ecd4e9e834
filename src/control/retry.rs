//! RETRY (`lua/retry.lua`): a failed job runs again as a new attempt of
//! the same job.

use super::*;

/// ARGV of `lua/retry.lua`, in its header's order.
struct RetryArgs<'a> {
    tenant: &'a str,
    job: &'a str,
    prices: [u64; 4],
}

impl RetryArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.tenant).arg(self.job);
        for p in self.prices {
            inv.arg(p);
        }
    }
}

impl ControlPlane {
    /// Puts the tenant's failed job `id` back at the end of its ready
    /// queue, same id, counted attempts reset: its next claim is its next
    /// run, reserved and settled as any. Admitted as SUBMIT admits a job
    /// (`QueueFull`, `InsufficientCredits`); `NotFailed` when the job is in
    /// any other state (of two concurrent retries, one wins). Answers the
    /// state it is in now.
    pub async fn retry_job(&self, tenant: &TenantId, id: &str) -> Result<JobState, CpError> {
        if ulid::Ulid::from_string(id).is_err() {
            return Err(CpError::NotFound);
        }
        let mut inv = scripts::RETRY.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.job(tenant, id))
            .key(self.keys.tenant(tenant));
        RetryArgs {
            tenant: tenant.as_str(),
            job: id,
            prices: self.prices(),
        }
        .write(&mut inv);
        let v: Value = self.eval(&mut inv, self.keys.shard_of(tenant)).await?;
        let (s, mut r) = Reply::status("RETRY", &v)?;
        let state = |r: &mut Reply<'_>| -> Result<JobState, CpError> {
            let s = r.string("state")?;
            s.parse()
                .map_err(|_| bad(format!("RETRY answered the state `{s}`")))
        };
        let out = match s {
            Status::Ok => Ok(state(&mut r)?),
            Status::Conflict => Err(CpError::NotFailed(state(&mut r)?)),
            Status::NotFound => Err(CpError::NotFound),
            Status::QueueFull => Err(CpError::QueueFull),
            Status::Credits => {
                let _reservation: i64 = r.int("reservation")?;
                let _balance: i64 = r.int("balance")?;
                Err(CpError::InsufficientCredits)
            }
            Status::Insufficient => {
                let gpus: u32 = r.uint("gpus")?;
                let max: u32 = r.uint("max_gpus")?;
                Err(CpError::Invalid(format!(
                    "the job needs {gpus} GPUs but its tenant may hold at most {max} (max_gpus)"
                )))
            }
            other => return Err(r.unexpected(other)),
        };
        r.end()?;
        out
    }
}
