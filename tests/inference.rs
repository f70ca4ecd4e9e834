//! Models as node resources, through the public surface: a real worker
//! process loads a model file written here (random weights in a Llama
//! checkpoint's layout, nothing downloaded) with `--model`, tenants' agents
//! call it through `agentplane:agent/inference`, and the API shows what
//! every token cost.
//!
//! The model's tokenizer makes one token of each byte and it has no
//! end-of-text token, so the tests know every count in advance: a prompt of
//! n bytes is n tokens in, a completion is exactly its `max_tokens` out.

mod common;

use agentplane::control::Prices;
use agentplane::inference::random::{self, Shape};
use common::books::{amounts, ledger};
use common::stack::{Opts, Stack, WorkerProc, proc_opts, state};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// The documented slot-time and fuel part of a bill (README "Billing").
fn formula(p: &Prices, fuel: i64, wall_ms: i64) -> i64 {
    ceil_div(fuel * p.credits_per_mfuel as i64, 1_000_000)
        + ceil_div(wall_ms * p.credits_per_slot_second as i64, 1000)
}

/// [`formula`] of what `job` used (its fuel and wall time).
fn run_cost(p: &Prices, job: &Value) -> i64 {
    let used = |k: &str| job["usage"][k].as_i64().unwrap();
    formula(p, used("fuel"), used("wall_ms"))
}

/// `GET /v1/tenants/alice`, as the admin.
async fn alice_as_admin(s: &Stack) -> Value {
    let (st, info) = s
        .call(
            reqwest::Method::GET,
            "/v1/tenants/alice",
            Some(common::stack::ADMIN),
            None,
        )
        .await;
    assert_eq!(st, 200, "{info}");
    info
}

