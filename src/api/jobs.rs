//! `/v1/jobs`: submission (with idempotency), inspection with long-poll,
//! logs, listing and cancellation.

use super::auth::Tenant;
use super::body::{expect_json, parse_json, read_body};
use super::error::{ApiError, ApiResult};
use super::path::JobPath;
use super::query::{JobsQuery, Query, WaitQuery};
use super::types::{JobPage, JobRef};
use super::{AppState, valid_digest};
use crate::api::JobRequest;
use crate::control::{SubmitSpec, TenantInfo};
use crate::model::{Job, JobState, TenantId, valid_name};
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::time::Duration;
use tokio::time::Instant;

use super::limits::{
    DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS_CAP, MAX_BATCH, MAX_CONTEXTS, MAX_DELAY_MS,
    MAX_IDEMPOTENCY_KEY,
};
/// Parses a `POST /v1/jobs` body and checks it against the tenant's
/// settings, without touching Redis: the one path the handler and the
/// fuzzer (`tests/fuzz`) share. Errors name the field at fault.
pub fn parse_job_request(
    bytes: &[u8],
    tenant: &TenantInfo,
    max_input: usize,
) -> ApiResult<JobRequest> {
    let req: JobRequest = parse_json(bytes, "job body")?;
    validate(&req, tenant, max_input)?;
    Ok(req)
}

/// Checks a request's `callback_url` against the deployment's egress rules.
fn check_callback(state: &AppState, req: &JobRequest) -> ApiResult<()> {
    if let Some(url) = &req.callback_url {
        state
            .config()
            .callbacks
            .check(url)
            .map_err(|e| ApiError::CallbackRefused(e.0))?;
    }
    Ok(())
}

/// Checks a request against the tenant's settings; names the field at fault.
fn validate(req: &JobRequest, tenant: &TenantInfo, max_input: usize) -> ApiResult<()> {
    if !valid_digest(&req.component) {
        return Err(ApiError::Invalid(
            "`component` must be a digest `sha256:<64 lowercase hex>`".into(),
        ));
    }
    if req.input.len() > max_input {
        return Err(ApiError::PayloadTooLarge(format!(
            "`input` is larger than the limit of {max_input} bytes"
        )));
    }
    if let Some(a) = &req.agent_id
        && !valid_name(a)
    {
        return Err(ApiError::Invalid(
            "`agent_id` must be 1-128 characters of letters, digits, `-`, `_`, `.` and `/`".into(),
        ));
    }
    if req.contexts.len() > MAX_CONTEXTS {
        return Err(ApiError::Invalid(format!(
            "`contexts` may name at most {MAX_CONTEXTS} contexts"
        )));
    }
    let mut seen = HashSet::new();
    for c in &req.contexts {
        if !valid_name(c) {
            return Err(ApiError::Invalid(format!(
                "`contexts` has an invalid name `{}`",
                c.escape_default()
            )));
        }
        if !seen.insert(c) {
            return Err(ApiError::Invalid(format!("`contexts` names `{c}` twice")));
        }
    }
    if req.gpus > tenant.max_gpus {
        return Err(ApiError::Invalid(format!(
            "`gpus` is {} but the tenant may use at most {}",
            req.gpus, tenant.max_gpus
        )));
    }
    if let Some(a) = req.max_attempts
        && !(1..=MAX_ATTEMPTS_CAP).contains(&a)
    {
        return Err(ApiError::Invalid(format!(
            "`max_attempts` must be between 1 and {MAX_ATTEMPTS_CAP}"
        )));
    }
    if let Some(v) = req.max_tokens
        && v > tenant.max_tokens_per_job
    {
        return Err(ApiError::Invalid(format!(
            "`max_tokens` is {v} but the tenant's limit is {}; a job may only lower it",
            tenant.max_tokens_per_job
        )));
    }
    for (name, asked, cap) in [
        ("timeout_ms", req.timeout_ms, tenant.limits.timeout_ms),
        ("fuel", req.fuel, tenant.limits.fuel),
    ] {
        match asked {
            Some(0) => return Err(ApiError::Invalid(format!("`{name}` must be positive"))),
            Some(v) if v > cap => {
                return Err(ApiError::Invalid(format!(
                    "`{name}` is {v} but the tenant's limit is {cap}; a job may only lower it"
                )));
            }
            _ => {}
        }
    }
    if req.delay_ms > MAX_DELAY_MS {
        return Err(ApiError::Invalid(format!(
            "`delay_ms` must be at most {MAX_DELAY_MS}"
        )));
    }
    Ok(())
}

