//! Command line: `arbiter serve` and the client subcommands for a person at
//! a terminal. Client commands print `key=value` lines and exit non-zero on
//! errors (1) or, for `check`, when the check is denied (2).

mod breakers;
mod commands;
mod parse;
mod semaphores;
mod top;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::security::{self, ClientFiles, ClientOptions, Conn};

use crate::config::{Config, LogFormat};
use crate::proto::{
    self as pb, cluster_client::ClusterClient, idempotency_client::IdempotencyClient,
    leases_client::LeasesClient, rate_limiter_client::RateLimiterClient,
};
use commands::{check, cluster, health, idem, lease, limits_check};
pub use parse::parse_duration_ms;
use parse::{
    parse_descriptor, parse_fixed, parse_leaky, parse_sliding, parse_token_bucket, Entries,
};

#[derive(Parser)]
#[command(
    name = "arbiter",
    version,
    about = "Rate limits, leases with fencing tokens and idempotency records over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(Box<Config>),
    /// Check (and consume from) a rate limit.
    Check(CheckArgs),
    /// Leases: acquire, renew, release, get, watch.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Semaphores: acquire, renew, release, get.
    #[command(subcommand)]
    Sem(semaphores::SemCmd),
    /// Shared circuit breakers: allow, report, get, watch.
    #[command(subcommand)]
    Breaker(breakers::BreakerCmd),
    /// Idempotency records: begin, complete, abort, get.
    #[command(subcommand)]
    Idem(IdemCmd),
    /// Cluster membership and leadership: status, add, remove, rebalance.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Named limits: `limits check PATH` validates a limits file or
    /// directory offline (exit 1 on errors).
    #[command(subcommand)]
    Limits(LimitsCmd),
    /// A live view of the cluster from any member: members with role,
    /// term, applied index and lag; decisions/s; p99 per RPC; named limits
    /// with their deny share; leases and records. `q` quits; `--once`
    /// prints one frame. Needs an admin principal with --auth-file.
    Top(top::TopArgs),
    /// gRPC health check: exits 0 when SERVING, 1 otherwise. With no
    /// --service it asks about liveness (""); `--service ready` asks whether
    /// the node can serve calls (a known leader and a caught-up log).
    Health(HealthArgs),
}

#[derive(Args)]
struct HealthArgs {
    #[command(flatten)]
    server: Server,
    /// The health service name: "" (the process), `ready` (shorthand for
    /// arbiter.v1.Leases), or a full service name such as arbiter.v1.RateLimiter.
    #[arg(long, default_value = "")]
    service: String,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term and applied index as the server sees them.
    Status {
        #[command(flatten)]
        server: Server,
    },
    /// Add a node (started with the same --peers plus itself) as a voter.
    Add {
        #[command(flatten)]
        server: Server,
        /// The new node's id.
        id: u64,
        /// Its peer address, HOST:PORT.
        peer_addr: String,
        /// Make it a voter even if it has not caught up within the server's
        /// --member-catch-up-ms (by default the add is then rolled back).
        #[arg(long)]
        force: bool,
    },
    /// Remove a voter.
    Remove {
        #[command(flatten)]
        server: Server,
        id: u64,
    },
    /// Move rate-limit slots (--slot-owners spread): drain members of their
    /// slots, or give drained members back their share. Admins only.
    Rebalance {
        #[command(flatten)]
        server: Server,
        /// A voter to drain (repeatable); it stays drained until restored.
        #[arg(long = "drain", value_name = "ID")]
        drain: Vec<u64>,
        /// A drained voter to give its share back (repeatable).
        #[arg(long = "restore", value_name = "ID")]
        restore: Vec<u64>,
    },
}

