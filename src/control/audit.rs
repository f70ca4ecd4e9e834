//! `agentplane audit`: checks every control-plane invariant against a live
//! deployment (read-only) and names each violation.
//!
//! What is checked, per tenant (found with SCAN, never KEYS):
//! - ledger: `granted`, `settled` and `reserved` equal the checkpoint plus the
//!   sums of the remaining entries, and `0 <= reserved <= balance`;
//! - `reserved` equals the sum of the reservations of the running jobs;
//! - every running job has a lease (not expired for longer than a grace)
//!   and a PEL entry under its worker; no PEL entry lacks a running job;
//! - no job is in two state indexes, and each index agrees with the job;
//! - the counters `running`, `gpus`, `queued` match the indexes;
//! - no eligible tenant is parked (a ready head, below its quotas, with the
//!   credits for the head's reservation, must be in an active set);
//! - no agent state pointer lacks its blob;
//! - every finished job is in the retention index, so it will be removed.
//!
//! Reads are not one snapshot, so a tenant with violations is re-checked a
//! few times and only violations seen every time are reported: a live
//! deployment moving between two reads is not a violation.

use super::conn::Conn;
use super::{ControlPlane, CpError};
use crate::model::JobState;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::streams::{StreamPendingCountReply, StreamPendingId};
use redis::{AsyncCommands, Value};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// Entries read per page (ledger, indexes, PEL): bounds each reply.
const PAGE: usize = 1_000;
/// Re-checks of a tenant that showed violations.
const RECHECKS: usize = 3;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// A stable name: `ledger_mismatch`, `reserved_mismatch`,
    /// `lease_missing`, `lease_expired`, `pel_missing`, `pel_orphan`,
    /// `job_in_two_states`, `index_mismatch`, `counter_mismatch`,
    /// `queue_entry_missing`, `delayed_missing`, `credits_out_of_range`,
    /// `tenant_parked_while_eligible`, `state_blob_missing`,
    /// `retention_missing`, `shard_paused`, `absent_key_exists`.
    pub kind: &'static str,
    /// What and where, for a human.
    pub detail: String,
}

/// What an audit found.
#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub shards: u32,
    pub tenants: usize,
    pub jobs: usize,
    pub agents: usize,
    pub violations: Vec<Violation>,
}

/// Settings of an audit.
#[derive(Debug, Clone, Copy)]
pub struct AuditOptions {
    /// A running job's lease may have expired this long ago before it is a
    /// violation (the reaper runs every fifth of a lease).
    pub lease_grace: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            lease_grace: Duration::from_secs(30),
        }
    }
}

/// The key holding an agent's large state, from its agent hash: `blob`
/// names the committed version (`S:state:<t>:<agent>:<version>`); `ptr` is
/// a legacy pointer to a content-addressed blob. One place, so a change in
/// how state blobs are keyed changes the audit with it.
pub fn state_blob_key(
    cp: &ControlPlane,
    tenant: &str,
    agent: &str,
    blob: Option<&str>,
    ptr: Option<&str>,
) -> Option<String> {
    if let Some(version) = blob.and_then(|b| b.parse::<u64>().ok()) {
        return Some(cp.keys.agent_state_blob(tenant, agent, version));
    }
    ptr.filter(|p| !p.is_empty())
        .map(|p| cp.keys.blob("state", p))
}

fn v(h: &HashMap<String, String>, k: &str) -> i64 {
    h.get(k)
        .and_then(|s| s.parse::<f64>().ok())
        .map(|f| f as i64)
        .unwrap_or(0)
}

struct Found(Vec<Violation>);

impl Found {
    fn add(&mut self, kind: &'static str, detail: String) {
        self.0.push(Violation { kind, detail });
    }
}

