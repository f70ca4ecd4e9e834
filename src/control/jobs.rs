//! Reads for the API: a job, its log, a tenant's job list, its ledger.
//! Plain HMGETs of the fields shown (never a job's whole hash).

use super::*;

/// One entry of a tenant's credit ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    /// `grant`, `reserve`, `settle` or `release`.
    pub op: String,
    pub job: String,
    pub attempt: u32,
    pub amount: i64,
    /// A settle's: the part of the attempt's reservation handed back
    /// uncharged (0 otherwise).
    pub released: i64,
}

impl ControlPlane {
    /// Up to `n` of a tenant's job ids, newest first, older than `cursor`
    /// (job ids are ULIDs, so the index's lexical order is their age), from
    /// the index of `state` or of all its jobs.
    pub(super) async fn newest_ids(
        &self,
        tenant: &str,
        state: Option<JobState>,
        cursor: Option<&str>,
        n: usize,
    ) -> Result<Vec<String>, CpError> {
        let index = match state {
            Some(s) => self.keys.jobs_in_state(tenant, s.as_str()),
            None => self.keys.jobs(tenant),
        };
        let max = cursor.map_or_else(|| "+".to_string(), |c| format!("({c}"));
        Ok(redis::cmd("ZRANGE")
            .arg(&index)
            .arg(&max)
            .arg("-")
            .arg("BYLEX")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(n)
            .query_async(&mut self.conn())
            .await?)
    }

    pub(super) fn job_from_hash(id: &str, h: &HashMap<String, String>) -> Option<Job> {
        let state = h.get("state")?.parse::<JobState>().ok()?;
        let kind = h
            .get("ekind")
            .filter(|k| !k.is_empty())
            .and_then(|k| k.parse::<ErrorKind>().ok());
        // A job shows its last error only while it is not succeeded; a
        // retrying (delayed/queued) job shows why its last attempt failed.
        let error = kind
            .filter(|_| state != JobState::Succeeded)
            .map(|kind| JobError {
                kind,
                message: h.get("emsg").cloned().unwrap_or_default(),
            });
        Some(Job {
            id: id.to_string(),
            tenant: h.get("tenant").cloned().unwrap_or_default(),
            state,
            component: h.get("component").cloned().unwrap_or_default(),
            // Attempts that count toward max_attempts; `attempts` in Redis
            // numbers every run (the ledger's run numbers).
            attempts: if h.contains_key("counted") {
                num(h, "counted")
            } else {
                num(h, "attempts")
            } as u32,
            output: (state == JobState::Succeeded)
                .then(|| h.get("output").cloned().unwrap_or_default()),
            error,
            usage: Usage {
                fuel: num(h, "u_fuel") as u64,
                wall_ms: num(h, "u_wall") as u64,
                credits: num(h, "u_credits"),
                http_requests: num(h, "u_http_req") as u64,
                http_bytes: num(h, "u_http_bytes") as u64,
                tokens_in: num(h, "u_tok_in") as u64,
                tokens_out: num(h, "u_tok_out") as u64,
            },
            created_at: rfc3339_ms(num(h, "created") as u64),
            started_at: opt_time(h, "started"),
            finished_at: opt_time(h, "finished"),
            agent_id: h.get("agent_id").filter(|a| !a.is_empty()).cloned(),
            gpus: num(h, "gpus") as u32,
            max_attempts: num(h, "max_attempts") as u32,
            callback: h
                .get("callback")
                .filter(|c| !c.is_empty())
                .map(|url| Callback {
                    url: url.clone(),
                    // Owed from the finish on; `pending` until a first try.
                    state: h
                        .get("cb_state")
                        .filter(|s| !s.is_empty())
                        .cloned()
                        .unwrap_or_else(|| "pending".into()),
                    attempts: num(h, "cb_attempts") as u32,
                }),
        })
    }

    /// The fields of a job hash that [`Job`] shows, never the input (up to
    /// 1 MiB each: a page of whole records was 105 MB for 100 jobs).
    const JOB_VIEW: [&'static str; 24] = [
        "tenant",
        "state",
        "component",
        "attempts",
        "counted",
        "output",
        "ekind",
        "emsg",
        "u_fuel",
        "u_wall",
        "u_credits",
        "u_http_req",
        "u_http_bytes",
        "u_tok_in",
        "u_tok_out",
        "created",
        "started",
        "finished",
        "agent_id",
        "gpus",
        "max_attempts",
        "callback",
        "cb_state",
        "cb_attempts",
    ];

