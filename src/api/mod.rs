//! The HTTP API (README, "The HTTP API"): authentication, validation, JSON errors.
//!
//! [`app`] builds the router over an [`AppState`]; [`serve`] runs it on a
//! listener until a shutdown future resolves, so the binary and the tests
//! drive it the same way. Handlers do no job logic of their own: they check
//! the request, then call one control-plane operation.
//!
//! Bodies are read by `body::read_body`, which refuses a declared
//! `Content-Length` above the route's limit before reading anything, stops
//! reading a streamed body as soon as it passes the limit, and cuts a body
//! that stalls or trickles (408). The accept loop, the header timeout and
//! the connection cap are in `edge`. Path ids are parsed into their types
//! by the extractors of `path` (tenant ids, job ids), query strings by
//! `query`; every bound and default is in [`limits`].

mod admin;
mod auth;
mod body;
mod edge;
mod error;
mod events;
mod jobs;
pub mod limits;
mod path;
mod prom;
mod query;
mod report;
mod secrets;
pub use secrets::SecretList;
mod tenants;
mod types;
mod ui;
mod uploads;

pub use auth::{Admin, Caller, Tenant, token_hash};
pub use edge::{MAX_HEADERS, serve};
pub use error::{ApiError, ApiResult};
pub use error::{ErrorBody, ErrorDetail};
pub use jobs::{BatchResult, BatchResults, parse_job_request};
pub use limits::MAX_BATCH;
pub use prom::{install_metrics, metrics_app};
pub use types::{Balance, CallbackKey, JobPage, JobRef, JobRequest, TenantPage, TenantToken};

use crate::control::ControlPlane;
use crate::host::Host;
use axum::Router;
use body::UploadSlots;
pub(crate) use body::to_json;
use metrics_exporter_prometheus::PrometheusHandle;
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
    /// Longest pause between two chunks of a request body (408 beyond).
    pub body_idle_timeout: Duration,
    /// Uploads (components, contexts) handled at once. Each may buffer up to
    /// its size limit and then burn CPU on admission or indexing: without a
    /// bound, a burst of large uploads could exhaust the API's memory.
    pub max_concurrent_uploads: usize,
    /// Of those, how many one tenant may hold at once: a tenant that parks
    /// slow uploads on every slot would otherwise lock all others out.
    pub uploads_per_tenant: usize,
    /// The slowest average body rate accepted (bytes/s) once
    /// `body_grace` has passed: a body must always be ahead of
    /// `grace + received / rate`, so a client trickling a byte at a time
    /// cannot hold a buffer and a slot for long (408 beyond).
    pub body_min_rate: u64,
    /// Time a body may take before `body_min_rate` applies.
    pub body_grace: Duration,
    /// Longest time to receive a request's head, which is also how long an
    /// idle keep-alive connection is kept: a half-sent request must not hold
    /// a connection (and a file descriptor) forever.
    pub header_timeout: Duration,
    /// Connections served at once; more wait in the kernel's backlog
    /// instead of exhausting the process's file descriptors.
    pub max_connections: usize,
    /// Largest request head (request line and headers) answered with a
    /// JSON 431 beyond; the parser's own hard bound is a little above it.
    pub max_header_bytes: usize,
    /// Long-polls (`?wait=`) one tenant may hold at once; more are answered
    /// at once, without waiting. Each holds a connection for up to
    /// `max_wait`: unbounded, one tenant could fill `max_connections`.
    pub max_waits_per_tenant: usize,
    /// Job submissions whose bodies one tenant may be sending at once (429
    /// beyond): each may buffer up to [`ApiConfig::max_job_body_bytes`]
    /// for as long as the body rules allow, so without a share one tenant
    /// trickling many bodies could hold gigabytes.
    pub max_bodies_per_tenant: usize,
    /// Longest time an answer may make no progress (the client stopped
    /// reading) before its connection is dropped.
    pub write_timeout: Duration,
    /// Uploads (components and contexts) one tenant may start in a burst;
    /// refilled at [`ApiConfig::uploads_per_minute`]. Each upload may cost
    /// seconds of admission CPU: without a rate, one tenant could keep the
    /// node's compiler busy for everyone (429 `rate_limited` beyond).
    pub upload_burst: u32,
    /// Uploads per minute one tenant may sustain.
    pub uploads_per_minute: u32,
    /// Egress rules and signing secret of job callbacks (none allowed by
    /// default).
    pub callbacks: crate::callbacks::Callbacks,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            max_component_bytes: limits::DEFAULT_MAX_COMPONENT_BYTES,
            max_input_bytes: limits::DEFAULT_MAX_INPUT_BYTES,
            max_context_bytes: limits::DEFAULT_MAX_CONTEXT_BYTES,
            max_wait: limits::DEFAULT_MAX_WAIT,
            max_concurrent_uploads: limits::DEFAULT_MAX_CONCURRENT_UPLOADS,
            body_idle_timeout: limits::DEFAULT_BODY_IDLE_TIMEOUT,
            uploads_per_tenant: limits::DEFAULT_UPLOADS_PER_TENANT,
            body_min_rate: limits::DEFAULT_BODY_MIN_RATE,
            body_grace: limits::DEFAULT_BODY_GRACE,
            header_timeout: limits::DEFAULT_HEADER_TIMEOUT,
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
            max_header_bytes: limits::DEFAULT_MAX_HEADER_BYTES,
            max_waits_per_tenant: limits::DEFAULT_MAX_WAITS_PER_TENANT,
            write_timeout: limits::DEFAULT_WRITE_TIMEOUT,
            max_bodies_per_tenant: limits::DEFAULT_MAX_BODIES_PER_TENANT,
            upload_burst: limits::DEFAULT_UPLOAD_BURST,
            uploads_per_minute: limits::DEFAULT_UPLOADS_PER_MINUTE,
            callbacks: crate::callbacks::Callbacks::default(),
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

    /// A batch (`POST /v1/jobs/batch`) body: up to 1,000 jobs, but never
    /// more than 16 MiB (or one job's bound, if that is larger); each
    /// input is still checked against `max_input_bytes`.
    pub fn max_batch_body_bytes(&self) -> usize {
        self.max_job_body_bytes().max(16 << 20)
    }
}

