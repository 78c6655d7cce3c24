//! Forwarded checks ride together: the checks that callers on this node
//! send to one member (a slot's owner, or the leader) for one principal,
//! while a forwarded call to it is already on its way, go as one
//! forwarded call when it returns. Checks that are not all-or-nothing are
//! decided one by one whichever call carries them, so joining them changes
//! no answer; all-or-nothing calls are never joined.
//!
//! One queue per (member, principal), each a bounded channel drained by its
//! own task: it takes what has queued (at most `max_checks` checks, the
//! receiving member's bound on a call), sends it, and hands each caller its
//! answers; up to `in_flight` such calls are on their way at once (the
//! check stream pipelines them), and checks queue while all are. A full
//! queue sends the caller's checks alone. A queue idle for [`IDLE`] ends
//! its task, so their number is bounded by the members and principals
//! calling now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::NodeError;
use crate::engine::{LimitCheck, LimitResult};
use crate::raft::NodeId;

/// Calls waiting in one queue, at most.
const QUEUE: usize = 1024;
/// Joined calls on their way from one queue at once, at most.
pub const FORWARDS_IN_FLIGHT: usize = 4;
/// A queue's task ends after this long without a call.
const IDLE: Duration = Duration::from_secs(10);

type Answer = Result<Vec<LimitResult>, NodeError>;

/// One caller's checks and where its answers go.
struct Waiting {
    checks: Vec<LimitCheck>,
    reply: oneshot::Sender<Answer>,
}

/// What a queue's task sends a batch with: the member, the principal, the
/// checks; the answers in order.
pub type Send = Arc<
    dyn Fn(NodeId, String, Vec<LimitCheck>) -> futures::future::BoxFuture<'static, Answer>
        + std::marker::Send
        + Sync,
>;

pub struct Coalescer {
    queues: Mutex<HashMap<(NodeId, String), mpsc::Sender<Waiting>>>,
    max_checks: usize,
    in_flight: usize,
}

impl Coalescer {
    pub fn new(max_checks: usize, in_flight: usize) -> Self {
        Self {
            queues: Mutex::default(),
            max_checks: max_checks.max(1),
            in_flight: in_flight.max(1),
        }
    }

