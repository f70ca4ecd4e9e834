//! Heavy context: a tenant's documents (id, text, optional embedding) and tool
//! registry, loaded once per node into one immutable shared structure.
//!
//! - `ContextUpload` is the JSON body of `POST /v1/contexts`.
//! - [`encode`] validates and serializes it into the blob stored in Redis
//!   (content-addressed by sha256).
//! - [`HeavyContext::decode`] verifies a blob and builds the searchable form:
//!   texts in one arena, embeddings in one contiguous matrix of unit vectors
//!   (cosine = dot product), a BM25 inverted index, the tool registry.
//! - The host's cache (`crate::host::ContextCache`) keeps `Arc<HeavyContext>`
//!   by digest under a byte budget (LRU); every instance that mounts a
//!   context reads the same copy, so thousands of instances cost one copy of
//!   the context per node.
//!
//! A context is untrusted input: every limit below says which abuse it stops,
//! and the decoder re-checks all of them on bytes read back from Redis.
//!
//! Layout: `format` (blob layout, validation, parser), `vector` (cosine scan),
//! `bm25` (inverted index), `topk` (bounded selection).

mod bm25;
mod format;
mod topk;
mod vector;

pub use bm25::MAX_QUERY_TERMS;

/// Documents per context: bounds the index and per-document tables a single
/// upload can make every worker node build.
pub const MAX_DOCUMENTS: usize = 1_000_000;
/// Embedding dimension: bounds the cost of one `search` row and of the query
/// a guest passes (4096 covers every common embedding model).
pub const MAX_DIM: usize = 4096;
/// Bytes of a document id: ids are copied into every hit and error message.
pub const MAX_ID_BYTES: usize = 512;
/// Bytes of one document's text: a hit copies its text into the guest, so
/// this bounds what one hit can cost (RAG chunks are far smaller).
pub const MAX_TEXT_BYTES: usize = 1 << 20;
/// Tools per context: `tools()` copies the whole registry into every guest
/// that asks.
pub const MAX_TOOLS: usize = 1024;
/// Bytes of a tool name.
pub const MAX_TOOL_NAME_BYTES: usize = 128;
/// Bytes of a tool description.
pub const MAX_TOOL_DESCRIPTION_BYTES: usize = 16 << 10;
/// Bytes of a tool's schema.
pub const MAX_TOOL_SCHEMA_BYTES: usize = 64 << 10;
/// Bytes of one context's whole tool registry (names, descriptions and
/// schemas): `tools()` copies it into every guest that asks, so this bounds
/// what one call can make the host build (a registry of 1024 maximal tools
/// was ~80 MiB, copied once per mounted name).
pub const MAX_TOOL_REGISTRY_BYTES: usize = 1 << 20;
/// Bytes of an encoded context: bounds the memory and decode time one upload
/// costs each worker node (the decoded form is a small multiple of this), and
/// keeps every offset in the blob and the arena within `u32`.
pub const MAX_BLOB_BYTES: usize = 1 << 30;
/// Results per search: bounds what one host call copies into a guest.
pub const MAX_K: usize = 1000;
/// Bytes of ids and texts one search answers: `k` hits of 1 MiB texts would
/// be a GiB built by the host for one call. Hits past it are left out (the
/// best ones are kept).
pub const MAX_HIT_BYTES: usize = 8 << 20;

use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicBool;

/// One document of an upload (unknown fields refused).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Unique within the context, non-empty.
    pub id: String,
    /// The text returned in hits and indexed for BM25.
    pub text: String,
    /// Optional; either every document has one of the same dimension or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
}

/// One tool of the registry (mirrors the WIT record `tool`; unknown
/// fields refused).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// Unique within the context, non-empty.
    pub name: String,
    /// What the tool does, for the agent.
    pub description: String,
    /// The tool's argument schema (typically JSON Schema), stored as given.
    pub schema: String,
}

/// The body of `POST /v1/contexts` (unknown fields refused).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContextUpload {
    /// The tenant's name for the context (`crate::model::valid_name`).
    pub name: String,
    /// The documents, in the order that breaks ties between equal scores.
    #[serde(default)]
    pub documents: Vec<Document>,
    /// The tool registry.
    #[serde(default)]
    pub tools: Vec<Tool>,
}

