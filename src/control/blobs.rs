//! Components and contexts: content-addressed blobs with per-tenant
//! metadata, charged to the tenant's byte quotas.

use super::*;

/// Metadata of an uploaded component, per tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ComponentMeta {
    pub digest: String,
    pub size: u64,
    pub created_at: String,
    /// It imports `wasi:http/outgoing-handler`: its jobs reserve for
    /// outgoing requests (README, "Outbound HTTP").
    #[serde(default)]
    pub outbound_http: bool,
    /// It imports `agentplane:agent/inference`: its jobs reserve for
    /// tokens (README, "Models").
    #[serde(default)]
    pub inference: bool,
}

/// What an admitted component imports that its jobs pay for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Imports {
    /// `wasi:http/outgoing-handler` (`Admitted::outbound_http`).
    pub outbound_http: bool,
    /// `agentplane:agent/inference` (`Admitted::inference`).
    pub inference: bool,
}

/// Metadata of a named context, per tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ContextMeta {
    pub name: String,
    pub digest: String,
    pub documents: u64,
    pub dim: u64,
}

impl ControlPlane {
    /// Stores an admitted component for `tenant`, with what it imports
    /// that its jobs pay for.
    pub async fn put_component(
        &self,
        tenant: &TenantId,
        digest: &str,
        bytes: &[u8],
        imports: Imports,
    ) -> Result<ComponentMeta, CpError> {
        // The quota first: a refused upload writes nothing; a write that
        // fails gives the charge back.
        let charge = self
            .charge_bytes(tenant, Stored::Component, digest, bytes.len() as u64)
            .await?;
        let write = self.write_component(tenant, digest, bytes, imports).await;
        self.refund_on_err(charge, write).await
    }

    async fn write_component(
        &self,
        tenant: &str,
        digest: &str,
        bytes: &[u8],
        imports: Imports,
    ) -> Result<ComponentMeta, CpError> {
        let mut c = self.conn();
        // The blob first: metadata must never point at missing bytes.
        let blob = self.keys.blob("comp", digest);
        let _: () = c.set(&blob, bytes).await?;
        let meta = ComponentMeta {
            digest: digest.to_string(),
            size: bytes.len() as u64,
            created_at: rfc3339_ms(now_ms()),
            outbound_http: imports.outbound_http,
            inference: imports.inference,
        };
        let key = self.keys.component(tenant, digest);
        let _: () = c
            .hset_multiple(
                &key,
                &[
                    ("size", meta.size.to_string()),
                    ("created_at", meta.created_at.clone()),
                    ("http", u8::from(imports.outbound_http).to_string()),
                    ("inf", u8::from(imports.inference).to_string()),
                ],
            )
            .await?;
        Ok(meta)
    }

    pub async fn component_meta(
        &self,
        tenant: &TenantId,
        digest: &str,
    ) -> Result<Option<ComponentMeta>, CpError> {
        let h = self.hgetall(&self.keys.component(tenant, digest)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(Some(ComponentMeta {
            digest: digest.to_string(),
            size: num(&h, "size") as u64,
            created_at: h.get("created_at").cloned().unwrap_or_default(),
            outbound_http: num(&h, "http") == 1,
            inference: num(&h, "inf") == 1,
        }))
    }

    pub async fn component_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, CpError> {
        Ok(self.conn().get(self.keys.blob("comp", digest)).await?)
    }

    pub async fn put_context(
        &self,
        tenant: &TenantId,
        meta: &ContextMeta,
        bytes: &[u8],
    ) -> Result<(), CpError> {
        let charge = self
            .charge_bytes(tenant, Stored::Context, &meta.name, bytes.len() as u64)
            .await?;
        let write = self.write_context(tenant, meta, bytes).await;
        self.refund_on_err(charge, write).await
    }

    async fn write_context(
        &self,
        tenant: &str,
        meta: &ContextMeta,
        bytes: &[u8],
    ) -> Result<(), CpError> {
        let mut c = self.conn();
        let _: () = c.set(self.keys.blob("ctx", &meta.digest), bytes).await?;
        let _: () = c
            .hset_multiple(
                self.keys.context(tenant, &meta.name),
                &[
                    ("digest", meta.digest.clone()),
                    ("documents", meta.documents.to_string()),
                    ("dim", meta.dim.to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn context_meta(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<Option<ContextMeta>, CpError> {
        let h = self.hgetall(&self.keys.context(tenant, name)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(Some(ContextMeta {
            name: name.to_string(),
            digest: h.get("digest").cloned().unwrap_or_default(),
            documents: num(&h, "documents") as u64,
            dim: num(&h, "dim") as u64,
        }))
    }

    pub async fn context_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, CpError> {
        Ok(self.conn().get(self.keys.blob("ctx", digest)).await?)
    }
}
