//! `agentplane serve` and the redis-server it starts, as processes: a
//! SIGKILLed `serve` leaves no redis-server behind, and a SIGTERM while a
//! job runs drains it before everything stops. (A clean restart keeping
//! the data is in `e2e.rs`; a crash of Redis keeping acknowledged writes is
//! a unit test of `src/embedded.rs`.)

mod common;

use agentplane::client::ApiClient;
use agentplane::model::JobState;
use common::stack::{KillOnDrop, bin, job_request, onboard_acme};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `serve` on `data`; answers the child and the base URL it printed.
async fn serve(data: &Path, log: PathBuf) -> (Child, String) {
    let data = data.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--data")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0", "--slots", "1"])
            .args(["--lease-ms", "1000", "--drain-ms", "20000"])
            .env_remove("AGENTPLANE_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn agentplane serve");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut base = None;
        for line in lines.by_ref() {
            if let Some(rest) = line.unwrap().strip_prefix("agentplane is listening on ") {
                base = Some(rest.trim().to_string());
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        (child, base.expect("serve printed its address"))
    })
    .await
    .unwrap()
}

fn admin_token(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string()
}

/// Whether `pid` is a live process (a zombie is not: it only waits to be
/// reaped by whoever inherited it).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_serve_leaves_no_redis_server_behind() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (child, base) = serve(&data, dir.path().join("serve.log")).await;
    let mut guard = KillOnDrop(vec![child]);
    let redis_pid: i32 = std::fs::read_to_string(data.join("redis.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(redis_pid));
    // Something acknowledged before the kill.
    let (acme, digest) = onboard_acme(&base, &admin_token(&data)).await;
    let id = acme
        .submit(&job_request(&digest, "before the kill"), None)
        .await
        .unwrap()
        .id;
    assert_eq!(
        acme.job(&id, Some(30.0)).await.unwrap().state,
        JobState::Succeeded
    );

    let child = &mut guard.0[0];
    signal(child, libc::SIGKILL);
    child.wait().unwrap();
    let t0 = Instant::now();
    while alive(redis_pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "redis-server {redis_pid} outlived its serve"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(std::os::unix::net::UnixStream::connect(data.join("redis.sock")).is_err());

    // A new serve on the dir starts (no stale server holds it) with the data.
    let (child, base) = serve(&data, dir.path().join("serve2.log")).await;
    let _guard2 = KillOnDrop(vec![child]);
    let acme = ApiClient::new(&base, None)
        .unwrap()
        .with_token(acme.token().unwrap());
    let job = acme.job(&id, None).await.unwrap();
    assert_eq!(job.output.as_deref(), Some("before the kill"), "{job:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_serve_while_a_job_runs_finishes_it_then_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (child, base) = serve(&data, dir.path().join("serve.log")).await;
    let mut guard = KillOnDrop(vec![child]);
    let (acme, _) = onboard_acme(&base, &admin_token(&data)).await;
    let sleeper = acme
        .push_component(common::guests::guest_bytes("sleeper"))
        .await
        .unwrap()
        .digest;
    let id = acme
        .submit(&job_request(&sleeper, "1500"), None)
        .await
        .unwrap()
        .id;
    let t0 = Instant::now();
    while acme.job(&id, None).await.unwrap().state != JobState::Running {
        assert!(t0.elapsed() < Duration::from_secs(30), "never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let child = &mut guard.0[0];
    signal(child, libc::SIGTERM);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "serve did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(std::os::unix::net::UnixStream::connect(data.join("redis.sock")).is_err());

    // The drain let the job finish (its Redis stayed up for the finalize),
    // charged once; nothing is left reserved.
    let (child, base) = serve(&data, dir.path().join("serve2.log")).await;
    let _guard2 = KillOnDrop(vec![child]);
    let acme = ApiClient::new(&base, None)
        .unwrap()
        .with_token(acme.token().unwrap());
    let job = acme.job(&id, None).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(
        (job.output.as_deref(), job.attempts),
        (Some("slept 1500 ms"), 1)
    );
    let admin = ApiClient::new(&base, Some(admin_token(&data))).unwrap();
    let t = admin.tenant("acme").await.unwrap();
    assert_eq!(t.credits.reserved, 0, "{t:?}");
    assert_eq!(t.credits.balance, t.granted - t.settled, "{t:?}");
    assert!(t.settled > 0, "{t:?}");
}
