//! A model served by an OpenAI-compatible server on the node (vLLM,
//! llama.cpp's server, TGI, ...): `--model NAME=http://127.0.0.1:8000/v1`.
//! The server batches and schedules its own requests; this side bounds
//! what each tenant may have in flight there, counts the tokens the server
//! reports, and never waits past the job's deadline.
//!
//! Prompts are counted before they are sent, with the server's
//! `/tokenize` (vLLM, llama.cpp); a server without it is assumed to make
//! at most one token of each byte (plus a few special tokens), so the
//! job's allowance is checked against an upper bound.

use super::{Generated, Prompt};
use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Semaphore;

/// Requests in flight to one server from this node.
pub(crate) const MAX_IN_FLIGHT: usize = 16;

/// Of which one tenant may hold at most this many: the rest stay free for
/// the others.
pub(crate) const MAX_IN_FLIGHT_PER_TENANT: usize = MAX_IN_FLIGHT / 4;

/// Largest answer read from the server.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Special tokens a prompt may gain over its bytes, for the upper bound.
const SPECIAL_TOKENS: u64 = 16;

pub(crate) struct Remote {
    /// `.../v1`, without a trailing slash.
    base: String,
    /// Where `/tokenize` is: the server's root.
    root: String,
    /// The model's name at the server.
    name: String,
    client: reqwest::Client,
    in_flight: Arc<Semaphore>,
    tenants: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

impl Remote {
    pub(crate) fn new(name: &str, url: &str) -> anyhow::Result<Remote> {
        let base = url.trim_end_matches('/').to_string();
        let root = base.strip_suffix("/v1").unwrap_or(&base).to_string();
        // `https://` servers: rustls on the ring provider, as every client
        // of this crate.
        crate::client::tls_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("building the model server's client")?;
        Ok(Remote {
            base,
            root,
            name: name.to_string(),
            client,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tenants: Mutex::new(HashMap::new()),
        })
    }

    /// Tokens of `prompt` as the server counts them, or the upper bound.
    pub(crate) async fn count(&self, prompt: &Prompt, deadline: Instant) -> u64 {
        let text = prompt.render();
        let url = format!("{}/tokenize", self.root);
        let asked = self.post(
            &url,
            json!({"model": self.name, "prompt": text, "content": text}),
            deadline,
        );
        match asked.await {
            Ok(v) => v["count"]
                .as_u64()
                .or_else(|| v["tokens"].as_array().map(|t| t.len() as u64)),
            Err(_) => None,
        }
        .unwrap_or_else(|| upper_bound(&text))
    }

    pub(crate) async fn complete(
        &self,
        tenant: Arc<str>,
        prompt: &Prompt,
        max_new: u64,
        temperature: f32,
        deadline: Instant,
    ) -> anyhow::Result<(Generated, u64)> {
        let _permits = self.admit(tenant).await?;
        let temperature = if temperature.is_finite() && temperature > 0.0 {
            f64::from(temperature)
        } else {
            0.0
        };
        let (path, body) = match prompt {
            Prompt::Text(t) => (
                "completions",
                json!({"model": self.name, "prompt": t, "max_tokens": max_new,
                       "temperature": temperature}),
            ),
            Prompt::Chat(ms) => (
                "chat/completions",
                json!({"model": self.name, "max_tokens": max_new, "temperature": temperature,
                       "messages": ms.iter().map(|(role, content)|
                           json!({"role": role, "content": content})).collect::<Vec<_>>()}),
            ),
        };
        let v = self
            .post(&format!("{}/{path}", self.base), body, deadline)
            .await?;
        let choice = &v["choices"][0];
        let text = choice["text"]
            .as_str()
            .or_else(|| choice["message"]["content"].as_str())
            .context("the model server answered no text")?
            .to_string();
        let (tokens_in, tokens_out) = usage(&v)?;
        Ok((
            Generated {
                text,
                tokens_out,
                stopped: choice["finish_reason"] == "stop",
            },
            tokens_in,
        ))
    }

    pub(crate) async fn embed(
        &self,
        tenant: Arc<str>,
        texts: &[String],
        deadline: Instant,
    ) -> anyhow::Result<(Vec<Vec<f32>>, u64)> {
        let _permits = self.admit(tenant).await?;
        let v = self
            .post(
                &format!("{}/embeddings", self.base),
                json!({"model": self.name, "input": texts}),
                deadline,
            )
            .await?;
        let mut data: Vec<(u64, Vec<f32>)> = v["data"]
            .as_array()
            .context("the model server answered no embeddings")?
            .iter()
            .map(|d| {
                let e = d["embedding"]
                    .as_array()
                    .context("an embedding is not a list")?
                    .iter()
                    .map(|x| x.as_f64().map(|x| x as f32).context("not a number"))
                    .collect::<anyhow::Result<Vec<f32>>>()?;
                Ok((d["index"].as_u64().unwrap_or(0), e))
            })
            .collect::<anyhow::Result<_>>()?;
        if data.len() != texts.len() {
            bail!(
                "the model server answered {} embeddings for {} texts",
                data.len(),
                texts.len()
            );
        }
        data.sort_by_key(|(i, _)| *i);
        let tokens_in = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        Ok((data.into_iter().map(|(_, e)| e).collect(), tokens_in))
    }

    /// Waits for one of the tenant's places and one of the server's.
    async fn admit(
        &self,
        tenant: Arc<str>,
    ) -> anyhow::Result<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let mine = {
            let mut map = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
            // Only semaphores nobody holds or waits on may go.
            if map.len() > 1024 {
                map.retain(|_, s| Arc::strong_count(s) > 1);
            }
            map.entry(tenant)
                .or_insert_with(|| Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_TENANT)))
                .clone()
        };
        let mine = mine.acquire_owned().await?;
        let server = self.in_flight.clone().acquire_owned().await?;
        Ok((mine, server))
    }

    /// POSTs `body` and reads a JSON answer of at most
    /// [`MAX_ANSWER_BYTES`], giving up at `deadline`.
    async fn post(&self, url: &str, body: Value, deadline: Instant) -> anyhow::Result<Value> {
        let call = async {
            let mut resp = self.client.post(url).json(&body).send().await?;
            let status = resp.status();
            let mut bytes = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                    bail!("the model server's answer is over {MAX_ANSWER_BYTES} bytes");
                }
                bytes.extend_from_slice(&chunk);
            }
            if !status.is_success() {
                bail!(
                    "the model server answered {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
                );
            }
            Ok(serde_json::from_slice(&bytes)?)
        };
        tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), call)
            .await
            .map_err(|_| anyhow::anyhow!("the model server did not answer before the deadline"))?
    }
}

/// The most tokens a tokenizer may make of `text`: one per byte, and a few
/// special ones.
pub(crate) fn upper_bound(text: &str) -> u64 {
    text.len() as u64 + SPECIAL_TOKENS
}

/// `usage.prompt_tokens` and `usage.completion_tokens` of an answer.
fn usage(v: &Value) -> anyhow::Result<(u64, u64)> {
    let u = &v["usage"];
    match (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()) {
        (Some(i), Some(o)) => Ok((i, o)),
        _ => bail!("the model server's answer has no token usage"),
    }
}
