//! The process stack the service-level tests drive: API + scheduler (+ a
//! worker) over a fresh `redis-server` or Redis Cluster, the real
//! `agentplane` binary as child processes, and the HTTP helpers that talk to
//! them. One copy, shared by `e2e.rs`, `hostile.rs` and the rest.

use super::guests::guest_bytes;
use super::redis::{RedisCluster, RedisServer};
use agentplane::api::JobRequest;
use agentplane::api::{self, ApiConfig, AppState};
use agentplane::client::{ApiClient, NewTenant};
use agentplane::control::{ControlConfig, ControlPlane, EgressBudget, Prices};
use agentplane::host::{Host, HostConfig};
use agentplane::worker::{WorkerConfig, run_worker};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "test-admin-token";

/// The `agentplane` binary under test. `AGENTPLANE_BIN` overrides the one
/// cargo built, for checkouts that share a target dir (where another
/// checkout's build may replace `target/debug/agentplane` mid-run).
/// The secrets key of the stacks' deployments (a worker process is given
/// it as `AGENTPLANE_SECRETS_KEY`).
pub const SECRETS_PASSPHRASE: &str = "the test deployment's secrets passphrase";

pub fn test_secrets_key() -> agentplane::secrets::SecretsKey {
    agentplane::secrets::SecretsKey::from_passphrase(SECRETS_PASSPHRASE).unwrap()
}

pub fn bin() -> std::path::PathBuf {
    std::env::var_os("AGENTPLANE_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_agentplane").into())
}

/// API + scheduler (+ optionally a worker) in this process, over a fresh
/// `redis-server` (or a fresh Redis Cluster).
pub struct Stack {
    pub redis: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
    /// The Redis URL every part uses.
    pub url: String,
    pub dir: std::path::PathBuf,
    pub base: String,
    /// For requests the typed client cannot send: malformed, or checked
    /// for their exact status, headers and error body.
    pub http: reqwest::Client,
    /// The typed client, without a token (see [`Stack::as_caller`]).
    pub api: ApiClient,
    pub lease_ms: u64,
    pub shutdown: CancellationToken,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub struct Opts {
    pub worker_slots: Option<u32>,
    pub lease_ms: u64,
    pub api: ApiConfig,
    /// Run on a Redis Cluster of this many masters, tenants over `shards`.
    pub cluster: Option<(usize, u32)>,
    /// How long finished jobs and ledger entries are kept (default: the
    /// control plane's).
    pub retention_ms: Option<u64>,
    /// Standalone Redis with `appendfsync always` (survives a restart).
    pub durable_redis: bool,
    /// Instance slots of the worker's pool.
    pub max_instances: u32,
    /// Prices of the API, scheduler and in-process worker (a worker
    /// process must be given the same as flags).
    pub prices: Prices,
    /// What one job may spend on outgoing HTTP requests (the same rule).
    pub egress: EgressBudget,
    /// Seals and opens tenants' secrets (API and in-process worker).
    pub secrets_key: Option<agentplane::secrets::SecretsKey>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            worker_slots: Some(2),
            lease_ms: 1500,
            api: ApiConfig::default(),
            cluster: None,
            retention_ms: None,
            durable_redis: false,
            max_instances: 16,
            prices: Prices::default(),
            egress: EgressBudget::default(),
            secrets_key: Some(test_secrets_key()),
        }
    }
}

