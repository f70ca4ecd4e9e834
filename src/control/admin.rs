//! What an operator reads across tenants: every tenant with its counters
//! and its share of capacity over the last minute, jobs across tenants by
//! state and error kind; and the retry of a failed job.

use super::*;

/// The window of [`TenantRow::share_1m`].
pub const SHARE_WINDOW_MS: u64 = 60_000;

/// Jobs finished in the share window read per shard at most (each is one
/// HMGET): beyond, the share is computed over the most recent ones.
const SHARE_MAX_JOBS: isize = 10_000;

/// Ids examined per page of [`ControlPlane::admin_jobs`] at most, per
/// page slot: a filter by error kind may skip many jobs, and a page that
/// examined this many answers short with a cursor.
const SCAN_FACTOR: usize = 10;

/// One tenant of `GET /v1/admin/tenants`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantRow {
    #[serde(flatten)]
    pub info: TenantInfo,
    /// Fraction (0..1) of the slot time used by all tenants in the last
    /// minute that this tenant used (a GPU weighs `gpu_slot_weight` slots).
    pub share_1m: f64,
    /// `weight` over the weights of the tenants that used capacity in the
    /// last minute (or of all, when none did): the share fair scheduling
    /// aims at while they all have work.
    pub weight_share: f64,
}

