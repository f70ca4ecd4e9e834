//! Path parameters parsed into their types before a handler runs. A
//! segment that cannot name what the route looks up is answered as an
//! absent one would be (404 with the route's resource), so a malformed id
//! and an unknown one cannot be told apart; one that does not even decode
//! (percent-escapes that are not UTF-8) is 400 `invalid_request`.
//!
//! Handlers list these after their `Tenant`/`Admin`/`Caller` extractor, so
//! authentication is decided first (401/403 before 404).

use super::error::ApiError;
use super::job_id_ok;
use crate::model::TenantId;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

/// The route's one path segment; one that does not decode (not UTF-8) is
/// 400, as axum's own rejection was.
async fn segment<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<String, ApiError> {
    Path::<String>::from_request_parts(parts, state)
        .await
        .map(|Path(s)| s)
        .map_err(|e| ApiError::Invalid(e.body_text()))
}

/// `{id}` of the `/v1/tenants/{id}` routes; a malformed id is 404 `tenant`.
#[derive(Debug, Clone)]
pub(crate) struct TenantPath(pub TenantId);

impl<S: Send + Sync> FromRequestParts<S> for TenantPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        TenantId::parse(&segment(parts, state).await?)
            .map(TenantPath)
            .map_err(|_| ApiError::NotFound("tenant"))
    }
}

/// The route's two path segments (not UTF-8: 400, as [`segment`]).
async fn segments<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<(String, String), ApiError> {
    Path::<(String, String)>::from_request_parts(parts, state)
        .await
        .map(|Path(p)| p)
        .map_err(|e| ApiError::Invalid(e.body_text()))
}

/// `{tenant}/jobs/{id}` of the admin's job routes; a malformed tenant or
/// job id is 404 `job`.
#[derive(Debug, Clone)]
pub(crate) struct TenantJobPath(pub TenantId, pub String);

impl<S: Send + Sync> FromRequestParts<S> for TenantJobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (tenant, id) = segments(parts, state).await?;
        let tenant = TenantId::parse(&tenant).map_err(|_| ApiError::NotFound("job"))?;
        if !job_id_ok(&id) {
            return Err(ApiError::NotFound("job"));
        }
        Ok(TenantJobPath(tenant, id))
    }
}

/// `{id}/secrets/{name}` of a tenant's secret routes; a malformed tenant
/// id is 404 `tenant`, a name no secret can have 400 `invalid_request`
/// (it names the rule).
#[derive(Debug, Clone)]
pub(crate) struct TenantSecretPath(pub TenantId, pub String);

impl<S: Send + Sync> FromRequestParts<S> for TenantSecretPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let (tenant, name) = segments(parts, state).await?;
        let tenant = TenantId::parse(&tenant).map_err(|_| ApiError::NotFound("tenant"))?;
        if !crate::secrets::valid_name(&name) {
            return Err(ApiError::Invalid(
                "a secret's name is 1-64 characters of a-z, A-Z, 0-9 and _".into(),
            ));
        }
        Ok(TenantSecretPath(tenant, name))
    }
}

/// `{id}` of the `/v1/jobs/{id}` routes; an id no job can have is 404
/// `job` before any lookup.
#[derive(Debug, Clone)]
pub(crate) struct JobPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let id = segment(parts, state).await?;
        if !job_id_ok(&id) {
            return Err(ApiError::NotFound("job"));
        }
        Ok(JobPath(id))
    }
}
