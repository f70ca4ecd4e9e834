//! CLAIM (`lua/claim.lua`): hand a worker up to N jobs, fairly, across
//! every shard; every leased job reaches a run or is failed alone.

use super::*;
use std::sync::Arc;

/// Who holds a job and with which fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub tenant: TenantId,
    pub token: u64,
}

/// A job handed to a worker by CLAIM.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub lease: Lease,
    /// The run number: every claim of a job takes the next one, so the
    /// ledger names each run uniquely (not the count toward `max_attempts`).
    pub attempt: u32,
    pub component: String,
    pub input: String,
    pub contexts: Vec<(String, String)>,
    pub gpus: u32,
    pub limits: Limits,
    pub agent_id: Option<String>,
    pub state: Option<Vec<u8>>,
    pub state_version: u64,
    /// The tenant's `allowed_outbound_hosts` as of the claim.
    pub egress: Arc<crate::egress::Policy>,
    /// Tokens the job may spend on inference (fixed at submission).
    pub max_tokens: u64,
    /// The tenant's model grants as of the claim.
    pub models: Arc<Vec<crate::model::grants::ModelGrant>>,
    /// The tenant's weight as of the claim: its share of the node's
    /// models, as of its slots.
    pub weight: u32,
}

/// ARGV of `lua/claim.lua`, in its header's order.
pub(super) struct ClaimArgs<'a> {
    pub(super) worker: &'a str,
    pub(super) max: u32,
    pub(super) free_gpus: u32,
    pub(super) lease_ms: u64,
    pub(super) prices: [u64; 4],
    pub(super) claim_id: &'a str,
}

impl ClaimArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.worker)
            .arg(self.max)
            .arg(self.free_gpus)
            .arg(self.lease_ms);
        for p in self.prices {
            inv.arg(p);
        }
        inv.arg(self.claim_id);
    }
}

/// One record of CLAIM's answer, read in the order `lua/claim.lua` lists:
/// `{job, tenant, token, attempt, component, input, contexts, gpus, fuel,
/// memory_bytes, timeout_ms, agent_id, state, legacy_state_ptr,
/// state_version, egress, max_tokens, models, weight}`.
struct ClaimRecord {
    attempt: u32,
    component: String,
    input: String,
    contexts: Vec<(String, String)>,
    gpus: u32,
    limits: Limits,
    agent_id: Option<String>,
    state: Vec<u8>,
    legacy_ptr: Option<String>,
    state_version: u64,
    egress: Arc<crate::egress::Policy>,
    max_tokens: u64,
    models: Arc<Vec<crate::model::grants::ModelGrant>>,
    weight: u32,
}

impl ClaimRecord {
    /// The record and its lease; on an error, the lease if it could be read
    /// (so the job can be failed alone rather than left leased).
    #[allow(clippy::result_large_err)]
    fn decode(v: &Value) -> Result<(Lease, ClaimRecord), (Option<Lease>, CpError)> {
        let mut r = Reply::new("CLAIM record", v).map_err(|e| (None, e))?;
        let lease = (|| {
            Ok::<_, CpError>(Lease {
                job_id: r.string("job")?,
                tenant: r.tenant("tenant")?,
                token: r.uint("token")?,
            })
        })()
        .map_err(|e| (None, e))?;
        let rec = (|| {
            let attempt = r.uint("attempt")?;
            let component = r.string("component")?;
            let input = r.string("input")?;
            let contexts = r.string("contexts")?;
            let contexts = serde_json::from_str(&contexts)
                .map_err(|e| bad(format!("CLAIM: contexts {contexts:?}: {e}")))?;
            let rec = ClaimRecord {
                attempt,
                component,
                input,
                contexts,
                gpus: r.uint("gpus")?,
                limits: Limits {
                    fuel: r.uint("fuel")?,
                    memory_bytes: r.uint("memory_bytes")?,
                    timeout_ms: r.uint("timeout_ms")?,
                },
                agent_id: Some(r.string("agent_id")?).filter(|a| !a.is_empty()),
                state: r.bytes("state")?,
                legacy_ptr: Some(r.string("legacy_state_ptr")?).filter(|p| !p.is_empty()),
                state_version: r.uint("state_version")?,
                egress: {
                    let text = r.string("egress")?;
                    crate::egress::Policy::shared(&text)
                        .map_err(|e| bad(format!("CLAIM: egress {text:?}: {e}")))?
                },
                max_tokens: r.uint("max_tokens")?,
                models: {
                    let text = r.string("models")?;
                    if text.is_empty() {
                        Arc::default()
                    } else {
                        Arc::new(
                            crate::model::grants::from_stored(&text)
                                .map_err(|e| bad(format!("CLAIM: models: {e}")))?,
                        )
                    }
                },
                weight: r.uint("weight")?,
            };
            r.end()?;
            Ok::<_, CpError>(rec)
        })();
        match rec {
            Ok(rec) => Ok((lease, rec)),
            Err(e) => Err((Some(lease), e)),
        }
    }
}

