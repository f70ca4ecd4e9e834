//! LOG (`lua/log.lua`): an attempt's log stored while the agent runs, and
//! the read of it the events stream follows.

use super::*;

/// ARGV of `lua/log.lua`, in its header's order.
struct LogArgs<'a> {
    job: &'a str,
    token: u64,
    offset: usize,
    chunk: &'a str,
    cap: usize,
}

impl LogArgs<'_> {
    fn write(&self, inv: &mut super::scripts::Invocation) {
        inv.arg(self.job)
            .arg(self.token)
            .arg(self.offset)
            .arg(self.chunk)
            .arg(self.cap);
    }
}

/// What LOG did with a batch of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStored {
    /// Stored: the attempt's log is now this many bytes.
    Stored(usize),
    /// The stored log is not `offset` bytes of this attempt (it holds this
    /// many): send it all again from 0.
    Conflict(usize),
    /// The batch would take the log past `log_max_bytes`: nothing written.
    Full,
}

/// A job's stored log from a byte offset, with what says whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTail {
    pub state: JobState,
    /// The job's run number (every claim takes the next one).
    pub run: u32,
    /// The run the stored log is of, as far as LOG recorded it: while the
    /// job runs, the log is this run's only if `logged_run == run` (until
    /// its first batch it still holds the previous run's).
    pub logged_run: Option<u32>,
    /// The log from the offset asked (empty past its end).
    pub text: String,
}

impl LogTail {
    /// Whether the stored log is the current run's: a running job's once
    /// its first batch is stored; otherwise the last run's (FINALIZE wrote
    /// it, or it is what a lost run stored).
    pub fn is_current(&self) -> bool {
        self.state != JobState::Running || self.logged_run == Some(self.run)
    }
}

impl ControlPlane {
    /// Stores what the attempt of `lease` logged past `offset` bytes (its
    /// first batch at 0). Refused (`LeaseLost`) unless the job is running
    /// under that very token; never stored past `log_max_bytes`.
    pub async fn append_log(
        &self,
        lease: &Lease,
        offset: usize,
        chunk: &str,
    ) -> Result<LogStored, CpError> {
        let mut inv = scripts::LOG.prepare_invoke();
        inv.key(self.keys.tenant_anchor(&lease.tenant))
            .key(self.keys.job(&lease.tenant, &lease.job_id))
            .key(self.keys.job_log(&lease.tenant, &lease.job_id));
        LogArgs {
            job: &lease.job_id,
            token: lease.token,
            offset,
            chunk,
            cap: self.cfg.log_max_bytes,
        }
        .write(&mut inv);
        let v: Value = self
            .eval(&mut inv, self.keys.shard_of(&lease.tenant))
            .await?;
        let (s, mut r) = Reply::status("LOG", &v)?;
        let done = match s {
            Status::Ok => LogStored::Stored(r.uint("length")?),
            Status::Conflict => LogStored::Conflict(r.uint("length")?),
            Status::Quota => {
                let _len: usize = r.uint("length")?;
                LogStored::Full
            }
            Status::Lost => return Err(CpError::LeaseLost),
            other => return Err(r.unexpected(other)),
        };
        r.end()?;
        Ok(done)
    }

    /// The tenant's job `id`'s log from byte `offset`, with its state and
    /// run numbers read around it (twice, so a log replaced by the next
    /// run or by FINALIZE between the reads is seen as a change and read
    /// again). `None` when absent or another tenant's.
    pub async fn log_tail(
        &self,
        tenant: &TenantId,
        id: &str,
        offset: usize,
    ) -> Result<Option<LogTail>, CpError> {
        if ulid::Ulid::from_string(id).is_err() {
            return Ok(None);
        }
        const FIELDS: [&str; 4] = ["tenant", "state", "attempts", "logat"];
        let key = self.keys.job(tenant, id);
        for _ in 0..8 {
            let mut pipe = redis::pipe();
            pipe.cmd("HMGET").arg(&key).arg(&FIELDS[..]);
            pipe.cmd("GETRANGE")
                .arg(self.keys.job_log(tenant, id))
                .arg(offset)
                .arg(-1);
            pipe.cmd("HMGET").arg(&key).arg(&FIELDS[..]);
            let (before, text, after): (Vec<Option<String>>, Vec<u8>, Vec<Option<String>>) =
                pipe.query_async(&mut self.conn()).await?;
            if before != after {
                continue;
            }
            if before[0].as_deref() != Some(tenant) {
                return Ok(None);
            }
            let field = |i: usize| before[i].as_deref().unwrap_or("");
            let state: JobState = field(1)
                .parse()
                .map_err(|_| bad(format!("job {id} has the state `{}`", field(1))))?;
            return Ok(Some(LogTail {
                state,
                run: field(2).parse().unwrap_or(0),
                logged_run: field(3).parse().ok(),
                // Offsets fall on line ends, so the text is whole characters.
                text: String::from_utf8_lossy(&text).into_owned(),
            }));
        }
        Err(CpError::Internal(format!(
            "job {id} changed under every read of its log"
        )))
    }
}
