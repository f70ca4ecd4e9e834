//! `GET /v1/jobs/{id}/events`: a job's progress as Server-Sent Events,
//! pushed instead of polled by the client.
//!
//! The server polls the job record (every `limits::WAIT_POLL`, 100 ms)
//! and sends a `state` event with the whole job whenever its state or
//! attempt count changes (the first one at once). Workers store what the
//! agent logs while it runs, in batches (every ~250 ms or 4 KiB), and the
//! stream reads that stored log with the job on each poll and sends each
//! new line as a `log` event: only what is past the byte offset it has
//! sent, and only lines of the current run (a new run's log starts over).
//! Once the job is terminal the rest of its final log follows, then `end`.
//! A stream is bounded like `?wait=`: it holds one of
//! the tenant's long-poll places (429 when it has none left) and lasts at
//! most `max_wait`, after which it ends with `end` `{"reason":"timeout"}`;
//! a client (an `EventSource`) reconnects and gets the current state first.

use super::AppState;
use super::auth::Tenant;
use super::error::{ApiError, ApiResult};
use super::jobs::fetch_job;
use super::path::JobPath;
use crate::model::TenantId;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::SinkExt;
use futures::channel::mpsc;
use std::convert::Infallible;
use std::time::{Duration, Instant};

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "`text/event-stream`: `state` (the job, on each change), `log` (a line of the agent's log, as it is written), `end` (tenant)", content_type = "text/event-stream", body = String), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn events(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    JobPath(id): JobPath,
) -> ApiResult<impl axum::response::IntoResponse> {
    // The first read answers 404 as a plain error, before any stream.
    let first = fetch_job(&state, &tenant, &id).await?;
    let place = state
        .wait_place(&tenant)
        .ok_or(ApiError::TooManyWaits(state.config().max_waits_per_tenant))?;
    let (mut tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        // Held for the stream's life: the tenant's share of long-polls.
        let _place = place;
        let deadline = Instant::now() + state.config().max_wait;
        let period = super::limits::WAIT_POLL;
        let mut job = first;
        let mut last = None;
        // The run whose log is being sent, and the bytes of it sent.
        let mut log_at = (0u32, 0usize);
        loop {
            let seen = (job.state, job.attempts);
            if last != Some(seen) {
                last = Some(seen);
                let ev = Event::default().event("state").json_data(&job);
                // A send fails only when the client has gone: stop polling.
                if send(&mut tx, ev).await.is_err() {
                    return;
                }
            }
            if send_log(&state, &tenant, &job.id, &mut log_at, &mut tx)
                .await
                .is_err()
            {
                return;
            }
            if job.state.is_terminal() {
                let _ = send(&mut tx, end("terminal")).await;
                return;
            }
            if Instant::now() >= deadline {
                let _ = send(&mut tx, end("timeout")).await;
                return;
            }
            tokio::time::sleep(period).await;
            // A client that left frees its place now, not at the deadline.
            if tx.is_closed() {
                return;
            }
            job = match fetch_job(&state, &tenant, &job.id).await {
                Ok(j) => j,
                // Gone (retention) or Redis unreachable: say so and stop;
                // the client may reconnect.
                Err(e) => {
                    let _ = send(&mut tx, end(&format!("error: {e}"))).await;
                    return;
                }
            };
        }
    });
    Ok(Sse::new(rx).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Sends the lines of the job's stored log past `at` (`(run, bytes sent)`):
/// whole lines only while the job may still write more, all of it once it
/// is terminal. A log that is not the current run's yet (a new run that
/// has stored nothing) sends nothing; a new run starts from its first byte.
async fn send_log(
    state: &AppState,
    tenant: &TenantId,
    id: &str,
    at: &mut (u32, usize),
    tx: &mut mpsc::Sender<Result<Event, Infallible>>,
) -> Result<(), ()> {
    let offset = at.1;
    // A read that fails is tried again at the next poll.
    let Ok(Some(mut tail)) = state.control().log_tail(tenant, id, offset).await else {
        return Ok(());
    };
    if tail.run != at.0 {
        *at = (tail.run, 0);
        if offset > 0 {
            match state.control().log_tail(tenant, id, 0).await {
                Ok(Some(t)) if t.run == tail.run => tail = t,
                _ => return Ok(()),
            }
        }
    }
    if !tail.is_current() {
        return Ok(());
    }
    let text = if tail.state.is_terminal() {
        tail.text.as_str()
    } else {
        // Only whole lines: the rest comes with the next read.
        tail.text.rfind('\n').map_or("", |i| &tail.text[..=i])
    };
    for line in text.lines() {
        send(tx, Ok(Event::default().event("log").data(line))).await?;
    }
    at.1 += text.len();
    Ok(())
}

fn end(reason: &str) -> Result<Event, axum::Error> {
    Event::default()
        .event("end")
        .json_data(serde_json::json!({ "reason": reason }))
}

async fn send(
    tx: &mut mpsc::Sender<Result<Event, Infallible>>,
    ev: Result<Event, axum::Error>,
) -> Result<(), ()> {
    // Serializing our own types does not fail; if it ever did, the event
    // is skipped rather than the stream broken.
    let Ok(ev) = ev else { return Ok(()) };
    tx.send(Ok(ev)).await.map_err(|_| ())
}
