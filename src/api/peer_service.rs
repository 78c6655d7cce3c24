//! `arbiter.v1.RaftPeer`: the receiving end of the peer network (Raft
//! traffic and pre-votes), and of calls forwarded by followers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::raft::VoteRequest;
use tonic::{Request, Response, Status};

use crate::node::{
    Admission, Call, CheckLimits, IdentifyRequest, Node, NodeError, PreVoteRequest,
    PreVoteResponse, SlotRequest, TakeOver, CLUSTER_HEADER, REFUSAL_HEADER,
};
use crate::proto::raft_peer_server::RaftPeer;
use crate::proto::{DecideReply, DecideRequest, PeerMessage};
use crate::raft::network::{decode, decode_append, decode_snapshot, encode};
use crate::raft::NodeId;
use crate::security::tls::host_matches;
use crate::security::{Auth, Caller, ConnInfo, PRINCIPAL_HEADER};

/// Sets a forwarded call's quotas from this node's auth file (the
/// follower's values are not taken on trust).
fn stamp_quotas(call: Call, caller: &Caller, caps: &super::Caps) -> Call {
    match call {
        Call::Acquire(mut op) => {
            op.quota = caller.lease_quota(caps);
            Call::Acquire(op)
        }
        Call::Begin(mut op) => {
            op.quota = caller.record_quota(caps);
            Call::Begin(op)
        }
        Call::SemAcquire(mut op) => {
            op.quota = caller.lease_quota(caps);
            Call::SemAcquire(op)
        }
        Call::Complete(mut op) => {
            op.byte_quota = caller.record_quota(caps).bytes;
            Call::Complete(op)
        }
        Call::CheckLimits(mut op) => {
            // Keys are counted against the caller the call was forwarded for.
            op.principal = caller.name().to_owned();
            op.key_quota = caller.limit_key_quota(caps);
            Call::CheckLimits(op)
        }
        Call::SpanningCheck(mut op) => {
            op.principal = caller.name().to_owned();
            op.key_quota = caller.limit_key_quota(caps);
            Call::SpanningCheck(op)
        }
        Call::BreakerCall(mut op) => {
            // Breakers count against the caller's rate-limit key quota.
            op.principal = caller.name().to_owned();
            op.quota = caller.limit_key_quota(caps);
            Call::BreakerCall(op)
        }
        other @ (Call::Renew(_)
        | Call::Release(_)
        | Call::Abort(_)
        | Call::GetLease(_)
        | Call::GetRecord(_)
        | Call::AddMember(_)
        | Call::RemoveMember(_)
        | Call::Rebalance(_)
        | Call::MemberMetrics(_)
        | Call::SemRenew(_)
        | Call::SemRelease(_)
        | Call::GetSemaphore(_)) => other,
    }
}

pub struct PeerService {
    node: Arc<Node>,
    /// When a refused message was last logged (monotonic ms).
    warned: AtomicU64,
    auth: Option<Auth>,
    /// Whether the peer port takes only TLS connections with a verified
    /// certificate, which must then name a current member.
    tls: bool,
    /// The client-facing bounds, applied again to forwarded calls (none in
    /// the simulated cluster, whose calls come from the node's own API).
    bounds: Option<super::Bounds>,
}

/// How often a refused message of another cluster is logged, at most.
const FOREIGN_WARN_EVERY_MS: u64 = 10_000;

/// Batches of one check stream served at once, at most.
const STREAM_IN_FLIGHT: usize = 256;

/// What takes calls other members forward: the node, and what a call is
/// checked against.
#[derive(Clone)]
struct Taker {
    node: Arc<Node>,
    auth: Option<Auth>,
    bounds: Option<super::Bounds>,
}

impl Taker {
    /// A forwarded call as this node takes it: from the principal the
    /// sender named, within the client bounds, authorised, with quotas as
    /// this node (which serves it) reads them.
    fn checked(&self, principal: Option<&str>, call: Call) -> Result<Call, Status> {
        let caller = Caller::forwarded(self.auth.as_ref(), principal)?;
        if let Some(bounds) = &self.bounds {
            super::convert::forwarded(&call, bounds)?;
        }
        super::authz::authorize(&caller, &call)?;
        Ok(match &self.bounds {
            Some(bounds) => stamp_quotas(call, &caller, &bounds.caps),
            None => call,
        })
    }

