//! Fetch: an agent that calls HTTP APIs through `wasi:http/outgoing-handler`,
//! under its tenant's `allowed_outbound_hosts`.
//!
//! Input (JSON): `{"url": "http://host:port/path", "method": "GET",
//! "headers": [["name", "value"]], "secret_headers": [["name", "secret"]],
//! "body": "...", "follow": 0, "first_byte_timeout_ms": 0, "repeat": 1}`;
//! only `url` is required. `secret_headers`: headers whose values are the
//! tenant's secrets of those names, read through `wasi:config/store` (an
//! API key the job's input never carries).
//! `follow`: redirects to follow (each one a new request, checked against
//! the policy like any other). `repeat`: the same request, this many times.
//!
//! Output (JSON): `{"status": 200, "bytes": N, "body": "<first 4 KiB>",
//! "hops": ["url", ...]}`. A failed request is `Err("<url>: <error code>")`,
//! the code as WASI HTTP names it (`HttpRequestDenied`,
//! `DestinationIpProhibited`, `ConnectionReadTimeout`, ...).

wit_bindgen::generate!({
    world: "agentplane:fetch/fetch",
    path: ["../../wit", "wit"],
    generate_all,
});

use ::wasi::http::outgoing_handler;
use ::wasi::http::types::{
    ErrorCode, Fields, IncomingResponse, Method, OutgoingBody, OutgoingRequest, RequestOptions,
    Scheme,
};
use ::wasi::io::streams::StreamError;
use agentplane::agent::log::{Level, write};
use serde_json::{Value, json};

/// Body bytes echoed back in the output.
const SHOWN: usize = 4096;

struct Fetch;

struct Request<'a> {
    method: &'a str,
    url: String,
    headers: Vec<(String, String)>,
    body: &'a str,
    first_byte_ms: u64,
}

struct Response {
    status: u16,
    location: Option<String>,
    bytes: u64,
    shown: Vec<u8>,
}

impl Guest for Fetch {
    fn run(input: String) -> Result<String, String> {
        let v: Value = serde_json::from_str(&input).map_err(|e| format!("input: {e}"))?;
        let url = v["url"].as_str().ok_or("input: no `url`")?.to_string();
        let headers = v["headers"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| Some((h[0].as_str()?.to_string(), h[1].as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let mut headers: Vec<(String, String)> = headers;
        for h in v["secret_headers"].as_array().into_iter().flatten() {
            let (Some(name), Some(secret)) = (h[0].as_str(), h[1].as_str()) else {
                return Err("input: `secret_headers` are [name, secret] pairs".into());
            };
            let value = crate::wasi::config::store::get(secret)
                .map_err(|e| format!("reading secret {secret}: {e:?}"))?
                .ok_or_else(|| format!("no secret named {secret}"))?;
            write(Level::Info, &format!("sending {name}: {value}"));
            headers.push((name.to_string(), value));
        }
        let mut req = Request {
            method: v["method"].as_str().unwrap_or("GET"),
            url,
            headers,
            body: v["body"].as_str().unwrap_or(""),
            first_byte_ms: v["first_byte_timeout_ms"].as_u64().unwrap_or(0),
        };
        let follow = v["follow"].as_u64().unwrap_or(0);
        let repeat = v["repeat"].as_u64().unwrap_or(1).max(1);
        let mut last = None;
        let mut hops = Vec::new();
        for _ in 0..repeat {
            hops.clear();
            let mut left = follow;
            loop {
                hops.push(req.url.clone());
                let r = send(&req).map_err(|e| format!("{}: {e:?}", req.url))?;
                match (&r.location, left) {
                    (Some(to), n) if n > 0 && (300..400).contains(&r.status) => {
                        write(Level::Info, &format!("{} redirects to {to}", req.url));
                        left -= 1;
                        req.url = to.clone();
                    }
                    _ => {
                        last = Some(r);
                        break;
                    }
                }
            }
        }
        let r = last.ok_or("no request was made")?;
        Ok(json!({
            "status": r.status,
            "bytes": r.bytes,
            "body": String::from_utf8_lossy(&r.shown),
            "hops": hops,
        })
        .to_string())
    }
}

/// `scheme://authority/path?query` split into its parts.
fn split(url: &str) -> Result<(Scheme, &str, &str), ErrorCode> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or(ErrorCode::HttpRequestUriInvalid)?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_string()),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((scheme, authority, path))
}

fn send(r: &Request<'_>) -> Result<Response, ErrorCode> {
    let (scheme, authority, path) = split(&r.url)?;
    let headers = Fields::new();
    for (k, v) in &r.headers {
        headers
            .append(k, v.as_bytes())
            .map_err(|e| ErrorCode::InternalError(Some(format!("header {k}: {e:?}"))))?;
    }
    let req = OutgoingRequest::new(headers);
    let method = match r.method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        other => Method::Other(other.to_string()),
    };
    let bad = |what: &str| ErrorCode::InternalError(Some(format!("bad {what}")));
    req.set_method(&method).map_err(|()| bad("method"))?;
    req.set_scheme(Some(&scheme)).map_err(|()| bad("scheme"))?;
    req.set_authority(Some(authority))
        .map_err(|()| bad("authority"))?;
    req.set_path_with_query(Some(path))
        .map_err(|()| bad("path"))?;
    let body = req.body().map_err(|()| bad("body"))?;
    if !r.body.is_empty() {
        let out = body.write().map_err(|()| bad("body stream"))?;
        out.blocking_write_and_flush(r.body.as_bytes())
            .map_err(|e| ErrorCode::InternalError(Some(format!("writing the body: {e:?}"))))?;
        drop(out);
    }
    let options = (r.first_byte_ms > 0).then(|| {
        let o = RequestOptions::new();
        let _ = o.set_first_byte_timeout(Some(r.first_byte_ms * 1_000_000));
        o
    });
    let pending = outgoing_handler::handle(req, options)?;
    OutgoingBody::finish(body, None)?;
    pending.subscribe().block();
    let resp: IncomingResponse = match pending.get() {
        Some(Ok(r)) => r?,
        _ => return Err(ErrorCode::InternalError(Some("no response".into()))),
    };
    read(resp)
}

fn read(resp: IncomingResponse) -> Result<Response, ErrorCode> {
    let status = resp.status();
    let location = resp
        .headers()
        .get("location")
        .first()
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let body = resp
        .consume()
        .map_err(|()| ErrorCode::HttpResponseIncomplete)?;
    let stream = body
        .stream()
        .map_err(|()| ErrorCode::HttpResponseIncomplete)?;
    let (mut bytes, mut shown) = (0u64, Vec::new());
    loop {
        match stream.blocking_read(64 << 10) {
            Ok(chunk) => {
                bytes += chunk.len() as u64;
                let room = SHOWN.saturating_sub(shown.len());
                shown.extend_from_slice(&chunk[..room.min(chunk.len())]);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(::wasi::http::types::http_error_code(&e)
                    .unwrap_or(ErrorCode::InternalError(Some(e.to_debug_string()))));
            }
        }
    }
    Ok(Response {
        status,
        location,
        bytes,
        shown,
    })
}

export!(Fetch);
