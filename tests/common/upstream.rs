//! A real HTTP server on the loopback range for agents to call: what their
//! `wasi:http` requests reach, and how many of them did.
//!
//! Routes: `/hello` (a short text naming the request's `x-key` header),
//! `/redirect?to=<url>` (302), `/slow?ms=<n>` (the head after n ms),
//! `/huge?mib=<n>` (n MiB of body, streamed), `/stall` (the head at once,
//! then a body that never comes).

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Upstream {
    /// `127.0.0.1:<port>`.
    pub addr: std::net::SocketAddr,
    hits: Arc<AtomicU64>,
    keys: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

type Q = Query<HashMap<String, String>>;

impl Upstream {
    pub async fn start() -> Upstream {
        let hits = Arc::new(AtomicU64::new(0));
        let keys: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = keys.clone();
        let app = Router::new()
            .route(
                "/hello",
                get(move |h: HeaderMap| {
                    let seen = seen.clone();
                    async move { hello(h, &seen) }
                }),
            )
            .route("/redirect", get(redirect))
            .route("/slow", get(slow))
            .route("/huge", get(huge))
            .route("/stall", get(stall))
            .layer(axum::middleware::from_fn_with_state(hits.clone(), count))
            .with_state(());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Upstream {
            addr,
            hits,
            keys,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The `x-key` headers `/hello` was sent, in order.
    pub fn keys(&self) -> Vec<String> {
        self.keys.lock().unwrap().clone()
    }

    /// Requests that reached this server.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Acquire)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn count(
    State(hits): State<Arc<AtomicU64>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    hits.fetch_add(1, Ordering::AcqRel);
    next.run(req).await
}

fn hello(headers: HeaderMap, seen: &Mutex<Vec<String>>) -> String {
    let key = headers
        .get("x-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    seen.lock().unwrap().push(key.clone());
    format!("hello from upstream; x-key={key}")
}

async fn redirect(Query(q): Q) -> Response {
    let to = q.get("to").cloned().unwrap_or_default();
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

async fn slow(Query(q): Q) -> String {
    let ms = q.get("ms").and_then(|m| m.parse().ok()).unwrap_or(10_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    "late".into()
}

async fn huge(Query(q): Q) -> Response {
    let mib: usize = q.get("mib").and_then(|m| m.parse().ok()).unwrap_or(64);
    let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let stream =
        futures::stream::iter((0..mib).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    Body::from_stream(stream).into_response()
}

async fn stall() -> Response {
    let stream = futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
    Body::from_stream(stream).into_response()
}
