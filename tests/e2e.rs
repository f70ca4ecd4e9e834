//! End-to-end: real HTTP over a socket, a real `redis-server` per test, the
//! real guest components, and for process-level faults the real
//! `agentplane` binary as child processes (SIGKILL, SIGSTOP, SIGTERM).
//!
//! - `api`: the HTTP surface and the CLI.
//! - `runs`: how runs end and what they cost.
//! - `faults`: worker processes killed, stopped and drained.
//! - `deploy`: `serve`, the parts as processes, a Redis Cluster.

mod common;

#[path = "e2e/api.rs"]
mod api;
#[path = "e2e/deploy.rs"]
mod deploy;
#[path = "e2e/faults.rs"]
mod faults;
#[path = "e2e/runs.rs"]
mod runs;
