//! Traces (with `--otlp-endpoint`; off by default): a span for each call,
//! with the hop to another member and the Raft commit as child spans, in
//! the caller's trace when its gRPC metadata carries a W3C `traceparent`.
//!
//! The span a call runs in is a task-local ([`in_span`]); code below reads
//! it ([`child`]) without it being passed along, and the forwarded hop
//! carries it to the next member in its own `traceparent`. Finished spans
//! go to a bounded queue that the exporter (`export.rs`) drains in batches;
//! with the queue full a span is dropped and counted
//! (`arbiter_trace_spans_dropped_total`). Without an endpoint nothing is
//! recorded: [`start`] and [`child`] answer `None` at the cost of one
//! atomic load.

pub mod export;

use std::borrow::Cow;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use tokio::sync::mpsc;

/// The W3C trace context header, as gRPC metadata.
pub const TRACEPARENT: &str = "traceparent";
/// Finished spans waiting for the exporter, at most.
pub const QUEUE: usize = 8192;

/// Where a span stands in its trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// What a span is to its trace (OTLP's span kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal,
    Server,
    Client,
}

/// A span that has ended.
#[derive(Clone, Debug)]
pub struct Finished {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    pub name: Cow<'static, str>,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, String)>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

struct Tracer {
    spans: mpsc::Sender<Finished>,
    /// Calls without a sampled caller trace that start one: 1 in `every`.
    every: u64,
    calls: AtomicU64,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

tokio::task_local! {
    static CURRENT: Option<SpanContext>;
}

/// Turns tracing on for the process, sampling `ratio` of the calls that
/// arrive without a trace (calls in a sampled trace are always traced);
/// the exporter reads the returned queue. `None` if it was already on.
pub fn install(ratio: f64) -> Option<mpsc::Receiver<Finished>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let every = if ratio <= 0.0 {
        u64::MAX
    } else {
        (1.0 / ratio.min(1.0)).round() as u64
    };
    TRACER
        .set(Tracer {
            spans: tx,
            every: every.max(1),
            calls: AtomicU64::new(0),
        })
        .ok()?;
    Some(rx)
}

/// Whether spans are recorded.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        // A fresh randomly keyed hasher per draw: 64 unpredictable bits.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses `traceparent` (`00-TRACEID-SPANID-FLAGS`): the caller's span if
/// valid, and whether the caller sampled it.
pub fn parse_traceparent(value: &str) -> Option<(SpanContext, bool)> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id = unhex::<16>(trace)?;
    let span_id = unhex::<8>(span)?;
    let flags = unhex::<1>(flags)?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((SpanContext { trace_id, span_id }, flags & 1 == 1))
}

/// The `traceparent` value naming `span` (sampled).
pub fn traceparent(span: &SpanContext) -> String {
    format!("00-{}-{}-01", hex(&span.trace_id), hex(&span.span_id))
}

/// A span being recorded: ends (and is queued for export) with
/// [`Span::end`].
pub struct Span {
    finished: Finished,
}

impl Span {
    fn new(
        trace_id: [u8; 16],
        parent: Option<[u8; 8]>,
        name: Cow<'static, str>,
        kind: Kind,
    ) -> Self {
        Self {
            finished: Finished {
                context: SpanContext {
                    trace_id,
                    span_id: random_bytes(),
                },
                parent,
                name,
                kind,
                start: SystemTime::now(),
                end: SystemTime::UNIX_EPOCH,
                attributes: Vec::new(),
                error: None,
            },
        }
    }

    pub fn context(&self) -> SpanContext {
        self.finished.context
    }

    pub fn set(&mut self, key: &'static str, value: impl ToString) {
        self.finished.attributes.push((key, value.to_string()));
    }

    /// Marks it failed, with why.
    pub fn fail(&mut self, why: impl ToString) {
        self.finished.error = Some(why.to_string());
    }

    /// Ends it now and queues it for export (dropped, and counted, when
    /// the queue is full).
    pub fn end(mut self) {
        self.finished.end = SystemTime::now();
        if let Some(tracer) = TRACER.get() {
            if tracer.spans.try_send(self.finished).is_err() {
                metrics::counter!("arbiter_trace_spans_dropped_total").increment(1);
            }
        }
    }
}

/// A server span for a call: in the caller's trace if `traceparent` names
/// a sampled one, otherwise a new trace for the sampled share of calls.
/// `None` when tracing is off, the caller's trace is not sampled, or this
/// call is not in the share.
pub fn start(name: impl Into<Cow<'static, str>>, traceparent: Option<&str>) -> Option<Span> {
    let tracer = TRACER.get()?;
    let (trace_id, parent) = match traceparent.and_then(parse_traceparent) {
        Some((_, false)) => return None,
        Some((caller, true)) => (caller.trace_id, Some(caller.span_id)),
        None => {
            if tracer.calls.fetch_add(1, Ordering::Relaxed) % tracer.every != 0 {
                return None;
            }
            (random_bytes(), None)
        }
    };
    Some(Span::new(trace_id, parent, name.into(), Kind::Server))
}

