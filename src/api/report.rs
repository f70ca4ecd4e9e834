//! `/v1/tenants/{id}/ledger` and `/v1/tenants/{id}/usage`: what a tenant is
//! billed, line by line and by hour or day, for the tenant itself and the
//! admin.

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiResult};
use super::path::TenantPath;
use super::query::{Bucket, PageQuery, Query, UsageQuery};
use crate::control::{LedgerPage, UsageReport};
use crate::model::{TenantId, now_ms};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};

use super::limits::MAX_USAGE_WINDOW_DAYS;

const MAX_WINDOW_MS: u64 = MAX_USAGE_WINDOW_DAYS * 86_400_000;

/// Whether the caller may read tenant `id`: the admin, or the tenant
/// itself (anyone else is answered 404, as if it did not exist).
pub(super) fn readable(caller: &Caller, id: &TenantId) -> ApiResult<()> {
    if let Caller::Tenant(t) = caller
        && t != id
    {
        return Err(ApiError::NotFound("tenant"));
    }
    Ok(())
}

/// 404 `tenant` unless the tenant exists.
pub(super) async fn exists(state: &AppState, id: &TenantId) -> ApiResult<()> {
    state
        .control()
        .tenant(id)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?
        .map(|_| ())
        .ok_or(ApiError::NotFound("tenant"))
}

/// True when the client asked for CSV (`Accept: text/csv`).
fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|m| m.trim().starts_with("text/csv")))
}

/// `GET /v1/tenants/{id}/ledger?cursor=&limit=`: entries oldest first,
/// JSON `{"entries","next_cursor","checkpoint"}`, or CSV (one header line,
/// then one line per entry; the next cursor in the `Next-Cursor` header).
#[utoipa::path(get, path = "/v1/tenants/{id}/ledger", tag = "usage", params(("id" = String, Path)), responses((status = 200, description = "ledger entries oldest first, JSON or CSV (`Accept: text/csv`) (admin, that tenant)", content((crate::control::LedgerPage = "application/json"), (String = "text/csv"))), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn ledger(
    State(state): State<AppState>,
    caller: Caller,
    TenantPath(id): TenantPath,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    readable(&caller, &id)?;
    exists(&state, &id).await?;
    let page = state
        .control()
        .ledger_page(&id, q.cursor.as_deref(), q.limit)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    if wants_csv(&headers) {
        return Ok(ledger_csv(&page));
    }
    Ok(Json(page).into_response())
}

fn ledger_csv(page: &LedgerPage) -> Response {
    let mut out = String::from("id,time,op,job,attempt,amount,released,balance,reserved\n");
    for e in &page.entries {
        // Every field is an id, a time, an op name or an integer: none can
        // hold a comma, quote or newline, so none needs quoting.
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            e.id, e.time, e.op, e.job, e.attempt, e.amount, e.released, e.balance, e.reserved
        ));
    }
    let mut resp = ([(CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response();
    if let Some(next) = page
        .next_cursor
        .as_deref()
        .and_then(|c| axum::http::HeaderValue::from_str(c).ok())
    {
        resp.headers_mut().insert("next-cursor", next);
    }
    resp
}

/// `GET /v1/tenants/{id}/usage?from=&to=&by=hour|day`: fuel, slot and GPU
/// time, credits and jobs by outcome, in buckets by submission time.
#[utoipa::path(get, path = "/v1/tenants/{id}/usage", tag = "usage", params(("id" = String, Path)), responses((status = 200, description = "fuel, slot and GPU time, credits and jobs by outcome, by hour or day (admin, that tenant)", body = crate::control::UsageReport), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    TenantPath(id): TenantPath,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<UsageReport>> {
    readable(&caller, &id)?;
    let by = q.by.unwrap_or(Bucket::Hour);
    let to = q.to.unwrap_or_else(now_ms);
    let from = q.from.unwrap_or(to.saturating_sub(24 * by.ms()));
    if from >= to {
        return Err(ApiError::Invalid("`from` must be before `to`".into()));
    }
    if to - from > MAX_WINDOW_MS {
        return Err(ApiError::Invalid(format!(
            "`from` to `to` may span at most {MAX_USAGE_WINDOW_DAYS} days"
        )));
    }
    exists(&state, &id).await?;
    let report = state
        .control()
        .usage(&id, from, to, by.ms(), by.name())
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?;
    Ok(Json(report))
}
