//! `/v1/admin/*`: what an operator sees across tenants, and the retry of a
//! failed job.

use super::AppState;
use super::auth::{Admin, Tenant};
use super::error::{ApiError, ApiResult};
use super::job_id_ok;
use super::query::{AdminJobsQuery, PageQuery, Query};
use super::types::{JobPage, Retried, TenantPage};
use crate::model::valid_tenant_id;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

/// `GET /v1/admin/tenants?cursor=&limit=` (admin): tenants by id, with
/// running and queued counts, credits, parked reason and the share of
/// capacity each used over the last minute.
#[utoipa::path(get, path = "/v1/admin/tenants", tag = "admin", responses((status = 200, description = "tenants with counters and share of capacity over the last minute (admin)", body = super::types::TenantPage), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn tenants(
    State(state): State<AppState>,
    _: Admin,
    Query(q): Query<PageQuery>,
) -> ApiResult<Json<TenantPage>> {
    if let Some(c) = &q.cursor
        && !valid_tenant_id(c)
    {
        return Err(ApiError::Invalid("`cursor` is not a tenant id".into()));
    }
    let (tenants, next_cursor) = state
        .control()
        .admin_tenants(q.limit, q.cursor.as_deref())
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    Ok(Json(TenantPage {
        tenants,
        next_cursor,
    }))
}

/// `GET /v1/admin/jobs?state=&error_kind=&limit=&cursor=` (admin): jobs
/// across tenants, newest first. A page filtered by `error_kind` may be
/// short; only a `null` `next_cursor` means the end.
#[utoipa::path(get, path = "/v1/admin/jobs", tag = "admin", responses((status = 200, description = "jobs across tenants by state and error kind (admin)", body = super::types::JobPage), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn jobs(
    State(state): State<AppState>,
    _: Admin,
    Query(q): Query<AdminJobsQuery>,
) -> ApiResult<Json<JobPage>> {
    let (jobs, next_cursor) = state
        .control()
        .admin_jobs(q.state, q.error_kind, q.limit, q.cursor.as_deref())
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))?;
    Ok(Json(JobPage { jobs, next_cursor }))
}

/// `POST /v1/jobs/{id}/retry` (the tenant) and
/// `POST /v1/admin/tenants/{tenant}/jobs/{id}/retry` (admin): a failed job
/// submitted again as a new job, charged as usual → 201 `{"id","state",
/// "retry_of"}` (200 with the same new job when it was already retried).
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs", params(("id" = String, Path)), responses((status = 201, description = "the failed job submitted again as a new job `{\"id\",\"state\",\"retry_of\"}` (tenant)", body = super::types::Retried), (status = 200, description = "already retried: the same new job", body = super::types::Retried), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Tenant(tenant): Tenant,
) -> ApiResult<(StatusCode, Json<Retried>)> {
    retry_as(&state, &tenant, &id).await
}

#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/jobs/{id}/retry", tag = "admin", params(("tenant" = String, Path), ("id" = String, Path)), responses((status = 201, description = "a failed job of any tenant submitted again (admin)", body = super::types::Retried), (status = 200, description = "already retried: the same new job", body = super::types::Retried), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn admin_retry(
    State(state): State<AppState>,
    Path((tenant, id)): Path<(String, String)>,
    _: Admin,
) -> ApiResult<(StatusCode, Json<Retried>)> {
    if !valid_tenant_id(&tenant) {
        return Err(ApiError::NotFound("job"));
    }
    retry_as(&state, &tenant, &id).await
}

async fn retry_as(
    state: &AppState,
    tenant: &str,
    id: &str,
) -> ApiResult<(StatusCode, Json<Retried>)> {
    if !job_id_ok(id) {
        return Err(ApiError::NotFound("job"));
    }
    let s = state
        .control()
        .retry_job(tenant, id)
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))?;
    let status = if s.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(Retried {
            id: s.id,
            state: s.state,
            retry_of: id.to_string(),
        }),
    ))
}
