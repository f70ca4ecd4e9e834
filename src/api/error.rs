//! The one error type of the HTTP API and its mapping to the JSON body
//! `{"error": {"code", "message", "param"?, "request_id"}}`.
//!
//! `request_id` is the id of the request (also sent as `X-Request-Id` on
//! every answer, and logged), so a user can quote it; `param` names the
//! field or parameter at fault when there is one (the first name a
//! message quotes in backticks). 429 and 503 answers carry `Retry-After`.
//!
//! Messages that reach the client are written for the client. Internal causes
//! (Redis errors, host failures) are logged with `tracing` and answered with a
//! generic sentence, so no connection string, key name or stack detail leaks.

use crate::control::CpError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// 400: the uploaded component was refused by admission.
    #[error("{0}")]
    InvalidComponent(String),
    /// 401: no token, or a token that matches nothing.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 403: a valid token without the right to this route.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404: absent, or owned by another tenant (indistinguishable on purpose).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 402: the tenant's credits do not cover the job's reservation.
    #[error("credits below the job's reservation")]
    InsufficientCredits,
    /// 409: `POST /v1/tenants` with an id that exists.
    #[error("tenant already exists")]
    TenantExists,
    /// 409: a retry of a job that is not `failed` (or was retried already).
    #[error("the job is {0}, not failed: only a failed job can be retried")]
    NotFailed(&'static str),
    /// 413: a body or the job input is larger than allowed.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 408: the client stopped sending its body.
    #[error("the request body stalled; send it again")]
    RequestTimeout,
    /// 415: a body of a media type the route does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 431: the request head is over the limit.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 429: the tenant already holds its share of upload slots.
    #[error("this tenant already has {0} uploads in progress; retry when one finishes")]
    TooManyUploads(usize),
    /// 429: the tenant is already sending this many job bodies.
    #[error("this tenant is already sending {0} job bodies; retry when one finishes")]
    TooManyBodies(usize),
    /// 429: the tenant already holds its share of long-polls and event
    /// streams.
    #[error("this tenant already holds {0} long-polls and event streams; retry when one ends")]
    TooManyWaits(usize),
    /// 405: the path exists with other methods.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 422: an `Idempotency-Key` reused with another body.
    #[error("idempotency key was used with a different request body")]
    IdempotencyConflict,
    /// 429: the tenant's `max_queued` is reached.
    #[error("the tenant's max_queued is reached; retry later")]
    QueueFull,
    /// 429: the tenant uploads faster than its upload rate; retry after
    /// this many seconds (also sent as `Retry-After`).
    #[error("too many uploads; retry in {0} s")]
    RateLimited(u64),
    /// 503: Redis is unreachable (cause logged, not shown).
    #[error("the control plane is unavailable; retry later")]
    Unavailable,
    /// 503: Redis is at its `maxmemory`; nothing was written.
    #[error("the control plane's storage is full; nothing was written; retry later")]
    StorageFull,
    /// 413: a per-tenant byte quota would be exceeded (the message names it).
    #[error("{0}")]
    QuotaExceeded(String),
    /// 400: a `callback_url` the deployment's egress rules refuse.
    #[error("{0}")]
    CallbackRefused(String),
    /// 500: anything else (cause logged, not shown).
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// Status and contract code of this error.
    pub fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::InvalidComponent(_) => (StatusCode::BAD_REQUEST, "invalid_component"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::InsufficientCredits => (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"),
            ApiError::TenantExists => (StatusCode::CONFLICT, "tenant_exists"),
            ApiError::NotFailed(_) => (StatusCode::CONFLICT, "not_failed"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::HeadersTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            ApiError::TooManyUploads(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_uploads"),
            ApiError::TooManyBodies(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            ApiError::TooManyWaits(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::IdempotencyConflict => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_conflict")
            }
            ApiError::QueueFull => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::StorageFull => (StatusCode::SERVICE_UNAVAILABLE, "storage_full"),
            ApiError::QuotaExceeded(_) => (StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded"),
            ApiError::CallbackRefused(_) => (StatusCode::BAD_REQUEST, "callback_not_allowed"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Maps a control-plane error met while handling `what` (used in the
    /// 404 message). Internal causes are logged here, once.
    pub fn from_cp(err: CpError, what: &'static str) -> ApiError {
        match err {
            CpError::NotFound => ApiError::NotFound(what),
            CpError::TenantExists => ApiError::TenantExists,
            CpError::NotFailed(state) => ApiError::NotFailed(state.as_str()),
            CpError::QueueFull => ApiError::QueueFull,
            CpError::InsufficientCredits => ApiError::InsufficientCredits,
            CpError::IdempotencyConflict => ApiError::IdempotencyConflict,
            CpError::Invalid(msg) => ApiError::Invalid(msg),
            CpError::StorageFull => {
                tracing::warn!("redis is at its maxmemory; refusing a write");
                ApiError::StorageFull
            }
            CpError::QuotaExceeded(msg) => ApiError::QuotaExceeded(msg),
            CpError::Redis(e) => {
                tracing::error!(error = %e, "redis error in API request");
                ApiError::Unavailable
            }
            other @ (CpError::LeaseLost
            | CpError::Cancelled
            | CpError::Internal(_)
            | CpError::Shards { .. }) => {
                tracing::error!(error = %other, "control-plane error in API request");
                ApiError::Internal
            }
        }
    }
}

impl From<CpError> for ApiError {
    fn from(err: CpError) -> Self {
        ApiError::from_cp(err, "resource")
    }
}

tokio::task_local! {
    /// The id of the request being handled (set by [`with_request_id`]).
    static REQUEST_ID: String;
}

/// The current request's id; a fresh one outside a request (an answer the
/// connection layer writes itself).
pub(crate) fn request_id() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| ulid::Ulid::new().to_string())
}

/// A client's own `X-Request-Id` is kept when it is short and plain (it
/// is echoed and logged); otherwise the request gets a new ULID.
fn incoming_id(req: &axum::extract::Request) -> Option<String> {
    let v = req.headers().get("x-request-id")?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| v.to_string())
}

/// Gives each request an id, in scope while it is handled (so every error
/// body names it) and sent back as `X-Request-Id`.
pub(crate) async fn with_request_id(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = incoming_id(&req).unwrap_or_else(|| ulid::Ulid::new().to_string());
    let span = tracing::info_span!("request", request_id = %id);
    let mut resp =
        tracing::Instrument::instrument(REQUEST_ID.scope(id.clone(), next.run(req)), span).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The body of every error answer (the OpenAPI schema of
/// [`error_body`]'s value).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `{"code","message","request_id","param"?}` of an error answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable code (`invalid_request`, `not_found`, `queue_full`, ...).
    pub code: String,
    /// A sentence for the client.
    pub message: String,
    /// The id of the request (also its `X-Request-Id`).
    pub request_id: String,
    /// The field or parameter at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

/// The field a message names: its first `backticked` word.
fn param_of(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    let p = &message[start..start + len];
    (!p.is_empty() && p.len() <= 128).then_some(p)
}

/// The JSON error body, with the request id and, when the message names
/// one, the field at fault.
pub(crate) fn error_body(code: &str, message: &str, names_param: bool) -> serde_json::Value {
    let mut e = json!({"code": code, "message": message, "request_id": request_id()});
    if names_param && let Some(p) = param_of(message) {
        e["param"] = json!(p);
    }
    json!({ "error": e })
}

/// Seconds a client should wait before retrying a 429 or 503.
fn retry_after(err: &ApiError) -> Option<u64> {
    match err {
        ApiError::RateLimited(secs) => Some(*secs),
        ApiError::QueueFull
        | ApiError::TooManyUploads(_)
        | ApiError::TooManyBodies(_)
        | ApiError::TooManyWaits(_)
        | ApiError::Unavailable
        | ApiError::StorageFull => Some(1),
        _ => None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let names_param = matches!(
            self,
            ApiError::Invalid(_)
                | ApiError::PayloadTooLarge(_)
                | ApiError::QuotaExceeded(_)
                | ApiError::CallbackRefused(_)
        );
        let body = error_body(code, &self.to_string(), names_param);
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = retry_after(&self) {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_errors_do_not_leak() {
        let e = redis::RedisError::from((
            redis::ErrorKind::Io,
            "connection refused",
            "redis+unix:///secret/path".to_string(),
        ));
        let api = ApiError::from(CpError::Redis(e));
        assert_eq!(
            api.parts(),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        assert!(!api.to_string().contains("secret"));
        let api = ApiError::from(CpError::Internal("key ap:{0}:x".into()));
        assert_eq!(api.parts().1, "internal");
        assert!(!api.to_string().contains("ap:"));
    }

    #[test]
    fn the_param_is_the_first_quoted_name() {
        assert_eq!(
            param_of("`limits.fuel` must be positive"),
            Some("limits.fuel")
        );
        assert_eq!(
            param_of("invalid job body: `gpu`: unknown field `gpu`"),
            Some("gpu")
        );
        assert_eq!(param_of("no name here"), None);
        assert_eq!(param_of("an ` unclosed"), None);
    }
}
