//! `arbiter.v1.RaftPeer`: the receiving end of the peer network (Raft
//! traffic and pre-votes), and of calls forwarded by followers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::raft::VoteRequest;
use tonic::{Request, Response, Status};

use super::{Admission, Call, Node, PreVoteRequest, PreVoteResponse, TakeOver, CLUSTER_HEADER};
use crate::proto::raft_peer_server::RaftPeer;
use crate::proto::PeerMessage;
use crate::raft::network::{decode, decode_append, decode_snapshot, encode};
use crate::raft::NodeId;
use crate::security::{Auth, Caller, PRINCIPAL_HEADER};

/// Applies to a forwarded call the checks the client-facing handlers make:
/// namespaces, admin, and that lease calls carry the caller's own
/// principal.
fn authorize(caller: &Caller, call: &Call) -> Result<(), Status> {
    if matches!(caller, Caller::Anyone) {
        return Ok(());
    }
    let own = |principal: &str| {
        if principal == caller.name() {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "a lease call for principal {principal:?} was forwarded as {:?}",
                caller.name()
            )))
        }
    };
    match call {
        Call::Acquire(op) => own(&op.principal).and(caller.may_use("lease", &op.name)),
        Call::Renew(op) => own(&op.principal).and(caller.may_use("lease", &op.name)),
        Call::Release(op) => own(&op.principal).and(caller.may_use("lease", &op.name)),
        Call::GetLease(op) => caller.may_use("lease", &op.name),
        Call::Begin(op) => caller.may_use("idempotency key", &op.key),
        Call::Complete(op) => caller.may_use("idempotency key", &op.key),
        Call::Abort(op) => caller.may_use("idempotency key", &op.key),
        Call::GetRecord(op) => caller.may_use("idempotency key", &op.key),
        Call::Check(op) => op
            .checks
            .iter()
            .try_for_each(|c| caller.may_use("key", &c.key)),
        Call::AddMember(_) => caller.admin("AddMember"),
        Call::RemoveMember(_) => caller.admin("RemoveMember"),
    }
}

pub struct PeerService(pub Arc<Node>, AtomicU64, Option<Auth>);

/// How often a refused message of another cluster is logged, at most.
const FOREIGN_WARN_EVERY_MS: u64 = 10_000;

impl PeerService {
    /// With `auth`, forwarded calls are authorised as the principal they
    /// carry, as the follower did.
    pub fn new(node: Arc<Node>, auth: Option<Auth>) -> Self {
        Self(node, AtomicU64::new(0), auth)
    }
}

fn bad(e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

impl PeerService {
    /// Lets a Raft message or forwarded call through only if this node is
    /// admitted (see `admission`) and the sender is of its cluster.
    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let node = &self.0;
        match &*node.admission().borrow() {
            Admission::Admitted => {}
            Admission::Checking => {
                return Err(Status::unavailable(format!(
                    "node {} is asking its peers whether it may join",
                    node.id()
                )))
            }
            Admission::Refused(why) => return Err(Status::failed_precondition(why.clone())),
        }
        let sender = request
            .metadata()
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok());
        node.check_cluster(sender).map_err(|why| {
            // Every heartbeat of the other cluster lands here: say it once
            // in a while, not twenty times a second.
            let now = node.mono_ms();
            let last = self.1.load(Ordering::Relaxed);
            if last == 0 || now.saturating_sub(last) >= FOREIGN_WARN_EVERY_MS {
                self.1.store(now.max(1), Ordering::Relaxed);
                tracing::warn!("{why}");
            }
            Status::failed_precondition(why)
        })
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request)?;
        let rpc = decode_append(request.get_ref())
            .map_err(|e| Status::invalid_argument(format!("undecodable append: {e}")))?;
        self.0.heard_from(&rpc.vote, rpc.leader_commit);
        Ok(Response::new(encode(
            &self.0.raft().append_entries(rpc).await,
        )))
    }

    async fn vote(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request)?;
        let rpc: VoteRequest<NodeId> = decode(request.get_ref()).map_err(bad)?;
        let reply = self.0.raft().vote(rpc).await;
        if matches!(&reply, Ok(r) if r.vote_granted) {
            // Give the candidate this node voted for time to win.
            self.0.heard_from_leader();
        }
        Ok(Response::new(encode(&reply)))
    }

    async fn install_snapshot(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request)?;
        let rpc = decode_snapshot(request.into_inner())
            .map_err(|e| Status::invalid_argument(format!("undecodable snapshot chunk: {e}")))?;
        self.0.heard_from(&rpc.vote, None);
        Ok(Response::new(encode(
            &self.0.raft().install_snapshot(rpc).await,
        )))
    }

    async fn pre_vote(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request)?;
        let ask: PreVoteRequest = decode(request.get_ref()).map_err(bad)?;
        let granted = self.0.grants_pre_vote(&ask);
        Ok(Response::new(encode(&PreVoteResponse { granted })))
    }

    async fn forward(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request)?;
        let principal = request
            .metadata()
            .get(PRINCIPAL_HEADER)
            .and_then(|v| v.to_str().ok());
        let caller = Caller::forwarded(self.2.as_ref(), principal)?;
        let call: Call = decode(request.get_ref()).map_err(bad)?;
        authorize(&caller, &call)?;
        // Served here only if this node leads; otherwise the sender routes again.
        Ok(Response::new(self.0.serve_forwarded(call).await))
    }

    async fn take_over(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.admit(&request)?;
        let ask: TakeOver = decode(request.get_ref()).map_err(bad)?;
        self.0
            .take_over(ask)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(encode(&())))
    }

    async fn identify(
        &self,
        _request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        Ok(Response::new(encode(&self.0.identify())))
    }
}