    /// Sends `checks` (not all-or-nothing) to `to` for `principal`, with
    /// whatever else is queued there, through `send`; `None` when the queue
    /// is full (the caller then sends them alone).
    pub async fn forward(
        &self,
        to: NodeId,
        principal: &str,
        checks: Vec<LimitCheck>,
        send: &Send,
    ) -> Option<Answer> {
        if checks.len() >= self.max_checks {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        let mut waiting = Waiting { checks, reply };
        for _ in 0..2 {
            let queue = self.queue(to, principal, send);
            match queue.try_send(waiting) {
                Ok(()) => {
                    return Some(answer.await.unwrap_or_else(|_| {
                        Err(NodeError::Unavailable(
                            "the forwarding queue stopped".into(),
                        ))
                    }))
                }
                Err(mpsc::error::TrySendError::Full(_)) => return None,
                // Its task ended (idle): start another.
                Err(mpsc::error::TrySendError::Closed(w)) => {
                    waiting = w;
                    self.lock().remove(&(to, principal.to_owned()));
                }
            }
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, String), mpsc::Sender<Waiting>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(&self, to: NodeId, principal: &str, send: &Send) -> mpsc::Sender<Waiting> {
        let mut queues = self.lock();
        if let Some(q) = queues.get(&(to, principal.to_owned())) {
            if !q.is_closed() {
                return q.clone();
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        queues.insert((to, principal.to_owned()), tx.clone());
        tokio::spawn(drain(
            rx,
            to,
            principal.to_owned(),
            (self.max_checks, self.in_flight),
            send.clone(),
        ));
        tx
    }
}

/// A queue's task: sends what has queued as one call, up to `in_flight`
/// calls at a time.
async fn drain(
    mut rx: mpsc::Receiver<Waiting>,
    to: NodeId,
    principal: String,
    (max_checks, in_flight): (usize, usize),
    send: Send,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut held: Option<Waiting> = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let first = match held.take() {
            Some(w) => w,
            None => match tokio::time::timeout(IDLE, rx.recv()).await {
                Ok(Some(w)) => w,
                Ok(None) | Err(_) => return,
            },
        };
        let mut batch = vec![first];
        let mut n = batch[0].checks.len();
        while let Ok(w) = rx.try_recv() {
            if n + w.checks.len() > max_checks {
                held = Some(w);
                break;
            }
            n += w.checks.len();
            batch.push(w);
        }
        let (send, principal) = (send.clone(), principal.clone());
        tokio::spawn(async move {
            let sizes: Vec<usize> = batch.iter().map(|w| w.checks.len()).collect();
            let (checks, replies): (Vec<Vec<LimitCheck>>, Vec<oneshot::Sender<Answer>>) =
                batch.into_iter().map(|w| (w.checks, w.reply)).unzip();
            let checks: Vec<LimitCheck> = checks.into_iter().flatten().collect();
            hand_out(send(to, principal, checks).await, n, &sizes, replies);
            drop(permit);
        });
    }
}

/// Gives each caller of a joined call (`sizes` checks each, `n` in all)
/// its own answers, or the call's error.
fn hand_out(answer: Answer, n: usize, sizes: &[usize], replies: Vec<oneshot::Sender<Answer>>) {
    match answer {
        Ok(results) if results.len() == n => {
            let mut results = results.into_iter();
            for (size, reply) in sizes.iter().zip(replies) {
                let _ = reply.send(Ok(results.by_ref().take(*size).collect()));
            }
        }
        Ok(results) => {
            let e = NodeError::Unavailable(format!("{} answers to {n} checks", results.len()));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::LimitDef;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn checks(key: &str, n: usize) -> Vec<LimitCheck> {
        (0..n)
            .map(|i| LimitCheck {
                key: format!("{key}-{i}"),
                limit: LimitDef::FixedWindow {
                    limit: 10,
                    window_ms: 1_000,
                },
                cost: 1,
                dry_run: false,
                max_delay_ms: 0,
            })
            .collect()
    }

    /// Answers each check with `remaining` = its position in the batch,
    /// counting the calls; the first call waits until released, so the
    /// others queue behind it.
    fn sender(calls: Arc<AtomicUsize>, gate: Arc<tokio::sync::Notify>) -> Send {
        Arc::new(move |_, _, checks: Vec<LimitCheck>| {
            let (calls, gate) = (calls.clone(), gate.clone());
            Box::pin(async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    gate.notified().await;
                }
                Ok(checks
                    .iter()
                    .map(|c| LimitResult {
                        allowed: true,
                        remaining: c.key.len() as u64,
                        ..LimitResult::default()
                    })
                    .collect())
            })
        })
    }

    #[tokio::test]
    async fn calls_queued_behind_one_in_flight_go_together_and_get_their_own_answers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let send = sender(calls.clone(), gate.clone());
        let c = Arc::new(Coalescer::new(100, 1));
        let first = {
            let (c, send) = (c.clone(), send.clone());
            tokio::spawn(async move { c.forward(2, "p", checks("a", 1), &send).await })
        };
        // Wait (bounded) until the first call is in flight.
        for _ in 0..1000 {
            if calls.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let mut queued = Vec::new();
        for (key, n) in [("bb", 2), ("ccc", 3)] {
            let (c, send) = (c.clone(), send.clone());
            queued.push(tokio::spawn(async move {
                c.forward(2, "p", checks(key, n), &send).await
            }));
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        let a = first.await.unwrap().unwrap().unwrap();
        assert_eq!(a.len(), 1);
        let b = queued.remove(0).await.unwrap().unwrap().unwrap();
        let c3 = queued.remove(0).await.unwrap().unwrap().unwrap();
        // Each caller got its own checks' answers ("bb-0" is 4 long, ...).
        assert_eq!(b.iter().map(|r| r.remaining).collect::<Vec<_>>(), [4, 4]);
        assert_eq!(
            c3.iter().map(|r| r.remaining).collect::<Vec<_>>(),
            [5, 5, 5]
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the two queued calls went as one"
        );
    }

    #[tokio::test]
    async fn a_batch_stays_within_the_bound_and_a_large_call_goes_alone() {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        gate.notify_one();
        let send = sender(calls.clone(), gate);
        let c = Coalescer::new(4, 1);
        assert!(c.forward(2, "p", checks("x", 4), &send).await.is_none());
        let r = c
            .forward(2, "p", checks("x", 3), &send)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.len(), 3);
    }

    /// A full queue answers `None` at once (the caller sends its checks
    /// alone), and what queued is still answered, in bounded batches.
    #[tokio::test]
    async fn a_full_queue_sends_the_caller_alone_and_what_queued_is_answered() {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let send = sender(calls.clone(), gate.clone());
        let c = Arc::new(Coalescer::new(100, 1));
        let mut callers = Vec::new();
        for i in 0..=QUEUE {
            let (c, send) = (c.clone(), send.clone());
            callers.push(tokio::spawn(async move {
                c.forward(2, "p", checks(&format!("k{i}"), 1), &send).await
            }));
            if i == 0 {
                // The first is on its way (and held there) before the rest queue.
                for _ in 0..1000 {
                    if calls.load(Ordering::SeqCst) == 1 {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                assert_eq!(calls.load(Ordering::SeqCst), 1);
            }
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // One on its way, QUEUE waiting: the next finds the queue full.
        assert!(c.forward(2, "p", checks("late", 1), &send).await.is_none());
        gate.notify_one();
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap().unwrap().len(), 1);
        }
        // The first alone, then the rest at most 100 checks a call.
        assert_eq!(calls.load(Ordering::SeqCst), 1 + QUEUE.div_ceil(100));
    }

    /// With two on their way at once, a third call waits for one of them.
    #[tokio::test]
    async fn up_to_in_flight_joined_calls_are_on_their_way_at_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let send: Send = {
            let (calls, gate) = (calls.clone(), gate.clone());
            Arc::new(move |_, _, checks: Vec<LimitCheck>| {
                let (calls, gate) = (calls.clone(), gate.clone());
                Box::pin(async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.expect("open").forget();
                    Ok(vec![LimitResult::default(); checks.len()])
                })
            })
        };
        let c = Arc::new(Coalescer::new(100, 2));
        let mut callers = Vec::new();
        for key in ["a", "b", "c"] {
            let (c, send) = (c.clone(), send.clone());
            callers.push(tokio::spawn(async move {
                c.forward(2, "p", checks(key, 1), &send).await
            }));
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the third waits");
        gate.add_permits(3);
        for caller in callers {
            assert_eq!(caller.await.unwrap().unwrap().unwrap().len(), 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
