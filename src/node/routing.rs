//! Typed operations and where they are served: at the leader, locally when
//! this node leads, otherwise forwarded over the peer channel.
//!
//! Each [`Operation`] names its result type, so a handler gets that type
//! back (`node.execute(Acquire { .. })` is a `Stamped<Acquired>`), and the
//! same typed value crosses the forwarding hop: the follower sends the
//! operation as a [`Call`], the leader serves it and replies with the
//! operation's own `Result<Output, NodeError>`, which the follower decodes
//! as the type it asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use super::check_stream::CheckStreams;
use super::coalesce::Coalescer;
pub use super::forwarding::Forwarder;
use super::leadership::Leadership;
use super::operations::{
    with_call, AddMember, Call, CheckLimits, Operation, RemoveMember, Stamped,
};
use super::proposer::Proposer;
use super::slots::Slots;
use super::spanning::Holds;
use super::timekeeping::Timekeeper;
use super::view::View;
use super::NodeError;
use crate::engine::{
    slot_of, Abort, Acquire, Begin, Complete, Engine, KeyQuota, LimitCheck, LimitResult, Release,
    Renew, SemAcquire, SemRelease, SemRenew, Write,
};
use crate::proto::PeerMessage;
use crate::raft::network::encode;
use crate::raft::NodeId;
use openraft::BasicNode;

/// How long one member has to answer a forwarded check.
pub(super) const OWNER_WAIT: Duration = Duration::from_secs(1);

/// Lease and idempotency writes go through the log.
macro_rules! writes {
    ($($op:ident),*) => {
        $(impl Operation for $op {
            type Output = Stamped<<$op as Write>::Output>;
            const WRITE: bool = true;

            async fn serve(self, at: &Router) -> Result<Self::Output, NodeError> {
                at.serve_write(self).await
            }
        })*
    };
}

writes!(Acquire, Renew, Release, Begin, Complete, Abort, SemAcquire, SemRenew, SemRelease);

impl Operation for CheckLimits {
    type Output = Vec<LimitResult>;
    const WRITE: bool = false;

    async fn serve(self, at: &Router) -> Result<Vec<LimitResult>, NodeError> {
        let map = at.engine.slots();
        if map.assigned() {
            // Decided here only by the owner of every key's slot, under its
            // slot lease; otherwise the sender routes again.
            if !at.slots.may_decide(&map, &self.checks) {
                return Err(NodeError::NotOwner);
            }
        } else {
            at.leadership.ready_to_decide().await?;
        }
        let quota = KeyQuota {
            principal: &self.principal,
            max: self.key_quota,
        };
        at.count_decided(self.checks.len());
        Ok(at
            .engine
            .check_for(&self.checks, self.all_or_nothing, at.decide_ms(), quota)?)
    }
}

impl Operation for AddMember {
    type Output = ();
    const WRITE: bool = true;

    fn bound(&self, at: &Router) -> Duration {
        at.member_catch_up + 2 * at.leader_wait
    }

    async fn serve(self, at: &Router) -> Result<(), NodeError> {
        if !at.view.is_leader() {
            return Err(NodeError::NotLeader);
        }
        let refused = |e: &dyn std::fmt::Display| NodeError::Membership(e.to_string());
        let mut voters = at.view.voters();
        if voters.contains(&self.id) {
            return Ok(());
        }
        let added = at
            .view
            .raft()
            .add_learner(self.id, BasicNode::new(&self.peer_addr), false)
            .await
            .map_err(|e| refused(&e))?;
        let wanted = added.log_id.index;
        let matched = at.learner_caught_up(self.id, wanted).await;
        if matched.is_none_or(|m| m < wanted) {
            let had = matched.map_or("none of the log".to_owned(), |m| {
                format!("up to index {m} of {wanted}")
            });
            if !self.force {
                // Roll back: a learner is harmless, but need not stay.
                let remove = openraft::ChangeMembers::RemoveNodes(BTreeSet::from([self.id]));
                let rolled_back = at.view.raft().change_membership(remove, false).await;
                return Err(NodeError::Membership(format!(
                    "node {} at {} did not catch up within {} ms (it has {had}), so it was not \
                     made a voter{}: start it first (with the members' --peers plus itself) and \
                     check that the leader reaches its peer port, or pass --force to add it \
                     anyway (a voter that never answers can cost the cluster its majority)",
                    self.id,
                    self.peer_addr,
                    at.member_catch_up.as_millis(),
                    match rolled_back {
                        Ok(_) => " and was removed again".to_owned(),
                        Err(e) => format!("; removing the learner again failed: {e}"),
                    }
                )));
            }
            tracing::warn!(
                node = self.id,
                "--force: making a member that has not caught up ({had}) a voter"
            );
        }
        voters.insert(self.id);
        at.view
            .raft()
            .change_membership(voters, false)
            .await
            .map_err(|e| refused(&e))?;
        Ok(())
    }
}

