//! Request bodies: how they are read (bounded in size and in time), what
//! content types each route takes, how JSON is parsed into typed requests,
//! and the upload slots that bound buffered uploads.
//!
//! Unknown fields are refused with 400 `invalid_request` naming the field:
//! a misspelt limit must not be silently ignored.

use super::{ApiConfig, ApiError, ApiResult};
use axum::body::{Body, Bytes};
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Reads a request body of at most `limit` bytes; 413 beyond, without
/// buffering more than `limit` (+ one chunk).
///
/// Time is bounded two ways (408 beyond either): no pause between chunks
/// longer than [`ApiConfig::body_idle_timeout`], and the body must always
/// be ahead of `body_grace + received / body_min_rate`, so a client that
/// trickles a byte at a time cannot hold a buffer (and an upload slot) for
/// long, however regularly it sends.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    cfg: &ApiConfig,
    what: &str,
) -> ApiResult<Bytes> {
    let too_large =
        || ApiError::PayloadTooLarge(format!("{what} is larger than the limit of {limit} bytes"));
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    // Pre-allocate only a little: a declared length costs the client nothing
    // to send, so it must not make us reserve hundreds of MiB up front.
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(limit).min(1 << 20));
    let mut stream = body.into_data_stream();
    let start = Instant::now();
    loop {
        let now = Instant::now();
        let wait = match cfg.body_min_rate {
            0 => cfg.body_idle_timeout,
            rate => {
                let behind = start
                    + cfg.body_grace
                    + Duration::from_secs_f64(buf.len() as f64 / rate as f64);
                cfg.body_idle_timeout
                    .min(behind.saturating_duration_since(now))
            }
        };
        if wait.is_zero() {
            return Err(ApiError::RequestTimeout);
        }
        let Some(chunk) = tokio::time::timeout(wait, stream.next())
            .await
            .map_err(|_| ApiError::RequestTimeout)?
        else {
            break;
        };
        let chunk =
            chunk.map_err(|e| ApiError::Invalid(format!("could not read the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// The media type of a request, lowercased, without parameters; `None`
/// when the header is absent.
fn media_type(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get(CONTENT_TYPE) else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::UnsupportedMediaType("`Content-Type` is not valid ASCII".into()))?;
    Ok(Some(
        s.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    ))
}

/// JSON routes take `application/json` (or any `+json` type), or no
/// `Content-Type` at all; anything else is 415.
pub(crate) fn expect_json(headers: &HeaderMap) -> ApiResult<()> {
    match media_type(headers)? {
        None => Ok(()),
        Some(t) if t == "application/json" || t.ends_with("+json") => Ok(()),
        Some(t) => Err(ApiError::UnsupportedMediaType(format!(
            "this route takes `application/json`, not `{t}`"
        ))),
    }
}

/// Component uploads take `application/wasm`, `application/octet-stream`
/// or no `Content-Type`; anything else is 415.
pub(crate) fn expect_wasm(headers: &HeaderMap) -> ApiResult<()> {
    match media_type(headers)? {
        None => Ok(()),
        Some(t) if t == "application/wasm" || t == "application/octet-stream" => Ok(()),
        Some(t) => Err(ApiError::UnsupportedMediaType(format!(
            "a component is uploaded as `application/wasm` (raw bytes), not `{t}`"
        ))),
    }
}

/// Parses a JSON body straight into `T` (no intermediate `Value`: a large
/// body costs its typed size, not several times it), naming the field at
/// fault: `invalid <what>: `limits.fuel`: …`.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> ApiResult<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let invalid = |m: String| ApiError::Invalid(format!("invalid {what}: {m}"));
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            invalid(e.into_inner().to_string())
        } else {
            invalid(format!("`{path}`: {}", e.into_inner()))
        }
    })?;
    de.end().map_err(|e| invalid(e.to_string()))?;
    Ok(value)
}

