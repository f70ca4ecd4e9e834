//! What the Redis-side bench modes share: the Redis they run against (given,
//! or a private `redis-server`), a real `agentplane worker` child process,
//! tenants and jobs written straight through the control plane, Redis's own
//! CPU and command counters, and the JSON report.

use crate::control::{ControlConfig, ControlPlane, SubmitSpec, TenantSpec, sha256_hex};
use crate::embedded::EmbeddedRedis;
use crate::model::{Job, TenantId};
use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Flags every Redis-side mode takes.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Redis to run against (one node, not a cluster). Default: a private
    /// `redis-server` on a unix socket in a temporary dir, AOF `everysec`
    /// as `serve` runs it, stopped at the end. Never point this at a
    /// production Redis: the bench writes tenants and jobs and reads
    /// `INFO`.
    #[arg(long)]
    pub redis: Option<String>,
    /// Key prefix of the run. Default: a fresh one, so runs never mix.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Where the JSON report goes (default `target/bench/<mode>.json`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The Redis of a run, and the temporary `redis-server` if it was started here.
pub struct BenchRedis {
    pub url: String,
    pub prefix: String,
    embedded: Option<(EmbeddedRedis, PathBuf)>,
}

impl BenchRedis {
    pub fn open(args: &LocalArgs) -> anyhow::Result<BenchRedis> {
        let prefix = args
            .prefix
            .clone()
            .unwrap_or_else(|| format!("bench{:08x}", rand::random::<u32>()));
        if let Some(url) = &args.redis {
            if url.contains("+cluster://") {
                bail!("the bench reads one Redis's INFO: give a single node, not a cluster");
            }
            return Ok(BenchRedis {
                url: url.clone(),
                prefix,
                embedded: None,
            });
        }
        // Short path: unix socket paths are limited to ~107 bytes.
        let dir = std::env::temp_dir().join(format!("ap-bench-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let server = EmbeddedRedis::start(&dir, 8 << 30)?;
        Ok(BenchRedis {
            url: server.url.clone(),
            prefix,
            embedded: Some((server, dir)),
        })
    }

    pub async fn control(&self) -> anyhow::Result<ControlPlane> {
        self.control_at(&self.prefix).await
    }

    /// A control plane on another prefix of the same Redis (one per
    /// configuration of a mode, so configurations never mix).
    pub async fn control_at(&self, prefix: &str) -> anyhow::Result<ControlPlane> {
        let cfg = ControlConfig {
            prefix: prefix.to_string(),
            ..ControlConfig::default()
        };
        ControlPlane::connect(&self.url, cfg)
            .await
            .context("connecting to the bench Redis")
    }

    /// Whether the Redis was started here (so the bench may empty it).
    pub fn is_private(&self) -> bool {
        self.embedded.is_some()
    }

    /// A plain connection for `INFO`.
    pub async fn raw(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?)
    }
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        if let Some((mut server, dir)) = self.embedded.take() {
            server.stop();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A real `agentplane worker` process (this binary), killed when dropped.
pub struct WorkerProc {
    child: tokio::process::Child,
}

impl WorkerProc {
    /// Starts `agentplane worker --slots <slots>` on the run's Redis and
    /// prefix. `cache_dir` keeps compiled components between workers, so a
    /// warm-up worker can compile once and the measured one only loads.
    pub fn spawn(redis: &BenchRedis, slots: u32, cache_dir: &Path) -> anyhow::Result<WorkerProc> {
        let exe = std::env::current_exe().context("locating the agentplane binary")?;
        let child = tokio::process::Command::new(exe)
            .arg("worker")
            .args(["--redis", &redis.url, "--prefix", &redis.prefix])
            .args(["--slots", &slots.to_string()])
            // A fresh instance per job, whatever the environment says.
            .args(["--warm-instances", "0"])
            .arg("--cache-dir")
            .arg(cache_dir)
            // Its info lines per job would cost the worker and flood the terminal.
            .env(
                "RUST_LOG",
                std::env::var("AGENTPLANE_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting `agentplane worker`")?;
        Ok(WorkerProc { child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident memory of the worker now and at its peak, in bytes
    /// (`VmRSS`, `VmHWM` of /proc).
    pub fn rss(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM, then wait (its jobs are done: the drain is immediate).
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// Fails if the worker exited (a bench against a dead worker would
    /// only wait for its timeout).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the worker exited: {status}");
        }
        Ok(())
    }
}

/// A tenant that never runs out of credits or running slots; answers its id.
pub async fn create_tenant(cp: &ControlPlane, id: &str, weight: u32) -> anyhow::Result<TenantId> {
    let id = TenantId::parse(id).with_context(|| format!("bench tenant id {id:?}"))?;
    cp.create_tenant(
        &TenantSpec {
            id: id.clone(),
            weight,
            credits: 1 << 50,
            max_running: 1_000_000,
            max_queued: u32::MAX,
            max_gpus: 0,
            limits: None,
            max_component_bytes: None,
            max_context_bytes: None,
            max_state_bytes: None,
            allowed_outbound_hosts: Default::default(),
            models: Vec::new(),
            max_tokens_per_job: None,
        },
        &sha256_hex(id.as_bytes()),
    )
    .await
    .with_context(|| format!("creating tenant {id}"))?;
    Ok(id)
}

/// Stores a component for `tenant` (as the API does after admission;
/// the worker compiles it as for any upload) and answers its digest.
pub async fn put_component(
    cp: &ControlPlane,
    tenant: &TenantId,
    wasm: &[u8],
) -> anyhow::Result<String> {
    let digest = format!("sha256:{}", sha256_hex(wasm));
    cp.put_component(tenant, &digest, wasm, Default::default())
        .await?;
    Ok(digest)
}

/// A job of `component` with `input`, the tenant's limits.
pub fn job(component: &str, input: &str) -> SubmitSpec {
    SubmitSpec {
        component: component.to_string(),
        input: input.to_string(),
        agent_id: None,
        contexts: Vec::new(),
        gpus: 0,
        max_attempts: 3,
        timeout_ms: None,
        fuel: None,
        delay_ms: 0,
        idempotency: None,
        callback_url: None,
        outbound_http: false,
        max_tokens: 0,
        tokens_reserve: 0,
    }
}

/// Submits every `(tenant, spec)`, about `in_flight` jobs at once, and
/// answers `(tenant, job id)` in submission order.
pub async fn submit_all(
    cp: &ControlPlane,
    jobs: Vec<(TenantId, SubmitSpec)>,
    in_flight: usize,
) -> anyhow::Result<Vec<(TenantId, String)>> {
    use futures::StreamExt;
    // Each tenant's jobs, in their order, go in SUBMIT calls of up to
    // SUBMIT_CHUNK (as BullMQ's `addBulk` takes a chunk); about `in_flight`
    // jobs are in flight, in whole chunks. Answers come back in the order
    // of `jobs`.
    let total = jobs.len();
    let mut by_tenant: Vec<(TenantId, Vec<(usize, SubmitSpec)>)> = Vec::new();
    let mut slot: std::collections::HashMap<TenantId, usize> = std::collections::HashMap::new();
    for (i, (tenant, spec)) in jobs.into_iter().enumerate() {
        let k = *slot.entry(tenant.clone()).or_insert_with(|| {
            by_tenant.push((tenant.clone(), Vec::new()));
            by_tenant.len() - 1
        });
        by_tenant[k].1.push((i, spec));
    }
    let mut chunks: Vec<(TenantId, Vec<(usize, SubmitSpec)>)> = Vec::new();
    for (tenant, mut list) in by_tenant {
        while !list.is_empty() {
            let rest = list.split_off(list.len().min(SUBMIT_CHUNK));
            chunks.push((tenant.clone(), std::mem::replace(&mut list, rest)));
        }
    }
    let calls = (in_flight / SUBMIT_CHUNK).max(2);
    let results: Vec<anyhow::Result<Vec<(usize, TenantId, String)>>> =
        futures::stream::iter(chunks)
            .map(|(tenant, list)| {
                let cp = cp.clone();
                async move {
                    let (idx, specs): (Vec<usize>, Vec<SubmitSpec>) = list.into_iter().unzip();
                    let mut ids = Vec::with_capacity(specs.len());
                    for (i, s) in idx.into_iter().zip(cp.submit_many(&tenant, &specs).await?) {
                        ids.push((i, tenant.clone(), s?.id));
                    }
                    Ok(ids)
                }
            })
            .buffered(calls)
            .collect()
            .await;
    let mut out: Vec<Option<(TenantId, String)>> = vec![None; total];
    for r in results {
        for (i, t, id) in r? {
            out[i] = Some((t, id));
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.expect("every job answered"))
        .collect())
}

/// Most jobs in one SUBMIT call of the bench's fill.
const SUBMIT_CHUNK: usize = 100;

/// Waits until none of `tenants` has a queued or running job (the worker
/// is checked every poll). Answers when that was seen.
pub async fn wait_idle(
    cp: &ControlPlane,
    tenants: &[TenantId],
    worker: &mut WorkerProc,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut busy = false;
        for t in tenants {
            let info = cp.tenant(t).await?.context("bench tenant vanished")?;
            if info.queued + info.running > 0 {
                busy = true;
                break;
            }
        }
        if !busy {
            return Ok(Instant::now());
        }
        worker.check_alive()?;
        if Instant::now() > deadline {
            bail!("jobs still queued or running after {timeout:?}");
        }
        // Each poll is one HGETALL per tenant until a busy one: a few
        // µs of Redis time, against hundreds of µs per job drained.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads back every job (after the measurement: these reads are not
/// counted).
pub async fn read_jobs(cp: &ControlPlane, ids: &[(TenantId, String)]) -> anyhow::Result<Vec<Job>> {
    use futures::StreamExt;
    let jobs: Vec<anyhow::Result<Job>> = futures::stream::iter(ids)
        .map(|(t, id)| async move { cp.job(t, id).await?.context("a bench job vanished") })
        .buffered(64)
        .collect()
        .await;
    jobs.into_iter().collect()
}

/// Milliseconds since the epoch of an RFC 3339 time of a job.
pub fn millis(s: Option<&str>) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s?, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Redis's own counters at one instant: `INFO cpu` and `INFO commandstats`.
pub struct RedisStats {
    /// used_cpu_sys + used_cpu_user, seconds.
    cpu_s: f64,
    /// Per command: (calls, usec).
    commands: BTreeMap<String, (u64, u64)>,
}

impl RedisStats {
    pub async fn take(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<RedisStats> {
        let text: String = redis::cmd("INFO")
            .arg("cpu")
            .arg("commandstats")
            .query_async(conn)
            .await?;
        Ok(parse_info(&text))
    }

    /// What happened between `self` and `later`, per job: Redis CPU µs and,
    /// per command, calls and µs of Redis time. Commands a script runs are
    /// counted both under their own name and inside FCALL's time, so the
    /// per-command times do not add up to the CPU.
    pub fn per_job(&self, later: &RedisStats, jobs: u64) -> Value {
        let n = jobs.max(1) as f64;
        let cpu_us = (later.cpu_s - self.cpu_s) * 1e6;
        let mut commands = serde_json::Map::new();
        for (cmd, (calls, usec)) in &later.commands {
            let (c0, u0) = self.commands.get(cmd).copied().unwrap_or((0, 0));
            let (calls, usec) = (calls.saturating_sub(c0), usec.saturating_sub(u0));
            if calls == 0 {
                continue;
            }
            commands.insert(
                cmd.clone(),
                json!({
                    "calls": calls,
                    "calls_per_job": round3(calls as f64 / n),
                    "usec_per_call": round3(usec as f64 / calls as f64),
                    "usec_per_job": round3(usec as f64 / n),
                }),
            );
        }
        json!({
            "redis_cpu_us_per_job": round3(cpu_us / n),
            "redis_cpu_s": round3(cpu_us / 1e6),
            "commandstats": commands,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn parse_info(text: &str) -> RedisStats {
    let mut cpu_s = 0.0;
    let mut commands = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            cpu_s += v.parse::<f64>().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("cmdstat_") {
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let field = |k: &str| -> u64 {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            commands.insert(name.to_string(), (field("calls"), field("usec")));
        }
    }
    RedisStats { cpu_s, commands }
}

/// Prints the report and writes it to `out` (default
/// `target/bench/<mode>.json`).
pub fn report(mode: &str, out: Option<&Path>, report: &Value) -> anyhow::Result<()> {
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target/bench").join(format!("{mode}.json")));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(&path, format!("{text}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{text}");
    eprintln!("report written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_parsed_and_diffed_per_job() {
        let before = parse_info(
            "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.000000\r\nused_cpu_sys_children:9.0\r\n\
             # Commandstats\r\ncmdstat_evalsha:calls=10,usec=100,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let after = parse_info(
            "used_cpu_sys:2.000000\r\nused_cpu_user:2.500000\r\n\
             cmdstat_evalsha:calls=30,usec=500,usec_per_call=16.67,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_hgetall:calls=4,usec=8,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let d = before.per_job(&after, 10);
        assert_eq!(d["redis_cpu_us_per_job"], 100_000.0);
        assert_eq!(d["commandstats"]["evalsha"]["calls"], 20);
        assert_eq!(d["commandstats"]["evalsha"]["usec_per_job"], 40.0);
        assert_eq!(d["commandstats"]["hgetall"]["calls_per_job"], 0.4);
    }
}
