//! Every bound and default the host enforces, each stated once, grouped by
//! the part of the host that enforces it. Bounds a node operator may change
//! are defaults of [`super::HostConfig`] fields (and of the matching CLI
//! flags); the others are fixed by the sandbox's design.

/// Default largest component admitted or compiled (bytes):
/// [`super::HostConfig::max_component_bytes`], `--max-component-bytes`.
/// Enforced by admission before any compilation.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 32 << 20;

/// Default wall-clock bound of one compilation ([`super::CompileChild`]).
/// The 18 MB Python agent compiles in ~10 s on one core of a small machine;
/// a Rust agent in well under a second.
pub const DEFAULT_COMPILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Default heap bound of one compilation ([`super::CompileChild`]).
pub const DEFAULT_COMPILE_MEMORY: u64 = 2 << 30;

/// Default longest idle time of a warm instance
/// ([`super::HostConfig::warm_idle_ttl`]): it holds a pool slot and its
/// tenant's memory while nobody uses it.
pub const WARM_IDLE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

// Agents' outgoing HTTP: defaults of [`super::EgressLimits`] (`--egress-*`
// flags of `worker`), enforced in `http`.

/// Default time to resolve a name and connect (TLS included).
pub const EGRESS_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Default time from a request sent to its response's head.
pub const EGRESS_FIRST_BYTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default time between two frames of a response's body.
pub const EGRESS_BETWEEN_BYTES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default body bytes one response may carry.
pub const EGRESS_MAX_RESPONSE_BYTES: u64 = 16 << 20;
/// Default requests one tenant may have in flight on a node.
pub const EGRESS_MAX_IN_FLIGHT_PER_TENANT: u32 = 32;

// Host calls (enforced in `state`, where the imports are served). Results
// per search and the longest query embedding are the context's own bounds
// (`crate::context::{MAX_K, MAX_DIM}`), not restated here.

/// Longest text query accepted (bytes): stops a guest from making the host
/// tokenize and score gigantic BM25 queries.
pub const MAX_QUERY_BYTES: usize = 64 << 10;

/// Largest state an agent may store. State travels through Redis on every
/// job of its agent; this keeps one agent from bloating the control plane.
pub const MAX_STATE_BYTES: usize = 16 << 20;

/// Longest `log.write` message kept (bytes); longer ones are cut.
pub const MAX_LOG_MESSAGE: usize = 8 << 10;

/// Bytes one host call may build for the guest (hits of one search, the
/// tool list). Beyond it the call traps as `memory_limit`: the host must not
/// build for one call more than a guest's memory could ever take.
pub const MAX_RESULT_BYTES: usize = 8 << 20;

/// Fuel every call of an `agentplane:agent` import costs, whatever it does:
/// a call is ~1 µs of host CPU, about a thousand wasm instructions. Stops a
/// guest from flooding the host with free calls.
pub const CALL_FUEL: u64 = 1_000;

/// Bytes copied in or out of the guest per unit of fuel (state, log lines,
/// hits, tools).
pub const BYTES_PER_FUEL: u64 = 4;

/// Bytes of one `inference.complete` prompt (a chat rendered), or of all
/// the texts of one `inference.embed` call.
pub const MAX_PROMPT_BYTES: usize = 256 << 10;

/// Texts one `inference.embed` call may embed.
pub const MAX_EMBED_TEXTS: usize = 256;

/// Fuel per byte of text an inference call tokenizes, charged before the
/// tokenizer runs: the host's CPU for it is the guest's to pay, whether
/// the call then fits the job's token allowance or not (about what the
/// guest would burn walking the bytes itself).
pub const TOKENIZE_FUEL_PER_BYTE: u64 = 64;
