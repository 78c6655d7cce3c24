//! The proposer: batches lease and idempotency writes into log entries.
//!
//! Every write queued while the previous entry was being committed goes
//! into the next entry (one log write and one fsync for all of them),
//! stamped with one time.

use std::sync::Arc;

use openraft::{BasicNode, Raft};
use tokio::sync::{mpsc, oneshot};

use super::sweeper::Deadlines;
use super::tasks::{Stopping, Tasks};
use super::timekeeping::Timekeeper;
use super::NodeError;
use crate::engine::{Command, Engine, EngineError, Outcome};
use crate::raft::{Request, TypeConfig};

/// Writes waiting for the proposer, at most; a write that finds the queue
/// full is refused with UNAVAILABLE (back-pressure: the node is writing as
/// fast as its disk allows).
pub const QUEUE: usize = 16 * 1024;
/// Most commands batched into one log entry.
const MAX_BATCH: usize = 1024;
/// Most payload bytes batched into one log entry (a command larger than
/// this is written alone).
const BATCH_BYTES: usize = 256 * 1024;

/// What a committed write answers: its outcome and the time it was
/// stamped with.
pub type Committed = Result<(Outcome, u64), NodeError>;

/// A queued write and where its outcome goes.
pub struct Proposal {
    pub command: Command,
    pub reply: oneshot::Sender<Committed>,
}

/// Queues a proposal, or refuses it at once when the queue is full
/// (UNAVAILABLE: retry) or closed (shutting down).
fn enqueue(queue: &mpsc::Sender<Proposal>, proposal: Proposal) -> Result<(), NodeError> {
    queue.try_send(proposal).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => NodeError::Unavailable(format!(
            "{} writes are already waiting for the log; retry",
            queue.max_capacity()
        )),
        mpsc::error::TrySendError::Closed(_) => NodeError::Unavailable("shutting down".into()),
    })
}

/// The way into the log for lease and idempotency writes: a cheap handle
/// to the queue the batching loop drains.
#[derive(Clone)]
pub struct Proposer {
    queue: mpsc::Sender<Proposal>,
    engine: Arc<Engine>,
    /// Told when a write sets a deadline the sweeper does not wait for yet.
    deadlines: Arc<Deadlines>,
}

impl Proposer {
    /// Starts the batching loop on `tasks`; it ends when they stop.
    pub fn start(
        raft: Raft<TypeConfig>,
        time: Arc<Timekeeper>,
        engine: Arc<Engine>,
        deadlines: Arc<Deadlines>,
        tasks: &Tasks,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let batcher = Batcher { raft, time };
        tasks.spawn("proposer", batcher.run(rx, tasks.signal()));
        Self {
            queue,
            engine,
            deadlines,
        }
    }

    /// Commits `command` through the log as the leader. Concurrent
    /// proposals are batched into one entry by the loop.
    pub async fn propose(&self, command: Command) -> Committed {
        let span = crate::telemetry::child("raft commit", crate::telemetry::Kind::Internal);
        let result = self.commit(command).await;
        if let Some(mut span) = span {
            if let Err(e) = &result {
                span.fail(e);
            }
            span.end();
        }
        result
    }

    async fn commit(&self, command: Command) -> Committed {
        let (reply, answer) = oneshot::channel();
        enqueue(&self.queue, Proposal { command, reply })?;
        let result = answer
            .await
            .map_err(|_| NodeError::Unavailable("shutting down".into()))?;
        self.deadlines.note(self.engine.next_expiry());
        result
    }
}

/// The loop behind a [`Proposer`].
struct Batcher {
    raft: Raft<TypeConfig>,
    time: Arc<Timekeeper>,
}

impl Batcher {
    /// Writes one entry and maps openraft's answer to one result per command.
    async fn write_entry(
        &self,
        request: Request,
    ) -> Result<Vec<Result<Outcome, EngineError>>, NodeError> {
        match self.raft.client_write(request).await {
            Ok(r) => Ok(r.data.0),
            Err(e) if e.forward_to_leader::<BasicNode>().is_some() => Err(NodeError::NotLeader),
            Err(e) => Err(NodeError::Unavailable(e.to_string())),
        }
    }

    /// Batches proposals: takes every command queued while the previous
    /// entry was being committed (up to [`MAX_BATCH`] commands and
    /// [`BATCH_BYTES`] of payload), stamps them with one time and writes
    /// them as one entry. Ends when told to stop.
    async fn run(self, mut queue: mpsc::Receiver<Proposal>, stop: Stopping) {
        // A proposal that did not fit the previous batch starts the next.
        let mut carried: Option<Proposal> = None;
        loop {
            let first = match carried.take() {
                Some(p) => p,
                None => tokio::select! {
                    biased;
                    p = queue.recv() => match p {
                        Some(p) => p,
                        None => return,
                    },
                    _ = stop.wait() => return,
                },
            };
            let mut bytes = first.command.payload_bytes();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < BATCH_BYTES {
                let Ok(next) = queue.try_recv() else { break };
                let b = next.command.payload_bytes();
                if bytes + b > BATCH_BYTES {
                    carried = Some(next);
                    break;
                }
                bytes += b;
                batch.push(next);
            }
            self.write_batch(batch).await;
        }
    }

    /// Writes one batch of proposals as one entry and answers each.
    async fn write_batch(&self, batch: Vec<Proposal>) {
        let now = self.time.stamp();
        let (commands, replies): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        let n = commands.len();
        let request = Request {
            now_ms: now,
            commands,
            sync_origin: None,
        };
        match self.write_entry(request).await {
            Ok(outcomes) if outcomes.len() == n => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome.map(|o| (o, now)).map_err(NodeError::from));
                }
            }
            Ok(outcomes) => {
                let e = format!("{} outcomes for {n} commands", outcomes.len());
                for reply in replies {
                    let _ = reply.send(Err(NodeError::Unavailable(e.clone())));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_refuses_at_once_and_takes_again_once_drained() {
        let (tx, mut rx) = mpsc::channel(2);
        let proposal = || Proposal {
            command: Command::Sweep,
            reply: oneshot::channel().0,
        };
        enqueue(&tx, proposal()).unwrap();
        enqueue(&tx, proposal()).unwrap();
        match enqueue(&tx, proposal()) {
            Err(NodeError::Unavailable(m)) => assert!(m.contains("2 writes are already"), "{m}"),
            other => panic!("{other:?}"),
        }
        rx.try_recv().unwrap();
        enqueue(&tx, proposal()).unwrap();
        drop(rx);
        match enqueue(&tx, proposal()) {
            Err(NodeError::Unavailable(m)) => assert_eq!(m, "shutting down"),
            other => panic!("{other:?}"),
        }
    }
}
