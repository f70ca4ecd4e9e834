//! The HTTP API (contract §3): authentication, validation, JSON errors.
//!
//! [`app`] builds the router over an [`AppState`]; [`serve`] runs it on a
//! listener until a shutdown future resolves, so the binary and the tests
//! drive it the same way. Handlers do no job logic of their own: they check
//! the request, then call one control-plane operation.
//!
//! Bodies are read by [`read_body`], which refuses a declared
//! `Content-Length` above the route's limit before reading anything and stops
//! reading a streamed body as soon as it passes the limit.

mod auth;
mod error;
mod jobs;
mod prom;
mod tenants;
mod uploads;

pub use auth::{Caller, new_tenant_token, token_hash};
pub use error::{ApiError, ApiResult};
pub use prom::{install_metrics, metrics_app};

use crate::control::ControlPlane;
use crate::host::{Host, HostConfig};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header::CONTENT_LENGTH};
use axum::routing::{get, post};
use futures::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Request-size bounds, upload concurrency and long-poll settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest component upload.
    pub max_component_bytes: usize,
    /// Largest job `input` (the whole `POST /v1/jobs` body may add JSON
    /// framing and escaping on top, see [`ApiConfig::max_job_body_bytes`]).
    pub max_input_bytes: usize,
    /// Largest context upload (JSON).
    pub max_context_bytes: usize,
    /// Longest `?wait=` honoured; longer requests are cut to it so a client
    /// cannot pin a connection forever.
    pub max_wait: Duration,
    /// How often a long-poll first re-reads the job; the period doubles up
    /// to 5× this while the job stays unfinished, so many waiting clients
    /// on long jobs cost Redis little.
    pub wait_poll: Duration,
    /// Longest pause between two chunks of a request body (408 beyond).
    pub body_idle_timeout: Duration,
    /// Uploads (components, contexts) handled at once. Each may buffer up to
    /// its size limit and then burn CPU on admission or indexing: without a
    /// bound, a burst of large uploads could exhaust the API's memory.
    pub max_concurrent_uploads: usize,
    /// Uploads (components and contexts) one tenant may start in a burst;
    /// refilled at [`ApiConfig::uploads_per_minute`]. Each upload may cost
    /// seconds of admission CPU: without a rate, one tenant could keep the
    /// node's compiler busy for everyone (429 `rate_limited` beyond).
    pub upload_burst: u32,
    /// Uploads per minute one tenant may sustain.
    pub uploads_per_minute: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_component_bytes: 32 << 20,
            max_input_bytes: 1 << 20,
            max_context_bytes: 512 << 20,
            max_wait: Duration::from_secs(60),
            wait_poll: Duration::from_millis(100),
            max_concurrent_uploads: 4,
            body_idle_timeout: Duration::from_secs(30),
            upload_burst: 30,
            uploads_per_minute: 30,
        }
    }
}

impl ApiConfig {
    /// The job body may carry the input JSON-escaped (up to 6 bytes per
    /// byte for `\u00XX`) plus the other fields; the input itself is checked
    /// against `max_input_bytes` after parsing.
    pub fn max_job_body_bytes(&self) -> usize {
        self.max_input_bytes
            .saturating_mul(6)
            .saturating_add(64 << 10)
    }
}

struct Inner {
    control: ControlPlane,
    host: Arc<Host>,
    admin_token: String,
    cfg: ApiConfig,
    metrics: Option<PrometheusHandle>,
    uploads: Arc<tokio::sync::Semaphore>,
    upload_rate: uploads::UploadRate,
}

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

impl AppState {
    /// `host` is used only to admit uploads; `admin_token` must not be empty
    /// (an empty one would disable the admin, never match everything).
    pub fn new(
        control: ControlPlane,
        host: Arc<Host>,
        admin_token: String,
        cfg: ApiConfig,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                control,
                host,
                admin_token,
                uploads: Arc::new(tokio::sync::Semaphore::new(
                    cfg.max_concurrent_uploads.max(1),
                )),
                upload_rate: uploads::UploadRate::new(cfg.upload_burst, cfg.uploads_per_minute),
                cfg,
                metrics: prom::handle(),
            }),
        }
    }

    /// The control plane.
    pub fn control(&self) -> &ControlPlane {
        &self.inner.control
    }

    /// The host used for admission.
    pub fn host(&self) -> &Arc<Host> {
        &self.inner.host
    }

    /// Size limits and wait cap.
    pub fn config(&self) -> &ApiConfig {
        &self.inner.cfg
    }

    /// A permit to buffer and process one upload (see
    /// [`ApiConfig::max_concurrent_uploads`]); waits while others run.
    pub(crate) async fn upload_permit(&self) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
        self.inner
            .uploads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Internal)
    }

    /// Takes one upload from `tenant`'s rate, or says when to retry.
    pub(crate) fn upload_allowed(&self, tenant: &str) -> ApiResult<()> {
        self.inner.upload_rate.take(tenant)
    }

    pub(crate) fn admin_token(&self) -> &str {
        &self.inner.admin_token
    }
}