    /// One batch from a check stream, answered.
    async fn decide_one(&self, batch: DecideRequest) -> DecideReply {
        let id = batch.id;
        let answer = match self.streamed_call(batch) {
            Ok(call) => self.node.serve_streamed(call).await,
            Err(status) => Err(NodeError::Unavailable(format!(
                "not taken: {}",
                status.message()
            ))),
        };
        match answer {
            Ok(results) => DecideReply {
                id,
                results: results.into_iter().map(Into::into).collect(),
                error: Vec::new(),
            },
            Err(e) => DecideReply {
                id,
                results: Vec::new(),
                error: serde_json::to_vec(&e).unwrap_or_default(),
            },
        }
    }

    fn streamed_call(&self, batch: DecideRequest) -> Result<Call, Status> {
        let checks = batch
            .checks
            .into_iter()
            .enumerate()
            .map(|(i, c)| super::convert::limit_check(i, c))
            .collect::<Result<Vec<_>, _>>()?;
        let principal = (!batch.principal.is_empty()).then_some(batch.principal.as_str());
        let call = Call::CheckLimits(CheckLimits {
            checks,
            all_or_nothing: false,
            principal: batch.principal.clone(),
            key_quota: None,
        });
        self.checked(principal, call)
    }
}

impl PeerService {
    /// With `auth`, forwarded calls are authorised as the principal they
    /// carry, as the follower did. With `tls`, every call's certificate
    /// must name a current member.
    pub fn new(
        node: Arc<Node>,
        auth: Option<Auth>,
        tls: bool,
        bounds: Option<super::Bounds>,
    ) -> Self {
        Self {
            node,
            warned: AtomicU64::new(0),
            auth,
            tls,
            bounds,
        }
    }
}

