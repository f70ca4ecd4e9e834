//! `/v1/tenants/{id}/secrets`: a tenant's secrets, write-only. A value
//! is set and deleted here, never answered back: the listing names them
//! and says when each was set (README, "Secrets").

use super::AppState;
use super::auth::Caller;
use super::body::small_json;
use super::error::{ApiError, ApiResult};
use super::path::{TenantPath, TenantSecretPath};
use crate::control::SecretInfo;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;

/// `PUT /v1/tenants/{id}/secrets/{name}` body.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretValue {
    /// 8 to 4096 bytes.
    value: String,
}

/// `GET /v1/tenants/{id}/secrets`: names only.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretInfo>,
}

/// `PUT /v1/tenants/{id}/secrets/{name}` (admin, that tenant): sets it.
#[utoipa::path(put, path = "/v1/tenants/{id}/secrets/{name}", tag = "tenants", params(("id" = String, Path), ("name" = String, Path)), request_body = SecretValue, responses((status = 200, description = "the tenant's secrets after the change, names only: the value is never answered back (admin, that tenant)", body = SecretList), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn put(
    State(state): State<AppState>,
    caller: Caller,
    TenantSecretPath(id, name): TenantSecretPath,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<SecretList>> {
    super::report::readable(&caller, &id)?;
    let SecretValue { value } = small_json(&headers, body, state.config(), "secret body").await?;
    state
        .control()
        .set_secret(&id, &name, &value)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    names(&state, &id).await
}

/// `DELETE /v1/tenants/{id}/secrets/{name}` (admin, that tenant).
#[utoipa::path(delete, path = "/v1/tenants/{id}/secrets/{name}", tag = "tenants", params(("id" = String, Path), ("name" = String, Path)), responses((status = 200, description = "the tenant's secrets after the change, names only (admin, that tenant)", body = SecretList), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    TenantSecretPath(id, name): TenantSecretPath,
) -> ApiResult<Json<SecretList>> {
    super::report::readable(&caller, &id)?;
    state
        .control()
        .delete_secret(&id, &name)
        .await
        .map_err(|e| ApiError::from_cp(e, "secret"))?;
    names(&state, &id).await
}

/// The tenant's secrets by name, as the routes here answer them.
async fn names(state: &AppState, id: &crate::model::TenantId) -> ApiResult<Json<SecretList>> {
    let secrets = state
        .control()
        .secrets(id)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    Ok(Json(SecretList { secrets }))
}

/// `GET /v1/tenants/{id}/secrets` (admin, that tenant): names, no values.
#[utoipa::path(get, path = "/v1/tenants/{id}/secrets", tag = "tenants", params(("id" = String, Path)), responses((status = 200, description = "`{\"secrets\":[{\"name\",\"updated_at\"}]}`: names only, never values (admin, that tenant)", body = SecretList), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    TenantPath(id): TenantPath,
) -> ApiResult<Json<SecretList>> {
    super::report::readable(&caller, &id)?;
    super::report::exists(&state, &id).await?;
    names(&state, &id).await
}