pub(super) fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::Invalid(format!(
            "`Idempotency-Key` must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        ))
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty() || s.len() > MAX_IDEMPOTENCY_KEY || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// `POST /v1/jobs` → 201 `{"id","state"}`, or 200 for an idempotent replay.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = super::types::JobRequest, responses((status = 201, description = "`{\"id\",\"state\"}`; 200 on an idempotent replay (tenant)", body = super::types::JobRef), (status = 200, description = "an idempotent replay: the job the key first made", body = super::types::JobRef), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn submit(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<JobRef>)> {
    let idem = idempotency_key(&headers)?;
    expect_json(&headers)?;
    let cfg = state.config();
    let bytes = tenant_body(
        &state,
        &tenant,
        &headers,
        body,
        cfg.max_job_body_bytes(),
        "the job body",
    )
    .await?;
    let cp = state.control();
    let info = cp
        .tenant(&tenant)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?
        // The token was valid a moment ago; the tenant is gone only if it
        // was deleted in between.
        .ok_or(ApiError::Unauthorized)?;
    let req = parse_job_request(&bytes, &info, cfg.max_input_bytes)?;
    check_callback(&state, &req)?;
    // The raw body is hashed, so a replay must repeat it byte for byte.
    let idem = idem.map(|k| (k, hex::encode(Sha256::digest(&bytes))));
    let submitted = submit_one(&state, &tenant, &info, req, idem).await?;
    let status = if submitted.created {
        metrics::counter!("agentplane_jobs_submitted_total", "tenant" => tenant.clone())
            .increment(1);
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(JobRef {
            id: submitted.id,
            state: submitted.state,
        }),
    ))
}

/// Resolves a checked request's component and contexts and submits it.
async fn submit_one(
    state: &AppState,
    tenant: &TenantId,
    info: &TenantInfo,
    req: JobRequest,
    idempotency: Option<(String, String)>,
) -> ApiResult<crate::control::Submitted> {
    let cp = state.control();
    let component = cp
        .component_meta(tenant, &req.component)
        .await
        .map_err(|e| ApiError::from_cp(e, "component"))?
        .ok_or(ApiError::NotFound("component"))?;
    let mut contexts = Vec::with_capacity(req.contexts.len());
    for name in &req.contexts {
        let meta = cp
            .context_meta(tenant, name)
            .await
            .map_err(|e| ApiError::from_cp(e, "context"))?
            .ok_or(ApiError::NotFound("context"))?;
        contexts.push((name.clone(), meta.digest));
    }
    // A component that calls the node's models reserves its whole token
    // allowance at the tenant's dearest granted rate.
    let max_tokens = if component.inference {
        req.max_tokens.unwrap_or(info.max_tokens_per_job)
    } else {
        0
    };
    let spec = SubmitSpec {
        component: req.component,
        input: req.input,
        agent_id: req.agent_id,
        contexts,
        gpus: req.gpus,
        max_attempts: req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        timeout_ms: req.timeout_ms,
        fuel: req.fuel,
        delay_ms: req.delay_ms,
        idempotency,
        callback_url: req.callback_url,
        outbound_http: component.outbound_http,
        max_tokens,
        tokens_reserve: crate::model::grants::reserve(max_tokens, &info.models),
    };
    cp.submit(tenant, &spec)
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))
}

/// `POST /v1/jobs/batch` body: `{"jobs":[{"job":{…},"idempotency_key"?}]}`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Batch {
    jobs: Vec<BatchItem>,
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    job: serde_json::Value,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// One job's answer in a batch: the job, or why it was refused.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum BatchResult {
    Submitted {
        id: String,
        state: JobState,
        /// False when an idempotent replay found the existing job.
        created: bool,
    },
    Refused {
        #[schema(value_type = crate::api::ErrorDetail)]
        error: serde_json::Value,
    },
}

/// `POST /v1/jobs/batch` answer: one result per job, in order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BatchResults {
    pub results: Vec<BatchResult>,
}

