//! `GET /v1/jobs/{id}/events`: a job's progress as Server-Sent Events,
//! pushed instead of polled by the client.
//!
//! The server polls the job record (every `wait_poll`, about 100-200 ms)
//! and sends a `state` event with the whole job whenever its state or
//! attempt count changes (the first one at once). Workers store an
//! attempt's log when the attempt settles, not while the agent writes it,
//! so the log comes once the job is terminal, a `log` event per line,
//! followed by `end`. A stream is bounded like `?wait=`: it holds one of
//! the tenant's long-poll places (429 when it has none left) and lasts at
//! most `max_wait`, after which it ends with `end` `{"reason":"timeout"}`;
//! a client (an `EventSource`) reconnects and gets the current state first.

use super::AppState;
use super::auth::Tenant;
use super::error::{ApiError, ApiResult};
use super::jobs::fetch_job;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::SinkExt;
use futures::channel::mpsc;
use std::convert::Infallible;
use std::time::{Duration, Instant};

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "`text/event-stream`: `state` (the job, on each change), `log` (a line, once terminal), `end` (tenant)", content_type = "text/event-stream", body = String), (status = "4XX", description = "the error, `param` naming the field at fault", body = crate::api::ErrorBody), (status = "5XX", description = "`internal`, `unavailable` or `storage_full` (503 with `Retry-After`)", body = crate::api::ErrorBody)))]
pub(super) async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Tenant(tenant): Tenant,
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
        let period = state.config().wait_poll.max(Duration::from_millis(50));
        let mut job = first;
        let mut last = None;
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
            if job.state.is_terminal() {
                let log = state
                    .control()
                    .job_log(&tenant, &job.id)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                for line in log.lines() {
                    if send(&mut tx, Ok(Event::default().event("log").data(line)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
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
