//! Tenants' secrets as the control plane keeps them: sealed values
//! (`crate::secrets`) in one hash per tenant, set and deleted by SECRET
//! (`lua/secret.lua`), read whole by workers, listed by name only.

use super::*;
use crate::secrets::SecretsKey;

/// A secret as listed: its name and when it was last set, never its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SecretInfo {
    pub name: String,
    pub updated_at: String,
}

impl ControlPlane {
    async fn secret_script(&self, tenant: &TenantId, args: &[&[u8]]) -> Result<Value, CpError> {
        let mut inv = scripts::SECRET.prepare_invoke();
        inv.key(self.keys.tenant_anchor(tenant))
            .key(self.keys.tenant(tenant))
            .key(self.keys.secrets(tenant));
        for a in args {
            inv.arg(*a);
        }
        self.eval(&mut inv, self.keys.shard_of(tenant)).await
    }

    /// The deployment's secrets key, or why there is none.
    fn secrets_key(&self) -> Result<&SecretsKey, CpError> {
        self.cfg.secrets_key.as_ref().ok_or_else(|| {
            CpError::Invalid(
                "secrets are not enabled on this deployment (AGENTPLANE_SECRETS_KEY)".into(),
            )
        })
    }

    /// Seals `value` and stores it as `tenant`'s secret `name`, replacing
    /// any; the name and value are checked here (`crate::secrets`).
    pub async fn set_secret(
        &self,
        tenant: &TenantId,
        name: &str,
        value: &str,
    ) -> Result<(), CpError> {
        if !crate::secrets::valid_name(name) {
            return Err(CpError::Invalid(
                "a secret's name is 1-64 characters of a-z, A-Z, 0-9 and _".into(),
            ));
        }
        if let Some(why) = crate::secrets::check_value(value) {
            return Err(CpError::Invalid(why));
        }
        let sealed = self.secrets_key()?.seal(tenant, name, value);
        let sealed = &sealed[..];
        let max = crate::secrets::MAX_SECRETS.to_string();
        let v = self
            .secret_script(tenant, &[b"set", name.as_bytes(), sealed, max.as_bytes()])
            .await?;
        match Reply::status("SECRET set", &v)? {
            (Status::Ok, r) => r.end(),
            (Status::NoTenant, _) => Err(CpError::NotFound),
            (Status::Quota, mut r) => {
                let max: u64 = r.uint("max")?;
                r.end()?;
                Err(CpError::QuotaExceeded(format!(
                    "the tenant holds {max} secrets, the most allowed; delete one first"
                )))
            }
            (other, r) => Err(r.unexpected(other)),
        }
    }

    /// Deletes `tenant`'s secret `name`; [`CpError::NotFound`] if it has none.
    pub async fn delete_secret(&self, tenant: &TenantId, name: &str) -> Result<(), CpError> {
        let v = self
            .secret_script(tenant, &[b"delete", name.as_bytes()])
            .await?;
        match Reply::status("SECRET delete", &v)? {
            (Status::Ok, r) => r.end(),
            (Status::NoTenant | Status::NotFound, _) => Err(CpError::NotFound),
            (other, r) => Err(r.unexpected(other)),
        }
    }

    /// `tenant`'s secrets, opened, by name: for the runs of its agents
    /// only. A value that does not open (sealed under another key) is an
    /// error: the run cannot have what its tenant set.
    pub async fn open_secrets(&self, tenant: &TenantId) -> Result<Vec<(String, String)>, CpError> {
        let h: HashMap<String, Vec<u8>> = self.conn().hgetall(self.keys.secrets(tenant)).await?;
        if h.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.secrets_key()?;
        let mut out = Vec::with_capacity(h.len());
        for (name, v) in h {
            let sealed = v.iter().position(|b| *b == b':').map(|at| &v[at + 1..]);
            match sealed.and_then(|s| key.open(tenant, &name, s)) {
                Some(value) => out.push((name, value)),
                None => {
                    return Err(CpError::Internal(format!(
                        "secret {name} of tenant {tenant} does not open under this process's secrets key"
                    )));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// `tenant`'s secrets by name, with when each was set; no values.
    pub async fn secrets(&self, tenant: &TenantId) -> Result<Vec<SecretInfo>, CpError> {
        let h: HashMap<String, Vec<u8>> = self.conn().hgetall(self.keys.secrets(tenant)).await?;
        let mut out: Vec<SecretInfo> = h
            .into_iter()
            .map(|(name, v)| {
                let ms = v
                    .iter()
                    .position(|b| *b == b':')
                    .and_then(|at| std::str::from_utf8(&v[..at]).ok()?.parse::<u64>().ok())
                    .unwrap_or(0);
                SecretInfo {
                    name,
                    updated_at: rfc3339_ms(ms),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
