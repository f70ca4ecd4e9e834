//! agentplane: a multi-tenant, WebAssembly-sandboxed agent execution host with
//! a Redis control plane.
//!
//! Decision is separated from execution. The control plane (Redis + Lua)
//! decides which job runs where, who pays and what happens when a worker
//! dies; worker hosts only execute what they were handed, under the limits
//! they were handed, and may vanish at any instant.
//!
//! # Layout
//! - [`model`]: the shared vocabulary — job states, error kinds, limits, usage,
//!   and the ids checked once where they enter (`model::TenantId`).
//! - [`control`]: the control plane. Owns every job/tenant transition, each one
//!   an atomic Lua script from `lua/`, and the Redis key schema.
//! - [`host`]: the Wasm host. Owns the wasmtime engine, admission of uploaded
//!   components, the sandbox (WASI with nothing granted), per-tenant limits,
//!   and the node's one cache of compiled components and decoded contexts.
//! - [`context`]: heavy contexts. Owns the upload format, its validation and
//!   the read-only searchable form (documents, embeddings, BM25 index, tool
//!   registry) that the host's cache keeps one copy of per node.
//! - [`worker`]: the worker loop. Owns slots, claiming, lease renewal, draining,
//!   and the group commit of FINALIZE (`worker/finalizer.rs`).
//! - [`scheduler`]: promotion of delayed jobs and the lease reaper.
//! - [`api`]: the HTTP API (axum). Owns authentication, validation, JSON errors,
//!   and every API bound and default (`api::limits`).
//! - [`num`]: the 2^53 − 1 bound on every integer the API accepts.
//! - [`callbacks`]: job callbacks: egress rules, signing, the dispatcher
//!   that delivers them (run by every API process).
//! - [`egress`]: outbound HTTP rules and the addresses a name may reach,
//!   shared by callbacks and agents' `wasi:http` requests.
//! - [`inference`]: models as node resources: loaded once per worker,
//!   driven by one thread each that serves tenants in turn.
//! - [`secrets`]: tenants' secrets: sealing, names and values, redaction.
//! - [`embedded`]: the `redis-server` that `serve` starts when given no `--redis`.
//! - [`client`]: the typed HTTP client of the API (CLI, `bench`, tests).
//! - [`cli`]: command-line parsing and the client commands over the API.

pub mod api;
pub mod callbacks;
pub mod cli;
pub mod client;
pub mod context;
pub mod control;
pub mod egress;
pub mod embedded;
pub mod host;
pub mod inference;
pub mod model;
pub mod num;
pub mod scheduler;
pub mod secrets;
pub mod worker;
