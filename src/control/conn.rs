//! One connection type over a single Redis and a Redis Cluster, so every
//! script and command is written once.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::time::Duration;

/// How long one command may take before the call fails. Scripts are short
/// (bounded batches), but a loaded server still answers in well under this.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
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
