//! Command-line interface: the server parts (`serve`, `worker`,
//! `api`, `scheduler`) and the client commands over the HTTP API.

mod admin;
mod audit;
mod bench;
mod client;
mod datadir;
mod output;
mod random_model;
mod server;

use crate::api::limits as L;
use crate::control::{ControlConfig, Prices};
use crate::host::limits as HL;
use crate::model::Limits;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// agentplane: run tenants' WebAssembly agents under limits, with a Redis
/// control plane.
#[derive(Debug, Parser)]
#[command(name = "agentplane", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// API, scheduler, reaper and a worker in one process; starts its own
    /// redis-server (unix socket, AOF on) unless given `--redis`.
    Serve(ServeArgs),
    /// A worker only: claims and runs jobs.
    Worker(WorkerArgs),
    /// The HTTP API only.
    Api(ApiArgs),
    /// Promotion of delayed jobs and the lease reaper only.
    Scheduler(SchedulerArgs),
    /// Tenants (admin token).
    #[command(subcommand)]
    Tenant(client::TenantCmd),
    /// Components (tenant token).
    #[command(subcommand)]
    Component(client::ComponentCmd),
    /// Contexts (tenant token).
    #[command(subcommand)]
    Context(client::ContextCmd),
    /// Jobs (tenant token).
    #[command(subcommand)]
    Job(client::JobCmd),
    /// Listings across tenants and retries (admin token).
    #[command(subcommand)]
    Admin(admin::AdminCmd),
    /// Benchmarks, each printing its figures as JSON: over the API (the
    /// default; admin token), or `drain`, `tenants`, `density`, `claim`
    /// against a Redis with a real worker.
    Bench(bench::BenchCmd),
    /// Checks every control-plane invariant against a live deployment
    /// (read-only); prints each violation and exits 1 if there is any.
    Audit(audit::AuditArgs),
    /// Writes a Llama model of random weights (config.json,
    /// tokenizer.json, model.safetensors) to try `--model` with, nothing
    /// downloaded. Its tokenizer makes one token of each byte.
    RandomModel(random_model::RandomModelArgs),
}

