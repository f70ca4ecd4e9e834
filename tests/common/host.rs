//! The Wasm host helpers the host-level tests share: a guest component
//! admitted and compiled the way the worker does it, a run request under
//! roomy limits, and this process's resident memory for the tests that
//! measure it.

use super::guests::guest_bytes;
use agentplane::host::{Host, LoadedComponent, RunRequest};
use agentplane::model::Limits;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

/// Limits no well-behaved guest reaches.
pub fn limits() -> Limits {
    Limits {
        fuel: 5_000_000_000,
        memory_bytes: 64 * MIB,
        timeout_ms: 20_000,
    }
}

/// A run of `c` with `input` for `tenant`, no contexts, no state.
pub fn request(tenant: &str, c: &Arc<LoadedComponent>, input: &str, limits: Limits) -> RunRequest {
    RunRequest {
        tenant: tenant.parse().unwrap(),
        job_id: "job".into(),
        component: c.clone(),
        input: input.into(),
        limits,
        contexts: Vec::new(),
        state: None,
        cancel: CancellationToken::new(),
        egress: Default::default(),
        config: Vec::new(),
        inference: Default::default(),
    }
}

/// The built guest `name` (see [`guest_bytes`]), admitted and compiled.
pub async fn load(host: &Host, name: &str) -> Arc<LoadedComponent> {
    load_bytes(host, guest_bytes(name)).await
}

/// Any component's bytes, admitted and compiled; panics if either refuses.
pub async fn load_bytes(host: &Host, bytes: Vec<u8>) -> Arc<LoadedComponent> {
    let digest = host.admit(&bytes).expect("component admitted").digest;
    host.component(&digest, || async move { Ok(Some(bytes)) })
        .await
        .expect("component compiles")
}

/// Resident set size of this process, from `/proc/self/statm` (pages).
/// Tests that read it run in a binary of their own, so no other test's
/// memory pollutes the measurement.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm's second field is the resident page count");
    pages * 4096
}
