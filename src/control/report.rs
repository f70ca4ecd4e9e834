//! What a tenant is billed, read back: its ledger a page at a time, its
//! usage by hour or day, and credit grants made at most once per
//! `Idempotency-Key`. Reads only, except the grant (one TENANT call).

use super::*;
use std::collections::BTreeMap;

/// Jobs one usage report reads at most: each is one HMGET (pipelined), so
/// this bounds what one request costs Redis. A wider window answers
/// `truncated`.
pub const USAGE_MAX_JOBS: usize = 50_000;

/// One entry of a tenant's ledger as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LedgerRow {
    /// The stream id: the cursor of the next page starts after it.
    pub id: String,
    /// When it was written (RFC 3339, ms).
    pub time: String,
    /// `grant`, `reserve`, `settle` or `release`.
    pub op: String,
    /// The job (empty for a grant).
    pub job: String,
    /// The job's run number (0 for a grant).
    pub attempt: u32,
    pub amount: i64,
    /// A settle's: the part of the attempt's reservation handed back
    /// uncharged with it (reserve = settle amount + released); 0 otherwise.
    #[serde(default)]
    pub released: i64,
    /// The tenant's balance and reservation just after this entry.
    pub balance: i64,
    pub reserved: i64,
}

/// `GET /v1/tenants/{id}/ledger`: a page, oldest first, and what retention
/// already folded away (so `checkpoint + Σ entries` is the whole history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LedgerPage {
    pub entries: Vec<LedgerRow>,
    pub next_cursor: Option<String>,
    pub checkpoint: LedgerCheckpoint,
}

/// One bucket of `GET /v1/tenants/{id}/usage`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageBucket {
    /// Start of the bucket (RFC 3339); empty for the total.
    pub start: String,
    pub fuel: u64,
    /// Slot time held by the jobs' attempts (ms): slot-seconds × 1000.
    pub slot_ms: u64,
    /// GPU time (ms): the slot time of each job times its GPUs.
    pub gpu_ms: u64,
    /// Credits settled for these jobs.
    pub credits: i64,
    /// Outgoing HTTP requests their agents sent, and those requests'
    /// bytes both ways.
    #[serde(default)]
    pub http_requests: u64,
    #[serde(default)]
    pub http_bytes: u64,
    /// Inference tokens their agents read and generated.
    #[serde(default)]
    pub tokens_in: u64,
    #[serde(default)]
    pub tokens_out: u64,
    /// Jobs by state now (`succeeded`, `failed`, `cancelled`, or still
    /// `queued`, `delayed`, `running`).
    pub jobs: BTreeMap<String, u64>,
    /// Failed jobs by error kind.
    pub failures: BTreeMap<String, u64>,
}

/// `GET /v1/tenants/{id}/usage?from=&to=&by=`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub tenant: String,
    pub from: String,
    pub to: String,
    /// `hour` or `day`.
    pub by: String,
    pub buckets: Vec<UsageBucket>,
    pub total: UsageBucket,
    /// True when the window held more than [`USAGE_MAX_JOBS`] jobs: only
    /// the oldest were counted; ask for a narrower window.
    pub truncated: bool,
}

impl UsageBucket {
    fn add(&mut self, h: &HashMap<String, String>) {
        let wall = num(h, "u_wall").max(0) as u64;
        self.fuel += num(h, "u_fuel").max(0) as u64;
        self.slot_ms += wall;
        self.gpu_ms += wall * num(h, "gpus").max(0) as u64;
        self.credits += num(h, "u_credits");
        self.http_requests += num(h, "u_http_req").max(0) as u64;
        self.http_bytes += num(h, "u_http_bytes").max(0) as u64;
        self.tokens_in += num(h, "u_tok_in").max(0) as u64;
        self.tokens_out += num(h, "u_tok_out").max(0) as u64;
        let state = h.get("state").cloned().unwrap_or_default();
        if state == "failed"
            && let Some(k) = h.get("ekind").filter(|k| !k.is_empty())
        {
            *self.failures.entry(k.clone()).or_default() += 1;
        }
        *self.jobs.entry(state).or_default() += 1;
    }
}

impl ControlPlane {
    /// Sums of the tenant's ledger entries by op, read `page` entries at a
    /// time (the audit's check of the books against the counters). A
    /// settle's `released` counts as the release it carries.
    pub(super) async fn ledger_sums(
        &self,
        t: &str,
        page: usize,
    ) -> Result<std::collections::HashMap<String, i64>, CpError> {
        let key = self.keys.ledger(t);
        let mut sums = std::collections::HashMap::new();
        let mut from = "-".to_string();
        loop {
            let reply: redis::streams::StreamRangeReply =
                self.conn().xrange_count(&key, &from, "+", page).await?;
            for e in &reply.ids {
                let get = |k: &str| e.map.get(k).map(v_str).unwrap_or_default();
                *sums.entry(get("op")).or_insert(0) += get("amount").parse::<i64>().unwrap_or(0);
                *sums.entry("release".into()).or_insert(0) +=
                    get("released").parse::<i64>().unwrap_or(0);
            }
            match reply.ids.last() {
                Some(last) if reply.ids.len() == page => from = format!("({}", last.id),
                _ => return Ok(sums),
            }
        }
    }