/// Control-plane settings every process of one deployment must agree on.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// Tenants are spread over this many hash-tagged shards (Redis Cluster).
    #[arg(long, env = "AGENTPLANE_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub shards: u32,
    /// Prefix of every Redis key.
    #[arg(long, env = "AGENTPLANE_PREFIX", default_value = "ap")]
    pub prefix: String,
    /// Seconds finished jobs (with their logs and idempotency keys) and
    /// ledger entries are kept; then the scheduler removes them (ledger
    /// entries are folded into the tenant's checkpoint). Default 7 days.
    #[arg(long, env = "AGENTPLANE_RETENTION_S", default_value_t = 7 * 24 * 3600,
          value_parser = clap::value_parser!(u64).range(1..=10 * 365 * 24 * 3600))]
    pub retention_s: u64,
    /// Credits per slot-second of wall time a job holds (a GPU job's slot
    /// weighs 1 + 10 per GPU). Every process of a deployment must agree:
    /// the API checks reservations with it, workers settle with it.
    #[arg(long, env = "AGENTPLANE_PRICE_SLOT_SECOND", default_value_t = crate::control::Prices::default().credits_per_slot_second,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub price_slot_second: u64,
    /// Credits per million units of fuel.
    #[arg(long, env = "AGENTPLANE_PRICE_MFUEL", default_value_t = Prices::default().credits_per_mfuel,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub price_mfuel: u64,
    /// Credits per GPU-second of wall time.
    #[arg(long, env = "AGENTPLANE_PRICE_GPU_SECOND", default_value_t = Prices::default().credits_per_gpu_second,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub price_gpu_second: u64,
    /// Credits per outgoing HTTP request an agent sends.
    #[arg(long, env = "AGENTPLANE_PRICE_HTTP_REQUEST", default_value_t = Prices::default().credits_per_http_request,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub price_http_request: u64,
    /// Credits per KiB of agents' HTTP traffic, both ways.
    #[arg(long, env = "AGENTPLANE_PRICE_HTTP_KIB", default_value_t = Prices::default().credits_per_http_kib,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub price_http_kib: u64,
    /// HTTP requests one job may make (its reservation covers them).
    #[arg(long, env = "AGENTPLANE_EGRESS_REQUESTS_PER_JOB", default_value_t = crate::control::EgressBudget::default().requests_per_job,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub egress_requests_per_job: u32,
    /// KiB of HTTP traffic one job may send and receive in all.
    #[arg(long, env = "AGENTPLANE_EGRESS_KIB_PER_JOB", default_value_t = crate::control::EgressBudget::default().kib_per_job,
          value_parser = clap::value_parser!(u64).range(0..=1 << 30))]
    pub egress_kib_per_job: u64,
    /// How much slot-time one GPU weighs, in fair share and in the slot
    /// price, relative to a CPU slot.
    #[arg(long, env = "AGENTPLANE_GPU_SLOT_WEIGHT", default_value_t = Prices::default().gpu_slot_weight,
          value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub gpu_slot_weight: u64,
    /// Seconds an Idempotency-Key is remembered.
    #[arg(long, env = "AGENTPLANE_IDEMPOTENCY_TTL_S", default_value_t = ControlConfig::default().idempotency_ttl_s,
          value_parser = clap::value_parser!(u64).range(1..=365 * 24 * 3600))]
    pub idempotency_ttl_s: u64,
    /// First retry delay of a failed attempt, in ms (doubled per attempt).
    #[arg(long, env = "AGENTPLANE_RETRY_BASE_MS", default_value_t = ControlConfig::default().retry_base_ms,
          value_parser = clap::value_parser!(u64).range(0..=24 * 3600 * 1000))]
    pub retry_base_ms: u64,
    /// Longest retry delay, in ms.
    #[arg(long, env = "AGENTPLANE_RETRY_MAX_MS", default_value_t = ControlConfig::default().retry_max_ms,
          value_parser = clap::value_parser!(u64).range(0..=7 * 24 * 3600 * 1000))]
    pub retry_max_ms: u64,
    /// Agent states larger than this many bytes are stored under their own
    /// key rather than inline in the agent's hash.
    #[arg(long, env = "AGENTPLANE_STATE_INLINE_MAX_BYTES", default_value_t = ControlConfig::default().state_inline_max,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=16 << 20))]
    pub state_inline_max_bytes: usize,
    /// Bytes of an attempt's log kept.
    #[arg(long, env = "AGENTPLANE_LOG_MAX_BYTES", default_value_t = ControlConfig::default().log_max_bytes,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=16 << 20))]
    pub log_max_bytes: usize,
    /// Node faults a job may meet before it fails with `node_fault`.
    #[arg(long, env = "AGENTPLANE_MAX_NODE_FAULTS", default_value_t = crate::control::DEFAULT_MAX_NODE_FAULTS,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub max_node_faults: u32,
    /// Fuel of a tenant created without limits.
    #[arg(long, env = "AGENTPLANE_DEFAULT_FUEL", default_value_t = Limits::default().fuel,
          value_parser = clap::value_parser!(u64).range(1..=crate::control::MAX_EXACT_INT as u64))]
    pub default_fuel: u64,
    /// Memory bytes of a tenant created without limits.
    #[arg(long, env = "AGENTPLANE_DEFAULT_MEMORY_BYTES", default_value_t = Limits::default().memory_bytes,
          value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    pub default_memory_bytes: u64,
    /// Timeout in ms of a tenant created without limits.
    #[arg(long, env = "AGENTPLANE_DEFAULT_TIMEOUT_MS", default_value_t = Limits::default().timeout_ms,
          value_parser = clap::value_parser!(u64).range(1..=7 * 24 * 3600 * 1000))]
    pub default_timeout_ms: u64,
}

/// The lease length.
#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    /// Lease length in ms: a dead worker's job runs again within about this.
    #[arg(long, env = "AGENTPLANE_LEASE_MS", default_value_t = ControlConfig::default().lease_ms,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub lease_ms: u64,
}

