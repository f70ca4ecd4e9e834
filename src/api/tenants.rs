//! `/v1/tenants`: creation, inspection, quota changes and credit grants.

use super::AppState;
use super::auth::{Admin, Caller, new_tenant_token, token_hash};
use super::body::small_json;
use super::error::{ApiError, ApiResult};
use super::path::TenantPath;
use super::types::{Balance, TenantToken};
use crate::control::{LimitsPatch, TenantPatch, TenantSpec};
use crate::model::TenantId;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

/// `POST /v1/tenants/{id}/credits` body.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Grant {
    /// May be negative; |amount| <= 2^53 - 1.
    #[serde(deserialize_with = "crate::control::num::i53")]
    amount: i64,
}

fn validate_limits(l: &Option<LimitsPatch>) -> ApiResult<()> {
    if let Some(l) = l {
        for (name, v) in [
            ("limits.fuel", l.fuel),
            ("limits.memory_bytes", l.memory_bytes),
            ("limits.timeout_ms", l.timeout_ms),
        ] {
            if v == Some(0) {
                return Err(ApiError::Invalid(format!("`{name}` must be positive")));
            }
        }
    }
    Ok(())
}

fn validate_weight(w: Option<u32>) -> ApiResult<()> {
    if w == Some(0) {
        return Err(ApiError::Invalid(
            "`weight` must be at least 1 (a zero weight would never run)".into(),
        ));
    }
    Ok(())
}

/// `POST /v1/tenants` (admin) → 201 `{"id","token"}`.
#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = crate::model::TenantSpec, responses((status = 201, description = "the new tenant `{\"id\",\"token\"}` (admin)", body = super::types::TenantToken), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn create(
    State(state): State<AppState>,
    _: Admin,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<TenantToken>)> {
    // `id` is a `TenantId`: a malformed one fails here, naming `id`.
    let spec: TenantSpec = small_json(&headers, body, state.config(), "tenant body").await?;
    validate_weight(Some(spec.weight))?;
    validate_limits(&spec.limits)?;
    if spec.credits < 0 {
        return Err(ApiError::Invalid("`credits` must not be negative".into()));
    }
    let token = new_tenant_token(&spec.id);
    state
        .control()
        .create_tenant(&spec, &token_hash(&token))
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    tracing::info!(tenant = %spec.id, "tenant created");
    Ok((
        StatusCode::CREATED,
        Json(TenantToken {
            id: spec.id.into(),
            token,
        }),
    ))
}

/// `GET /v1/tenants/{id}` (admin, or that tenant).
#[utoipa::path(get, path = "/v1/tenants/{id}", tag = "tenants", params(("id" = String, Path)), responses((status = 200, description = "the tenant: settings, credits, counters, parked reason (admin, that tenant)", body = crate::control::TenantInfo), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    TenantPath(id): TenantPath,
) -> ApiResult<Json<Value>> {
    // Another tenant's existence is not revealed.
    super::report::readable(&caller, &id)?;
    tenant_json(&state, &id).await
}

/// `PATCH /v1/tenants/{id}` (admin) → the updated tenant.
#[utoipa::path(patch, path = "/v1/tenants/{id}", tag = "tenants", params(("id" = String, Path)), request_body = crate::model::TenantPatch, responses((status = 200, description = "the tenant after the change (admin)", body = crate::control::TenantInfo), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn patch(
    State(state): State<AppState>,
    _: Admin,
    TenantPath(id): TenantPath,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let patch: TenantPatch = small_json(&headers, body, state.config(), "patch body").await?;
    validate_weight(patch.weight)?;
    validate_limits(&patch.limits)?;
    state
        .control()
        .update_tenant(&id, &patch)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    tenant_json(&state, &id).await
}

/// `POST /v1/tenants/{id}/credits` (admin), body `{"amount": n}` →
/// `{"id","balance"}`; optional `Idempotency-Key` (a replay with the same
/// amount credits nothing; another amount is 422).
#[utoipa::path(post, path = "/v1/tenants/{id}/credits", tag = "tenants", params(("id" = String, Path)), request_body = Grant, responses((status = 200, description = "`{\"id\",\"balance\"}` after the grant; optional `Idempotency-Key` (admin)", body = super::types::Balance), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn credits(
    State(state): State<AppState>,
    _: Admin,
    TenantPath(id): TenantPath,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Balance>> {
    let key = super::jobs::idempotency_key(&headers)?;
    let Grant { amount } = small_json(&headers, body, state.config(), "credits body").await?;
    let cp = state.control();
    // With an Idempotency-Key, a retried grant (its answer lost) credits
    // once and answers the first grant's balance.
    let balance = match &key {
        Some(k) => cp.grant_credits_once(&id, amount, k).await,
        None => cp.grant_credits(&id, amount).await,
    }
    .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    Ok(Json(Balance {
        id: id.into(),
        balance,
    }))
}

/// `GET /v1/tenants/{id}/callback-key` (admin, or that tenant): the key
/// that signs the tenant's callbacks (README, "Callbacks").
#[utoipa::path(get, path = "/v1/tenants/{id}/callback-key", tag = "tenants", params(("id" = String, Path)), responses((status = 200, description = "`{\"tenant\",\"key\"}`: the HMAC-SHA256 key of the tenant's callback signatures (admin, that tenant)", body = super::types::CallbackKey), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn callback_key(
    State(state): State<AppState>,
    caller: Caller,
    TenantPath(id): TenantPath,
) -> ApiResult<Json<super::types::CallbackKey>> {
    // Another tenant's existence is not revealed.
    super::report::readable(&caller, &id)?;
    super::report::exists(&state, &id).await?;
    let key = state.config().callbacks.tenant_key(&id);
    Ok(Json(super::types::CallbackKey {
        tenant: id.into_string(),
        key,
    }))
}

/// The tenant as `GET /v1/tenants/{id}` shows it.
async fn tenant_json(state: &AppState, id: &TenantId) -> ApiResult<Json<Value>> {
    let info = state
        .control()
        .tenant(id)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?
        .ok_or(ApiError::NotFound("tenant"))?;
    super::to_json(&info)
}