/// A `Host` for an API-only process: it admits uploads under the workers'
/// engine configuration ([`HostConfig::admission`]) and never runs them.
pub fn admission_host() -> anyhow::Result<Host> {
    Host::new(HostConfig::admission())
}

/// The router of every route of contract §3.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/metrics", get(prom::render))
        .route("/v1/tenants", post(tenants::create))
        .route("/v1/tenants/{id}", get(tenants::get).patch(tenants::patch))
        .route("/v1/tenants/{id}/credits", post(tenants::credits))
        .route("/v1/components", post(uploads::push_component))
        .route("/v1/components/{digest}", get(uploads::get_component))
        .route("/v1/contexts", post(uploads::push_context))
        .route("/v1/contexts/{name}", get(uploads::get_context))
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/log", get(jobs::log))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> ApiResult<&'static str> {
    state.control().ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness check failed");
        ApiError::Unavailable
    })?;
    Ok("ready\n")
}

/// Reads a request body of at most `limit` bytes; 413 beyond, without
/// buffering more than `limit` (+ one chunk).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    idle: Duration,
    what: &str,
) -> ApiResult<Bytes> {
    let too_large =
        || ApiError::PayloadTooLarge(format!("{what} is larger than the limit of {limit} bytes"));
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // Pre-allocate only a little: a declared length costs the client nothing
    // to send, so it must not make us reserve hundreds of MiB up front.
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(limit).min(1 << 20));
    let mut stream = body.into_data_stream();
    // An idle bound per chunk rather than a total one: a large upload over a
    // slow link may take long, but a client that stops sending must not
    // hold its buffer (and an upload permit) forever.
    while let Some(chunk) = tokio::time::timeout(idle, stream.next())
        .await
        .map_err(|_| ApiError::RequestTimeout)?
    {
        let chunk =
            chunk.map_err(|e| ApiError::Invalid(format!("could not read the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Parses a JSON body into `T`, naming the offending field on failure.
/// Serializes an answer; a value that cannot serialize is our bug, not the
/// caller's, so it is a 500 without details.
pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> ApiResult<axum::Json<serde_json::Value>> {
    serde_json::to_value(v)
        .map(axum::Json)
        .map_err(|_| ApiError::Internal)
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::Invalid(format!("invalid JSON body: {e}")))
}

/// Refuses object keys outside `allowed`, for bodies whose types (owned by
/// other modules) do not deny unknown fields themselves: a misspelt field
/// must not be silently ignored.
pub(crate) fn check_keys(value: &serde_json::Value, allowed: &[&str], at: &str) -> ApiResult<()> {
    let Some(obj) = value.as_object() else {
        return Err(ApiError::Invalid(format!("{at} must be a JSON object")));
    };
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(ApiError::Invalid(format!(
                "unknown field `{key}` in {at}; expected one of: {}",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// `sha256:<64 lowercase hex>`.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!valid_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!valid_digest(&format!("sha256:{}", "a".repeat(63))));
        assert!(!valid_digest(&format!("md5:{}", "a".repeat(64))));
    }

    const SEC: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let stalled =
            futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{")) })
                .chain(futures::stream::pending());
        let e = read_body(
            &HeaderMap::new(),
            Body::from_stream(stalled),
            10,
            Duration::from_millis(50),
            "body",
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ApiError::RequestTimeout));
        assert_eq!(e.parts().1, "request_timeout");
    }

    #[tokio::test]
    async fn body_limits_refuse_before_reading() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, "11".parse().unwrap());
        let e = read_body(&h, Body::from("hello world"), 10, SEC, "body")
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::PayloadTooLarge(_)));
        // Undeclared length: cut while streaming.
        let e = read_body(
            &HeaderMap::new(),
            Body::from("hello world"),
            10,
            SEC,
            "body",
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ApiError::PayloadTooLarge(_)));
        let ok = read_body(&HeaderMap::new(), Body::from("hello"), 10, SEC, "body")
            .await
            .unwrap();
        assert_eq!(&ok[..], b"hello");
    }

    #[test]
    fn unknown_keys_are_named() {
        let v = serde_json::json!({"id": "a", "wieght": 2});
        let e = check_keys(&v, &["id", "weight"], "the tenant").unwrap_err();
        assert!(e.to_string().contains("`wieght`"), "{e}");
    }
}
