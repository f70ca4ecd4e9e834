//! Exact billing numbers, computed by hand from the documented formula
//! (README "Billing"):
//!
//! ```text
//! credits = ceil(fuel × price_mfuel / 10^6)
//!         + ceil(wall_ms × (price_slot × (1 + gpus × gpu_weight) + gpus × price_gpu) / 1000)
//! ```
//!
//! plus, for an agent that can make outgoing HTTP requests,
//!
//! ```text
//!           requests × price_http_request + ceil(bytes / 1024) × price_http_kib
//! ```
//!
//! reserved at CLAIM with all the job's fuel and its whole timeout (and the
//! whole egress budget), and settled at FINALIZE never above that
//! reservation. Each test runs a real
//! worker process given non-default prices as flags (the API gets the same
//! ones) and checks the job's usage, the ledger's reserve and settle entries
//! and the tenant's balance against the hand-computed figures.

mod common;

use agentplane::control::{EgressBudget, LedgerEntry, Prices};
use common::books::amounts;
use common::stack::{Opts, Stack, WorkerProc, proc_opts, state};
use serde_json::{Value, json};

const GRANTED: i64 = 1_000_000_000;

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// The documented formula, written out again here (not the crate's).
fn formula(p: &Prices, fuel: i64, wall_ms: i64, gpus: i64) -> i64 {
    let per_second = p.credits_per_slot_second as i64 * (1 + gpus * p.gpu_slot_weight as i64)
        + gpus * p.credits_per_gpu_second as i64;
    ceil_div(fuel * p.credits_per_mfuel as i64, 1_000_000) + ceil_div(wall_ms * per_second, 1000)
}

fn stack_opts(prices: Prices) -> Opts {
    Opts {
        prices,
        ..proc_opts()
    }
}

/// A worker process with `prices` (and the default egress budget) as flags.
fn worker(s: &Stack, prices: &Prices, gpus: u32) -> WorkerProc {
    worker_with(s, prices, &EgressBudget::default(), gpus)
}

fn worker_with(s: &Stack, prices: &Prices, egress: &EgressBudget, gpus: u32) -> WorkerProc {
    let flags: Vec<String> = vec![
        "--price-http-request".into(),
        prices.credits_per_http_request.to_string(),
        "--price-http-kib".into(),
        prices.credits_per_http_kib.to_string(),
        "--egress-requests-per-job".into(),
        egress.requests_per_job.to_string(),
        "--egress-kib-per-job".into(),
        egress.kib_per_job.to_string(),
        "--price-slot-second".into(),
        prices.credits_per_slot_second.to_string(),
        "--price-gpu-second".into(),
        prices.credits_per_gpu_second.to_string(),
        "--price-mfuel".into(),
        prices.credits_per_mfuel.to_string(),
        "--gpu-slot-weight".into(),
        prices.gpu_slot_weight.to_string(),
        "--gpus".into(),
        gpus.to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    WorkerProc::spawn_with(&s.url, 2, 1_000, &flags, &s.dir.join("worker.log"))
}

async fn ledger(s: &Stack, tenant: &str) -> Vec<LedgerEntry> {
    common::books::ledger(&s.url, tenant).await
}

/// What each of `job`'s settles handed back of its reservation.
fn released(l: &[LedgerEntry], job: &str) -> Vec<i64> {
    l.iter()
        .filter(|e| e.job == job && e.op == "settle")
        .map(|e| e.released)
        .collect()
}

fn usage(job: &Value) -> (i64, i64, i64) {
    (
        job["usage"]["fuel"].as_i64().unwrap(),
        job["usage"]["wall_ms"].as_i64().unwrap(),
        job["usage"]["credits"].as_i64().unwrap(),
    )
}

/// The balance is what was granted less the sum of the settle entries,
/// and nothing stays reserved.
async fn assert_balance(s: &Stack, tenant: &str, settled: i64) {
    let t = s.tenant_info(tenant).await;
    assert_eq!(t["credits"]["balance"], GRANTED - settled, "{t}");
    assert_eq!(t["credits"]["reserved"], 0, "{t}");
    assert_eq!(t["settled"], settled, "{t}");
    let l = ledger(s, tenant).await;
    let sum: i64 = l
        .iter()
        .filter(|e| e.op == "settle")
        .map(|e| e.amount)
        .sum();
    assert_eq!(sum, settled, "{l:?}");
}

/// `--price-slot-second 1000`: a run that ends in time pays the formula
/// exactly; a run stopped at its timeout ran past its reservation (its wall
/// time includes loading the component) and pays exactly the reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slot_price_is_exact_and_the_charge_is_capped_at_the_reservation() {
    let prices = Prices {
        credits_per_slot_second: 1000,
        ..Prices::default()
    };
    let s = Stack::start(stack_opts(prices)).await;
    let token = s.tenant("acme").await;
    let sleeper = s.push(&token, "sleeper").await;
    let w = worker(&s, &prices, 0);

    // In time: 300 ms of sleep in a 5 s timeout, 2M fuel.
    let (fuel, timeout) = (2_000_000i64, 5_000i64);
    let ok = s
        .submit(
            &token,
            json!({"component": sleeper, "input": "300", "fuel": fuel, "timeout_ms": timeout}),
        )
        .await;
    let job = s.wait_terminal(&token, &ok, 30).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    let (f, wall, credits) = usage(&job);
    assert!(wall >= 300, "{job}");
    let expected = formula(&prices, f, wall, 0);
    // By hand: ceil(f / 10^6) + wall × 1000 / 1000.
    assert_eq!(expected, ceil_div(f, 1_000_000) + wall);
    assert_eq!(credits, expected, "{job}");
    let l = ledger(&s, "acme").await;
    // Reserved: 2M fuel = 2 credits, 5 s at 1000 per second = 5000.
    assert_eq!(amounts(&l, &ok, "reserve"), vec![2 + 5_000], "{l:?}");
    assert_eq!(amounts(&l, &ok, "settle"), vec![expected], "{l:?}");
    // One entry ends the run: the settle carries the unused rest.
    assert_eq!(released(&l, &ok), vec![5_002 - expected], "{l:?}");
    assert!(amounts(&l, &ok, "release").is_empty(), "{l:?}");

    // Past its timeout: 1M fuel, 1 s timeout; reservation 1 + 1000.
    let capped = s
        .submit(
            &token,
            json!({"component": sleeper, "input": "60000", "fuel": 1_000_000, "timeout_ms": 1_000,
                   "max_attempts": 1}),
        )
        .await;
    let job = s.wait_terminal(&token, &capped, 30).await;
    assert_eq!(job["error"]["kind"], "timeout", "{job}");
    let (f, wall, credits) = usage(&job);
    assert!(
        wall > 1_000,
        "the wall time runs from the claim, so past the timeout: {job}"
    );
    assert!(
        formula(&prices, f, wall, 0) > 1_001,
        "uncapped it would be more: {job}"
    );
    assert_eq!(credits, 1_001, "capped at the reservation: {job}");
    let l = ledger(&s, "acme").await;
    assert_eq!(amounts(&l, &capped, "reserve"), vec![1_001], "{l:?}");
    assert_eq!(amounts(&l, &capped, "settle"), vec![1_001], "{l:?}");
    assert!(amounts(&l, &capped, "release").is_empty(), "{l:?}");
    assert_eq!(released(&l, &capped), vec![0], "{l:?}");

    assert_balance(&s, "acme", expected + 1_001).await;
    drop(w);
    s.stop().await;
}

