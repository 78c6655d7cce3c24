//! The peer network: Raft RPCs over tonic, one pooled channel per peer.
//!
//! Channels are created lazily and kept: tonic reconnects them in the
//! background, every call has a deadline, and openraft backs off (500 ms) on
//! a peer that stays unreachable. Messages are JSON inside a protobuf
//! envelope, except log entries, which travel in the log's binary format.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::DuplexStream;
use tonic::transport::{Channel, Endpoint};

use crate::security::Connector;

use super::codec::{decode_entry, encode_entry};
use super::compat::LegacyEntry;
use super::lease::LeaderLease;
use super::{LogId, NodeId, SnapshotMeta, TypeConfig};
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::proto::PeerMessage;
use crate::raft::seen::SeenWithState;

/// Largest message either end of the peer channel sends or accepts (set on
/// both ends; tonic's default is 4 MiB). Appends are split well below it
/// (`storage::APPEND_BYTES`), snapshots travel in chunks of
/// [`SNAPSHOT_CHUNK_BYTES`]; what must fit whole is one log entry (a batch
/// of writes is bounded by bytes, and one idempotency response by
/// `--max-response-bytes`, at most 4 MiB) or a forwarded call.
pub const PEER_MESSAGE_LIMIT: usize = 64 << 20;

/// Longest a single Raft RPC (other than a snapshot's) may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Snapshots travel in chunks of this size; the receiver writes each to a
/// file as it arrives, so neither end holds more than a chunk in flight.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1 << 20;

/// Openraft's own cap on every snapshot RPC; the deadlines below, matched
/// to each message, are always shorter.
pub const SNAPSHOT_RPC_CAP: Duration = Duration::from_secs(300);

/// The deadline for one snapshot message. A chunk that is not the last
/// must arrive within [`RPC_TIMEOUT`] plus its transfer at 1 MB/s. The
/// last chunk's reply comes only once the receiver has loaded the whole
/// snapshot (`total` bytes), so it also allows 10 s plus 1 s for each
/// 10 MB (loading runs at well over 50 MB/s; see BENCHMARKS.md).
pub fn snapshot_chunk_timeout(chunk: usize, total: u64, last: bool) -> Duration {
    let transfer = RPC_TIMEOUT + Duration::from_micros(chunk as u64);
    if !last {
        return transfer;
    }
    let load = Duration::from_secs(10) + Duration::from_micros(total / 10);
    (transfer + load).min(SNAPSHOT_RPC_CAP)
}

/// Opens a byte stream to a peer address in process, instead of a TCP
/// connection: the simulated cluster's network (`tests/sim`).
pub type Dialer = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<DuplexStream>> + Send>>
        + Send
        + Sync,
>;

/// A tonic connector over a [`Dialer`].
#[derive(Clone)]
struct InProcess(Dialer);

impl tower_service::Service<http::Uri> for InProcess {
    type Response = hyper_util::rt::TokioIo<DuplexStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let stream = (self.0)(uri.authority().map_or_else(String::new, |a| a.to_string()));
        Box::pin(async move { stream.await.map(hyper_util::rt::TokioIo::new) })
    }
}

/// Lazily connected, reused channels to peers, keyed by peer address;
/// over mutual TLS when the node has a peer certificate, or through a
/// [`Dialer`] in process.
#[derive(Clone, Default)]
pub struct Channels {
    map: Arc<Mutex<HashMap<String, Channel>>>,
    tls: Option<Connector>,
    dial: Option<Dialer>,
}

impl Channels {
    pub fn new(tls: Option<Connector>, dial: Option<Dialer>) -> Self {
        Self {
            map: Arc::default(),
            tls,
            dial,
        }
    }

    /// The channel to `addr` (`host:port`), created on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = match (&self.dial, &self.tls) {
            (Some(dial), _) => endpoint.connect_with_connector_lazy(InProcess(dial.clone())),
            (None, Some(tls)) => tls.channel(endpoint),
            (None, None) => endpoint.connect_lazy(),
        };
        map.insert(addr.to_owned(), ch.clone());
        Ok(ch)
    }
}

pub fn encode<T: Serialize>(v: &T) -> PeerMessage {
    PeerMessage {
        json: serde_json::to_vec(v).expect("raft messages serialize to JSON"),
        entries: Vec::new(),
        data: Vec::new(),
    }
}

/// An InstallSnapshot without its chunk of data (it travels as bytes).
#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: Vote<NodeId>,
    meta: SnapshotMeta,
    offset: u64,
    done: bool,
    /// What a leader of an earlier release sends instead: the chunk as a
    /// JSON array of byte values inside the header.
    #[serde(default, skip_serializing)]
    data: Option<Vec<u8>>,
}

/// An InstallSnapshot as a peer message: a JSON header and the raw chunk.
pub fn encode_snapshot(rpc: InstallSnapshotRequest<TypeConfig>) -> PeerMessage {
    let header = SnapshotHeader {
        vote: rpc.vote,
        meta: rpc.meta,
        offset: rpc.offset,
        done: rpc.done,
        data: None,
    };
    PeerMessage {
        json: serde_json::to_vec(&header).expect("raft messages serialize to JSON"),
        entries: Vec::new(),
        data: rpc.data,
    }
}

/// An InstallSnapshot from a peer message (or from the JSON of an earlier
/// release's leader).
pub fn decode_snapshot(m: PeerMessage) -> Result<InstallSnapshotRequest<TypeConfig>, String> {
    let header: SnapshotHeader = serde_json::from_slice(&m.json).map_err(|e| e.to_string())?;
    Ok(InstallSnapshotRequest {
        vote: header.vote,
        meta: header.meta,
        offset: header.offset,
        data: header.data.unwrap_or(m.data),
        done: header.done,
    })
}

