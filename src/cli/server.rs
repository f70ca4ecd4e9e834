//! The server commands: `serve` (all parts in one process) and the parts one
//! per process (`worker`, `api`, `scheduler`).

use super::datadir;
use super::{ApiArgs, ControlArgs, SchedulerArgs, ServeArgs, SlotArgs, WorkerArgs};
use crate::api::{self, AppState};
use crate::callbacks::run_dispatcher;
use crate::control::{ControlConfig, ControlPlane};
use crate::embedded::EmbeddedRedis;
use crate::host::{CompileChild, Host, HostConfig};
use crate::scheduler::run_scheduler;
use crate::worker::{WorkerConfig, run_worker};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Prints a banner line to stdout, ignoring a closed stdout: a server must
/// not die because whoever started it stopped reading (`println!` would
/// panic on EPIPE).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// How long the API may take to finish requests in flight (long-polls
/// included) once shutdown starts.
const API_GRACE: Duration = Duration::from_secs(5);

/// The control-plane settings of the flags; the secrets key from
/// `AGENTPLANE_SECRETS_KEY` (`serve` falls back to its data dir's).
fn control_config(c: &ControlArgs, lease_ms: u64) -> anyhow::Result<ControlConfig> {
    Ok(ControlConfig {
        secrets_key: datadir::secrets_key_env()?,
        prefix: c.prefix.clone(),
        shards: c.shards,
        lease_ms,
        retention_ms: c.retention_s.saturating_mul(1000),
        prices: crate::control::Prices {
            credits_per_mfuel: c.price_mfuel,
            credits_per_gpu_second: c.price_gpu_second,
            gpu_slot_weight: c.gpu_slot_weight,
            credits_per_slot_second: c.price_slot_second,
            credits_per_http_request: c.price_http_request,
            credits_per_http_kib: c.price_http_kib,
        },
        egress: crate::control::EgressBudget {
            requests_per_job: c.egress_requests_per_job,
            kib_per_job: c.egress_kib_per_job,
        },
        idempotency_ttl_s: c.idempotency_ttl_s,
        retry_base_ms: c.retry_base_ms,
        retry_max_ms: c.retry_max_ms,
        state_inline_max: c.state_inline_max_bytes,
        default_limits: crate::model::Limits {
            fuel: c.default_fuel,
            memory_bytes: c.default_memory_bytes,
            timeout_ms: c.default_timeout_ms,
        },
        log_max_bytes: c.log_max_bytes,
        max_node_faults: c.max_node_faults,
    })
}

async fn connect(url: &str, cfg: ControlConfig) -> anyhow::Result<ControlPlane> {
    ControlPlane::connect(url, cfg)
        .await
        .with_context(|| format!("connecting to Redis at {}", redact(url)))
}

/// A Redis URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

fn worker_config(s: &SlotArgs) -> WorkerConfig {
    let d = WorkerConfig::default();
    WorkerConfig {
        slots: s.slots.unwrap_or(d.slots),
        gpus: s.gpus,
        drain_timeout: Duration::from_millis(s.drain_ms),
        ..d
    }
}

fn worker_host(
    slots: &SlotArgs,
    cache_dir: Option<std::path::PathBuf>,
    max_component_bytes: usize,
) -> anyhow::Result<Host> {
    let running = worker_config(slots).slots;
    Host::new(HostConfig {
        max_component_bytes,
        // A few spare instance slots beyond the job slots: an instance is
        // torn down just after its slot is given back. Idle warm instances
        // hold slots of their own.
        max_instances: running
            .saturating_mul(2)
            .max(8)
            .saturating_add(slots.warm_instances),
        warm_instances: slots.warm_instances as usize,
        egress: slots.egress.limits(),
        models: slots.models.clone(),
        cache_dir,
        compile_child: compile_child(),
        ..HostConfig::default()
    })
    .context("starting the Wasm host")
}

/// Uploads are compiled by a child process of this binary, bounded in time
/// and memory (in-process if the binary cannot be found).
fn compile_child() -> Option<CompileChild> {
    CompileChild::this_binary()
        .inspect_err(|e| tracing::warn!(error = %e, "compiling in-process: no path to this binary"))
        .ok()
}