    /// Up to `limit` ledger entries after stream id `cursor`, oldest first.
    pub async fn ledger_page(
        &self,
        tenant: &TenantId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<LedgerPage, CpError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let start = match cursor {
            Some(c) if valid_stream_id(c) => format!("({c}"),
            Some(_) => return Err(CpError::Invalid("`cursor` is not a ledger id".into())),
            None => "-".into(),
        };
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.ledger(tenant))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit + 1)
            .query_async(&mut self.conn())
            .await?;
        let more = reply.ids.len() > limit;
        let mut entries = Vec::with_capacity(limit.min(reply.ids.len()));
        for e in reply.ids.into_iter().take(limit) {
            let get = |k: &str| e.map.get(k).map(v_str).unwrap_or_default();
            let int = |k: &str| exact_int(k, Some(&get(k)));
            let attempt = int("attempt")?;
            let ms =
                e.id.split('-')
                    .next()
                    .and_then(|m| m.parse::<u64>().ok())
                    .unwrap_or(0);
            entries.push(LedgerRow {
                time: rfc3339_ms(ms),
                op: get("op"),
                job: get("job"),
                attempt: u32::try_from(attempt)
                    .map_err(|_| bad(format!("ledger attempt {attempt} out of range")))?,
                amount: int("amount")?,
                released: match e.map.get("released") {
                    Some(_) => int("released")?,
                    None => 0,
                },
                balance: int("balance")?,
                reserved: int("reserved")?,
                id: e.id,
            });
        }
        let next_cursor = if more {
            entries.last().map(|e| e.id.clone())
        } else {
            None
        };
        Ok(LedgerPage {
            entries,
            next_cursor,
            checkpoint: self.ledger_checkpoint(tenant).await?,
        })
    }

    /// The tenant's usage over the jobs submitted in `[from_ms, to_ms)`, in
    /// buckets of `bucket_ms` by submission time. A job counts once, with
    /// everything its attempts used so far; it is found by its id (a ULID
    /// starts with its creation time), so the read is bounded by the
    /// window, never the tenant's whole history.
    pub async fn usage(
        &self,
        tenant: &TenantId,
        from_ms: u64,
        to_ms: u64,
        bucket_ms: u64,
        by: &str,
    ) -> Result<UsageReport, CpError> {
        let bucket_ms = bucket_ms.max(1);
        let lo = ulid::Ulid::from_parts(from_ms, 0).to_string();
        let hi = ulid::Ulid::from_parts(to_ms, 0).to_string();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.keys.jobs(tenant))
            .arg(format!("[{lo}"))
            .arg(format!("({hi}"))
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(USAGE_MAX_JOBS + 1)
            .query_async(&mut self.conn())
            .await?;
        let truncated = ids.len() > USAGE_MAX_JOBS;
        let ids = &ids[..ids.len().min(USAGE_MAX_JOBS)];
        let fields = [
            "state",
            "ekind",
            "u_fuel",
            "u_wall",
            "u_credits",
            "u_http_req",
            "u_http_bytes",
            "u_tok_in",
            "u_tok_out",
            "gpus",
            "created",
        ];
        let mut buckets: BTreeMap<u64, UsageBucket> = BTreeMap::new();
        let mut total = UsageBucket::default();
        for chunk in ids.chunks(MAX_PAGE) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(self.keys.job(tenant, id))
                    .arg(&fields[..]);
            }
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
            for row in rows {
                let h: HashMap<String, String> = fields
                    .iter()
                    .zip(row)
                    .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                    .collect();
                // Removed by retention between the two reads.
                if !h.contains_key("state") {
                    continue;
                }
                let created = num(&h, "created").max(0) as u64;
                let start = from_ms + (created.saturating_sub(from_ms) / bucket_ms) * bucket_ms;
                buckets.entry(start).or_default().add(&h);
                total.add(&h);
            }
        }
        let buckets = buckets
            .into_iter()
            .map(|(start, mut b)| {
                b.start = rfc3339_ms(start);
                b
            })
            .collect();
        Ok(UsageReport {
            tenant: tenant.to_string(),
            from: rfc3339_ms(from_ms),
            to: rfc3339_ms(to_ms),
            by: by.to_string(),
            buckets,
            total,
            truncated,
        })
    }
}

/// `<ms>-<seq>`, the shape of a Redis stream id.
fn valid_stream_id(s: &str) -> bool {
    let mut parts = s.splitn(2, '-');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()))
    };
    ok(parts.next()) && ok(parts.next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids() {
        assert!(valid_stream_id("1700000000000-0"));
        assert!(!valid_stream_id("1700000000000"));
        assert!(!valid_stream_id("a-0"));
        assert!(!valid_stream_id("1-"));
        assert!(!valid_stream_id("1-2-3"));
    }
}
