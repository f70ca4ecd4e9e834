//! Agent state through the API and a real worker, with the `counter` agent
//! (its state: the count, optionally padded to a chosen size): states on
//! either side of the inline threshold (64 KiB) and of the 16 MiB bound of
//! `state.set`, and a job whose every run loses its state to another job of
//! the same agent, up to the conflict limit.

mod common;

use crate::common::fixtures::tid;
use agentplane::control::keys::KeySpace;
use agentplane::control::{ControlConfig, ControlPlane, MAX_STATE_CONFLICTS};
use common::stack::{Opts, Stack, state};
use serde_json::{Value, json};

const INLINE_MAX: usize = 64 << 10;
const STATE_MAX: usize = 16 << 20;
/// Charged per stored agent state on top of its bytes.
const ITEM_OVERHEAD: u64 = 256;

async fn raw(s: &Stack) -> redis::aio::MultiplexedConnection {
    redis::Client::open(s.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The agent hash's `inline` length and `blob` version, and whether that
/// version's blob key exists.
async fn stored(s: &Stack, agent: &str) -> (usize, String, bool) {
    let ks = KeySpace::new("ap", 1);
    let mut c = raw(s).await;
    let (inline, blob): (Option<Vec<u8>>, Option<String>) = redis::cmd("HMGET")
        .arg(ks.agent("acme", agent))
        .arg("inline")
        .arg("blob")
        .query_async(&mut c)
        .await
        .unwrap();
    let blob = blob.unwrap_or_default();
    let exists = match blob.parse::<u64>() {
        Ok(v) => {
            let n: u32 = redis::cmd("EXISTS")
                .arg(ks.agent_state_blob("acme", agent, v))
                .query_async(&mut c)
                .await
                .unwrap();
            n == 1
        }
        Err(_) => false,
    };
    (inline.map_or(0, |b| b.len()), blob, exists)
}

async fn run(s: &Stack, token: &str, counter: &str, agent: &str, input: &str) -> Value {
    let id = s
        .submit(
            token,
            json!({"component": counter, "input": input, "agent_id": agent, "max_attempts": 1}),
        )
        .await;
    s.wait_terminal(token, &id, 60).await
}

async fn state_bytes(s: &Stack) -> u64 {
    s.tenant_info("acme").await["storage"]["state_bytes"]
        .as_u64()
        .unwrap()
}

/// The count's digit and newline, then padding up to `total` bytes.
fn pad_to(total: usize) -> String {
    format!("pad:{}:", total - 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn states_at_the_inline_threshold_and_the_16_mib_bound() {
    let s = Stack::start(Opts::default()).await;
    let token = s.tenant("acme").await;
    let counter = s.push(&token, "counter").await;

    // Exactly the threshold: inline.
    let job = run(&s, &token, &counter, "a", &pad_to(INLINE_MAX)).await;
    assert_eq!(job["output"], "1", "{job}");
    assert_eq!(stored(&s, "a").await, (INLINE_MAX, String::new(), false));
    assert_eq!(state_bytes(&s).await, INLINE_MAX as u64 + ITEM_OVERHEAD);

    // One byte over: its own key, named by the version; read back whole.
    let job = run(&s, &token, &counter, "a", &pad_to(INLINE_MAX + 1)).await;
    assert_eq!(job["output"], "2", "{job}");
    assert_eq!(stored(&s, "a").await, (0, "2".into(), true));
    assert_eq!(state_bytes(&s).await, INLINE_MAX as u64 + 1 + ITEM_OVERHEAD);
    let job = run(&s, &token, &counter, "a", &pad_to(INLINE_MAX + 2)).await;
    assert_eq!(job["output"], "3", "the large state was read back: {job}");
    // The superseded version's key went with the commit.
    let ks = KeySpace::new("ap", 1);
    let old: u32 = redis::cmd("EXISTS")
        .arg(ks.agent_state_blob("acme", "a", 2))
        .query_async(&mut raw(&s).await)
        .await
        .unwrap();
    assert_eq!(old, 0);
    assert_eq!(stored(&s, "a").await, (0, "3".into(), true));

    // Back under the threshold: inline again, the blob gone.
    let job = run(&s, &token, &counter, "a", "").await;
    assert_eq!(job["output"], "4", "{job}");
    assert_eq!(stored(&s, "a").await, (1, String::new(), false));
    assert_eq!(state_bytes(&s).await, 1 + ITEM_OVERHEAD);

    // Exactly 16 MiB is taken; one byte more is refused by `state.set`,
    // the job fails `agent_error`, and the stored state is untouched.
    let job = run(&s, &token, &counter, "b", &pad_to(STATE_MAX)).await;
    assert_eq!(state(&job), "succeeded", "{job}");
    assert_eq!(stored(&s, "b").await, (0, "1".into(), true));
    let before = state_bytes(&s).await;
    assert_eq!(before, 1 + STATE_MAX as u64 + 2 * ITEM_OVERHEAD);
    let job = run(&s, &token, &counter, "b", &pad_to(STATE_MAX + 1)).await;
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["error"]["kind"], "agent_error", "{job}");
    let msg = job["error"]["message"].as_str().unwrap();
    assert_eq!(
        msg,
        format!(
            "state is {} bytes; at most {STATE_MAX} are accepted",
            STATE_MAX + 1
        )
    );
    assert_eq!(stored(&s, "b").await, (0, "1".into(), true));
    assert_eq!(state_bytes(&s).await, before);
    let job = run(&s, &token, &counter, "b", "").await;
    assert_eq!(
        job["output"], "2",
        "the refused state was not written: {job}"
    );
    s.assert_books_balance("acme").await;
    s.stop().await;
}

/// A job that reads the state, waits, then commits, while other jobs of the
/// same agent keep committing: each of its runs conflicts, is charged and
/// runs again without using an attempt, until the limit (16) fails it
/// `agent_error`. It commits nothing; every other job's commit stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_always_loses_its_state_fails_after_the_conflict_limit() {
    let s = Stack::start(Opts {
        worker_slots: Some(2),
        ..Opts::default()
    })
    .await;
    let token = s.tenant("acme").await;
    let counter = s.push(&token, "counter").await;
    let slow = s
        .submit(
            &token,
            json!({"component": counter, "input": "sleep:300", "agent_id": "x", "max_attempts": 1}),
        )
        .await;
    s.wait_for(&token, &slow, 30, |j| state(j) == "running")
        .await;
    let mut quick = 0u64;
    let job = loop {
        let (_, j) = s.get(&format!("/v1/jobs/{slow}"), &token).await;
        if j["state"] == "failed" || j["state"] == "succeeded" {
            break j;
        }
        let q = run(&s, &token, &counter, "x", "").await;
        assert_eq!(state(&q), "succeeded", "{q}");
        quick += 1;
        assert!(quick < 200, "the slow job never gave up: {j}");
    };
    let limit = MAX_STATE_CONFLICTS as u64;
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["error"]["kind"], "agent_error", "{job}");
    assert_eq!(
        job["error"]["message"],
        format!(
            "agent state changed under this job {} times; giving up",
            limit + 1
        )
    );
    // Every run was valid work: each one settled, none was a new attempt.
    let cp = ControlPlane::connect(&s.url, ControlConfig::default())
        .await
        .unwrap();
    let l = cp.ledger(&tid("acme")).await.unwrap();
    let settles: Vec<u32> = l
        .iter()
        .filter(|e| e.job == slow && e.op == "settle")
        .map(|e| e.attempt)
        .collect();
    assert_eq!(settles, (1..=limit as u32 + 1).collect::<Vec<_>>(), "{l:?}");
    let paid: i64 = l
        .iter()
        .filter(|e| e.job == slow && e.op == "settle")
        .map(|e| e.amount)
        .sum();
    assert_eq!(job["usage"]["credits"], paid, "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    // The slow job committed nothing: the count is the quick jobs'.
    let next = run(&s, &token, &counter, "x", "").await;
    assert_eq!(next["output"], (quick + 1).to_string(), "{next}");
    s.assert_books_balance("acme").await;
    s.stop().await;
}