/// Serializes an answer; a value that cannot serialize is our bug, not the
/// caller's, so it is a 500 without details.
/// Reads a settings route's small JSON body (tenants, credits, secrets;
/// at most `MAX_ADMIN_BODY`, bounded in time) straight into `T`, whose type
/// refuses unknown fields; errors name the field.
pub(crate) async fn small_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    cfg: &ApiConfig,
    what: &str,
) -> ApiResult<T> {
    expect_json(headers)?;
    let bytes = read_body(headers, body, super::limits::MAX_ADMIN_BODY, cfg, what).await?;
    parse_json(&bytes, what)
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> ApiResult<axum::Json<serde_json::Value>> {
    serde_json::to_value(v)
        .map(axum::Json)
        .map_err(|_| ApiError::Internal)
}

/// Per-tenant counts of something held at once (upload slots, long-polls),
/// each tenant bounded by the same share.
pub(crate) struct Shares {
    per_tenant: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

/// One unit of a tenant's share, given back on drop (also when the request
/// holding it is dropped mid-way).
pub(crate) struct Share {
    tenant: String,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

impl Shares {
    pub(crate) fn new(per_tenant: usize) -> Shares {
        Shares {
            per_tenant: per_tenant.max(1),
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// One more unit for `tenant`, or `None` when it holds its share.
    pub(crate) fn try_take(&self, tenant: &str) -> Option<Share> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(tenant.to_string()).or_insert(0);
        if *n >= self.per_tenant {
            return None;
        }
        *n += 1;
        Some(Share {
            tenant: tenant.to_string(),
            held: self.held.clone(),
        })
    }
}

/// Upload slots: at most [`ApiConfig::max_concurrent_uploads`] uploads are
/// buffered and processed at once, and one tenant holds at most
/// [`ApiConfig::uploads_per_tenant`] of them. A tenant over its share is
/// answered 429 at once rather than queued, so it cannot park connections
/// either; a tenant within its share waits for a global slot, which others
/// give back within their (rate-bounded) body time.
pub(crate) struct UploadSlots {
    global: Arc<Semaphore>,
    shares: Shares,
}

/// One held upload slot; given back on drop.
pub(crate) struct UploadSlot {
    _share: Share,
    _global: OwnedSemaphorePermit,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        metrics::gauge!("agentplane_uploads_in_progress").decrement(1.0);
    }
}

impl UploadSlots {
    pub(crate) fn new(cfg: &ApiConfig) -> UploadSlots {
        UploadSlots {
            global: Arc::new(Semaphore::new(cfg.max_concurrent_uploads.max(1))),
            shares: Shares::new(cfg.uploads_per_tenant),
        }
    }

    /// A slot for one upload of `tenant`: 429 when the tenant already holds
    /// its share, otherwise waits for a global slot.
    pub(crate) async fn acquire(&self, tenant: &str) -> ApiResult<UploadSlot> {
        let share = self
            .shares
            .try_take(tenant)
            .ok_or(ApiError::TooManyUploads(self.shares.per_tenant))?;
        let global = self
            .global
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::Internal)?;
        metrics::gauge!("agentplane_uploads_in_progress").increment(1.0);
        Ok(UploadSlot {
            _share: share,
            _global: global,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(idle: Duration) -> ApiConfig {
        ApiConfig {
            body_idle_timeout: idle,
            ..ApiConfig::default()
        }
    }

    #[tokio::test]
    async fn a_stalled_body_times_out() {
        let stalled =
            futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{")) })
                .chain(futures::stream::pending());
        let e = read_body(
            &HeaderMap::new(),
            Body::from_stream(stalled),
            10,
            &cfg(Duration::from_millis(50)),
            "body",
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ApiError::RequestTimeout));
        assert_eq!(e.parts().1, "request_timeout");
    }

    #[tokio::test]
    async fn a_trickle_falls_behind_the_minimum_rate() {
        // One byte every 20 ms never trips a 1 s idle timeout, but is far
        // below 1 KiB/s once the 100 ms grace is over.
        let trickle = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), ()))
        });
        let c = ApiConfig {
            body_idle_timeout: Duration::from_secs(1),
            body_grace: Duration::from_millis(100),
            body_min_rate: 1024,
            ..ApiConfig::default()
        };
        let t0 = Instant::now();
        let e = read_body(
            &HeaderMap::new(),
            Body::from_stream(trickle),
            1 << 20,
            &c,
            "body",
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ApiError::RequestTimeout));
        assert!(
            t0.elapsed() < Duration::from_millis(900),
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn body_limits_refuse_before_reading() {
        let c = cfg(Duration::from_secs(1));
        let mut h = HeaderMap::new();
        h.insert(CONTENT_LENGTH, "11".parse().unwrap());
        let e = read_body(&h, Body::from("hello world"), 10, &c, "body")
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::PayloadTooLarge(_)));
        // Undeclared length: cut while streaming.
        let e = read_body(&HeaderMap::new(), Body::from("hello world"), 10, &c, "body")
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::PayloadTooLarge(_)));
        let ok = read_body(&HeaderMap::new(), Body::from("hello"), 10, &c, "body")
            .await
            .unwrap();
        assert_eq!(&ok[..], b"hello");
    }

    #[test]
    fn parse_errors_name_the_field() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            fuel: u64,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            limits: Inner,
        }
        let e = parse_json::<Outer>(br#"{"limits":{"fuel":"x"}}"#, "body").unwrap_err();
        assert!(e.to_string().contains("`limits.fuel`"), "{e}");
        let e = parse_json::<Outer>(br#"{"limits":{"fule":1}}"#, "body").unwrap_err();
        assert!(e.to_string().contains("`fule`"), "{e}");
        let e = parse_json::<Outer>(br#"{"limits":{"fuel":1}} x"#, "body").unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
    }

    #[tokio::test]
    async fn a_tenant_holds_at_most_its_share_of_upload_slots() {
        let slots = UploadSlots::new(&ApiConfig {
            max_concurrent_uploads: 3,
            uploads_per_tenant: 2,
            ..ApiConfig::default()
        });
        let a1 = slots.acquire("a").await.unwrap();
        let _a2 = slots.acquire("a").await.unwrap();
        assert!(matches!(
            slots.acquire("a").await,
            Err(ApiError::TooManyUploads(2))
        ));
        let _b = slots.acquire("b").await.unwrap();
        drop(a1);
        let _a3 = slots.acquire("a").await.unwrap();
    }
}