impl ControlPlane {
    /// Audits every shard; fails only when Redis cannot be read.
    pub async fn audit(&self, opts: AuditOptions) -> Result<AuditReport, CpError> {
        let mut report = AuditReport {
            shards: self.keys.shards(),
            ..AuditReport::default()
        };
        for shard in 0..self.keys.shards() {
            let tag = self.keys.tag(shard);
            // A shard left paused after a move (docs/OPERATIONS.md) runs
            // nothing: every script on it answers TRYAGAIN forever.
            let anchor: Option<String> = self.conn().get(self.keys.anchor(shard)).await?;
            if let Some(a) = anchor.filter(|a| a != "ready") {
                let mut found = Found(Vec::new());
                found.add(
                    "shard_paused",
                    format!(
                        "shard {shard}: anchor is `{a}`, not `ready`: set it back after the move"
                    ),
                );
                report.violations.extend(found.0);
            }
            // Scripts are kept off a shard whose slot is moving only while
            // this key does not exist (`KeySpace::absent`).
            let absent: bool = self.conn().exists(self.keys.absent(shard)).await?;
            if absent {
                let mut found = Found(Vec::new());
                found.add(
                    "absent_key_exists",
                    format!(
                        "shard {shard}: `{}` exists; delete it, or scripts may run while the \
                         shard's slot moves",
                        self.keys.absent(shard)
                    ),
                );
                report.violations.extend(found.0);
            }
            let mut tenants: Vec<String> = self
                .scan_shard(&tag, &format!("{tag}:t:*"))
                .await?
                .into_iter()
                .filter_map(|k| k.strip_prefix(&format!("{tag}:t:")).map(str::to_string))
                .collect();
            tenants.sort();
            for t in tenants {
                let mut seen: Option<BTreeSet<Violation>> = None;
                let mut jobs = 0;
                for attempt in 0..RECHECKS {
                    let mut found = Found(Vec::new());
                    jobs = self.audit_tenant(&t, opts, &mut found).await?;
                    let now: BTreeSet<Violation> = found.0.into_iter().collect();
                    let keep: BTreeSet<Violation> = match seen {
                        None => now,
                        Some(prev) => prev.intersection(&now).cloned().collect(),
                    };
                    let clean = keep.is_empty();
                    seen = Some(keep);
                    if clean || attempt + 1 == RECHECKS {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                report.tenants += 1;
                report.jobs += jobs;
                report.violations.extend(seen.unwrap_or_default());
            }
            let mut found = Found(Vec::new());
            report.agents += self.audit_agents(&tag, &mut found).await?;
            report.violations.extend(found.0);
        }
        Ok(report)
    }

    /// SCAN of one shard's keys: on a cluster, on the node that owns the
    /// shard's slot (a plain SCAN would only see one random node).
    pub(super) async fn scan_shard(
        &self,
        tag: &str,
        pattern: &str,
    ) -> Result<Vec<String>, CpError> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(PAGE);
            let v: Value = match &mut self.conn() {
                Conn::Single(c) => cmd.query_async(c).await?,
                Conn::Cluster(c) => {
                    let route = Route::with_key(tag.as_bytes(), SlotAddr::Master);
                    c.route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?
                }
            };
            let (next, keys): (u64, Vec<String>) = redis::FromRedisValue::from_redis_value(v)
                .map_err(|e| CpError::Internal(format!("SCAN answer: {e}")))?;
            out.extend(keys);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    async fn zset_all(&self, key: &str) -> Result<Vec<String>, CpError> {
        let mut out = Vec::new();
        loop {
            let page: Vec<String> = self
                .conn()
                .zrange(key, out.len() as isize, (out.len() + PAGE - 1) as isize)
                .await?;
            let n = page.len();
            out.extend(page);
            if n < PAGE {
                return Ok(out);
            }
        }
    }

    /// Audits one tenant; answers how many jobs it has.
    async fn audit_tenant(
        &self,
        t: &str,
        opts: AuditOptions,
        found: &mut Found,
    ) -> Result<usize, CpError> {
        let tag = self.keys.tenant_tag(t);
        let th: HashMap<String, String> = self.conn().hgetall(self.keys.tenant(t)).await?;

        // Money: checkpoint + remaining entries = counters.
        let s = self.ledger_sums(t, PAGE).await?;
        let sum = |op: &str| s.get(op).copied().unwrap_or(0);
        let (granted, settled, reserved) =
            (v(&th, "granted"), v(&th, "settled"), v(&th, "reserved"));
        let l_granted = v(&th, "ck_grant") + sum("grant");
        let l_settled = v(&th, "ck_settle") + sum("settle");
        let l_reserved = v(&th, "ck_reserve") + sum("reserve")
            - l_settled
            - v(&th, "ck_release")
            - sum("release");
        for (name, have, want) in [
            ("granted", granted, l_granted),
            ("settled", settled, l_settled),
            ("reserved", reserved, l_reserved),
        ] {
            if have != want {
                found.add(
                    "ledger_mismatch",
                    format!("tenant {t}: {name} is {have} but checkpoint + ledger give {want}"),
                );
            }
        }
        if reserved < 0 || reserved > granted - settled {
            found.add(
                "credits_out_of_range",
                format!(
                    "tenant {t}: reserved {reserved} outside 0..=balance {}",
                    granted - settled
                ),
            );
        }

        // Indexes: each job in exactly one state, agreeing with its hash.
        let mut state_of: HashMap<String, JobState> = HashMap::new();
        let mut by_state: HashMap<JobState, Vec<String>> = HashMap::new();
        for st in JobState::ALL {
            let ids = self
                .zset_all(&self.keys.jobs_in_state(t, st.as_str()))
                .await?;
            for id in &ids {
                if let Some(prev) = state_of.insert(id.clone(), st) {
                    found.add(
                        "job_in_two_states",
                        format!("tenant {t}: job {id} is in both js:{prev} and js:{st}"),
                    );
                }
            }
            by_state.insert(st, ids);
        }
        let all = self.zset_all(&self.keys.jobs(t)).await?;
        const F: [&str; 5] = ["state", "reserved", "gpus", "sid", "worker"];
        let mut fields: HashMap<String, Vec<Option<String>>> = HashMap::new();
        let ids: Vec<&String> = state_of.keys().collect();
        for chunk in ids.chunks(PAGE) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET").arg(self.keys.job(t, id)).arg(&F[..]);
            }
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
            for (id, row) in chunk.iter().zip(rows) {
                fields.insert((*id).clone(), row);
            }
        }
        for (id, st) in &state_of {
            let have = fields.get(id).and_then(|r| r[0].clone());
            if have.as_deref() != Some(st.as_str()) {
                found.add(
                    "index_mismatch",
                    format!(
                        "tenant {t}: job {id} is in js:{st} but its hash says {}",
                        have.unwrap_or_else(|| "nothing (no job)".into())
                    ),
                );
            }
        }
        let indexed: BTreeSet<&String> = all.iter().collect();
        for id in state_of.keys() {
            if !indexed.contains(id) {
                found.add(
                    "index_mismatch",
                    format!("tenant {t}: job {id} is in a state index but not in jobs:{t}"),
                );
            }
        }
        for id in &all {
            if !state_of.contains_key(id) {
                found.add(
                    "index_mismatch",
                    format!("tenant {t}: job {id} is in jobs:{t} but in no state index"),
                );
            }
        }
        // Finished jobs are in `done`, or the retention sweep never removes them.
        let finished: Vec<&String> = state_of
            .iter()
            .filter(|(_, st)| st.is_terminal())
            .map(|(id, _)| id)
            .collect();
        for chunk in finished.chunks(PAGE) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.zscore(format!("{tag}:done"), id);
            }
            let scores: Vec<Option<f64>> = pipe.query_async(&mut self.conn()).await?;
            for (id, score) in chunk.iter().zip(scores) {
                if score.is_none() {
                    found.add(
                        "retention_missing",
                        format!(
                            "tenant {t}: finished job {id} is not in the retention index (done)"
                        ),
                    );
                }
            }
        }
        let field = |id: &str, i: usize| {
            fields
                .get(id)
                .and_then(|r| r[i].clone())
                .unwrap_or_default()
        };
        let num = |id: &str, i: usize| field(id, i).parse::<i64>().unwrap_or(0);

        // Running jobs: reservation, GPUs, lease, PEL entry.
        let running = &by_state[&JobState::Running];
        let now = crate::model::now_ms() as i64;
        let leases = format!("{tag}:leases");
        let mut sids: HashMap<String, String> = HashMap::new();
        let (mut sum_reserved, mut sum_gpus) = (0i64, 0i64);
        for id in running {
            sum_reserved += num(id, 1);
            sum_gpus += num(id, 2);
            let sid = field(id, 3);
            let worker = field(id, 4);
            let lease: Option<f64> = self.conn().zscore(&leases, id).await?;
            match lease {
                None => found.add("lease_missing", format!("tenant {t}: running job {id} has no lease")),
                Some(until) if (until as i64) < now - opts.lease_grace.as_millis() as i64 => found.add(
                    "lease_expired",
                    format!(
                        "tenant {t}: running job {id}'s lease expired {} ms ago and was not reaped",
                        now - until as i64
                    ),
                ),
                Some(_) => {}
            }
            let pel: Vec<StreamPendingId> = if sid.is_empty() {
                Vec::new()
            } else {
                let r: StreamPendingCountReply = redis::cmd("XPENDING")
                    .arg(self.keys.queue(t))
                    .arg("g")
                    .arg(&sid)
                    .arg(&sid)
                    .arg(1)
                    .query_async(&mut self.conn())
                    .await?;
                r.ids
            };
            let consumer = pel.first().map(|e| e.consumer.clone());
            match consumer {
                None => found.add(
                    "pel_missing",
                    format!("tenant {t}: running job {id} has no PEL entry (sid `{sid}`)"),
                ),
                Some(c) if c != worker => found.add(
                    "pel_missing",
                    format!("tenant {t}: running job {id}'s PEL entry is held by `{c}`, not its worker `{worker}`"),
                ),
                Some(_) => {}
            }
            sids.insert(sid, id.clone());
        }
        if sum_reserved != reserved {
            found.add(
                "reserved_mismatch",
                format!("tenant {t}: reserved is {reserved} but running jobs hold {sum_reserved}"),
            );
        }
        // PEL entries without a running job.
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(self.keys.queue(t))
            .arg("g")
            .arg("-")
            .arg("+")
            .arg(PAGE)
            .query_async(&mut self.conn())
            .await?;
        for e in &pending.ids {
            let sid = &e.id;
            if !sids.contains_key(sid) {
                found.add(
                    "pel_orphan",
                    format!("tenant {t}: PEL entry {sid} belongs to no running job"),
                );
            }
        }

        // Counters.
        let queued = by_state[&JobState::Queued].len() + by_state[&JobState::Delayed].len();
        for (name, have, want) in [
            ("running", v(&th, "running"), running.len() as i64),
            ("gpus", v(&th, "gpus"), sum_gpus),
            ("queued", v(&th, "queued"), queued as i64),
        ] {
            if have != want {
                found.add(
                    "counter_mismatch",
                    format!("tenant {t}: {name} is {have} but the indexes give {want}"),
                );
            }
        }
        // Waiting jobs are where they wait.
        for id in &by_state[&JobState::Queued] {
            let sid = field(id, 3);
            let e: redis::streams::StreamRangeReply = if sid.is_empty() {
                Default::default()
            } else {
                self.conn().xrange(self.keys.queue(t), &sid, &sid).await?
            };
            if e.ids.is_empty() {
                found.add(
                    "queue_entry_missing",
                    format!("tenant {t}: queued job {id} has no stream entry"),
                );
            }
        }
        for id in &by_state[&JobState::Delayed] {
            let due: Option<f64> = self.conn().zscore(format!("{tag}:delayed"), id).await?;
            if due.is_none() {
                found.add(
                    "delayed_missing",
                    format!("tenant {t}: delayed job {id} is not in the delayed set"),
                );
            }
        }
        self.audit_parking(t, &th, found).await?;
        Ok(all.len().max(state_of.len()))
    }

    /// An eligible tenant (ready head, below quotas, credits for the head's
    /// reservation) must be in an active set, or CLAIM never sees it.
    async fn audit_parking(
        &self,
        t: &str,
        th: &HashMap<String, String>,
        found: &mut Found,
    ) -> Result<(), CpError> {
        let tag = self.keys.tenant_tag(t);
        let last = th
            .get("qlast")
            .filter(|s| !s.is_empty())
            .cloned()
            .unwrap_or("0-0".into());
        let head: redis::streams::StreamRangeReply = self
            .conn()
            .xrange_count(self.keys.queue(t), format!("({last}"), "+", 1)
            .await?;
        let Some(entry) = head.ids.first() else {
            return Ok(());
        };
        let jid = entry.map.get("j").map(super::v_str).unwrap_or_default();
        let jf: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.job(t, &jid))
            .arg(&["state", "gpus", "fuel", "timeout_ms"])
            .query_async(&mut self.conn())
            .await?;
        if jf[0].as_deref() != Some("queued") {
            return Ok(()); // CLAIM drops a stale head itself.
        }
        let jn = |i: usize| {
            jf[i]
                .as_deref()
                .filter(|s| !s.is_empty())
                .and_then(|s| s.parse::<i64>().ok())
        };
        let g = jn(1).unwrap_or(0);
        let fuel = jn(2).map_or(v(th, "fuel"), |f| f.min(v(th, "fuel")));
        let timeout = jn(3).map_or(v(th, "timeout_ms"), |x| x.min(v(th, "timeout_ms")));
        let p = self.cfg.prices;
        // As lib.lua's reservation(); fuel, time and GPUs are non-negative.
        let ceil = |a: i128, b: i128| (a + b - 1) / b;
        let r = ceil(fuel as i128 * p.credits_per_mfuel as i128, 1_000_000)
            + ceil(
                timeout as i128 * g as i128 * p.credits_per_gpu_second as i128,
                1000,
            );
        let free = (v(th, "granted") - v(th, "settled") - v(th, "reserved")) as i128;
        let eligible = v(th, "running") < v(th, "max_running")
            && v(th, "gpus") + g <= v(th, "max_gpus")
            && free >= r;
        if !eligible {
            return Ok(());
        }
        let mut active = false;
        for set in ["act:cpu", "act:gpu"] {
            let s: Option<f64> = self.conn().zscore(format!("{tag}:{set}"), t).await?;
            active |= s.is_some();
        }
        if !active {
            found.add(
                "tenant_parked_while_eligible",
                format!(
                    "tenant {t}: head job {jid} can run (free credits {free} >= {r}) but the tenant is in no active set (parked reason `{}`)",
                    th.get("parked").cloned().unwrap_or_default()
                ),
            );
        }
        Ok(())
    }

    /// Every agent whose state lives in a blob has that blob.
    async fn audit_agents(&self, tag: &str, found: &mut Found) -> Result<usize, CpError> {
        let prefix = format!("{tag}:agent:");
        let keys = self.scan_shard(tag, &format!("{prefix}*")).await?;
        for key in &keys {
            let Some((t, agent)) = key.strip_prefix(&prefix).and_then(|r| r.split_once(':')) else {
                continue;
            };
            let (blob, ptr): (Option<String>, Option<String>) =
                self.conn().hmget(key, &["blob", "ptr"]).await?;
            let blob = blob.filter(|b| !b.is_empty());
            let Some(blob_key) = state_blob_key(self, t, agent, blob.as_deref(), ptr.as_deref())
            else {
                continue;
            };
            let exists: bool = self.conn().exists(&blob_key).await?;
            if !exists {
                found.add(
                    "state_blob_missing",
                    format!("tenant {t}: agent {agent}'s state {blob_key} is missing"),
                );
            }
        }
        Ok(keys.len())
    }
}
