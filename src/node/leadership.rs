//! Leadership: what a new leader does before serving (catch up, extend
//! leases), the voter set its leader lease counts, and readiness.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::engine::Command;
use crate::timing::FAILOVER_EXTENSION_MS;

/// The services whose readiness [`report_readiness`] reports.
pub const READY_SERVICES: [&str; 4] = [
    "arbiter.v1.RateLimiter",
    "arbiter.v1.Leases",
    "arbiter.v1.Idempotency",
    "envoy.service.ratelimit.v3.RateLimitService",
];

impl Node {
    /// Once per term as leader: catch up with everything committed, then
    /// extend every lease by one election timeout, so no lease lapses early
    /// because leadership moved (its holder could not renew meanwhile).
    pub(super) async fn on_leadership(&self) {
        let term = self.term_and_leading().0;
        if self.extended_term.load(Ordering::Acquire) == term {
            return;
        }
        if self.read_barrier().await.is_err() {
            return;
        }
        match self
            .propose(Command::ExtendLeases {
                by_ms: FAILOVER_EXTENSION_MS,
            })
            .await
        {
            Ok(_) => {
                tracing::info!(term, "leading: leases extended by one election timeout");
                self.extended_term.store(term, Ordering::Release);
            }
            Err(e) => tracing::warn!(error = %e, "could not extend leases"),
        }
    }

    /// Keeps the leader lease's voter set current with the membership.
    pub(super) async fn run_voter_watch(self: Arc<Self>) {
        let mut server = self.server.clone();
        loop {
            self.lease.set_voters(self.id, self.voters());
            self.note_leadership();
            tokio::select! {
                biased;
                r = server.changed() => if r.is_err() { return },
                _ = self.tasks.stopping() => return,
            }
        }
    }

    /// Whether this node may serve: it knows a leader it is in touch with,
    /// has applied every entry in its log, and every entry a leader told it
    /// is committed (a follower that was away hears from its leader again
    /// well before it has received the backlog).
    pub fn ready(&self) -> bool {
        let caught_up = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let applied = m.last_applied.map(|l| l.index);
            applied.is_some()
                && applied >= m.last_log_index
                && self.applied_what_leader_committed(applied)
        };
        caught_up && self.in_touch_with_leader()
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
