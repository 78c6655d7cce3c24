//! `arbiter-bench`: a bounded load generator for Arbiter (and, for a
//! side-by-side baseline, for Redis running the usual token-bucket Lua
//! script). Targets must be loopback addresses.
//!
//! cargo run --release --bin arbiter-bench -- --help

mod breakers;
mod connect;
mod redis;
mod workers;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arbiter::proto::breakers_client::BreakersClient;
use arbiter::proto::idempotency_client::IdempotencyClient;
use arbiter::proto::leases_client::LeasesClient;
use arbiter::proto::semaphores_client::SemaphoresClient;
use arbiter::proto::{self as pb, limit::Algorithm};
use breakers::*;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tonic::transport::Channel;
use workers::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Token-bucket Check against Arbiter.
    Check,
    /// Lease acquire, renew, release (each call counts as one request).
    Lease,
    /// Idempotency Begin then Complete on fresh keys (each call counts).
    Idem,
    /// Semaphore acquire, renew, release (each call counts), under
    /// --keys names with a limit no worker reaches.
    Sem,
    /// Breakers.Allow on --keys closed breakers (each made first by a
    /// success report): what every guarded call asks.
    BreakerAllow,
    /// Envoy's ShouldRateLimit on domain `bench`, one descriptor `user=<key>`
    /// per batch entry: the server needs a rule for it (see benches/rls.sh).
    Rls,
    /// The token-bucket Lua script on Redis via EVALSHA.
    RedisCheck,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Algo {
    TokenBucket,
    LeakyBucket,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KeyOrder {
    Random,
    Sequential,
}

/// Where each check call goes.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Over the targets in turn (by connection), as a Service would.
    Any,
    /// To the target that owns the key's slot (clusters started with
    /// `--slot-owners spread`; the map is read once, at start, from the
    /// first target's `ClusterStatus`); a batch's keys are drawn from one
    /// owner's slots, as a client that splits batches by owner sends them.
    Slots,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "arbiter-bench",
    about = "Bounded load generator for Arbiter (and Redis + Lua, for comparison)"
)]
struct Args {
    /// What to send.
    #[arg(long, value_enum, default_value = "check")]
    workload: Workload,
    /// Target HOST:PORT; must resolve to loopback. Several, comma-separated
    /// (`--targets a,b,c`): the connections are spread over them in turn,
    /// as a Kubernetes Service spreads callers over the replicas.
    #[arg(
        long,
        alias = "targets",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    target: Vec<String>,
    /// Where each check call goes (check workload).
    #[arg(long, value_enum, default_value = "any")]
    route: Route,
    /// Connect to Arbiter over TLS, trusting this CA (PEM).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// With --tls-ca: the name to verify the server's certificate for.
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
    /// TCP connections (for redis-check every in-flight request needs its own,
    /// so this is raised to --inflight).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 50)]
    inflight: usize,
    /// Distinct keys, picked uniformly at random (1 = one hot key).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// How keys are picked: uniformly at random, or each key in turn (to
    /// populate exactly --keys keys, e.g. for a memory measurement).
    #[arg(long, value_enum, default_value = "random")]
    key_order: KeyOrder,
    /// Checks per Check call.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Send batched checks with all_or_nothing.
    #[arg(long)]
    all_or_nothing: bool,
    /// The check workload's limit: a token bucket, or a leaky bucket whose
    /// burst is --capacity and whose rate is --refill-tokens per
    /// --refill-interval-ms.
    #[arg(long, value_enum, default_value = "token-bucket")]
    algorithm: Algo,
    /// With the leaky bucket: reserve mode's max_delay_ms (0: plain checks).
    #[arg(long, default_value_t = 0)]
    max_delay_ms: u64,
    /// Token-bucket capacity.
    #[arg(long, default_value_t = 1000)]
    capacity: u64,
    /// Tokens refilled per --refill-interval-ms.
    #[arg(long, default_value_t = 100)]
    refill_tokens: u64,
    #[arg(long, default_value_t = 1000)]
    refill_interval_ms: u64,
    /// Measured seconds (after warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Stop after this many measured requests.
    #[arg(long, default_value_t = 10_000_000)]
    requests: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Client threads. With 1 (the default) every connection and in-flight
    /// request is driven by one event loop, the cheapest way to generate load
    /// on the same machine as the server; more spread them over a
    /// work-stealing pool of that many threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Pad every rate-limit key, lease name and idempotency key with `_` to
    /// at least this many bytes (0: as they are, about 16-40 bytes).
    #[arg(long, default_value_t = 0)]
    key_bytes: usize,
    /// Bytes of each idempotency record's response (idem workload).
    #[arg(long, default_value_t = 2)]
    response_bytes: usize,
    /// Leave state behind for this many seconds (0: the usual round trips):
    /// the lease workload then only acquires fresh names with this TTL, and
    /// the idem workload keeps its records this long. For filling a node
    /// before measuring snapshots or memory; bound it with --requests.
    #[arg(long, default_value_t = 0)]
    keep_secs: u64,
}