/// A token cancelled by the first SIGINT/SIGTERM; a second one exits at once.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                tracing::info!("shutdown requested; draining (signal again to stop at once)");
                t.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    token
}

/// `agentplane serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Everything `serve` writes (the compiled-component cache, the admin
    // token, Redis's files) lives in the data dir and is for this user only.
    // SAFETY: umask(2) only swaps the process's file-mode mask.
    unsafe { libc::umask(0o077) };
    let shutdown = shutdown_on_signals();
    datadir::ensure_dir(&args.data)?;
    // Dropped last, after every part stopped: the worker needs Redis to
    // release its leases while it drains.
    let mut embedded_redis = None;
    let url = match &args.redis {
        Some(u) => u.clone(),
        None => {
            let r = EmbeddedRedis::start(&args.data, args.redis_maxmemory)?;
            tracing::info!(socket = %r.socket.display(), "embedded redis-server started");
            let url = r.url.clone();
            embedded_redis = Some(r);
            url
        }
    };
    let result = serve_parts(&args, &url, shutdown).await;
    if let Some(mut r) = embedded_redis {
        r.stop();
    }
    result
}

async fn serve_parts(
    args: &ServeArgs,
    url: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    api::install_metrics();
    let control = connect(
        url,
        ControlConfig {
            secrets_key: Some(datadir::secrets_key(&args.data)?),
            ..control_config(&args.control, args.lease.lease_ms)?
        },
    )
    .await?;
    let wcfg = worker_config(&args.slots);
    let host = Arc::new(worker_host(
        &args.slots,
        Some(args.data.join("cache")),
        args.limits.max_component_bytes,
    )?);
    let (token, token_file) = datadir::admin_token(&args.data)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    say!("agentplane is listening on {base}");
    match &token_file {
        Some(p) => say!("admin token (stored in {}): {token}", p.display()),
        None => say!("admin token: from AGENTPLANE_ADMIN_TOKEN"),
    }
    say!(
        "try: curl -s -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"id\":\"demo\",\"credits\":1000000}}' {base}/v1/tenants",
        if token_file.is_some() {
            token.as_str()
        } else {
            "$AGENTPLANE_ADMIN_TOKEN"
        }
    );

    let mut cfg = api_config(&args.limits);
    cfg.callbacks = callbacks(&args.limits, datadir::callback_secret(&args.data)?)?;
    let hooks = tokio::spawn(run_dispatcher(
        control.clone(),
        cfg.callbacks.clone(),
        shutdown.clone(),
    ));
    let state = AppState::new(control.clone(), host.clone(), token, cfg);
    let api = tokio::spawn(api_until(listener, state, shutdown.clone()));
    let sched = tokio::spawn(run_scheduler(control.clone(), shutdown.clone()));
    let worker = tokio::spawn(run_worker(wcfg, control, host, shutdown.clone()));
    // Any part ending early (it failed) stops the others.
    let (a, s, w, h) = tokio::join!(
        stop_all_on_exit(api, shutdown.clone()),
        stop_all_on_exit(sched, shutdown.clone()),
        stop_all_on_exit(worker, shutdown.clone()),
        stop_all_on_exit(hooks, shutdown.clone()),
    );
    a.and(s).and(w).and(h)
}

/// The callback rules of the flags, and the deployment's signing secret.
fn callbacks(
    limits: &super::ApiLimitArgs,
    secret: [u8; 32],
) -> anyhow::Result<crate::callbacks::Callbacks> {
    let rules = limits
        .callback_allow
        .iter()
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.trim().parse().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(crate::callbacks::Callbacks::new(rules, secret))
}

async fn stop_all_on_exit(
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let r = match task.await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("task panicked: {e}")),
    };
    if let Err(e) = &r {
        tracing::error!(error = %format!("{e:#}"), "a part failed; shutting down");
    }
    shutdown.cancel();
    r
}

