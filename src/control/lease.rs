//! The life of a lease: RENEW, FINALIZE and RELEASE (`lua/renew.lua`,
//! `lua/finalize.lua`, `lua/release.lua`).

use super::*;
use std::borrow::Cow;

/// How an attempt ended, as the worker reports it to FINALIZE.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Succeeded {
        output: String,
    },
    Failed {
        kind: ErrorKind,
        message: String,
    },
    /// The worker stopped the run because RENEW answered `Cancelled`.
    Cancelled,
}

/// FINALIZE's input.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub outcome: AttemptOutcome,
    pub fuel: u64,
    pub wall_ms: u64,
    pub log: String,
    /// The state the agent set (committed only with success).
    pub new_state: Option<Vec<u8>>,
    /// What the run's outgoing HTTP requests used: billed with the run.
    pub http: HttpUse,
    /// What its inference calls used, priced at its tenant's grants:
    /// billed with the run.
    pub tokens: crate::model::grants::TokenUse,
}

/// A run's outgoing HTTP requests (`wasi:http`), as its bill counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpUse {
    /// Requests sent.
    pub requests: u64,
    /// Bytes both ways, heads and bodies.
    pub bytes: u64,
}

/// What FINALIZE did with the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finalized {
    Succeeded,
    Failed,
    Cancelled,
    /// Back in the delayed queue for another attempt.
    Retrying {
        delay_ms: u64,
    },
    /// The agent's state moved on since this attempt read it: runs again.
    StateConflict,
}

/// What FINALIZE did with one attempt, and what the job has cost so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub result: Finalized,
    /// Credits settled over all the job's attempts.
    pub credits: u64,
}

/// What a cut text ends with, so a reader knows it was cut.
pub const CUT_MARK: &str = "\n[... truncated]";

/// Cuts `s` to at most `max` bytes on a character boundary, marking the
/// cut with [`CUT_MARK`] (counted in `max`; a `max` below the mark's length
/// keeps the bare cut). A text that fits is returned as it is.
pub fn truncate_utf8(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let room = max.checked_sub(CUT_MARK.len());
    let mut end = room.unwrap_or(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    match room {
        Some(_) => Cow::Owned(format!("{}{CUT_MARK}", &s[..end])),
        None => Cow::Borrowed(&s[..end]),
    }
}

/// ARGV of `lua/finalize.lua`, in its header's order: the call's
/// settings, then each attempt's fields.
struct FinalizeArgs<'a> {
    retry: Retry,
    max_conflicts: u32,
    prices: [u64; 4],
    max_faults: u32,
    attempts: Vec<FinalizeAttempt<'a>>,
}

/// The worker's next CLAIM, made by the FINALIZE call that ends its runs
/// ([`ControlPlane::finalize_many_then_claim`]).
#[derive(Debug, Clone, Copy)]
pub struct NextClaim<'a> {
    pub worker: &'a str,
    /// At most this many jobs (the slots the ended runs free).
    pub max: u32,
}

/// One attempt's fields in FINALIZE's ARGV.
struct FinalizeAttempt<'a> {
    job: &'a str,
    token: u64,
    outcome: &'a str,
    kind: &'a str,
    text: &'a str,
    fuel: u64,
    wall_ms: u64,
    log: Cow<'a, str>,
    state_mode: &'a str,
    state: &'a [u8],
    jitter: u32,
    http: HttpUse,
    http_cost: u64,
    tokens: crate::model::grants::TokenUse,
}

impl FinalizeArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.retry.base_ms)
            .arg(self.retry.max_ms)
            .arg(self.max_conflicts);
        for p in self.prices {
            inv.arg(p);
        }
        inv.arg(self.max_faults).arg(self.attempts.len());
        for a in &self.attempts {
            inv.arg(a.job)
                .arg(a.token)
                .arg(a.outcome)
                .arg(a.kind)
                .arg(a.text)
                .arg(a.fuel)
                .arg(a.wall_ms)
                .arg(a.log.as_ref())
                .arg(a.state_mode)
                .arg(a.state)
                .arg(a.jitter)
                .arg(a.http.requests)
                .arg(a.http.bytes)
                .arg(a.http_cost)
                .arg(a.tokens.tokens_in)
                .arg(a.tokens.tokens_out)
                .arg(a.tokens.credits());
        }
    }
}

/// ARGV of `lua/release.lua`, in its header's order.
struct ReleaseArgs<'a> {
    job: &'a str,
    token: u64,
    prices: [u64; 4],
    mode: &'a str,
    message: &'a str,
    max_faults: u32,
    retry: Retry,
}

