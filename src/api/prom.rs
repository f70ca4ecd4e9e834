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

/// Upper bounds (seconds) of every histogram's buckets. Every histogram
/// the code records is a duration (`*_seconds`), from a CLAIM round trip
/// (about a millisecond) to a long agent run (minutes). Buckets, unlike
/// the exporter's default summaries, add up across workers, so
/// `histogram_quantile(0.99, sum by (le) (rate(..._bucket[5m])))` is the
/// deployment's p99, not an average of each process's.
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Installs the Prometheus recorder once per process. A second call (tests
/// build many apps in one process) answers the first handle; if another
/// recorder was installed by someone else, metrics are not exposed.
pub fn install_metrics() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            match PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .and_then(|b| b.install_recorder())
            {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

pub(super) fn handle() -> Option<PrometheusHandle> {
    install_metrics()
}

/// `GET /metrics` (admin): series are labelled with tenant ids, which one
/// tenant must not learn about another.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text (admin)", content_type = "text/plain", body = String), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
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

#[cfg(test)]
mod tests {
    #[test]
    fn histograms_render_with_buckets() {
        let Some(h) = super::install_metrics() else {
            panic!("no recorder")
        };
        metrics::histogram!("agentplane_claim_seconds").record(0.003);
        h.run_upkeep();
        let text = h.render();
        assert!(
            text.contains("# TYPE agentplane_claim_seconds histogram"),
            "{text}"
        );
        assert!(
            text.lines().any(
                |l| l.starts_with("agentplane_claim_seconds_bucket{le=\"0.005\"} ")
                    && !l.ends_with(" 0")
            ),
            "{text}"
        );
        assert!(text.contains("agentplane_claim_seconds_bucket{le=\"+Inf\"}"));
        assert!(!text.contains("quantile="), "no summaries: {text}");
    }
}
