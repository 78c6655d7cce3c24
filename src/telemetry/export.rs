//! Sends finished spans to an OTLP/gRPC collector (`--otlp-endpoint`):
//! up to [`BATCH`] at a time, at least every [`EVERY`], each export
//! bounded by [`EXPORT_TIMEOUT`]. A batch the collector does not take is
//! dropped (counted in `arbiter_trace_spans_dropped_total`, logged at most
//! once a minute): traces are worth less than the calls they describe.

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::{Finished, Kind};
use crate::otlp::{
    any_value, span, status, trace_service_client::TraceServiceClient, AnyValue,
    ExportTraceServiceRequest, InstrumentationScope, KeyValue, Resource, ResourceSpans, ScopeSpans,
    Span, Status,
};

/// Spans sent in one export, at most.
pub const BATCH: usize = 512;
/// How long a finished span waits for its batch, at most.
pub const EVERY: Duration = Duration::from_secs(1);
/// How long one export may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One span in OTLP's form.
pub fn to_otlp(f: Finished) -> Span {
    Span {
        trace_id: f.context.trace_id.to_vec(),
        span_id: f.context.span_id.to_vec(),
        parent_span_id: f.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: f.name.into_owned(),
        kind: match f.kind {
            Kind::Internal => span::SpanKind::Internal,
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: nanos(f.start),
        end_time_unix_nano: nanos(f.end),
        attributes: f
            .attributes
            .into_iter()
            .map(|(k, v)| string(k, v))
            .collect(),
        status: Some(match f.error {
            Some(message) => Status {
                message,
                code: status::StatusCode::Error as i32,
            },
            None => Status {
                message: String::new(),
                code: status::StatusCode::Unset as i32,
            },
        }),
        // Sampled (W3C trace flags).
        flags: 1,
    }
}

/// Exports what `spans` brings to `endpoint` (`http://HOST:PORT`) until
/// the queue closes or `stop` resolves; `node_id` names this member in the
/// spans' resource.
pub async fn run(
    endpoint: String,
    node_id: u64,
    mut spans: mpsc::Receiver<Finished>,
    stop: impl std::future::Future<Output = ()>,
) {
    let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
        Ok(e) => e.timeout(EXPORT_TIMEOUT).connect_lazy(),
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "--otlp-endpoint: not a URL; no traces exported");
            return;
        }
    };
    let mut client = TraceServiceClient::new(channel);
    let resource = Resource {
        attributes: vec![
            string("service.name", "arbiter"),
            string("service.instance.id", node_id.to_string()),
            string("service.version", env!("CARGO_PKG_VERSION")),
        ],
    };
    let mut last_warned: Option<std::time::Instant> = None;
    tokio::pin!(stop);
    loop {
        let mut batch = Vec::new();
        let first = tokio::select! {
            span = spans.recv() => span,
            _ = &mut stop => None,
        };
        let Some(first) = first else { return };
        batch.push(to_otlp(first));
        let deadline = tokio::time::Instant::now() + EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(to_otlp(span)),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len();
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "arbiter".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: batch,
                }],
            }],
        };
        if let Err(e) = client.export(request).await {
            metrics::counter!("arbiter_trace_spans_dropped_total").increment(n as u64);
            if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(%endpoint, error = %e, spans = n, "trace export failed; spans dropped");
                last_warned = Some(std::time::Instant::now());
            }
        } else {
            metrics::counter!("arbiter_trace_spans_exported_total").increment(n as u64);
        }
    }
}