/// Per-worker tallies, merged at the end.
struct Tally {
    latency: Histogram<u64>,
    requests: u64,
    decisions: u64,
    allowed: u64,
    errors: u64,
    /// The first error's message, to say what failed.
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 60_000_000_000, 3)
                .expect("valid histogram bounds"),
            requests: 0,
            decisions: 0,
            allowed: 0,
            errors: 0,
            first_error: None,
        }
    }
}

/// Shared run control: when measuring starts, when to stop, how many
/// measured requests remain.
struct Run {
    measure_from: Instant,
    stop_at: Instant,
    budget: AtomicU64,
    stop: AtomicBool,
    /// Next key for --key-order sequential.
    next_key: AtomicU64,
    /// Every key's name, made before the run so that requests cost the
    /// client a copy rather than a format (for the workloads other than
    /// check; empty above [`NAMED_KEYS`]).
    names: Vec<String>,
    /// For the check workload: every key's encoded check (see
    /// [`RawCodec`]; empty above [`NAMED_KEYS`]).
    entries: Vec<Vec<u8>>,
    /// With `--route slots`: the target owning each key's slot.
    owner_of: Vec<u16>,
}

/// Most keys whose names or checks are made up front (tens of MiB).
const NAMED_KEYS: u64 = 1 << 20;

fn key_name(args: &Args, n: u64) -> String {
    padded(format!("bench:user:{n}"), args.key_bytes)
}

/// `name` with `_` added up to `bytes` bytes (for memory measurements with
/// keys of a given length).
fn padded(mut name: String, bytes: usize) -> String {
    let short = bytes.saturating_sub(name.len());
    name.extend(std::iter::repeat_n('_', short));
    name
}

impl Run {
    /// Whether the next request may be sent; `Some(true)` if it is measured.
    fn admit(&self) -> Option<bool> {
        let now = Instant::now();
        if self.stop.load(Ordering::Relaxed) || now >= self.stop_at {
            return None;
        }
        if now < self.measure_from {
            return Some(false);
        }
        if self.budget.fetch_sub(1, Ordering::Relaxed) == 0
            || self.budget.load(Ordering::Relaxed) > u64::MAX / 2
        {
            self.stop.store(true, Ordering::Relaxed);
            return None;
        }
        Some(true)
    }
}

/// splitmix64: a tiny, good-enough generator for key choice.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match args.threads {
        0 => Err(std::io::Error::other("--threads must be at least 1")),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arbiter-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arbiter-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut addrs = Vec::new();
    for t in &args.target {
        addrs.push(connect::resolve_loopback(t).await?);
    }
    let addr = *addrs.first().ok_or("--target: none given")?;
    if args.inflight == 0 || args.connections == 0 || args.batch == 0 || args.keys == 0 {
        return Err("--inflight, --connections, --batch and --keys must be at least 1".into());
    }
    if !(args.duration > 0.0 && args.duration <= 3600.0 && (0.0..=600.0).contains(&args.warmup)) {
        return Err("--duration must be in (0, 3600] s and --warmup in [0, 600] s".into());
    }
    let start = Instant::now();
    let run = Arc::new(Run {
        measure_from: start + Duration::from_secs_f64(args.warmup),
        stop_at: start + Duration::from_secs_f64(args.warmup + args.duration),
        budget: AtomicU64::new(args.requests),
        stop: AtomicBool::new(false),
        next_key: AtomicU64::new(0),
        names: if args.keys <= NAMED_KEYS
            && !matches!(args.workload, Workload::Check | Workload::Rls)
        {
            (0..args.keys).map(|n| key_name(&args, n)).collect()
        } else {
            Vec::new()
        },
        entries: if args.keys <= NAMED_KEYS
            && matches!(args.workload, Workload::Check | Workload::Rls)
        {
            (0..args.keys)
                .map(|n| request_entry(&args, key_name(&args, n)))
                .collect()
        } else {
            Vec::new()
        },
        owner_of: Vec::new(),
    });
    let channels = if args.workload == Workload::RedisCheck {
        Vec::new()
    } else {
        connect::channels(&args, &addrs).await?
    };
    let script_sha = if args.workload == Workload::RedisCheck {
        let mut c = redis::Conn::connect(addr)
            .await
            .map_err(|e| format!("redis {addr}: {e}"))?;
        match c
            .call(&[b"SCRIPT", b"LOAD", redis::TOKEN_BUCKET_LUA.as_bytes()])
            .await
            .map_err(|e| e.to_string())?
        {
            redis::Reply::Bulk(Some(sha)) => Some(sha),
            other => return Err(format!("SCRIPT LOAD answered {other:?}")),
        }
    } else {
        None
    };

    let run = if args.route == Route::Slots {
        let owner_of = connect::slot_routes(&args, &channels, addrs.len()).await?;
        let mut r = Arc::into_inner(run).ok_or("the run is shared before it starts")?;
        r.owner_of = owner_of;
        Arc::new(r)
    } else {
        run
    };
    let mut tasks = Vec::new();
    for w in 0..args.inflight {
        let run = run.clone();
        let args = args.clone();
        let channel = channels.get(w % channels.len().max(1)).cloned();
        // With --route slots: one channel to each target (connection i
        // goes to target i % targets).
        let routes: Vec<Channel> = if args.route == Route::Slots {
            let per = channels.len() / addrs.len();
            (0..addrs.len())
                .map(|t| channels[t + addrs.len() * (w % per)].clone())
                .collect()
        } else {
            Vec::new()
        };
        let sha = script_sha.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(w as u64 * 7919 + now_ms());
            match args.workload {
                Workload::Check if args.route == Route::Slots => {
                    routed_check_worker(&args, &run, routes, &mut rng).await
                }
                Workload::Check => {
                    check_worker(&args, &run, channel.expect("channel"), &mut rng).await
                }
                Workload::Rls => rls_worker(&args, &run, channel.expect("channel"), &mut rng).await,
                Workload::Lease => {
                    lease_worker(&args, &run, channel.expect("channel"), w, &mut rng).await
                }
                Workload::Idem => idem_worker(&args, &run, channel.expect("channel"), w).await,
                Workload::Sem => {
                    sem_worker(&args, &run, channel.expect("channel"), w, &mut rng).await
                }
                Workload::BreakerAllow => {
                    breaker_worker(&args, &run, channel.expect("channel"), w, &mut rng).await
                }
                Workload::RedisCheck => {
                    redis_worker(&args, &run, addr, sha.expect("sha"), &mut rng).await
                }
            }
        }));
    }
    let mut total = Tally::new();
    for t in tasks {
        let t = t.await.map_err(|e| format!("worker failed: {e}"))??;
        total.latency.add(&t.latency).map_err(|e| e.to_string())?;
        total.requests += t.requests;
        total.decisions += t.decisions;
        total.allowed += t.allowed;
        total.errors += t.errors;
        total.first_error = total.first_error.or(t.first_error);
    }
    let measured = Instant::now()
        .min(run.stop_at)
        .saturating_duration_since(run.measure_from)
        .as_secs_f64();
    report(&args, &total, measured);
    Ok(())
}

