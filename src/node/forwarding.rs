//! Forwarding: a call this node cannot serve, sent to the member that
//! can (the leader, or a rate-limit slot's owner) over the pooled peer
//! channel, carrying the caller's principal; the reply is the operation's
//! own result.

use std::time::Duration;

use super::operations::{Call, Forwarded, Operation};
use super::view::View;
use super::NodeError;
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
        leader: NodeId,
        call: Call,
        principal: &str,
        timeout: Duration,
    ) -> Result<O::Output, NodeError> {
        let Some(addr) = self.view.addr_of(leader) else {
            return Err(NodeError::NotLeader);
        };
        self.forwarded.sent(&call);
        let channel = self
            .channels
            .get(&addr)
            .map_err(|e| NodeError::Unavailable(format!("leader {leader} at {addr}: {e}")))?;
        let mut request = with_cluster(encode(&call), &self.cluster, timeout);
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
            Ok(reply) => {
                decode::<Result<O::Output, NodeError>>(&reply.into_inner()).map_err(|e| {
                    NodeError::Unavailable(format!("bad reply from leader {leader}: {e}"))
                })?
            }
            Err(status) => Err(NodeError::Unavailable(format!(
                "leader {leader} at {addr} did not answer: {}",
                status.message()
            ))),
        }
    }
}