impl Stack {
    pub async fn start(opts: Opts) -> Stack {
        agentplane::client::tls_provider();
        let (redis, cluster, url, dir, shards) = match opts.cluster {
            None => {
                let r = if opts.durable_redis {
                    RedisServer::start_durable()
                } else {
                    RedisServer::start()
                };
                let (url, dir) = (r.url.clone(), r.dir.path().to_path_buf());
                (Some(r), None, url, dir, 1)
            }
            Some((masters, shards)) => {
                let c = RedisCluster::start(masters);
                let (url, dir) = (c.url.clone(), c.dir.path().to_path_buf());
                (None, Some(c), url, dir, shards)
            }
        };
        let d = ControlConfig::default();
        let cfg = ControlConfig {
            lease_ms: opts.lease_ms,
            shards,
            retention_ms: opts.retention_ms.unwrap_or(d.retention_ms),
            prices: opts.prices,
            egress: opts.egress,
            secrets_key: opts.secrets_key,
            ..d
        };
        let control = ControlPlane::connect(&url, cfg)
            .await
            .expect("connect control plane");
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let api_host = Arc::new(Host::new(HostConfig::admission()).expect("admission host"));
        let callbacks = opts.api.callbacks.clone();
        let state = AppState::new(control.clone(), api_host, ADMIN.into(), opts.api);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            api::serve(listener, state, async move { stop.cancelled().await })
                .await
                .unwrap();
        }));
        let (c, s) = (control.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            agentplane::scheduler::run_scheduler(c, s).await.unwrap();
        }));
        // The API's callback dispatcher, as `serve` runs it.
        let (c, s) = (control.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            agentplane::callbacks::run_dispatcher(c, callbacks, s)
                .await
                .unwrap();
        }));
        if let Some(slots) = opts.worker_slots {
            let host = Arc::new(
                Host::new(HostConfig {
                    max_instances: opts.max_instances,
                    ..HostConfig::default()
                })
                .expect("host"),
            );
            let wcfg = WorkerConfig {
                slots,
                drain_timeout: Duration::from_secs(2),
                ..WorkerConfig::default()
            };
            let s = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                run_worker(wcfg, control, host, s).await.unwrap();
            }));
        }
        Stack {
            redis,
            cluster,
            url,
            dir,
            api: ApiClient::new(&base, None).expect("api client"),
            base,
            http: reqwest::Client::new(),
            lease_ms: opts.lease_ms,
            shutdown,
            tasks,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// Sends `head` on a raw connection and answers what comes back
    /// (until the server closes it or 2 s pass).
    pub async fn raw_head(&self, head: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://");
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), sock.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Err(_) if !buf.is_empty() => break,
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }

    /// Each `(query, name)`: `GET {path}?{query}` is 400 and its message
    /// names `name`.
    pub async fn assert_queries_refused(&self, path: &str, token: &str, cases: &[(&str, &str)]) {
        for (q, name) in cases {
            let (st, v) = self.get(&format!("{path}?{q}"), token).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains(name),
                "{q}: {v}"
            );
        }
    }

    /// The typed client calling with `token`.
    pub fn as_caller(&self, token: &str) -> ApiClient {
        self.api.with_token(token)
    }

    /// Creates a tenant with generous limits; answers its token.
    pub async fn tenant(&self, id: &str) -> String {
        self.tenant_with(id, json!({})).await
    }

    /// Creates a tenant with generous limits overridden by the fields of
    /// `extra`; answers its token.
    pub async fn tenant_with(&self, id: &str, extra: Value) -> String {
        let mut body = json!({
            "id": id,
            "credits": 1_000_000_000i64,
            "limits": {"fuel": 1_000_000_000_000u64, "timeout_ms": 120_000}
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let spec: NewTenant = serde_json::from_value(body).expect("a tenant body");
        match self.as_caller(ADMIN).create_tenant(&spec).await {
            Ok(created) => created.token,
            Err(e) => panic!("creating tenant {id}: {e}"),
        }
    }

    /// Uploads the guest component `guest`; answers its digest.
    pub async fn push(&self, token: &str, guest: &str) -> String {
        match self
            .as_caller(token)
            .push_component(guest_bytes(guest))
            .await
        {
            Ok(meta) => meta.digest,
            Err(e) => panic!("pushing {guest}: {e}"),
        }
    }

    /// Submits a job given as its JSON body; answers its id.
    pub async fn submit(&self, token: &str, body: Value) -> String {
        let req: JobRequest = serde_json::from_value(body).expect("a job body");
        match self.as_caller(token).submit(&req, None).await {
            Ok(job) => job.id,
            Err(e) => panic!("submitting: {e}"),
        }
    }

    /// Long-polls until the job is terminal (fails the test after `secs`).
    pub async fn wait_terminal(&self, token: &str, id: &str, secs: u64) -> Value {
        let api = self.as_caller(token);
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let job = match api.job(id, Some(5.0)).await {
                Ok(job) => job,
                // The contract's "retry later" (Redis just restarted under
                // a test): retried until the deadline, as a client would.
                Err(e)
                    if e.status() == Some(StatusCode::SERVICE_UNAVAILABLE)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => panic!("job {id}: {e}"),
            };
            if job.state.is_terminal() {
                return serde_json::to_value(job).unwrap();
            }
            assert!(Instant::now() < deadline, "job {id} not terminal: {job:?}");
        }
    }

    /// Polls until `pred(job)` holds.
    pub async fn wait_for(
        &self,
        token: &str,
        id: &str,
        secs: u64,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, job) = self.get(&format!("/v1/jobs/{id}"), token).await;
            if pred(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "condition not reached: {job}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn tenant_info(&self, id: &str) -> Value {
        match self.as_caller(ADMIN).tenant(id).await {
            Ok(t) => serde_json::to_value(t).unwrap(),
            Err(e) => panic!("tenant {id}: {e}"),
        }
    }

    /// The money invariants (balance = granted − settled, nothing reserved)
    /// for one tenant at rest.
    pub async fn assert_books_balance(&self, id: &str) -> Value {
        let t = self.tenant_info(id).await;
        let granted = t["granted"].as_i64().unwrap();
        let settled = t["settled"].as_i64().unwrap();
        assert_eq!(
            t["credits"]["balance"].as_i64().unwrap(),
            granted - settled,
            "{t}"
        );
        assert_eq!(t["credits"]["reserved"].as_i64().unwrap(), 0, "{t}");
        t
    }
}

