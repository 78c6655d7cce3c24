//! Prometheus metrics: decisions, per-RPC latency, live state sizes.
//!
//! Handles are resolved once at start-up so the hot path only bumps atomics.
//! Without an installed recorder (unit tests) every handle is a no-op.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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
    latency: [Histogram; RPCS.len()],
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
            latency: RPCS.map(|rpc| histogram!("arbiter_rpc_duration_seconds", "rpc" => rpc)),
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
        self.latency[rpc as usize].record(start.elapsed().as_secs_f64());
    }

    fn refresh(&self, node: &Node) {
        let (keys, leases, records, bytes) = node.engine().counts();
        self.limit_keys.set(keys as f64);
        self.leases.set(leases as f64);
        self.records.set(records as f64);
        self.record_bytes.set(bytes as f64);
    }
}

/// Installs the global Prometheus recorder. Call once, before [`Metrics::new`].
pub fn install() -> Result<PrometheusHandle, String> {
    const BUCKETS: [f64; 14] = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("arbiter_rpc_duration_seconds".into()),
            &BUCKETS,
        )
        .map_err(|e| e.to_string())?
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
        handle.run_upkeep();
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
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
