//! Helpers every area shares: the connection, the fixtures and the
//! claim/serve shortcuts, and a raw connection for tests that break data.

use crate::common;
use crate::common::fixtures::tid;
use agentplane::control::{
    AttemptOutcome, Claim, ControlConfig, ControlPlane, Finish, SubmitSpec, TenantSpec,
};
use agentplane::model::ErrorKind;
use std::collections::HashMap;

pub(crate) fn cfg(shards: u32) -> ControlConfig {
    ControlConfig {
        shards,
        lease_ms: 2_000,
        retry_base_ms: 100,
        retry_max_ms: 1_000,
        ..ControlConfig::default()
    }
}

pub(crate) async fn connect(url: &str, cfg: ControlConfig) -> ControlPlane {
    ControlPlane::connect(url, cfg).await.expect("connect")
}

pub(crate) fn tenant(id: &str, credits: i64) -> TenantSpec {
    common::fixtures::tenant_spec(id, credits)
}

pub(crate) fn job(input: &str) -> SubmitSpec {
    common::fixtures::submit_spec(input)
}

pub(crate) fn ok(output: &str, wall_ms: u64) -> Finish {
    Finish {
        outcome: AttemptOutcome::Succeeded {
            output: output.into(),
        },
        fuel: 1_000_000,
        wall_ms,
        log: String::new(),
        new_state: None,
        http: Default::default(),
        tokens: Default::default(),
    }
}

pub(crate) fn failed(kind: ErrorKind) -> Finish {
    Finish {
        outcome: AttemptOutcome::Failed {
            kind,
            message: "boom".into(),
        },
        fuel: 2_000_000,
        wall_ms: 5,
        log: "log line".into(),
        new_state: None,
        http: Default::default(),
        tokens: Default::default(),
    }
}

/// Claims one job, panicking if none is there.
pub(crate) async fn claim_one(cp: &ControlPlane) -> Claim {
    let mut c = cp.claim("w1", 1, 0).await.unwrap();
    assert_eq!(c.len(), 1, "expected a job to claim");
    c.pop().unwrap()
}

pub(crate) fn with_agent(input: &str) -> SubmitSpec {
    SubmitSpec {
        agent_id: Some("bot".into()),
        ..job(input)
    }
}

pub(crate) fn set_state(s: &[u8]) -> Finish {
    Finish {
        new_state: Some(s.to_vec()),
        ..ok("", 5)
    }
}

/// Runs `n` sequential claim → finalize cycles; answers claims per tenant.
pub(crate) async fn serve_sequentially(
    cp: &ControlPlane,
    n: usize,
    wall_ms: u64,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let c = claim_one(cp).await;
        *counts.entry(c.lease.tenant.to_string()).or_default() += 1;
        cp.finalize(&c.lease, &ok("", wall_ms)).await.unwrap();
    }
    counts
}

pub(crate) async fn backlog(cp: &ControlPlane, t: &str, weight: u32, jobs: usize) {
    let mut spec = tenant(t, 1_000_000_000);
    spec.weight = weight;
    cp.create_tenant(&spec, "h").await.unwrap();
    for i in 0..jobs {
        cp.submit(&tid(t), &job(&i.to_string())).await.unwrap();
    }
}

/// Two tenants on different shards, the first on the lower shard.
pub(crate) fn tenants_on_two_shards(cp: &ControlPlane) -> (String, String) {
    let k = cp.keys();
    let a = (0..)
        .map(|i| format!("a{i}"))
        .find(|t| k.shard_of(t) == 0)
        .unwrap();
    let b = (0..)
        .map(|i| format!("b{i}"))
        .find(|t| k.shard_of(t) == 1)
        .unwrap();
    (a, b)
}

/// A plain connection for tests that break the data on purpose.
pub(crate) enum Raw {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

pub(crate) async fn raw(url: &str) -> Raw {
    match url.strip_prefix("redis+cluster://") {
        Some(rest) => {
            let nodes: Vec<String> = rest.split(',').map(|h| format!("redis://{h}")).collect();
            let client = redis::cluster::ClusterClient::new(nodes).unwrap();
            Raw::Cluster(client.get_async_connection().await.unwrap())
        }
        None => Raw::Single(
            redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        ),
    }
}

impl Raw {
    pub(crate) async fn q<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Raw::Single(c) => cmd.query_async(c).await,
            Raw::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

pub(crate) fn cmd(args: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}
