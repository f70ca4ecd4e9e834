//! `GET /ui`: the dashboard, one static page embedded in the binary (no
//! build step, no files to deploy). It holds no data and is served to
//! anyone: what it shows comes from the API with the token typed into it.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("ui.html");

#[utoipa::path(get, path = "/ui", tag = "ops", responses((status = 200, description = "the dashboard (HTML, for anyone; it reads the API with the token entered in it)", content_type = "text/html", body = String)))]
pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page talks only to this origin and runs only its own
            // inline script: nothing else may load into it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
