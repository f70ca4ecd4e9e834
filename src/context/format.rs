//! The stored blob: validation of an upload, its serialization, and the
//! bounds-checked parser that turns untrusted bytes back into parts.
//!
//! Hand-written rather than `postcard`/`bincode`: the layout is five integers
//! and length-prefixed strings, a serde format would still need every bound
//! below checked by hand, and a fixed layout lets the parser refuse a hostile
//! length before it allocates anything.
//!
//! Layout, version 1 (all integers little-endian `u32`):
//!
//! ```text
//! magic    8 bytes  b"APCTX\0\0\0"
//! version  u32      1
//! n        u32      number of documents
//! dim      u32      embedding dimension, 0 = no embeddings
//! t        u32      number of tools
//! n x { id_len u32, id utf-8, text_len u32, text utf-8 }
//! n*dim    f32      raw embeddings, row-major, document order
//! t x { name_len u32, name, desc_len u32, description, schema_len u32, schema }
//! ```
//!
//! The blob ends exactly after the last tool: trailing bytes are corruption.
//! The context's name is not in the blob: the name → digest mapping belongs
//! to the control plane, and identical content gets one digest and so one
//! cached copy per node however it is named. (Sharing across tenants leaks
//! at most, through load latency, whether the exact same bytes are already
//! cached on a node, which needs the whole content to ask.)

use super::{
    ContextError, ContextUpload, Document, MAX_BLOB_BYTES, MAX_DIM, MAX_DOCUMENTS, MAX_ID_BYTES,
    MAX_TEXT_BYTES, MAX_TOOL_DESCRIPTION_BYTES, MAX_TOOL_NAME_BYTES, MAX_TOOL_REGISTRY_BYTES,
    MAX_TOOL_SCHEMA_BYTES, MAX_TOOLS, Tool,
};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

const MAGIC: &[u8; 8] = b"APCTX\0\0\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 * 4;

/// `sha256:<hex>` of `bytes`.
pub(crate) fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A short, printable form of an untrusted id for error messages: a hostile
/// 512-byte id must not turn every error into a wall of text.
fn show(s: &str) -> String {
    const SHOWN: usize = 48;
    if s.chars().count() <= SHOWN {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(SHOWN).collect();
        format!("{head:?}…")
    }
}

// ---------------------------------------------------------------------------
// Checks shared by `encode` (answered as `Invalid`) and the parser (answered
// as `Corrupt`): a blob that passes the digest check is still re-checked,
// because whatever is in Redis is only as trustworthy as whoever wrote it.

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("has an empty id".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "has an id of {} bytes, more than the {MAX_ID_BYTES} allowed",
            id.len()
        ));
    }
    Ok(())
}

fn check_text(text: &str) -> Result<(), String> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "has a text of {} bytes, more than the {MAX_TEXT_BYTES} allowed",
            text.len()
        ));
    }
    Ok(())
}

/// Finite values with a non-zero norm: NaN or infinity would poison every
/// score they touch, and a zero vector has no direction to compare by cosine.
fn check_embedding(values: &[f32]) -> Result<(), String> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(format!("has a non-finite embedding value at position {i}"));
    }
    if values.iter().all(|v| *v == 0.0) {
        return Err("has an all-zero embedding (cosine is undefined for it)".into());
    }
    Ok(())
}

