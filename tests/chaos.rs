//! Chaos: three real `agentplane worker` processes run a mixed load for 8
//! tenants (echo, sleeper, failing echo, trap, runaway, a counter with an
//! agent state above the inline threshold) while the test SIGKILLs and
//! SIGSTOPs/SIGCONTs them at random, cancels some jobs, restarts Redis
//! (standalone, `appendfsync always`) or moves a shard's slot to another
//! master (3-master cluster). Then it audits: every accepted job is
//! terminal, no attempt was settled twice, each counter's state equals its
//! successful jobs, the ledger is exact, and `agentplane audit` is clean.
//!
//! Short mode (the default, in CI) runs a few hundred jobs per backend;
//! `AGENTPLANE_CHAOS=long` runs thousands and more faults.

mod common;

use crate::common::fixtures::tid;
use agentplane::control::{ControlConfig, ControlPlane};
use common::redis::{move_slot, node, owner};
use common::stack::{Opts, PROC_LEASE_MS, Stack, WorkerProc, bin};
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const TENANTS: usize = 8;
const WORKERS: usize = 3;
const SLOTS: u32 = 4;
/// Counter agents per tenant.
const AGENTS: usize = 2;
/// Counter states carry this much padding: over the 64 KiB inline limit,
/// so they live in the blob tier.
const PAD: usize = 70_000;

struct Mode {
    name: &'static str,
    jobs_per_tenant: usize,
    /// Pause between two submissions (all tenants share one submitter).
    submit_gap: Duration,
    /// How long after the last submission faults go on.
    tail: Duration,
    /// How long the jobs get to finish once the faults stop.
    settle: Duration,
}

fn mode() -> Mode {
    if std::env::var("AGENTPLANE_CHAOS").as_deref() == Ok("long") {
        Mode {
            name: "long",
            jobs_per_tenant: 300,
            submit_gap: Duration::from_millis(15),
            tail: Duration::from_secs(10),
            settle: Duration::from_secs(300),
        }
    } else {
        Mode {
            name: "short",
            jobs_per_tenant: 25,
            submit_gap: Duration::from_millis(40),
            tail: Duration::from_secs(3),
            settle: Duration::from_secs(90),
        }
    }
}

/// What each accepted job was.
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Echo,
    Sleep,
    FailEcho,
    Trap,
    Runaway,
    Counter(usize),
}

#[derive(Clone, Debug)]
struct Accepted {
    tenant: usize,
    id: String,
    kind: Kind,
}

struct Tenant {
    id: String,
    token: String,
    echo: String,
    sleeper: String,
    trap: String,
    runaway: String,
    counter: String,
}

fn job_body(t: &Tenant, rng: &mut impl Rng) -> (Kind, Value) {
    let r: u32 = rng.random_range(0..100);
    match r {
        0..40 => (
            Kind::Echo,
            json!({"component": t.echo, "input": format!("hello {}", rng.random::<u32>())}),
        ),
        40..55 => (
            Kind::Sleep,
            json!({"component": t.sleeper, "input": rng.random_range(50..600).to_string()}),
        ),
        55..63 => (
            Kind::FailEcho,
            json!({"component": t.echo, "input": "fail:on purpose", "max_attempts": 2}),
        ),
        63..70 => (
            Kind::Trap,
            json!({"component": t.trap, "input": "x", "max_attempts": 1}),
        ),
        70..76 => (
            Kind::Runaway,
            if rng.random_bool(0.5) {
                json!({"component": t.runaway, "input": "", "fuel": 20_000_000u64, "max_attempts": 1})
            } else {
                json!({"component": t.runaway, "input": "", "timeout_ms": 300, "max_attempts": 1})
            },
        ),
        _ => {
            let a = rng.random_range(0..AGENTS);
            (
                Kind::Counter(a),
                json!({
                    "component": t.counter,
                    // Distinct padding per tenant and agent: states never
                    // share content across agents.
                    "input": format!("pad:{PAD}:{}-c{a}", t.id),
                    "agent_id": format!("c{a}"),
                    "max_attempts": 8,
                }),
            )
        }
    }
}