fn bad(e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

/// The host part of a peer address (`HOST:PORT`, `[V6]:PORT`).
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

impl PeerService {
    fn taker(&self) -> Taker {
        Taker {
            node: self.node.clone(),
            auth: self.auth.clone(),
            bounds: self.bounds,
        }
    }

    /// Lets a peer message through only if it carries this cluster's id,
    /// comes (with peer TLS) over a certificate that names a current
    /// member, claims (`sender`, for Raft traffic) a node id of the
    /// membership that the certificate names, and, except for `Identify`,
    /// this node is admitted (see `admission`).
    /// `leader`: an append or snapshot, whose cluster id a new member may
    /// learn (nothing else teaches it: an `Identify` from another new member
    /// carries that member's formation id, not the cluster's).
    fn admit<T>(
        &self,
        request: &Request<T>,
        sender: Option<NodeId>,
        identify: bool,
        leader: bool,
    ) -> Result<(), Status> {
        let node = &self.node;
        let cluster = request
            .metadata()
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok());
        // A new member learns the cluster id from a leader's message, but
        // only once that message has passed the checks below.
        let learn = leader && node.admitted() && node.cluster_id().is_none();
        if !learn {
            node.check_cluster(cluster, false)
                .map_err(|why| self.refuse(Status::failed_precondition(why)))?;
        }
        if self.tls {
            let hosts = request
                .extensions()
                .get::<ConnInfo>()
                .map(|c| c.cert_hosts.clone())
                .unwrap_or_else(|| Arc::from([]));
            let named: Vec<NodeId> = node.with_peer_members(|members| {
                members
                    .filter(|(_, addr)| {
                        let host = host_of(addr);
                        hosts.iter().any(|name| host_matches(name, host))
                    })
                    .map(|(id, _)| id)
                    .collect()
            });
            if named.is_empty() {
                return Err(self.refuse(Status::permission_denied(format!(
                    "node {}: the peer's certificate names {:?}, which is no member's peer host \
                     (members: {})",
                    node.id(),
                    hosts,
                    node.peer_members()
                        .iter()
                        .map(|(id, a)| format!("{id}={a}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ))));
            }
            if let Some(id) = sender.filter(|id| !named.contains(id)) {
                return Err(self.refuse(Status::permission_denied(format!(
                    "node {}: a message claims to come from node {id}, but the peer's \
                     certificate names node(s) {named:?}",
                    node.id()
                ))));
            }
        }
        let stranger = sender
            .filter(|s| !node.with_peer_members(|mut m| Iterator::any(&mut m, |(id, _)| id == *s)));
        if let Some(id) = stranger {
            return Err(self.refuse(Status::permission_denied(format!(
                "node {}: node {id} is not a member; refusing its message",
                node.id()
            ))));
        }
        if learn {
            node.check_cluster(cluster, true)
                .map_err(|why| self.refuse(Status::failed_precondition(why)))?;
        }
        if identify {
            return Ok(());
        }
        match &*node.admission().borrow() {
            Admission::Admitted => Ok(()),
            Admission::Checking => Err(Status::unavailable(format!(
                "node {} is asking its peers whether it may join",
                node.id()
            ))),
            Admission::Refused(why) => Err(Status::failed_precondition(why.clone())),
        }
    }

    /// Records that `sender` takes part in Raft with state of its own
    /// before its message is acted on (see `raft::seen`).
    fn seen(&self, sender: NodeId) -> Result<(), Status> {
        self.node.seen().record(sender).map_err(Status::unavailable)
    }

    /// Logs a refusal (at most once every [`FOREIGN_WARN_EVERY_MS`]: a
    /// stranger's heartbeats would otherwise log twenty times a second)
    /// and counts it.
    fn refuse(&self, status: Status) -> Status {
        ::metrics::counter!("arbiter_peer_refusals_total", "code" => format!("{:?}", status.code()))
            .increment(1);
        let now = self.node.mono_ms();
        let last = self.warned.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= FOREIGN_WARN_EVERY_MS {
            self.warned.store(now.max(1), Ordering::Relaxed);
            tracing::warn!("{}", status.message());
        }
        status
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        let rpc = decode_append(request.get_ref())
            .map_err(|e| Status::invalid_argument(format!("undecodable append: {e}")))?;
        self.admit(&request, Some(rpc.vote.leader_id.node_id), false, true)?;
        self.seen(rpc.vote.leader_id.node_id)?;
        self.node.heard_from(&rpc.vote, rpc.leader_commit);
        Ok(Response::new(encode(
            &self.node.raft().append_entries(rpc).await,
        )))
    }

    async fn vote(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let rpc: VoteRequest<NodeId> = decode(request.get_ref()).map_err(bad)?;
        self.admit(&request, Some(rpc.vote.leader_id.node_id), false, false)?;
        self.seen(rpc.vote.leader_id.node_id)?;
        let reply = self.node.raft().vote(rpc).await;
        if matches!(&reply, Ok(r) if r.vote_granted) {
            // Give the candidate this node voted for time to win.
            self.node.heard_from_leader();
        }
        Ok(Response::new(encode(&reply)))
    }

    async fn install_snapshot(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        // The sender is checked from the header before the chunk is
        // decoded, and again once its vote is known.
        self.admit(&request, None, false, false)?;
        let (metadata, extensions, message) = request.into_parts();
        let rpc = decode_snapshot(message)
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot chunk: {e}")))?;
        let sender = rpc.vote.leader_id.node_id;
        self.admit(
            &Request::from_parts(metadata, extensions, ()),
            Some(sender),
            false,
            true,
        )?;
        self.seen(sender)?;
        self.node.heard_from(&rpc.vote, None);
        Ok(Response::new(encode(
            &self.node.raft().install_snapshot(rpc).await,
        )))
    }

    async fn pre_vote(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        let ask: PreVoteRequest = decode(request.get_ref()).map_err(bad)?;
        self.admit(&request, Some(ask.candidate), false, false)?;
        let granted = self.node.grants_pre_vote(&ask);
        Ok(Response::new(encode(&PreVoteResponse { granted })))
    }

    async fn forward(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request, None, false, false)?;
        let principal = request
            .metadata()
            .get(PRINCIPAL_HEADER)
            .and_then(|v| v.to_str().ok());
        let call: Call = decode(request.get_ref()).map_err(bad)?;
        let call = self.taker().checked(principal, call)?;
        // In the sender's trace, if it sent one.
        let span = request
            .metadata()
            .get(crate::telemetry::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|tp| {
                let name = format!("serve forwarded {}", Call::NAMES[call.index()]);
                crate::telemetry::follow(name, tp)
            });
        // Served here only if this node leads; otherwise the sender routes again.
        let served = crate::telemetry::in_span(
            span.as_ref().map(|s| s.context()),
            self.node.serve_forwarded(call),
        )
        .await;
        if let Some(span) = span {
            span.end();
        }
        Ok(Response::new(served))
    }

    type DecideStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<DecideReply, Status>> + Send + 'static>,
    >;

    /// Another member's check stream: each batch is checked as a forwarded
    /// call is (principal, bounds, authorisation, quotas) and served as it
    /// arrives, at most [`STREAM_IN_FLIGHT`] at once (past that the stream
    /// is read no further until one is answered), answered by its id.
    async fn decide(
        &self,
        request: Request<tonic::Streaming<DecideRequest>>,
    ) -> Result<Response<Self::DecideStream>, Status> {
        self.admit(&request, None, false, false)?;
        let mut batches = request.into_inner();
        let (replies, out) = tokio::sync::mpsc::channel(STREAM_IN_FLIGHT);
        let this = self.taker();
        tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(STREAM_IN_FLIGHT));
            while let Ok(Some(batch)) = batches.message().await {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (this, replies) = (this.clone(), replies.clone());
                let mut decided = Box::pin(async move { this.decide_one(batch).await });
                // Most batches are decided at once: answered here, without
                // a task of their own; one that waits (for a leader or a
                // slot lease) gets one, so the stream goes on being read.
                match futures::poll!(decided.as_mut()) {
                    std::task::Poll::Ready(reply) => {
                        if replies.send(Ok(reply)).await.is_err() {
                            return;
                        }
                        drop(permit);
                    }
                    std::task::Poll::Pending => {
                        tokio::spawn(async move {
                            let reply = decided.await;
                            let _ = replies.send(Ok(reply)).await;
                            drop(permit);
                        });
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn take_over(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request, None, false, false)?;
        let ask: TakeOver = decode(request.get_ref()).map_err(bad)?;
        self.node
            .take_over(ask)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(encode(&())))
    }

    async fn slots(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let ask: SlotRequest = decode(request.get_ref()).map_err(bad)?;
        let sender = match ask {
            SlotRequest::Lease { node } | SlotRequest::Sync { node, .. } => node,
        };
        // With peer TLS, the certificate must name the node it asks for.
        self.admit(&request, Some(sender), false, false)?;
        let reply = self.node.slots_request(ask, &request.get_ref().data).await;
        Ok(Response::new(encode(&reply)))
    }

    async fn identify(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        if let Err(mut refused) = self.admit(&request, None, true, false) {
            // An empty node asking says who it is; tell it whether this
            // cluster lists it as a voter, so that it neither rejoins empty
            // as one nor waits for ever (see `admission`).
            let asker = decode::<IdentifyRequest>(request.get_ref()).ok();
            if let Some(why) = asker.and_then(|a| self.node.refusal_for(a.node_id)) {
                refused.metadata_mut().insert(
                    REFUSAL_HEADER,
                    tonic::metadata::MetadataValue::from_static(why),
                );
            }
            return Err(refused);
        }
        Ok(Response::new(encode(&self.node.identify())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Caps;
    use crate::engine::Acquire;
    use crate::security::auth::Rules;

    /// A forwarded call's quotas are this node's, whatever the follower
    /// wrote into it.
    #[test]
    fn a_forwarded_calls_quotas_are_the_leaders() {
        let rules = Rules::parse(
            "principals:\n  - name: a\n    certificate: a\n    quota: {leases: 1, limit_keys: 4}\n",
        )
        .unwrap();
        let caller = Caller::Principal(rules.principal("a").unwrap().clone());
        let caps = Caps {
            leases: 10,
            records: 10,
            record_bytes: 10,
            limit_keys: 10,
            watchers: 10,
        };
        let acquire = Call::Acquire(Acquire {
            name: "n".into(),
            holder: "h".into(),
            ttl_ms: 1,
            principal: "a".into(),
            quota: None,
        });
        match stamp_quotas(acquire, &caller, &caps) {
            Call::Acquire(op) => assert_eq!(op.quota, Some(1)),
            other => panic!("{other:?}"),
        }
        let check = Call::CheckLimits(crate::node::CheckLimits {
            checks: vec![],
            all_or_nothing: false,
            principal: "someone-else".into(),
            key_quota: Some(1_000),
        });
        match stamp_quotas(check, &caller, &caps) {
            Call::CheckLimits(op) => {
                assert_eq!((op.principal.as_str(), op.key_quota), ("a", Some(4)))
            }
            other => panic!("{other:?}"),
        }
    }
}
