//! `GET /v1/jobs/{id}/events` over real HTTP and a real `redis-server`:
//! state changes pushed as they happen, log lines while the agent runs,
//! `end`; the tenant's long-poll bound; a stream that ends at `max_wait`.

mod common;

use agentplane::api::ApiConfig;
use common::stack::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// A reader of an event stream, one event at a time.
struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    fn new(resp: reqwest::Response) -> Events {
        Events {
            resp,
            buf: String::new(),
        }
    }

    /// The next `(event, data)`; `None` once the stream closes.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            while let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let (mut event, mut data) = (String::new(), Vec::new());
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event: ") {
                        event = e.to_string();
                    } else if let Some(d) =
                        line.strip_prefix("data: ").or(line.strip_prefix("data:"))
                    {
                        data.push(d.to_string());
                    }
                }
                if !event.is_empty() {
                    return Some((event, data.join("\n")));
                }
                // A keep-alive comment.
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.resp.chunk())
                .await
                .expect("an event within 30 s")
                .unwrap()?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// `(event, data)` of every event until `end` (or the stream closes).
async fn read_events(resp: reqwest::Response) -> Vec<(String, String)> {
    let mut ev = Events::new(resp);
    let mut out = Vec::new();
    while let Some(e) = ev.next().await {
        let end = e.0 == "end";
        out.push(e);
        if end {
            break;
        }
    }
    out
}

async fn open(s: &Stack, token: &str, id: &str) -> reqwest::Response {
    s.http
        .get(format!("{}/v1/jobs/{id}/events", s.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_pushes_its_states_then_its_log() {
    let s = Stack::start(Opts::default()).await;
    let t = s.tenant("acme").await;
    let d = s.push(&t, "echo").await;
    // Delayed first, so the stream sees it move: delayed → … → succeeded.
    let id = s
        .submit(
            &t,
            json!({"component": d, "input": "pushed", "delay_ms": 700}),
        )
        .await;
    let resp = open(&s, &t, &id).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_events(resp).await;
    let states: Vec<String> = events
        .iter()
        .filter(|(e, _)| e == "state")
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        states.first().map(String::as_str),
        Some("delayed"),
        "{events:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("succeeded"),
        "{events:?}"
    );
    assert!(states.len() >= 2, "{events:?}");
    // No state twice in a row: only changes are sent.
    assert!(states.windows(2).all(|w| w[0] != w[1]), "{states:?}");
    let last_state: Value =
        serde_json::from_str(&events.iter().rev().find(|(e, _)| e == "state").unwrap().1).unwrap();
    assert_eq!(last_state["output"], "pushed");
    // The log, line by line, as GET /log has it; then the end.
    let (_, log) = s.get(&format!("/v1/jobs/{id}/log"), &t).await;
    let lines: Vec<&str> = events
        .iter()
        .filter(|(e, _)| e == "log")
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(lines, log.as_str().unwrap().lines().collect::<Vec<_>>());
    assert!(!lines.is_empty());
    assert_eq!(events.last().unwrap().0, "end");
    assert_eq!(
        serde_json::from_str::<Value>(&events.last().unwrap().1).unwrap()["reason"],
        "terminal"
    );

    // Someone else's job, or none, is 404; no token is 401.
    let other = s.tenant("other").await;
    assert_eq!(open(&s, &other, &id).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        open(&s, &t, "01ARZ3NDEKTSV4RRFFQ69G5FAV").await.status(),
        StatusCode::NOT_FOUND
    );
    let anon = s
        .http
        .get(format!("{}/v1/jobs/{id}/events", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), StatusCode::UNAUTHORIZED);
    s.stop().await;
}

/// A guest that logs a line, then sleeps 3 s in a host call: the stream
/// sends the line while the job still runs (the worker stores it within
/// ~250 ms), never twice, and the whole log by the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_lines_are_pushed_while_the_agent_runs() {
    let s = Stack::start(Opts::default()).await;
    let t = s.tenant("acme").await;
    let d = s.push(&t, "deadline").await;
    let id = s
        .submit(&t, json!({"component": d, "input": "1000,3000"}))
        .await;
    let mut ev = Events::new(open(&s, &t, &id).await);
    let mut seen = Vec::new();
    let first_line = loop {
        let (e, data) = ev.next().await.expect("the stream ends with `end`");
        assert_ne!(e, "end", "no log line before the end: {seen:?}");
        seen.push((e.clone(), data.clone()));
        if e == "log" {
            break data;
        }
    };
    // The line came while the agent still runs, and GET /log has it too.
    let (_, job) = s.get(&format!("/v1/jobs/{id}"), &t).await;
    assert_eq!(state(&job), "running", "{seen:?}");
    assert!(first_line.starts_with("[info] result "), "{first_line}");
    let (_, live) = s.get(&format!("/v1/jobs/{id}/log"), &t).await;
    assert_eq!(live.as_str().unwrap(), format!("{first_line}\n"));
    // No terminal state was sent before the line.
    let terminal = |(e, d): &(String, String)| {
        e == "state" && serde_json::from_str::<Value>(d).unwrap()["state"] == "succeeded"
    };
    assert!(!seen.iter().any(terminal), "{seen:?}");
    while let Some(e) = ev.next().await {
        let end = e.0 == "end";
        seen.push(e);
        if end {
            break;
        }
    }
    // Every line once, as the final log has them; then the end.
    let (_, log) = s.get(&format!("/v1/jobs/{id}/log"), &t).await;
    let lines: Vec<&str> = seen
        .iter()
        .filter(|(e, _)| e == "log")
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(lines, log.as_str().unwrap().lines().collect::<Vec<_>>());
    let last_state = seen.iter().rev().find(|(e, _)| e == "state").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&last_state.1).unwrap()["state"],
        "succeeded"
    );
    assert_eq!(seen.last().unwrap().0, "end");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_are_bounded_per_tenant_and_in_time() {
    let s = Stack::start(Opts {
        api: ApiConfig {
            max_waits_per_tenant: 1,
            max_wait: Duration::from_secs(2),
            ..ApiConfig::default()
        },
        ..Opts::default()
    })
    .await;
    let t = s.tenant("acme").await;
    let d = s.push(&t, "echo").await;
    let id = s
        .submit(
            &t,
            json!({"component": d, "input": "later", "delay_ms": 600000}),
        )
        .await;
    let first = open(&s, &t, &id).await;
    assert_eq!(first.status(), StatusCode::OK);
    // The tenant's one place is held: the next stream is refused at once.
    let second = open(&s, &t, &id).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.headers()["retry-after"], "1");
    // Another tenant is not affected.
    let other = s.tenant("other").await;
    let od = s.push(&other, "echo").await;
    let oid = s
        .submit(&other, json!({"component": od, "input": "x"}))
        .await;
    assert_eq!(open(&s, &other, &oid).await.status(), StatusCode::OK);
    // The stream ends at max_wait with the reason, and frees the place.
    let events = read_events(first).await;
    assert_eq!(events[0].0, "state");
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "end");
    assert_eq!(
        serde_json::from_str::<Value>(data).unwrap()["reason"],
        "timeout"
    );
    let mut again = open(&s, &t, &id).await;
    for _ in 0..20 {
        if again.status() == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = open(&s, &t, &id).await;
    }
    assert_eq!(again.status(), StatusCode::OK);
    // A client that leaves frees its place without waiting for the end.
    drop(again);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(open(&s, &t, &id).await.status(), StatusCode::OK);
    s.stop().await;
}
