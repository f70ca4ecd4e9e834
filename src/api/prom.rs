//! Prometheus exposition. Every part of the process records with the
//! `metrics` macros; this module installs the one global recorder and renders
//! it at `GET /metrics` (admin token: the series name tenants). The
//! `worker` and `scheduler` processes serve theirs only when given
//! `--metrics-listen`, off by default.
//!
//! Every series the code records (API, worker, host, scheduler) is listed
//! in the README, under "Metrics"; a new series belongs in that list.

use super::auth::Admin;
use super::{ApiError, AppState};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process. A second call (tests
/// build many apps in one process) answers the first handle; if another
/// recorder was installed by someone else, metrics are not exposed.
pub fn install_metrics() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        })
        .clone()
}

pub(super) fn handle() -> Option<PrometheusHandle> {
    install_metrics()
}

/// `GET /metrics` (admin): series are labelled with tenant ids, which one
/// tenant must not learn about another.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text (admin)"), (status = "4XX", description = "`{\"error\":{\"code\",\"message\",\"request_id\",\"param\"?}}`")))]
pub(super) async fn render(
    State(state): State<AppState>,
    _: Admin,
) -> Result<impl IntoResponse, ApiError> {
    let text = match &state.inner.metrics {
        Some(h) => {
            // Upkeep drains histogram buffers; the scrape is a natural,
            // bounded moment to do it.
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    };
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

/// `/metrics` and `/healthz` alone, for processes without the API (`worker`,
/// `scheduler`) so every part of a deployment can be scraped.
pub fn metrics_app() -> axum::Router {
    let handle = install_metrics();
    axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    let text = handle
                        .map(|h| {
                            h.run_upkeep();
                            h.render()
                        })
                        .unwrap_or_default();
                    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text)
                }
            }),
        )
}