/// A worker process with `prices` as flags and `models` (name, directory
/// or URL) loaded, and `extra` flags.
fn worker(
    s: &Stack,
    prices: &Prices,
    slots: u32,
    models: &[(&str, &str)],
    extra: &[&str],
) -> WorkerProc {
    let mut flags: Vec<String> = vec![
        "--price-slot-second".into(),
        prices.credits_per_slot_second.to_string(),
        "--price-mfuel".into(),
        prices.credits_per_mfuel.to_string(),
    ];
    for (name, at) in models {
        flags.push("--model".into());
        flags.push(format!("{name}={at}"));
    }
    flags.extend(extra.iter().map(|f| f.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    WorkerProc::spawn_with(&s.url, slots, 1_000, &flags, &s.dir.join("worker.log"))
}

fn grant(model: &str, pin: u64, pout: u64) -> Value {
    json!({"model": model, "credits_per_1k_tokens_in": pin, "credits_per_1k_tokens_out": pout})
}

fn complete(model: &str, prompt: &str, max_tokens: u64) -> Value {
    json!({"complete": {"model": model, "prompt": prompt, "max_tokens": max_tokens}})
}

/// The answers an `infer` job gave, one per call.
fn answers(job: &Value) -> Vec<Value> {
    assert_eq!(state(job), "succeeded", "{job}");
    serde_json::from_str(job["output"].as_str().unwrap()).unwrap()
}

/// A stack whose slot-seconds cost 1,000 credits, its model written to
/// `<dir>/tiny`, and the tenant `alice` granted `tiny` at 3,000 and 7,000
/// credits per 1,000 tokens in and out (and `extra` grants), 100 tokens a
/// job; answers the stack, the prices, the model's directory and alice's
/// token.
async fn billing_stack(extra: &[Value]) -> (Stack, Prices, std::path::PathBuf, String) {
    let prices = Prices {
        credits_per_slot_second: 1000,
        ..Prices::default()
    };
    let s = Stack::start(Opts {
        prices,
        ..proc_opts()
    })
    .await;
    let dir = s.dir.join("tiny");
    random::write(&dir, Shape::TINY, 7).unwrap();
    let mut models = vec![grant("tiny", 3000, 7000)];
    models.extend_from_slice(extra);
    let alice = s
        .tenant_with(
            "alice",
            json!({"models": models, "max_tokens_per_job": 100}),
        )
        .await;
    (s, prices, dir, alice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_reserved_counted_and_billed_exactly() {
    let (s, prices, dir, alice) = billing_stack(&[grant("ghost", 1, 1)]).await;
    let bob = s.tenant("bob").await;
    let infer = s.push(&alice, "infer").await;
    let infer_bob = s.push(&bob, "infer").await;
    let w = worker(&s, &prices, 2, &[("tiny", dir.to_str().unwrap())], &[]);
    let (fuel, timeout) = (2_000_000i64, 20_000i64);

    // 11 + 5 tokens from the prompt "hello world" and two texts, 5 out.
    let input = json!({"calls": [
        complete("tiny", "hello world", 5),
        {"embed": {"model": "tiny", "texts": ["ab", "cde"]}},
        {"left": {}},
        {"models": {}},
    ]})
    .to_string();
    let id = s
        .submit(
            &alice,
            json!({"component": infer, "input": input, "fuel": fuel, "timeout_ms": timeout}),
        )
        .await;
    let job = s.wait_terminal(&alice, &id, 60).await;
    let a = answers(&job);
    assert_eq!(a[0]["ok"]["tokens_in"], 11, "{job}");
    assert_eq!(a[0]["ok"]["tokens_out"], 5, "{job}");
    assert_eq!(a[0]["ok"]["finish"], "length", "{job}");
    assert_eq!(a[1]["ok"]["count"], 2, "{job}");
    assert_eq!(a[1]["ok"]["dims"], Shape::TINY.hidden, "{job}");
    assert_eq!(a[2]["ok"], 100 - 21, "{job}");
    // `models` lists what this tenant may call here, at its prices: the
    // granted model this node lacks is not among them.
    let listed = a[3]["ok"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{job}");
    assert_eq!(listed[0]["name"], "tiny");
    assert_eq!(listed[0]["credits_per_1k_out"], 7000);
    assert_eq!(job["usage"]["tokens_in"], 16, "{job}");
    assert_eq!(job["usage"]["tokens_out"], 5, "{job}");
    // 16 × 3000 + 5 × 7000 thousandths: 83 credits for the tokens.
    let expected = run_cost(&prices, &job) + 83;
    assert_eq!(job["usage"]["credits"], expected, "{job}");
    // The reservation held the whole allowance at the dearest rate:
    // 100 tokens × 7000 / 1000.
    let l = ledger(&s.url, "alice").await;
    let reserve = formula(&prices, fuel, timeout) + 700;
    assert_eq!(amounts(&l, &id, "reserve"), vec![reserve], "{l:?}");
    assert_eq!(amounts(&l, &id, "settle"), vec![expected], "{l:?}");

    // A job's own allowance: 20 tokens. The second prompt no longer fits
    // and does not run; the third is cut to what is left.
    let input = json!({"calls": [
        complete("tiny", "hello world", 5),
        complete("tiny", "hello world", 5),
        complete("tiny", "hi", 10),
        {"left": {}},
    ]})
    .to_string();
    let id2 = s
        .submit(
            &alice,
            json!({"component": infer, "input": input, "max_tokens": 20, "fuel": fuel,
                   "timeout_ms": timeout}),
        )
        .await;
    let job2 = s.wait_terminal(&alice, &id2, 60).await;
    let a = answers(&job2);
    assert_eq!(a[0]["ok"]["tokens_out"], 5, "{job2}");
    assert_eq!(a[1]["err"]["kind"], "over_budget", "{job2}");
    assert_eq!(a[1]["err"]["detail"], 4, "{job2}");
    assert_eq!(a[2]["ok"]["tokens_in"], 2, "{job2}");
    assert_eq!(a[2]["ok"]["tokens_out"], 2, "{job2}");
    assert_eq!(a[2]["ok"]["finish"], "length", "{job2}");
    assert_eq!(a[3]["ok"], 0, "{job2}");
    assert_eq!(
        (&job2["usage"]["tokens_in"], &job2["usage"]["tokens_out"]),
        (&json!(13), &json!(7)),
        "{job2}"
    );
    // 13 × 3000 + 7 × 7000 = 88,000 thousandths.
    let expected2 = run_cost(&prices, &job2) + 88;
    assert_eq!(job2["usage"]["credits"], expected2, "{job2}");
    let l = ledger(&s.url, "alice").await;
    assert_eq!(
        amounts(&l, &id2, "reserve"),
        vec![formula(&prices, fuel, timeout) + 140],
        "{l:?}"
    );

    // A job may only lower the tenant's allowance.
    let (status, body) = s
        .call(
            reqwest::Method::POST,
            "/v1/jobs",
            Some(&alice),
            Some(json!({"component": infer, "input": "{}", "max_tokens": 101})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{body}"
    );

    // A model not granted is refused, whether or not the node has it; a
    // granted one the node lacks is unknown. Nothing runs, nothing is billed.
    let refused = json!({"calls": [
        complete("other", "hello", 5),
        complete("ghost", "hello", 5),
        {"embed": {"model": "other", "texts": ["x"]}},
    ]})
    .to_string();
    let id3 = s
        .submit(&alice, json!({"component": infer, "input": refused}))
        .await;
    let job3 = s.wait_terminal(&alice, &id3, 60).await;
    let a = answers(&job3);
    assert_eq!(a[0]["err"]["kind"], "not_allowed", "{job3}");
    assert_eq!(a[1]["err"]["kind"], "unknown_model", "{job3}");
    assert_eq!(a[2]["err"]["kind"], "not_allowed", "{job3}");
    assert_eq!(job3["usage"]["tokens_in"], 0, "{job3}");

    let input = json!({"calls": [complete("tiny", "hello", 5)]}).to_string();
    let id4 = s
        .submit(&bob, json!({"component": infer_bob, "input": input}))
        .await;
    let job4 = s.wait_terminal(&bob, &id4, 60).await;
    assert_eq!(answers(&job4)[0]["err"]["kind"], "not_allowed", "{job4}");
    assert_eq!(job4["usage"]["tokens_in"], 0, "{job4}");

    // The usage report adds the tokens up.
    let report = s
        .as_caller(&alice)
        .usage("alice", &Default::default())
        .await
        .unwrap();
    let report = serde_json::to_value(report).unwrap();
    assert_eq!(report["total"]["tokens_in"], 16 + 13, "{report}");
    assert_eq!(report["total"]["tokens_out"], 5 + 7, "{report}");
    drop(w);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_allowance_its_tenant_cannot_pay_is_refused_at_submission() {
    let s = Stack::start(proc_opts()).await;
    // 4096 tokens (the default allowance) at 500 per 1,000: 2,048 credits
    // held per attempt, more than carol has.
    let carol = s
        .tenant_with(
            "carol",
            json!({"credits": 2000, "models": [grant("tiny", 500, 500)],
                   "limits": {"fuel": 1000, "timeout_ms": 1}}),
        )
        .await;
    let infer = s.push(&carol, "infer").await;
    let echo = s.push(&carol, "echo").await;
    let (status, body) = s
        .call(
            reqwest::Method::POST,
            "/v1/jobs",
            Some(&carol),
            Some(json!({"component": infer, "input": "{}"})),
        )
        .await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_credits", "{body}");
    // A smaller allowance fits; an agent that calls no model holds none.
    for job in [
        json!({"component": infer, "input": "{}", "max_tokens": 100}),
        json!({"component": echo, "input": "x"}),
    ] {
        let (status, body) = s
            .call(reqwest::Method::POST, "/v1/jobs", Some(&carol), Some(job))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    s.stop().await;
}

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Submits `n` jobs of `component` at once and answers the highest RSS of
/// the worker until all of them ended, and whether they all ran at once
/// at some moment (the last one started before the first one finished).
async fn peak_rss_running(
    s: &Stack,
    token: &str,
    component: &str,
    pid: u32,
    n: usize,
) -> (u64, bool) {
    let input = json!({"calls": [complete("m", &"x".repeat(32), 48)]}).to_string();
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            s.submit(token, json!({"component": component, "input": input}))
                .await,
        );
    }
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        peak = peak.max(rss_of(pid));
        let mut ended = Vec::new();
        for id in &ids {
            let job = s.as_caller(token).job(id, None).await.unwrap();
            if job.state.is_terminal() {
                assert_eq!(job.state.as_str(), "succeeded", "{job:?}");
                ended.push(job);
            }
        }
        if ended.len() == n {
            // RFC 3339 times of one format order as text.
            let last_start = ended.iter().filter_map(|j| j.started_at.clone()).max();
            let first_end = ended.iter().filter_map(|j| j.finished_at.clone()).min();
            return (peak, last_start < first_end);
        }
        let done = ended.len();
        assert!(Instant::now() < deadline, "{done} of {n} jobs ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_instances_share_one_copy_of_the_model() {
    // About 64 MB of weights: large against what an instance holds.
    let shape = Shape {
        hidden: 512,
        layers: 6,
        heads: 8,
        intermediate: 1024,
        context: 256,
    };
    let s = Stack::start(proc_opts()).await;
    let dir = s.dir.join("m");
    random::write(&dir, shape, 3).unwrap();
    let token = s
        .tenant_with("t", json!({"models": [grant("m", 1, 1)]}))
        .await;
    let infer = s.push(&token, "infer").await;
    let w = worker(
        &s,
        &Prices::default(),
        16,
        &[("m", dir.to_str().unwrap())],
        &[],
    );
    let pid = w.child.id();

    // One run first: the worker is up, the model loaded, the component
    // compiled.
    peak_rss_running(&s, &token, &infer, pid, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_of(pid);
    let (one, _) = peak_rss_running(&s, &token, &infer, pid, 1).await;
    let (sixteen, together) = peak_rss_running(&s, &token, &infer, pid, 16).await;
    assert!(together, "the 16 jobs did not all run at once");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "model {:.1} MiB; worker RSS idle {:.1} MiB, 1 instance {:.1} MiB (+{:.1}), \
         16 instances {:.1} MiB (+{:.1})",
        mib(shape.bytes()),
        mib(idle),
        mib(one),
        mib(one.saturating_sub(idle)),
        mib(sixteen),
        mib(sixteen.saturating_sub(idle)),
    );
    // The model is resident once...
    assert!(
        idle > shape.bytes(),
        "idle {idle} < model {}",
        shape.bytes()
    );
    // ...and sixteen instances calling it at once add less than half of
    // one more copy: each holds its own key/value cache, not the weights.
    let growth = sixteen.saturating_sub(idle);
    assert!(
        growth < shape.bytes() / 2,
        "16 instances grew the worker by {growth} bytes, the model is {}",
        shape.bytes()
    );
    drop(w);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_behind_a_url_is_governed_and_billed_the_same_way() {
    let (s, prices, dir, alice) = billing_stack(&[]).await;
    let server = common::openai::ModelServer::start("tiny", &dir).await;
    let bob = s.tenant("bob").await;
    let infer = s.push(&alice, "infer").await;
    let infer_bob = s.push(&bob, "infer").await;
    let w = worker(&s, &prices, 2, &[("tiny", &server.url)], &[]);

    let input = json!({"calls": [
        complete("tiny", "hello world", 5),
        {"complete": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 3}},
        {"embed": {"model": "tiny", "texts": ["ab", "cde"]}},
        {"left": {}},
    ]})
    .to_string();
    let id = s
        .submit(&alice, json!({"component": infer, "input": input}))
        .await;
    let job = s.wait_terminal(&alice, &id, 60).await;
    let a = answers(&job);
    assert_eq!(a[0]["ok"]["tokens_in"], 11, "{job}");
    assert_eq!(a[0]["ok"]["tokens_out"], 5, "{job}");
    // The server renders the chat: "user: hi\nassistant:" is 19 bytes.
    assert_eq!(a[1]["ok"]["tokens_in"], 19, "{job}");
    assert_eq!(a[1]["ok"]["tokens_out"], 3, "{job}");
    assert_eq!(a[2]["ok"]["count"], 2, "{job}");
    assert_eq!(a[2]["ok"]["dims"], Shape::TINY.hidden, "{job}");
    assert_eq!(a[3]["ok"], 100 - 16 - 22 - 5, "{job}");
    assert_eq!(server.requests(), 3);
    assert_eq!(
        (&job["usage"]["tokens_in"], &job["usage"]["tokens_out"]),
        (&json!(35), &json!(8)),
        "{job}"
    );
    // 35 × 3000 + 8 × 7000 thousandths.
    assert_eq!(
        job["usage"]["credits"],
        run_cost(&prices, &job) + 161,
        "{job}"
    );

    // Over budget and not allowed: refused here, never sent.
    let input = json!({"calls": [complete("tiny", &"y".repeat(200), 5)]}).to_string();
    let id = s
        .submit(&alice, json!({"component": infer, "input": input}))
        .await;
    let job = s.wait_terminal(&alice, &id, 60).await;
    assert_eq!(answers(&job)[0]["err"]["kind"], "over_budget", "{job}");
    let input = json!({"calls": [complete("tiny", "hello", 5)]}).to_string();
    let id = s
        .submit(&bob, json!({"component": infer_bob, "input": input}))
        .await;
    let job = s.wait_terminal(&bob, &id, 60).await;
    assert_eq!(answers(&job)[0]["err"]["kind"], "not_allowed", "{job}");
    assert_eq!(server.requests(), 3, "refused calls never reach the server");

    // A server that answers 20 MiB: the host stops reading at 16 and the
    // call fails as a value, billed nothing.
    server.answer_huge(20);
    let input = json!({"calls": [complete("tiny", "hello", 5)]}).to_string();
    let id = s
        .submit(&alice, json!({"component": infer, "input": input}))
        .await;
    let job = s.wait_terminal(&alice, &id, 60).await;
    let a = answers(&job);
    assert_eq!(a[0]["err"]["kind"], "failed", "{job}");
    assert!(
        a[0]["err"]["detail"].as_str().unwrap().contains("bytes"),
        "{job}"
    );
    assert_eq!(job["usage"]["tokens_in"], 0, "{job}");
    drop(w);
    s.stop().await;
}

#[test]
fn random_model_writes_a_model_a_worker_loads_and_bad_models_stop_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let out = std::process::Command::new(common::stack::bin())
        .args(["random-model", model.to_str().unwrap(), "--hidden", "32"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let shape = Shape {
        hidden: 32,
        intermediate: 64,
        ..Shape::TINY
    };
    assert_eq!(printed["bytes"], shape.bytes());
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(model.join(f).exists(), "{f}");
    }
    // The safetensors file holds exactly the weights the shape counts
    // (its JSON header aside).
    let size = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        size >= shape.bytes() && size < shape.bytes() + 8192,
        "{size}"
    );

    // A worker refuses a malformed flag (usage, 2) and a model that does
    // not load (1), saying why, before it claims anything.
    let worker = |flag: &str| {
        std::process::Command::new(common::stack::bin())
            .args(["worker", "--redis", "redis://127.0.0.1:1", "--model", flag])
            .output()
            .unwrap()
    };
    let out = worker("no-equals-sign");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NAME=PATH"),
        "{out:?}"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = worker(&format!("m={}", empty.display()));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loading model `m`") && err.contains("config.json"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rag_example_retrieves_then_asks_the_model_and_the_worker_counts_it() {
    let (s, prices, dir, alice) = billing_stack(&[]).await;
    let (st, ctx) = s
        .post(
            "/v1/contexts",
            &alice,
            json!({"name": "docs", "tools": [], "documents": [
                {"id": "billing", "text": "jobs are billed for fuel and slot time"},
                {"id": "leases", "text": "a lease expires when its worker dies"},
                {"id": "secrets", "text": "secrets are sealed before they reach redis"},
            ]}),
        )
        .await;
    assert_eq!(st, 201, "{ctx}");
    let rag = s.push(&alice, "rag-ask").await;
    // The passages make a prompt of a few hundred tokens: the admin raises
    // alice's allowance, and the grants stay as they were.
    let (st, body) = s
        .call(
            reqwest::Method::PATCH,
            "/v1/tenants/alice",
            Some(common::stack::ADMIN),
            Some(json!({"max_tokens_per_job": 1000})),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let info = alice_as_admin(&s).await;
    assert_eq!(info["max_tokens_per_job"], 1000, "{info}");
    assert_eq!(info["models"][0]["model"], "tiny", "{info}");
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let w = worker(
        &s,
        &prices,
        2,
        &[("tiny", dir.to_str().unwrap())],
        &["--metrics-listen", &addr],
    );
    let question = json!({"question": "how are jobs billed", "model": "tiny", "k": 2,
                          "max_tokens": 8})
    .to_string();
    let id = s
        .submit(
            &alice,
            json!({"component": rag, "input": question, "contexts": ["docs"]}),
        )
        .await;
    let job = s.wait_terminal(&alice, &id, 60).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    let out: Value = serde_json::from_str(job["output"].as_str().unwrap()).unwrap();
    assert_eq!(out["sources"][0], "billing", "{out}");
    assert_eq!(out["tokens_out"], 8, "{out}");
    // The prompt carries the passages it found: their bytes are its
    // tokens, all of them billed.
    let tokens_in = out["tokens_in"].as_u64().unwrap();
    assert!(
        tokens_in > "jobs are billed for fuel and slot time".len() as u64,
        "{out}"
    );
    assert_eq!(job["usage"]["tokens_in"], tokens_in, "{job}");
    assert_eq!(job["usage"]["tokens_out"], 8, "{job}");

    let page = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = |direction: &str| {
        page.lines()
            .find(|l| {
                l.starts_with("agentplane_inference_tokens_total{")
                    && l.contains("tenant=\"alice\"")
                    && l.contains("model=\"tiny\"")
                    && l.contains(&format!("direction=\"{direction}\""))
            })
            .unwrap_or_else(|| panic!("no {direction} tokens in:\n{page}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(line("in"), tokens_in);
    assert_eq!(line("out"), 8);
    assert!(
        page.lines()
            .any(|l| l.starts_with("agentplane_inference_calls_total{")
                && l.contains("outcome=\"ok\"")),
        "{page}"
    );
    drop(w);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_admin_grants_models_and_bad_grants_change_nothing() {
    let (s, _, _, alice) = billing_stack(&[]).await;
    let patch = |token: String, body: Value| {
        let s = &s;
        async move {
            s.call(
                reqwest::Method::PATCH,
                "/v1/tenants/alice",
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let admin = common::stack::ADMIN.to_string();
    // A tenant cannot grant itself a model, or a cheaper price.
    let (st, body) = patch(alice.clone(), json!({"models": [grant("tiny", 0, 0)]})).await;
    assert_eq!(st, 403, "{body}");
    for (bad, why) in [
        (json!({"models": [grant("a b", 1, 1)]}), "model name"),
        (
            json!({"models": [grant("x", 1, 1), grant("x", 2, 2)]}),
            "twice",
        ),
        (json!({"models": [grant("x", 100_000_001, 1)]}), "price"),
        (
            json!({"max_tokens_per_job": 10_000_001}),
            "max_tokens_per_job",
        ),
        (
            json!({"models": [{"model": "x", "credits_per_1k_tokens_in": -1}]}),
            "models",
        ),
    ] {
        let (st, body) = patch(admin.clone(), bad.clone()).await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{bad}: {message}");
    }
    let info = alice_as_admin(&s).await;
    assert_eq!(info["models"], json!([grant("tiny", 3000, 7000)]), "{info}");
    assert_eq!(info["max_tokens_per_job"], 100, "{info}");
    // `[]` takes every grant back.
    let (st, body) = patch(admin.clone(), json!({"models": []})).await;
    assert_eq!(st, 200, "{body}");
    let info = alice_as_admin(&s).await;
    assert_eq!(info["models"], json!([]), "{info}");
    s.stop().await;
}
