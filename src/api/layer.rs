//! Per-RPC metrics and tracing, once for every service: a tower layer
//! around the client routes. Every call is timed, failed ones too, and a
//! failed call (any `grpc-status` other than OK in the response head) is
//! counted by RPC.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tower_layer::Layer;
use tower_service::Service;
use tracing::instrument::Instrumented;
use tracing::Instrument;

use crate::metrics::{Metrics, Rpc};

/// Adds [`RpcMetrics`] around a service.
#[derive(Clone)]
pub struct RpcMetricsLayer(pub Arc<Metrics>);

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// Times each call of a known RPC (see [`Rpc::from_path`]) and runs it in a
/// debug-level span named after it.
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The inner call's future, run in its trace span (if traced).
type InSpan<F> = tokio::task::futures::TaskLocalFuture<Option<crate::telemetry::SpanContext>, F>;

impl<S, B, RB> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<InSpan<Instrumented<S::Future>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        let span = tracing::debug_span!("rpc", path = request.uri().path());
        // A trace span for the call (with --otlp-endpoint), in the caller's
        // trace when its metadata names one.
        let traced = if crate::telemetry::enabled() && rpc.is_some() {
            let parent = request
                .headers()
                .get(crate::telemetry::TRACEPARENT)
                .and_then(|v| v.to_str().ok());
            let path = request.uri().path();
            crate::telemetry::start(path.trim_start_matches('/').to_owned(), parent)
        } else {
            None
        };
        let context = traced.as_ref().map(|s| s.context());
        Timed {
            inner: crate::telemetry::in_span(context, self.inner.call(request).instrument(span)),
            timing: rpc.map(|rpc| (rpc, Instant::now(), self.metrics.clone())),
            traced,
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's response future; records the call when it resolves.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        timing: Option<(Rpc, Instant, Arc<Metrics>)>,
        traced: Option<crate::telemetry::Span>,
    }
}

impl<F, RB, E> Future for Timed<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        // A status in the head is a failure (OK comes in the trailers).
        let status = match &out {
            Ok(response) => response
                .headers()
                .get("grpc-status")
                .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned()),
            Err(_) => Some("transport error".to_owned()),
        };
        let failed = status.as_deref().is_some_and(|s| s != "0");
        if let Some((rpc, start, metrics)) = this.timing.take() {
            metrics.observe(rpc, start, failed);
        }
        if let Some(mut span) = this.traced.take() {
            span.set("rpc.system", "grpc");
            span.set("rpc.grpc.status_code", status.as_deref().unwrap_or("0"));
            if failed {
                span.fail(format!("grpc-status {}", status.unwrap_or_default()));
            }
            span.end();
        }
        Poll::Ready(out)
    }
}

/// With an auth file, refuses a call from a caller it does not know before
/// its body is read: a large message from nobody costs a header lookup,
/// not a decode. Health checks and reflection pass (they need no
/// principal); the handlers still authorise every call they serve.
#[derive(Clone)]
pub struct AuthGateLayer(pub Option<crate::security::Auth>);

impl<S> Layer<S> for AuthGateLayer {
    type Service = AuthGate<S>;

    fn layer(&self, inner: S) -> AuthGate<S> {
        AuthGate {
            inner,
            auth: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthGate<S> {
    inner: S,
    auth: Option<crate::security::Auth>,
}

/// Services any caller may use.
fn open_to_anyone(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

pin_project_lite::pin_project! {
    /// The gated call's response: the inner service's, or the refusal.
    #[project = GatedProj]
    pub enum Gated<F> {
        Passed { #[pin] inner: F },
        Refused { response: Option<http::Response<tonic::body::Body>> },
    }
}

impl<F, E> Future for Gated<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GatedProj::Passed { inner } => inner.poll(cx),
            GatedProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

impl<S, B> Service<http::Request<B>> for AuthGate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Gated<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(auth) = &self.auth {
            if !open_to_anyone(request.uri().path()) {
                let found = auth.current().identify(
                    request.extensions().get::<crate::security::ConnInfo>(),
                    request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok()),
                );
                match found {
                    // The handler takes the caller from here (`Caller::of`).
                    Some(p) => {
                        request
                            .extensions_mut()
                            .insert(crate::security::auth::Identified(p));
                    }
                    None => {
                        crate::security::auth::refused(
                            crate::security::auth::UNIDENTIFIED,
                            "unauthenticated",
                        );
                        let refused =
                            tonic::Status::unauthenticated(crate::security::auth::UNKNOWN_CALLER);
                        return Gated::Refused {
                            response: Some(refused.into_http()),
                        };
                    }
                }
            }
        }
        Gated::Passed {
            inner: self.inner.call(request),
        }
    }
}

/// Bounds each peer RPC's request body to the largest legitimate one:
/// an append (a batch of log entries) up to the peer message limit, a
/// snapshot chunk, a forwarded client call, and a few KiB for the rest
/// (votes, pre-votes, `Identify`, `TakeOver`); the check stream has none
/// (its messages are bounded one by one). A body past its bound is not
/// read further and the call fails.
#[derive(Clone, Copy)]
pub struct PeerBodyLimitLayer;

impl<S> Layer<S> for PeerBodyLimitLayer {
    type Service = PeerBodyLimit<S>;

    fn layer(&self, inner: S) -> PeerBodyLimit<S> {
        PeerBodyLimit { inner }
    }
}

#[derive(Clone)]
pub struct PeerBodyLimit<S> {
    inner: S,
}

/// The largest request body each peer RPC takes.
pub fn peer_body_limit(path: &str) -> usize {
    use crate::raft::network::{PEER_MESSAGE_LIMIT, SNAPSHOT_CHUNK_BYTES};
    match path.rsplit('/').next().unwrap_or("") {
        "AppendEntries" => PEER_MESSAGE_LIMIT,
        "InstallSnapshot" => 2 * SNAPSHOT_CHUNK_BYTES as usize,
        // A client call: at most a response of --max-response-bytes (4 MiB
        // at most) or a batch of checks, with its keys.
        "Forward" => 8 << 20,
        // An owner's rate-limit sync: about 64 KiB of keys and cells.
        "Slots" => 1 << 20,
        // A member's check stream lives as long as the connection: its
        // body has no end to bound. Each of its messages is bounded by
        // the peer message limit (as decoded), each batch by the checks a
        // call may carry (as served), and the batches served at once by
        // the stream's own bound.
        "Decide" => usize::MAX,
        _ => 64 << 10,
    }
}

impl<S, B> Service<http::Request<B>> for PeerBodyLimit<S>
where
    S: Service<http::Request<tonic::body::Body>>,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = peer_body_limit(request.uri().path());
        self.inner.call(
            request.map(|body| tonic::body::Body::new(http_body_util::Limited::new(body, limit))),
        )
    }
}