/// A GPU job pays its slot at the weight of 1 + gpus × gpu_weight slots,
/// plus the GPU-seconds: with `--price-slot-second 3`, `--gpu-slot-weight
/// 10`, `--price-gpu-second 100` and 2 GPUs, (3 × 21 + 200) = 263 credits
/// per second of wall time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gpu_wall_time_is_priced_per_gpu_and_by_the_slot_weight() {
    let prices = Prices {
        credits_per_slot_second: 3,
        credits_per_gpu_second: 100,
        gpu_slot_weight: 10,
        credits_per_mfuel: 1,
        ..Prices::default()
    };
    let s = Stack::start(stack_opts(prices)).await;
    let token = s.tenant_with("acme", json!({"max_gpus": 2})).await;
    let sleeper = s.push(&token, "sleeper").await;
    let w = worker(&s, &prices, 2);
    let id = s
        .submit(
            &token,
            json!({"component": sleeper, "input": "400", "gpus": 2, "fuel": 3_000_000,
                   "timeout_ms": 10_000}),
        )
        .await;
    let job = s.wait_terminal(&token, &id, 30).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    let (f, wall, credits) = usage(&job);
    assert!(wall >= 400, "{job}");
    let expected = ceil_div(f, 1_000_000) + ceil_div(wall * 263, 1000);
    assert_eq!(formula(&prices, f, wall, 2), expected);
    assert_eq!(credits, expected, "{job}");
    let l = ledger(&s, "acme").await;
    // 3M fuel = 3, 10 s × 263 = 2630.
    assert_eq!(amounts(&l, &id, "reserve"), vec![3 + 2_630], "{l:?}");
    assert_eq!(amounts(&l, &id, "settle"), vec![expected], "{l:?}");
    assert_balance(&s, "acme", expected).await;

    // A CPU job of the same tenant on the same worker pays the plain slot.
    let cpu = s
        .submit(&token, json!({"component": sleeper, "input": "100"}))
        .await;
    let job = s.wait_terminal(&token, &cpu, 30).await;
    let (f, wall, credits) = usage(&job);
    assert_eq!(
        credits,
        ceil_div(f, 1_000_000) + ceil_div(wall * 3, 1000),
        "{job}"
    );
    assert_balance(&s, "acme", expected + credits).await;
    drop(w);
    s.stop().await;
}

