//! The node's model shared by tenants, at the host: one tenant's long
//! generations cannot hold the model from another's, and a call that
//! outlives its job's wall clock ends the job as `timeout` and stops
//! costing the model.

mod common;

use agentplane::host::{Host, HostConfig, InferenceGrant, RunOutcome, RunReport};
use agentplane::inference::ModelSpec;
use agentplane::inference::random::{self, Shape};
use agentplane::model::ErrorKind;
use agentplane::model::grants::ModelGrant;
use common::host::{limits, load, request};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model slow enough that a few hundred tokens take seconds.
const SHAPE: Shape = Shape::SMALL;

fn host(dir: &std::path::Path) -> Arc<Host> {
    Arc::new(
        Host::new(HostConfig {
            max_instances: 32,
            models: vec![ModelSpec::dir("m", dir.to_path_buf())],
            ..HostConfig::default()
        })
        .unwrap(),
    )
}

fn grant(max_tokens: u64) -> InferenceGrant {
    InferenceGrant {
        models: Arc::new(vec![ModelGrant {
            model: "m".into(),
            credits_per_1k_tokens_in: 1,
            credits_per_1k_tokens_out: 1,
        }]),
        max_tokens,
        weight: 1,
    }
}

fn completion(max_tokens: u64) -> String {
    json!({"calls": [{"complete": {"model": "m", "prompt": "once upon a time",
                                    "max_tokens": max_tokens}}]})
    .to_string()
}

