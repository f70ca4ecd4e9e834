//! SUBMIT (`lua/submit.lua`): a job enters its tenant's queue, at most once
//! per idempotency key.

use super::*;

/// A submission after the API resolved names: what the SUBMIT script stores.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitSpec {
    pub component: String,
    pub input: String,
    pub agent_id: Option<String>,
    /// `(name, digest)` of each mounted context, fixed at submission.
    pub contexts: Vec<(String, String)>,
    pub gpus: u32,
    pub max_attempts: u32,
    /// Per-job limits (already checked to be at most the tenant's); `None`
    /// keeps the tenant's value at claim time.
    pub timeout_ms: Option<u64>,
    pub fuel: Option<u64>,
    pub delay_ms: u64,
    /// `Idempotency-Key` header and the sha256 of the request body.
    pub idempotency: Option<(String, String)>,
    /// Where the job's result is delivered once it is finished (already
    /// checked against the deployment's egress rules).
    pub callback_url: Option<String>,
}

/// What SUBMIT answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: String,
    pub state: JobState,
    /// False when an idempotent replay found the existing job.
    pub created: bool,
}

/// ARGV of `lua/submit.lua`, in its header's order. An absent limit
/// (`timeout_ms`, `fuel`) is an empty string: the tenant's applies.
struct SubmitArgs<'a> {
    tenant: &'a str,
    job: &'a str,
    spec: &'a SubmitSpec,
    contexts: &'a str,
    body_hash: &'a str,
    idempotency_ttl_s: u64,
    prices: [u64; 4],
}

impl SubmitArgs<'_> {
    fn write(&self, inv: &mut redis::ScriptInvocation<'_>) {
        let s = self.spec;
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        inv.arg(self.tenant)
            .arg(self.job)
            .arg(&s.component)
            .arg(&s.input)
            .arg(s.agent_id.as_deref().unwrap_or_default())
            .arg(self.contexts)
            .arg(s.gpus)
            .arg(s.max_attempts)
            .arg(opt(s.timeout_ms))
            .arg(opt(s.fuel))
            .arg(s.delay_ms)
            .arg(self.body_hash)
            .arg(self.idempotency_ttl_s);
        for p in self.prices {
            inv.arg(p);
        }
        inv.arg(s.callback_url.as_deref().unwrap_or_default());
    }
}

impl ControlPlane {
    pub async fn submit(&self, tenant: &str, spec: &SubmitSpec) -> Result<Submitted, CpError> {
        if !crate::model::valid_tenant_id(tenant) {
            return Err(CpError::NotFound);
        }
        if spec.max_attempts == 0 {
            return Err(CpError::Invalid("max_attempts must be at least 1".into()));
        }
        let id = ulid::Ulid::new().to_string();
        let (idem_key, body_hash) = match &spec.idempotency {
            Some((k, h)) => (
                self.keys.idempotency(tenant, &sha256_hex(k.as_bytes())),
                h.clone(),
            ),
            None => (self.keys.idempotency(tenant, "-"), String::new()),
        };
        let contexts = serde_json::to_string(&spec.contexts).map_err(|e| bad(e.to_string()))?;
        let mut inv = scripts::SUBMIT.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.tenant(tenant))
            .key(self.keys.job(tenant, &id))
            .key(idem_key);
        SubmitArgs {
            tenant,
            job: &id,
            spec,
            contexts: &contexts,
            body_hash: &body_hash,
            idempotency_ttl_s: self.idempotency_ttl_s(),
            prices: self.prices(),
        }
        .write(&mut inv);
        let v: Value = self.eval(&mut inv, self.keys.shard_of(tenant)).await?;
        let (s, mut r) = Reply::status("SUBMIT", &v)?;
        match s {
            Status::Created | Status::Exists => {
                let id = r.string("job id")?;
                let state = r.string("state")?;
                r.end()?;
                let state = state
                    .parse::<JobState>()
                    .map_err(|_| bad(format!("SUBMIT answered the state `{state}`")))?;
                Ok(Submitted {
                    id,
                    state,
                    created: s == Status::Created,
                })
            }
            Status::Conflict => Err(CpError::IdempotencyConflict),
            Status::NoTenant => Err(CpError::NotFound),
            Status::QueueFull => Err(CpError::QueueFull),
            Status::Credits => Err(CpError::InsufficientCredits),
            other => Err(r.unexpected(other)),
        }
    }
}
