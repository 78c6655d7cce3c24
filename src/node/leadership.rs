//! Leadership: the leader lease and what a leader may do under it (decide
//! rate limits, serve), what a new leader does first (catch up, extend
//! leases), stepping down on shutdown, and readiness.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::proposer::Proposer;
use super::tasks::Stopping;
use super::view::View;
use super::{Node, NodeError};
use crate::engine::Command;
use crate::raft::lease::LeaderLease;
use crate::timing::FAILOVER_EXTENSION_MS;

/// The services whose readiness [`report_readiness`] reports.
pub const READY_SERVICES: [&str; 6] = [
    "arbiter.v1.RateLimiter",
    "arbiter.v1.Leases",
    "arbiter.v1.Semaphores",
    "arbiter.v1.Breakers",
    "arbiter.v1.Idempotency",
    "envoy.service.ratelimit.v3.RateLimitService",
];

pub struct Leadership {
    view: View,
    /// Commits the lease extension a new leader makes.
    proposer: Proposer,
    /// This node's leader lease (see `raft::lease`): it decides rate limits
    /// only while it holds it.
    lease: Arc<LeaderLease>,
    /// The term in which this node, as leader, caught up with everything
    /// committed (and extended leases): it decides rate limits only then.
    ready_term: AtomicU64,
    /// The term in which this node, as leader, extended every lease.
    extended: OncePerTerm,
    /// Set by a leader handing over on shutdown: it serves no more calls.
    stepping_down: AtomicBool,
    /// The term this node last led and when (monotonic ms) it began to.
    leading_since: Mutex<LedSince>,
}

/// When this node began to lead, and in which term.
#[derive(Clone, Copy, Default)]
struct LedSince {
    term: u64,
    mono_ms: u64,
}

impl Leadership {
    pub fn new(view: View, proposer: Proposer, lease: Arc<LeaderLease>) -> Self {
        Self {
            view,
            proposer,
            lease,
            ready_term: AtomicU64::new(0),
            extended: OncePerTerm::default(),
            stepping_down: AtomicBool::new(false),
            leading_since: Mutex::new(LedSince::default()),
        }
    }

    /// Milliseconds on this process's monotonic clock (the one the leader
    /// lease is timed on).
    pub fn mono_ms(&self) -> u64 {
        self.lease.mono_ms()
    }

    /// Whether this node holds its leader lease for `term`.
    pub fn holds_lease(&self, term: u64) -> bool {
        self.lease.holds(term)
    }

    /// Once per term as leader: catch up with everything committed, then
    /// extend every lease by one election timeout, so no lease lapses early
    /// because leadership moved (its holder could not renew meanwhile).
    pub async fn on_leadership(&self) {
        let term = self.view.term_and_leading().0;
        self.extended
            .once_in(term, || async {
                self.view.read_barrier().await?;
                self.proposer
                    .propose(Command::ExtendLeases {
                        by_ms: FAILOVER_EXTENSION_MS,
                    })
                    .await?;
                tracing::info!(term, "leading: leases extended by one election timeout");
                Ok::<(), NodeError>(())
            })
            .await
            .unwrap_or_else(|e| tracing::warn!(error = %e, "could not extend leases"));
    }

    /// Whether this node may decide rate limits at once: it leads, has
    /// caught up in this term, and holds its leader lease.
    pub fn may_decide(&self) -> bool {
        let (term, leading) = self.view.term_and_leading();
        leading
            && !self.stepping_down()
            && self.ready_term.load(Ordering::Acquire) == term
            && self.lease.holds(term)
    }

    /// Rate limits are decided only by a leader that has applied everything
    /// committed before its term (checked once per term).
    pub async fn ready_to_decide(&self) -> Result<(), NodeError> {
        if self.may_decide() {
            return Ok(());
        }
        let term = self.view.term_and_leading().0;
        self.view.read_barrier().await?;
        self.ready_term.store(term, Ordering::Release);
        Ok(())
    }

    /// Whether this node, shutting down, has stopped serving as leader.
    pub fn stepping_down(&self) -> bool {
        self.stepping_down.load(Ordering::Acquire)
    }

    /// Stops serving as leader (for good: the node is shutting down).
    pub fn step_down(&self) {
        self.stepping_down.store(true, Ordering::Release);
    }

    /// When (monotonic ms) this node began to lead in `term`, if it has.
    pub fn led_since(&self, term: u64) -> Option<u64> {
        let since = *self.leading_since.lock().unwrap_or_else(|e| e.into_inner());
        (since.term == term).then_some(since.mono_ms)
    }