/// Worker slots.
#[derive(Debug, Clone, Args)]
pub struct SlotArgs {
    /// Jobs run at once (default: the number of CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub slots: Option<u32>,
    /// GPU slots this node offers to jobs that ask for GPUs.
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// On shutdown, how long running jobs may finish before they are stopped
    /// and handed back to the queue uncharged.
    #[arg(long, default_value_t = 30_000)]
    pub drain_ms: u64,
    /// Idle Wasm instances kept on this node for reuse: a job that ended
    /// cleanly leaves its instance to the next job of the same tenant and
    /// component, which skips instantiation. Such a job sees what the
    /// tenant's earlier jobs left in the instance's memory; instances are
    /// never shared across tenants. 0 (the default): a fresh instance per
    /// job.
    #[arg(long, env = "AGENTPLANE_WARM_INSTANCES", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub warm_instances: u32,
    #[command(flatten)]
    pub egress: EgressArgs,
    /// A model this node loads at start and shares across every instance
    /// (`agentplane:agent/inference`), as NAME=PATH: a Hugging Face model
    /// directory of the Llama architecture (config.json, tokenizer.json,
    /// *.safetensors); or NAME=URL: an OpenAI-compatible server on the
    /// node (`http://127.0.0.1:8000/v1`). Repeat for more models. Which
    /// tenants may call it, and at what price, is set on each tenant
    /// (`models`).
    #[arg(long = "model", value_name = "NAME=PATH|URL")]
    pub models: Vec<crate::inference::ModelSpec>,
}

/// Bounds of agents' outgoing HTTP requests on a worker node (README,
/// "Outbound HTTP"). A guest's request options may shorten the timeouts,
/// never lengthen them; none runs past the job's wall clock.
#[derive(Debug, Clone, Args)]
pub struct EgressArgs {
    /// Time to resolve a name and connect (TLS included), in ms.
    #[arg(long, env = "AGENTPLANE_EGRESS_CONNECT_TIMEOUT_MS",
          default_value_t = HL::EGRESS_CONNECT_TIMEOUT.as_millis() as u64)]
    pub egress_connect_timeout_ms: u64,
    /// Time from a request sent to its response's head, in ms.
    #[arg(long, env = "AGENTPLANE_EGRESS_FIRST_BYTE_TIMEOUT_MS",
          default_value_t = HL::EGRESS_FIRST_BYTE_TIMEOUT.as_millis() as u64)]
    pub egress_first_byte_timeout_ms: u64,
    /// Time between two frames of a response's body, in ms.
    #[arg(long, env = "AGENTPLANE_EGRESS_BETWEEN_BYTES_TIMEOUT_MS",
          default_value_t = HL::EGRESS_BETWEEN_BYTES_TIMEOUT.as_millis() as u64)]
    pub egress_between_bytes_timeout_ms: u64,
    /// Body bytes one response may carry.
    #[arg(long, env = "AGENTPLANE_EGRESS_MAX_RESPONSE_BYTES",
          default_value_t = HL::EGRESS_MAX_RESPONSE_BYTES)]
    pub egress_max_response_bytes: u64,
    /// Requests one tenant may have in flight on this node.
    #[arg(long, env = "AGENTPLANE_EGRESS_MAX_IN_FLIGHT_PER_TENANT",
          default_value_t = HL::EGRESS_MAX_IN_FLIGHT_PER_TENANT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub egress_max_in_flight_per_tenant: u32,
}

impl EgressArgs {
    pub fn limits(&self) -> crate::host::EgressLimits {
        let ms = std::time::Duration::from_millis;
        crate::host::EgressLimits {
            connect_timeout: ms(self.egress_connect_timeout_ms),
            first_byte_timeout: ms(self.egress_first_byte_timeout_ms),
            between_bytes_timeout: ms(self.egress_between_bytes_timeout_ms),
            max_response_bytes: self.egress_max_response_bytes,
            max_in_flight_per_tenant: self.egress_max_in_flight_per_tenant,
        }
    }
}

