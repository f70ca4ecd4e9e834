//! Tenants (admin): create, patch, grant credits, read. One script,
//! `lua/tenant.lua`, makes every change.

use super::*;

/// `{"balance","reserved"}`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Credits {
    pub balance: i64,
    pub reserved: i64,
}

/// `GET /v1/tenants/{id}`: config plus live counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TenantInfo {
    pub id: String,
    pub weight: u32,
    pub max_running: u32,
    pub max_queued: u32,
    pub max_gpus: u32,
    pub limits: Limits,
    pub credits: Credits,
    pub running: u32,
    pub queued: u32,
    pub gpus_in_use: u32,
    /// Sum of all grants (may include negative grants).
    pub granted: i64,
    /// Sum of all settled attempt costs.
    pub settled: i64,
    /// Why the tenant's next queued job is not being handed out, when it
    /// is not: `max_running`, `max_gpus`, `credits` (its reservation is
    /// above the free balance; running jobs will settle, or grant
    /// credits) or `stream_out_of_step`. Absent while eligible or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
    /// Byte quotas and what is stored against them.
    pub storage: Storage,
    /// Where the tenant's agents may send HTTP requests, each rule in
    /// normal form (`scheme://host:port`).
    pub allowed_outbound_hosts: Vec<String>,
    /// The node models its agents may call, at its prices.
    pub models: Vec<crate::model::grants::ModelGrant>,
    /// Tokens in and out one job may spend on inference.
    pub max_tokens_per_job: u64,
}

/// A tenant's byte quotas and usage (`GET /v1/tenants/{id}` `storage`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Storage {
    pub max_component_bytes: u64,
    pub max_context_bytes: u64,
    pub max_state_bytes: u64,
    pub component_bytes: u64,
    pub context_bytes: u64,
    pub state_bytes: u64,
}

/// ARGV of `lua/tenant.lua`, in its header's order: the op, the tenant,
/// the prices, then the op's own arguments (`rest`, listed per op in the
/// script's header).
struct TenantArgs<'a> {
    op: &'a str,
    tenant: &'a str,
    prices: [u64; 4],
    rest: &'a [String],
}

impl TenantArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.op).arg(self.tenant);
        for p in self.prices {
            inv.arg(p);
        }
        for a in self.rest {
            inv.arg(a);
        }
    }
}

/// The `egress` field of TENANT's field list: `allowed_outbound_hosts`
/// checked and stored in normal form.
fn egress_field(list: &[String]) -> Result<[String; 2], CpError> {
    let policy = crate::egress::Policy::parse(list)
        .map_err(|e| CpError::Invalid(format!("allowed_outbound_hosts: {e}")))?;
    Ok(["egress".to_string(), policy.to_stored()])
}

/// The `models` field of TENANT's field list: the grants checked and
/// stored one per line.
fn models_field(list: &[crate::model::grants::ModelGrant]) -> Result<[String; 2], CpError> {
    crate::model::grants::check(list).map_err(|e| CpError::Invalid(format!("models: {e}")))?;
    Ok(["models".to_string(), crate::model::grants::to_stored(list)])
}

/// Checks a tenant's per-job token allowance.
fn max_tokens_field(v: u64) -> Result<(String, u64), CpError> {
    use crate::model::grants::MAX_TOKENS_PER_JOB;
    if v > MAX_TOKENS_PER_JOB {
        return Err(CpError::Invalid(format!(
            "max_tokens_per_job must be at most {MAX_TOKENS_PER_JOB}"
        )));
    }
    Ok(("max_tokens".into(), v))
}

impl ControlPlane {
    fn tenant_fields(limits: Option<&LimitsPatch>, out: &mut Vec<(String, u64)>) {
        if let Some(l) = limits {
            if let Some(v) = l.fuel {
                out.push(("fuel".into(), v));
            }
            if let Some(v) = l.memory_bytes {
                out.push(("memory_bytes".into(), v));
            }
            if let Some(v) = l.timeout_ms {
                out.push(("timeout_ms".into(), v));
            }
        }
    }

