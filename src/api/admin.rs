//! `/v1/admin/*`: what an operator sees across tenants (a job's log
//! included), and the retry of a failed job.

use super::AppState;
use super::auth::{Admin, Tenant};
use super::error::{ApiError, ApiResult};
use super::path::{JobPath, TenantJobPath};
use super::query::{AdminJobsQuery, PageQuery, Query};
use super::types::{JobPage, JobRef, TenantPage};
use crate::model::TenantId;
use axum::Json;
use axum::extract::State;

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
        && TenantId::parse(c).is_err()
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
/// runs again as a new attempt of the same job (same id, back at the end
/// of its tenant's queue, its counted attempts reset), reserved and
/// charged as any attempt → 200 `{"id","state"}`. Admitted as a submission
/// is (429 `queue_full`, 402 `insufficient_credits`); 409 `not_failed`
/// for a job in any other state, so of two concurrent retries one wins.
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "the failed job queued again as its next attempt, same id: `{\"id\",\"state\"}` (tenant)", body = super::types::JobRef), (status = "4XX", description = "the error, `param` naming the field at fault; 409 `not_failed` when the job is not failed", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn retry(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JobPath(id): JobPath,
) -> ApiResult<Json<JobRef>> {
    retry_as(&state, &tenant, &id).await
}

#[utoipa::path(post, path = "/v1/admin/tenants/{tenant}/jobs/{id}/retry", tag = "admin", params(("tenant" = String, Path), ("id" = String, Path)), responses((status = 200, description = "a failed job of any tenant queued again as its next attempt, same id: `{\"id\",\"state\"}` (admin)", body = super::types::JobRef), (status = "4XX", description = "the error, `param` naming the field at fault; 409 `not_failed` when the job is not failed", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn admin_retry(
    State(state): State<AppState>,
    _: Admin,
    TenantJobPath(tenant, id): TenantJobPath,
) -> ApiResult<Json<JobRef>> {
    retry_as(&state, &tenant, &id).await
}

async fn retry_as(state: &AppState, tenant: &TenantId, id: &str) -> ApiResult<Json<JobRef>> {
    let now = state
        .control()
        .retry_job(tenant, id)
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))?;
    Ok(Json(JobRef {
        id: id.to_string(),
        state: now,
    }))
}

/// `GET /v1/admin/tenants/{tenant}/jobs/{id}/log` (admin): any tenant's
/// job's log, as the tenant's own `GET /v1/jobs/{id}/log` shows it.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant}/jobs/{id}/log", tag = "admin", params(("tenant" = String, Path), ("id" = String, Path)), responses((status = 200, description = "the job's log, `text/plain`: the last attempt's, or what the running attempt has logged so far (admin)", content_type = "text/plain", body = String), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn admin_log(
    State(state): State<AppState>,
    _: Admin,
    TenantJobPath(tenant, id): TenantJobPath,
) -> ApiResult<impl axum::response::IntoResponse> {
    super::jobs::log_of(&state, &tenant, &id).await
}
