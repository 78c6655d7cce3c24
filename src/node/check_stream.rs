//! Forwarded checks on a long-lived stream: one `Decide` stream from this
//! member to each other member it forwards checks to, in binary, many
//! batches in flight at once, each answered by its id.
//!
//! A unary peer call per forwarded batch costs an HTTP/2 stream, its
//! headers and a JSON body each way; on the stream a batch is one binary
//! message each way. A stream opens on first use and is opened again after
//! it breaks. Bounds: at most [`QUEUE`] batches wait to be written to one
//! stream and at most [`IN_FLIGHT`] await their answers; past either, or
//! while a stream cannot be opened (a member that predates the stream), a
//! batch is [`NotSent`] and the caller sends it the unary way. A batch
//! that was written but not answered within its deadline, or whose stream
//! broke, is `UNAVAILABLE`: the owner may have decided it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::view::View;
use super::NodeError;
use crate::engine::{LimitCheck, LimitDef, LimitResult};
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::proto::{self as pb, DecideReply, DecideRequest};
use crate::raft::network::{Channels, ClusterId, CLUSTER_HEADER, PEER_MESSAGE_LIMIT};
use crate::raft::NodeId;

/// Batches waiting to be written to one stream, at most.
const QUEUE: usize = 1024;
/// Batches written to one stream and not yet answered, at most.
const IN_FLIGHT: usize = 4096;

type Answer = Result<Vec<LimitResult>, NodeError>;
/// What a batch waits for: its answer, or that it was never delivered
/// (the stream could not be opened).
type Pending = Arc<Mutex<BTreeMap<u64, oneshot::Sender<Result<Answer, NotSent>>>>>;
/// After a member refuses to open a stream (one that predates it), how
/// long batches to it go the unary way before trying again.
const UNARY_FOR: Duration = Duration::from_secs(10);

/// The batch was certainly not delivered: send it another way.
#[derive(Debug)]
pub struct NotSent(pub String);

pub struct CheckStreams {
    view: View,
    channels: Channels,
    cluster: ClusterId,
    streams: Mutex<HashMap<NodeId, Arc<Stream>>>,
    next_id: AtomicU64,
    /// Batches, and checks in them, written to a stream.
    batches: AtomicU64,
    checks: AtomicU64,
}

struct Stream {
    requests: mpsc::Sender<DecideRequest>,
    pending: Pending,
    /// Set when it could not be opened: until then, send the unary way.
    refused_until: Mutex<Option<tokio::time::Instant>>,
    /// Its answers ended: it takes no more batches.
    closed: std::sync::atomic::AtomicBool,
}

impl CheckStreams {
    pub fn new(view: View, channels: Channels, cluster: ClusterId) -> Self {
        Self {
            view,
            channels,
            cluster,
            streams: Mutex::default(),
            next_id: AtomicU64::new(1),
            batches: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        }
    }

    /// (batches, checks) written to streams so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.checks.load(Ordering::Relaxed),
        )
    }

    /// Sends `checks` for `principal` to `to` and waits up to `deadline`
    /// for their answers.
    pub async fn decide(
        &self,
        to: NodeId,
        principal: &str,
        checks: &[LimitCheck],
        deadline: Duration,
    ) -> Result<Answer, NotSent> {
        let stream = self.stream(to)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = lock(&stream.pending);
            if pending.len() >= IN_FLIGHT {
                return Err(NotSent(format!("{IN_FLIGHT} batches in flight to {to}")));
            }
            pending.insert(id, reply);
        }
        let request = DecideRequest {
            id,
            principal: principal.to_owned(),
            checks: checks.iter().map(to_pb).collect(),
        };
        if let Err(e) = stream.requests.try_send(request) {
            lock(&stream.pending).remove(&id);
            return Err(NotSent(match e {
                mpsc::error::TrySendError::Full(_) => format!("{QUEUE} batches queued to {to}"),
                mpsc::error::TrySendError::Closed(_) => format!("the stream to {to} closed"),
            }));
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.checks
            .fetch_add(checks.len() as u64, Ordering::Relaxed);
        if stream.closed.load(Ordering::Acquire) && lock(&stream.pending).remove(&id).is_some() {
            // Written as it closed: it may or may not have been decided.
            return Ok(Err(NodeError::Unavailable(format!(
                "the check stream to {to} closed as the checks were sent"
            ))));
        }
        Ok(match tokio::time::timeout(deadline, answer).await {
            Ok(Ok(Ok(answer))) => answer,
            Ok(Ok(Err(not_sent))) => return Err(not_sent),
            Ok(Err(_)) => Err(NodeError::Unavailable(format!(
                "the check stream to {to} broke before it answered"
            ))),
            Err(_) => {
                lock(&stream.pending).remove(&id);
                Err(NodeError::Unavailable(format!(
                    "member {to} did not answer within {} ms",
                    deadline.as_millis()
                )))
            }
        })
    }

    /// The open stream to `to`, or a new one (opening in the background:
    /// batches queue until it is open).
    fn stream(&self, to: NodeId) -> Result<Arc<Stream>, NotSent> {
        let mut streams = lock(&self.streams);
        if let Some(s) = streams.get(&to) {
            if let Some(until) = *lock(&s.refused_until) {
                if tokio::time::Instant::now() < until {
                    return Err(NotSent(format!("member {to} refused a check stream")));
                }
            } else if !s.requests.is_closed() && !s.closed.load(Ordering::Acquire) {
                return Ok(s.clone());
            }
        }
        let addr = self
            .view
            .addr_of(to)
            .ok_or_else(|| NotSent(format!("no address for member {to}")))?;
        let channel = self
            .channels
            .get(&addr)
            .map_err(|e| NotSent(format!("member {to} at {addr}: {e}")))?;
        let (requests, outgoing) = mpsc::channel(QUEUE);
        let stream = Arc::new(Stream {
            requests,
            pending: Pending::default(),
            refused_until: Mutex::new(None),
            closed: Default::default(),
        });
        let mut request = tonic::Request::new(ReceiverStream::new(outgoing));
        if let Some(id) = self.cluster.get().and_then(|c| c.parse().ok()) {
            request.metadata_mut().insert(CLUSTER_HEADER, id);
        }
        let client = RaftPeerClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT);
        tokio::spawn(run(client, request, stream.clone(), to));
        streams.insert(to, stream.clone());
        Ok(stream)
    }
}