impl Operation for RemoveMember {
    type Output = ();
    const WRITE: bool = true;

    async fn serve(self, at: &Router) -> Result<(), NodeError> {
        if !at.view.is_leader() {
            return Err(NodeError::NotLeader);
        }
        let mut voters = at.view.voters();
        voters.remove(&self.id);
        if voters.is_empty() {
            return Err(NodeError::Membership("cannot remove the last voter".into()));
        }
        at.view
            .raft()
            .change_membership(voters, false)
            .await
            .map_err(|e| NodeError::Membership(e.to_string()))?;
        Ok(())
    }
}

/// Serves operations at the leader: here when this node leads, forwarded
/// over the peer channel otherwise.
pub struct Router {
    pub view: View,
    pub engine: Arc<Engine>,
    pub time: Arc<Timekeeper>,
    pub proposer: Proposer,
    pub leadership: Arc<Leadership>,
    pub slots: Arc<Slots>,
    /// Sends calls to other members.
    pub forwarder: Arc<Forwarder>,
    /// Sends forwarded checks on a stream to each member.
    pub streams: Arc<CheckStreams>,
    /// Joins forwarded checks bound for one member.
    pub coalescer: Coalescer,
    /// How long a call waits for a leader before answering UNAVAILABLE.
    pub leader_wait: Duration,
    /// How long a member being added has to catch up as a learner.
    pub member_catch_up: Duration,
    /// Rate-limit checks decided at this node (for its own callers or
    /// forwarded by others).
    pub decided: std::sync::atomic::AtomicU64,
    /// Checks sent again because the member asked could not decide them
    /// then (no leader, a slot moving or its lease lapsed, an owner that
    /// did not answer).
    pub rerouted: std::sync::atomic::AtomicU64,
    /// Reservations of all-or-nothing calls spanning owners.
    pub holds: Arc<Holds>,
    /// How this member renders its metrics, for `Cluster/Metrics`.
    pub metrics_text: super::member_metrics::MetricsSource,
    /// Told of the circuit breakers this node moves to another phase.
    pub watchers: super::watch_fanout::Watchers,
}