/// One search result (mirrors the WIT record `hit`).
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The document's id.
    pub id: String,
    /// Cosine similarity in [-1, 1] for `search`, BM25 score (> 0) for
    /// `search_text`.
    pub score: f32,
    /// The document's text.
    pub text: String,
}

/// A validated, serialized upload.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The blob to store.
    pub bytes: Vec<u8>,
    /// Number of documents.
    pub documents: usize,
    /// Embedding dimension (0 when no document has an embedding).
    pub dim: usize,
}

/// Why an upload or a blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    /// The upload is malformed; the message says what is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A stored blob could not be decoded.
    #[error("corrupt context blob: {0}")]
    Corrupt(String),
}

/// Where one document's id and text lie in the arena: id is
/// `arena[id_start..text_start]`, text is `arena[text_start..text_end]`.
/// `u32` offsets suffice because the blob is at most `MAX_BLOB_BYTES`.
#[derive(Debug, Clone, Copy)]
struct Span {
    id_start: u32,
    text_start: u32,
    text_end: u32,
}

/// The node-wide, read-only form of a context: built once by
/// [`HeavyContext::decode`], then shared by `Arc` and searched through `&self`
/// without locks.
pub struct HeavyContext {
    digest: String,
    /// Every id and text, back to back: one allocation instead of two per
    /// document.
    arena: String,
    spans: Vec<Span>,
    dim: usize,
    /// `documents() * dim` unit-length rows, row-major.
    matrix: Vec<f32>,
    bm25: bm25::Bm25,
    tools: Vec<Tool>,
    size_bytes: usize,
}

impl std::fmt::Debug for HeavyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeavyContext")
            .field("digest", &self.digest)
            .field("documents", &self.spans.len())
            .field("dim", &self.dim)
            .field("tools", &self.tools.len())
            .field("size_bytes", &self.size_bytes)
            .finish()
    }
}

impl HeavyContext {
    /// Verifies that `bytes` hash to `digest` (`sha256:<hex>`), parses and
    /// re-validates them, and builds the searchable form. Hostile bytes give
    /// `ContextError::Corrupt`, never a panic. CPU-heavy for large contexts:
    /// call it off the async runtime (as the host's `ContextCache` does).
    pub fn decode(digest: &str, bytes: &[u8]) -> Result<HeavyContext, ContextError> {
        let actual = format::digest_of(bytes);
        if actual != digest {
            return Err(ContextError::Corrupt(format!(
                "digest mismatch: expected {digest}, the bytes hash to {actual}"
            )));
        }
        let parsed = format::parse(bytes)?;
        let text_bytes: usize = parsed.docs.iter().map(|(i, t)| i.len() + t.len()).sum();
        let mut arena = String::with_capacity(text_bytes);
        let mut spans = Vec::with_capacity(parsed.docs.len());
        for (id, text) in &parsed.docs {
            let id_start = arena.len() as u32;
            arena.push_str(id);
            let text_start = arena.len() as u32;
            arena.push_str(text);
            spans.push(Span {
                id_start,
                text_start,
                text_end: arena.len() as u32,
            });
        }
        let dim = parsed.dim;
        let mut matrix = Vec::with_capacity(parsed.docs.len() * dim);
        if dim > 0 {
            let mut row = vec![0f32; dim];
            for (i, chunk) in parsed.embeddings.chunks_exact(dim * 4).enumerate() {
                for (v, b) in row.iter_mut().zip(chunk.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                vector::normalize_into(&row, &mut matrix).ok_or_else(|| {
                    ContextError::Corrupt(format!(
                        "document {i} has a non-finite or all-zero embedding"
                    ))
                })?;
            }
        }
        let bm25 = bm25::Bm25::build(parsed.docs.iter().map(|(_, text)| *text));
        let tools = parsed.tools;
        let mut ctx = HeavyContext {
            digest: digest.to_owned(),
            arena,
            spans,
            dim,
            matrix,
            bm25,
            tools,
            size_bytes: 0,
        };
        ctx.size_bytes = ctx.measure();
        Ok(ctx)
    }

    /// Heap and inline bytes held, by capacity (what the allocator holds).
    fn measure(&self) -> usize {
        let tools: usize = self
            .tools
            .iter()
            .map(|t| t.name.capacity() + t.description.capacity() + t.schema.capacity())
            .sum();
        std::mem::size_of::<Self>()
            + self.digest.capacity()
            + self.arena.capacity()
            + self.spans.capacity() * std::mem::size_of::<Span>()
            + self.matrix.capacity() * 4
            + self.bm25.size_bytes()
            + self.tools.capacity() * std::mem::size_of::<Tool>()
            + tools
    }

    /// `sha256:<hex>` of the blob this was decoded from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Approximate bytes held in memory (what the cache budget counts).
    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }

