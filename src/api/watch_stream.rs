//! One watch stream, for leases and semaphores alike: the state as it
//! stood first, then every change the node applies, until the client goes
//! away, the server shuts down, or the auth file stops allowing the caller
//! to watch that name.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::node::{Change, Node, Watch};
use crate::security::{Auth, Caller};

/// Events queued per watch stream towards a slow client.
const STREAM_BUFFER: usize = 64;

/// How often a stream checks that the auth file still lets its caller
/// watch the name.
const REAUTHORISE_EVERY: Duration = Duration::from_secs(1);

/// What a stream of `what` (e.g. "lease") sends: `first` the opening
/// state as a message, `change` each change (`None`: not this stream's
/// kind), `current` the state again, read from the node, after the stream
/// fell behind or the node's state was replaced (changes in between were
/// never applied one by one, so it starts over rather than silently
/// skipping them).
pub struct Feed<F, C, R> {
    pub what: &'static str,
    pub first: F,
    pub change: C,
    pub current: R,
}

/// Serves `watch` of `name` for `caller` on a task of its own, and returns
/// the stream of its messages.
pub fn serve<S, E, F, C, R>(
    node: Arc<Node>,
    auth: Option<Auth>,
    caller: Caller,
    name: String,
    watch: Watch<S>,
    feed: Feed<F, C, R>,
) -> ReceiverStream<Result<E, Status>>
where
    S: Send + 'static,
    E: Send + 'static,
    F: FnOnce(S, u64) -> E + Send + 'static,
    C: Fn(Change, u64) -> Option<E> + Send + 'static,
    R: Fn(&Node, &str) -> E + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let Watch {
        lease: state,
        now_ms,
        mut events,
        slot,
    } = watch;
    let mut shutdown = node.shutdown_signal();
    tokio::spawn(async move {
        // The watch counts against the caps until this task ends.
        let _slot = slot;
        if tx.send(Ok((feed.first)(state, now_ms))).await.is_err() {
            return;
        }
        let mut recheck = tokio::time::interval(REAUTHORISE_EVERY);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = recheck.tick() => {
                    if let Err(refused) = caller.still_allowed(auth.as_ref(), feed.what, &name) {
                        let _ = tx.send(Err(refused)).await;
                        return;
                    }
                    continue;
                }
                _ = tx.closed() => return, // the client went away
                _ = Node::stopped(&mut shutdown) => {
                    let _ = tx.send(Err(Status::unavailable("server is shutting down; watch again"))).await;
                    return;
                }
            };
            let out = match event {
                Ok(Change::Replaced) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    (feed.current)(&node, &name)
                }
                Err(broadcast::error::RecvError::Closed) => return,
                Ok(change) => match (feed.change)(change, node.now_ms()) {
                    Some(out) => out,
                    None => continue,
                },
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
