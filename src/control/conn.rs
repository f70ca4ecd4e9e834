//! One connection type over a single Redis and a Redis Cluster, so every
//! script and command is written once.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, ServerErrorKind, Value};
use std::time::{Duration, Instant};

/// How long one command may take before the call fails. Scripts are short
/// (bounded batches), but a loaded server still answers in well under this.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one command keeps retrying a cluster redirect or a TRYAGAIN
/// (a slot in migration, or a shard paused for a move) before the error
/// reaches the caller. Below the default lease (10 s), so a worker's
/// renewal outlasts a shard move of a few seconds and still reports a
/// failure in time to stop the run rather than overrun the lease.
const RETRY_BUDGET: Duration = Duration::from_secs(6);
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX_STEP: Duration = Duration::from_millis(400);

/// Redis did not run the command and says so: TRYAGAIN (a multi-key
/// command or script whose keys are split by a migrating slot, or a script
/// refused because its shard's anchor says `moving`), or a MOVED / ASK that
/// the cluster client's own retries did not settle (slot ownership still
/// propagating). Retrying any of them is safe: nothing was written.
fn not_run(e: &redis::RedisError) -> bool {
    e.is_cluster_error()
}

fn not_run_value(v: &Value) -> bool {
    match v {
        Value::ServerError(se) => matches!(
            se.kind(),
            Some(ServerErrorKind::TryAgain | ServerErrorKind::Moved | ServerErrorKind::Ask)
        ),
        _ => false,
    }
}

/// A multiplexed connection to either deployment shape. Cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What was parsed from the URL, kept to open dedicated connections (the
/// blocking wake-up wait must not hold up the shared multiplexed one).
#[derive(Clone)]
pub enum Target {
    Single(Box<redis::Client>),
    Cluster(Vec<String>),
}

impl Target {
    /// `redis://`, `rediss://`, `redis+unix:///path`, or
    /// `redis+cluster://h:p,h:p` (`rediss+cluster://` for TLS).
    pub fn parse(url: &str) -> redis::RedisResult<Target> {
        for (scheme, inner) in [
            ("redis+cluster://", "redis"),
            ("rediss+cluster://", "rediss"),
        ] {
            if let Some(rest) = url.strip_prefix(scheme) {
                let nodes: Vec<String> = rest
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|hp| format!("{inner}://{hp}"))
                    .collect();
                if nodes.is_empty() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "redis+cluster:// needs at least one host:port",
                    )));
                }
                return Ok(Target::Cluster(nodes));
            }
        }
        Ok(Target::Single(Box::new(redis::Client::open(url)?)))
    }

    /// The shared multiplexed connection (reconnects on its own).
    pub async fn connect(&self) -> redis::RedisResult<Conn> {
        match self {
            Target::Single(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Ok(Conn::Single(
                    ConnectionManager::new_with_config((**client).clone(), cfg).await?,
                ))
            }
            Target::Cluster(nodes) => Ok(Conn::Cluster(
                self.cluster_builder(nodes, RESPONSE_TIMEOUT)
                    .build()?
                    .get_async_connection()
                    .await?,
            )),
        }
    }

    /// A dedicated connection for blocking commands (BLPOP with `block`).
    pub async fn connect_blocking(&self, block: Duration) -> redis::RedisResult<Conn> {
        let timeout = block + RESPONSE_TIMEOUT;
        match self {
            Target::Single(client) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(CONNECT_TIMEOUT));
                Ok(Conn::Single(
                    ConnectionManager::new_with_config((**client).clone(), cfg).await?,
                ))
            }
            Target::Cluster(nodes) => Ok(Conn::Cluster(
                self.cluster_builder(nodes, timeout)
                    .build()?
                    .get_async_connection()
                    .await?,
            )),
        }
    }

    fn cluster_builder(&self, nodes: &[String], response: Duration) -> ClusterClientBuilder {
        ClusterClientBuilder::new(nodes.to_vec())
            .response_timeout(response)
            .connection_timeout(CONNECT_TIMEOUT)
            .retries(3)
    }
}

impl ConnectionLike for Conn {
    /// Sends one command (or script), retrying with exponential backoff
    /// what Redis answered without running it (see [`not_run`]), for at
    /// most [`RETRY_BUDGET`]. Pipelines are not retried: a pipeline may have
    /// run in part.
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let deadline = Instant::now() + RETRY_BUDGET;
            let mut step = RETRY_FIRST;
            loop {
                let r = match self {
                    Conn::Single(c) => c.req_packed_command(cmd).await,
                    Conn::Cluster(c) => c.req_packed_command(cmd).await,
                };
                let retry = match &r {
                    Err(e) => not_run(e),
                    Ok(v) => not_run_value(v),
                };
                if !retry || Instant::now() + step > deadline {
                    return r;
                }
                // Jitter in [50%, 100%] of the step, so many callers that met
                // the same paused shard do not return in lockstep.
                let jitter = 0.5 + rand::random::<f64>() / 2.0;
                tokio::time::sleep(step.mul_f64(jitter)).await;
                step = (step * 2).min(RETRY_MAX_STEP);
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
