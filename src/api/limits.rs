//! Every bound and default the HTTP API enforces, each once. The settings
//! an operator may change are fields of [`ApiConfig`](super::ApiConfig),
//! whose `Default` and the `serve`/`api` flags (`cli::ApiLimitArgs`, each
//! with an `AGENTPLANE_…` environment variable) both take their defaults
//! from the `DEFAULT_…` constants here; the rest are fixed bounds of the
//! protocol. The control plane's bounds are in `control::limits`, the
//! host's in `host::limits`.

use std::time::Duration;

// --- request sizes (413 beyond) ---

/// Default of `--max-component-bytes`: the host's, since admission and the
/// workers compile what the API admits.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = crate::host::limits::DEFAULT_MAX_COMPONENT_BYTES;
/// Default of `--max-input-bytes` (a job's `input`, 1 MiB).
pub const DEFAULT_MAX_INPUT_BYTES: usize = 1 << 20;
/// Default of `--max-context-bytes` (a context upload, 64 MiB).
pub const DEFAULT_MAX_CONTEXT_BYTES: usize = 64 << 20;
/// Admin bodies (tenants, patches, grants) are small; 64 KiB is plenty and
/// bounds a hostile one.
pub const MAX_ADMIN_BODY: usize = 64 << 10;

// --- the edge: connections, request heads, slow clients ---

/// Default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of `--header-timeout-ms`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `--max-header-bytes` (431 beyond).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 << 10;
/// Most header lines a request may carry (JSON 431 beyond).
pub const MAX_HEADERS: usize = 100;
/// Default of `--write-timeout-ms`.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `--body-idle-timeout-ms`.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `--body-min-rate`, in bytes per second.
pub const DEFAULT_BODY_MIN_RATE: u64 = 64 << 10;
/// Default of `--body-grace-ms`.
pub const DEFAULT_BODY_GRACE: Duration = Duration::from_secs(10);
/// Default of `--max-bodies-per-tenant`.
pub const DEFAULT_MAX_BODIES_PER_TENANT: usize = 16;

// --- uploads ---

/// Default of `--max-concurrent-uploads`.
pub const DEFAULT_MAX_CONCURRENT_UPLOADS: usize = 4;
/// Default of `--uploads-per-tenant`.
pub const DEFAULT_UPLOADS_PER_TENANT: usize = 2;
/// Default of `--upload-burst`.
pub const DEFAULT_UPLOAD_BURST: u32 = 30;
/// Default of `--uploads-per-minute`.
pub const DEFAULT_UPLOADS_PER_MINUTE: u32 = 30;
/// Upload-rate buckets kept before full (idle) ones are forgotten.
pub const RATE_BUCKETS_PRUNE_AT: usize = 10_000;

// --- long polls (`?wait=`, event streams) ---

/// Default of `--max-wait-ms`: the longest `?wait=` (or event stream)
/// honoured. Clients asking for more are cut to it.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(60);
/// Default of `--max-waits-per-tenant`.
pub const DEFAULT_MAX_WAITS_PER_TENANT: usize = 32;
/// How often a long-poll first re-reads the job; the period doubles up to
/// 5× this while the job stays unfinished, so many waiting clients on long
/// jobs cost Redis little.
pub const WAIT_POLL: Duration = Duration::from_millis(100);

// --- jobs ---

/// Default `max_attempts` when the request names none.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Upper bound of `max_attempts`: retries cost credits and queue space.
pub const MAX_ATTEMPTS_CAP: u32 = 100;
/// Upper bound of `delay_ms` (30 days): a typo of a few zeros should be
/// refused, not parked forever.
pub const MAX_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;
/// Upper bound of the contexts one job mounts.
pub const MAX_CONTEXTS: usize = 32;
/// `Idempotency-Key` length bound (it becomes part of a Redis key).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Jobs one `POST /v1/jobs/batch` takes at most.
pub const MAX_BATCH: usize = 1_000;

// --- pages and reports ---

/// Page size of a listing when `?limit=` is absent.
pub const DEFAULT_PAGE: usize = 100;
/// Largest `?limit=` (400 above): the control plane's page bound.
pub const MAX_PAGE: usize = crate::control::MAX_PAGE;
/// Widest usage window, in days (a year of hours is 8,760 buckets).
pub const MAX_USAGE_WINDOW_DAYS: u64 = 400;