/// An AppendEntries without its entries (they travel in binary beside it).
#[derive(Serialize, Deserialize)]
struct AppendHeader {
    vote: Vote<NodeId>,
    prev_log_id: Option<LogId>,
    leader_commit: Option<LogId>,
    /// What a leader of an earlier release sends instead: every entry in
    /// JSON inside the header.
    #[serde(default, skip_serializing)]
    entries: Vec<LegacyEntry>,
}

/// An AppendEntries as a peer message: a JSON header and binary entries.
pub fn encode_append(rpc: &AppendEntriesRequest<TypeConfig>) -> PeerMessage {
    let header = AppendHeader {
        vote: rpc.vote,
        prev_log_id: rpc.prev_log_id,
        leader_commit: rpc.leader_commit,
        entries: Vec::new(),
    };
    PeerMessage {
        json: serde_json::to_vec(&header).expect("raft messages serialize to JSON"),
        entries: rpc.entries.iter().map(encode_entry).collect(),
        data: Vec::new(),
    }
}

/// An AppendEntries from a peer message (or from the JSON of an earlier
/// release's leader).
pub fn decode_append(m: &PeerMessage) -> Result<AppendEntriesRequest<TypeConfig>, String> {
    let header: AppendHeader = serde_json::from_slice(&m.json).map_err(|e| e.to_string())?;
    let mut entries: Vec<_> = header
        .entries
        .into_iter()
        .map(LegacyEntry::into_entry)
        .collect();
    for bytes in &m.entries {
        entries.push(decode_entry(bytes)?);
    }
    Ok(AppendEntriesRequest {
        vote: header.vote,
        prev_log_id: header.prev_log_id,
        leader_commit: header.leader_commit,
        entries,
    })
}

pub fn decode<T: DeserializeOwned>(m: &PeerMessage) -> Result<T, serde_json::Error> {
    serde_json::from_slice(&m.json)
}

/// The gRPC metadata key carrying the sender's cluster id on every peer
/// message (see `node::admission`).
pub const CLUSTER_HEADER: &str = "x-arbiter-cluster";

/// This node's cluster id, once known; shared with the node, which learns
/// or makes it.
pub type ClusterId = Arc<OnceLock<String>>;

#[derive(Clone)]
pub struct PeerNetwork {
    pub channels: Channels,
    /// Fed with every accepted append (see [`LeaderLease`]).
    pub lease: Arc<LeaderLease>,
    cluster: ClusterId,
    /// Peers whose answers showed state of their own (see `raft::seen`).
    seen: Arc<SeenWithState>,
}

impl PeerNetwork {
    pub fn new(
        cluster: ClusterId,
        tls: Option<Connector>,
        dial: Option<Dialer>,
        seen: Arc<SeenWithState>,
    ) -> Self {
        Self {
            channels: Channels::new(tls, dial),
            lease: Arc::default(),
            cluster,
            seen,
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    channels: Channels,
    lease: Arc<LeaderLease>,
    cluster: ClusterId,
    seen: Arc<SeenWithState>,
}

/// Adds this node's cluster id (if known) to an outgoing peer request.
pub fn with_cluster<T>(message: T, cluster: &ClusterId, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    if let Some(id) = cluster.get().and_then(|c| c.parse().ok()) {
        request.metadata_mut().insert(CLUSTER_HEADER, id);
    }
    request
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            lease: self.lease.clone(),
            cluster: self.cluster.clone(),
            seen: self.seen.clone(),
        }
    }
}

enum Call {
    Append,
    Vote,
    Snapshot,
}

impl PeerClient {
    /// Sends one message and decodes the peer's `Result<Resp, E>`.
    async fn call<Resp, E>(
        &self,
        call: Call,
        message: PeerMessage,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self
            .channels
            .get(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut client = RaftPeerClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT);
        let kind = match call {
            Call::Append => "append",
            Call::Vote => "vote",
            Call::Snapshot => "snapshot",
        };
        metrics::counter!("arbiter_raft_sent_bytes_total", "kind" => kind)
            .increment(prost::Message::encoded_len(&message) as u64);
        let request = with_cluster(message, &self.cluster, timeout);
        let reply = match call {
            Call::Append => client.append_entries(request).await,
            Call::Vote => client.vote(request).await,
            Call::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)))
            }
            Err(status) => return Err(RPCError::Network(NetworkError::new(&status))),
        };
        let result: Result<Resp, E> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))?;
        // The peer answered as a Raft participant: recorded before its
        // answer can count (see `raft::seen`).
        self.seen
            .record(self.target)
            .map_err(|e| RPCError::Network(NetworkError::new(&std::io::Error::other(e))))?;
        Ok(answer)
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let sent = self.lease.mono_ms();
        let term = rpc
            .vote
            .is_committed()
            .then(|| rpc.vote.leader_id().get_term());
        let reply = self
            .call(
                Call::Append,
                encode_append(&rpc),
                option.hard_ttl().min(RPC_TIMEOUT),
            )
            .await;
        if let (Some(term), Ok(r)) = (term, &reply) {
            if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                // The follower accepted this leader's term.
                self.lease.acknowledged(self.target, term, sent);
            }
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let total = rpc.offset + rpc.data.len() as u64;
        let timeout = snapshot_chunk_timeout(rpc.data.len(), total, rpc.done);
        self.call(Call::Snapshot, encode_snapshot(rpc), timeout)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Call::Vote, encode(&rpc), option.hard_ttl().min(RPC_TIMEOUT))
            .await
    }
}
