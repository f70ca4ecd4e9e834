//! The dispatcher: takes due hooks under a lease, resolves only to public
//! addresses, delivers signed, and records how each ended.

use super::*;
use crate::control::{ControlPlane, DueHook, HookOutcome};
use crate::model::Job;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// The resolver of deliveries: the system's, keeping public addresses only
/// (an address named by a rule is used as it is and never resolved).
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = crate::egress::public_addresses(&host, 0).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client of deliveries: no redirects, no proxy, the filtering
/// resolver, bounded connect and total time.
fn client(d: &Delivery) -> reqwest::Result<reqwest::Client> {
    crate::client::tls_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(PublicOnly))
        .connect_timeout(d.connect_timeout)
        .timeout(d.timeout)
        .pool_max_idle_per_host(1)
        .user_agent(concat!("agentplane/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// What a receiver is sent: the finished job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct CallbackBody {
    /// `job.finished`.
    pub event: String,
    pub job: Job,
}

/// Delivers due callbacks until `shutdown`: takes due hooks on every shard
/// (at most as many as it has free delivery places), and delivers each in
/// its own task.
pub async fn run_dispatcher(
    cp: ControlPlane,
    cb: Callbacks,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let d = cb.delivery.clone();
    let http = client(&d)?;
    let places = Arc::new(tokio::sync::Semaphore::new(d.concurrency.max(1)));
    let busy: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let lease_ms = d.lease.as_millis() as u64;
    loop {
        for shard in 0..cp.keys().shards() {
            let free = places.available_permits();
            if free == 0 {
                break;
            }
            let due = match cp.take_hooks(shard, free.min(1000) as u32, lease_ms).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(shard, error = %e, "taking due callbacks failed");
                    continue;
                }
            };
            for hook in due {
                let held = {
                    let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
                    let n = b.entry(hook.tenant.to_string()).or_default();
                    if *n >= d.per_tenant {
                        None
                    } else {
                        *n += 1;
                        Some(())
                    }
                };
                let place = places.clone().try_acquire_owned().ok();
                let (Some(()), Some(place)) = (held, place) else {
                    if held.is_some() {
                        release(&busy, &hook.tenant);
                    }
                    // The tenant's receivers hold all its places (or the
                    // process is full): put off, no attempt counted.
                    let _ = cp
                        .hook_later(
                            &hook,
                            d.poll.as_millis() as u64 * 4,
                            hook.attempts,
                            hook.attempts > 0,
                        )
                        .await;
                    continue;
                };
                let (cp, cb, http, busy) = (cp.clone(), cb.clone(), http.clone(), busy.clone());
                tokio::spawn(async move {
                    deliver(&cp, &cb, &http, &hook).await;
                    release(&busy, &hook.tenant);
                    drop(place);
                });
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(d.poll) => {}
        }
    }
}

fn release(busy: &Mutex<HashMap<String, usize>>, tenant: &str) {
    let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = b.get_mut(tenant) {
        *n -= 1;
        if *n == 0 {
            b.remove(tenant);
        }
    }
}

/// Whether `err` (or a cause of it) is an egress refusal.
fn refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = Some(err);
    while let Some(x) = e {
        if x.downcast_ref::<Refused>().is_some() {
            return true;
        }
        e = x.source();
    }
    false
}

/// One attempt at one hook, and what follows from it.
async fn deliver(cp: &ControlPlane, cb: &Callbacks, http: &reqwest::Client, hook: &DueHook) {
    let d = &cb.delivery;
    let attempts = hook.attempts + 1;
    // A refusal made no request: it does not count as an attempt.
    let end = |outcome: HookOutcome| async move {
        metrics::counter!("agentplane_callbacks_total", "outcome" => outcome.as_str()).increment(1);
        let made = if outcome == HookOutcome::Refused {
            hook.attempts
        } else {
            attempts
        };
        if let Err(e) = cp.hook_done(hook, outcome, made).await {
            tracing::warn!(job = %hook.job, error = %e, "recording a callback's outcome failed");
        }
    };
    // The rules of now, not of the submission.
    let url = match cb.check(&hook.url) {
        Ok(u) => u,
        Err(why) => {
            tracing::info!(job = %hook.job, %why, "callback refused");
            return end(HookOutcome::Refused).await;
        }
    };
    let job = match cp.job(&hook.tenant, &hook.job).await {
        Ok(Some(job)) => job,
        Ok(None) => return end(HookOutcome::Failed).await,
        Err(e) => {
            tracing::warn!(job = %hook.job, error = %e, "reading a job to call back failed");
            // Left to the lease: taken again later.
            return;
        }
    };
    let body = match serde_json::to_vec(&CallbackBody {
        event: "job.finished".into(),
        job,
    }) {
        Ok(b) => b,
        Err(_) => return end(HookOutcome::Failed).await,
    };
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let sig = signature(&cb.tenant_key(&hook.tenant), t, &body);
    let sent = http
        .post(url)
        .header("content-type", "application/json")
        .header("x-agentplane-signature", sig)
        .header("x-agentplane-delivery", &hook.job)
        .header("x-agentplane-attempt", attempts)
        .body(body)
        .send()
        .await;
    let why = match sent {
        // The answer's body is not read: dropping it closes the connection.
        Ok(resp) if resp.status().is_success() => return end(HookOutcome::Delivered).await,
        Ok(resp) => format!("answered {}", resp.status()),
        Err(e) if refused(&e) => {
            tracing::info!(job = %hook.job, error = %e, "callback refused at delivery");
            return end(HookOutcome::Refused).await;
        }
        Err(e) => format!("{e}"),
    };
    tracing::info!(job = %hook.job, attempts, %why, "callback attempt failed");
    if attempts >= d.max_attempts {
        return end(HookOutcome::Failed).await;
    }
    metrics::counter!("agentplane_callbacks_total", "outcome" => "retried").increment(1);
    let delay = d.backoff(attempts).as_millis() as u64;
    if let Err(e) = cp.hook_later(hook, delay, attempts, true).await {
        tracing::warn!(job = %hook.job, error = %e, "rescheduling a callback failed");
    }
}
