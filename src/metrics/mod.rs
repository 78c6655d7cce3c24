//! Prometheus metrics: decisions, per-RPC latency, live state sizes.
//!
//! Handles are resolved once at start-up so the hot path only bumps atomics.
//! Without an installed recorder (unit tests) every handle is a no-op.
//! Latency histograms are fixed buckets of atomic counters kept here (the
//! exporter's histograms keep every sample until the next scrape).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use metrics::{counter, gauge, Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::node::Node;

mod prefixes;
mod standing;
pub use prefixes::Prefixes;
pub use standing::Bounds;

/// The RPCs whose calls are recorded: (gRPC path, metric label).
const RPCS: [(&str, &str); 25] = [
    ("/arbiter.v1.RateLimiter/Check", "Check"),
    ("/arbiter.v1.Leases/Acquire", "Acquire"),
    ("/arbiter.v1.Leases/Renew", "Renew"),
    ("/arbiter.v1.Leases/Release", "Release"),
    ("/arbiter.v1.Leases/Get", "GetLease"),
    ("/arbiter.v1.Leases/Watch", "WatchLease"),
    ("/arbiter.v1.Semaphores/Acquire", "SemaphoreAcquire"),
    ("/arbiter.v1.Semaphores/Renew", "SemaphoreRenew"),
    ("/arbiter.v1.Semaphores/Release", "SemaphoreRelease"),
    ("/arbiter.v1.Semaphores/Get", "GetSemaphore"),
    ("/arbiter.v1.Semaphores/Watch", "WatchSemaphore"),
    ("/arbiter.v1.Breakers/Allow", "BreakerAllow"),
    ("/arbiter.v1.Breakers/Report", "BreakerReport"),
    ("/arbiter.v1.Breakers/Get", "GetBreaker"),
    ("/arbiter.v1.Breakers/Watch", "WatchBreaker"),
    ("/arbiter.v1.Idempotency/Begin", "Begin"),
    ("/arbiter.v1.Idempotency/Complete", "Complete"),
    ("/arbiter.v1.Idempotency/Abort", "Abort"),
    ("/arbiter.v1.Idempotency/Get", "GetRecord"),
    ("/arbiter.v1.Cluster/Status", "ClusterStatus"),
    ("/arbiter.v1.Cluster/AddMember", "AddMember"),
    ("/arbiter.v1.Cluster/RemoveMember", "RemoveMember"),
    ("/arbiter.v1.Cluster/Rebalance", "Rebalance"),
    ("/arbiter.v1.Cluster/Metrics", "ClusterMetrics"),
    (
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        "ShouldRateLimit",
    ),
];

/// One of [`RPCS`], by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rpc(usize);

impl Rpc {
    /// The RPC served at `path`, if it is one of Arbiter's own.
    pub fn from_path(path: &str) -> Option<Rpc> {
        RPCS.iter().position(|(p, _)| *p == path).map(Rpc)
    }
}