/// Serves until `shutdown`, then gives requests in flight [`API_GRACE`].
async fn api_until(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stop = shutdown.clone();
    let server = api::serve(listener, state, async move { stop.cancelled().await });
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.context("HTTP server"),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(API_GRACE, server).await {
        Ok(r) => r.context("HTTP server"),
        Err(_) => {
            tracing::info!("requests still open after the grace period; closing");
            Ok(())
        }
    }
}

/// The API's configuration, after making room for its connections: the
/// soft file-descriptor limit is raised to the hard one, and a cap that
/// still does not fit under it is lowered (accept would otherwise fail
/// with "Too many open files" before the cap is reached).
fn api_config(limits: &super::ApiLimitArgs) -> api::ApiConfig {
    let mut cfg = limits.api_config();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid pointer.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return cfg;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    // Descriptors for Redis connections, the cache, logs and the listener.
    const RESERVED: u64 = 256;
    let fits = usize::try_from(soft.saturating_sub(RESERVED))
        .unwrap_or(usize::MAX)
        .max(16);
    if cfg.max_connections > fits {
        tracing::warn!(
            requested = cfg.max_connections,
            used = fits,
            nofile = soft,
            "--max-connections does not fit under the open-file limit; lowered"
        );
        cfg.max_connections = fits;
    }
    cfg
}

/// `agentplane worker`.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signals();
    // The node first (its models load here): a worker whose `--model` does
    // not load stops with the reason before it touches the deployment.
    let host = Arc::new(worker_host(
        &args.slots,
        args.cache_dir.clone(),
        args.max_component_bytes,
    )?);
    let control = connect(
        &args.redis,
        control_config(&args.control, args.lease.lease_ms)?,
    )
    .await?;
    let wcfg = worker_config(&args.slots);
    spawn_metrics(args.metrics_listen, shutdown.clone()).await?;
    run_worker(wcfg, control, host, shutdown).await
}

/// Serves the metrics-only app when asked to.
async fn spawn_metrics(
    listen: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(addr) = listen else { return Ok(()) };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics");
    // Built (and the recorder installed) before this returns, not in the
    // task: what the worker counts before the task first ran was lost (a
    // worker's first CLAIM went uncounted).
    let app = api::metrics_app();
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(())
}

/// `agentplane api`.
pub async fn api(args: ApiArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signals();
    api::install_metrics();
    let token = std::env::var("AGENTPLANE_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .context("`agentplane api` needs the admin token in AGENTPLANE_ADMIN_TOKEN")?;
    let control = connect(&args.redis, control_config(&args.control, 10_000)?).await?;
    let host = Arc::new(
        Host::new(HostConfig {
            compile_child: compile_child(),
            max_component_bytes: args.limits.max_component_bytes,
            ..HostConfig::admission()
        })
        .context("starting the admission host")?,
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    say!(
        "agentplane api is listening on http://{}",
        listener.local_addr()?
    );
    let mut cfg = api_config(&args.limits);
    // Every API process signs with the same keys: the secret is shared.
    let secret = match datadir::callback_secret_env()? {
        Some(s) => s,
        None if args.limits.callback_allow.is_empty() => datadir::random_secret(),
        None => anyhow::bail!(
            "`agentplane api` with --callback-allow needs the signing secret in AGENTPLANE_CALLBACK_SECRET"
        ),
    };
    cfg.callbacks = callbacks(&args.limits, secret)?;
    let hooks = tokio::spawn(run_dispatcher(
        control.clone(),
        cfg.callbacks.clone(),
        shutdown.clone(),
    ));
    let state = AppState::new(control, host, token, cfg);
    let (a, h) = tokio::join!(
        stop_all_on_exit(
            tokio::spawn(api_until(listener, state, shutdown.clone())),
            shutdown.clone()
        ),
        stop_all_on_exit(hooks, shutdown.clone()),
    );
    a.and(h)
}

/// `agentplane scheduler`.
pub async fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signals();
    let control = connect(
        &args.redis,
        control_config(&args.control, args.lease.lease_ms)?,
    )
    .await?;
    spawn_metrics(args.metrics_listen, shutdown.clone()).await?;
    run_scheduler(control, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://:pw@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis+unix:///tmp/s"), "redis+unix:///tmp/s");
    }
}