/// `POST /v1/jobs/batch` → 200 `{"results":[…]}`, one per job in order:
/// each job is submitted on its own (its own checks, credits, queue space
/// and idempotency key), so one refused job does not refuse the others.
#[utoipa::path(post, path = "/v1/jobs/batch", tag = "jobs", request_body = Batch, responses((status = 200, description = "one result per job, in order (tenant)", body = BatchResults), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn batch(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<BatchResults>> {
    expect_json(&headers)?;
    let cfg = state.config();
    let bytes = tenant_body(
        &state,
        &tenant,
        &headers,
        body,
        cfg.max_batch_body_bytes(),
        "the batch body",
    )
    .await?;
    let batch: Batch = parse_json(&bytes, "batch body")?;
    if batch.jobs.is_empty() || batch.jobs.len() > MAX_BATCH {
        return Err(ApiError::Invalid(format!(
            "`jobs` must hold 1 to {MAX_BATCH} jobs"
        )));
    }
    let info = state
        .control()
        .tenant(&tenant)
        .await
        .map_err(|e| ApiError::from_cp(e, "tenant"))?
        .ok_or(ApiError::Unauthorized)?;
    let mut results = Vec::with_capacity(batch.jobs.len());
    for (i, item) in batch.jobs.into_iter().enumerate() {
        let one = async {
            let key = match item.idempotency_key {
                Some(k)
                    if k.is_empty()
                        || k.len() > MAX_IDEMPOTENCY_KEY
                        || !k.bytes().all(|b| b.is_ascii_graphic()) =>
                {
                    return Err(ApiError::Invalid(format!(
                        "`jobs[{i}].idempotency_key` must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
                    )));
                }
                k => k,
            };
            // The job's own JSON, as sent (keys in order), is what a replay
            // must repeat.
            let raw = serde_json::to_vec(&item.job).map_err(|_| ApiError::Internal)?;
            let req = parse_job_request(&raw, &info, cfg.max_input_bytes)?;
            check_callback(&state, &req)?;
            let idem = key.map(|k| (k, hex::encode(Sha256::digest(&raw))));
            submit_one(&state, &tenant, &info, req, idem).await
        };
        results.push(match one.await {
            Ok(s) => {
                if s.created {
                    metrics::counter!("agentplane_jobs_submitted_total", "tenant" => tenant.clone())
                        .increment(1);
                }
                BatchResult::Submitted {
                    id: s.id,
                    state: s.state,
                    created: s.created,
                }
            }
            Err(e) => {
                let (_, code) = e.parts();
                let body = super::error::error_body(
                    code,
                    &e.to_string(),
                    matches!(
                        code,
                        "invalid_request" | "payload_too_large" | "callback_not_allowed"
                    ),
                );
                BatchResult::Refused {
                    error: body["error"].clone(),
                }
            }
        });
    }
    Ok(Json(BatchResults { results }))
}

pub(super) async fn fetch_job(state: &AppState, tenant: &TenantId, id: &str) -> ApiResult<Job> {
    state
        .control()
        .job(tenant, id)
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))?
        .ok_or(ApiError::NotFound("job"))
}

/// `GET /v1/jobs/{id}?wait=SECONDS`: the job, held until it is terminal or
/// the wait (capped) is over.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "the job, held until terminal or `wait` seconds (tenant)", body = crate::model::Job), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JobPath(id): JobPath,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<Job>> {
    // Capped before the conversion: a huge finite `wait` is valid and must
    // not overflow a `Duration`.
    let max = state.config().max_wait.as_secs_f64();
    let wait = Duration::from_secs_f64(q.wait.unwrap_or(0.0).min(max));
    // A tenant over its long-poll share is answered at once: it may poll,
    // but not hold every connection of the server.
    let place = if wait.is_zero() {
        None
    } else {
        state.wait_place(&tenant)
    };
    let wait = if place.is_some() {
        wait
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + wait;
    let base = super::limits::WAIT_POLL;
    let mut period = base;
    loop {
        let job = fetch_job(&state, &tenant, &id).await?;
        let now = Instant::now();
        if job.state.is_terminal() || now >= deadline {
            return Ok(Json(job));
        }
        tokio::time::sleep(period.min(deadline - now)).await;
        period = (period * 2).min(base * 5);
    }
}

/// `GET /v1/jobs/{id}/log`: the last attempt's log as `text/plain` (while
/// an attempt runs, what it has logged so far, stored in batches).
#[utoipa::path(get, path = "/v1/jobs/{id}/log", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "the last attempt's log, `text/plain`, or what the running attempt has logged so far (tenant)", content_type = "text/plain", body = String), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn log(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JobPath(id): JobPath,
) -> ApiResult<impl IntoResponse> {
    log_of(&state, &tenant, &id).await
}

/// The log of `tenant`'s job `id` as `text/plain` (the tenant's route and
/// the admin's).
pub(super) async fn log_of(
    state: &AppState,
    tenant: &TenantId,
    id: &str,
) -> ApiResult<impl IntoResponse + use<>> {
    let text = state
        .control()
        .job_log(tenant, id)
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))?
        .ok_or(ApiError::NotFound("job"))?;
    Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