#[derive(Args)]
struct Server {
    /// The server to talk to.
    #[arg(
        long,
        env = "ARBITER_SERVER",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    server: String,
    /// Connect over TLS, trusting this CA (PEM).
    #[arg(long, env = "ARBITER_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --tls-key and --tls-ca.
    #[arg(long, env = "ARBITER_TLS_CERT", global = true)]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "ARBITER_TLS_KEY", global = true)]
    tls_key: Option<std::path::PathBuf>,
    /// Verify the server's certificate for this name instead of the
    /// --server host.
    #[arg(long, env = "ARBITER_TLS_SERVER_NAME", global = true)]
    tls_server_name: Option<String>,
    /// Bearer token sent as `authorization: Bearer TOKEN` (`--token` is
    /// the lease commands' fencing token). On the command line `ps` shows
    /// it: prefer ARBITER_TOKEN or --auth-token-file.
    #[arg(long, env = "ARBITER_TOKEN", global = true, hide_env_values = true)]
    auth_token: Option<String>,
    /// Read the bearer token from this file (its first line).
    #[arg(
        long,
        env = "ARBITER_TOKEN_FILE",
        global = true,
        conflicts_with = "auth_token"
    )]
    auth_token_file: Option<std::path::PathBuf>,
    /// Send a bearer token over plaintext (http://) anyway; refused
    /// otherwise, as anyone on the path could read and replay it.
    #[arg(long, env = "ARBITER_INSECURE", global = true)]
    insecure: bool,
}

#[derive(Subcommand)]
enum LimitsCmd {
    /// Parse and validate a limits file, or a directory of them, with the
    /// server's own parser; prints each domain, exits 1 on the first error.
    Check {
        path: std::path::PathBuf,
        /// Join a domain configured in several files, as the server's
        /// --limits-merge-domains does.
        #[arg(long)]
        merge_domains: bool,
    },
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    server: Server,
    /// The rate-limit key (not with --domain).
    #[arg(long, required_unless_present = "domain", conflicts_with = "domain")]
    key: Option<String>,
    /// A named limit's domain (the server's --limits), with --descriptor
    /// instead of a key and a limit definition.
    #[arg(long, requires = "descriptor", conflicts_with = "limit")]
    domain: Option<String>,
    /// The descriptor's entries: `k=v[,k=v...]`, in nesting order.
    #[arg(long, value_parser = parse_descriptor)]
    descriptor: Option<Entries>,
    /// CAPACITY:TOKENS/INTERVAL, e.g. `10:1/s` or `100:5/250ms`.
    #[arg(long, group = "limit", value_parser = parse_token_bucket)]
    token_bucket: Option<pb::TokenBucket>,
    /// LIMIT/WINDOW, e.g. `100/1m`.
    #[arg(long, group = "limit", value_parser = parse_sliding)]
    sliding_window: Option<pb::SlidingWindow>,
    /// LIMIT/WINDOW, e.g. `100/1m`.
    #[arg(long, group = "limit", value_parser = parse_fixed)]
    fixed_window: Option<pb::FixedWindow>,
    /// RATE/INTERVAL, e.g. `10/s`: a leaky bucket draining at that rate.
    #[arg(long, group = "limit", value_parser = parse_leaky)]
    leaky_bucket: Option<pb::LeakyBucket>,
    /// The leaky bucket's burst: units that may go at once [default: 1].
    #[arg(long, requires = "leaky_bucket", conflicts_with_all = OTHER_LIMITS)]
    burst: Option<u64>,
    /// Reserve mode: admit the check if it can start within this wait
    /// (e.g. `2s`) and print how long to wait as `delay_ms`.
    #[arg(
        long,
        requires = "leaky_bucket",
        conflicts_with_all = OTHER_LIMITS,
        value_parser = parse_duration_ms
    )]
    max_delay: Option<u64>,
    /// Units to consume (0 peeks).
    #[arg(long, default_value_t = 1)]
    cost: u64,
    /// Decide without consuming.
    #[arg(long)]
    dry_run: bool,
}

/// The limits other than the leaky bucket: `--burst` and `--max-delay` are
/// refused with them (clap counts the `limit` group's `requires` as met by
/// any of its members).
const OTHER_LIMITS: [&str; 4] = ["token_bucket", "sliding_window", "fixed_window", "domain"];

#[derive(Subcommand)]
enum LeaseCmd {
    /// Acquire (or, as the holder, renew) a lease.
    Acquire {
        #[command(flatten)]
        server: Server,
        name: String,
        #[arg(long)]
        holder: String,
        /// e.g. `10s`, `500ms`.
        #[arg(long, value_parser = parse_duration_ms)]
        ttl: u64,
    },
    /// Extend a held lease.
    Renew {
        #[command(flatten)]
        server: Server,
        name: String,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        token: u64,
        #[arg(long, value_parser = parse_duration_ms)]
        ttl: u64,
    },
    /// Release a held lease.
    Release {
        #[command(flatten)]
        server: Server,
        name: String,
        #[arg(long)]
        holder: String,
        #[arg(long)]
        token: u64,
    },
    /// Show who holds a lease.
    Get {
        #[command(flatten)]
        server: Server,
        name: String,
    },
    /// Print the lease's state, then every change, until interrupted.
    Watch {
        #[command(flatten)]
        server: Server,
        name: String,
    },
}

