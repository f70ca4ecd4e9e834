//! The HTTP edge: the accept loop and what every request passes before a
//! handler sees it.
//!
//! - [`serve`] accepts under a connection cap (a permit before `accept`, so
//!   a flood waits in the kernel's backlog instead of exhausting file
//!   descriptors) and drives each connection with hyper's HTTP/1 server
//!   under a header-read timeout. In hyper that timer also runs while a
//!   keep-alive connection waits for its next request, so it bounds idle
//!   connections too.
//! - `WriteDeadline` drops a connection whose answer makes no progress
//!   for [`ApiConfig::write_timeout`]: a client that stops reading must not
//!   hold its connection (and the answer buffered for it) forever.
//! - [`head_limits`] answers an oversized head with a JSON 431 (the parser's
//!   own, larger, bound answers a bare 431 before we ever see the request).
//! - [`json_errors`] turns every error answer that is not already JSON
//!   (axum's extractor rejections) into the API's error shape.

use super::{ApiConfig, ApiError, AppState};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{ALLOW, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};

pub use super::limits::MAX_HEADERS;

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets
/// requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cfg = state.config().clone();
    let app = super::app(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .keep_alive(true)
        // Room for a head somewhat over our own limit, so that
        // `head_limits` answers it in JSON; far beyond, the parser refuses.
        .max_buf_size((cfg.max_header_bytes * 4).max(64 << 10))
        .max_headers(MAX_HEADERS * 2);
    let conns = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    // Dropped (closed) when shutdown starts: every connection then finishes
    // its request in flight and closes.
    let (stop_tx, stop_rx) = watch::channel(());
    // Each connection task holds a receiver; `closed()` waits for them all.
    let (done_tx, done_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone());
        let io = WriteDeadline::new(stream, cfg.write_timeout);
        let conn = http.serve_connection(TokioIo::new(io), svc);
        let mut stop = stop_rx.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _done = done;
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    drop(stop_rx);
    drop(stop_tx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// An IO whose writes fail with `TimedOut` once one has made no progress
/// for `timeout` (the peer stopped reading and the socket buffers are
/// full). Reads pass through: their time is bounded by the header timeout
/// and the body rules.
struct WriteDeadline<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// After the inner write answered `Pending`: starts the stall timer, or
    /// fails once it has run out.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading its answer",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A failed `accept`: errors of one connection are skipped; running out of
/// descriptors or memory pauses accepting briefly instead of spinning.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed; pausing");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// 431 in JSON for a head over [`ApiConfig::max_header_bytes`] or
/// [`MAX_HEADERS`] lines.
pub(super) async fn head_limits(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let cfg: &ApiConfig = state.config();
    let headers = req.headers();
    let bytes: usize = req.uri().to_string().len()
        + headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if headers.len() > MAX_HEADERS || bytes > cfg.max_header_bytes {
        return ApiError::HeadersTooLarge(format!(
            "the request head must be at most {} bytes in at most {MAX_HEADERS} header lines",
            cfg.max_header_bytes
        ))
        .into_response();
    }
    next.run(req).await
}

/// Rewrites an error answer that is not JSON (axum's rejections of a path
/// or query it could not decode, …) into `{"error":{"code","message"}}`.
pub(super) async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let allow = resp.headers().get(ALLOW).cloned();
    let (_, body) = resp.into_parts();
    // Rejection bodies are one short sentence; cap what we read anyway.
    let text = axum::body::to_bytes(body, 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = error_json(status, &message);
    if let Some(a) = allow {
        out.headers_mut().insert(ALLOW, a);
    }
    out
}

fn error_json(status: StatusCode, message: &str) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "invalid_request",
        _ => "internal",
    };
    let body = super::error::error_body(code, message, code == "invalid_request");
    let mut r = (status, Body::from(body.to_string())).into_response();
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The layers every route (and the fallbacks) pass.
pub(super) fn layers(router: Router<AppState>, state: AppState) -> Router {
    router
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            head_limits,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(super::error::with_request_id))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_peer_that_stops_reading_times_the_write_out() {
        // A 64-byte pipe whose other end never reads.
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(ours, Duration::from_millis(100));
        let t0 = std::time::Instant::now();
        let e = io.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn a_slow_but_steady_reader_is_served() {
        use tokio::io::AsyncReadExt;
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(ours, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 4096 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                n += theirs.read(&mut buf).await.unwrap();
            }
            n
        });
        io.write_all(&[0u8; 4096]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 4096);
    }
}