/// A server span in the trace `traceparent` names, if it is a sampled
/// one (never a new trace: a member serving another's call follows it).
pub fn follow(name: impl Into<Cow<'static, str>>, traceparent: &str) -> Option<Span> {
    TRACER.get()?;
    match parse_traceparent(traceparent)? {
        (caller, true) => Some(Span::new(
            caller.trace_id,
            Some(caller.span_id),
            name.into(),
            Kind::Server,
        )),
        (_, false) => None,
    }
}

/// A child of the span the current call runs in, if it is traced.
pub fn child(name: impl Into<Cow<'static, str>>, kind: Kind) -> Option<Span> {
    TRACER.get()?;
    let parent = CURRENT.try_with(|c| *c).ok().flatten()?;
    Some(Span::new(
        parent.trace_id,
        Some(parent.span_id),
        name.into(),
        kind,
    ))
}

/// The span the current call runs in, if it is traced.
pub fn current() -> Option<SpanContext> {
    CURRENT.try_with(|c| *c).ok().flatten()
}

/// Runs `future` in `span` (for [`child`] and [`current`]).
pub fn in_span<F: Future>(
    span: Option<SpanContext>,
    future: F,
) -> tokio::task::futures::TaskLocalFuture<Option<SpanContext>, F> {
    CURRENT.scope(span, future)
}

/// `--otlp-endpoint`: an http:// or https:// URL.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("must start with http:// or https://, got {s:?}"))?;
    if rest.is_empty() {
        return Err(format!("needs a host and port, got {s:?}"));
    }
    Ok(s.to_owned())
}

/// `--otlp-sample-ratio`: from 0 to 1.
pub fn parse_sample_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("must be from 0 to 1, got {r}"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_refused() {
        let ctx = SpanContext {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
        };
        let header = traceparent(&ctx);
        assert_eq!(
            header,
            format!("00-{}-{}-01", "ab".repeat(16), "01".repeat(8))
        );
        assert_eq!(parse_traceparent(&header), Some((ctx, true)));
        let unsampled = format!("{}-00", &header[..header.len() - 3]);
        assert_eq!(parse_traceparent(&unsampled), Some((ctx, false)));
        for bad in [
            "",
            "00-abc-def-01",
            &format!("ff-{}-{}-01", "ab".repeat(16), "01".repeat(8)),
            &format!("00-{}-{}-01", "00".repeat(16), "01".repeat(8)),
            &format!("00-{}-{}-01", "ab".repeat(16), "00".repeat(8)),
            &format!("00-{}-{}-01-extra", "ab".repeat(16), "01".repeat(8)),
            &format!("00-{}-{}-zz", "ab".repeat(16), "01".repeat(8)),
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn otlp_settings_are_checked() {
        assert!(parse_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(parse_endpoint("127.0.0.1:4317")
            .unwrap_err()
            .contains("http://"));
        assert!(parse_endpoint("https://").is_err());
        assert_eq!(parse_sample_ratio("0.25"), Ok(0.25));
        assert!(parse_sample_ratio("1.5")
            .unwrap_err()
            .contains("from 0 to 1"));
        assert!(parse_sample_ratio("x").is_err());
    }

    /// At the queue's bound a finished span is dropped, not waited for:
    /// the queue holds [`QUEUE`] spans and the rest are gone. (The only
    /// test in this process that turns tracing on.)
    #[tokio::test]
    async fn a_full_queue_drops_spans() {
        let mut spans = install(1.0).expect("tracing is off until now");
        let call = SpanContext {
            trace_id: [7; 16],
            span_id: [1; 8],
        };
        in_span(Some(call), async {
            for _ in 0..QUEUE + 10 {
                child("work", Kind::Internal).expect("traced").end();
            }
        })
        .await;
        let mut queued = 0;
        while let Ok(span) = spans.try_recv() {
            assert_eq!(span.parent, Some(call.span_id));
            queued += 1;
        }
        assert_eq!(queued, QUEUE);
        // Outside a call's span there is nothing to be a child of.
        assert!(child("orphan", Kind::Internal).is_none());
    }

    #[test]
    fn ids_are_not_repeated() {
        let a: [u8; 16] = random_bytes();
        let b: [u8; 16] = random_bytes();
        assert_ne!(a, b);
        assert_ne!(a, [0; 16]);
    }
}