/// Limits of the API's HTTP edge: request sizes (413 beyond), request
/// time (408), connections and upload slots. Each flag also reads the
/// environment variable named in its help.
#[derive(Debug, Clone, Args)]
pub struct ApiLimitArgs {
    /// Largest component upload, in bytes (also what this process's
    /// admission and, under `serve`, its workers compile).
    #[arg(long, env = "AGENTPLANE_MAX_COMPONENT_BYTES", default_value_t = L::DEFAULT_MAX_COMPONENT_BYTES)]
    pub max_component_bytes: usize,
    /// Largest job input, in bytes.
    #[arg(long, env = "AGENTPLANE_MAX_INPUT_BYTES", default_value_t = L::DEFAULT_MAX_INPUT_BYTES)]
    pub max_input_bytes: usize,
    /// Largest context upload (JSON), in bytes.
    #[arg(long, env = "AGENTPLANE_MAX_CONTEXT_BYTES", default_value_t = L::DEFAULT_MAX_CONTEXT_BYTES)]
    pub max_context_bytes: usize,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "AGENTPLANE_MAX_CONNECTIONS", default_value_t = L::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Longest time to receive a request's head, in ms; also how long an
    /// idle keep-alive connection stays open.
    #[arg(long, env = "AGENTPLANE_HEADER_TIMEOUT_MS", default_value_t = ms(L::DEFAULT_HEADER_TIMEOUT),
          value_parser = clap::value_parser!(u64).range(100..))]
    pub header_timeout_ms: u64,
    /// Largest request head (request line and headers), in bytes (431
    /// beyond).
    #[arg(long, env = "AGENTPLANE_MAX_HEADER_BYTES", default_value_t = L::DEFAULT_MAX_HEADER_BYTES as u32,
          value_parser = clap::value_parser!(u32).range(1024..=(1 << 20)))]
    pub max_header_bytes: u32,
    /// Longest pause between two chunks of a request body, in ms.
    #[arg(long, env = "AGENTPLANE_BODY_IDLE_TIMEOUT_MS", default_value_t = ms(L::DEFAULT_BODY_IDLE_TIMEOUT),
          value_parser = clap::value_parser!(u64).range(100..))]
    pub body_idle_timeout_ms: u64,
    /// Slowest average body rate accepted once the grace time has passed,
    /// in bytes per second (0: no minimum).
    #[arg(long, env = "AGENTPLANE_BODY_MIN_RATE", default_value_t = L::DEFAULT_BODY_MIN_RATE)]
    pub body_min_rate: u64,
    /// Time a body may take before the minimum rate applies, in ms.
    #[arg(long, env = "AGENTPLANE_BODY_GRACE_MS", default_value_t = ms(L::DEFAULT_BODY_GRACE))]
    pub body_grace_ms: u64,
    /// Uploads (components, contexts) buffered and processed at once.
    #[arg(long, env = "AGENTPLANE_MAX_CONCURRENT_UPLOADS", default_value_t = L::DEFAULT_MAX_CONCURRENT_UPLOADS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_uploads: u32,
    /// Of those, how many one tenant may hold (429 beyond).
    #[arg(long, env = "AGENTPLANE_UPLOADS_PER_TENANT", default_value_t = L::DEFAULT_UPLOADS_PER_TENANT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub uploads_per_tenant: u32,
    /// Uploads one tenant may start in a burst (429 `rate_limited` beyond),
    /// refilled at `--uploads-per-minute`.
    #[arg(long, env = "AGENTPLANE_UPLOAD_BURST", default_value_t = L::DEFAULT_UPLOAD_BURST,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub upload_burst: u32,
    /// Uploads per minute one tenant may sustain.
    #[arg(long, env = "AGENTPLANE_UPLOADS_PER_MINUTE", default_value_t = L::DEFAULT_UPLOADS_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub uploads_per_minute: u32,
    /// Longest `?wait=` (and event stream) honoured, in ms; longer ones are
    /// cut to it.
    #[arg(long, env = "AGENTPLANE_MAX_WAIT_MS", default_value_t = ms(L::DEFAULT_MAX_WAIT),
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub max_wait_ms: u64,
    /// Long-polls (`GET /v1/jobs/{id}?wait=`) one tenant may hold at once;
    /// more are answered without waiting.
    #[arg(long, env = "AGENTPLANE_MAX_WAITS_PER_TENANT", default_value_t = L::DEFAULT_MAX_WAITS_PER_TENANT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waits_per_tenant: u32,
    /// Longest time an answer may make no progress (the client stopped
    /// reading) before its connection is dropped, in ms.
    #[arg(long, env = "AGENTPLANE_WRITE_TIMEOUT_MS", default_value_t = ms(L::DEFAULT_WRITE_TIMEOUT),
          value_parser = clap::value_parser!(u64).range(100..))]
    pub write_timeout_ms: u64,
    /// Job submissions whose bodies one tenant may be sending at once (429
    /// beyond).
    #[arg(long, env = "AGENTPLANE_MAX_BODIES_PER_TENANT", default_value_t = L::DEFAULT_MAX_BODIES_PER_TENANT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_bodies_per_tenant: u32,
    /// Where job callbacks may go: `scheme://host[:port]` rules (`*.` for
    /// any subdomain), comma-separated or repeated. Names must resolve to
    /// public addresses; a private or loopback address must be named
    /// itself. None (the default): every `callback_url` is refused.
    #[arg(
        long = "callback-allow",
        env = "AGENTPLANE_CALLBACK_ALLOW",
        value_delimiter = ','
    )]
    pub callback_allow: Vec<String>,
}