/// Submits with an Idempotency-Key until the API accepts (a Redis restart
/// answers 503 or drops the connection for a moment); answers the job id.
async fn submit(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    key: &str,
    body: &Value,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        if let Ok(resp) = r {
            let st = resp.status();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if st == StatusCode::CREATED || st == StatusCode::OK {
                return v["id"].as_str().unwrap().to_string();
            }
            assert!(
                st.is_server_error(),
                "submission refused: {st} {v} for {body}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "API did not accept {body} in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_job(http: &reqwest::Client, base: &str, token: &str, id: &str) -> Option<Value> {
    let resp = http
        .get(format!("{base}/v1/jobs/{id}"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if resp.status() != StatusCode::OK {
        return None;
    }
    resp.json().await.ok()
}

#[derive(Default, Debug)]
struct Faults {
    kills: u32,
    stops: u32,
    respawns: u32,
    cancel_requests: u32,
    redis_restarts: u32,
    reshards: u32,
    reshard_keys: usize,
}

struct Workers {
    procs: Vec<Option<WorkerProc>>,
    url: String,
    extra: Vec<String>,
    dir: std::path::PathBuf,
    spawned: usize,
}

impl Workers {
    fn spawn(&mut self, i: usize) {
        self.spawned += 1;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("worker-{i}-{}.log", self.spawned));
        self.procs[i] = Some(WorkerProc::spawn_with(
            &self.url, SLOTS, 1_000, &extra, &log,
        ));
    }

    /// Respawns any worker that exited (killed, or gave up on Redis).
    fn respawn_dead(&mut self) -> u32 {
        let mut n = 0;
        for i in 0..self.procs.len() {
            let dead = match self.procs[i].as_mut() {
                None => true,
                Some(w) => w.child.try_wait().ok().flatten().is_some(),
            };
            if dead {
                self.spawn(i);
                n += 1;
            }
        }
        n
    }
}

enum Backend {
    Standalone,
    Cluster,
}

async fn chaos(backend: Backend) {
    let m = mode();
    let t_start = Instant::now();
    let shards: u32 = match backend {
        Backend::Standalone => 1,
        Backend::Cluster => 4,
    };
    let mut stack = Stack::start(Opts {
        worker_slots: None,
        lease_ms: PROC_LEASE_MS,
        cluster: matches!(backend, Backend::Cluster).then_some((3, shards)),
        durable_redis: matches!(backend, Backend::Standalone),
        ..Opts::default()
    })
    .await;
    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        let id = format!("chaos{i}");
        let token = stack.tenant(&id).await;
        let echo = stack.push(&token, "echo").await;
        let sleeper = stack.push(&token, "sleeper").await;
        let trap = stack.push(&token, "trap").await;
        let runaway = stack.push(&token, "runaway").await;
        let counter = stack.push(&token, "counter").await;
        tenants.push(Tenant {
            id,
            token,
            echo,
            sleeper,
            trap,
            runaway,
            counter,
        });
    }
    let tenants = Arc::new(tenants);
    let mut workers = Workers {
        procs: (0..WORKERS).map(|_| None).collect(),
        url: stack.url.clone(),
        extra: vec!["--shards".into(), shards.to_string()],
        dir: stack.dir.clone(),
        spawned: 0,
    };
    for i in 0..WORKERS {
        workers.spawn(i);
    }

    // Submitter (and canceller): round-robin over the tenants.
    let total = m.jobs_per_tenant * TENANTS;
    let submitted_all = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (http, base) = (stack.http.clone(), stack.base.clone());
        let tenants = tenants.clone();
        let done = submitted_all.clone();
        let gap = m.submit_gap;
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut cancels = Vec::new();
            let mut rng = rand::rngs::StdRng::from_os_rng();
            for n in 0..total {
                let ti = n % TENANTS;
                let t = &tenants[ti];
                let (kind, body) = job_body(t, &mut rng);
                let id = submit(&http, &base, &t.token, &format!("k{n}"), &body).await;
                if rng.random_bool(0.05) {
                    let (http, base, token, id) =
                        (http.clone(), base.clone(), t.token.clone(), id.clone());
                    let wait = Duration::from_millis(rng.random_range(0..800));
                    cancels.push(tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        // Best effort: a Redis restart may refuse it.
                        let _ = http
                            .post(format!("{base}/v1/jobs/{id}/cancel"))
                            .bearer_auth(&token)
                            .send()
                            .await;
                    }));
                }
                accepted.push(Accepted {
                    tenant: ti,
                    id,
                    kind,
                });
                tokio::time::sleep(gap).await;
            }
            let ncancels = cancels.len() as u32;
            for c in cancels {
                let _ = c.await;
            }
            done.store(true, Ordering::SeqCst);
            (accepted, ncancels)
        })
    };

    // Faults until the submitter is done, then `tail` more.
    let mut faults = Faults::default();
    let mut stopped: Vec<(usize, Instant)> = Vec::new();
    let mut big_fault_done = false;
    let fault_start = Instant::now();
    let mut tail_until: Option<Instant> = None;
    let mut rng = rand::rng();
    loop {
        if submitted_all.load(Ordering::SeqCst) && tail_until.is_none() {
            tail_until = Some(Instant::now() + m.tail);
        }
        if tail_until.is_some_and(|t| Instant::now() >= t) && big_fault_done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        // Resume stopped workers whose pause is over.
        stopped.retain(|(i, until)| {
            if Instant::now() >= *until {
                if let Some(w) = workers.procs[*i].as_ref() {
                    w.signal(libc::SIGCONT);
                }
                false
            } else {
                true
            }
        });
        faults.respawns += workers.respawn_dead();
        // The big fault, once, some way into the run.
        if !big_fault_done && fault_start.elapsed() > Duration::from_secs(4) {
            big_fault_done = true;
            match backend {
                Backend::Standalone => {
                    let r = stack.redis.as_mut().unwrap();
                    r.restart();
                    faults.redis_restarts += 1;
                }
                Backend::Cluster => {
                    let c = stack.cluster.as_ref().unwrap();
                    let anchor = ControlPlane::connect(
                        &stack.url,
                        ControlConfig {
                            shards,
                            ..ControlConfig::default()
                        },
                    )
                    .await
                    .unwrap()
                    .keys()
                    .anchor(rng.random_range(0..shards));
                    let slot: u16 = redis::cmd("CLUSTER")
                        .arg("KEYSLOT")
                        .arg(&anchor)
                        .query_async(&mut node(c.ports[0]).await)
                        .await
                        .unwrap();
                    let from = owner(&c.ports, slot).await;
                    let to = (from + 1) % c.ports.len();
                    let t0 = Instant::now();
                    faults.reshard_keys = move_slot(
                        &c.ports,
                        slot,
                        from,
                        to,
                        // No pause: a plain key-by-key migration, as
                        // `redis-cli --cluster reshard` makes it.
                        None,
                        10,
                        Duration::from_millis(5),
                    )
                    .await;
                    eprintln!(
                        "chaos: moved slot {slot} ({} keys) in {:?}",
                        faults.reshard_keys,
                        t0.elapsed()
                    );
                    faults.reshards += 1;
                }
            }
            continue;
        }
        let i = rng.random_range(0..WORKERS);
        if stopped.iter().any(|(s, _)| *s == i) {
            continue;
        }
        match rng.random_range(0..10) {
            0..5 => {
                if let Some(mut w) = workers.procs[i].take() {
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    faults.kills += 1;
                }
                workers.spawn(i);
            }
            5..9 => {
                if let Some(w) = workers.procs[i].as_ref() {
                    w.signal(libc::SIGSTOP);
                    faults.stops += 1;
                    // Sometimes past the lease: the job is reaped and its
                    // worker's late FINALIZE must change nothing.
                    let pause = Duration::from_millis(rng.random_range(200..3 * PROC_LEASE_MS));
                    stopped.push((i, Instant::now() + pause));
                }
            }
            _ => {}
        }
    }
    for (i, _) in stopped.drain(..) {
        if let Some(w) = workers.procs[i].as_ref() {
            w.signal(libc::SIGCONT);
        }
    }
    faults.respawns += workers.respawn_dead();
    let (accepted, ncancels) = submitter.await.unwrap();
    faults.cancel_requests = ncancels;
    assert_eq!(accepted.len(), total);

    // Everything accepted ends.
    let http = stack.http.clone();
    let base = stack.base.clone();
    let deadline = Instant::now() + m.settle;
    let mut finals: HashMap<String, Value> = HashMap::new();
    loop {
        for a in &accepted {
            if finals.contains_key(&a.id) {
                continue;
            }
            if let Some(j) = get_job(&http, &base, &tenants[a.tenant].token, &a.id).await
                && ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap_or(""))
            {
                finals.insert(a.id.clone(), j);
            }
        }
        if finals.len() == accepted.len() || Instant::now() > deadline {
            break;
        }
        workers.respawn_dead();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let stuck: Vec<&Accepted> = accepted
        .iter()
        .filter(|a| !finals.contains_key(&a.id))
        .collect();
    assert!(
        stuck.is_empty(),
        "{} of {} jobs not terminal after {:?}, e.g. {:?}",
        stuck.len(),
        accepted.len(),
        m.settle,
        stuck.first()
    );

    // Each job ended as its kind must (or was cancelled / lost its only
    // attempt to a killed worker).
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for a in &accepted {
        let j = &finals[&a.id];
        let st = j["state"].as_str().unwrap();
        *by_state.entry(st.to_string()).or_default() += 1;
        match (&a.kind, st) {
            (_, "cancelled") => {}
            (Kind::Echo | Kind::Sleep | Kind::Counter(_), "succeeded") => {}
            (Kind::FailEcho | Kind::Trap | Kind::Runaway, "failed") => {}
            // Killed on its last attempt.
            (_, "failed") if j["error"]["kind"] == "lease_expired" => {}
            _ => panic!("{:?} job ended {st}: {j}", a.kind),
        }
    }

    // Counters: the successful jobs of an agent answered 1..=n, each once,
    // and one more job reads n back (state over the inline limit, so the
    // blob tier carried it through kills and the Redis restart or move).
    let mut counters: BTreeMap<(usize, usize), Vec<u64>> = BTreeMap::new();
    for a in &accepted {
        if let Kind::Counter(k) = a.kind {
            let j = &finals[&a.id];
            let e = counters.entry((a.tenant, k)).or_default();
            if j["state"] == "succeeded" {
                e.push(j["output"].as_str().unwrap().parse().unwrap());
            }
        }
    }
    for ((ti, k), mut outs) in counters {
        outs.sort();
        let n = outs.len() as u64;
        assert_eq!(
            outs,
            (1..=n).collect::<Vec<_>>(),
            "counter c{k} of tenant {ti}: outputs of its successful jobs"
        );
        let t = &tenants[ti];
        let body = json!({"component": t.counter, "input": format!("pad:{PAD}:{}-c{k}", t.id), "agent_id": format!("c{k}")});
        let id = submit(&http, &base, &t.token, &format!("final-{k}"), &body).await;
        let j = stack.wait_terminal(&t.token, &id, 60).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(
            j["output"].as_str().unwrap(),
            (n + 1).to_string(),
            "counter c{k} of {}: state after {n} successful jobs",
            t.id
        );
    }

    // The ledger: at most one reserve, one settle and one release per
    // (job, attempt) (a second settle is a double finalize), sums equal the tenant's counters, nothing reserved.
    let cp = ControlPlane::connect(
        &stack.url,
        ControlConfig {
            shards,
            ..ControlConfig::default()
        },
    )
    .await
    .unwrap();
    let mut settles_total = 0usize;
    let kinds: HashMap<&str, &Kind> = accepted.iter().map(|a| (a.id.as_str(), &a.kind)).collect();
    // Checked after the audit, so one run shows every kind of damage.
    let mut twice: Vec<String> = Vec::new();
    for t in tenants.iter() {
        let info = cp.tenant(&tid(&t.id)).await.unwrap().unwrap();
        assert_eq!(info.credits.reserved, 0, "{}: reserved at rest", t.id);
        assert_eq!(
            info.credits.balance,
            info.granted - info.settled,
            "{}",
            t.id
        );
        assert_eq!((info.running, info.queued), (0, 0), "{}", t.id);
        let ledger = cp.ledger(&tid(&t.id)).await.unwrap();
        let mut per: HashMap<(String, String, u32), u32> = HashMap::new();
        let (mut grant, mut reserve, mut settle, mut release) = (0i64, 0i64, 0i64, 0i64);
        for e in &ledger {
            match e.op.as_str() {
                "grant" => grant += e.amount,
                "reserve" => reserve += e.amount,
                "settle" => {
                    settle += e.amount;
                    release += e.released;
                }
                "release" => release += e.amount,
                other => panic!("unknown ledger op {other}"),
            }
            if e.op != "grant" {
                // FINALIZE settles the cost, releasing the rest of the
                // reservation in the same entry; REAP and RELEASE release
                // it all.
                *per.entry((e.op.clone(), e.job.clone(), e.attempt))
                    .or_default() += 1;
            }
            if e.op == "settle" {
                settles_total += 1;
            }
        }
        for ((op, job, attempt), n) in per.iter().filter(|(_, n)| **n > 1) {
            twice.push(format!(
                "{}: {op} x{n} for attempt {attempt} of {job} ({:?})",
                t.id,
                kinds.get(job.as_str())
            ));
        }
        assert_eq!(grant, info.granted, "{}: grants", t.id);
        assert_eq!(settle, info.settled, "{}: settles", t.id);
        assert_eq!(reserve - settle - release, 0, "{}: open reservations", t.id);
    }

    // And the deployment-wide audit, as an operator runs it.
    let out = std::process::Command::new(bin())
        .args([
            "audit",
            "--redis",
            &stack.url,
            "--shards",
            &shards.to_string(),
        ])
        .output()
        .expect("run agentplane audit");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "audit: {text}");
    eprintln!(
        "chaos {} {}: {} jobs {:?}, {} settles, {} repeated attempt numbers, faults {:?}, {:?}; {}",
        m.name,
        match backend {
            Backend::Standalone => "standalone",
            Backend::Cluster => "cluster",
        },
        accepted.len(),
        by_state,
        settles_total,
        twice.len(),
        faults,
        t_start.elapsed(),
        text.trim()
    );
    assert!(
        twice.is_empty(),
        "{} ledger entries repeat an attempt, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );

    for w in workers.procs.iter_mut().flatten() {
        let _ = w.child.kill();
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_standalone_with_a_redis_restart() {
    chaos(Backend::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_cluster_with_a_live_reshard() {
    chaos(Backend::Cluster).await;
}