/// `POST /v1/jobs/{id}/cancel` → `{"id","state"}`.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "`{\"id\",\"state\"}` (tenant)", body = super::types::JobRef), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JobPath(id): JobPath,
) -> ApiResult<Json<JobRef>> {
    let answered = state
        .control()
        .cancel(&tenant, &id)
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))?;
    // Answer the state as it is now (`cancelled` for a job that was waiting,
    // `running` for one that stops at its next lease check), whatever the
    // script reported.
    let now = match state.control().job(&tenant, &id).await {
        Ok(Some(job)) => job.state,
        _ => match answered {
            JobState::Queued | JobState::Delayed => JobState::Cancelled,
            other => other,
        },
    };
    Ok(Json(JobRef { id, state: now }))
}

/// `GET /v1/jobs?state=&limit=&cursor=` → `{"jobs":[…],"next_cursor"}`.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", responses((status = 200, description = "`{\"jobs\",\"next_cursor\"}`, newest first (tenant)", body = super::types::JobPage), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Json<JobPage>> {
    let (jobs, next) = state
        .control()
        .list_jobs(&tenant, q.state, q.limit, q.cursor.as_deref())
        .await
        .map_err(|e| ApiError::from_cp(e, "job"))?;
    Ok(Json(JobPage {
        jobs,
        next_cursor: next,
    }))
}

/// Reads a tenant's JSON body of at most `max` bytes. Each body in flight
/// may buffer up to `max` for as long as the body rules allow, so a tenant
/// holds a bounded number of them (a place, released once it is read).
async fn tenant_body(
    state: &AppState,
    tenant: &TenantId,
    headers: &HeaderMap,
    body: Body,
    max: usize,
    what: &str,
) -> ApiResult<axum::body::Bytes> {
    let cfg = state.config();
    let _place = state
        .body_place(tenant)
        .ok_or(ApiError::TooManyBodies(cfg.max_bodies_per_tenant))?;
    read_body(headers, body, max, cfg, what).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Credits;
    use crate::model::Limits;
    use serde_json::json;

    fn tenant() -> TenantInfo {
        TenantInfo {
            id: "t".into(),
            weight: 1,
            max_running: 10,
            max_queued: 10,
            max_gpus: 1,
            limits: Limits::default(),
            credits: Credits {
                balance: 0,
                reserved: 0,
            },
            running: 0,
            queued: 0,
            gpus_in_use: 0,
            granted: 0,
            settled: 0,
            storage: Default::default(),
            parked: None,
            allowed_outbound_hosts: Vec::new(),
            models: Vec::new(),
            max_tokens_per_job: 4096,
        }
    }

    fn req() -> JobRequest {
        serde_json::from_value(json!({
            "component": format!("sha256:{}", "0".repeat(64)),
            "input": "hi",
        }))
        .unwrap()
    }

    #[test]
    fn a_job_may_only_lower_the_tenants_limits() {
        let t = tenant();
        assert!(validate(&req(), &t, 10).is_ok());
        let mut r = req();
        r.fuel = Some(t.limits.fuel + 1);
        let e = validate(&r, &t, 10).unwrap_err();
        assert!(e.to_string().contains("`fuel`"), "{e}");
        let mut r = req();
        r.timeout_ms = Some(t.limits.timeout_ms);
        assert!(validate(&r, &t, 10).is_ok());
        let mut r = req();
        r.gpus = 2;
        assert!(
            validate(&r, &t, 10)
                .unwrap_err()
                .to_string()
                .contains("`gpus`")
        );
        let mut r = req();
        r.input = "x".repeat(11);
        assert!(matches!(
            validate(&r, &t, 10).unwrap_err(),
            ApiError::PayloadTooLarge(_)
        ));
        let mut r = req();
        r.component = "sha256:nothex".into();
        assert!(
            validate(&r, &t, 10)
                .unwrap_err()
                .to_string()
                .contains("`component`")
        );
        let mut r = req();
        r.contexts = vec!["a".into(), "a".into()];
        assert!(validate(&r, &t, 10).is_err());
    }

    #[test]
    fn unknown_job_fields_are_named() {
        let e = parse_json::<JobRequest>(br#"{"component":"x","input":"","gpu":1}"#, "job body")
            .unwrap_err();
        assert!(e.to_string().contains("`gpu`"), "{e}");
    }
}
