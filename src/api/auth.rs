//! Bearer-token authentication.
//!
//! Two kinds of caller: the admin (one token from configuration) and tenants
//! (tokens `<tenant_id>.<secret>` issued at tenant creation, of which only
//! the sha256 is stored). Every comparison is constant-time so the answer's
//! timing does not reveal how many leading bytes of a guess were right.
//!
//! Handlers name who may call them in their signature, with the extractors
//! [`Tenant`], [`Admin`] and [`Caller`] (either): a route cannot forget
//! to authenticate, and every route refuses in the same way (401 without a
//! valid token, 403 with the wrong kind).

use super::AppState;
use super::error::ApiError;
use crate::model::TenantId;
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Tenant(TenantId),
}

impl Caller {
    /// The tenant id, or 403 for the admin: tenant routes act on one tenant's
    /// things and the admin owns none.
    pub fn tenant(&self) -> Result<&TenantId, ApiError> {
        match self {
            Caller::Tenant(t) => Ok(t),
            Caller::Admin => Err(ApiError::Forbidden(
                "this route needs a tenant token, not the admin token",
            )),
        }
    }

    /// Ok for the admin, 403 for a tenant.
    pub fn admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(_) => Err(ApiError::Forbidden("this route needs the admin token")),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(state, &parts.headers).await
    }
}

/// A request authenticated by a tenant token: the tenant's id. The admin
/// is refused (403): tenant routes act on one tenant's things and the
/// admin owns none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub TenantId);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = authenticate(state, &parts.headers).await?;
        caller.tenant().cloned().map(Tenant)
    }
}

/// A request authenticated by the admin token; tenants are refused (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(state, &parts.headers).await?.admin()?;
        Ok(Admin)
    }
}

/// A fresh tenant token: `<tenant_id>.<64 hex chars>` (32 random bytes).
pub(super) fn new_tenant_token(tenant: &TenantId) -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("{tenant}.{}", hex::encode(secret))
}

/// sha256 of a token, lowercase hex: what the control plane stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// Resolves the caller of a request, or 401.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let token = bearer(headers).ok_or(ApiError::Unauthorized)?;
    let admin = state.admin_token().as_bytes();
    if !admin.is_empty() && bool::from(token.as_bytes().ct_eq(admin)) {
        return Ok(Caller::Admin);
    }
    let (tenant, secret) = token.split_once('.').ok_or(ApiError::Unauthorized)?;
    if secret.is_empty() {
        return Err(ApiError::Unauthorized);
    }
    let tenant = TenantId::parse(tenant).map_err(|_| ApiError::Unauthorized)?;
    let stored = state
        .control()
        .tenant_token_hash(&tenant)
        .await
        .map_err(ApiError::from)?;
    let presented = token_hash(token);
    // An unknown tenant is compared against a dummy hash so that it takes
    // the same path as a wrong secret.
    let stored = stored.unwrap_or_else(|| "0".repeat(64));
    if bool::from(presented.as_bytes().ct_eq(stored.as_bytes())) {
        Ok(Caller::Tenant(tenant))
    } else {
        Err(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn tokens_name_their_tenant_and_hash_to_hex() {
        let acme = TenantId::parse("acme").unwrap();
        let t = new_tenant_token(&acme);
        let (id, secret) = t.split_once('.').unwrap();
        assert_eq!(id, "acme");
        assert_eq!(secret.len(), 64);
        assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(new_tenant_token(&acme), t);
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }
}
