//! The view: what this node knows of the cluster (its own id, the Raft
//! handle, who leads in which term, the membership), shared read-only by
//! every room. It owns no state of its own beyond openraft's.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, Raft, ServerState};
use tokio::sync::watch;

use super::NodeError;
use crate::raft::{NodeId, TypeConfig};

type ServerMetrics = openraft::metrics::RaftServerMetrics<NodeId, BasicNode>;

/// Where this node stands, for operators (`arbiter.v1.Cluster/Status`).
#[derive(Clone, Debug)]
pub struct Standing {
    pub leader: Option<NodeId>,
    pub term: u64,
    pub applied_index: u64,
    /// "Leader", "Follower", "Candidate", "Learner" or "Shutdown".
    pub role: &'static str,
    pub members: Vec<MemberInfo>,
    /// Whether a membership change is half-way (joint consensus).
    pub membership_changing: bool,
}

/// One member of the current membership.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub id: NodeId,
    pub peer_addr: String,
    pub voter: bool,
}

/// How far this node's log and, when it leads, each member's have got
/// (for the metrics).
#[derive(Clone, Debug, Default)]
pub struct Replication {
    /// Index of the last entry in its log (0: none).
    pub last_log_index: u64,
    /// Index of the last entry its latest snapshot covers (0: none).
    pub snapshot_index: u64,
    /// As leader: each other member and the entries of the leader's log
    /// it has not confirmed.
    pub follower_lag: Vec<(NodeId, u64)>,
    /// As leader: milliseconds since a majority last acknowledged it.
    pub quorum_ack_ms: Option<u64>,
}

#[derive(Clone)]
pub struct View {
    id: NodeId,
    raft: Raft<TypeConfig>,
    /// Leadership and membership (changes only with them, not per commit).
    server: watch::Receiver<ServerMetrics>,
    /// The members given at start-up, with their peer addresses.
    initial_peers: BTreeMap<NodeId, String>,
}

impl View {
    pub fn new(
        id: NodeId,
        raft: Raft<TypeConfig>,
        initial_peers: BTreeMap<NodeId, String>,
    ) -> Self {
        Self {
            id,
            server: raft.server_metrics(),
            raft,
            initial_peers,
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// A receiver of leadership and membership changes.
    pub fn changes(&self) -> watch::Receiver<ServerMetrics> {
        self.server.clone()
    }

    /// The members given at start-up.
    pub fn initial_peers(&self) -> &BTreeMap<NodeId, String> {
        &self.initial_peers
    }

    /// The leader this node knows of, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.server.borrow().current_leader
    }

    /// This node's vote.
    pub fn vote(&self) -> openraft::Vote<NodeId> {
        self.server.borrow().vote
    }

    /// The leader this node knows of and the current term, read together.
    pub fn leader_and_term(&self) -> (Option<NodeId>, u64) {
        let m = self.server.borrow();
        (m.current_leader, m.vote.leader_id().get_term())
    }

    /// The current term (from the vote) and whether this node leads in it.
    /// Reads the server metrics, which change only with leadership, never
    /// per commit.
    pub fn term_and_leading(&self) -> (u64, bool) {
        let m = self.server.borrow();
        let leading = m.state == ServerState::Leader && m.current_leader == Some(self.id);
        (m.vote.leader_id().get_term(), leading)
    }

    pub fn is_leader(&self) -> bool {
        self.term_and_leading().1
    }

    /// Whether openraft has this node in the leader state (whoever it
    /// names as leader), and its term.
    pub fn raft_leading(&self) -> (bool, u64) {
        let m = self.server.borrow();
        (
            m.state == ServerState::Leader,
            m.vote.leader_id().get_term(),
        )
    }

    /// The current voting members.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.server
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// The peer address of member `id` in the current membership.
    pub fn addr_of(&self, id: NodeId) -> Option<String> {
        self.server
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// The members a peer may be, with their peer addresses: the latest
    /// membership in the log, or the initial members while there is none
    /// (an empty node, or a new member not yet reached by its leader).
    pub fn peer_members(&self) -> Vec<(NodeId, String)> {
        self.with_peer_members(|members| members.map(|(id, a)| (id, a.to_owned())).collect())
    }

    /// Runs `f` over [`peer_members`](Self::peer_members) without copying
    /// them (every peer message is checked against them).
    pub fn with_peer_members<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = (NodeId, &str)>) -> R,
    ) -> R {
        let m = self.server.borrow();
        if m.membership_config.log_id().is_some() {
            f(&mut m
                .membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.addr.as_str())))
        } else {
            f(&mut self.initial_peers.iter().map(|(id, a)| (*id, a.as_str())))
        }
    }

    /// Where this node stands (see [`Standing`]).
    pub fn standing(&self) -> Standing {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        Standing {
            leader: m.current_leader,
            term: m.current_term,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            role: match m.state {
                ServerState::Leader => "Leader",
                ServerState::Follower => "Follower",
                ServerState::Candidate => "Candidate",
                ServerState::Learner => "Learner",
                ServerState::Shutdown => "Shutdown",
            },
            members: membership
                .nodes()
                .map(|(id, n)| MemberInfo {
                    id: *id,
                    peer_addr: n.addr.clone(),
                    voter: voters.contains(id),
                })
                .collect(),
            membership_changing: membership.get_joint_config().len() > 1,
        }
    }

    /// How far the logs have got (see [`Replication`]).
    pub fn replication(&self) -> Replication {
        let m = self.raft.metrics().borrow().clone();
        let last_log_index = m.last_log_index.unwrap_or(0);
        let leading = m.state == ServerState::Leader;
        let follower_lag = match (&m.replication, leading) {
            (Some(replication), true) => replication
                .iter()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, matched)| {
                    let confirmed = matched.map_or(0, |l| l.index);
                    (*id, last_log_index.saturating_sub(confirmed))
                })
                .collect(),
            _ => Vec::new(),
        };
        Replication {
            last_log_index,
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            follower_lag,
            quorum_ack_ms: m.millis_since_quorum_ack.filter(|_| leading),
        }
    }

    /// Waits until this node, as leader, may serve a linearizable read.
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(e) if e.forward_to_leader::<BasicNode>().is_some() => Err(NodeError::NotLeader),
            Err(e) => Err(NodeError::Unavailable(e.to_string())),
        }
    }
}
