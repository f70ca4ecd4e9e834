//! The Wasm host against real guest components from `guest-examples/`: each
//! guest's exact outcome, each limit's exact error kind, the sandbox, the
//! admission checks and the component caches.

mod common;

use agentplane::host::{
    AdmissionError, CompileChild, Host, HostConfig, HostError, LoadedComponent, RunOutcome,
    RunReport, RunRequest,
};
use agentplane::model::{ErrorKind, Limits};
use common::guests::guest_bytes;
use common::host::{limits, load, load_bytes};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A small pool: every test builds its own host, and tests run in parallel.
fn cfg() -> HostConfig {
    HostConfig {
        max_instances: 32,
        max_memory_per_instance: 128 * MIB,
        tenant_memory_budget: 1 << 30,
        ..HostConfig::default()
    }
}

fn request(c: &Arc<LoadedComponent>, input: &str, limits: Limits) -> RunRequest {
    common::host::request("t1", c, input, limits)
}

fn failed(r: &RunReport) -> (ErrorKind, &str) {
    match &r.outcome {
        RunOutcome::Failed { kind, message } => (*kind, message.as_str()),
        other => panic!("expected a failure, got {other:?}; log:\n{}", r.log),
    }
}

#[tokio::test]
async fn echo_returns_its_input_and_logs_and_prints() {
    let host = Host::new(cfg()).unwrap();
    let echo = load(&host, "echo").await;
    let r = host.run(request(&echo, "hello", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("hello".into()), "log:\n{}", r.log);
    assert!(r.log.contains("[info] echo got 5 bytes"), "log:\n{}", r.log);
    assert!(
        r.log.contains("[stdout] echo stdout: hello"),
        "log:\n{}",
        r.log
    );
    assert!(r.fuel_used > 0 && r.fuel_used < limits().fuel);
    assert_eq!(r.new_state, None);
}

#[tokio::test]
async fn echo_fail_prefix_is_an_agent_error_with_its_message() {
    let host = Host::new(cfg()).unwrap();
    let echo = load(&host, "echo").await;
    let r = host.run(request(&echo, "fail:bad input", limits())).await;
    assert_eq!(failed(&r), (ErrorKind::AgentError, "bad input"));
}

#[tokio::test]
async fn on_demand_allocation_runs_the_same() {
    let host = Host::new(HostConfig {
        pooling: false,
        ..cfg()
    })
    .unwrap();
    let echo = load(&host, "echo").await;
    let r = host.run(request(&echo, "x", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("x".into()));
}

#[tokio::test]
async fn stdout_beyond_the_bound_is_dropped_with_a_marker() {
    let host = Host::new(HostConfig {
        stdio_capture_bytes: 64,
        ..cfg()
    })
    .unwrap();
    let echo = load(&host, "echo").await;
    let input = "y".repeat(10_000);
    let r = host.run(request(&echo, &input, limits())).await;
    assert_eq!(
        r.outcome,
        RunOutcome::Ok(input),
        "a chatty guest still succeeds"
    );
    assert!(r.log.contains("[... output truncated]"), "log:\n{}", r.log);
    assert!(
        r.log.len() < 400,
        "log kept to its bound: {} bytes",
        r.log.len()
    );
}

#[tokio::test]
async fn counter_increments_its_state_and_sets_it() {
    let host = Host::new(cfg()).unwrap();
    let counter = load(&host, "counter").await;
    let r = host.run(request(&counter, "", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("1".into()));
    assert_eq!(r.new_state.as_deref(), Some(&b"1"[..]));
    let mut req = request(&counter, "", limits());
    req.state = Some(b"41".to_vec());
    let r = host.run(req).await;
    assert_eq!(r.outcome, RunOutcome::Ok("42".into()));
    assert_eq!(r.new_state.as_deref(), Some(&b"42"[..]));
}

#[tokio::test]
async fn rag_qa_without_a_mounted_context_gets_an_error_answer_not_a_trap() {
    let host = Host::new(cfg()).unwrap();
    let rag = load(&host, "rag-qa").await;
    let r = host
        .run(request(
            &rag,
            r#"{"question":"what?","index":"docs"}"#,
            limits(),
        ))
        .await;
    assert_eq!(
        failed(&r),
        (ErrorKind::AgentError, "no context is mounted for this job")
    );
}

#[tokio::test]
async fn a_panicking_guest_is_a_trap_with_its_stderr_in_the_log() {
    let host = Host::new(cfg()).unwrap();
    let trap = load(&host, "trap").await;
    let r = host.run(request(&trap, "boom", limits())).await;
    let (kind, message) = failed(&r);
    assert_eq!(kind, ErrorKind::Trap);
    assert!(message.contains("unreachable"), "{message}");
    assert!(
        r.log.contains("[stderr]") && r.log.contains("trap guest panics on purpose: boom"),
        "log:\n{}",
        r.log
    );
}

#[tokio::test]
async fn runaway_with_little_fuel_is_fuel_exhausted() {
    let host = Host::new(cfg()).unwrap();
    let runaway = load(&host, "runaway").await;
    let lim = Limits {
        fuel: 50_000_000,
        ..limits()
    };
    let r = host.run(request(&runaway, "", lim)).await;
    assert_eq!(failed(&r).0, ErrorKind::FuelExhausted);
    assert_eq!(r.fuel_used, lim.fuel, "all the fuel was used");
}

#[tokio::test]
async fn runaway_with_ample_fuel_and_a_short_deadline_is_a_timeout() {
    let host = Host::new(cfg()).unwrap();
    let runaway = load(&host, "runaway").await;
    let lim = Limits {
        fuel: u64::MAX / 2,
        timeout_ms: 300,
        ..limits()
    };
    let r = host.run(request(&runaway, "", lim)).await;
    assert_eq!(failed(&r).0, ErrorKind::Timeout);
    assert!(
        (300..2_000).contains(&r.wall_ms),
        "stopped near its deadline: {} ms",
        r.wall_ms
    );
    assert!(r.fuel_used > 0);
}

#[tokio::test]
async fn fuel_off_still_has_the_deadline() {
    let host = Host::new(HostConfig {
        fuel: false,
        ..cfg()
    })
    .unwrap();
    let runaway = load(&host, "runaway").await;
    let lim = Limits {
        timeout_ms: 200,
        ..limits()
    };
    let r = host.run(request(&runaway, "", lim)).await;
    assert_eq!(failed(&r).0, ErrorKind::Timeout);
    assert_eq!(r.fuel_used, 0);
}

#[tokio::test]
async fn hog_is_a_memory_limit() {
    let host = Host::new(cfg()).unwrap();
    let hog = load(&host, "hog").await;
    let lim = Limits {
        memory_bytes: 32 * MIB,
        ..limits()
    };
    let r = host.run(request(&hog, "", lim)).await;
    assert_eq!(failed(&r).0, ErrorKind::MemoryLimit, "log:\n{}", r.log);
    // The 128 MiB instance cap would also end as `memory_limit`: the peak
    // shows it was the job's 32 MiB that stopped the hog.
    assert_stopped_near(&r, 32 * MIB);
    assert_eq!(
        host.tenant_memory_in_use("t1"),
        0,
        "released with the store"
    );
}

/// The hog grows 1 MiB at a time, so it is stopped within a few MiB under
/// the bound that refused it, and never past it.
fn assert_stopped_near(r: &RunReport, bound: u64) {
    assert!(
        r.memory_peak <= bound && r.memory_peak + 4 * MIB > bound,
        "peak {} B, the bound under test {bound} B; log:\n{}",
        r.memory_peak,
        r.log
    );
}

#[tokio::test]
async fn the_node_cap_bounds_a_tenant_that_asks_for_more() {
    let host = Host::new(HostConfig {
        max_memory_per_instance: 16 * MIB,
        ..cfg()
    })
    .unwrap();
    let hog = load(&host, "hog").await;
    let lim = Limits {
        memory_bytes: 1 << 40,
        ..limits()
    };
    let r = host.run(request(&hog, "", lim)).await;
    assert_eq!(failed(&r).0, ErrorKind::MemoryLimit, "log:\n{}", r.log);
    assert_stopped_near(&r, 16 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_node_budget_gets_memory_limit_and_others_are_unaffected() {
    let host = Arc::new(
        Host::new(HostConfig {
            tenant_memory_budget: 100 * MIB,
            ..cfg()
        })
        .unwrap(),
    );
    let hold = load(&host, "hold").await;
    let lim = limits();
    let spawn = |tenant: &str, input: &str| {
        let mut req = request(&hold, input, lim);
        req.tenant = tenant.parse().unwrap();
        let host = host.clone();
        tokio::spawn(async move { host.run(req).await })
    };
    // Two instances of t1 hold 40 MiB each (41 MiB with stack and data)...
    let holding: Vec<_> = (0..2).map(|_| spawn("t1", "40,2500")).collect();
    let waited = Instant::now();
    while host.tenant_memory_in_use("t1") < 80 * MIB {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "holds never grew"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...so a third cannot get its 40 MiB within t1's 100 MiB, while a small
    // echo still fits and t2, with its own budget, is unaffected.
    let in_use = host.tenant_memory_in_use("t1");
    let third = spawn("t1", "40,10").await.unwrap();
    assert_eq!(
        failed(&third).0,
        ErrorKind::MemoryLimit,
        "log:\n{}",
        third.log
    );
    // Stopped by what was left of t1's budget, far below its own 64 MiB.
    assert!(
        third.memory_peak <= 100 * MIB - in_use,
        "peak {} B with {in_use} B of t1's 100 MiB in use",
        third.memory_peak
    );
    let echo = load(&host, "echo").await;
    let mut req = request(&echo, "small", lim);
    req.tenant = "t1".parse().unwrap();
    assert_eq!(host.run(req).await.outcome, RunOutcome::Ok("small".into()));
    let other = spawn("t2", "40,10").await.unwrap();
    assert_eq!(
        other.outcome,
        RunOutcome::Ok("held 40 MiB for 10 ms".into())
    );
    for h in holding {
        let r = h.await.unwrap();
        assert_eq!(r.outcome, RunOutcome::Ok("held 40 MiB for 2500 ms".into()));
    }
    assert_eq!(host.tenant_memory_in_use("t1"), 0);
    assert_eq!(host.tenant_memory_in_use("t2"), 0);
    // The budget is back: t1 runs again.
    let r = host.run(request(&hold, "40,10", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("held 40 MiB for 10 ms".into()));
}

/// Pages of [`state_reader`]'s memory: room for an 8 MiB answer at 4096.
const READER_PAGES: u64 = 130;

/// A component whose `run` reads its state (`state.get`) and answers `ok`.
/// Its memory is declared whole and every allocation lands at 4096, so the
/// answer is taken without growing anything. With `spin`, its `realloc`
/// spins forever once asked for 1 MiB or more: the host is left holding
/// the state it built for the guest, mid-copy, until the run is stopped.
fn state_reader(spin: bool) -> Vec<u8> {
    let spin = if spin {
        "(if (i32.ge_u (local.get 3) (i32.const 1048576)) (then (loop $s (br $s))))"
    } else {
        ""
    };
    let wat = format!(
        r#"(component
  (import "agentplane:agent/state@0.1.0" (instance $state
    (export "get" (func (result (option (list u8)))))))
  (core module $libc
    (memory (export "memory") {READER_PAGES})
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      {spin}
      (i32.const 4096)))
  (core instance $libc (instantiate $libc))
  (core func $get (canon lower (func $state "get")
    (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))
  (core module $m
    (import "libc" "memory" (memory 1))
    (import "state" "get" (func $get (param i32)))
    (data (i32.const 100) "ok")
    (func (export "run") (param i32 i32) (result i32)
      (call $get (i32.const 16))
      (i32.store (i32.const 0) (i32.const 0))
      (i32.store (i32.const 4) (i32.const 100))
      (i32.store (i32.const 8) (i32.const 2))
      (i32.const 0)))
  (core instance $i (instantiate $m
    (with "libc" (instance $libc))
    (with "state" (instance (export "get" (func $get))))))
  (func (export "run") (param "input" string) (result (result string (error string)))
    (canon lift (core func $i "run") (memory (core memory $libc "memory"))
      (realloc (core func $libc "realloc"))))
)"#
    );
    wat::parse_str(&wat).expect("valid component text")
}

/// 7.5: the bytes a host call builds for the guest (here a state read; hits
/// and tools the same) were checked against the tenant's budget but not
/// charged while the host held them: every instance of a tenant could make
/// the node hold one more answer than the budget. Now an answer is charged
/// from when it is measured to the guest's next host call: one tenant's
/// second answer that does not fit is `memory_limit`, another tenant runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_the_host_holds_are_charged_to_the_tenant_budget() {
    let answer = 8 * MIB;
    let memory = READER_PAGES << 16;
    // Two readers' memories and one answer fit; a second answer does not.
    let host = Arc::new(
        Host::new(HostConfig {
            tenant_memory_budget: 2 * memory + answer + answer / 2,
            ..cfg()
        })
        .unwrap(),
    );
    let spinner = load_bytes(&host, state_reader(true)).await;
    let reader = load_bytes(&host, state_reader(false)).await;
    let req = |c: &Arc<LoadedComponent>, tenant: &str| {
        let mut r = request(c, "", limits());
        r.tenant = tenant.parse().unwrap();
        r.state = Some(vec![7; answer as usize]);
        r.limits.fuel = u64::MAX;
        r
    };
    let holding = req(&spinner, "t1");
    let stop = holding.cancel.clone();
    let held = {
        let host = host.clone();
        tokio::spawn(async move { host.run(holding).await })
    };
    // The spinner's memory and the answer the host built for it.
    let waited = Instant::now();
    while host.tenant_memory_in_use("t1") < memory + answer {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the answer held for the guest was never charged: t1 holds {} bytes",
            host.tenant_memory_in_use("t1")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = host.run(req(&reader, "t1")).await;
    assert_eq!(
        failed(&second).0,
        ErrorKind::MemoryLimit,
        "log:\n{}",
        second.log
    );
    assert!(second.fuel_used > 0, "the refused call was billed");
    let other = host.run(req(&reader, "t2")).await;
    assert_eq!(other.outcome, RunOutcome::Ok("ok".into()), "{}", other.log);
    stop.cancel();
    assert_eq!(held.await.unwrap().outcome, RunOutcome::Interrupted);
    assert_eq!(host.tenant_memory_in_use("t1"), 0);
    assert_eq!(host.tenant_memory_in_use("t2"), 0);
    // Once the holder is gone the same read fits again.
    let again = host.run(req(&reader, "t1")).await;
    assert_eq!(again.outcome, RunOutcome::Ok("ok".into()), "{}", again.log);
}

/// A component whose `run` sets its state to the 8 MiB at 4096 of its
/// memory and answers `ok`; with `spin` it then spins forever instead.
fn state_writer(spin: bool) -> Vec<u8> {
    let spin = if spin { "(loop $s (br $s))" } else { "" };
    let wat = format!(
        r#"(component
  (import "agentplane:agent/state@0.1.0" (instance $state
    (export "set" (func (param "value" (list u8)) (result (result (error string)))))))
  (core module $libc
    (memory (export "memory") {READER_PAGES})
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 4096)))
  (core instance $libc (instantiate $libc))
  (core func $set (canon lower (func $state "set")
    (memory (core memory $libc "memory")) (realloc (core func $libc "realloc"))))
  (core module $m
    (import "libc" "memory" (memory 1))
    (import "state" "set" (func $set (param i32 i32 i32)))
    (data (i32.const 100) "ok")
    (func (export "run") (param i32 i32) (result i32)
      (call $set (i32.const 4096) (i32.const 8388608) (i32.const 16))
      {spin}
      (i32.store (i32.const 0) (i32.const 0))
      (i32.store (i32.const 4) (i32.const 100))
      (i32.store (i32.const 8) (i32.const 2))
      (i32.const 0)))
  (core instance $i (instantiate $m
    (with "libc" (instance $libc))
    (with "state" (instance (export "set" (func $set))))))
  (func (export "run") (param "input" string) (result (result string (error string)))
    (canon lift (core func $i "run") (memory (core memory $libc "memory"))
      (realloc (core func $libc "realloc"))))
)"#
    );
    wat::parse_str(&wat).expect("valid component text")
}

/// 7.5: the value of `state.set` is kept by the host for the rest of the
/// run (to be committed if the job succeeds), outside every linear memory,
/// and was charged to nobody: each instance of a tenant could make the node
/// keep up to 16 MiB beyond its budget while it went on running. Now it is
/// held against the tenant's budget until replaced or the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_the_host_keeps_is_charged_to_the_tenant_budget() {
    let state = 8 * MIB;
    let memory = READER_PAGES << 16;
    let host = Arc::new(
        Host::new(HostConfig {
            tenant_memory_budget: 2 * memory + state + state / 2,
            ..cfg()
        })
        .unwrap(),
    );
    let spinner = load_bytes(&host, state_writer(true)).await;
    let writer = load_bytes(&host, state_writer(false)).await;
    let req = |c: &Arc<LoadedComponent>, tenant: &str| {
        let mut r = request(c, "", limits());
        r.tenant = tenant.parse().unwrap();
        r.limits.fuel = u64::MAX;
        r
    };
    let holding = req(&spinner, "t1");
    let stop = holding.cancel.clone();
    let held = {
        let host = host.clone();
        tokio::spawn(async move { host.run(holding).await })
    };
    let waited = Instant::now();
    while host.tenant_memory_in_use("t1") < memory + state {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the state kept for the guest was never charged: t1 holds {} bytes",
            host.tenant_memory_in_use("t1")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = host.run(req(&writer, "t1")).await;
    assert_eq!(
        failed(&second).0,
        ErrorKind::MemoryLimit,
        "log:\n{}",
        second.log
    );
    let other = host.run(req(&writer, "t2")).await;
    assert_eq!(other.outcome, RunOutcome::Ok("ok".into()), "{}", other.log);
    assert_eq!(other.new_state.map(|s| s.len()), Some(state as usize));
    stop.cancel();
    assert_eq!(held.await.unwrap().outcome, RunOutcome::Interrupted);
    assert_eq!(host.tenant_memory_in_use("t1"), 0);
    assert_eq!(host.tenant_memory_in_use("t2"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_interrupts_a_runaway_at_once() {
    let host = Host::new(cfg()).unwrap();
    let runaway = load(&host, "runaway").await;
    let lim = Limits {
        fuel: u64::MAX / 2,
        ..limits()
    };
    let req = request(&runaway, "", lim);
    let cancel = req.cancel.clone();
    let host = Arc::new(host);
    let h = host.clone();
    let canceller = tokio::spawn(async move {
        wait_instantiated(&h, "t1").await;
        cancel.cancel();
        Instant::now()
    });
    let r = host.run(req).await;
    let stopped = Instant::now();
    let cancelled_at = canceller.await.unwrap();
    assert_eq!(r.outcome, RunOutcome::Interrupted);
    let lag = stopped - cancelled_at;
    eprintln!("stopped {lag:?} after cancel");
    assert!(
        lag < Duration::from_millis(100),
        "stopped {lag:?} after cancel"
    );
    assert!(r.fuel_used > 0, "stopped from inside, fuel still counted");
}

/// Waits until an instance of `tenant` holds memory: it was instantiated,
/// so a cancel from now on stops a running guest, not a request.
async fn wait_instantiated(host: &Host, tenant: &str) {
    let t0 = Instant::now();
    while host.tenant_memory_in_use(tenant) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never instantiated");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_guest_parked_in_a_host_call_still_meets_its_deadline() {
    let host = Host::new(cfg()).unwrap();
    let sleeper = load(&host, "sleeper").await;
    let r = host.run(request(&sleeper, "20", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("slept 20 ms".into()));
    let lim = Limits {
        timeout_ms: 300,
        ..limits()
    };
    let r = host.run(request(&sleeper, "60000", lim)).await;
    assert_eq!(failed(&r).0, ErrorKind::Timeout);
    assert!(r.wall_ms < 2_000, "stopped after {} ms", r.wall_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_interrupts_a_guest_parked_in_a_host_call() {
    let host = Host::new(cfg()).unwrap();
    let sleeper = load(&host, "sleeper").await;
    let req = request(&sleeper, "60000", limits());
    let cancel = req.cancel.clone();
    let host = Arc::new(host);
    let h = host.clone();
    let canceller = tokio::spawn(async move {
        wait_instantiated(&h, "t1").await;
        // The sleeper's first act is its sleep: a few ms more and it is
        // parked there (cancelled earlier, it would still be stopped).
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
        Instant::now()
    });
    let r = host.run(req).await;
    let lag = Instant::now() - canceller.await.unwrap();
    assert_eq!(r.outcome, RunOutcome::Interrupted);
    assert!(r.wall_ms >= 50, "the run was stopped before it started");
    eprintln!("stopped {lag:?} after cancel");
    assert!(
        lag < Duration::from_millis(100),
        "stopped {lag:?} after cancel"
    );
}

#[tokio::test]
async fn a_request_cancelled_before_it_starts_does_not_run() {
    let host = Host::new(cfg()).unwrap();
    let counter = load(&host, "counter").await;
    let req = request(&counter, "", limits());
    req.cancel.cancel();
    let r = host.run(req).await;
    assert_eq!(r.outcome, RunOutcome::Interrupted);
    assert_eq!((r.fuel_used, r.new_state), (0, None));
}

#[tokio::test]
async fn extreme_limits_do_not_break_the_host() {
    let host = Host::new(cfg()).unwrap();
    let echo = load(&host, "echo").await;
    let r = host
        .run(request(
            &echo,
            "max",
            Limits {
                fuel: u64::MAX,
                memory_bytes: u64::MAX,
                timeout_ms: u64::MAX,
            },
        ))
        .await;
    assert_eq!(r.outcome, RunOutcome::Ok("max".into()));
    let no_memory = Limits {
        memory_bytes: 0,
        ..limits()
    };
    let r = host.run(request(&echo, "m", no_memory)).await;
    assert_eq!(failed(&r).0, ErrorKind::MemoryLimit, "{}", r.log);
    let no_fuel = Limits {
        fuel: 0,
        ..limits()
    };
    let r = host.run(request(&echo, "f", no_fuel)).await;
    assert_eq!(failed(&r).0, ErrorKind::FuelExhausted, "{}", r.log);
    let no_time = Limits {
        fuel: u64::MAX,
        timeout_ms: 0,
        ..limits()
    };
    let runaway = load(&host, "runaway").await;
    let r = host.run(request(&runaway, "t", no_time)).await;
    assert_eq!(failed(&r).0, ErrorKind::Timeout, "{}", r.log);
}

#[tokio::test]
async fn the_escape_guest_finds_no_file_no_env_and_no_network() {
    let host = Host::new(cfg()).unwrap();
    let escape = load(&host, "escape").await;
    let r = host.run(request(&escape, "", limits())).await;
    let RunOutcome::Ok(out) = &r.outcome else {
        panic!("escape guest failed: {:?}\n{}", r.outcome, r.log);
    };
    eprintln!("escape report: {out}");
    let v: serde_json::Value = serde_json::from_str(out).unwrap();
    for probe in ["passwd", "list_root", "list_cwd", "tcp", "udp", "dns"] {
        assert_eq!(v[probe]["ok"], false, "{probe} must fail: {}", v[probe]);
    }
    assert_eq!(v["env"], serde_json::json!([]), "no environment");
    assert_eq!(v["args"], serde_json::json!([]), "no arguments");
    assert_eq!(v["stdin_bytes"], 0, "empty stdin");
}

fn refusal(host: &Host, bytes: &[u8]) -> String {
    match host.admit(bytes) {
        Err(AdmissionError::Invalid(m)) => m,
        Err(AdmissionError::Unavailable(m)) => panic!("admission unavailable: {m}"),
        Ok(a) => panic!("admitted {}", a.digest),
    }
}

#[test]
fn admission_accepts_a_guest_and_answers_its_digest() {
    let host = Host::new(cfg()).unwrap();
    let bytes = guest_bytes("echo");
    let a = host.admit(&bytes).unwrap();
    assert_eq!(
        a.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
    );
    assert_eq!(a.size, bytes.len());
    assert_eq!(host.compile_count(), 1);
}

#[tokio::test]
async fn an_admitted_component_runs_without_a_second_compile() {
    let host = Host::new(cfg()).unwrap();
    let digest = host.admit(&guest_bytes("echo")).unwrap().digest;
    let echo = host
        .component(&digest, || async { panic!("must not fetch") })
        .await
        .unwrap();
    assert_eq!(host.compile_count(), 1);
    let r = host.run(request(&echo, "hi", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("hi".into()));
}

#[test]
fn admission_refuses_what_is_not_an_agent_and_says_why() {
    let host = Host::new(cfg()).unwrap();
    let m = refusal(&host, b"definitely not wasm");
    assert!(m.contains("not a WebAssembly component"), "{m}");
    let m = refusal(&host, b"");
    assert!(m.contains("empty"), "{m}");

    let core = wat::parse_str(r#"(module (func (export "run")))"#).unwrap();
    let m = refusal(&host, &core);
    assert!(
        m.contains("core WebAssembly module, not a component"),
        "{m}"
    );

    let foreign = wat::parse_str(
        r#"(component
             (import "evil:thing/x" (instance))
           )"#,
    )
    .unwrap();
    let m = refusal(&host, &foreign);
    assert!(
        m.contains("`evil:thing/x`") && m.contains("not WASI 0.2"),
        "{m}"
    );

    let no_run = wat::parse_str("(component)").unwrap();
    let m = refusal(&host, &no_run);
    assert!(m.contains("does not export `run"), "{m}");

    let wrong_run = wat::parse_str(
        r#"(component
             (core module $m (func (export "f")))
             (core instance $i (instantiate $m))
             (func (export "run") (canon lift (core func $i "f")))
           )"#,
    )
    .unwrap();
    let m = refusal(&host, &wrong_run);
    assert!(m.contains("`run` has the wrong type"), "{m}");

    let mut truncated = guest_bytes("echo");
    truncated.truncate(truncated.len() / 2);
    let m = refusal(&host, &truncated);
    assert!(m.contains("invalid component"), "{m}");

    let mut huge = b"\0asm\x0d\0\x01\0".to_vec();
    huge.resize(33 << 20, 0);
    let m = refusal(&host, &huge);
    assert!(m.contains("at most"), "{m}");
}

#[tokio::test]
async fn unknown_bytes_are_not_found() {
    let host = Host::new(cfg()).unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let r = host.component(&digest, || async { Ok(None) }).await;
    assert!(matches!(r, Err(HostError::NotFound(d)) if d == digest));
    let r = host
        .component("sha256:../../etc/passwd", || async { Ok(None) })
        .await;
    assert!(matches!(r, Err(HostError::NotFound(_))));
}

#[tokio::test]
async fn bytes_that_do_not_match_their_digest_are_refused() {
    let host = Host::new(cfg()).unwrap();
    let digest = format!("sha256:{}", "cd".repeat(32));
    let r = host
        .component(&digest, || async { Ok(Some(guest_bytes("echo"))) })
        .await;
    assert!(matches!(r, Err(HostError::Other(_))));
    assert_eq!(host.compile_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_compile_once() {
    let host = Arc::new(Host::new(cfg()).unwrap());
    let bytes = guest_bytes("echo");
    // Not admitted here (admission would already cache it): a cold node.
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (host, bytes, digest) = (host.clone(), bytes.clone(), digest.clone());
            tokio::spawn(async move {
                host.component(&digest, || async move { Ok(Some(bytes)) })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().digest(), digest);
    }
    assert_eq!(host.compile_count(), 1);
    // And later calls are memory hits.
    host.component(&digest, || async { panic!("must not fetch") })
        .await
        .unwrap();
    assert_eq!(host.compile_count(), 1);
}

#[tokio::test]
async fn a_second_host_on_the_same_cache_dir_loads_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let with_dir = || HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..cfg()
    };
    let bytes = guest_bytes("echo");
    let first = Host::new(with_dir()).unwrap();
    let digest = first.admit(&bytes).unwrap().digest;
    first
        .component(&digest, || async move { Ok(Some(bytes)) })
        .await
        .unwrap();
    assert_eq!(first.compile_count(), 1);
    drop(first);

    let second = Host::new(with_dir()).unwrap();
    let echo = second
        .component(&digest, || async { panic!("must not fetch") })
        .await
        .unwrap();
    assert_eq!(second.compile_count(), 0);
    assert_eq!(second.disk_load_count(), 1);
    let r = second.run(request(&echo, "from disk", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("from disk".into()));
}

#[tokio::test]
async fn a_corrupt_cache_file_is_recompiled_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let with_dir = || HostConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..cfg()
    };
    let bytes = guest_bytes("echo");
    let first = Host::new(with_dir()).unwrap();
    let digest = first.admit(&bytes).unwrap().digest;
    let b = bytes.clone();
    first
        .component(&digest, || async move { Ok(Some(b)) })
        .await
        .unwrap();
    drop(first);
    let artifacts = walk(dir.path());
    assert!(
        !artifacts.is_empty(),
        "the first host cached nothing on disk"
    );
    for entry in &artifacts {
        std::fs::write(entry, b"not an artifact").unwrap();
    }
    let second = Host::new(with_dir()).unwrap();
    let echo = second
        .component(&digest, || async move { Ok(Some(bytes)) })
        .await
        .unwrap();
    assert_eq!(second.compile_count(), 1);
    assert_eq!(second.disk_load_count(), 0, "a corrupt artifact was loaded");
    for entry in walk(dir.path()) {
        assert_ne!(
            std::fs::read(&entry).unwrap(),
            b"not an artifact",
            "{} was left corrupt",
            entry.display()
        );
    }
    let r = second.run(request(&echo, "ok", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("ok".into()));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `n` functions of `locals` i64 locals, each live across 20 nested loops:
/// under the structural bounds, yet slow to compile.
fn slow_to_compile(n: usize, locals: usize) -> Vec<u8> {
    let mut m = String::from("(component (core module $slow ");
    for _ in 0..n {
        m.push_str("(func (param i32) (local");
        for _ in 0..locals {
            m.push_str(" i64");
        }
        m.push(')');
        for d in 0..20 {
            m.push_str(&format!("(loop $l{d} "));
        }
        for l in 1..=locals {
            m.push_str(&format!(
                "(local.set {l} (i64.add (local.get {l}) (i64.const 1)))"
            ));
        }
        for d in (0..20).rev() {
            m.push_str(&format!("(br_if $l{d} (local.get 0)))"));
        }
        m.push(')');
    }
    m.push_str(") (core instance (instantiate $slow)))");
    wat::parse_str(&m).unwrap()
}

/// 7.3: compilation runs in a child process bounded in time: what the
/// structural checks let through but takes too long is killed at the bound
/// and refused, and what compiles there runs like any other component.
#[tokio::test]
async fn the_compile_child_bounds_compile_time_and_its_artifacts_run() {
    let host = Host::new(HostConfig {
        compile_child: Some(CompileChild {
            exe: common::stack::bin(),
            timeout: Duration::from_secs(2),
            memory_bytes: 2 << 30,
        }),
        ..cfg()
    })
    .unwrap();
    let echo = load(&host, "echo").await;
    let r = host.run(request(&echo, "via child", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("via child".into()), "{}", r.log);

    let t0 = Instant::now();
    let m = refusal(&host, &slow_to_compile(24, 4_900));
    assert!(m.contains("longer than 2 s"), "{m}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());

    // What the compiler refuses comes back with the compiler's reason.
    let m = refusal(&host, &{
        let mut b = guest_bytes("echo");
        b.truncate(b.len() / 2);
        b
    });
    assert!(m.contains("invalid component"), "{m}");
}

/// 7.2: a full instance pool is the node's fault, not the guest's: the run
/// says `node_fault` (the worker hands such a job back uncharged).
#[tokio::test]
async fn an_exhausted_pool_is_a_node_fault() {
    let host = Arc::new(
        Host::new(HostConfig {
            max_instances: 1,
            ..cfg()
        })
        .unwrap(),
    );
    let sleeper = load(&host, "sleeper").await;
    let echo = load(&host, "echo").await;
    let mut hold = request(&sleeper, "20000", limits());
    let stop = hold.cancel.clone();
    hold.tenant = "holder".parse().unwrap();
    let h = host.clone();
    let holder = tokio::spawn(async move { h.run(hold).await });
    let t0 = Instant::now();
    while host.tenant_memory_in_use("holder") == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "holder never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = host.run(request(&echo, "x", limits())).await;
    let (kind, msg) = failed(&r);
    assert_eq!(kind, ErrorKind::NodeFault, "{msg}");
    stop.cancel();
    assert_eq!(holder.await.unwrap().outcome, RunOutcome::Interrupted);
    let r = host.run(request(&echo, "x", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("x".into()));
}

/// 7.4: a component the engine refuses is `Invalid` (final), and the refusal
/// is remembered: the next claim neither fetches nor compiles it again.
#[tokio::test]
async fn a_failed_compile_is_final_and_remembered() {
    let host = Host::new(cfg()).unwrap();
    let mut wat = String::from("(component (core module $m (memory 1))");
    for _ in 0..9 {
        wat.push_str("(core instance (instantiate $m))");
    }
    wat.push(')');
    let bytes = wat::parse_str(&wat).unwrap();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let r = host
        .component(&digest, || async move { Ok(Some(bytes)) })
        .await;
    match r {
        Err(HostError::Invalid(m)) => assert!(m.contains("memories"), "{m}"),
        Err(e) => panic!("expected Invalid, got {e}"),
        Ok(_) => panic!("compiled a component with 9 memories"),
    }
    let r = host
        .component(&digest, || async {
            panic!("fetched a known-bad component")
        })
        .await;
    assert!(matches!(r, Err(HostError::Invalid(_))));
    assert_eq!(host.compile_count(), 0);
}

/// `bytes` with a custom section appended that brings it to `total` bytes:
/// still a valid component, as large as asked.
fn padded(bytes: &[u8], total: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let name = b"padding";
    // id (1) + size (5, padded LEB) + name length (1) + name + payload.
    let payload = total - bytes.len() - 1 - 5 - 1 - name.len();
    let mut out = bytes.to_vec();
    out.push(0);
    let size = 1 + name.len() + payload;
    // Five-byte LEB so the header's length does not depend on the size.
    for i in 0..5 {
        let b = ((size >> (7 * i)) & 0x7f) as u8;
        out.push(if i < 4 { b | 0x80 } else { b });
    }
    leb(name.len(), &mut out);
    out.extend_from_slice(name);
    out.resize(total, 0);
    out
}

#[test]
fn the_component_size_bound_is_the_configured_one() {
    let echo = guest_bytes("echo");
    let big = padded(&echo, 40 << 20);
    assert_eq!(big.len(), 40 << 20);

    // Default bound (32 MiB): refused, and the message names the bound.
    let host = Host::new(cfg()).unwrap();
    let m = refusal(&host, &big);
    assert!(m.contains(&format!("at most {} bytes", 32 << 20)), "{m}");

    // Raised to 64 MiB: the same upload is admitted and runs (it used to
    // be refused by a bound hard-coded in admission, whatever the flag said).
    let host = Host::new(HostConfig {
        max_component_bytes: 64 << 20,
        ..cfg()
    })
    .unwrap();
    let a = host.admit(&big).expect("admitted under the raised bound");
    assert_eq!(a.size, big.len());

    // Still a bound: past it, refused with the configured number.
    let host = Host::new(HostConfig {
        max_component_bytes: 36 << 20,
        ..cfg()
    })
    .unwrap();
    let m = refusal(&host, &big);
    assert!(m.contains(&format!("at most {} bytes", 36 << 20)), "{m}");
}