impl ReleaseArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.job).arg(self.token);
        for p in self.prices {
            inv.arg(p);
        }
        inv.arg(self.mode).arg(self.message).arg(self.max_faults);
        self.retry.write(inv);
    }
}

/// ARGV of `lua/renew.lua`, in its header's order.
struct RenewArgs<'a> {
    job: &'a str,
    token: u64,
    lease_ms: u64,
}

impl RenewArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.job).arg(self.token).arg(self.lease_ms);
    }
}

impl ControlPlane {
    /// Extends the lease; `LeaseLost` or `Cancelled` tell the worker to stop.
    pub async fn renew(&self, lease: &Lease) -> Result<(), CpError> {
        let mut inv = scripts::RENEW.key(self.keys.tenant_anchor(&lease.tenant));
        inv.key(self.keys.job(&lease.tenant, &lease.job_id));
        RenewArgs {
            job: &lease.job_id,
            token: lease.token,
            lease_ms: self.cfg.lease_ms,
        }
        .write(&mut inv);
        let v: Value = self
            .eval(&mut inv, self.keys.shard_of(&lease.tenant))
            .await?;
        let (s, mut r) = Reply::status("RENEW", &v)?;
        match s {
            Status::Ok => {
                let _until: i64 = r.int("lease until")?;
                r.end()
            }
            Status::Lost => Err(CpError::LeaseLost),
            Status::Cancelled => Err(CpError::Cancelled),
            other => Err(r.unexpected(other)),
        }
    }

    /// Ends one attempt: [`ControlPlane::finalize_many`] of one.
    pub async fn finalize(&self, lease: &Lease, finish: &Finish) -> Result<Finalized, CpError> {
        let mut done = self.finalize_many(&[(lease, finish)]).await;
        done.pop()
            .expect("one answer per attempt")
            .map(|s| s.result)
    }

    /// Ends several attempts, in one FINALIZE call per shard: what a worker
    /// sends when ends pile up while its previous call is in flight. Each
    /// attempt is settled on its own (its token checked, its cost, its
    /// outcome), exactly as if it came alone; answers are in order.
    pub async fn finalize_many(&self, ends: &[(&Lease, &Finish)]) -> Vec<Result<Settled, CpError>> {
        self.finalize_many_then_claim(ends, None).await.0
    }

