//! CANCEL (`lua/cancel.lua`).

use super::*;

/// ARGV of `lua/cancel.lua`, in its header's order.
struct CancelArgs<'a> {
    tenant: &'a str,
    job: &'a str,
    prices: [u64; 4],
}

impl CancelArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.tenant).arg(self.job);
        for p in self.prices {
            inv.arg(p);
        }
    }
}

impl ControlPlane {
    /// Queued/delayed → cancelled now; running → cancelled at the next
    /// lease check. Answers the state the job was in.
    pub async fn cancel(&self, tenant: &TenantId, id: &str) -> Result<JobState, CpError> {
        if ulid::Ulid::from_string(id).is_err() {
            return Err(CpError::NotFound);
        }
        let mut inv = scripts::CANCEL.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.job(tenant, id));
        CancelArgs {
            tenant,
            job: id,
            prices: self.prices(),
        }
        .write(&mut inv);
        let v: Value = self.eval(&mut inv, self.keys.shard_of(tenant)).await?;
        let (s, mut r) = Reply::status("CANCEL", &v)?;
        match s {
            Status::Ok => {
                let was = r.string("state")?;
                r.end()?;
                was.parse()
                    .map_err(|_| bad(format!("CANCEL answered the state `{was}`")))
            }
            Status::NotFound => Err(CpError::NotFound),
            other => Err(r.unexpected(other)),
        }
    }
}