#[derive(Subcommand)]
enum IdemCmd {
    /// Claim a key (or learn it is in progress / completed).
    Begin {
        #[command(flatten)]
        server: Server,
        key: String,
        /// Request digest; a retry with another fingerprint is refused.
        #[arg(long, default_value = "")]
        fingerprint: String,
        #[arg(long, value_parser = parse_duration_ms, default_value = "30s")]
        lock_ttl: u64,
        /// Default: the server's.
        #[arg(long, value_parser = parse_duration_ms)]
        retention: Option<u64>,
    },
    /// Store the response of an attempt.
    Complete {
        #[command(flatten)]
        server: Server,
        key: String,
        #[arg(long)]
        attempt: u64,
        #[arg(long, default_value = "")]
        response: String,
    },
    /// Give an attempt up so the key can be retried.
    Abort {
        #[command(flatten)]
        server: Server,
        key: String,
        #[arg(long)]
        attempt: u64,
    },
    /// Show a record.
    Get {
        #[command(flatten)]
        server: Server,
        key: String,
    },
}

/// `250ms`, `10s`, `5m`, `2h`, `1d`, `s` (= 1s) or a bare number of ms.
fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log).unwrap_or_else(|e| {
        eprintln!(
            "arbiter: bad --log filter {:?} ({e}); using info",
            config.log
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM or SIGINT. Both handlers are installed when this
/// is called, before the server starts: installed only when first awaited
/// (once the server is up), a SIGTERM that came while it started took the
/// default action and killed it.
fn termination() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut handlers = Vec::new();
    for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
        match signal(kind) {
            Ok(s) => handlers.push(s),
            Err(e) => tracing::warn!(error = %e, ?kind, "cannot listen for a signal"),
        }
    }
    async move {
        if handlers.is_empty() {
            return std::future::pending().await;
        }
        let waits = handlers.iter_mut().map(|s| Box::pin(s.recv()));
        futures::future::select_all(waits).await;
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Cmd::Serve(config) => {
            init_logging(&config);
            return match crate::server::run(*config, crate::clock::from_env(), termination()).await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "arbiter failed");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Check(args) => check(args).await,
        Cmd::Lease(cmd) => lease(cmd).await,
        Cmd::Sem(cmd) => semaphores::sem(cmd).await,
        Cmd::Breaker(cmd) => breakers::breaker(cmd).await,
        Cmd::Idem(cmd) => idem(cmd).await,
        Cmd::Cluster(cmd) => cluster(cmd).await,
        Cmd::Health(args) => health(args).await,
        Cmd::Top(args) => top::top(args).await,
        Cmd::Limits(LimitsCmd::Check {
            path,
            merge_domains,
        }) => limits_check(&path, merge_domains),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<ExitCode, String>;

async fn connect(server: &Server) -> Result<Conn, String> {
    let tls = match (&server.tls_ca, &server.tls_cert, &server.tls_key) {
        (None, None, None) => None,
        (Some(ca), cert, key) => Some(ClientFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, _, _) => return Err("--tls-cert and --tls-key need --tls-ca".into()),
    };
    let token = match &server.auth_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--auth-token-file {}: {e}", path.display()))?;
            let token = text.lines().next().unwrap_or("").trim().to_owned();
            if token.is_empty() {
                return Err(format!("--auth-token-file {}: empty", path.display()));
            }
            Some(token)
        }
        None => server.auth_token.clone(),
    };
    if token.is_some() && tls.is_none() && !server.insecure {
        return Err(format!(
            "{}: refusing to send a bearer token without TLS (anyone on the path could read \
             and replay it); connect with --tls-ca, or pass --insecure",
            server.server
        ));
    }
    security::connect(
        &server.server,
        &ClientOptions {
            tls,
            token,
            server_name: server.tls_server_name.clone(),
        },
    )
    .await
}

fn status(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}
