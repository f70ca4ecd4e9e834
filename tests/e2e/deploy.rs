//! Deployments: `serve` with its own Redis across restarts, the parts as
//! separate processes, the service on a Redis Cluster.

use crate::common::redis::RedisServer;
use crate::common::stack::*;
use agentplane::client::ApiClient;
use agentplane::model::JobState;
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `agentplane serve` as a user runs it: its own redis-server in the data
/// dir, the admin token written once, everything stopped on SIGTERM, the
/// data still there on the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_runs_its_own_redis_and_keeps_data_across_restarts() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (data_dir, logs) = (data.clone(), dir.path().to_path_buf());
    let start = move |log: &str| {
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--data")
            .arg(&data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--slots",
                "1",
                "--lease-ms",
                "1000",
            ])
            .env_remove("AGENTPLANE_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs.join(log)).unwrap())
            .spawn()
            .expect("spawn agentplane serve");
        // The banner's first line names the address it bound.
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut lines = out.lines();
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("agentplane is listening on ") {
                base = Some(rest.trim().to_string());
                break;
            }
        }
        // Keep reading what else it prints, as a terminal would.
        std::thread::spawn(move || lines.for_each(drop));
        (child, base.expect("serve printed its address"))
    };
    let (child, base) = tokio::task::spawn_blocking({
        let start = start.clone();
        move || start("serve1.log")
    })
    .await
    .unwrap();
    let mut guard = KillOnDrop(vec![child]);
    let child = &mut guard.0[0];
    let token_file = data.join("admin-token");
    let admin = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (acme, digest) = onboard_acme(&base, &admin).await;
    let id = acme
        .submit(&job_request(&digest, "embedded"), None)
        .await
        .unwrap()
        .id;
    let job = acme.job(&id, Some(30.0)).await.unwrap();
    assert_eq!(job.output.as_deref(), Some("embedded"), "{job:?}");

    // SIGTERM: everything stops, Redis included.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "serve did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let socket = data.join("redis.sock");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());
    assert!(data.join("appendonlydir").exists());

    // Restart on the same dir: same admin token, the tenant and job are there.
    let (child, base) = tokio::task::spawn_blocking(move || start("serve2.log"))
        .await
        .unwrap();
    let _guard2 = KillOnDrop(vec![child]);
    let admin2 = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(admin, admin2);
    let acme = ApiClient::new(&base, None)
        .unwrap()
        .with_token(acme.token().unwrap());
    let job = acme.job(&id, None).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
}

/// The parts one per process, as on many machines: `api`, `scheduler` and
/// two `worker`s against one Redis, each its own `agentplane` process. Two
/// jobs only the scheduler can move (a delayed one, and one whose lease
/// expires with a worker that vanished) must end, and both workers must
/// run jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_run_as_separate_processes() {
    use std::io::BufRead;
    let redis = RedisServer::start();
    let dir = redis.dir.path().to_path_buf();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let mut api = Command::new(bin())
        .args(["api", "--redis", &redis.url, "--listen", "127.0.0.1:0"])
        .env("AGENTPLANE_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("api.log")).unwrap())
        .spawn()
        .unwrap();
    let out = api.stdout.take().unwrap();
    let base = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(out).lines();
        let line = lines.next().unwrap().unwrap();
        std::thread::spawn(move || lines.for_each(drop));
        line.strip_prefix("agentplane api is listening on ")
            .expect("api banner")
            .trim()
            .to_string()
    })
    .await
    .unwrap();
    let mut children = KillOnDrop(vec![api]);
    children.0.push(
        Command::new(bin())
            .args(["scheduler", "--redis", &redis.url, "--lease-ms", "1000"])
            .stderr(std::fs::File::create(dir.join("sched.log")).unwrap())
            .spawn()
            .unwrap(),
    );

    let (acme, digest) = onboard_acme(&base, ADMIN).await;
    let hold = acme
        .push_component(crate::common::guests::guest_bytes("hold"))
        .await
        .unwrap()
        .digest;
    // Before any worker runs: a job leased to a worker that then vanishes
    // (only REAP frees it), and a delayed job (only PROMOTE queues it).
    let ghost = acme
        .submit(&job_request(&digest, "ghost"), None)
        .await
        .unwrap()
        .id;
    let cp = agentplane::control::ControlPlane::connect(
        &redis.url,
        agentplane::control::ControlConfig {
            lease_ms: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let leased = cp.claim("vanished", 1, 0).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].lease.job_id, ghost);
    let later = acme
        .submit(
            &agentplane::api::JobRequest {
                delay_ms: 1500,
                ..job_request(&digest, "later")
            },
            None,
        )
        .await
        .unwrap()
        .id;

    let metrics_ports = [free_port(), free_port()];
    for (i, port) in metrics_ports.iter().enumerate() {
        children.0.push(
            Command::new(bin())
                .args(["worker", "--redis", &redis.url, "--slots", "2"])
                .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
                .stderr(std::fs::File::create(dir.join(format!("w{i}.log"))).unwrap())
                .spawn()
                .unwrap(),
        );
    }
    // More long jobs than one worker has slots: both get work.
    let mut ids = Vec::new();
    for i in 0..8 {
        let req = job_request(&hold, &format!("0,{}", 400 + i));
        ids.push(acme.submit(&req, None).await.unwrap().id);
    }
    for (i, id) in ids.iter().enumerate() {
        let job = acme.job(id, Some(30.0)).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(job.output, Some(format!("held 0 MiB for {} ms", 400 + i)));
    }
    for (id, input) in [(&ghost, "ghost"), (&later, "later")] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let job = loop {
            let job = acme.job(id, Some(5.0)).await.unwrap();
            if job.state.is_terminal() || Instant::now() > deadline {
                break job;
            }
        };
        assert_eq!(job.state, JobState::Succeeded, "{input}: {job:?}");
        assert_eq!(job.output.as_deref(), Some(input));
    }
    // Each worker's own metrics endpoint counts what it ran.
    for port in metrics_ports {
        agentplane::client::tls_provider();
        let m = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(m.contains("agentplane_claim_seconds"), "{m}");
        let claimed: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("agentplane_claimed_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(claimed >= 1.0, "worker on :{port} ran no job:\n{m}");
    }
    drop(children);
}

/// The same service on a Redis Cluster: tenants spread over shards, API,
/// scheduler and worker against `redis+cluster://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_runs_on_a_redis_cluster() {
    let s = Stack::start(Opts {
        cluster: Some((3, 4)),
        ..Opts::default()
    })
    .await;
    assert!(s.url.starts_with("redis+cluster://"));
    let mut jobs = Vec::new();
    for t in ["t-a", "t-b", "t-c", "t-d"] {
        let token = s.tenant(t).await;
        let echo = s.push(&token, "echo").await;
        let id = s
            .submit(&token, json!({"component": echo, "input": t}))
            .await;
        jobs.push((t, token, id));
    }
    for (t, token, id) in &jobs {
        let job = s.wait_terminal(token, id, 60).await;
        assert_eq!(state(&job), "succeeded", "{job}");
        assert_eq!(job["output"], *t);
        s.assert_books_balance(t).await;
    }
    s.stop().await;
}