    pub(super) fn view_cmd(&self, tenant: &str, id: &str) -> redis::Cmd {
        let mut c = redis::cmd("HMGET");
        c.arg(self.keys.job(tenant, id)).arg(&Self::JOB_VIEW[..]);
        c
    }

    pub(super) fn view_map(vals: Vec<Option<String>>) -> HashMap<String, String> {
        Self::JOB_VIEW
            .iter()
            .zip(vals)
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect()
    }

    /// The tenant's job `id`; `None` when absent or another tenant's.
    pub async fn job(&self, tenant: &TenantId, id: &str) -> Result<Option<Job>, CpError> {
        if ulid::Ulid::from_string(id).is_err() {
            return Ok(None);
        }
        let vals: Vec<Option<String>> = self
            .view_cmd(tenant, id)
            .query_async(&mut self.conn())
            .await?;
        let h = Self::view_map(vals);
        if h.get("tenant").map(String::as_str) != Some(tenant) {
            return Ok(None);
        }
        Ok(Self::job_from_hash(id, &h))
    }

    pub async fn job_log(&self, tenant: &TenantId, id: &str) -> Result<Option<String>, CpError> {
        if self.job(tenant, id).await?.is_none() {
            return Ok(None);
        }
        let log: Option<String> = self.conn().get(self.keys.job_log(tenant, id)).await?;
        Ok(Some(log.unwrap_or_default()))
    }

    /// Newest first; `cursor` is the last id of the previous page.
    pub async fn list_jobs(
        &self,
        tenant: &TenantId,
        state: Option<JobState>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<Job>, Option<String>), CpError> {
        if let Some(c) = cursor
            && ulid::Ulid::from_string(c).is_err()
        {
            return Err(CpError::Invalid("cursor is not a job id".into()));
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let ids = self.newest_ids(tenant, state, cursor, limit + 1).await?;
        let more = ids.len() > limit;
        let ids = &ids[..ids.len().min(limit)];
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.add_command(self.view_cmd(tenant, id));
        }
        let hashes: Vec<HashMap<String, String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
            rows.into_iter().map(Self::view_map).collect()
        };
        let jobs: Vec<Job> = ids
            .iter()
            .zip(hashes.iter())
            .filter_map(|(id, h)| Self::job_from_hash(id, h))
            .collect();
        let next = if more { ids.last().cloned() } else { None };
        Ok((jobs, next))
    }

    /// Consumers and pending (delivered, unacknowledged) entries of the
    /// tenant's ready-queue consumer group, for operators and tests.
    pub async fn queue_group(&self, tenant: &TenantId) -> Result<(usize, usize), CpError> {
        let info: redis::streams::StreamInfoGroupsReply =
            self.conn().xinfo_groups(self.keys.queue(tenant)).await?;
        Ok(info
            .groups
            .first()
            .map(|g| (g.consumers, g.pending))
            .unwrap_or((0, 0)))
    }

    /// The tenant's remaining credit ledger, oldest first: `(op, job,
    /// attempt, amount)`. Entries older than the retention are folded into
    /// [`ControlPlane::ledger_checkpoint`].
    pub async fn ledger(&self, tenant: &TenantId) -> Result<Vec<LedgerEntry>, CpError> {
        let entries: redis::streams::StreamRangeReply =
            self.conn().xrange_all(self.keys.ledger(tenant)).await?;
        entries
            .ids
            .into_iter()
            .map(|e| {
                let get = |k: &str| e.map.get(k).map(v_str).unwrap_or_default();
                let attempt = exact_int("attempt", Some(&get("attempt")))?;
                Ok(LedgerEntry {
                    op: get("op"),
                    job: get("job"),
                    attempt: u32::try_from(attempt)
                        .map_err(|_| bad(format!("ledger attempt {attempt} out of range")))?,
                    amount: exact_int("amount", Some(&get("amount")))?,
                    released: match e.map.get("released") {
                        Some(r) => exact_int("released", Some(&v_str(r)))?,
                        None => 0,
                    },
                })
            })
            .collect()
    }
}
