//! Attacks on the HTTP edge: see `hostile.rs`.
//!
//! Everything here goes over real sockets to a real server: half-sent
//! requests, connection floods, slow-loris uploads, numbers past what Redis
//! and Lua hold exactly, a world-readable data dir, and a table of bad
//! requests each answered with its status and JSON error code while nothing
//! is written.

use crate::common::guests::guest_bytes;
use crate::common::stack::*;
use agentplane::api::ApiConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SEC: Duration = Duration::from_secs(1);
/// 2^53: the first integer a double (Lua's number) cannot tell from its
/// neighbour.
const TWO_53: u64 = 1 << 53;

fn edge_opts(api: ApiConfig) -> Opts {
    Opts {
        worker_slots: None,
        api,
        ..Opts::default()
    }
}

fn addr(s: &Stack) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// Reads until the peer closes the connection or `within` passes; answers
/// what came and whether it closed.
async fn read_until_closed(sock: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (buf, false);
        }
        match tokio::time::timeout(left, sock.read(&mut chunk)).await {
            Err(_) => return (buf, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (buf, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Status code of a raw HTTP/1.1 answer (0 if none).
fn status_of(answer: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The JSON body of a raw HTTP/1.1 answer (`Null` if none or not JSON).
fn body_of(answer: &[u8]) -> Value {
    let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Value::Null;
    };
    serde_json::from_slice(&answer[at + 4..]).unwrap_or(Value::Null)
}

/// Sends `head` then `body` on a fresh connection (write errors ignored:
/// the server may answer and close before it has read everything) and
/// answers the raw response.
async fn raw_exchange(addr: &str, head: &[u8], body: &[u8], within: Duration) -> Vec<u8> {
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let _ = sock.write_all(head).await;
    for chunk in body.chunks(64 << 10) {
        if sock.write_all(chunk).await.is_err() {
            break;
        }
    }
    read_until_closed(&mut sock, within).await.0
}

// ---- 7.6: header timeout, idle keep-alive, connection cap ----

#[tokio::test]
async fn half_sent_requests_and_idle_connections_are_closed() {
    let s = Stack::start(edge_opts(ApiConfig {
        header_timeout: SEC,
        ..ApiConfig::default()
    }))
    .await;
    let a = addr(&s);
    let mut socks = Vec::new();
    // The review's attack: 300 half-sent requests.
    for _ in 0..300 {
        let mut c = TcpStream::connect(&a).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        socks.push(c);
    }
    // A keep-alive connection that asks once, then says nothing.
    let mut idle = TcpStream::connect(&a).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    for (i, c) in socks.iter_mut().enumerate() {
        let left = Duration::from_secs(6).saturating_sub(t0.elapsed());
        let (_, closed) = read_until_closed(c, left).await;
        assert!(
            closed,
            "half-sent request {i} was still open {:?} after it stopped sending",
            t0.elapsed()
        );
    }
    eprintln!(
        "{} half-sent requests closed in {:?}",
        socks.len(),
        t0.elapsed()
    );
    let (answer, closed) = read_until_closed(&mut idle, Duration::from_secs(6)).await;
    assert_eq!(status_of(&answer), 200);
    assert!(closed, "an idle keep-alive connection was never closed");
    // The server is still up and answers at once.
    let (st, _) = s.call(reqwest::Method::GET, "/healthz", None, None).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_instead_of_exhausting_descriptors() {
    let s = Stack::start(edge_opts(ApiConfig {
        header_timeout: 2 * SEC,
        max_connections: 4,
        ..ApiConfig::default()
    }))
    .await;
    let a = addr(&s);
    // Four keep-alive connections, each served once (so accepted: no
    // sleep needed to know it) and then idle, holding the cap of four
    // until the idle timeout.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&a).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert_eq!(status_of(&buf[..n]), 200);
        held.push(c);
    }
    let t0 = Instant::now();
    let answer = raw_exchange(
        &a,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
        Duration::from_secs(10),
    )
    .await;
    let waited = t0.elapsed();
    assert_eq!(
        status_of(&answer),
        200,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        waited >= Duration::from_millis(1000),
        "a fifth connection was served after {waited:?} while four held a cap of four"
    );
    assert!(waited < Duration::from_secs(6), "{waited:?}");
    drop(held);
    s.stop().await;
}

// ---- 7.6: /metrics needs the admin token ----

#[tokio::test]
async fn metrics_need_the_admin_token() {
    let s = Stack::start(edge_opts(ApiConfig::default())).await;
    let token = s.tenant("acme").await;
    let (st, v) = s.call(reqwest::Method::GET, "/metrics", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(error_code(&v), "unauthorized");
    let (st, v) = s.get("/metrics", &token).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(error_code(&v), "forbidden");
    let (st, _) = s.get("/metrics", ADMIN).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}

// ---- 7.6: slow-loris uploads ----

/// Sends `head` (a request declaring a body) and then one byte of body,
/// `byte`, every `every`; answers the status the server finally gives and
/// when. A slow-loris client of either route.
async fn trickle_body(
    addr: String,
    head: String,
    byte: &'static [u8],
    every: Duration,
) -> (u16, Duration) {
    let t0 = Instant::now();
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut tick = tokio::time::interval(every);
    while t0.elapsed() < Duration::from_secs(60) {
        tokio::select! {
            r = c.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            },
            _ = tick.tick() => {
                let _ = c.write_all(byte).await;
            }
        }
    }
    (status_of(&buf), t0.elapsed())
}

/// A component upload declaring `len` bytes, sent a byte every `every`.
async fn trickle(addr: String, token: String, len: usize, every: Duration) -> (u16, Duration) {
    let head = format!(
        "POST /v1/components HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    trickle_body(addr, head, b"\0", every).await
}

#[tokio::test]
async fn slow_uploads_of_one_tenant_do_not_starve_another() {
    let s = Stack::start(edge_opts(ApiConfig {
        max_concurrent_uploads: 4,
        uploads_per_tenant: 2,
        body_grace: 2 * SEC,
        body_min_rate: 1024,
        // The per-chunk idle timeout alone never fires on a byte every 200 ms.
        body_idle_timeout: Duration::from_secs(30),
        ..ApiConfig::default()
    }))
    .await;
    let evil = s.tenant("evil").await;
    let victim = s.tenant("victim").await;
    let attack: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(trickle(
                addr(&s),
                evil.clone(),
                1 << 20,
                Duration::from_millis(200),
            ))
        })
        .collect();
    // Wait until the attacker holds upload slots.
    let t0 = Instant::now();
    loop {
        let (_, m) = s.get("/metrics", ADMIN).await;
        let busy = m
            .as_str()
            .unwrap_or("")
            .lines()
            .find(|l| l.starts_with("agentplane_uploads_in_progress "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if busy >= 2.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "attack never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t1 = Instant::now();
    let pushed = tokio::time::timeout(Duration::from_secs(10), s.push(&victim, "echo")).await;
    assert!(
        pushed.is_ok(),
        "the victim's upload waited over 10 s behind another tenant's slow uploads"
    );
    let victim_took = t1.elapsed();
    let mut statuses = Vec::new();
    for h in attack {
        let (st, took) = h.await.unwrap();
        assert!(
            took < Duration::from_secs(15),
            "a slow upload was held {took:?}"
        );
        statuses.push(st);
    }
    statuses.sort();
    assert!(
        statuses.iter().all(|s| *s == 408 || *s == 429),
        "slow uploads answered {statuses:?}"
    );
    assert!(
        statuses.iter().filter(|s| **s == 408).count() >= 2,
        "{statuses:?}"
    );
    assert!(victim_took < Duration::from_secs(5), "{victim_took:?}");
    eprintln!("victim upload took {victim_took:?}; slow uploads answered {statuses:?}");
    s.stop().await;
}

// ---- 7.7: numbers ----

#[tokio::test]
async fn numbers_past_2_pow_53_are_refused_naming_the_field() {
    let s = Stack::start(edge_opts(ApiConfig::default())).await;
    let token = s.tenant("acme").await;
    let digest = s.push(&token, "echo").await;
    let before = s.tenant_info("acme").await;
    let cases: Vec<(&str, reqwest::Method, String, &str, Value)> = vec![
        (
            "limits.fuel",
            reqwest::Method::POST,
            "/v1/tenants".into(),
            ADMIN,
            json!({"id": "big", "limits": {"fuel": 1u64 << 63}}),
        ),
        (
            "limits.memory_bytes",
            reqwest::Method::POST,
            "/v1/tenants".into(),
            ADMIN,
            json!({"id": "big", "limits": {"memory_bytes": u64::MAX}}),
        ),
        (
            "credits",
            reqwest::Method::POST,
            "/v1/tenants".into(),
            ADMIN,
            json!({"id": "big", "credits": TWO_53}),
        ),
        (
            "limits.timeout_ms",
            reqwest::Method::PATCH,
            "/v1/tenants/acme".into(),
            ADMIN,
            json!({"limits": {"timeout_ms": TWO_53}}),
        ),
        (
            "amount",
            reqwest::Method::POST,
            "/v1/tenants/acme/credits".into(),
            ADMIN,
            json!({"amount": TWO_53}),
        ),
        (
            "amount",
            reqwest::Method::POST,
            "/v1/tenants/acme/credits".into(),
            ADMIN,
            json!({"amount": -(TWO_53 as i64)}),
        ),
        (
            "amount",
            reqwest::Method::POST,
            "/v1/tenants/acme/credits".into(),
            ADMIN,
            json!({"amount": 1e20}),
        ),
        (
            "fuel",
            reqwest::Method::POST,
            "/v1/jobs".into(),
            &token,
            json!({"component": digest, "input": "", "fuel": TWO_53}),
        ),
        (
            "delay_ms",
            reqwest::Method::POST,
            "/v1/jobs".into(),
            &token,
            json!({"component": digest, "input": "", "delay_ms": u64::MAX}),
        ),
    ];
    for (field, method, path, who, body) in cases {
        let (st, v) = s
            .call(method.clone(), &path, Some(who), Some(body.clone()))
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{method} {path} {body}: {v}");
        assert_eq!(error_code(&v), "invalid_request", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(&format!("`{field}`")), "{body}: {msg}");
    }
    // Nothing was written.
    assert_eq!(s.tenant_info("acme").await, before);
    let (st, _) = s.get("/v1/tenants/big", ADMIN).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The largest accepted values round-trip exactly, as integers.
    let max = (TWO_53 - 1) as i64;
    s.tenant_with("edge", json!({"credits": 0, "limits": {"fuel": max}}))
        .await;
    let (st, v) = s
        .post("/v1/tenants/edge/credits", ADMIN, json!({"amount": max}))
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["balance"].as_i64(), Some(max), "{v}");
    let t = s.tenant_info("edge").await;
    assert_eq!(t["limits"]["fuel"].as_i64(), Some(max), "{t}");
    assert_eq!(t["credits"]["balance"].as_i64(), Some(max), "{t}");
    s.stop().await;
}

// ---- 7.8: files ----

#[test]
fn serve_makes_its_data_dir_private_even_when_it_exists() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--slots", "1", "--data"])
        .arg(&data)
        .env_remove("AGENTPLANE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn agentplane serve");
    let stdout = child.stdout.take().unwrap();
    let guard = KillOnDrop(vec![child]);
    let mut base = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            base = Some(rest.trim().to_string());
            break;
        }
    }
    let base = base.expect("serve printed no address");
    // Ready: Redis is up and its AOF exists.
    let t0 = Instant::now();
    loop {
        if blocking_get(base.trim_start_matches("http://"), "/readyz") == 200 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "serve never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data dir mode {:o}", mode(&data));
    let mut stack = vec![data.clone()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = mode(&p);
            assert_eq!(m & 0o077, 0, "{} has mode {m:o}", p.display());
            seen += 1;
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    assert!(data.join("appendonlydir").exists());
    assert!(seen >= 3, "only {seen} entries in the data dir");
    // SIGTERM: serve stops its Redis (flushing the AOF) before the temp
    // dir goes.
    let mut guard = guard;
    let child = &mut guard.0[0];
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` over a plain blocking socket; answers the status (0 when
/// nothing answered).
fn blocking_get(addr: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if c.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    status_of(&buf)
}

// ---- bad input over HTTP, one labelled case per class ----

/// Who signs a case's request.
#[derive(Clone, Copy)]
enum Who {
    Nobody,
    Admin,
    Tenant,
    /// This exact `Authorization` header value (bytes, may be non-UTF-8).
    Raw(&'static [u8]),
}

struct Case {
    label: &'static str,
    method: &'static str,
    path: String,
    who: Who,
    /// Extra header lines, raw (`Name: value`, may hold any bytes).
    headers: Vec<Vec<u8>>,
    body: Vec<u8>,
    /// Send the body chunked (no `Content-Length`).
    chunked: bool,
    /// Send only the first `n` bytes of the body, then stall.
    stall_after: Option<usize>,
    status: u16,
    code: &'static str,
    /// Text the error message must contain (usually the field's name).
    names: Option<&'static str>,
}

fn case(label: &'static str, method: &'static str, path: &str, who: Who) -> Case {
    Case {
        label,
        method,
        path: path.to_string(),
        who,
        headers: Vec::new(),
        body: Vec::new(),
        chunked: false,
        stall_after: None,
        status: 400,
        code: "invalid_request",
        names: None,
    }
}

impl Case {
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
    fn json(self, v: Value) -> Self {
        self.header("Content-Type: application/json")
            .body(serde_json::to_vec(&v).unwrap())
    }
    fn header(mut self, h: impl Into<Vec<u8>>) -> Self {
        self.headers.push(h.into());
        self
    }
    fn expect(mut self, status: u16, code: &'static str) -> Self {
        self.status = status;
        self.code = code;
        self
    }
    fn names(mut self, what: &'static str) -> Self {
        self.names = Some(what);
        self
    }
    fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
    fn stall_after(mut self, n: usize) -> Self {
        self.stall_after = Some(n);
        self
    }

    fn head(&self, admin: &str, tenant: &str) -> Vec<u8> {
        let mut h = format!(
            "{} {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
            self.method, self.path
        )
        .into_bytes();
        let auth: Option<Vec<u8>> = match self.who {
            Who::Nobody => None,
            Who::Admin => Some(format!("Bearer {admin}").into_bytes()),
            Who::Tenant => Some(format!("Bearer {tenant}").into_bytes()),
            Who::Raw(v) => Some(v.to_vec()),
        };
        if let Some(a) = auth {
            h.extend_from_slice(b"Authorization: ");
            h.extend_from_slice(&a);
            h.extend_from_slice(b"\r\n");
        }
        for x in &self.headers {
            h.extend_from_slice(x);
            h.extend_from_slice(b"\r\n");
        }
        let declares_length = self
            .headers
            .iter()
            .any(|x| x.to_ascii_lowercase().starts_with(b"content-length"));
        if self.chunked {
            h.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        } else if !declares_length {
            h.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        h
    }

    fn wire_body(&self) -> Vec<u8> {
        if !self.chunked {
            return self.body.clone();
        }
        let mut out = Vec::new();
        for c in self.body.chunks(256 << 10) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }
}

/// Every Redis key and its type+length: what "nothing written" compares.
async fn snapshot(url: &str) -> Vec<(String, String)> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        out.push((k, hex::encode(dump.unwrap_or_default())));
    }
    out
}

fn wat_bytes(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap()
}

#[tokio::test]
async fn bad_input_is_refused_with_a_json_error_and_writes_nothing() {
    const COMPONENT_LIMIT: usize = 8 << 20;
    const CONTEXT_LIMIT: usize = 1 << 20;
    let s = Stack::start(edge_opts(ApiConfig {
        max_component_bytes: COMPONENT_LIMIT,
        max_context_bytes: CONTEXT_LIMIT,
        max_input_bytes: 1024,
        body_idle_timeout: SEC,
        body_grace: SEC,
        body_min_rate: 1024,
        ..ApiConfig::default()
    }))
    .await;
    let token = s.tenant("acme").await;
    let digest = s.push(&token, "echo").await;
    let echo = guest_bytes("echo");
    let unknown = format!("sha256:{}", "ab".repeat(32));
    let job = |extra: Value| {
        let mut b = json!({"component": digest, "input": "hi"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let long_token = format!("Bearer acme.{}", "a".repeat(10 << 10))
        .into_bytes()
        .leak();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_job = format!(r#"{{"component":"{digest}","input":"hi","agent_id":{deep}}}"#);
    let mut bad_utf8 = format!(r#"{{"component":"{digest}","input":"hi"#).into_bytes();
    bad_utf8.extend_from_slice(b"\xff\xfe\"}");

    use Who::*;
    let cases = vec![
        // -- components --
        case("component: empty body", "POST", "/v1/components", Tenant)
            .expect(400, "invalid_component"),
        case("component: not wasm", "POST", "/v1/components", Tenant)
            .body(&b"not wasm at all"[..])
            .expect(400, "invalid_component"),
        case("component: truncated", "POST", "/v1/components", Tenant)
            .body(&echo[..echo.len() / 2])
            .expect(400, "invalid_component"),
        case("component: wasm magic, unknown version", "POST", "/v1/components", Tenant)
            .body(&b"\0asm\x0d\0\x01\0"[..])
            .expect(400, "invalid_component"),
        case("component: a core module", "POST", "/v1/components", Tenant)
            .body(wat_bytes(r#"(module (func (export "run")))"#))
            .expect(400, "invalid_component"),
        case("component: foreign import", "POST", "/v1/components", Tenant)
            .body(wat_bytes(
                r#"(component (import "evil:host/net@1.0.0" (instance (export "f" (func)))))"#,
            ))
            .expect(400, "invalid_component")
            .names("evil:host/net"),
        case("component: no `run` export", "POST", "/v1/components", Tenant)
            .body(wat_bytes("(component)"))
            .expect(400, "invalid_component"),
        case("component: declared length over the limit", "POST", "/v1/components", Tenant)
            .header(format!("Content-Length: {}", COMPONENT_LIMIT + 1))
            .expect(413, "payload_too_large"),
        case("component: chunked past the limit", "POST", "/v1/components", Tenant)
            .body(vec![0u8; COMPONENT_LIMIT + (1 << 20)])
            .chunked()
            .expect(413, "payload_too_large"),
        case("component: JSON content type", "POST", "/v1/components", Tenant)
            .header("Content-Type: application/json")
            .body(echo.clone())
            .expect(415, "unsupported_media_type"),
        // -- job requests --
        case("job: not JSON", "POST", "/v1/jobs", Tenant).body(&b"{not json"[..]),
        case("job: truncated JSON", "POST", "/v1/jobs", Tenant)
            .body(&br#"{"component":"sha256:"#[..]),
        case("job: a JSON array", "POST", "/v1/jobs", Tenant).body(&b"[]"[..]),
        case("job: empty body", "POST", "/v1/jobs", Tenant),
        case("job: input is a number", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"input": 5})))
            .names("`input`"),
        case("job: gpus is a string", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"gpus": "1"})))
            .names("`gpus`"),
        case("job: negative delay", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"delay_ms": -1})))
            .names("`delay_ms`"),
        case("job: fractional max_attempts", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"max_attempts": 1.5})))
            .names("`max_attempts`"),
        case("job: fuel of 2^53", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"fuel": TWO_53})))
            .names("`fuel`"),
        case("job: number 1e400", "POST", "/v1/jobs", Tenant).body(format!(
            r#"{{"component":"{digest}","input":"hi","timeout_ms":1e400}}"#
        )),
        case("job: unknown field", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"gpu": 1})))
            .names("`gpu`"),
        case("job: missing component", "POST", "/v1/jobs", Tenant)
            .json(json!({"input": "hi"}))
            .names("`component`"),
        case("job: duplicate key", "POST", "/v1/jobs", Tenant).body(format!(
            r#"{{"component":"{digest}","input":"a","input":"b"}}"#
        ))
        .names("`input`"),
        case("job: nested 10,000 deep", "POST", "/v1/jobs", Tenant).body(deep_job),
        case("job: invalid UTF-8", "POST", "/v1/jobs", Tenant).body(bad_utf8),
        case("job: malformed digest", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"component": "sha256:XYZ"})))
            .names("`component`"),
        case("job: unknown component", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"component": unknown})))
            .expect(404, "not_found"),
        case("job: input over the limit", "POST", "/v1/jobs", Tenant)
            .json(job(json!({"input": "x".repeat(2000)})))
            .expect(413, "payload_too_large"),
        case("job: body over the limit", "POST", "/v1/jobs", Tenant)
            .header("Content-Length: 1000000000")
            .expect(413, "payload_too_large"),
        case("job: Idempotency-Key of 300 bytes", "POST", "/v1/jobs", Tenant)
            .header(format!("Idempotency-Key: {}", "k".repeat(300)))
            .json(job(json!({})))
            .names("Idempotency-Key"),
        case("job: Idempotency-Key not ASCII", "POST", "/v1/jobs", Tenant)
            .header(&b"Idempotency-Key: k\xc3\xa9y"[..])
            .json(job(json!({})))
            .names("Idempotency-Key"),
        case("job: text/plain body", "POST", "/v1/jobs", Tenant)
            .header("Content-Type: text/plain")
            .body(serde_json::to_vec(&job(json!({}))).unwrap())
            .expect(415, "unsupported_media_type"),
        case("job: form-encoded body", "POST", "/v1/jobs", Tenant)
            .header("Content-Type: application/x-www-form-urlencoded")
            .body(serde_json::to_vec(&job(json!({}))).unwrap())
            .expect(415, "unsupported_media_type"),
        case("job: slow body", "POST", "/v1/jobs", Tenant)
            .json(job(json!({})))
            .stall_after(5)
            .expect(408, "request_timeout"),
        // -- routes, methods, paths, queries --
        case("method: DELETE /v1/jobs", "DELETE", "/v1/jobs", Tenant)
            .expect(405, "method_not_allowed"),
        case("method: PUT /v1/components", "PUT", "/v1/components", Tenant)
            .expect(405, "method_not_allowed"),
        case("route: unknown", "GET", "/v2/anything", Tenant).expect(404, "not_found"),
        case("path: not UTF-8", "GET", "/v1/jobs/%FF%FE", Tenant),
        case("query: not UTF-8", "GET", "/v1/jobs?state=%FF", Tenant),
        case("query: unknown parameter", "GET", "/v1/jobs?colour=red", Tenant).names("colour"),
        case("query: limit 0", "GET", "/v1/jobs?limit=0", Tenant).names("`limit`"),
        case("query: negative wait", "GET", "/v1/jobs/x?wait=-1", Tenant).names("`wait`"),
        // -- tokens --
        case("auth: no token", "GET", "/v1/jobs", Nobody).expect(401, "unauthorized"),
        case("auth: Basic scheme", "GET", "/v1/jobs", Raw(b"Basic YWNtZTp4"))
            .expect(401, "unauthorized"),
        case("auth: Bearer without a token", "GET", "/v1/jobs", Raw(b"Bearer"))
            .expect(401, "unauthorized"),
        case("auth: token without a tenant", "GET", "/v1/jobs", Raw(b"Bearer abcdef"))
            .expect(401, "unauthorized"),
        case("auth: unknown tenant", "GET", "/v1/jobs", Raw(b"Bearer ghost.abcdef"))
            .expect(401, "unauthorized"),
        case("auth: token not UTF-8", "GET", "/v1/jobs", Raw(b"Bearer acme.\xff\xfe"))
            .expect(401, "unauthorized"),
        case("auth: 10 KiB token", "GET", "/v1/jobs", Raw(long_token))
            .expect(401, "unauthorized"),
        case("auth: admin token on a tenant route", "GET", "/v1/jobs", Admin)
            .expect(403, "forbidden"),
        case("auth: tenant token on an admin route", "POST", "/v1/tenants", Tenant)
            .json(json!({"id": "x"}))
            .expect(403, "forbidden"),
        // -- headers --
        case("headers: one of 20 KiB", "GET", "/v1/jobs", Tenant)
            .header(format!("X-Pad: {}", "p".repeat(20 << 10)))
            .expect(431, "headers_too_large"),
        {
            let mut c = case("headers: 150 of them", "GET", "/v1/jobs", Tenant)
                .expect(431, "headers_too_large");
            for i in 0..150 {
                c = c.header(format!("X-H{i}: v"));
            }
            c
        },
        // -- tenants (admin) --
        case("tenant: weight 0", "POST", "/v1/tenants", Admin)
            .json(json!({"id": "t2", "weight": 0}))
            .names("`weight`"),
        case("tenant: weight is a string", "POST", "/v1/tenants", Admin)
            .json(json!({"id": "t2", "weight": "2"}))
            .names("`weight`"),
        case("tenant: credits of 2^53", "POST", "/v1/tenants", Admin)
            .json(json!({"id": "t2", "credits": TWO_53}))
            .names("`credits`"),
        case("tenant: misspelt limit", "POST", "/v1/tenants", Admin)
            .json(json!({"id": "t2", "limits": {"fule": 1}}))
            .names("`fule`"),
        case("tenant: invalid id", "POST", "/v1/tenants", Admin)
            .json(json!({"id": "Bad Id!"}))
            .names("`id`"),
        case("tenant: already exists", "POST", "/v1/tenants", Admin)
            .json(json!({"id": "acme"}))
            .expect(409, "tenant_exists"),
        case("patch: unknown field", "PATCH", "/v1/tenants/acme", Admin)
            .json(json!({"wieght": 2}))
            .names("`wieght`"),
        case("patch: unknown tenant", "PATCH", "/v1/tenants/ghost", Admin)
            .json(json!({"weight": 2}))
            .expect(404, "not_found"),
        case("credits: fractional amount", "POST", "/v1/tenants/acme/credits", Admin)
            .json(json!({"amount": 1.5}))
            .names("`amount`"),
        case("credits: no amount", "POST", "/v1/tenants/acme/credits", Admin)
            .json(json!({}))
            .names("`amount`"),
        case("credits: amount of 2^53", "POST", "/v1/tenants/acme/credits", Admin)
            .json(json!({"amount": TWO_53}))
            .names("`amount`"),
        // -- contexts --
        case("context: not JSON", "POST", "/v1/contexts", Tenant).body(&b"{\"name\":"[..]),
        case("context: unknown document field", "POST", "/v1/contexts", Tenant)
            .json(json!({"name": "kb", "documents": [{"id": "a", "text": "x", "vector": [1.0]}]}))
            .names("`vector`"),
        case("context: embedding of strings", "POST", "/v1/contexts", Tenant)
            .json(json!({"name": "kb", "documents": [{"id": "a", "text": "x", "embedding": ["1"]}]}))
            .names("embedding"),
        case("context: invalid name", "POST", "/v1/contexts", Tenant)
            .json(json!({"name": "bad name!", "documents": []}))
            .names("name"),
        case("context: repeated document id", "POST", "/v1/contexts", Tenant)
            .json(json!({"name": "kb", "documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}))
            .names("repeats"),
        case("context: declared length over the limit", "POST", "/v1/contexts", Tenant)
            .header(format!("Content-Length: {}", CONTEXT_LIMIT + 1))
            .expect(413, "payload_too_large"),
        case("context: text/plain body", "POST", "/v1/contexts", Tenant)
            .header("Content-Type: text/plain")
            .body(&br#"{"name":"kb"}"#[..])
            .expect(415, "unsupported_media_type"),
    ];
    assert!(cases.len() >= 40, "{} classes", cases.len());
    let a = addr(&s);
    let mut failures = Vec::new();
    for c in &cases {
        let before = snapshot(&s.url).await;
        let head = c.head(ADMIN, &token);
        let body = c.wire_body();
        let answer = match c.stall_after {
            None => raw_exchange(&a, &head, &body, Duration::from_secs(20)).await,
            Some(n) => {
                let mut sock = TcpStream::connect(&a).await.unwrap();
                sock.write_all(&head).await.unwrap();
                sock.write_all(&body[..n]).await.unwrap();
                read_until_closed(&mut sock, Duration::from_secs(20))
                    .await
                    .0
            }
        };
        let status = status_of(&answer);
        let v = body_of(&answer);
        let code = error_code(&v);
        let msg = v["error"]["message"].as_str().unwrap_or("");
        let mut wrong = Vec::new();
        if status != c.status || code != c.code {
            wrong.push(format!(
                "answered {status} {code:?} (want {} {:?}): {}",
                c.status,
                c.code,
                String::from_utf8_lossy(&answer[..answer.len().min(400)])
            ));
        }
        if let Some(n) = c.names
            && !msg.contains(n)
        {
            wrong.push(format!("message {msg:?} does not name {n}"));
        }
        if snapshot(&s.url).await != before {
            wrong.push("Redis changed".into());
        }
        let (st, _) = s.call(reqwest::Method::GET, "/readyz", None, None).await;
        if st != StatusCode::OK {
            wrong.push(format!("server unhealthy after it: {st}"));
        }
        if !wrong.is_empty() {
            failures.push(format!("[{}] {}", c.label, wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} classes answered wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Still serving real work.
    s.push(&token, "echo").await;
    s.submit(&token, json!({"component": digest, "input": "after"}))
        .await;
    s.stop().await;
}

// ---- long-polls: one tenant cannot hold every connection ----

#[tokio::test]
async fn long_polls_of_one_tenant_cannot_fill_the_connection_cap() {
    let s = Stack::start(edge_opts(ApiConfig {
        max_connections: 6,
        max_waits_per_tenant: 2,
        ..ApiConfig::default()
    }))
    .await;
    let evil = s.tenant("evil").await;
    let victim = s.tenant("victim").await;
    let digest = s.push(&evil, "echo").await;
    // No worker: the job stays queued, so every wait runs its full length.
    let id = s
        .submit(&evil, json!({"component": digest, "input": "x"}))
        .await;
    let a = addr(&s);
    let mut polls = Vec::new();
    for _ in 0..6 {
        let a = a.clone();
        let head = format!(
            "GET /v1/jobs/{id}?wait=30 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {evil}\r\n\
             Connection: close\r\n\r\n"
        );
        polls.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let answer = raw_exchange(&a, head.as_bytes(), b"", Duration::from_secs(40)).await;
            (status_of(&answer), t0.elapsed())
        }));
    }
    // The polls beyond the tenant's share come back at once, with the job;
    // the two within it keep waiting.
    let t0 = Instant::now();
    loop {
        let done = polls.iter().filter(|p| p.is_finished()).count();
        if done >= 4 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{done} of 6 long-polls answered in 10 s; all others held connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut waiting = Vec::new();
    for p in polls {
        if p.is_finished() {
            let (st, took) = p.await.unwrap();
            assert_eq!(st, 200);
            assert!(took < Duration::from_secs(5), "{took:?}");
        } else {
            waiting.push(p);
        }
    }
    assert_eq!(waiting.len(), 2);
    // The victim is served promptly while two of the attacker's polls wait.
    let t0 = Instant::now();
    let (st, _) = tokio::time::timeout(Duration::from_secs(10), s.get("/v1/jobs", &victim))
        .await
        .expect("the victim waited behind another tenant's long-polls");
    assert_eq!(st, StatusCode::OK);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    for p in waiting {
        p.abort();
    }
    s.stop().await;
}

// ---- job bodies: one tenant cannot buffer without bound ----

/// A job submission declaring `len` bytes, sent a byte every `every`.
async fn trickle_job(addr: String, token: String, len: usize, every: Duration) -> (u16, Duration) {
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    trickle_body(addr, head, b" ", every).await
}

#[tokio::test]
async fn one_tenant_sends_a_bounded_number_of_job_bodies_at_once() {
    let s = Stack::start(edge_opts(ApiConfig {
        max_bodies_per_tenant: 3,
        body_grace: 3 * SEC,
        body_min_rate: 1024,
        ..ApiConfig::default()
    }))
    .await;
    let evil = s.tenant("evil").await;
    let victim = s.tenant("victim").await;
    let digest = s.push(&victim, "echo").await;
    let attack: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(trickle_job(
                addr(&s),
                evil.clone(),
                1 << 20,
                Duration::from_millis(200),
            ))
        })
        .collect();
    // Those beyond the share are refused at once, not buffered.
    let t0 = Instant::now();
    loop {
        let done = attack.iter().filter(|h| h.is_finished()).count();
        if done >= 5 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{done} of 8 trickled job bodies refused in 2 s; the tenant's share is 3"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The victim submits as usual meanwhile.
    s.submit(&victim, json!({"component": digest, "input": "hi"}))
        .await;
    let mut statuses = Vec::new();
    for h in attack {
        statuses.push(h.await.unwrap().0);
    }
    statuses.sort();
    assert_eq!(statuses, vec![408, 408, 408, 429, 429, 429, 429, 429]);
    s.stop().await;
}
