//! Server configuration: flags with `ARBITER_*` environment equivalents,
//! parsed once into [`Config`]. Tests build a `Config` directly.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};

use crate::engine::EngineConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `arbiter serve` flags.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Client gRPC address (RateLimiter, Leases, Idempotency, health, reflection).
    #[arg(long, env = "ARBITER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Prometheus metrics address (`/metrics`, `/healthz`).
    #[arg(long, env = "ARBITER_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,

    /// Where state is kept. Created at start-up.
    #[arg(long, env = "ARBITER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Log line format.
    #[arg(long, env = "ARBITER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `arbiter=debug`.
    #[arg(long, env = "ARBITER_LOG", default_value = "info")]
    pub log: String,

    /// Largest lease ttl_ms and idempotency lock_ttl_ms accepted.
    #[arg(long, env = "ARBITER_MAX_TTL_MS", default_value_t = 86_400_000)]
    pub max_ttl_ms: u64,

    /// Retention for completed idempotency records when a Begin sends 0.
    #[arg(
        long,
        env = "ARBITER_DEFAULT_RETENTION_MS",
        default_value_t = 86_400_000
    )]
    pub default_retention_ms: u64,

    /// Largest idempotency retention_ms accepted.
    #[arg(long, env = "ARBITER_MAX_RETENTION_MS", default_value_t = 604_800_000)]
    pub max_retention_ms: u64,

    /// Largest stored idempotency response, in bytes.
    #[arg(long, env = "ARBITER_MAX_RESPONSE_BYTES", default_value_t = 65_536)]
    pub max_response_bytes: usize,

    /// Most checks in one Check request.
    #[arg(long, env = "ARBITER_MAX_CHECKS_PER_REQUEST", default_value_t = 1000)]
    pub max_checks_per_request: usize,

    /// Most rate-limit keys held at once (idle keys are swept and do not count
    /// for long); beyond it new keys get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ARBITER_MAX_LIMIT_KEYS", default_value_t = 10_000_000)]
    pub max_limit_keys: usize,

    /// Most leases held at once.
    #[arg(long, env = "ARBITER_MAX_LEASES", default_value_t = 1_000_000)]
    pub max_leases: usize,

    /// Most idempotency records held at once.
    #[arg(long, env = "ARBITER_MAX_RECORDS", default_value_t = 1_000_000)]
    pub max_records: usize,

    /// Most bytes of idempotency records (keys, fingerprints, responses).
    #[arg(long, env = "ARBITER_MAX_RECORD_BYTES", default_value_t = 1 << 30)]
    pub max_record_bytes: usize,

    /// Shards of the rate-limit table (rounded up to a power of two).
    #[arg(long, env = "ARBITER_LIMIT_SHARDS", default_value_t = 64)]
    pub limit_shards: usize,

    /// How often idle rate-limit keys (full buckets, lapsed windows) are swept.
    #[arg(long, env = "ARBITER_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub sweep_interval_ms: u64,

    /// Take a snapshot of the state (and purge the log before it) after this
    /// many log entries.
    #[arg(long, env = "ARBITER_SNAPSHOT_LOGS", default_value_t = 10_000)]
    pub snapshot_logs: u64,

    /// Async runtime worker threads (default: one per CPU core).
    #[arg(long, env = "ARBITER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "ARBITER_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
}

#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    config: Config,
}

impl Default for Config {
    /// The documented defaults (ignoring the environment is not possible with
    /// clap's `env`, so tests that need isolation set every field they use).
    fn default() -> Self {
        DefaultsOnly::parse_from(["arbiter"]).config
    }
}

impl Config {
    /// Loopback, OS-chosen ports and the given data directory: for tests.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            metrics_listen: "127.0.0.1:0".parse().expect("literal address"),
            data_dir,
            ..Self::default()
        }
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            limit_shards: self.limit_shards,
            max_limit_keys: self.max_limit_keys,
            max_leases: self.max_leases,
            max_records: self.max_records,
            max_record_bytes: self.max_record_bytes,
        }
    }
}
