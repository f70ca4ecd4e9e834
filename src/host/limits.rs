//! Every bound and default the host enforces, each stated once, grouped by
//! the part of the host that enforces it. Bounds a node operator may change
//! are defaults of [`super::HostConfig`] fields (and of the matching CLI
//! flags); the others are fixed by the sandbox's design.

/// Default largest component admitted or compiled (bytes):
/// [`super::HostConfig::max_component_bytes`], `--max-component-bytes`.
/// Enforced by admission before any compilation.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 32 << 20;
