//! Traces (`--otlp-endpoint`) from a real 3-node cluster into an
//! in-process OTLP collector stub that records the spans it is sent: a
//! write through a follower, in the caller's trace, is one tree across the
//! hop to the leader and its Raft commit; a call with no trace starts one;
//! a caller's unsampled trace is left alone.

use std::sync::{Arc, Mutex};

use arbiter::otlp::trace_service_server::{TraceService, TraceServiceServer};
use arbiter::otlp::{span::SpanKind, ExportTraceServiceRequest, ExportTraceServiceResponse, Span};
use arbiter::proto::AcquireRequest;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::support::eventually;

/// Records every span it is sent, with its resource's
/// `service.instance.id` (the member that sent it).
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let member = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| kv.value.as_ref()?.value.clone())
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (member.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> (Collector, String) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (collector, format!("http://{addr}"))
    }

    fn in_trace(&self, trace_id: &[u8]) -> Vec<(String, Span)> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|(_, s)| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

fn acquire(name: &str, traceparent: Option<&str>) -> Request<AcquireRequest> {
    let mut request = Request::new(AcquireRequest {
        name: name.into(),
        holder: "h".into(),
        ttl_ms: 10_000,
    });
    if let Some(tp) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", tp.parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_is_one_trace_across_the_hop_and_the_commit() {
    let (collector, endpoint) = Collector::start().await;
    let cluster = Cluster::start(3, &["--otlp-endpoint", &endpoint]);
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let mut leases = cluster.node(follower).leases().await;

    let trace_id = [0x4b; 16];
    let caller_span = [0x11; 8];
    let tp = format!("00-{}-{}-01", "4b".repeat(16), "11".repeat(8));
    leases.acquire(acquire("traced", Some(&tp))).await.unwrap();

    // The follower's server span (child of the caller's), its client span
    // for the hop, the leader's server span for the forwarded call, and
    // the commit under it.
    let spans = eventually("the trace's four spans", || {
        let spans = collector.in_trace(&trace_id);
        async move { (spans.len() >= 4).then_some(spans) }
    })
    .await;
    let find = |pred: &dyn Fn(&Span) -> bool| {
        spans
            .iter()
            .find(|(_, s)| pred(s))
            .unwrap_or_else(|| panic!("no such span in {spans:#?}"))
            .clone()
    };
    let (at, server) = find(&|s| s.name == "arbiter.v1.Leases/Acquire");
    assert_eq!(at, format!("StringValue({:?})", (follower + 1).to_string()));
    assert_eq!(server.parent_span_id, caller_span);
    assert_eq!(server.kind, SpanKind::Server as i32);
    let (_, hop) = find(&|s| s.name.starts_with("forward Acquire to member"));
    assert_eq!(hop.parent_span_id, server.span_id);
    assert_eq!(hop.kind, SpanKind::Client as i32);
    let (at, served) = find(&|s| s.name == "serve forwarded Acquire");
    assert_eq!(at, format!("StringValue({:?})", (leader + 1).to_string()));
    assert_eq!(served.parent_span_id, hop.span_id);
    let (_, commit) = find(&|s| s.name == "raft commit");
    assert_eq!(commit.parent_span_id, served.span_id);
    for (_, s) in &spans {
        assert!(s.start_time_unix_nano > 0 && s.end_time_unix_nano >= s.start_time_unix_nano);
    }
    // The caller's span encloses the hop, which encloses the commit.
    assert!(server.start_time_unix_nano <= hop.start_time_unix_nano);
    assert!(hop.end_time_unix_nano <= server.end_time_unix_nano);
    assert!(commit.end_time_unix_nano <= hop.end_time_unix_nano);

    // A call with no trace starts one (every call, at the default ratio);
    // a caller's unsampled trace is not recorded.
    // (Both to the leader, whose spans leave in the order they ended: once
    // the second call's span came, the first's would have.)
    let mut on_leader = cluster.node(leader).leases().await;
    let unsampled = format!("00-{}-{}-00", "5c".repeat(16), "22".repeat(8));
    on_leader
        .acquire(acquire("unsampled", Some(&unsampled)))
        .await
        .unwrap();
    on_leader.acquire(acquire("untraced", None)).await.unwrap();
    eventually("a new trace for the call without one", || {
        let spans = collector.spans.lock().unwrap();
        let found = spans.iter().any(|(_, s)| {
            s.name == "arbiter.v1.Leases/Acquire"
                && s.parent_span_id.is_empty()
                && s.trace_id != trace_id
        });
        async move { found.then_some(()) }
    })
    .await;
    assert!(collector.in_trace(&[0x5c; 16]).is_empty());
}