pub struct Metrics {
    allowed: Counter,
    denied: Counter,
    latency: [Latency; RPCS.len()],
    failures: [AtomicU64; RPCS.len()],
    limit_keys: Gauge,
    leases: Gauge,
    records: Gauge,
    semaphore_holders: Gauge,
    breakers: Gauge,
    record_bytes: Gauge,
    watchers: Gauge,
    slot_version: Gauge,
    slots_owned: Gauge,
    decided_here: Counter,
    rerouted: Counter,
    stream_batches: Counter,
    stream_checks: Counter,
    reservations: [Counter; 4],
    reserve_mode: [Counter; 3],
    reserve_delay_ms: Counter,
    held: Gauge,
    spanning: Counter,
    unconfirmed: Counter,
    bounds: Bounds,
    /// Decisions by key prefix.
    pub prefixes: Prefixes,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // Counted where they happen, registered here so that a scrape shows
        // them at 0 before the first.
        for how in ["built", "installed"] {
            counter!("arbiter_snapshots_total", "how" => how).increment(0);
        }
        for kind in ["append", "vote", "snapshot"] {
            counter!("arbiter_raft_sent_bytes_total", "kind" => kind).increment(0);
        }
        counter!("arbiter_limit_sync_cells_total").increment(0);
        counter!("arbiter_raft_leader_changes_total").increment(0);
        counter!("arbiter_tls_handshake_failures_total").increment(0);
        Self {
            allowed: counter!("arbiter_decisions_total", "result" => "allowed"),
            denied: counter!("arbiter_decisions_total", "result" => "denied"),
            latency: RPCS.map(|_| Latency::default()),
            failures: RPCS.map(|_| AtomicU64::new(0)),
            limit_keys: gauge!("arbiter_live_keys", "kind" => "rate_limit"),
            leases: gauge!("arbiter_live_keys", "kind" => "lease"),
            records: gauge!("arbiter_live_keys", "kind" => "idempotency_record"),
            semaphore_holders: gauge!("arbiter_live_keys", "kind" => "semaphore_holder"),
            breakers: gauge!("arbiter_live_keys", "kind" => "breaker"),
            record_bytes: gauge!("arbiter_idempotency_record_bytes"),
            watchers: gauge!("arbiter_lease_watchers"),
            slot_version: gauge!("arbiter_slot_map_version"),
            slots_owned: gauge!("arbiter_slots_owned"),
            decided_here: counter!("arbiter_checks_decided_here_total"),
            rerouted: counter!("arbiter_checks_rerouted_total"),
            stream_batches: counter!("arbiter_check_stream_batches_total"),
            stream_checks: counter!("arbiter_check_stream_checks_total"),
            reservations: ["reserved", "confirmed", "released", "lapsed"]
                .map(|step| counter!("arbiter_reservations_total", "step" => step)),
            reserve_mode: ["now", "delayed", "refused"]
                .map(|result| counter!("arbiter_reserve_mode_checks_total", "result" => result)),
            reserve_delay_ms: counter!("arbiter_reserve_mode_delay_ms_total"),
            held: gauge!("arbiter_reservations_held"),
            spanning: counter!("arbiter_spanning_calls_total"),
            unconfirmed: counter!("arbiter_spanning_calls_unconfirmed_total"),
            bounds: Bounds::default(),
            prefixes: Prefixes::default(),
        }
    }

    /// With the bounds a scrape reports beside the engine's caps.
    pub fn with_bounds(mut self, bounds: Bounds) -> Self {
        self.bounds = bounds;
        self
    }

    pub fn decisions(&self, allowed: u64, denied: u64) {
        self.allowed.increment(allowed);
        self.denied.increment(denied);
    }

    /// Counts a reserve-mode check (a leaky bucket's, with max_delay_ms):
    /// admitted to go now, admitted to wait `delay_ms`, or refused.
    pub fn reserve_mode(&self, allowed: bool, delay_ms: u64) {
        let i = match (allowed, delay_ms) {
            (true, 0) => 0,
            (true, _) => 1,
            (false, _) => 2,
        };
        self.reserve_mode[i].increment(1);
        self.reserve_delay_ms.increment(delay_ms);
    }

    /// Records a call of `rpc` that began at `start` (and whether it
    /// failed).
    pub fn observe(&self, rpc: Rpc, start: Instant, failed: bool) {
        self.latency[rpc.0].record(start.elapsed());
        if failed {
            self.failures[rpc.0].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The latency histograms and failure counts in Prometheus text format.
    pub fn render_latency(&self) -> String {
        let mut out = String::from(
            "# HELP arbiter_rpc_duration_seconds Time to serve a call, by RPC.\n\
             # TYPE arbiter_rpc_duration_seconds histogram\n",
        );
        for ((_, rpc), h) in RPCS.iter().zip(&self.latency) {
            let mut cumulative = 0;
            for (le, n) in BUCKETS_S.iter().zip(&h.buckets) {
                cumulative += n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "arbiter_rpc_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"{le}\"}} {cumulative}"
                );
            }
            // Read last, so it is never below a bucket's cumulative count.
            let count = h.count.load(Ordering::Relaxed).max(cumulative);
            let sum = h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "arbiter_rpc_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"+Inf\"}} {count}\n\
                 arbiter_rpc_duration_seconds_sum{{rpc=\"{rpc}\"}} {sum}\n\
                 arbiter_rpc_duration_seconds_count{{rpc=\"{rpc}\"}} {count}"
            );
        }
        out.push_str(
            "# HELP arbiter_rpc_failures_total Calls answered with a status other than OK, by RPC.\n\
             # TYPE arbiter_rpc_failures_total counter\n",
        );
        for ((_, rpc), n) in RPCS.iter().zip(&self.failures) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(out, "arbiter_rpc_failures_total{{rpc=\"{rpc}\"}} {n}");
        }
        out
    }

    fn refresh(&self, node: &Node) {
        let counts = node.counts();
        self.limit_keys.set(counts.limit_keys as f64);
        self.leases.set(counts.leases as f64);
        self.records.set(counts.records as f64);
        self.semaphore_holders.set(counts.semaphore_holders as f64);
        self.breakers.set(counts.breakers as f64);
        self.record_bytes.set(counts.record_bytes as f64);
        self.watchers.set(node.watchers() as f64);
        let (version, owned, decided, rerouted) = node.slot_standing();
        self.rerouted.absolute(rerouted);
        self.slot_version.set(version as f64);
        self.slots_owned.set(owned as f64);
        self.decided_here.absolute(decided);
        let (batches, checks) = node.check_stream_counts();
        self.stream_batches.absolute(batches);
        self.stream_checks.absolute(checks);
        let holds = node.holds();
        let c = &holds.counts;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        for (counter, n) in
            self.reservations
                .iter()
                .zip([&c.reserved, &c.confirmed, &c.released, &c.lapsed])
        {
            counter.absolute(load(n));
        }
        self.held.set(holds.len() as f64);
        self.spanning.absolute(load(&c.coordinated));
        self.unconfirmed.absolute(load(&c.unconfirmed));
    }
}