impl Router {
    /// Waits (up to `--member-catch-up-ms`) until this leader has
    /// replicated to learner `id` up to index `wanted`; the index it got to.
    async fn learner_caught_up(&self, id: NodeId, wanted: u64) -> Option<u64> {
        let deadline = Instant::now() + self.member_catch_up;
        let mut metrics = self.view.raft().metrics();
        loop {
            let matched = metrics
                .borrow_and_update()
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|l| l.index);
            if matched.is_some_and(|m| m >= wanted) || Instant::now() >= deadline {
                return matched;
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline, metrics.changed()).await {
                return matched; // Raft has stopped
            }
        }
    }

    /// Serves `op` at the leader: here when this node leads, forwarded over
    /// the peer channel otherwise. Waits up to `leader_wait` for a leader;
    /// then UNAVAILABLE.
    pub async fn execute<O: Operation>(&self, op: O) -> Result<O::Output, NodeError> {
        self.execute_as(op, "").await
    }

    /// [`execute`](Self::execute) for an authenticated caller: a forwarded
    /// call carries `principal` (unless empty), and the leader authorises
    /// it as that principal.
    pub async fn execute_as<O: Operation>(
        &self,
        op: O,
        principal: &str,
    ) -> Result<O::Output, NodeError> {
        let deadline = Instant::now() + self.leader_wait;
        let mut server = self.view.changes();
        let me = self.view.id();
        loop {
            let leader = server.borrow_and_update().current_leader;
            let result = match leader {
                // Shutting down after handing over: wait for the next leader.
                Some(l) if l == me && self.leadership.stepping_down() => Err(NodeError::NotLeader),
                Some(l) if l == me => self.serve_bounded(op.clone()).await,
                Some(l) => {
                    let bound = op.bound(self);
                    self.forwarder
                        .forward::<O>(l, op.clone().into(), principal, bound)
                        .await
                }
                None => Err(NodeError::NotLeader),
            };
            match result {
                Err(NodeError::NotLeader) => {}
                other => return other,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NodeError::Unavailable(format!(
                    "no leader within {} ms",
                    self.leader_wait.as_millis()
                )));
            }
            // Wake on the next leadership change, or poll again shortly.
            let wait = left.min(Duration::from_millis(100));
            if let Ok(Err(_)) = tokio::time::timeout(wait, server.changed()).await {
                return Err(NodeError::Unavailable(
                    "Raft has stopped on this node".into(),
                ));
            }
        }
    }

    /// Rate-limit decisions, made by the leader from its in-memory table.
    pub async fn check(
        &self,
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
    ) -> Result<Vec<LimitResult>, NodeError> {
        self.check_as(checks, all_or_nothing, KeyQuota::default())
            .await
    }

    /// [`check`](Self::check) for an authenticated caller, whose new keys
    /// count against its quota.
    pub async fn check_as(
        &self,
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, NodeError> {
        let map = self.engine.slots();
        let here = if map.assigned() {
            self.slots.may_decide(&map, &checks)
        } else {
            self.leadership.may_decide()
        };
        if here {
            // The hot path: no routing, no cloning.
            self.count_decided(checks.len());
            let now = self.decide_ms();
            return Ok(self.engine.check_for(&checks, all_or_nothing, now, quota)?);
        }
        self.check_at_owners(checks, all_or_nothing, quota).await
    }

    /// The time rate limits are decided by here (see `Timekeeper`).
    pub(super) fn decide_ms(&self) -> u64 {
        self.time.decide_ms(self.view.is_leader())
    }

    pub(super) fn count_decided(&self, n: usize) {
        self.decided
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends each check to the member that decides its key (the owner of
    /// its slot; the leader before slots are assigned), all at once, and
    /// puts the answers back in the order asked. A check whose owner
    /// turns out not to decide it (its slot moved, its lease is being
    /// renewed, no leader yet) is sent again, alone with the others that
    /// were, until `--leader-wait-ms`. An all-or-nothing call whose keys
    /// have several owners is reserved and confirmed at each (`spanning`).
    async fn check_at_owners(
        &self,
        checks: Vec<LimitCheck>,
        all_or_nothing: bool,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, NodeError> {
        /// How often a check whose owner did not decide it is sent again.
        const RETRY: Duration = Duration::from_millis(10);
        let deadline = Instant::now() + self.leader_wait;
        let mut results: Vec<Option<LimitResult>> = vec![None; checks.len()];
        let mut left: Vec<usize> = (0..checks.len()).collect();
        // Whether this call was counted as one spanning owners.
        let mut spanned = false;
        loop {
            let map = self.engine.slots();
            let mut groups: BTreeMap<Option<NodeId>, Vec<usize>> = BTreeMap::new();
            for i in left {
                let owner = if map.assigned() {
                    map.owner(slot_of(&checks[i].key))
                } else {
                    self.view.leader()
                };
                groups.entry(owner).or_default().push(i);
            }
            if all_or_nothing && groups.len() > 1 {
                if !spanned {
                    spanned = true;
                    self.holds
                        .counts
                        .coordinated
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                match self
                    .check_spanning(&checks, groups, quota, deadline)
                    .await?
                {
                    Some(decided) => return Ok(decided),
                    None => left = (0..checks.len()).collect(),
                }
            } else {
                let asked = groups.into_iter().map(|(owner, idx)| {
                    let sub: Vec<LimitCheck> = idx.iter().map(|i| checks[*i].clone()).collect();
                    async move {
                        let Some(owner) = owner else {
                            return (idx, Err(NodeError::NotLeader));
                        };
                        let forwarded = owner != self.view.id();
                        let call = CheckLimits {
                            checks: sub,
                            all_or_nothing,
                            principal: quota.principal.to_owned(),
                            key_quota: quota.max,
                        };
                        let answer = if !forwarded {
                            self.serve_bounded(call).await
                        } else if !all_or_nothing {
                            // With whatever else goes there now.
                            let send = self.coalesced_send(quota.max);
                            // The hop, as the caller's trace sees it (the
                            // batch it rides in is shared, so the owner
                            // records no span of its own).
                            let span = crate::telemetry::child(
                                format!("decide on member {owner}"),
                                crate::telemetry::Kind::Client,
                            );
                            let answer = match self
                                .coalescer
                                .forward(owner, quota.principal, call.checks.clone(), &send)
                                .await
                            {
                                Some(answer) => answer,
                                None => self.forward_alone(owner, call, deadline).await,
                            };
                            if let Some(mut span) = span {
                                if let Err(e) = &answer {
                                    span.fail(e);
                                }
                                span.end();
                            }
                            answer
                        } else {
                            self.forward_alone(owner, call, deadline).await
                        };
                        (idx, answer)
                    }
                });
                left = Vec::new();
                for (idx, answer) in futures::future::join_all(asked).await {
                    match answer {
                        Ok(decided) if decided.len() == idx.len() => {
                            for (i, r) in idx.into_iter().zip(decided) {
                                results[i] = Some(r);
                            }
                        }
                        Ok(decided) => {
                            return Err(NodeError::Unavailable(format!(
                                "{} answers to {} checks",
                                decided.len(),
                                idx.len()
                            )))
                        }
                        Err(NodeError::NotOwner | NodeError::NotLeader) => left.extend(idx),
                        // Not sent again: an owner that did not answer may
                        // have decided, and deciding twice would deny early.
                        // The caller retries UNAVAILABLE; an owner that is
                        // gone loses its slots within a slot lease.
                        Err(e) => return Err(e),
                    }
                }
            }
            if left.is_empty() {
                return Ok(results.into_iter().flatten().collect());
            }
            self.rerouted
                .fetch_add(left.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if Instant::now() + RETRY > deadline {
                return Err(NodeError::Unavailable(format!(
                    "no member could decide {} of the checks within {} ms (no leader, or their \
                     slots moving)",
                    left.len(),
                    self.leader_wait.as_millis(),
                )));
            }
            // Polled: an owner's lease or a new map has no event to wake on
            // here.
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Serves checks another member sent on its check stream (a call of
    /// checks, authorised and stamped with quotas as a forwarded one is).
    pub async fn serve_streamed(&self, call: Call) -> Result<Vec<LimitResult>, NodeError> {
        self.forwarder.forwarded.served(&call);
        match call {
            Call::CheckLimits(op) => self.serve_bounded(op).await,
            _ => Err(NodeError::Unavailable(
                "only rate-limit checks travel on the check stream".into(),
            )),
        }
    }

    /// Serves a call a follower forwarded; the reply is the operation's own
    /// result (`NotLeader` when this node does not lead, and the follower
    /// routes again).
    pub async fn serve_forwarded(&self, call: Call) -> PeerMessage {
        self.forwarder.forwarded.served(&call);
        with_call!(call, op => encode(&self.serve_bounded(op).await))
    }

    /// Serves `op` here, answering UNAVAILABLE if it takes longer than the
    /// leader wait: a leader cut off from the majority can neither commit
    /// nor confirm its leadership, and must not keep callers waiting. A
    /// write that times out may still commit later (if this node turns out
    /// to have a majority after all), so the caller is told its outcome is
    /// unknown.
    pub(super) async fn serve_bounded<O: Operation>(&self, op: O) -> Result<O::Output, NodeError> {
        if self.leadership.stepping_down() {
            return Err(NodeError::NotLeader);
        }
        let bound = op.bound(self);
        match tokio::time::timeout(bound, op.serve(self)).await {
            Ok(result) => result,
            Err(_) => Err(NodeError::Unavailable(format!(
                "leader {} could not reach a majority within {} ms{}; retry",
                self.view.id(),
                bound.as_millis(),
                if O::WRITE {
                    " (the write's outcome is unknown)"
                } else {
                    ""
                }
            ))),
        }
    }

    /// Commits a lease or idempotency operation as the leader and returns
    /// its typed result.
    async fn serve_write<W: Write>(&self, op: W) -> Result<Stamped<W::Output>, NodeError> {
        if self.view.is_leader() {
            // Leases are extended before this term serves any lease call.
            self.leadership.on_leadership().await;
        }
        let (outcome, now_ms) = self.proposer.propose(op.into()).await?;
        // The engine builds every operation's outcome through its own
        // `Write::into_outcome`, so this is the operation's variant.
        let value = W::output(outcome)
            .map_err(|other| NodeError::Unavailable(format!("the log answered with {other:?}")))?;
        Ok(Stamped { value, now_ms })
    }
}