fn check_tool(tool: &Tool) -> Result<(), String> {
    if tool.name.is_empty() {
        return Err("has an empty name".into());
    }
    if tool.name.len() > MAX_TOOL_NAME_BYTES {
        return Err(format!(
            "has a name of {} bytes, more than the {MAX_TOOL_NAME_BYTES} allowed",
            tool.name.len()
        ));
    }
    if tool.name.chars().any(char::is_control) {
        return Err("has a control character in its name".into());
    }
    if tool.description.len() > MAX_TOOL_DESCRIPTION_BYTES {
        return Err(format!(
            "has a description of {} bytes, more than the {MAX_TOOL_DESCRIPTION_BYTES} allowed",
            tool.description.len()
        ));
    }
    if tool.schema.len() > MAX_TOOL_SCHEMA_BYTES {
        return Err(format!(
            "has a schema of {} bytes, more than the {MAX_TOOL_SCHEMA_BYTES} allowed",
            tool.schema.len()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Encoding.

/// Validates `upload`; on success returns the embedding dimension (0 = none).
///
/// Embeddings are all-or-none: either every document carries one of the same
/// dimension, or none does. A mixed context would make `search` silently
/// blind to some documents, which is worse than refusing the upload.
pub(crate) fn validate(upload: &ContextUpload) -> Result<usize, ContextError> {
    let invalid = |m: String| Err(ContextError::Invalid(m));
    if !crate::model::valid_name(&upload.name) {
        return invalid(format!(
            "context name {} is invalid: use 1 to 128 characters from A-Z a-z 0-9 - _ . /",
            show(&upload.name)
        ));
    }
    if upload.documents.len() > MAX_DOCUMENTS {
        return invalid(format!(
            "the context has {} documents, more than the {MAX_DOCUMENTS} allowed",
            upload.documents.len()
        ));
    }
    if upload.tools.len() > MAX_TOOLS {
        return invalid(format!(
            "the context has {} tools, more than the {MAX_TOOLS} allowed",
            upload.tools.len()
        ));
    }
    let dim = upload
        .documents
        .first()
        .and_then(|d| d.embedding.as_ref())
        .map_or(0, Vec::len);
    if dim > MAX_DIM {
        return invalid(format!(
            "the embeddings have dimension {dim}, more than the {MAX_DIM} allowed"
        ));
    }
    let mut ids = HashSet::with_capacity(upload.documents.len());
    for (i, doc) in upload.documents.iter().enumerate() {
        let name = |problem: String| format!("document {i} (id {}) {problem}", show(&doc.id));
        check_id(&doc.id).map_err(|p| ContextError::Invalid(name(p)))?;
        check_text(&doc.text).map_err(|p| ContextError::Invalid(name(p)))?;
        if !ids.insert(doc.id.as_str()) {
            return invalid(name("repeats an id used by an earlier document".into()));
        }
        match (&doc.embedding, dim) {
            (None, 0) => {}
            (None, _) => {
                return invalid(name(
                    "has no embedding, but the first document has one: embeddings are all or none"
                        .into(),
                ));
            }
            (Some(_), 0) => {
                return invalid(name(
                    "has an embedding, but the first document has none (or an empty one): \
                     embeddings are all or none"
                        .into(),
                ));
            }
            (Some(e), dim) => {
                if e.len() != dim {
                    return invalid(name(format!(
                        "has an embedding of dimension {}, expected {dim} like the first document",
                        e.len()
                    )));
                }
                check_embedding(e).map_err(|p| ContextError::Invalid(name(p)))?;
            }
        }
    }
    let mut names = HashSet::with_capacity(upload.tools.len());
    for (i, tool) in upload.tools.iter().enumerate() {
        let name = |problem: String| format!("tool {i} (name {}) {problem}", show(&tool.name));
        check_tool(tool).map_err(|p| ContextError::Invalid(name(p)))?;
        if !names.insert(tool.name.as_str()) {
            return invalid(name("repeats a name used by an earlier tool".into()));
        }
    }
    let registry = tool_bytes(&upload.tools);
    if registry > MAX_TOOL_REGISTRY_BYTES {
        return invalid(format!(
            "the tools take {registry} bytes (names, descriptions and schemas); at most \
             {MAX_TOOL_REGISTRY_BYTES} are accepted"
        ));
    }
    let size = blob_size(&upload.documents, dim, &upload.tools);
    if size > MAX_BLOB_BYTES as u64 {
        return invalid(format!(
            "the context would take {size} bytes, more than the {MAX_BLOB_BYTES} allowed"
        ));
    }
    Ok(dim)
}

/// Bytes of a tool registry as `tools()` copies it into a guest.
pub(crate) fn tool_bytes(tools: &[Tool]) -> usize {
    tools
        .iter()
        .map(|t| t.name.len() + t.description.len() + t.schema.len())
        .sum()
}

/// Exact encoded size, in u64 so that it cannot overflow before the check.
fn blob_size(docs: &[Document], dim: usize, tools: &[Tool]) -> u64 {
    let strings = |s: &str| 4 + s.len() as u64;
    let docs_bytes: u64 = docs.iter().map(|d| strings(&d.id) + strings(&d.text)).sum();
    let emb_bytes = docs.len() as u64 * dim as u64 * 4;
    let tool_bytes: u64 = tools
        .iter()
        .map(|t| strings(&t.name) + strings(&t.description) + strings(&t.schema))
        .sum();
    HEADER_BYTES as u64 + docs_bytes + emb_bytes + tool_bytes
}

/// Serializes a validated upload. Lengths fit `u32` because `validate`
/// bounded the whole blob by `MAX_BLOB_BYTES` (< 4 GiB).
pub(crate) fn serialize(upload: &ContextUpload, dim: usize) -> Vec<u8> {
    let size = blob_size(&upload.documents, dim, &upload.tools) as usize;
    let mut out = Vec::with_capacity(size);
    let put_u32 = |out: &mut Vec<u8>, v: usize| out.extend_from_slice(&(v as u32).to_le_bytes());
    let put_str = |out: &mut Vec<u8>, s: &str| {
        put_u32(out, s.len());
        out.extend_from_slice(s.as_bytes());
    };
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, VERSION as usize);
    put_u32(&mut out, upload.documents.len());
    put_u32(&mut out, dim);
    put_u32(&mut out, upload.tools.len());
    for doc in &upload.documents {
        put_str(&mut out, &doc.id);
        put_str(&mut out, &doc.text);
    }
    for doc in &upload.documents {
        for v in doc.embedding.iter().flatten() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    for tool in &upload.tools {
        put_str(&mut out, &tool.name);
        put_str(&mut out, &tool.description);
        put_str(&mut out, &tool.schema);
    }
    debug_assert_eq!(out.len(), size);
    out
}

// ---------------------------------------------------------------------------
// Parsing.

/// A cursor that never reads past the end: every length in a blob is
/// untrusted, so every read is checked against what is actually there.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], ContextError> {
        if len > self.remaining() {
            return Err(ContextError::Corrupt(format!(
                "{what} needs {len} bytes at offset {}, only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let out = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<usize, ContextError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn str(&mut self, what: &str) -> Result<&'a str, ContextError> {
        let len = self.u32(what)?;
        let b = self.take(len, what)?;
        std::str::from_utf8(b).map_err(|_| ContextError::Corrupt(format!("{what} is not UTF-8")))
    }
}

/// A parsed blob, borrowing its strings from the input.
pub(crate) struct Parsed<'a> {
    /// (id, text) per document.
    pub docs: Vec<(&'a str, &'a str)>,
    pub dim: usize,
    /// `docs.len() * dim` little-endian f32 bytes, not yet checked: the
    /// decoder checks each row (finite, non-zero norm) as it normalizes it,
    /// which saves a second pass over the largest part of the blob.
    pub embeddings: &'a [u8],
    pub tools: Vec<Tool>,
}

/// Parses and re-validates a blob. Never panics and never allocates more
/// than a small multiple of `bytes.len()`: each count is checked against the
/// bytes that remain before anything is sized by it.
pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, ContextError> {
    let corrupt = |m: String| ContextError::Corrupt(m);
    if bytes.len() > MAX_BLOB_BYTES {
        return Err(corrupt(format!(
            "blob of {} bytes is larger than the {MAX_BLOB_BYTES} allowed",
            bytes.len()
        )));
    }
    let mut r = Reader { bytes, pos: 0 };
    if r.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(corrupt("not a context blob (bad magic)".into()));
    }
    let version = r.u32("version")?;
    if version != VERSION as usize {
        return Err(corrupt(format!("unsupported blob version {version}")));
    }
    let n = r.u32("document count")?;
    let dim = r.u32("dimension")?;
    let t = r.u32("tool count")?;
    if n > MAX_DOCUMENTS || dim > MAX_DIM || t > MAX_TOOLS {
        return Err(corrupt(format!(
            "counts out of bounds: {n} documents, dimension {dim}, {t} tools"
        )));
    }
    // Each document takes at least its two length prefixes, each tool three:
    // refuse counts the bytes cannot hold before reserving room for them.
    if n * 8 + t * 12 > r.remaining() {
        return Err(corrupt(format!(
            "{n} documents and {t} tools cannot fit in {} bytes",
            r.remaining()
        )));
    }
    let mut docs = Vec::with_capacity(n);
    let mut ids = HashSet::with_capacity(n);
    for i in 0..n {
        let id = r.str("document id")?;
        let text = r.str("document text")?;
        check_id(id)
            .and_then(|()| check_text(text))
            .map_err(|p| corrupt(format!("document {i} {p}")))?;
        if !ids.insert(id) {
            return Err(corrupt(format!("document {i} repeats id {}", show(id))));
        }
        docs.push((id, text));
    }
    drop(ids);
    let emb_len = n * dim * 4; // ≤ 1e6 * 4096 * 4: no overflow on 64-bit
    let embeddings = r.take(emb_len, "embeddings")?;
    let mut tools = Vec::with_capacity(t);
    let mut names = HashSet::with_capacity(t);
    for i in 0..t {
        let tool = Tool {
            name: r.str("tool name")?.to_owned(),
            description: r.str("tool description")?.to_owned(),
            schema: r.str("tool schema")?.to_owned(),
        };
        check_tool(&tool).map_err(|p| corrupt(format!("tool {i} {p}")))?;
        if !names.insert(tool.name.clone()) {
            return Err(corrupt(format!(
                "tool {i} repeats name {}",
                show(&tool.name)
            )));
        }
        tools.push(tool);
    }
    if tool_bytes(&tools) > MAX_TOOL_REGISTRY_BYTES {
        return Err(corrupt("the tool registry is larger than allowed".into()));
    }
    if r.remaining() != 0 {
        return Err(corrupt(format!(
            "{} trailing bytes after the last tool",
            r.remaining()
        )));
    }
    Ok(Parsed {
        docs,
        dim,
        embeddings,
        tools,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload() -> ContextUpload {
        ContextUpload {
            name: "kb".into(),
            documents: vec![
                Document {
                    id: "a".into(),
                    text: "alpha".into(),
                    embedding: Some(vec![1.0, 0.0]),
                },
                Document {
                    id: "b".into(),
                    text: "beta".into(),
                    embedding: Some(vec![0.0, 2.0]),
                },
            ],
            tools: vec![Tool {
                name: "t".into(),
                description: "d".into(),
                schema: "{}".into(),
            }],
        }
    }

    #[test]
    fn serialized_size_is_exact_and_parses_back() {
        let u = upload();
        let dim = validate(&u).unwrap();
        let blob = serialize(&u, dim);
        assert_eq!(blob.len() as u64, blob_size(&u.documents, dim, &u.tools));
        let p = parse(&blob).unwrap();
        assert_eq!(p.docs, vec![("a", "alpha"), ("b", "beta")]);
        assert_eq!(p.dim, 2);
        assert_eq!(p.embeddings.len(), 16);
        assert_eq!(p.tools, u.tools);
    }

    #[test]
    fn trailing_bytes_and_bad_version_are_corrupt() {
        let u = upload();
        let mut blob = serialize(&u, validate(&u).unwrap());
        blob.push(0);
        assert!(matches!(parse(&blob), Err(ContextError::Corrupt(m)) if m.contains("trailing")));
        blob.pop();
        blob[8] = 2;
        assert!(matches!(parse(&blob), Err(ContextError::Corrupt(m)) if m.contains("version")));
    }

    #[test]
    fn huge_counts_are_refused_before_allocation() {
        let mut blob = MAGIC.to_vec();
        for v in [VERSION, MAX_DOCUMENTS as u32, 0, 0] {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        let err = parse(&blob).err().unwrap();
        assert!(matches!(err, ContextError::Corrupt(m) if m.contains("cannot fit")));
    }

    #[test]
    fn long_ids_are_shortened_in_messages() {
        let long = "x".repeat(500);
        let shown = show(&long);
        assert!(shown.len() < 60, "{shown}");
    }
}
