//! The Wasm host helpers the host-level tests share: a guest component
//! admitted and compiled the way the worker does it, and this process's
//! resident memory for the tests that measure it.

use super::guests::guest_bytes;
use agentplane::host::{Host, LoadedComponent};
use std::sync::Arc;

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
