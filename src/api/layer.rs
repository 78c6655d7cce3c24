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

impl<S, B, RB> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<Instrumented<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        let span = tracing::debug_span!("rpc", path = request.uri().path());
        Timed {
            inner: self.inner.call(request).instrument(span),
            timing: rpc.map(|rpc| (rpc, Instant::now(), self.metrics.clone())),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's response future; records the call when it resolves.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        timing: Option<(Rpc, Instant, Arc<Metrics>)>,
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
        if let Some((rpc, start, metrics)) = this.timing.take() {
            let failed = match &out {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|s| s.as_bytes() != b"0"),
                Err(_) => true,
            };
            metrics.observe(rpc, start, failed);
        }
        Poll::Ready(out)
    }
}