/// Three tenants and three finished jobs, the scene the admin listings
/// and the dashboard are shown over (see [`Stack::three_finished_jobs`]).
pub struct Scene {
    /// Tokens of `acme` (weight 1) and `beta` (weight 3); `idle` has none
    /// kept and never runs.
    pub acme: String,
    pub beta: String,
    /// acme's job that succeeded, beta's that failed (`fail:x`, one
    /// attempt), beta's that succeeded, submitted in this order.
    pub ok_a: String,
    pub bad_b: String,
    pub ok_b: String,
}

impl Stack {
    /// Creates `acme`, `beta` (weight 3) and `idle`, runs the three jobs of
    /// [`Scene`] (acme's with `acme_input`) to their end and answers them.
    pub async fn three_finished_jobs(&self, acme_input: &str) -> Scene {
        let acme = self.tenant("acme").await;
        let beta = self.tenant_with("beta", json!({"weight": 3})).await;
        let _idle = self.tenant("idle").await;
        let da = self.push(&acme, "echo").await;
        let db = self.push(&beta, "echo").await;
        let ok_a = self
            .submit(&acme, json!({"component": da, "input": acme_input}))
            .await;
        let bad_b = self
            .submit(
                &beta,
                json!({"component": db, "input": "fail:x", "max_attempts": 1}),
            )
            .await;
        let ok_b = self
            .submit(&beta, json!({"component": db, "input": "b"}))
            .await;
        for (t, id) in [(&acme, &ok_a), (&beta, &bad_b), (&beta, &ok_b)] {
            self.wait_terminal(t, id, 60).await;
        }
        Scene {
            acme,
            beta,
            ok_a,
            bad_b,
            ok_b,
        }
    }
}

/// A job body with only its component and input.
pub fn job_request(component: &str, input: &str) -> JobRequest {
    JobRequest {
        component: component.to_string(),
        input: input.to_string(),
        agent_id: None,
        contexts: Vec::new(),
        gpus: 0,
        max_attempts: None,
        timeout_ms: None,
        fuel: None,
        delay_ms: 0,
        callback_url: None,
        max_tokens: None,
    }
}

pub fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or("")
}

pub fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}
/// Against a server this test spawned (not a [`Stack`]): creates tenant
/// `acme` with the admin token and uploads `echo`; answers the tenant's
/// client and the component's digest.
pub async fn onboard_acme(base: &str, admin: &str) -> (ApiClient, String) {
    let api = ApiClient::new(base, Some(admin.to_string())).unwrap();
    let created = api
        .create_tenant(&NewTenant {
            id: "acme".into(),
            credits: Some(1_000_000_000),
            ..NewTenant::default()
        })
        .await
        .unwrap();
    let acme = api.with_token(&created.token);
    let digest = acme
        .push_component(guest_bytes("echo"))
        .await
        .unwrap()
        .digest;
    (acme, digest)
}

// ---- process-level faults, with the real binary ----

/// Short enough to keep the tests quick, long enough that renewals every
/// third of it survive a loaded 2-core CI machine running tests in parallel.
pub const PROC_LEASE_MS: u64 = 2000;

/// An `agentplane worker` child process.
pub struct WorkerProc {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl WorkerProc {
    pub fn spawn(redis_url: &str, slots: u32, drain_ms: u64, log: &std::path::Path) -> WorkerProc {
        Self::spawn_with(redis_url, slots, drain_ms, &[], log)
    }

    pub fn spawn_with(
        redis_url: &str,
        slots: u32,
        drain_ms: u64,
        extra: &[&str],
        log: &std::path::Path,
    ) -> WorkerProc {
        let log_path = log.to_path_buf();
        let log = std::fs::File::create(log).unwrap();
        // PROC_LEASE_MS unless `extra` names another lease.
        let lease = if extra.contains(&"--lease-ms") {
            vec![]
        } else {
            vec!["--lease-ms".to_string(), PROC_LEASE_MS.to_string()]
        };
        let child = Command::new(bin())
            .args(["worker", "--redis", redis_url])
            .args(["--slots", &slots.to_string()])
            .args(lease)
            .args(["--drain-ms", &drain_ms.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agentplane worker");
        WorkerProc {
            child,
            log: log_path,
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0);
    }

    /// Waits for the process to exit; answers its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t0.elapsed() < within, "worker did not exit in {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The temp dir goes with the test: show what the worker said.
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("--- {} ---\n{tail}", self.log.display());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proc_opts() -> Opts {
    Opts {
        worker_slots: None,
        lease_ms: PROC_LEASE_MS,
        ..Opts::default()
    }
}
/// Child processes killed when the test ends, even by a failed assertion.
pub struct KillOnDrop(pub Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