struct Inner {
    control: ControlPlane,
    host: Arc<Host>,
    admin_token: String,
    cfg: ApiConfig,
    metrics: Option<PrometheusHandle>,
    uploads: UploadSlots,
    waits: body::Shares,
    bodies: body::Shares,
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
                uploads: UploadSlots::new(&cfg),
                waits: body::Shares::new(cfg.max_waits_per_tenant),
                bodies: body::Shares::new(cfg.max_bodies_per_tenant),
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

    /// A slot to buffer and process one upload of `tenant` (see
    /// [`ApiConfig::max_concurrent_uploads`] and
    /// [`ApiConfig::uploads_per_tenant`]).
    pub(crate) async fn upload_slot(&self, tenant: &str) -> ApiResult<body::UploadSlot> {
        self.inner.uploads.acquire(tenant).await
    }

    /// One of `tenant`'s long-poll places, or `None` when it holds them all
    /// (see [`ApiConfig::max_waits_per_tenant`]).
    pub(crate) fn wait_place(&self, tenant: &str) -> Option<body::Share> {
        self.inner.waits.try_take(tenant)
    }

    /// One of `tenant`'s places to send a job body, or `None` when it holds
    /// them all (see [`ApiConfig::max_bodies_per_tenant`]).
    pub(crate) fn body_place(&self, tenant: &str) -> Option<body::Share> {
        self.inner.bodies.try_take(tenant)
    }

    /// Takes one upload from `tenant`'s rate, or says when to retry.
    pub(crate) fn upload_allowed(&self, tenant: &str) -> ApiResult<()> {
        self.inner.upload_rate.take(tenant)
    }

    pub(crate) fn admin_token(&self) -> &str {
        &self.inner.admin_token
    }
}

/// The OpenAPI document's header; the paths come from the handlers'
/// `#[utoipa::path]` annotations, registered with their routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    // What a job's `callback_url` receives (README, "Callbacks").
    components(schemas(crate::callbacks::CallbackBody)),
    info(
    title = "agentplane",
    description = "Multi-tenant, WebAssembly-sandboxed agent execution host. \
        `Authorization: Bearer <token>`: the admin token, or a tenant's `<tenant>.<secret>`."
))]
struct ApiDoc;

/// Every route with its OpenAPI operation: `routes!` registers a handler
/// and its annotation together, so the router and the document cannot
/// drift apart (`tests/openapi.rs` checks the document against the API).
fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa::OpenApi;
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(openapi_json))
        .routes(routes!(prom::render))
        .routes(routes!(ui::page))
        .routes(routes!(tenants::create))
        .routes(routes!(tenants::get, tenants::patch))
        .routes(routes!(tenants::credits))
        .routes(routes!(tenants::callback_key))
        .routes(routes!(secrets::list))
        .routes(routes!(secrets::put, secrets::delete))
        .routes(routes!(report::ledger))
        .routes(routes!(report::usage))
        .routes(routes!(admin::tenants))
        .routes(routes!(admin::jobs))
        .routes(routes!(admin::admin_retry))
        .routes(routes!(admin::admin_log))
        .routes(routes!(uploads::push_component))
        .routes(routes!(uploads::get_component))
        .routes(routes!(uploads::push_context))
        .routes(routes!(uploads::get_context))
        .routes(routes!(jobs::submit, jobs::list))
        .routes(routes!(jobs::batch))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::log))
        .routes(routes!(events::events))
        .routes(routes!(jobs::cancel))
        .routes(routes!(admin::retry))
}

/// The OpenAPI document of this API, built once.
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(|| routes().into_openapi())
}

/// The router of every route of the OpenAPI document ([`openapi`]).
pub fn app(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    let router = router
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    edge::layers(router, state)
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "ops", responses((status = 200, description = "this document (OpenAPI 3.1), for anyone", content_type = "application/json", body = Object)))]
async fn openapi_json() -> axum::Json<&'static utoipa::openapi::OpenApi> {
    axum::Json(openapi())
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, description = "liveness: `ok`", content_type = "text/plain", body = String)))]
async fn health() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200, description = "Redis reachable: `ready` (503 `unavailable` when not)", content_type = "text/plain", body = String), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
async fn ready(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> ApiResult<&'static str> {
    state.control().ping().await.map_err(|e| {
        tracing::warn!(error = %e, "readiness check failed");
        ApiError::Unavailable
    })?;
    Ok("ready\n")
}

/// The shape a job id may have: bounded and key-safe, since it becomes part
/// of a Redis key. Anything else names no job and is refused before any
/// lookup.
fn job_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `sha256:<64 lowercase hex>`.
fn valid_digest(d: &str) -> bool {
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
}