    /// Number of documents.
    pub fn documents(&self) -> usize {
        self.spans.len()
    }

    /// Embedding dimension; 0 when the context has no embeddings.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The id and text of document `i` (in upload order).
    pub fn document(&self, i: usize) -> Option<(&str, &str)> {
        let s = self.spans.get(i)?;
        Some((
            &self.arena[s.id_start as usize..s.text_start as usize],
            &self.arena[s.text_start as usize..s.text_end as usize],
        ))
    }

    /// The hits of `ranked`, best first, cut where their ids and texts
    /// would pass [`MAX_HIT_BYTES`].
    fn hits(&self, ranked: Vec<(u32, f32)>) -> Vec<Hit> {
        let mut out = Vec::with_capacity(ranked.len());
        let mut bytes = 0usize;
        for (doc, score) in ranked {
            let Some((id, text)) = self.document(doc as usize) else {
                continue;
            };
            bytes += id.len() + text.len();
            if bytes > MAX_HIT_BYTES {
                break;
            }
            out.push(Hit {
                id: id.to_owned(),
                score,
                text: text.to_owned(),
            });
        }
        out
    }

    /// Top-k by cosine similarity, best first, ties by document order; `k` is
    /// clamped to [`MAX_K`] and to the number of documents. `Err` for a
    /// context without embeddings, a dimension mismatch, or a query with a
    /// non-finite value or zero norm (cosine is undefined for it).
    pub fn search(&self, embedding: &[f32], k: usize) -> Result<Vec<Hit>, String> {
        self.search_until(embedding, k, &AtomicBool::new(false))
    }

    /// [`HeavyContext::search`] that gives up (answering a partial ranking)
    /// once `stop` is set: the host sets it when the job that asked is
    /// dropped, so a long scan does not outlive its job.
    pub fn search_until(
        &self,
        embedding: &[f32],
        k: usize,
        stop: &AtomicBool,
    ) -> Result<Vec<Hit>, String> {
        if self.dim == 0 {
            return Err("this context has no embeddings; use search-text".into());
        }
        if embedding.len() != self.dim {
            return Err(format!(
                "query embedding has dimension {}, this context's is {}",
                embedding.len(),
                self.dim
            ));
        }
        let mut query = Vec::with_capacity(self.dim);
        vector::normalize_into(embedding, &mut query)
            .ok_or("query embedding must be finite and not all zeros")?;
        let k = k.min(MAX_K).min(self.documents());
        Ok(self.hits(vector::top_k(&self.matrix, self.dim, &query, k, stop)))
    }

    /// Top-k by BM25 (k1 = 1.2, b = 0.75), best first, ties by document
    /// order; only documents sharing a term with `query` are returned. `k` is
    /// clamped to [`MAX_K`]; at most [`MAX_QUERY_TERMS`] distinct query terms
    /// are used.
    pub fn search_text(&self, query: &str, k: usize) -> Vec<Hit> {
        self.search_text_until(query, k, &AtomicBool::new(false))
    }

    /// [`HeavyContext::search_text`] that gives up once `stop` is set.
    pub fn search_text_until(&self, query: &str, k: usize, stop: &AtomicBool) -> Vec<Hit> {
        let k = k.min(MAX_K).min(self.documents());
        self.hits(self.bm25.search(query, k, stop))
    }

    /// The tool registry, in upload order.
    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    /// Bytes of the tool registry (names, descriptions, schemas): what
    /// `tools()` copies into a guest.
    pub fn tool_bytes(&self) -> usize {
        format::tool_bytes(&self.tools)
    }
}

