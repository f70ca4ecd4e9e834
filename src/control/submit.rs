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
    /// Its component can make outgoing HTTP requests
    /// (`ComponentMeta::outbound_http`): each attempt reserves the price of
    /// the whole egress budget ([`EgressBudget`]) with its fuel and time.
    pub outbound_http: bool,
    /// Tokens each attempt may spend on inference (0: its component calls
    /// no model), at most the tenant's `max_tokens_per_job`.
    pub max_tokens: u64,
    /// Credits each attempt reserves for them
    /// (`model::grants::reserve` at the tenant's prices).
    pub tokens_reserve: u64,
}

/// What SUBMIT answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: String,
    pub state: JobState,
    /// False when an idempotent replay found the existing job.
    pub created: bool,
}

/// ARGV of `lua/submit.lua`, in its header's order: the call's settings,
/// then each job's fields.
struct SubmitArgs<'a> {
    tenant: &'a str,
    idempotency_ttl_s: u64,
    prices: [u64; 4],
    jobs: Vec<SubmitJob<'a>>,
}

/// One job's fields in SUBMIT's ARGV. An absent limit (`timeout_ms`,
/// `fuel`) is an empty string: the tenant's applies.
struct SubmitJob<'a> {
    job: String,
    spec: &'a SubmitSpec,
    contexts: String,
    body_hash: &'a str,
    /// Credits each attempt reserves for its outgoing requests.
    http_reserve: u64,
}

impl SubmitArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.tenant).arg(self.idempotency_ttl_s);
        for p in self.prices {
            inv.arg(p);
        }
        inv.arg(self.jobs.len());
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        for j in &self.jobs {
            let s = j.spec;
            inv.arg(&j.job)
                .arg(&s.component)
                .arg(&s.input)
                .arg(s.agent_id.as_deref().unwrap_or_default())
                .arg(&j.contexts)
                .arg(s.gpus)
                .arg(s.max_attempts)
                .arg(opt(s.timeout_ms))
                .arg(opt(s.fuel))
                .arg(s.delay_ms)
                .arg(j.body_hash)
                .arg(s.callback_url.as_deref().unwrap_or_default())
                .arg(j.http_reserve)
                .arg(s.max_tokens)
                .arg(s.tokens_reserve);
        }
    }
}

impl ControlPlane {
    /// SUBMIT of one job: [`ControlPlane::submit_many`] of one.
    pub async fn submit(&self, tenant: &TenantId, spec: &SubmitSpec) -> Result<Submitted, CpError> {
        self.submit_many(tenant, std::slice::from_ref(spec))
            .await?
            .pop()
            .expect("one answer per job")
    }

    /// SUBMIT of a batch of one tenant's jobs in one call: each is decided
    /// as if submitted alone, in order (its own checks, credits, queue
    /// space and idempotency key), so one refused job refuses no other.
    /// Answers are in order; an `Err` of the whole is a call that failed
    /// (it may have run: retry with the idempotency keys).
    pub async fn submit_many(
        &self,
        tenant: &TenantId,
        specs: &[SubmitSpec],
    ) -> Result<Vec<Result<Submitted, CpError>>, CpError> {
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        if specs.iter().any(|s| s.max_attempts == 0) {
            return Err(CpError::Invalid("max_attempts must be at least 1".into()));
        }
        let mut inv = scripts::SUBMIT.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.tenant(tenant));
        let mut jobs = Vec::with_capacity(specs.len());
        for spec in specs {
            let id = ulid::Ulid::new().to_string();
            let (idem_key, body_hash) = match &spec.idempotency {
                Some((k, h)) => (
                    self.keys.idempotency(tenant, &sha256_hex(k.as_bytes())),
                    h.as_str(),
                ),
                None => (self.keys.idempotency(tenant, "-"), ""),
            };
            inv.key(self.keys.job(tenant, &id)).key(idem_key);
            jobs.push(SubmitJob {
                job: id,
                spec,
                contexts: serde_json::to_string(&spec.contexts).map_err(|e| bad(e.to_string()))?,
                body_hash,
                http_reserve: if spec.outbound_http {
                    self.http_reserve()
                } else {
                    0
                },
            });
        }
        SubmitArgs {
            tenant: tenant.as_str(),
            idempotency_ttl_s: self.idempotency_ttl_s(),
            prices: self.prices(),
            jobs,
        }
        .write(&mut inv);
        let v: Value = self.eval(&mut inv, self.keys.shard_of(tenant)).await?;
        let mut all = Reply::new("SUBMIT", &v)?;
        let mut out = Vec::with_capacity(specs.len());
        for _ in specs {
            out.push(Self::submitted(all.item("answer")?));
        }
        all.end()?;
        Ok(out)
    }

    /// One job's answer in SUBMIT's reply.
    fn submitted(v: &Value) -> Result<Submitted, CpError> {
        let (s, mut r) = Reply::status("SUBMIT", v)?;
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