/// Opens the stream and hands each answer to its batch; when the stream
/// ends or breaks, every batch still waiting is told so (dropping the
/// request receiver closes the stream for new batches).
async fn run(
    mut client: RaftPeerClient<tonic::transport::Channel>,
    request: tonic::Request<ReceiverStream<DecideRequest>>,
    stream: Arc<Stream>,
    to: NodeId,
) {
    let pending = &stream.pending;
    let mut replies = match client.decide(request).await {
        Ok(replies) => replies.into_inner(),
        Err(status) => {
            // Nothing was delivered.
            let why = format!("member {to} refused a check stream: {}", status.message());
            tracing::debug!(%why);
            if status.code() == tonic::Code::Unimplemented {
                *lock(&stream.refused_until) = Some(tokio::time::Instant::now() + UNARY_FOR);
            }
            for (_, waiting) in std::mem::take(&mut *lock(pending)) {
                let _ = waiting.send(Err(NotSent(why.clone())));
            }
            return;
        }
    };
    let why = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                if let Some(waiting) = lock(pending).remove(&reply.id) {
                    let _ = waiting.send(Ok(answer_of(reply)));
                }
            }
            Ok(None) => break "the member ended it".to_owned(),
            Err(status) => break status.message().to_owned(),
        }
    };
    tracing::debug!(member = to, %why, "check stream closed");
    stream.closed.store(true, Ordering::Release);
    for (_, waiting) in std::mem::take(&mut *lock(pending)) {
        let _ = waiting.send(Ok(Err(NodeError::Unavailable(format!(
            "the check stream to {to} closed before it answered ({why})"
        )))));
    }
}

fn answer_of(reply: DecideReply) -> Answer {
    if !reply.error.is_empty() {
        return Err(serde_json::from_slice(&reply.error).unwrap_or_else(|e| {
            NodeError::Unavailable(format!("an unreadable error on the check stream: {e}"))
        }));
    }
    Ok(reply
        .results
        .into_iter()
        .map(|r| LimitResult {
            allowed: r.allowed,
            limit: r.limit,
            remaining: r.remaining,
            retry_after_ms: r.retry_after_ms,
            reset_after_ms: r.reset_after_ms,
            delay_ms: r.delay_ms,
        })
        .collect())
}

fn to_pb(c: &LimitCheck) -> pb::LimitCheck {
    use pb::limit::Algorithm;
    let algorithm = match c.limit {
        LimitDef::TokenBucket {
            capacity,
            refill_tokens,
            refill_interval_ms,
        } => Algorithm::TokenBucket(pb::TokenBucket {
            capacity,
            refill_tokens,
            refill_interval_ms,
        }),
        LimitDef::SlidingWindow { limit, window_ms } => {
            Algorithm::SlidingWindow(pb::SlidingWindow { limit, window_ms })
        }
        LimitDef::FixedWindow { limit, window_ms } => {
            Algorithm::FixedWindow(pb::FixedWindow { limit, window_ms })
        }
        LimitDef::LeakyBucket {
            rate,
            interval_ms,
            burst,
        } => Algorithm::LeakyBucket(pb::LeakyBucket {
            rate,
            interval_ms,
            burst,
        }),
    };
    pb::LimitCheck {
        key: c.key.clone(),
        limit: Some(pb::Limit {
            algorithm: Some(algorithm),
        }),
        cost: Some(c.cost),
        dry_run: c.dry_run,
        named: None,
        max_delay_ms: c.max_delay_ms,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
