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

use metrics::{counter, gauge, Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::node::Node;

/// The RPCs whose latency is recorded.
#[derive(Clone, Copy, Debug)]
pub enum Rpc {
    Check,
    Acquire,
    Renew,
    Release,
    GetLease,
    Begin,
    Complete,
    Abort,
    GetRecord,
}

const RPCS: [&str; 9] = [
    "Check",
    "Acquire",
    "Renew",
    "Release",
    "GetLease",
    "Begin",
    "Complete",
    "Abort",
    "GetRecord",
];

pub struct Metrics {
    allowed: Counter,
    denied: Counter,
    latency: [Latency; RPCS.len()],
    limit_keys: Gauge,
    leases: Gauge,
    records: Gauge,
    record_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            allowed: counter!("arbiter_decisions_total", "result" => "allowed"),
            denied: counter!("arbiter_decisions_total", "result" => "denied"),
            latency: RPCS.map(|_| Latency::default()),
            limit_keys: gauge!("arbiter_live_keys", "kind" => "rate_limit"),
            leases: gauge!("arbiter_live_keys", "kind" => "lease"),
            records: gauge!("arbiter_live_keys", "kind" => "idempotency_record"),
            record_bytes: gauge!("arbiter_idempotency_record_bytes"),
        }
    }

    pub fn decisions(&self, allowed: u64, denied: u64) {
        self.allowed.increment(allowed);
        self.denied.increment(denied);
    }

    /// Records the time since `start` for `rpc`.
    pub fn observe(&self, rpc: Rpc, start: Instant) {
        self.latency[rpc as usize].record(start.elapsed());
    }

    /// The latency histograms in Prometheus text format.
    pub fn render_latency(&self) -> String {
        let mut out = String::from(
            "# HELP arbiter_rpc_duration_seconds Time to serve a call, by RPC.\n\
             # TYPE arbiter_rpc_duration_seconds histogram\n",
        );
        for (rpc, h) in RPCS.iter().zip(&self.latency) {
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
        out
    }

    fn refresh(&self, node: &Node) {
        let (keys, leases, records, bytes) = node.counts();
        self.limit_keys.set(keys as f64);
        self.leases.set(leases as f64);
        self.records.set(records as f64);
        self.record_bytes.set(bytes as f64);
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

/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` over plain
/// HTTP/1.1 on `listener` until `shutdown` resolves, refreshing gauges on
/// each scrape. Deliberately tiny: one request per connection, no keep-alive.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    metrics: Arc<Metrics>,
    node: Arc<Node>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { tracing::warn!(error = %e, "metrics accept failed"); continue; }
            },
            _ = crate::node::Node::stopped(&mut shutdown) => return,
        };
        metrics.refresh(&node);
        let latency = metrics.render_latency();
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    handle.render() + &latency,
                ),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_and_bounded_by_count() {
        let m = Metrics::new();
        let h = &m.latency[Rpc::Check as usize];
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
        assert_eq!(text.matches("# TYPE").count(), 1);
    }
}