/// Upper bounds of the latency buckets, in seconds (as rendered) and in
/// nanoseconds (as compared).
const BUCKETS_S: [&str; 14] = [
    "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
    "0.1", "0.25", "0.5", "1",
];
const BUCKETS_NS: [u64; 14] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// One RPC's latency histogram: a count per bucket (not cumulative), the
/// total count and the sum. Recording is three relaxed atomic additions.
#[derive(Default)]
struct Latency {
    buckets: [AtomicU64; BUCKETS_NS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Latency {
    fn record(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_NS.iter().position(|le| ns <= *le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Installs the global Prometheus recorder. Call once, before [`Metrics::new`].
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` over
/// HTTP/1.1 on `listener` until `shutdown` resolves, refreshing gauges on
/// each scrape.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    metrics: Arc<Metrics>,
    node: Arc<Node>,
    tls: Option<Arc<crate::security::Reloading<rustls::ServerConfig>>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::node::Node::stopped(&mut shutdown) => return,
        };
        let (handle, metrics, node) = (handle.clone(), metrics.clone(), node.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let reply = respond(request.uri().path(), &handle, &metrics, &node);
            async move { Ok::<_, std::convert::Infallible>(reply) }
        });
        let tls = tls.clone();
        tokio::spawn(async move {
            // The handshake (if any) runs here, not in the accept loop.
            let io = match crate::security::tls::accept(stream, tls.as_deref()).await {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics TLS handshake");
                    return;
                }
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}

/// The calls this node forwarded to the leader and served for followers,
/// by operation (named as the node declares them), in Prometheus text
/// format.
fn render_forwarded(node: &Node) -> String {
    let mut out = String::from(
        "# HELP arbiter_forwarded_calls_total Calls forwarded to the leader (sent) and served for \
         a follower (served), by operation.\n\
         # TYPE arbiter_forwarded_calls_total counter\n",
    );
    for (op, sent, served) in node.forwarded() {
        for (direction, n) in [("sent", sent), ("served", served)] {
            let _ = writeln!(
                out,
                "arbiter_forwarded_calls_total{{op=\"{op}\",direction=\"{direction}\"}} {n}"
            );
        }
    }
    out
}

/// Everything `/metrics` serves, in Prometheus text format (gauges
/// refreshed first).
pub fn render(handle: &PrometheusHandle, metrics: &Metrics, node: &Node) -> String {
    metrics.refresh(node);
    handle.render()
        + &metrics.render_latency()
        + &render_forwarded(node)
        + &standing::render(node, metrics.bounds)
        + &metrics.prefixes.render()
}

/// The answer to `GET path`.
fn respond(
    path: &str,
    handle: &PrometheusHandle,
    metrics: &Metrics,
    node: &Node,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            render(handle, metrics, node),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC the client port serves has its metric label, and every
    /// label is an RPC the protos declare: an RPC added to a proto without
    /// one fails here. (The peer port's `RaftPeer` is not counted.)
    #[test]
    fn every_served_rpc_has_a_label() {
        use prost::Message;
        let mut declared = std::collections::BTreeSet::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            crate::envoy::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap();
            for file in set.file {
                for service in file.service.iter().filter(|s| s.name() != "RaftPeer") {
                    for method in &service.method {
                        declared.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        let labelled: std::collections::BTreeSet<String> =
            RPCS.iter().map(|(path, _)| path.to_string()).collect();
        assert_eq!(declared, labelled);
    }

    #[test]
    fn latency_buckets_are_cumulative_and_bounded_by_count() {
        let m = Metrics::new();
        let h = &m.latency[Rpc::from_path("/arbiter.v1.RateLimiter/Check").unwrap().0];
        h.record(Duration::from_micros(40)); // <= 50 µs
        h.record(Duration::from_micros(50)); // <= 50 µs, on the bound
        h.record(Duration::from_micros(700)); // <= 1 ms
        h.record(Duration::from_secs(3)); // above every bound: only +Inf
        let text = m.render_latency();
        for line in [
            "arbiter_rpc_duration_seconds_bucket{rpc=\"Check\",le=\"0.00005\"} 2",
            "arbiter_rpc_duration_seconds_bucket{rpc=\"Check\",le=\"0.0005\"} 2",
            "arbiter_rpc_duration_seconds_bucket{rpc=\"Check\",le=\"0.001\"} 3",
            "arbiter_rpc_duration_seconds_bucket{rpc=\"Check\",le=\"1\"} 3",
            "arbiter_rpc_duration_seconds_bucket{rpc=\"Check\",le=\"+Inf\"} 4",
            "arbiter_rpc_duration_seconds_sum{rpc=\"Check\"} 3.00079",
            "arbiter_rpc_duration_seconds_count{rpc=\"Check\"} 4",
            "arbiter_rpc_duration_seconds_count{rpc=\"Acquire\"} 0",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(
            text.matches("# TYPE").count(),
            2,
            "one histogram, one counter"
        );
    }
}