/// Validates an upload and serializes it into the stored blob. Errors are
/// `ContextError::Invalid` with a sentence naming the problem (and the
/// document or tool, by position and id/name).
pub fn encode(upload: &ContextUpload) -> Result<Encoded, ContextError> {
    let dim = format::validate(upload)?;
    let bytes = format::serialize(upload, dim);
    Ok(Encoded {
        digest: format::digest_of(&bytes),
        bytes,
        documents: upload.documents.len(),
        dim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, text: &str, embedding: Option<Vec<f32>>) -> Document {
        Document {
            id: id.into(),
            text: text.into(),
            embedding,
        }
    }

    fn upload(documents: Vec<Document>) -> ContextUpload {
        ContextUpload {
            name: "kb".into(),
            documents,
            tools: vec![],
        }
    }

    fn invalid(u: &ContextUpload) -> String {
        match encode(u) {
            Err(ContextError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn encode_names_each_problem() {
        let mut u = upload(vec![]);
        u.name = "bad name!".into();
        assert!(invalid(&u).contains("context name"));

        let m = invalid(&upload(vec![doc("a", "x", None), doc("a", "y", None)]));
        assert!(
            m.contains("document 1") && m.contains("repeats an id"),
            "{m}"
        );

        let m = invalid(&upload(vec![doc("", "x", None)]));
        assert!(m.contains("empty id"), "{m}");

        let m = invalid(&upload(vec![
            doc("a", "x", Some(vec![1.0, 2.0])),
            doc("b", "y", Some(vec![1.0])),
        ]));
        assert!(m.contains("dimension 1, expected 2"), "{m}");

        let m = invalid(&upload(vec![
            doc("a", "x", Some(vec![1.0])),
            doc("b", "y", None),
        ]));
        assert!(m.contains("\"b\"") && m.contains("all or none"), "{m}");

        let m = invalid(&upload(vec![doc("a", "x", Some(vec![f32::NAN]))]));
        assert!(m.contains("non-finite"), "{m}");

        let m = invalid(&upload(vec![doc("a", "x", Some(vec![0.0, 0.0]))]));
        assert!(m.contains("all-zero"), "{m}");

        let m = invalid(&upload(vec![doc("a", "x", Some(vec![1.0; MAX_DIM + 1]))]));
        assert!(m.contains("dimension 4097"), "{m}");

        let m = invalid(&upload(vec![doc(
            "a",
            &"x".repeat(MAX_TEXT_BYTES + 1),
            None,
        )]));
        assert!(m.contains("text of"), "{m}");

        let tool = |name: &str| Tool {
            name: name.into(),
            description: String::new(),
            schema: "{}".into(),
        };
        let mut u = upload(vec![]);
        u.tools = vec![tool("t"), tool("t")];
        assert!(invalid(&u).contains("tool 1 (name \"t\") repeats"));
        u.tools = vec![tool("")];
        assert!(invalid(&u).contains("empty name"));
    }

    #[test]
    fn round_trip_keeps_documents_tools_and_metadata() {
        let mut u = upload(vec![
            doc("a", "first text", Some(vec![3.0, 4.0])),
            doc("b", "", Some(vec![0.0, -1.0])),
        ]);
        u.tools = vec![Tool {
            name: "lookup".into(),
            description: "looks things up".into(),
            schema: r#"{"type":"object"}"#.into(),
        }];
        let enc = encode(&u).unwrap();
        assert_eq!((enc.documents, enc.dim), (2, 2));
        assert!(enc.digest.starts_with("sha256:") && enc.digest.len() == 7 + 64);
        let ctx = HeavyContext::decode(&enc.digest, &enc.bytes).unwrap();
        assert_eq!(ctx.digest(), enc.digest);
        assert_eq!((ctx.documents(), ctx.dim()), (2, 2));
        assert_eq!(ctx.document(0), Some(("a", "first text")));
        assert_eq!(ctx.document(1), Some(("b", "")));
        assert_eq!(ctx.document(2), None);
        assert_eq!(ctx.tools(), &u.tools[..]);
        // Stored normalized: the query equal to doc a scores exactly ~1.
        let hits = ctx.search(&[3.0, 4.0], 1).unwrap();
        assert_eq!(hits[0].id, "a");
        assert!((hits[0].score - 1.0).abs() < 1e-6);
        assert!(ctx.size_bytes() >= enc.bytes.len() / 2);
    }

    #[test]
    fn search_refuses_what_it_cannot_rank() {
        let with = encode(&upload(vec![doc("a", "x", Some(vec![1.0, 0.0]))])).unwrap();
        let ctx = HeavyContext::decode(&with.digest, &with.bytes).unwrap();
        assert!(ctx.search(&[1.0], 1).unwrap_err().contains("dimension 1"));
        assert!(ctx.search(&[0.0, 0.0], 1).is_err());
        assert!(ctx.search(&[f32::INFINITY, 0.0], 1).is_err());
        assert!(ctx.search(&[1.0, 0.0], 0).unwrap().is_empty());

        let without = encode(&upload(vec![doc("a", "x", None)])).unwrap();
        let ctx = HeavyContext::decode(&without.digest, &without.bytes).unwrap();
        assert_eq!(ctx.dim(), 0);
        assert!(ctx.search(&[1.0], 1).unwrap_err().contains("no embeddings"));
    }

    #[test]
    fn k_is_clamped_to_documents_and_max_k() {
        let docs = (0..MAX_K + 5)
            .map(|i| doc(&i.to_string(), "same words", Some(vec![1.0, i as f32])))
            .collect();
        let enc = encode(&upload(docs)).unwrap();
        let ctx = HeavyContext::decode(&enc.digest, &enc.bytes).unwrap();
        assert_eq!(ctx.search(&[1.0, 0.0], usize::MAX).unwrap().len(), MAX_K);
        assert_eq!(ctx.search_text("words", usize::MAX).len(), MAX_K);
        // Equal BM25 scores: document order decides.
        assert_eq!(ctx.search_text("same", 2)[1].id, "1");

        let enc = encode(&upload(vec![doc("a", "w", Some(vec![1.0]))])).unwrap();
        let ctx = HeavyContext::decode(&enc.digest, &enc.bytes).unwrap();
        assert_eq!(ctx.search(&[1.0], 10).unwrap().len(), 1);
    }

    #[test]
    fn a_stopped_search_gives_up() {
        let docs = (0..10_000)
            .map(|i| doc(&i.to_string(), "same words", Some(vec![1.0, i as f32])))
            .collect();
        let enc = encode(&upload(docs)).unwrap();
        let ctx = HeavyContext::decode(&enc.digest, &enc.bytes).unwrap();
        let stop = AtomicBool::new(true);
        assert!(ctx.search_until(&[1.0, 0.0], 10, &stop).unwrap().is_empty());
        assert!(ctx.search_text_until("words", 10, &stop).is_empty());
        assert_eq!(ctx.search(&[1.0, 0.0], 10).unwrap().len(), 10);
        assert_eq!(ctx.search_text("words", 10).len(), 10);
    }

    #[test]
    fn hits_stop_at_the_byte_bound() {
        let text = "w ".repeat(MAX_TEXT_BYTES / 2);
        let docs = (0..10).map(|i| doc(&i.to_string(), &text, None)).collect();
        let enc = encode(&upload(docs)).unwrap();
        let ctx = HeavyContext::decode(&enc.digest, &enc.bytes).unwrap();
        let hits = ctx.search_text("w", usize::MAX);
        assert_eq!(hits.len(), MAX_HIT_BYTES / (MAX_TEXT_BYTES + 1));
    }

    #[test]
    fn decode_checks_the_digest() {
        let enc = encode(&upload(vec![doc("a", "x", None)])).unwrap();
        let other = format!("sha256:{}", "0".repeat(64));
        let err = HeavyContext::decode(&other, &enc.bytes).unwrap_err();
        assert!(matches!(err, ContextError::Corrupt(m) if m.contains("digest mismatch")));
    }

    #[test]
    fn decode_refuses_a_zero_embedding_with_a_valid_digest() {
        let enc = encode(&upload(vec![doc("a", "x", Some(vec![1.0]))])).unwrap();
        let mut bytes = enc.bytes;
        // The single f32 sits just before the (empty) tool section, at the end.
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&0f32.to_le_bytes());
        let digest = format::digest_of(&bytes);
        let err = HeavyContext::decode(&digest, &bytes).unwrap_err();
        assert!(matches!(err, ContextError::Corrupt(m) if m.contains("all-zero")));
    }
}
