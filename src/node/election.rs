//! When to start an election: a pre-vote round before every one.
//!
//! openraft 0.9 has no pre-vote. Left to itself, a follower that was paused
//! (SIGSTOP, a long GC-like stall, a brief partition) wakes up past its
//! election timeout, raises its term and asks for votes; the others refuse
//! (their leader is alive), but the leader's next append meets the higher
//! term and the leader steps down: one healthy leader deposed, and an
//! election's worth of unavailability, for nothing.
//!
//! So openraft's own election timer is off (`enable_elect: false`) and this
//! loop decides instead. A voter that has heard from no leader for its
//! (randomised) election timeout first asks every other voter, without
//! changing any term, whether it would vote: a peer says yes only if it has
//! not heard from a leader for [`LEADER_LEASE_MS`] itself (and, if it leads,
//! only if a majority has not acknowledged it for as long). Only with a
//! majority of yeses does the node start a real election (openraft's,
//! which still checks terms and logs). A node that has been away therefore
//! rejoins quietly, while a dead or cut-off leader is replaced as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::admission::Gate;
use super::leadership::Leadership;
use super::tasks::Stopping;
use super::view::View;
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::raft::network::{decode, encode, with_cluster, Channels, ClusterId};
use crate::raft::{LogId, NodeId};
use crate::storage::Store;
use crate::timing::{ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS};

pub use crate::timing::LEADER_LEASE_MS;

/// How often the loop looks at the clock.
const TICK: Duration = Duration::from_millis(10);

/// How long a lone voter waits between attempts to elect itself.
const SINGLE_VOTER_WAIT_MS: u64 = 50;

/// How long a pre-vote request may take.
const PRE_VOTE_TIMEOUT: Duration = Duration::from_millis(100);

/// A voter's question before an election.
#[derive(Debug, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    /// The candidate's last log id: a peer whose log is ahead says no, as
    /// it would in the real vote.
    pub last_log_id: Option<LogId>,
}

/// The answer: whether the peer would vote now.
#[derive(Debug, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
}

/// Contact with the leader, and the elections started when it is lost.
pub struct Elections {
    view: View,
    leadership: Arc<Leadership>,
    gate: Arc<Gate>,
    /// The log (read to compare logs in a pre-vote).
    store: Store,
    channels: Channels,
    cluster: ClusterId,
    /// Random per process: seeds the election timeouts.
    boot_id: u64,
    /// When (the lease's monotonic ms) this node last heard from a leader.
    leader_contact: AtomicU64,
    /// One more than the highest commit index a current leader has told
    /// this node of (0: none): readiness waits until it is applied.
    leader_commit: AtomicU64,
}

impl Elections {
    pub fn new(
        view: View,
        leadership: Arc<Leadership>,
        gate: Arc<Gate>,
        store: Store,
        channels: Channels,
        cluster: ClusterId,
        boot_id: u64,
    ) -> Self {
        Self {
            view,
            leadership,
            gate,
            store,
            channels,
            cluster,
            boot_id,
            leader_contact: AtomicU64::new(0),
            leader_commit: AtomicU64::new(0),
        }
    }

    fn mono_ms(&self) -> u64 {
        self.leadership.mono_ms()
    }

    /// Notes that a leader (or a candidate this node voted for) was heard
    /// from just now.
    pub fn heard_from_leader(&self) {
        self.leader_contact.store(self.mono_ms(), Ordering::Release);
    }

    /// Notes an AppendEntries or InstallSnapshot as it arrives, before it
    /// is processed: if it comes from a leader whose vote is at least this
    /// node's, that leader is alive. (Noting it only once the call returns
    /// would miss every call the leader gave up on while this node was
    /// still working through a backlog.)
    ///
    /// `committed` is the leader's commit index, when the message carries
    /// one: [`Node::ready`] waits until this node has applied it.
    pub fn heard_from(&self, vote: &openraft::Vote<NodeId>, committed: Option<LogId>) {
        let mine = self.view.vote();
        if vote.is_committed() && *vote >= mine {
            self.heard_from_leader();
            if let Some(c) = committed {
                self.leader_commit.fetch_max(c.index + 1, Ordering::AcqRel);
            }
        }
    }

    /// Whether this node may serve: it knows a leader it is in touch with,
    /// has applied every entry in its log, and every entry a leader told it
    /// is committed (a follower that was away hears from its leader again
    /// well before it has received the backlog).
    pub fn ready(&self) -> bool {
        let caught_up = {
            let m = self.view.raft().metrics();
            let m = m.borrow();
            let applied = m.last_applied.map(|l| l.index);
            applied.is_some()
                && applied >= m.last_log_index
                && self.applied_what_leader_committed(applied)
        };
        caught_up && self.in_touch_with_leader()
    }

    /// Whether this node has applied every entry a leader said is committed.
    fn applied_what_leader_committed(&self, applied: Option<u64>) -> bool {
        applied.map_or(0, |i| i + 1) >= self.leader_commit.load(Ordering::Acquire)
    }

    fn ms_since_leader_contact(&self) -> u64 {
        self.mono_ms()
            .saturating_sub(self.leader_contact.load(Ordering::Acquire))
    }