    async fn tenant_script(
        &self,
        tenant: &str,
        op: &str,
        extra: &[String],
    ) -> Result<Value, CpError> {
        let mut inv = scripts::TENANT.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.tenant(tenant));
        TenantArgs {
            op,
            tenant,
            prices: self.prices(),
            rest: extra,
        }
        .write(&mut inv);
        self.eval(&mut inv, self.keys.shard_of(tenant)).await
    }

    pub async fn create_tenant(&self, spec: &TenantSpec, token_hash: &str) -> Result<(), CpError> {
        if spec.weight == 0 {
            return Err(CpError::Invalid("weight must be at least 1".into()));
        }
        if spec.credits < 0 {
            return Err(CpError::Invalid("credits must not be negative".into()));
        }
        if spec.credits > MAX_EXACT_INT {
            return Err(CpError::Invalid(format!(
                "credits must be at most {MAX_EXACT_INT}"
            )));
        }
        let d = self.cfg.default_limits;
        let mut fields: Vec<(String, u64)> = vec![
            ("weight".into(), spec.weight as u64),
            ("max_running".into(), spec.max_running as u64),
            ("max_queued".into(), spec.max_queued as u64),
            ("max_gpus".into(), spec.max_gpus as u64),
            (
                "max_component_bytes".into(),
                spec.max_component_bytes
                    .unwrap_or(DEFAULT_MAX_COMPONENT_BYTES),
            ),
            (
                "max_context_bytes".into(),
                spec.max_context_bytes.unwrap_or(DEFAULT_MAX_CONTEXT_BYTES),
            ),
            (
                "max_state_bytes".into(),
                spec.max_state_bytes.unwrap_or(DEFAULT_MAX_STATE_BYTES),
            ),
            ("fuel".into(), d.fuel),
            ("memory_bytes".into(), d.memory_bytes),
            ("timeout_ms".into(), d.timeout_ms),
            max_tokens_field(
                spec.max_tokens_per_job
                    .unwrap_or(crate::model::grants::DEFAULT_MAX_TOKENS_PER_JOB),
            )?,
        ];
        Self::tenant_fields(spec.limits.as_ref(), &mut fields);
        let mut extra = vec![token_hash.to_string(), spec.credits.to_string()];
        for (k, v) in fields {
            extra.push(k);
            extra.push(v.to_string());
        }
        extra.extend(egress_field(&spec.allowed_outbound_hosts)?);
        extra.extend(models_field(&spec.models)?);
        let v = self.tenant_script(&spec.id, "create", &extra).await?;
        match Reply::status("TENANT create", &v)? {
            (Status::Ok, r) => r.end(),
            (Status::Exists, _) => Err(CpError::TenantExists),
            (other, r) => Err(r.unexpected(other)),
        }
    }

    pub async fn update_tenant(&self, id: &TenantId, patch: &TenantPatch) -> Result<(), CpError> {
        if patch.weight == Some(0) {
            return Err(CpError::Invalid("weight must be at least 1".into()));
        }
        let mut fields: Vec<(String, u64)> = Vec::new();
        for (k, v) in [
            ("weight", patch.weight),
            ("max_running", patch.max_running),
            ("max_queued", patch.max_queued),
            ("max_gpus", patch.max_gpus),
        ] {
            if let Some(v) = v {
                fields.push((k.into(), v as u64));
            }
        }
        for (k, v) in [
            ("max_component_bytes", patch.max_component_bytes),
            ("max_context_bytes", patch.max_context_bytes),
            ("max_state_bytes", patch.max_state_bytes),
        ] {
            if let Some(v) = v {
                fields.push((k.into(), v));
            }
        }
        Self::tenant_fields(patch.limits.as_ref(), &mut fields);
        if let Some(v) = patch.max_tokens_per_job {
            fields.push(max_tokens_field(v)?);
        }
        let mut extra: Vec<String> = fields
            .into_iter()
            .flat_map(|(k, v)| [k, v.to_string()])
            .collect();
        if let Some(list) = &patch.allowed_outbound_hosts {
            extra.extend(egress_field(list)?);
        }
        if let Some(list) = &patch.models {
            extra.extend(models_field(list)?);
        }
        let v = self.tenant_script(id, "update", &extra).await?;
        match Reply::status("TENANT update", &v)? {
            (Status::Ok, r) => r.end(),
            (Status::NotFound, _) => Err(CpError::NotFound),
            (other, r) => Err(r.unexpected(other)),
        }
    }

    /// Adds `amount` (may be negative) and answers the new balance. A
    /// negative grant may not take the balance below what is reserved.
    pub async fn grant_credits(&self, id: &TenantId, amount: i64) -> Result<i64, CpError> {
        self.grant(id, amount, None).await
    }

    /// [`grant_credits`](Self::grant_credits) at most once per `key`: a
    /// replay with the same amount answers the first grant's balance and
    /// credits nothing; another amount is [`CpError::IdempotencyConflict`].
    /// The key lives as long as a job's (`idempotency_ttl_s`).
    pub async fn grant_credits_once(
        &self,
        id: &TenantId,
        amount: i64,
        key: &str,
    ) -> Result<i64, CpError> {
        self.grant(id, amount, Some(key)).await
    }

    async fn grant(&self, id: &TenantId, amount: i64, key: Option<&str>) -> Result<i64, CpError> {
        if amount.abs() > MAX_EXACT_INT {
            return Err(CpError::Invalid(format!(
                "amount must be within ±{MAX_EXACT_INT}"
            )));
        }
        let mut inv = scripts::TENANT.prepare_invoke();
        inv.key(self.keys.tenant_anchor(id))
            .key(self.keys.tenant(id));
        if let Some(key) = key {
            inv.key(self.keys.grant_idempotency(id, &sha256_hex(key.as_bytes())));
        }
        let mut rest = vec![amount.to_string()];
        if key.is_some() {
            rest.push(self.idempotency_ttl_s().max(1).to_string());
        }
        TenantArgs {
            op: "grant",
            tenant: id,
            prices: self.prices(),
            rest: &rest,
        }
        .write(&mut inv);
        let v: Value = self.eval(&mut inv, self.keys.shard_of(id)).await?;
        let (s, mut r) = Reply::status("TENANT grant", &v)?;
        match s {
            Status::Ok => {
                let balance = r.int("balance")?;
                r.end()?;
                Ok(balance)
            }
            Status::NotFound => Err(CpError::NotFound),
            Status::Conflict => Err(CpError::IdempotencyConflict),
            Status::Insufficient => Err(CpError::InsufficientCredits),
            Status::OutOfRange => Err(CpError::Invalid(format!(
                "the grant would take the tenant's credits past ±{MAX_EXACT_INT}"
            ))),
            other => Err(r.unexpected(other)),
        }
    }

    pub async fn tenant(&self, id: &TenantId) -> Result<Option<TenantInfo>, CpError> {
        let h = self.hgetall(&self.keys.tenant(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let int = |k: &str| exact_int(k, h.get(k).map(String::as_str));
        let granted = int("granted")?;
        let settled = int("settled")?;
        Ok(Some(TenantInfo {
            id: id.to_string(),
            weight: num(&h, "weight") as u32,
            max_running: num(&h, "max_running") as u32,
            max_queued: num(&h, "max_queued") as u32,
            max_gpus: num(&h, "max_gpus") as u32,
            limits: Limits {
                fuel: num(&h, "fuel") as u64,
                memory_bytes: num(&h, "memory_bytes") as u64,
                timeout_ms: num(&h, "timeout_ms") as u64,
            },
            credits: Credits {
                balance: granted - settled,
                reserved: int("reserved")?,
            },
            running: num(&h, "running") as u32,
            queued: num(&h, "queued") as u32,
            gpus_in_use: num(&h, "gpus") as u32,
            granted,
            settled,
            storage: Storage {
                max_component_bytes: h
                    .get("max_component_bytes")
                    .map_or(DEFAULT_MAX_COMPONENT_BYTES, |_| {
                        num(&h, "max_component_bytes") as u64
                    }),
                max_context_bytes: h
                    .get("max_context_bytes")
                    .map_or(DEFAULT_MAX_CONTEXT_BYTES, |_| {
                        num(&h, "max_context_bytes") as u64
                    }),
                max_state_bytes: h
                    .get("max_state_bytes")
                    .map_or(DEFAULT_MAX_STATE_BYTES, |_| {
                        num(&h, "max_state_bytes") as u64
                    }),
                component_bytes: num(&h, "component_bytes") as u64,
                context_bytes: num(&h, "context_bytes") as u64,
                state_bytes: num(&h, "state_bytes") as u64,
            },
            allowed_outbound_hosts: h
                .get("egress")
                .map(|t| crate::egress::Policy::from_stored(t))
                .transpose()
                .map_err(|e| bad(format!("tenant {id}: egress: {e}")))?
                .unwrap_or_default()
                .list(),
            models: crate::model::grants::from_stored(h.get("models").map_or("", String::as_str))
                .map_err(|e| bad(format!("tenant {id}: models: {e}")))?,
            max_tokens_per_job: h
                .get("max_tokens")
                .map_or(crate::model::grants::DEFAULT_MAX_TOKENS_PER_JOB, |_| {
                    num(&h, "max_tokens") as u64
                }),
            parked: h
                .get("parked")
                .filter(|p| !p.is_empty() && p.as_str() != "empty")
                .cloned(),
        }))
    }

    /// The stored sha256 hex of the tenant's token, for authentication.
    pub async fn tenant_token_hash(&self, id: &TenantId) -> Result<Option<String>, CpError> {
        Ok(self.conn().hget(self.keys.tenant(id), "token_hash").await?)
    }
}
