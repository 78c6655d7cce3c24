//! Forwarding: a call this node cannot serve, sent to the member that
//! can (the leader, or a rate-limit slot's owner) over the pooled peer
//! channel, carrying the caller's principal; the reply is the operation's
//! own result. Joined rate-limit checks go on the member's check stream
//! (`check_stream`) instead, and unary only when it cannot take them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::coalesce;
use super::operations::{Call, CheckLimits, Forwarded, Operation};
use super::routing::{Router, OWNER_WAIT};
use super::view::View;
use super::NodeError;
use crate::engine::LimitResult;
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::raft::network::{decode, encode, with_cluster, Channels, ClusterId, PEER_MESSAGE_LIMIT};
use crate::raft::NodeId;
use crate::security::PRINCIPAL_HEADER;

/// Sends calls to another member over the pooled peer channel.
pub struct Forwarder {
    pub view: View,
    pub channels: Channels,
    pub cluster: ClusterId,
    pub forwarded: Forwarded,
}

impl Forwarder {
    pub async fn forward<O: Operation>(
        &self,
        to: NodeId,
        call: Call,
        principal: &str,
        timeout: Duration,
    ) -> Result<O::Output, NodeError> {
        let Some(addr) = self.view.addr_of(to) else {
            return Err(NodeError::NotLeader);
        };
        self.forwarded.sent(&call);
        let mut span = crate::telemetry::child(
            format!("forward {} to member {to}", Call::NAMES[call.index()]),
            crate::telemetry::Kind::Client,
        );
        let answer = self
            .send::<O>(to, &addr, call, principal, timeout, span.as_ref())
            .await;
        if let Some(mut span) = span.take() {
            if let Err(e) = &answer {
                span.fail(e);
            }
            span.end();
        }
        answer
    }

    /// Sends `call` to member `to` at `addr`, in `span`'s trace if traced.
    async fn send<O: Operation>(
        &self,
        to: NodeId,
        addr: &str,
        call: Call,
        principal: &str,
        timeout: Duration,
        span: Option<&crate::telemetry::Span>,
    ) -> Result<O::Output, NodeError> {
        let channel = self
            .channels
            .get(addr)
            .map_err(|e| NodeError::Unavailable(format!("member {to} at {addr}: {e}")))?;
        let mut request = with_cluster(encode(&call), &self.cluster, timeout);
        if let Some(span) = span {
            let value = crate::telemetry::traceparent(&span.context());
            if let Ok(v) = tonic::metadata::MetadataValue::try_from(value) {
                request
                    .metadata_mut()
                    .insert(crate::telemetry::TRACEPARENT, v);
            }
        }
        if !principal.is_empty() {
            match tonic::metadata::MetadataValue::try_from(principal) {
                Ok(v) => {
                    request.metadata_mut().insert(PRINCIPAL_HEADER, v);
                }
                Err(_) => {
                    return Err(NodeError::Unavailable(format!(
                        "principal name {principal:?} cannot be forwarded (not ASCII)"
                    )))
                }
            }
        }
        let mut client = RaftPeerClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT);
        match client.forward(request).await {
            Ok(reply) => decode::<Result<O::Output, NodeError>>(&reply.into_inner())
                .map_err(|e| NodeError::Unavailable(format!("bad reply from member {to}: {e}")))?,
            Err(status) => Err(NodeError::Unavailable(format!(
                "member {to} at {addr} did not answer: {}",
                status.message()
            ))),
        }
    }
}

impl Router {
    /// Forwards one call of checks to `owner`, bounded well below the
    /// leader wait: an owner that does not answer loses its slots within a
    /// slot lease, and the check is then sent to the next one.
    pub(super) async fn forward_alone(
        &self,
        owner: NodeId,
        call: CheckLimits,
        deadline: Instant,
    ) -> Result<Vec<LimitResult>, NodeError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let principal = call.principal.clone();
        self.forwarder
            .forward::<CheckLimits>(owner, call.into(), &principal, left.min(OWNER_WAIT))
            .await
    }

    /// How the coalescer sends a joined call (checks that are not
    /// all-or-nothing, for one principal with key quota `key_quota`): on
    /// the check stream to the member, or as a unary call when the stream
    /// cannot take it.
    pub(super) fn coalesced_send(&self, key_quota: Option<u64>) -> coalesce::Send {
        let (forwarder, streams) = (self.forwarder.clone(), self.streams.clone());
        Arc::new(move |to, principal: String, checks| {
            let (forwarder, streams) = (forwarder.clone(), streams.clone());
            Box::pin(async move {
                let op = CheckLimits {
                    checks,
                    all_or_nothing: false,
                    principal: principal.clone(),
                    key_quota,
                };
                match streams.decide(to, &principal, &op.checks, OWNER_WAIT).await {
                    Ok(answer) => {
                        forwarder.forwarded.sent(&Call::CheckLimits(op));
                        return answer;
                    }
                    Err(not_sent) => tracing::debug!(why = %not_sent.0, "checks sent unary"),
                }
                forwarder
                    .forward::<CheckLimits>(to, op.into(), &principal, OWNER_WAIT)
                    .await
            })
        })
    }
}