/// Outgoing HTTP requests: a job of an agent that can make them reserves
/// the price of the whole egress budget with its fuel and time, and pays
/// for the requests it sent and their bytes, exactly; one that cannot
/// reserves nothing for them; a job that runs out of its byte budget is
/// stopped there and pays for what it used, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outgoing_requests_are_reserved_and_billed_exactly() {
    let up = common::upstream::Upstream::start().await;
    let prices = Prices {
        credits_per_slot_second: 1000,
        credits_per_http_request: 5,
        credits_per_http_kib: 2,
        ..Prices::default()
    };
    let egress = EgressBudget {
        requests_per_job: 4,
        kib_per_job: 32,
    };
    let s = Stack::start(Opts {
        egress,
        ..stack_opts(prices)
    })
    .await;
    let token = s
        .tenant_with("acme", json!({"allowed_outbound_hosts": [up.base()]}))
        .await;
    let fetch = s.push(&token, "fetch").await;
    let echo = s.push(&token, "echo").await;
    let w = worker_with(&s, &prices, &egress, 0);
    let (fuel, timeout) = (2_000_000i64, 5_000i64);
    // The egress budget's price: 4 requests and 32 KiB.
    let http_reserve = 4 * 5 + 32 * 2;

    let hello = json!({"url": format!("{}/hello", up.base()), "repeat": 2}).to_string();
    let two = s
        .submit(
            &token,
            json!({"component": fetch, "input": hello, "fuel": fuel, "timeout_ms": timeout}),
        )
        .await;
    let job = s.wait_terminal(&token, &two, 30).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    let (f, wall, credits) = usage(&job);
    let requests = job["usage"]["http_requests"].as_i64().unwrap();
    let bytes = job["usage"]["http_bytes"].as_i64().unwrap();
    assert_eq!(requests, 2, "{job}");
    assert!(bytes > 0 && bytes < 2048, "two short exchanges: {job}");
    let expected = formula(&prices, f, wall, 0) + 2 * 5 + ceil_div(bytes, 1024) * 2;
    assert_eq!(credits, expected, "{job}");
    let l = ledger(&s, "acme").await;
    assert_eq!(
        amounts(&l, &two, "reserve"),
        vec![2 + 5_000 + http_reserve],
        "{l:?}"
    );
    assert_eq!(amounts(&l, &two, "settle"), vec![expected], "{l:?}");
    assert_eq!(
        released(&l, &two),
        vec![2 + 5_000 + http_reserve - expected],
        "{l:?}"
    );

    // An agent that cannot make requests reserves nothing for them.
    let plain = s
        .submit(
            &token,
            json!({"component": echo, "input": "x", "fuel": fuel, "timeout_ms": timeout}),
        )
        .await;
    let job = s.wait_terminal(&token, &plain, 30).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(job["usage"]["http_requests"], 0, "{job}");
    let (f2, wall2, credits2) = usage(&job);
    assert_eq!(credits2, formula(&prices, f2, wall2, 0), "{job}");
    let l = ledger(&s, "acme").await;
    assert_eq!(amounts(&l, &plain, "reserve"), vec![2 + 5_000], "{l:?}");

    // 1 MiB asked for, 32 KiB granted: stopped at the budget, and billed
    // for the bytes it took, which never pass it.
    let huge = json!({"url": format!("{}/huge?mib=1", up.base())}).to_string();
    let big = s
        .submit(
            &token,
            json!({"component": fetch, "input": huge, "fuel": fuel, "timeout_ms": timeout,
                   "max_attempts": 1}),
        )
        .await;
    let job = s.wait_terminal(&token, &big, 30).await;
    assert_eq!(job["error"]["kind"], "agent_error", "{job}");
    let (f3, wall3, credits3) = usage(&job);
    let bytes3 = job["usage"]["http_bytes"].as_i64().unwrap();
    assert!(bytes3 > 16 << 10 && bytes3 <= 32 << 10, "{job}");
    assert_eq!(job["usage"]["http_requests"], 1, "{job}");
    let expected3 = formula(&prices, f3, wall3, 0) + 5 + ceil_div(bytes3, 1024) * 2;
    assert_eq!(credits3, expected3, "{job}");

    // The usage report counts them too.
    let report = s
        .as_caller(&token)
        .usage("acme", &Default::default())
        .await
        .unwrap();
    let report = serde_json::to_value(report).unwrap();
    assert_eq!(report["total"]["http_requests"], 3, "{report}");
    assert_eq!(report["total"]["http_bytes"], bytes + bytes3, "{report}");

    assert_balance(&s, "acme", expected + credits2 + expected3).await;
    drop(w);
    s.stop().await;
}