/// A default duration as the whole milliseconds its flag takes.
const fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl ApiLimitArgs {
    /// The API configuration these flags describe: every field is a flag
    /// (no `..Default::default()`, so a new setting without one does not
    /// compile).
    pub fn api_config(&self) -> crate::api::ApiConfig {
        crate::api::ApiConfig {
            max_component_bytes: self.max_component_bytes,
            max_input_bytes: self.max_input_bytes,
            max_context_bytes: self.max_context_bytes,
            max_connections: self.max_connections as usize,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            max_header_bytes: self.max_header_bytes as usize,
            body_idle_timeout: Duration::from_millis(self.body_idle_timeout_ms),
            body_min_rate: self.body_min_rate,
            body_grace: Duration::from_millis(self.body_grace_ms),
            max_concurrent_uploads: self.max_concurrent_uploads as usize,
            uploads_per_tenant: self.uploads_per_tenant as usize,
            upload_burst: self.upload_burst,
            uploads_per_minute: self.uploads_per_minute,
            max_wait: Duration::from_millis(self.max_wait_ms),
            max_waits_per_tenant: self.max_waits_per_tenant as usize,
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            max_bodies_per_tenant: self.max_bodies_per_tenant as usize,
            // Set by `serve` and `api` from `--callback-allow` and the
            // deployment's signing secret (none allowed until then).
            callbacks: crate::callbacks::Callbacks::default(),
        }
    }
}

/// `agentplane serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Redis URL (`redis://`, `rediss://`, `redis+unix://`, `redis+cluster://h:p,h:p`);
    /// without it, a redis-server is started in the data dir.
    #[arg(long)]
    pub redis: Option<String>,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Data dir: embedded Redis data, admin token, compiled-component cache.
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    #[command(flatten)]
    pub slots: SlotArgs,
    #[command(flatten)]
    pub lease: LeaseArgs,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub limits: ApiLimitArgs,
    /// `maxmemory` of the embedded redis-server (policy `noeviction`: a full
    /// Redis refuses writes, answered 503 `storage_full`, and never evicts
    /// jobs or money). Redis syntax: bytes, or with kb/mb/gb.
    #[arg(long, env = "AGENTPLANE_REDIS_MAXMEMORY", default_value = "2gb",
          value_parser = crate::embedded::parse_maxmemory)]
    pub redis_maxmemory: u64,
}