impl ControlPlane {
    /// Every tenant id, sorted (SCAN of each shard, never KEYS). Keys under
    /// `t:` that are not a tenant's (`t:<id>:...` sub-keys) do not parse.
    pub async fn tenant_ids(&self) -> Result<Vec<TenantId>, CpError> {
        let mut out = Vec::new();
        for shard in 0..self.keys.shards() {
            let tag = self.keys.tag(shard);
            let prefix = format!("{tag}:t:");
            out.extend(
                self.scan_shard(&tag, &format!("{prefix}*"))
                    .await?
                    .into_iter()
                    .filter_map(|k| {
                        k.strip_prefix(&prefix)
                            .and_then(|t| TenantId::parse(t).ok())
                    }),
            );
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Slot-ms each tenant used in the last [`SHARE_WINDOW_MS`]: running
    /// jobs since they started, jobs finished in the window for the part
    /// of their run inside it.
    async fn recent_slot_ms(&self, tenants: &[TenantId]) -> Result<HashMap<String, f64>, CpError> {
        let now = now_ms();
        let since = now.saturating_sub(SHARE_WINDOW_MS);
        let gpuw = self.cfg.prices.gpu_slot_weight as f64;
        let mut ids: Vec<(String, String)> = Vec::new();
        for shard in 0..self.keys.shards() {
            let done: Vec<String> = redis::cmd("ZRANGE")
                .arg(format!("{}:done", self.keys.tag(shard)))
                .arg("+inf")
                .arg(since)
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(SHARE_MAX_JOBS)
                .query_async(&mut self.conn())
                .await?;
            ids.extend(done.into_iter().map(|j| (self.keys.tag(shard), j)));
        }
        for t in tenants {
            let running: Vec<String> = self
                .conn()
                .zrange(self.keys.jobs_in_state(t, "running"), 0, -1)
                .await?;
            ids.extend(running.into_iter().map(|j| (self.keys.tenant_tag(t), j)));
        }
        let mut used: HashMap<String, f64> = HashMap::new();
        for chunk in ids.chunks(MAX_PAGE) {
            let mut pipe = redis::pipe();
            for (tag, j) in chunk {
                pipe.cmd("HMGET")
                    .arg(format!("{tag}:j:{j}"))
                    .arg(&["tenant", "started", "finished", "gpus", "state"][..]);
            }
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
            for row in rows {
                let [tenant, started, finished, gpus, state] = <[Option<String>; 5]>::try_from(row)
                    .map_err(|_| bad("HMGET answered the wrong number of fields"))?;
                let Some(tenant) = tenant else { continue };
                let p = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok());
                let Some(started) = p(started) else { continue };
                let end = match state.as_deref() {
                    Some("running") => now,
                    _ => p(finished).unwrap_or(now),
                };
                let ms = end.min(now).saturating_sub(started.max(since));
                let weight = 1.0 + p(gpus).unwrap_or(0) as f64 * gpuw;
                *used.entry(tenant).or_default() += ms as f64 * weight;
            }
        }
        Ok(used)
    }

    /// A page of tenants after `cursor` (a tenant id), sorted by id, with
    /// their counters and recent share of capacity.
    pub async fn admin_tenants(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<TenantRow>, Option<String>), CpError> {
        let all = self.tenant_ids().await?;
        let used = self.recent_slot_ms(&all).await?;
        let total: f64 = used.values().sum();
        let mut infos = Vec::new();
        for t in &all {
            if let Some(info) = self.tenant(t).await? {
                infos.push(info);
            }
        }
        let active: Vec<&TenantInfo> = infos
            .iter()
            .filter(|i| used.get(&i.id).is_some_and(|u| *u > 0.0))
            .collect();
        let weights: f64 = if active.is_empty() {
            infos.iter().map(|i| f64::from(i.weight)).sum()
        } else {
            active.iter().map(|i| f64::from(i.weight)).sum()
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let page: Vec<TenantRow> = infos
            .into_iter()
            .filter(|i| cursor.is_none_or(|c| i.id.as_str() > c))
            .take(limit + 1)
            .map(|info| {
                let u = used.get(&info.id).copied().unwrap_or(0.0);
                TenantRow {
                    share_1m: if total > 0.0 { u / total } else { 0.0 },
                    weight_share: if weights > 0.0 {
                        f64::from(info.weight) / weights
                    } else {
                        0.0
                    },
                    info,
                }
            })
            .collect();
        Ok(cut_page(page, limit, |r| r.info.id.clone()))
    }

    /// Jobs across tenants, newest first, in `state` (all when `None`) and,
    /// when given, failed with error kind `kind`. `cursor` is the last id
    /// of the previous page. A page may be short when the filter skipped
    /// many jobs: only `next_cursor == None` means the end.
    pub async fn admin_jobs(
        &self,
        state: Option<JobState>,
        kind: Option<ErrorKind>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<Job>, Option<String>), CpError> {
        if let Some(c) = cursor
            && ulid::Ulid::from_string(c).is_err()
        {
            return Err(CpError::Invalid("`cursor` is not a job id".into()));
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let scan = limit * if kind.is_some() { SCAN_FACTOR } else { 1 };
        // The newest `scan + 1` ids of each tenant below the cursor, merged:
        // the newest `scan` of them all are among these.
        let mut ids: Vec<(String, TenantId)> = Vec::new();
        for t in self.tenant_ids().await? {
            let mine = self.newest_ids(&t, state, cursor, scan + 1).await?;
            ids.extend(mine.into_iter().map(|j| (j, t.clone())));
        }
        ids.sort_by(|a, b| b.0.cmp(&a.0));
        let more = ids.len() > scan;
        ids.truncate(scan);
        let mut jobs = Vec::new();
        let mut last_examined = None;
        for chunk in ids.chunks(MAX_PAGE) {
            let mut pipe = redis::pipe();
            for (j, t) in chunk {
                pipe.add_command(self.view_cmd(t, j));
            }
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut self.conn()).await?;
            for ((j, _), row) in chunk.iter().zip(rows) {
                last_examined = Some(j.clone());
                let Some(job) = Self::job_from_hash(j, &Self::view_map(row)) else {
                    continue;
                };
                if kind.is_some() && job.error.as_ref().map(|e| e.kind) != kind {
                    continue;
                }
                jobs.push(job);
                if jobs.len() == limit {
                    break;
                }
            }
            if jobs.len() == limit {
                break;
            }
        }
        let exhausted = !more && last_examined.as_ref() == ids.last().map(|(j, _)| j);
        let next = if exhausted { None } else { last_examined };
        Ok((jobs, next))
    }
}

/// The first `limit` of `rows` (fetched `limit + 1`), and the cursor of
/// the next page when there was one more.
fn cut_page<T>(
    mut rows: Vec<T>,
    limit: usize,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more { rows.last().map(&key) } else { None };
    (rows, next)
}