impl ControlPlane {
    /// Up to `max` jobs for worker `worker` with `free_gpus` GPU slots free,
    /// taken from the shards in turn starting at a random one (so workers
    /// spread over shards and none is favoured).
    ///
    /// Every job CLAIM leased is in the answer or already handed back: a
    /// shard whose CLAIM fails does not stop the others (its error is
    /// answered only when no shard gave a job, so the worker backs off),
    /// and a job whose agent state cannot be read fails alone (see
    /// `claim_shard`). Dropping a leased job would burn an attempt and end
    /// it `lease_expired` without ever running.
    pub async fn claim(
        &self,
        worker: &str,
        max: u32,
        free_gpus: u32,
    ) -> Result<Vec<Claim>, CpError> {
        let shards = self.keys.shards();
        let start = rand::random::<u32>() % shards;
        let mut out = Vec::new();
        let mut gpus_left = free_gpus;
        let mut first_err = None;
        for i in 0..shards {
            if out.len() as u32 >= max {
                break;
            }
            let shard = (start + i) % shards;
            let got = match self
                .claim_shard(shard, worker, max - out.len() as u32, gpus_left)
                .await
            {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!(shard, error = %e, "CLAIM failed on a shard; trying the others");
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            for c in got {
                gpus_left = gpus_left.saturating_sub(c.gpus);
                out.push(c);
            }
        }
        match first_err {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// A claimed job that cannot be handed to a run: its attempt fails as
    /// `agent_error` with `why`, uncharged (no fuel, no wall time), and
    /// retries with backoff up to `max_attempts` like any agent error (a
    /// state pointer read during a concurrent commit heals on the retry).
    /// If even FINALIZE fails, RELEASE is tried; failing both, the lease
    /// runs out and the reaper takes the job back.
    async fn fail_claimed(&self, lease: &Lease, why: String) {
        tracing::warn!(job = %lease.job_id, tenant = %lease.tenant, error = %why, "claimed job cannot run");
        let finish = Finish {
            outcome: AttemptOutcome::Failed {
                kind: ErrorKind::AgentError,
                message: why,
            },
            fuel: 0,
            wall_ms: 0,
            log: String::new(),
            new_state: None,
            http: Default::default(),
            tokens: Default::default(),
        };
        if let Err(e) = self.finalize(lease, &finish).await {
            tracing::warn!(job = %lease.job_id, error = %e, "FINALIZE of an unrunnable claim failed; releasing");
            if let Err(e) = self.release(lease).await {
                tracing::warn!(job = %lease.job_id, error = %e, "RELEASE failed too; the reaper will take it back");
            }
        }
    }

    async fn claim_shard(
        &self,
        shard: u32,
        worker: &str,
        max: u32,
        free_gpus: u32,
    ) -> Result<Vec<Claim>, CpError> {
        // A call whose answer is lost (the connection drops, or the answer
        // times out, after the script ran) leased jobs this worker never
        // heard of. It is retried under the same claim id, and CLAIM then
        // answers those jobs again instead of leasing more, within half a
        // lease (the jobs' leases are renewed by the retry).
        let cid = ulid::Ulid::new().to_string();
        let deadline = std::time::Instant::now() + Duration::from_millis(self.cfg.lease_ms / 2);
        let mut step = Duration::from_millis(20);
        let v: Value = loop {
            let mut inv = scripts::CLAIM.prepare_invoke();
            ClaimArgs {
                worker,
                max,
                free_gpus,
                lease_ms: self.cfg.lease_ms,
                prices: self.prices(),
                claim_id: &cid,
            }
            .write(inv.key(self.keys.anchor(shard)));
            match self.eval(&mut inv, shard).await {
                Ok(v) => break v,
                Err(CpError::Redis(e))
                    if answer_lost(&e) && std::time::Instant::now() + step < deadline =>
                {
                    tracing::warn!(shard, error = %e, "CLAIM answer lost; asking again for the same claim");
                    tokio::time::sleep(step).await;
                    step = (step * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        };
        self.claims_from(&v).await
    }

    /// The claims of CLAIM's answer (or of FINALIZE's, which may claim the
    /// worker's next jobs in the same call). A record that cannot be read
    /// fails its job alone.
    pub(super) async fn claims_from(&self, v: &Value) -> Result<Vec<Claim>, CpError> {
        let Value::Array(records) = v else {
            return Err(bad(format!("CLAIM answered {v:?}, not an array")));
        };
        let mut out = Vec::new();
        // From here on every record is a leased job: none may be dropped
        // with a `?` (see `claim`); one that cannot be read fails alone.
        for rec in records {
            let (lease, rec) = match ClaimRecord::decode(rec) {
                Ok(r) => r,
                Err((Some(lease), e)) => {
                    self.fail_claimed(&lease, format!("CLAIM answered a bad record: {e}"))
                        .await;
                    continue;
                }
                Err((None, e)) => {
                    // No job id to hand back: the reaper takes it back.
                    tracing::error!(error = %e, "CLAIM answered a record without a lease");
                    continue;
                }
            };
            let state = if let Some(ptr) = rec.legacy_ptr {
                let blob: Result<Option<Vec<u8>>, _> =
                    self.conn().get(self.keys.blob("state", &ptr)).await;
                match blob {
                    Ok(Some(b)) => Some(b),
                    Ok(None) => {
                        let why = format!("agent state blob {ptr} is missing");
                        self.fail_claimed(&lease, why).await;
                        continue;
                    }
                    Err(e) => {
                        let why = format!("agent state blob {ptr} could not be read: {e}");
                        self.fail_claimed(&lease, why).await;
                        continue;
                    }
                }
            } else if rec.agent_id.is_some() && rec.state_version > 0 {
                Some(rec.state)
            } else {
                None
            };
            out.push(Claim {
                lease,
                attempt: rec.attempt,
                component: rec.component,
                input: rec.input,
                contexts: rec.contexts,
                gpus: rec.gpus,
                limits: rec.limits,
                agent_id: rec.agent_id,
                state,
                state_version: rec.state_version,
                egress: rec.egress,
                max_tokens: rec.max_tokens,
                models: rec.models,
                weight: rec.weight,
            });
        }
        Ok(out)
    }
}