fn output(r: &RunReport) -> Value {
    match &r.outcome {
        RunOutcome::Ok(out) => serde_json::from_str(out).unwrap(),
        other => panic!("expected success, got {other:?}; log:\n{}", r.log),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_long_generations_cannot_hold_the_model() {
    let dir = tempfile::tempdir().unwrap();
    random::write(dir.path(), SHAPE, 1).unwrap();
    let host = host(dir.path());
    let infer = load(&host, "infer").await;
    let started = Instant::now();
    // The hog: four long generations at once.
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let (host, infer) = (host.clone(), infer.clone());
        hogs.push(tokio::spawn(async move {
            let req = agentplane::host::RunRequest {
                inference: grant(10_000),
                ..request("hog", &infer, &completion(900), limits())
            };
            let r = host.run(req).await;
            (output(&r), started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another tenant's short call, once the hog's are under way.
    let req = agentplane::host::RunRequest {
        inference: grant(10_000),
        ..request("light", &infer, &completion(8), limits())
    };
    let light_start = started.elapsed();
    let light = host.run(req).await;
    let light_done = started.elapsed();
    assert_eq!(output(&light)[0]["ok"]["tokens_out"], 8);
    let mut first_hog = Duration::MAX;
    for h in hogs {
        let (out, at) = h.await.unwrap();
        assert_eq!(out[0]["ok"]["tokens_out"], 900, "{out}");
        first_hog = first_hog.min(at);
    }
    let waited = light_done - light_start;
    println!(
        "light started at {light_start:?}, done at {light_done:?} ({waited:?}); \
         first hog done at {first_hog:?}"
    );
    // Served in turn: the short call is answered in a few of the hog's
    // turns, long before the generations queued ahead of it end.
    assert!(
        waited * 5 < first_hog - light_start,
        "light waited {waited:?}; the first hog ended {:?} after it started",
        first_hog - light_start
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_past_the_jobs_deadline_ends_it_and_frees_the_model() {
    let dir = tempfile::tempdir().unwrap();
    // A context long enough that the generation asked for takes many
    // seconds, whatever the machine.
    let shape = Shape {
        context: 4096,
        ..SHAPE
    };
    random::write(dir.path(), shape, 2).unwrap();
    let host = host(dir.path());
    let infer = load(&host, "infer").await;
    let mut l = limits();
    l.timeout_ms = 1_000;
    let req = agentplane::host::RunRequest {
        inference: grant(100_000),
        ..request("t", &infer, &completion(4000), l)
    };
    let t0 = Instant::now();
    let r = host.run(req).await;
    let took = t0.elapsed();
    match &r.outcome {
        RunOutcome::Failed { kind, .. } => assert_eq!(*kind, ErrorKind::Timeout, "{r:?}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(took < Duration::from_millis(2_500), "{took:?}");
    // A call that never answered bills nothing.
    assert_eq!(r.tokens.tokens(), 0, "{r:?}");
    // The abandoned generation stopped: the next call is served at once.
    let t1 = Instant::now();
    let req = agentplane::host::RunRequest {
        inference: grant(100_000),
        ..request("t", &infer, &completion(4), limits())
    };
    let r = host.run(req).await;
    assert_eq!(output(&r)[0]["ok"]["tokens_out"], 4);
    assert!(t1.elapsed() < Duration::from_secs(1), "{:?}", t1.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_of_0_1_0_still_run_and_cannot_ask_for_inference_there() {
    let dir = tempfile::tempdir().unwrap();
    random::write(dir.path(), Shape::TINY, 3).unwrap();
    let host = host(dir.path());
    // A component that imports `state` at 0.1.0 is served by 0.1.1's.
    let v010 = wat::parse_str(
        r#"(component
  (import "agentplane:agent/state@0.1.0" (instance $state
    (export "get" (func (result (option (list u8)))))))
  (core module $m
    (memory (export "memory") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "run") (param i32 i32) (result i32)
      (i32.store (i32.const 0) (i32.const 0))
      (i32.store (i32.const 4) (i32.const 16))
      (i32.store (i32.const 8) (i32.const 2))
      (i32.const 0))
    (data (i32.const 16) "ok"))
  (core instance $i (instantiate $m))
  (func (export "run") (param "input" string) (result (result string (error string)))
    (canon lift (core func $i "run") (memory (core memory $i "memory"))
      (realloc (core func $i "realloc")))))"#,
    )
    .unwrap();
    let c = common::host::load_bytes(&host, v010).await;
    let r = host.run(request("t", &c, "x", limits())).await;
    assert_eq!(r.outcome, RunOutcome::Ok("ok".into()), "{r:?}");
    // `inference` did not exist at 0.1.0: asking for it there is refused
    // at upload, with the reason.
    let bad = wat::parse_str(
        r#"(component
  (import "agentplane:agent/inference@0.1.0" (instance $i
    (export "tokens-left" (func (result u64)))))
  (core module $m
    (memory (export "memory") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "run") (param i32 i32) (result i32) (i32.const 0)))
  (core instance $c (instantiate $m))
  (func (export "run") (param "input" string) (result (result string (error string)))
    (canon lift (core func $c "run") (memory (core memory $c "memory"))
      (realloc (core func $c "realloc")))))"#,
    )
    .unwrap();
    let e = host.admit(&bad).unwrap_err().to_string();
    assert!(e.contains("agentplane:agent/inference@0.1.0"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenizing_is_paid_in_fuel_before_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    random::write(dir.path(), Shape::TINY, 4).unwrap();
    let host = host(dir.path());
    let infer = load(&host, "infer").await;
    // 200 KiB of prompt at 64 fuel a byte is 13 Mfuel: more than the job
    // has, so the tokenizer never runs, however small its allowance.
    let prompt = "a".repeat(200 << 10);
    let input = json!({"calls": [{"complete": {"model": "m", "prompt": prompt, "max_tokens": 1}}]})
        .to_string();
    let mut l = limits();
    l.fuel = 5_000_000;
    let req = agentplane::host::RunRequest {
        inference: grant(10),
        ..request("t", &infer, &input, l)
    };
    let r = host.run(req).await;
    match &r.outcome {
        RunOutcome::Failed { kind, .. } => assert_eq!(*kind, ErrorKind::FuelExhausted, "{r:?}"),
        other => panic!("expected fuel_exhausted, got {other:?}"),
    }
    assert_eq!(r.fuel_used, 5_000_000);
    assert_eq!(r.tokens.tokens(), 0);
    // With the fuel to pay for it, the same prompt is tokenized and found
    // too long for the job's 10 tokens: a value, nothing billed.
    let req = agentplane::host::RunRequest {
        inference: grant(10),
        ..request("t", &infer, &input, limits())
    };
    let r = host.run(req).await;
    assert_eq!(output(&r)[0]["err"]["kind"], "too_long", "{r:?}");
    assert_eq!(r.tokens.tokens(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenant_holds_at_most_a_quarter_of_a_model_servers_places() {
    let dir = tempfile::tempdir().unwrap();
    random::write(dir.path(), Shape::TINY, 5).unwrap();
    let server = common::openai::ModelServer::start("m", dir.path()).await;
    let host = Arc::new(
        Host::new(HostConfig {
            max_instances: 32,
            models: vec![ModelSpec {
                name: "m".into(),
                source: agentplane::inference::Source::Url(server.url.clone()),
            }],
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let infer = load(&host, "infer").await;
    let run_all = |tenants: Vec<&'static str>| {
        let (host, infer) = (host.clone(), infer.clone());
        async move {
            let runs: Vec<_> = tenants
                .into_iter()
                .map(|t| {
                    let (host, infer) = (host.clone(), infer.clone());
                    tokio::spawn(async move {
                        let req = agentplane::host::RunRequest {
                            inference: grant(10_000),
                            ..request(t, &infer, &completion(100), limits())
                        };
                        host.run(req).await
                    })
                })
                .collect();
            for r in runs {
                let r = r.await.unwrap();
                assert_eq!(output(&r)[0]["ok"]["tokens_out"], 100, "{r:?}");
            }
        }
    };
    // Eight calls of one tenant at once: four reach the server, the rest
    // wait on this node.
    run_all(vec!["hog"; 8]).await;
    assert_eq!(server.take_most_in_flight(), 4);
    // Another tenant's call meanwhile has places of its own.
    let mut both = vec!["hog"; 8];
    both.push("light");
    run_all(both).await;
    assert_eq!(server.take_most_in_flight(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_share_the_model_by_their_weights() {
    let dir = tempfile::tempdir().unwrap();
    random::write(dir.path(), SHAPE, 6).unwrap();
    let host = host(dir.path());
    let infer = load(&host, "infer").await;
    // Two tenants, one long generation each, started together: the one of
    // weight 3 gets three turns' tokens for each of the other's, so it is
    // done when the other is about a third of the way.
    let started = Instant::now();
    let runs: Vec<_> = [("heavy", 3), ("light", 1)]
        .into_iter()
        .map(|(tenant, weight)| {
            let (host, infer) = (host.clone(), infer.clone());
            tokio::spawn(async move {
                let req = agentplane::host::RunRequest {
                    inference: InferenceGrant {
                        weight,
                        ..grant(10_000)
                    },
                    ..request(tenant, &infer, &completion(600), limits())
                };
                let r = host.run(req).await;
                assert_eq!(output(&r)[0]["ok"]["tokens_out"], 600, "{r:?}");
                started.elapsed()
            })
        })
        .collect();
    let mut done = Vec::new();
    for r in runs {
        done.push(r.await.unwrap());
    }
    let (heavy, light) = (done[0], done[1]);
    println!("weight 3 done at {heavy:?}, weight 1 at {light:?}");
    // Evenly shared, both would end together; by weight, the heavy one
    // ends at about 800 of the 1,200 tokens, two thirds of the time.
    assert!(
        heavy.as_secs_f64() < 0.8 * light.as_secs_f64(),
        "weight 3 done at {heavy:?}, weight 1 at {light:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_calls_key_value_cache_is_paid_from_its_tenants_node_memory() {
    let dir = tempfile::tempdir().unwrap();
    random::write(dir.path(), SHAPE, 7).unwrap();
    // 8 KiB of cache a token (2 × 4 layers × 256 wide × 4 bytes); the
    // tenant may hold 6 MiB on the node, its instance included.
    let host = Arc::new(
        Host::new(HostConfig {
            max_instances: 8,
            tenant_memory_budget: 6 << 20,
            models: vec![ModelSpec::dir("m", dir.path().to_path_buf())],
            ..HostConfig::default()
        })
        .unwrap(),
    );
    let infer = load(&host, "infer").await;
    let run = |max_tokens: u64| {
        let req = agentplane::host::RunRequest {
            inference: grant(10_000),
            ..request("t", &infer, &completion(max_tokens), limits())
        };
        host.run(req)
    };
    // About 8 MiB of cache: refused before it runs, nothing billed.
    let r = run(1000).await;
    let out = output(&r);
    assert_eq!(out[0]["err"]["kind"], "failed", "{out}");
    assert!(
        out[0]["err"]["detail"].as_str().unwrap().contains("memory"),
        "{out}"
    );
    assert_eq!(r.tokens.tokens(), 0);
    // About 1 MiB fits; and it was given back: the tenant holds nothing.
    let r = run(100).await;
    assert_eq!(output(&r)[0]["ok"]["tokens_out"], 100);
    assert_eq!(host.tenant_memory_in_use("t"), 0);
}