    /// [`finalize_many`](Self::finalize_many), and in the same call (the
    /// first shard's, when the attempts span several) up to `next.max` more
    /// CPU jobs for `next.worker`, as CLAIM picks them: a worker hands the
    /// slots these runs held straight to the jobs it gets, so a busy worker
    /// makes one call per batch instead of a FINALIZE and a CLAIM. A call
    /// whose answer is lost is sent again under the same claim id (the
    /// jobs it leased come back; an attempt it ended answers `lost`).
    pub async fn finalize_many_then_claim(
        &self,
        ends: &[(&Lease, &Finish)],
        mut next: Option<NextClaim<'_>>,
    ) -> (Vec<Result<Settled, CpError>>, Vec<Claim>) {
        let mut claimed = Vec::new();
        let mut answers: Vec<Option<Result<Settled, CpError>>> =
            ends.iter().map(|_| None).collect();
        // Over `max_state_bytes`, the attempt fails and no state is written.
        let mut finishes: Vec<Option<Finish>> = Vec::with_capacity(ends.len());
        let mut charges = Vec::with_capacity(ends.len());
        for (i, (lease, finish)) in ends.iter().enumerate() {
            match self.charge_state(lease, finish).await {
                Ok((over_quota, charge)) => {
                    finishes.push(over_quota);
                    charges.push(charge);
                }
                Err(e) => {
                    finishes.push(None);
                    charges.push(None);
                    answers[i] = Some(Err(e));
                }
            }
        }
        // One call per shard, over the attempts still to send.
        let mut shards: Vec<u32> = Vec::new();
        for (i, (lease, _)) in ends.iter().enumerate() {
            let s = self.keys.shard_of(&lease.tenant);
            if answers[i].is_none() && !shards.contains(&s) {
                shards.push(s);
            }
        }
        for shard in shards {
            let idx: Vec<usize> = (0..ends.len())
                .filter(|&i| answers[i].is_none() && self.keys.shard_of(&ends[i].0.tenant) == shard)
                .collect();
            let batch: Vec<(&Lease, &Finish)> = idx
                .iter()
                .map(|&i| (ends[i].0, finishes[i].as_ref().unwrap_or(ends[i].1)))
                .collect();
            let cid = ulid::Ulid::new().to_string();
            let ask = next.take().map(|n| (n, cid.as_str()));
            let mut result = self.finalize_script(&batch, shard, ask).await;
            if ask.is_some() && matches!(&result, Err(CpError::Redis(e)) if answer_lost(e)) {
                result = self.finalize_script(&batch, shard, ask).await;
            }
            match result {
                Ok((done, claims)) => {
                    for (&i, d) in idx.iter().zip(done) {
                        answers[i] = Some(d);
                    }
                    if let Some(v) = claims {
                        // Boxed: a record that cannot run is failed by a FINALIZE of
                        // its own, which comes back through here.
                        match Box::pin(self.claims_from(&v)).await {
                            Ok(c) => claimed = c,
                            // The jobs' leases run out and the reaper
                            // takes them back, uncharged.
                            Err(e) => tracing::error!(error = %e, "FINALIZE's claims unreadable"),
                        }
                    }
                }
                Err(e) => {
                    // The call as a whole failed: every attempt in it gets
                    // the error (it may have run; the worker retries, and a
                    // repeated attempt answers `lost`).
                    for &i in &idx {
                        answers[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(ends.len());
        for (answer, charge) in answers.into_iter().zip(charges) {
            let done = answer.expect("every attempt answered");
            // A state FINALIZE did not commit (lost, conflict, cancel wins) is
            // not kept counted; any other error leaves it unknown (the script
            // may have run), so the charge stays.
            let committed = matches!(
                done,
                Ok(Settled {
                    result: Finalized::Succeeded,
                    ..
                })
            ) || done.is_err();
            if let Some(charge) = charge
                && (!committed || matches!(done, Err(CpError::LeaseLost)))
            {
                // The job's outcome stands either way: a failed refund is logged.
                if let Err(e) = self.refund_bytes(&charge).await {
                    tracing::warn!(error = %e, "byte quota refund failed");
                }
            }
            out.push(done);
        }
        (out, claimed)
    }

    /// One FINALIZE call; with `next`, the worker's next CLAIM rides along
    /// (its claims answered raw, for [`claims_from`](Self::claims_from)).
    async fn finalize_script(
        &self,
        ends: &[(&Lease, &Finish)],
        shard: u32,
        next: Option<(NextClaim<'_>, &str)>,
    ) -> Result<(Vec<Result<Settled, CpError>>, Option<Value>), CpError> {
        let mut attempts = Vec::with_capacity(ends.len());
        let mut inv = scripts::FINALIZE.prepare_invoke();
        inv.key(self.keys.anchor(shard));
        for (lease, finish) in ends {
            let (outcome, kind, text) = match &finish.outcome {
                AttemptOutcome::Succeeded { output } => ("ok", "", output.as_str()),
                AttemptOutcome::Failed { kind, message } => {
                    ("failed", kind.as_str(), message.as_str())
                }
                AttemptOutcome::Cancelled => ("cancelled", "", ""),
            };
            if matches!(kind, "lease_expired" | "cancelled" | "unschedulable") {
                return Err(CpError::Invalid(format!(
                    "`{kind}` is decided by the control plane, not reported by a worker"
                )));
            }
            // Large states go to their own key, written by the script itself
            // with the commit (and the superseded version deleted in the same
            // step): nothing is written for a state that loses its race.
            let (state_mode, state): (&str, &[u8]) = match (&finish.new_state, &finish.outcome) {
                (Some(s), AttemptOutcome::Succeeded { .. })
                    if s.len() > self.cfg.state_inline_max =>
                {
                    ("blob", s)
                }
                (Some(s), AttemptOutcome::Succeeded { .. }) => ("inline", s),
                _ => ("none", &[]),
            };
            inv.key(self.keys.job(&lease.tenant, &lease.job_id));
            attempts.push(FinalizeAttempt {
                job: &lease.job_id,
                token: lease.token,
                outcome,
                kind,
                text,
                fuel: finish.fuel,
                wall_ms: finish.wall_ms,
                log: truncate_utf8(&finish.log, self.cfg.log_max_bytes),
                state_mode,
                state,
                jitter: self.retry().jitter,
                http: finish.http,
                http_cost: self
                    .cfg
                    .prices
                    .http_cost(finish.http.requests, finish.http.bytes),
                tokens: finish.tokens,
            });
        }
        let retry = self.retry();
        FinalizeArgs {
            retry,
            max_conflicts: MAX_STATE_CONFLICTS,
            prices: self.prices(),
            max_faults: self.cfg.max_node_faults,
            attempts,
        }
        .write(&mut inv);
        if let Some((n, cid)) = next {
            inv.arg(n.worker).arg(n.max).arg(self.cfg.lease_ms).arg(cid);
        }
        let v: Value = self.eval(&mut inv, shard).await?;
        let (answers, claims) = match (&v, next) {
            (Value::Array(two), Some(_)) if two.len() == 2 => (&two[0], Some(two[1].clone())),
            (_, Some(_)) => {
                return Err(bad(format!(
                    "FINALIZE answered {v:?}, not [answers, claims]"
                )));
            }
            (_, None) => (&v, None),
        };
        let mut all = Reply::new("FINALIZE", answers)?;
        let mut out = Vec::with_capacity(ends.len());
        for _ in ends {
            out.push(Self::finalized(all.item("answer")?));
        }
        all.end()?;
        Ok((out, claims))
    }

    /// One attempt's answer in FINALIZE's reply.
    fn finalized(v: &Value) -> Result<Settled, CpError> {
        let (s, mut r) = Reply::status("FINALIZE", v)?;
        let result = match s {
            Status::Succeeded => Finalized::Succeeded,
            Status::Failed => Finalized::Failed,
            Status::Cancelled => Finalized::Cancelled,
            Status::Retry => Finalized::Retrying {
                delay_ms: r.uint("delay_ms")?,
            },
            Status::Conflict => Finalized::StateConflict,
            Status::Lost => {
                r.end()?;
                return Err(CpError::LeaseLost);
            }
            other => return Err(r.unexpected(other)),
        };
        let credits = r.uint("credits")?;
        r.end()?;
        Ok(Settled { result, credits })
    }

    /// Hands a claimed job back to the queue uncharged (worker draining).
    /// Unbounded: draining is the operator's doing, never the job's.
    pub async fn release(&self, lease: &Lease) -> Result<(), CpError> {
        match self.release_script(lease, "drain", "").await? {
            Finalized::Failed => Err(bad("RELEASE failed a drained job")),
            _ => Ok(()),
        }
    }

    /// Hands back a job the node could not start (a node fault: a
    /// component or context it could not load, a failure of its own).
    /// Uncharged and not counted toward `max_attempts`; the job runs again
    /// after a backoff, until it has met `max_node_faults` of them: then it
    /// fails with `node_fault` (answered as [`Finalized::Failed`]).
    pub async fn release_fault(&self, lease: &Lease, message: &str) -> Result<Finalized, CpError> {
        self.release_script(lease, "fault", &truncate_utf8(message, FAULT_MESSAGE_MAX))
            .await
    }

    async fn release_script(
        &self,
        lease: &Lease,
        mode: &str,
        message: &str,
    ) -> Result<Finalized, CpError> {
        let mut inv = scripts::RELEASE.prepare_invoke();
        inv.key(self.keys.tenant_anchor(&lease.tenant))
            .key(self.keys.job(&lease.tenant, &lease.job_id));
        ReleaseArgs {
            job: &lease.job_id,
            token: lease.token,
            prices: self.prices(),
            mode,
            message,
            max_faults: self.cfg.max_node_faults,
            retry: self.retry(),
        }
        .write(&mut inv);
        let v: Value = self
            .eval(&mut inv, self.keys.shard_of(&lease.tenant))
            .await?;
        let (s, mut r) = Reply::status("RELEASE", &v)?;
        let done = match s {
            // Back in the ready queue at once.
            Status::Ok => Finalized::Retrying { delay_ms: 0 },
            Status::Retry => Finalized::Retrying {
                delay_ms: r.uint("delay_ms")?,
            },
            Status::Failed => Finalized::Failed,
            Status::Cancelled => Finalized::Cancelled,
            Status::Lost => return Err(CpError::LeaseLost),
            other => return Err(r.unexpected(other)),
        };
        r.end()?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_is_marked_on_a_character_boundary_within_the_bound() {
        assert_eq!(truncate_utf8("short", 100), "short");
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate_utf8(&long, 50);
        assert!(cut.len() <= 50, "{}", cut.len());
        assert!(cut.ends_with(CUT_MARK));
        assert!(cut.starts_with("éé"));
        // 50 - 16 = 34 bytes of text: 17 whole characters.
        assert_eq!(cut.trim_end_matches(CUT_MARK).chars().count(), 17);
        // Below the mark's length: the bare cut, still on a boundary.
        assert_eq!(truncate_utf8(&long, 15), "ééééééé");
    }
}