fn record(t: &mut Tally, measured: bool, sent: Instant) {
    if measured {
        t.latency
            .saturating_record(sent.elapsed().as_nanos() as u64);
        t.requests += 1;
    }
}

fn key_index(args: &Args, run: &Run, rng: &mut Rng) -> u64 {
    match args.key_order {
        KeyOrder::Random => rng.below(args.keys),
        KeyOrder::Sequential => run.next_key.fetch_add(1, Ordering::Relaxed) % args.keys,
    }
}

fn key(args: &Args, run: &Run, rng: &mut Rng) -> String {
    let n = key_index(args, run, rng);
    match run.names.get(n as usize) {
        Some(name) => name.clone(),
        None => key_name(args, n),
    }
}

fn report(args: &Args, t: &Tally, secs: f64) {
    let secs = secs.max(1e-9);
    let q = |p: f64| t.latency.value_at_quantile(p) as f64 / 1000.0;
    let allowed_ratio = if t.decisions == 0 {
        0.0
    } else {
        t.allowed as f64 / t.decisions as f64
    };
    let summary = serde_json::json!({
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "target": args.target,
        "connections": if args.workload == Workload::RedisCheck { args.inflight } else { args.connections },
        "inflight": args.inflight,
        "threads": args.threads,
        "keys": args.keys,
        "batch": args.batch,
        "all_or_nothing": args.all_or_nothing,
        "seconds": secs,
        "requests": t.requests,
        "errors": t.errors,
        "first_error": t.first_error,
        "decisions": t.decisions,
        "requests_per_sec": t.requests as f64 / secs,
        "decisions_per_sec": t.decisions as f64 / secs,
        "allowed_ratio": allowed_ratio,
        "latency_us": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": t.latency.max() as f64 / 1000.0 },
    });
    if args.json {
        println!("{summary}");
        return;
    }
    println!(
        "{:?} against {} — {} in flight, {} keys, batch {}",
        args.workload,
        args.target.join(","),
        args.inflight,
        args.keys,
        args.batch
    );
    println!(
        "  {:.0} requests/s, {:.0} decisions/s, allowed {:.1}%, {} requests, {} errors in {:.1} s",
        t.requests as f64 / secs,
        t.decisions as f64 / secs,
        allowed_ratio * 100.0,
        t.requests,
        t.errors,
        secs
    );
    println!(
        "  latency µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        t.latency.max() as f64 / 1000.0
    );
    if let Some(e) = &t.first_error {
        println!("  first error: {e}");
    }
}
