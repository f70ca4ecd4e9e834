//! Every bound and default the control plane enforces, each once. The
//! scripts receive them as arguments (they hold no defaults of their own),
//! and the API and CLI take their defaults from here.

pub use crate::num::MAX_EXACT_INT;

/// Default of [`ControlConfig::max_node_faults`](super::ControlConfig).
pub const DEFAULT_MAX_NODE_FAULTS: u32 = 5;

/// Bytes of a node-fault message kept on the job.
pub const FAULT_MESSAGE_MAX: usize = 1024;

/// Attempts a job may lose to agent-state conflicts before it fails: each
/// conflicting attempt did run (and was charged), so this bounds the bill.
pub const MAX_STATE_CONFLICTS: u32 = 16;

/// Largest page of `list_jobs` (the API answers 400 above it): a page is
/// one pipelined read, so its size bounds what one request costs Redis.
pub const MAX_PAGE: usize = 1_000;

/// Default `max_component_bytes` of a tenant (1 GiB).
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 1 << 30;
/// Default `max_context_bytes` of a tenant (4 GiB).
pub const DEFAULT_MAX_CONTEXT_BYTES: u64 = 4 << 30;
/// Default `max_state_bytes` of a tenant (1 GiB, all its agents together).
pub const DEFAULT_MAX_STATE_BYTES: u64 = 1 << 30;

/// Charged per stored item on top of its size: the metadata, usage entry
/// and agent hash each item costs Redis. Without it a tenant could store
/// millions of empty states (one per agent id) inside any byte quota.
pub const ITEM_OVERHEAD_BYTES: u64 = 256;

/// Ledger entries folded into checkpoints per shard per sweep call: one
/// `XDEL` takes them all, so this bounds how long the call holds Redis.
pub const LEDGER_FOLD_BATCH: u32 = 1_000;