    /// Notes when this node became leader of its current term (called on
    /// every change of the server metrics).
    fn note_leadership(&self) {
        let (term, leading) = self.view.term_and_leading();
        let mut since = self.leading_since.lock().unwrap_or_else(|e| e.into_inner());
        if leading && since.term != term {
            *since = LedSince {
                term,
                mono_ms: self.mono_ms(),
            };
        }
    }

    /// Keeps the leader lease's voter set current with the membership, and
    /// notes when leadership begins. Ends when told to stop.
    pub async fn run_voter_watch(self: Arc<Self>, stop: Stopping) {
        let mut server = self.view.changes();
        let changes = metrics::counter!("arbiter_raft_leader_changes_total");
        let mut known = None;
        loop {
            self.lease.set_voters(self.view.id(), self.view.voters());
            self.note_leadership();
            // A leader this node had not known (in a term it had not seen
            // one in): counted once per term it learns of a leader in.
            let (leader, term) = self.view.leader_and_term();
            if leader.is_some() && known != Some(term) {
                if known.is_some() {
                    changes.increment(1);
                }
                known = Some(term);
            }
            tokio::select! {
                biased;
                r = server.changed() => if r.is_err() { return },
                _ = stop.wait() => return,
            }
        }
    }
}

/// Readiness: the named services are SERVING only while [`Node::ready`];
/// NOT_SERVING otherwise. Ends when the node starts shutting down.
/// `config_failure` says why a configuration file the server depends on
/// (the auth file) was refused at its last reload: the node is then not
/// ready either, so a failed revocation is seen rather than silent.
pub async fn report_readiness(
    node: Arc<Node>,
    health: tonic_health::server::HealthReporter,
    config_failure: Arc<dyn Fn() -> Option<String> + Send + Sync>,
) {
    const RECHECK: Duration = Duration::from_millis(100);
    let mut metrics = node.raft().metrics();
    let mut shutdown = node.shutdown_signal();
    let mut last = None;
    loop {
        metrics.borrow_and_update();
        let ready = node.ready() && config_failure().is_none();
        if last != Some(ready) {
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in READY_SERVICES {
                health.set_service_status(name, status).await;
            }
            last = Some(ready);
        }
        // Losing touch with the leader is a matter of time passing, with
        // no event to wake on: look again at least every `RECHECK`.
        tokio::select! {
            biased;
            r = metrics.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(RECHECK) => {}
            _ = Node::stopped(&mut shutdown) => return,
        }
    }
}

/// Work done once per term, however many callers ask for it at once.
#[derive(Default)]
pub struct OncePerTerm {
    done: AtomicU64,
    /// Held while the work runs: a caller arriving meanwhile waits for it
    /// and then finds it done.
    running: tokio::sync::Mutex<()>,
}

impl OncePerTerm {
    /// Runs `work` unless it already succeeded in `term`.
    pub async fn once_in<F, E>(&self, term: u64, work: impl FnOnce() -> F) -> Result<(), E>
    where
        F: std::future::Future<Output = Result<(), E>>,
    {
        if self.done.load(Ordering::Acquire) == term {
            return Ok(());
        }
        let _running = self.running.lock().await;
        if self.done.load(Ordering::Acquire) == term {
            return Ok(());
        }
        work().await?;
        self.done.store(term, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Callers that ask at once (a lease call, a read, the sweeper, at the
    /// start of a term) get one extension: each one extends every lease.
    #[tokio::test]
    async fn concurrent_callers_do_the_work_once_a_term() {
        let once = OncePerTerm::default();
        let runs = AtomicUsize::new(0);
        let work = || async {
            runs.fetch_add(1, Ordering::Relaxed);
            // The proposal takes a while; others call meanwhile.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            Ok::<(), ()>(())
        };
        let calls = (0..3).map(|_| once.once_in(4, work));
        assert!(futures::future::join_all(calls)
            .await
            .iter()
            .all(Result::is_ok));
        assert_eq!(runs.load(Ordering::Relaxed), 1, "one extension in term 4");
        once.once_in(5, work).await.unwrap();
        assert_eq!(runs.load(Ordering::Relaxed), 2, "and one in term 5");
    }

    /// A failed attempt is made again by the next caller.
    #[tokio::test]
    async fn a_failed_attempt_is_retried() {
        let once = OncePerTerm::default();
        assert_eq!(
            once.once_in(2, || async { Err("no leader") }).await,
            Err("no leader")
        );
        let mut ran = false;
        once.once_in(2, || async {
            ran = true;
            Ok::<(), &str>(())
        })
        .await
        .unwrap();
        assert!(ran);
    }
}
