//! Heavy context: a tenant's documents (id, text, optional embedding) and tool
//! registry, loaded once per node into one immutable shared structure.
//!
//! INTERFACE (fixed; the implementation is being written):
//! - `ContextUpload` is the JSON body of `POST /v1/contexts`.
//! - `encode(&ContextUpload) -> Result<Encoded, ContextError>` validates and
//!   serializes it into the blob stored in Redis (content-addressed by sha256).
//! - `HeavyContext::decode(digest, &[u8])` builds the searchable structure.
//! - `ContextCache` keeps `Arc<HeavyContext>` by digest under a byte budget (LRU).

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One document of an upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Document {
    pub id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
}

/// One tool of the registry (mirrors the WIT record `tool`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub schema: String,
}

/// The body of `POST /v1/contexts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContextUpload {
    pub name: String,
    #[serde(default)]
    pub documents: Vec<Document>,
    #[serde(default)]
    pub tools: Vec<Tool>,
}

/// One search result (mirrors the WIT record `hit`).
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub score: f32,
    pub text: String,
}

/// A validated, serialized upload.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    pub bytes: Vec<u8>,
    pub documents: usize,
    /// Embedding dimension (0 when no document has an embedding).
    pub dim: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    /// The upload is malformed; the message says what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A stored blob could not be decoded.
    #[error("corrupt context blob: {0}")]
    Corrupt(String),
}

/// The node-wide, read-only form of a context.
pub struct HeavyContext {
    _private: (),
}

impl HeavyContext {
    pub fn decode(_digest: &str, _bytes: &[u8]) -> Result<HeavyContext, ContextError> {
        Err(ContextError::Corrupt("not implemented yet".into()))
    }
    pub fn digest(&self) -> &str {
        ""
    }
    /// Approximate bytes held in memory (what the cache budget counts).
    pub fn size_bytes(&self) -> usize {
        0
    }
    pub fn documents(&self) -> usize {
        0
    }
    pub fn dim(&self) -> usize {
        0
    }
    /// Top-k by cosine similarity. `Err` for a dimension mismatch.
    pub fn search(&self, _embedding: &[f32], _k: usize) -> Result<Vec<Hit>, String> {
        Err("not implemented".into())
    }
    /// Top-k by BM25.
    pub fn search_text(&self, _query: &str, _k: usize) -> Vec<Hit> {
        Vec::new()
    }
    pub fn tools(&self) -> &[Tool] {
        &[]
    }
}

pub fn encode(_upload: &ContextUpload) -> Result<Encoded, ContextError> {
    Err(ContextError::Invalid("not implemented".into()))
}

/// LRU of decoded contexts by digest, bounded by the sum of `size_bytes`.
pub struct ContextCache {
    _private: (),
}

impl ContextCache {
    pub fn new(_budget_bytes: usize) -> Self {
        ContextCache { _private: () }
    }
    /// The cached context, or `load()`ed, decoded and inserted. Concurrent
    /// callers for one digest load it once.
    pub async fn get_or_load<F, Fut>(
        &self,
        _digest: &str,
        _load: F,
    ) -> anyhow::Result<Arc<HeavyContext>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<u8>>>,
    {
        anyhow::bail!("not implemented")
    }
}