    /// Whether this node is in touch with a leader: it leads with a
    /// majority's recent acknowledgement, or it heard from its leader within
    /// the leader lease. A follower whose leader went silent still names it
    /// (nobody has been elected instead), but is not in touch.
    pub fn in_touch_with_leader(&self) -> bool {
        let (leader, term) = self.view.leader_and_term();
        match leader {
            Some(l) if l == self.view.id() => self.leadership.holds_lease(term),
            Some(_) => self.ms_since_leader_contact() < LEADER_LEASE_MS,
            None => false,
        }
    }

    /// Whether this node would vote in an election now (see the module
    /// notes).
    pub fn grants_pre_vote(&self, ask: &PreVoteRequest) -> bool {
        let (leading, term) = self.view.raft_leading();
        let leader_gone = if leading {
            !self.leadership.holds_lease(term)
        } else {
            self.ms_since_leader_contact() >= LEADER_LEASE_MS
        };
        // A log that cannot be read says no: the real vote would fail too.
        let log_ok = self
            .store
            .last_log_id()
            .is_ok_and(|mine| ask.last_log_id >= mine);
        let granted = leader_gone && log_ok;
        tracing::debug!(candidate = ask.candidate, leader_gone, log_ok, "pre-vote");
        granted
    }

    /// A random election timeout: at least the leader lease (before it
    /// lapses nobody would grant a pre-vote), spread as wide as openraft's.
    fn election_timeout_ms(&self) -> u64 {
        let spread = ELECTION_TIMEOUT_MAX_MS - ELECTION_TIMEOUT_MIN_MS;
        // Cheap per-process randomness: the boot id stirred by the time.
        let x = (self.boot_id ^ self.mono_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_mul(0xBF58_476D_1CE4_E5B9);
        LEADER_LEASE_MS + (x >> 33) % spread.max(1)
    }

    /// Asks every other voter; true when a majority (this node included)
    /// would vote. A peer that does not answer in time counts as a no; a
    /// peer that predates pre-votes (`UNIMPLEMENTED`) as a yes, as it
    /// would have voted without being asked.
    async fn pre_vote(&self, voters: &[NodeId]) -> bool {
        let me = self.view.id();
        let addrs: Vec<(NodeId, Option<String>)> = voters
            .iter()
            .filter(|id| **id != me)
            .map(|id| (*id, self.view.addr_of(*id)))
            .collect();
        let Ok(last_log_id) = self.store.last_log_id() else {
            return false;
        };
        let mut asks = tokio::task::JoinSet::new();
        for (peer, addr) in addrs {
            let Some(channel) = addr.and_then(|a| self.channels.get(&a).ok()) else {
                continue;
            };
            let ask = PreVoteRequest {
                candidate: me,
                last_log_id,
            };
            let request = with_cluster(encode(&ask), &self.cluster, PRE_VOTE_TIMEOUT);
            asks.spawn(async move {
                let mut client = RaftPeerClient::new(channel);
                let call = client.pre_vote(request);
                let granted = match tokio::time::timeout(PRE_VOTE_TIMEOUT, call).await {
                    Ok(Ok(reply)) => decode::<PreVoteResponse>(reply.get_ref())
                        .map(|r| r.granted)
                        .unwrap_or(false),
                    Ok(Err(status)) => status.code() == tonic::Code::Unimplemented,
                    Err(_) => false,
                };
                (peer, granted)
            });
        }
        let mut yes = 1; // this node
        while let Some(answer) = asks.join_next().await {
            if let Ok((peer, granted)) = answer {
                tracing::debug!(peer, granted, "pre-vote answer");
                yes += usize::from(granted);
            }
            if yes * 2 > voters.len() {
                return true;
            }
        }
        false
    }

    /// Starts an election when this voter has heard from no leader for its
    /// election timeout and a pre-vote round says it could win. Ends when
    /// the node stops.
    pub async fn run(self: Arc<Self>, stop: Stopping) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut timeout = self.election_timeout_ms();
        // When this node last tried (kept apart from `leader_contact`: its
        // own attempt must not make it refuse another candidate's
        // pre-vote, or two candidates can keep refusing each other).
        let mut last_attempt = 0;
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {}
                _ = stop.wait() => return,
            }
            let (leading, _) = self.view.raft_leading();
            let voters: Vec<NodeId> = self.view.voters().into_iter().collect();
            if leading {
                self.heard_from_leader();
                continue;
            }
            if !voters.contains(&self.view.id())
                || !self.gate.admitted()
                || self.leadership.stepping_down()
            {
                // A learner, or a node not yet in any membership, must not
                // start an election (but may be asked to help with one).
                continue;
            }
            // A single voter needs nobody's consent: it elects itself
            // shortly after starting.
            let single = voters.len() == 1;
            let wait = if single {
                SINGLE_VOTER_WAIT_MS
            } else {
                timeout
            };
            if self.ms_since_leader_contact() < wait
                || self.mono_ms().saturating_sub(last_attempt) < wait
            {
                continue;
            }
            if single || self.pre_vote(&voters).await {
                tracing::info!(
                    silent_ms = self.ms_since_leader_contact(),
                    "no leader heard from: starting an election"
                );
                if let Err(e) = self.view.raft().trigger().elect().await {
                    tracing::warn!(error = %e, "could not start an election");
                }
            }
            // Whatever happened, wait a fresh timeout before trying again.
            last_attempt = self.mono_ms();
            timeout = self.election_timeout_ms();
        }
    }
}
