//! Command line: `arbiter serve` and the client subcommands for a person at
//! a terminal. Client commands print `key=value` lines and exit non-zero on
//! errors (1) or, for `check`, when the check is denied (2).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tonic::transport::Channel;

use crate::config::{Config, LogFormat};
use crate::proto::{
    self as pb, cluster_client::ClusterClient, idempotency_client::IdempotencyClient,
    leases_client::LeasesClient, rate_limiter_client::RateLimiterClient,
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
    /// Idempotency records: begin, complete, abort, get.
    #[command(subcommand)]
    Idem(IdemCmd),
    /// Cluster membership and leadership: status, add, remove.
    #[command(subcommand)]
    Cluster(ClusterCmd),
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
    },
    /// Remove a voter.
    Remove {
        #[command(flatten)]
        server: Server,
        id: u64,
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
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    server: Server,
    /// The rate-limit key.
    #[arg(long)]
    key: String,
    /// CAPACITY:TOKENS/INTERVAL, e.g. `10:1/s` or `100:5/250ms`.
    #[arg(long, group = "limit", value_parser = parse_token_bucket)]
    token_bucket: Option<pb::TokenBucket>,
    /// LIMIT/WINDOW, e.g. `100/1m`.
    #[arg(long, group = "limit", value_parser = parse_sliding)]
    sliding_window: Option<pb::SlidingWindow>,
    /// LIMIT/WINDOW, e.g. `100/1m`.
    #[arg(long, group = "limit", value_parser = parse_fixed)]
    fixed_window: Option<pb::FixedWindow>,
    /// Units to consume (0 peeks).
    #[arg(long, default_value_t = 1)]
    cost: u64,
    /// Decide without consuming.
    #[arg(long)]
    dry_run: bool,
}

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
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = if num.is_empty() {
        1
    } else {
        num.parse().map_err(|e| format!("{s:?}: {e}"))?
    };
    let scale = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?}: too large"))
}

fn parse_rate(s: &str) -> Result<(u64, u64), String> {
    let (n, d) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected AMOUNT/DURATION, e.g. 100/1m"))?;
    let n = n.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((n, parse_duration_ms(d)?))
}

fn parse_token_bucket(s: &str) -> Result<pb::TokenBucket, String> {
    let (cap, rate) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected CAPACITY:TOKENS/INTERVAL, e.g. 10:1/s"))?;
    let (refill_tokens, refill_interval_ms) = parse_rate(rate)?;
    Ok(pb::TokenBucket {
        capacity: cap.parse().map_err(|e| format!("{s:?}: {e}"))?,
        refill_tokens,
        refill_interval_ms,
    })
}

fn parse_sliding(s: &str) -> Result<pb::SlidingWindow, String> {
    let (limit, window_ms) = parse_rate(s)?;
    Ok(pb::SlidingWindow { limit, window_ms })
}

