//! An OpenAI-compatible model server on the loopback range, as a node would
//! run vLLM or llama.cpp's server beside its worker: `/tokenize`,
//! `/v1/completions`, `/v1/chat/completions` and `/v1/embeddings` over a
//! real model (the crate's own loading code, a model directory written by
//! the test), answering with the token usage the model counted. It counts
//! the requests it served and can be told to answer with a body of
//! `huge_mib` MiB instead.

use agentplane::inference::{ModelSpec, Models, Prompt};
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct ModelServer {
    /// `http://127.0.0.1:<port>/v1`.
    pub url: String,
    state: Arc<Served>,
    task: tokio::task::JoinHandle<()>,
}

struct Served {
    models: Models,
    requests: AtomicU64,
    huge_mib: AtomicU64,
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
}

/// Counts a completion in flight while it lives.
struct InFlight<'a>(&'a Served);

impl<'a> InFlight<'a> {
    fn new(s: &'a Served) -> Self {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.most_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type S = State<Arc<Served>>;

impl ModelServer {
    /// Serves the model directory `dir` under the name `name`.
    pub async fn start(name: &str, dir: &std::path::Path) -> ModelServer {
        let models = Models::load(&[ModelSpec::dir(name, dir)]).expect("the model loads");
        let state = Arc::new(Served {
            models,
            requests: AtomicU64::new(0),
            huge_mib: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/tokenize", post(tokenize))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ModelServer { url, state, task }
    }

    /// Completions and embeddings served (not `/tokenize`).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The most completions it had in flight at once since the last call
    /// (which starts the count again).
    pub fn take_most_in_flight(&self) -> u64 {
        self.state.most_in_flight.swap(0, Ordering::SeqCst)
    }

    /// From now on, answer completions with `mib` MiB of text.
    pub fn answer_huge(&self, mib: u64) {
        self.state.huge_mib.store(mib, Ordering::SeqCst);
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn prompt(body: &Value) -> Prompt {
    match body["messages"].as_array() {
        Some(ms) => Prompt::Chat(
            ms.iter()
                .map(|m| {
                    let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                    (s("role"), s("content"))
                })
                .collect(),
        ),
        None => Prompt::Text(
            body["prompt"]
                .as_str()
                .or(body["content"].as_str())
                .unwrap_or_default()
                .to_string(),
        ),
    }
}

fn model<'a>(s: &'a Served, body: &Value) -> &'a Arc<agentplane::inference::Model> {
    s.models
        .iter()
        .next()
        .filter(|m| m.info().name == body["model"])
        .expect("the served model")
}

async fn tokenize(State(s): S, axum::Json(body): axum::Json<Value>) -> axum::Json<Value> {
    let p = model(&s, &body)
        .prepare(prompt(&body), deadline())
        .await
        .unwrap();
    axum::Json(json!({"count": p.tokens_in}))
}

async fn completions(State(s): S, axum::Json(body): axum::Json<Value>) -> axum::Json<Value> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let _counted = InFlight::new(&s);
    let huge = s.huge_mib.load(Ordering::SeqCst);
    if huge > 0 {
        let text = "x".repeat((huge << 20) as usize);
        return axum::Json(
            json!({"choices": [{"text": text, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        );
    }
    let m = model(&s, &body);
    let chat = body["messages"].is_array();
    let p = m.prepare(prompt(&body), deadline()).await.unwrap();
    let max = body["max_tokens"].as_u64().unwrap_or(16);
    let temperature = body["temperature"].as_f64().unwrap_or(0.0) as f32;
    let (g, read) = m
        .complete("server".into(), 1, p, max, temperature, deadline())
        .await
        .unwrap();
    let finish = if g.stopped { "stop" } else { "length" };
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": g.text},
               "finish_reason": finish})
    } else {
        json!({"index": 0, "text": g.text, "finish_reason": finish})
    };
    axum::Json(json!({"choices": [choice],
        "usage": {"prompt_tokens": read, "completion_tokens": g.tokens_out,
                  "total_tokens": read + g.tokens_out}}))
}

async fn embeddings(State(s): S, axum::Json(body): axum::Json<Value>) -> axum::Json<Value> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let m = model(&s, &body);
    let texts: Vec<String> = body["input"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap_or_default().to_string())
        .collect();
    let p = m.prepare_texts(texts).await.unwrap();
    let (vectors, read) = m.embed("server".into(), 1, p, deadline()).await.unwrap();
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, e)| json!({"index": i, "embedding": e}))
        .collect();
    axum::Json(json!({"data": data, "usage": {"prompt_tokens": read, "total_tokens": read}}))
}
