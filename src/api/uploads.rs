//! `/v1/components` and `/v1/contexts`: uploads of a tenant's code and heavy
//! context. Both are content-addressed; the metadata is per tenant, so a
//! tenant only ever sees what it uploaded itself.

use super::auth::Tenant;
use super::body::{expect_json, expect_wasm, parse_json, read_body};
use super::error::{ApiError, ApiResult};
use super::{AppState, valid_digest};
use crate::context::{ContextError, ContextUpload, encode};
use crate::control::ContextMeta;
use crate::host::AdmissionError;
use crate::model::valid_name;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

/// `POST /v1/components`: raw bytes → 201 `{"digest","size",…}`.
#[utoipa::path(post, path = "/v1/components", tag = "components", request_body(content = Vec<u8>, content_type = "application/wasm", description = "the component's bytes"), responses((status = 201, description = "`{\"digest\",\"size\"}` of the uploaded component (tenant)", body = crate::control::ComponentMeta), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn push_component(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    expect_wasm(&headers)?;
    state.upload_allowed(&tenant)?;
    let limit = state.config().max_component_bytes;
    let _slot = state.upload_slot(&tenant).await?;
    let bytes = read_body(&headers, body, limit, state.config(), "the component").await?;
    // Admission parses (and may compile) the component: CPU work that must
    // not stall the async workers serving other requests.
    let host = state.host().clone();
    let admitted = {
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || host.admit(&bytes))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "admission task failed");
                ApiError::Internal
            })?
    }
    .map_err(|e| match e {
        AdmissionError::Invalid(why) => {
            ApiError::InvalidComponent(format!("component refused: {why}"))
        }
        AdmissionError::Unavailable(why) => {
            tracing::error!(error = %why, "admission unavailable");
            ApiError::Unavailable
        }
    })?;
    let meta = state
        .control()
        .put_component(
            &tenant,
            &admitted.digest,
            &bytes,
            crate::control::Imports {
                outbound_http: admitted.outbound_http,
                inference: admitted.inference,
            },
        )
        .await
        .map_err(|e| ApiError::from_cp(e, "component"))?;
    tracing::info!(%tenant, digest = %meta.digest, size = meta.size, "component stored");
    Ok((StatusCode::CREATED, super::to_json(&meta)?))
}

/// `GET /v1/components/{digest}`: metadata, 404 unless this tenant uploaded it.
#[utoipa::path(get, path = "/v1/components/{digest}", tag = "components", params(("digest" = String, Path)), responses((status = 200, description = "component metadata (tenant)", body = crate::control::ComponentMeta), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn get_component(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    Tenant(tenant): Tenant,
) -> ApiResult<Json<Value>> {
    if !valid_digest(&digest) {
        return Err(ApiError::NotFound("component"));
    }
    let meta = state
        .control()
        .component_meta(&tenant, &digest)
        .await
        .map_err(|e| ApiError::from_cp(e, "component"))?
        .ok_or(ApiError::NotFound("component"))?;
    super::to_json(&meta)
}

/// `POST /v1/contexts`: JSON upload → 201 `{"name","digest","documents","dim"}`.
#[utoipa::path(post, path = "/v1/contexts", tag = "contexts", request_body = crate::context::ContextUpload, responses((status = 201, description = "`{\"name\",\"digest\",\"documents\",\"dim\"}` (tenant)", body = crate::control::ContextMeta), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn push_context(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<ContextMeta>)> {
    expect_json(&headers)?;
    state.upload_allowed(&tenant)?;
    let limit = state.config().max_context_bytes;
    let _slot = state.upload_slot(&tenant).await?;
    let bytes = read_body(&headers, body, limit, state.config(), "the context").await?;
    // Parsing and indexing tens of MiB is CPU work: off the async workers.
    let encoded = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        // Straight from the bytes into the typed upload (no `Value` tree,
        // which costs several times the body), then the body is freed
        // before the blob is built.
        let upload: ContextUpload = parse_json(&bytes, "context body")?;
        drop(bytes);
        if !valid_name(&upload.name) {
            return Err(ApiError::Invalid(
                "`name` must be 1-128 characters of letters, digits, `-`, `_`, `.` and `/`".into(),
            ));
        }
        let encoded = encode(&upload).map_err(|e| match e {
            ContextError::Invalid(m) | ContextError::Corrupt(m) => ApiError::Invalid(m),
        })?;
        Ok((upload.name, encoded))
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "context encoding task failed");
        ApiError::Internal
    })?;
    let (name, encoded) = encoded?;
    let meta = ContextMeta {
        name,
        digest: encoded.digest.clone(),
        documents: encoded.documents as u64,
        dim: encoded.dim as u64,
    };
    state
        .control()
        .put_context(&tenant, &meta, &encoded.bytes)
        .await
        .map_err(|e| ApiError::from_cp(e, "context"))?;
    tracing::info!(%tenant, name = %meta.name, digest = %meta.digest, "context stored");
    Ok((StatusCode::CREATED, Json(meta)))
}

/// `GET /v1/contexts/{name}`: metadata of this tenant's context.
#[utoipa::path(get, path = "/v1/contexts/{name}", tag = "contexts", params(("name" = String, Path)), responses((status = 200, description = "context metadata (tenant)", body = crate::control::ContextMeta), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn get_context(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Tenant(tenant): Tenant,
) -> ApiResult<Json<Value>> {
    if !valid_name(&name) {
        return Err(ApiError::NotFound("context"));
    }
    let meta = state
        .control()
        .context_meta(&tenant, &name)
        .await
        .map_err(|e| ApiError::from_cp(e, "context"))?
        .ok_or(ApiError::NotFound("context"))?;
    super::to_json(&meta)
}

/// Per-tenant token buckets of uploads: `burst` at once, refilled at
/// `per_minute`. Kept in the API process (each API process limits on its
/// own; the rate is a bound on work, not an exact quota).
pub(super) struct UploadRate {
    burst: f64,
    per_sec: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

use super::limits::RATE_BUCKETS_PRUNE_AT;

impl UploadRate {
    pub(super) fn new(burst: u32, per_minute: u32) -> Self {
        UploadRate {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            buckets: Default::default(),
        }
    }

    pub(super) fn take(&self, tenant: &str) -> ApiResult<()> {
        let now = std::time::Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= RATE_BUCKETS_PRUNE_AT && !map.contains_key(tenant) {
            let (burst, rate) = (self.burst, self.per_sec);
            map.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = map.entry(tenant.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - *tokens) / self.per_sec).ceil().max(1.0);
        Err(ApiError::RateLimited(wait as u64))
    }
}