fn parse_fixed(s: &str) -> Result<pb::FixedWindow, String> {
    let (limit, window_ms) = parse_rate(s)?;
    Ok(pb::FixedWindow { limit, window_ms })
}

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

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Cmd::Serve(config) => {
            init_logging(&config);
            return match crate::server::run(
                *config,
                Arc::new(crate::clock::SystemClock),
                termination(),
            )
            .await
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
        Cmd::Idem(cmd) => idem(cmd).await,
        Cmd::Cluster(cmd) => cluster(cmd).await,
        Cmd::Health(args) => health(args).await,
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

async fn connect(server: &Server) -> Result<Channel, String> {
    let endpoint = Channel::from_shared(server.server.clone())
        .map_err(|e| format!("--server {:?}: {e}", server.server))?
        .connect_timeout(Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", server.server))
}

fn status(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

fn print_lease(l: &pb::Lease) {
    println!(
        "name={} holder={} fencing_token={} ttl_ms={} remaining_ms={}",
        l.name, l.holder, l.fencing_token, l.ttl_ms, l.remaining_ms
    );
}

async fn check(a: CheckArgs) -> CliResult {
    use pb::limit::Algorithm;
    let algorithm = match (a.token_bucket, a.sliding_window, a.fixed_window) {
        (Some(t), _, _) => Algorithm::TokenBucket(t),
        (_, Some(s), _) => Algorithm::SlidingWindow(s),
        (_, _, Some(f)) => Algorithm::FixedWindow(f),
        _ => {
            return Err(
                "one of --token-bucket, --sliding-window or --fixed-window is required".into(),
            )
        }
    };
    let mut client = RateLimiterClient::new(connect(&a.server).await?);
    let reply = client
        .check(pb::CheckRequest {
            checks: vec![pb::LimitCheck {
                key: a.key,
                limit: Some(pb::Limit {
                    algorithm: Some(algorithm),
                }),
                cost: Some(a.cost),
                dry_run: a.dry_run,
            }],
            all_or_nothing: false,
        })
        .await
        .map_err(status)?
        .into_inner();
    let r = reply.results.first().ok_or("server returned no result")?;
    println!(
        "{} limit={} remaining={} retry_after_ms={} reset_after_ms={}",
        if r.allowed { "allowed" } else { "denied" },
        r.limit,
        r.remaining,
        r.retry_after_ms,
        r.reset_after_ms
    );
    Ok(if r.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn lease(cmd: LeaseCmd) -> CliResult {
    match cmd {
        LeaseCmd::Acquire {
            server,
            name,
            holder,
            ttl,
        } => {
            let r = LeasesClient::new(connect(&server).await?)
                .acquire(pb::AcquireRequest {
                    name,
                    holder,
                    ttl_ms: ttl,
                })
                .await
                .map_err(status)?
                .into_inner();
            print!(
                "{} ",
                if r.acquired {
                    "acquired"
                } else {
                    "held-by-other"
                }
            );
            if let Some(l) = &r.lease {
                print_lease(l);
            }
            Ok(if r.acquired {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        LeaseCmd::Renew {
            server,
            name,
            holder,
            token,
            ttl,
        } => {
            let r = LeasesClient::new(connect(&server).await?)
                .renew(pb::RenewRequest {
                    name,
                    holder,
                    fencing_token: token,
                    ttl_ms: ttl,
                })
                .await
                .map_err(status)?
                .into_inner();
            print!("renewed ");
            r.lease.iter().for_each(print_lease);
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::Release {
            server,
            name,
            holder,
            token,
        } => {
            let r = LeasesClient::new(connect(&server).await?)
                .release(pb::ReleaseRequest {
                    name,
                    holder,
                    fencing_token: token,
                })
                .await
                .map_err(status)?
                .into_inner();
            print!("released ");
            r.lease.iter().for_each(print_lease);
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::Get { server, name } => {
            let r = LeasesClient::new(connect(&server).await?)
                .get(pb::GetLeaseRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            match r.lease {
                Some(l) => print_lease(&l),
                None => println!("free"),
            }
            Ok(ExitCode::SUCCESS)
        }
        LeaseCmd::Watch { server, name } => {
            let mut stream = LeasesClient::new(connect(&server).await?)
                .watch(pb::WatchLeaseRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(event) = stream.message().await.map_err(status)? {
                let kind = pb::lease_event::Kind::try_from(event.kind)
                    .map(|k| k.as_str_name())
                    .unwrap_or("UNKNOWN");
                match &event.lease {
                    Some(l) => {
                        print!("{kind} ");
                        print_lease(l);
                    }
                    None => println!("{kind} free"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn idem(cmd: IdemCmd) -> CliResult {
    match cmd {
        IdemCmd::Begin {
            server,
            key,
            fingerprint,
            lock_ttl,
            retention,
        } => {
            let r = IdempotencyClient::new(connect(&server).await?)
                .begin(pb::BeginRequest {
                    key,
                    fingerprint: fingerprint.into_bytes(),
                    lock_ttl_ms: lock_ttl,
                    retention_ms: retention.unwrap_or(0),
                })
                .await
                .map_err(status)?
                .into_inner();
            let outcome = pb::Outcome::try_from(r.outcome)
                .map(|o| o.as_str_name())
                .unwrap_or("UNKNOWN");
            println!(
                "{outcome} attempt={} retry_after_ms={} response={}",
                r.attempt,
                r.retry_after_ms,
                String::from_utf8_lossy(&r.response)
            );
            Ok(ExitCode::SUCCESS)
        }
        IdemCmd::Complete {
            server,
            key,
            attempt,
            response,
        } => {
            IdempotencyClient::new(connect(&server).await?)
                .complete(pb::CompleteRequest {
                    key,
                    attempt,
                    response: response.into_bytes(),
                })
                .await
                .map_err(status)?;
            println!("completed");
            Ok(ExitCode::SUCCESS)
        }
        IdemCmd::Abort {
            server,
            key,
            attempt,
        } => {
            IdempotencyClient::new(connect(&server).await?)
                .abort(pb::AbortRequest { key, attempt })
                .await
                .map_err(status)?;
            println!("aborted");
            Ok(ExitCode::SUCCESS)
        }
        IdemCmd::Get { server, key } => {
            let r = IdempotencyClient::new(connect(&server).await?)
                .get(pb::GetRecordRequest { key })
                .await
                .map_err(status)?
                .into_inner();
            match r.record {
                Some(rec) => {
                    let state = pb::record::State::try_from(rec.state)
                        .map(|s| s.as_str_name())
                        .unwrap_or("UNKNOWN");
                    println!(
                        "{state} attempt={} expires_after_ms={} response={}",
                        rec.attempt,
                        rec.expires_after_ms,
                        String::from_utf8_lossy(&rec.response)
                    );
                }
                None => println!("absent"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn cluster(cmd: ClusterCmd) -> CliResult {
    let (server, call) = match cmd {
        ClusterCmd::Status { server } => (server, None),
        ClusterCmd::Add {
            server,
            id,
            peer_addr,
        } => (server, Some((id, Some(peer_addr)))),
        ClusterCmd::Remove { server, id } => (server, Some((id, None))),
    };
    let mut client = ClusterClient::new(connect(&server).await?);
    let st = match call {
        None => client.status(pb::ClusterStatusRequest {}).await,
        Some((id, Some(peer_addr))) => {
            client
                .add_member(pb::AddMemberRequest { id, peer_addr })
                .await
        }
        Some((id, None)) => client.remove_member(pb::RemoveMemberRequest { id }).await,
    }
    .map_err(status)?
    .into_inner();
    let leader = st.leader_id.map_or("none".to_owned(), |l| l.to_string());
    println!(
        "node_id={} state={} leader={leader} term={} applied_index={}",
        st.node_id, st.state, st.term, st.applied_index
    );
    for m in &st.members {
        println!(
            "member id={} peer={} {}",
            m.id,
            m.peer_addr,
            if m.voter { "voter" } else { "learner" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn health(args: HealthArgs) -> CliResult {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let service = match args.service.as_str() {
        "ready" => "arbiter.v1.Leases".to_owned(),
        s => s.to_owned(),
    };
    let mut client = HealthClient::new(connect(&args.server).await?);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.clone(),
    });
    request.set_timeout(Duration::from_secs(5));
    let st = client.check(request).await.map_err(status)?.into_inner();
    let serving = st.status == ServingStatus::Serving as i32;
    let name = ServingStatus::try_from(st.status).map_or("UNKNOWN", |s| s.as_str_name());
    println!("service={service:?} status={name}");
    Ok(if serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_parse() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("s"), Ok(1000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("1500"), Ok(1500));
        assert!(parse_duration_ms("5 weeks").is_err());
        let tb = parse_token_bucket("10:1/s").unwrap();
        assert_eq!(
            (tb.capacity, tb.refill_tokens, tb.refill_interval_ms),
            (10, 1, 1000)
        );
        assert!(parse_token_bucket("10/s").is_err());
        assert_eq!(parse_fixed("100/1m").unwrap().window_ms, 60_000);
    }
}