/// `agentplane worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Redis URL of the deployment.
    #[arg(long)]
    pub redis: String,
    #[command(flatten)]
    pub slots: SlotArgs,
    #[command(flatten)]
    pub lease: LeaseArgs,
    #[command(flatten)]
    pub control: ControlArgs,
    /// Where compiled components are cached on disk (none by default).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Largest component this worker compiles, in bytes: must be at least
    /// the API's `--max-component-bytes`, or admitted uploads fail here.
    #[arg(long, env = "AGENTPLANE_MAX_COMPONENT_BYTES",
          default_value_t = crate::host::limits::DEFAULT_MAX_COMPONENT_BYTES)]
    pub max_component_bytes: usize,
    /// Serve `/metrics` and `/healthz` on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

/// `agentplane api`.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Redis URL of the deployment.
    #[arg(long)]
    pub redis: String,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub limits: ApiLimitArgs,
}

/// `agentplane scheduler`.
#[derive(Debug, Clone, Args)]
pub struct SchedulerArgs {
    /// Redis URL of the deployment.
    #[arg(long)]
    pub redis: String,
    #[command(flatten)]
    pub lease: LeaseArgs,
    #[command(flatten)]
    pub control: ControlArgs,
    /// Serve `/metrics` and `/healthz` on this address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command to its exit code.
pub fn run(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => server::serve(a).await.map(|()| ExitCode::SUCCESS),
            Command::Worker(a) => server::worker(a).await.map(|()| ExitCode::SUCCESS),
            Command::Api(a) => server::api(a).await.map(|()| ExitCode::SUCCESS),
            Command::Scheduler(a) => server::scheduler(a).await.map(|()| ExitCode::SUCCESS),
            Command::Tenant(c) => client::tenant(c).await,
            Command::Component(c) => client::component(c).await,
            Command::Context(c) => client::context(c).await,
            Command::Job(c) => client::job(c).await,
            Command::Admin(c) => admin::admin(c).await,
            Command::Bench(a) => {
                let _spin = output::Spinner::start("benchmarking");
                bench::bench(a).await
            }
            Command::Audit(a) => audit::audit(a).await,
            Command::RandomModel(a) => random_model::random_model(&a),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_flags_parse() {
        let c = Cli::try_parse_from([
            "agentplane",
            "serve",
            "--listen",
            "0.0.0.0:9000",
            "--data",
            "/tmp/x",
            "--slots",
            "4",
            "--lease-ms",
            "1000",
        ])
        .unwrap();
        let Command::Serve(s) = c.command else {
            panic!()
        };
        assert_eq!(s.slots.slots, Some(4));
        assert_eq!(s.lease.lease_ms, 1000);
        assert!(s.redis.is_none());
        let c = Cli::try_parse_from([
            "agentplane",
            "worker",
            "--redis",
            "redis://h:1",
            "--slots",
            "2",
            "--gpus",
            "1",
        ])
        .unwrap();
        let Command::Worker(w) = c.command else {
            panic!("not a worker")
        };
        assert_eq!(
            (w.redis.as_str(), w.slots.slots, w.slots.gpus),
            ("redis://h:1", Some(2), 1)
        );
        assert!(Cli::try_parse_from(["agentplane", "worker"]).is_err());
        let c = Cli::try_parse_from([
            "agentplane",
            "scheduler",
            "--redis",
            "r",
            "--lease-ms",
            "5000",
        ])
        .unwrap();
        let Command::Scheduler(sc) = c.command else {
            panic!("not the scheduler")
        };
        assert_eq!((sc.redis.as_str(), sc.lease.lease_ms), ("r", 5000));
        let c = Cli::try_parse_from([
            "agentplane",
            "job",
            "submit",
            "--component",
            "sha256:x",
            "--input",
            "hi",
            "--wait",
        ])
        .unwrap();
        let Command::Job(client::JobCmd::Submit(a)) = c.command else {
            panic!("not job submit")
        };
        assert_eq!(
            (a.component.as_str(), a.input.as_deref(), a.wait),
            ("sha256:x", Some("hi"), true)
        );
        let c = Cli::try_parse_from(["agentplane", "tenant", "credits", "acme", "-5"]).unwrap();
        let Command::Tenant(client::TenantCmd::Credits { id, amount, .. }) = c.command else {
            panic!("not tenant credits")
        };
        assert_eq!((id.as_str(), amount), ("acme", -5));
    }
}
