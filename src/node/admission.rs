//! A data directory knows its cluster, and an empty one is admitted to
//! Raft only once the peers say it may be.
//!
//! Each data directory records its node id and, once known, its cluster id
//! (made by the member that initialises the cluster, learnt by the others
//! from the first peer message that carries it; a cluster from before ids
//! has none and accepts any). Peer messages carry the sender's cluster id
//! (`x-arbiter-cluster`); a node refuses messages of another cluster.
//!
//! A node whose data directory holds no Raft state asks its peers
//! (`Identify`) before it takes part in Raft (votes, appends, snapshots and
//! pre-votes are refused until then):
//! - a peer with state lists it as a voter: its disk was lost or replaced.
//!   Rejoining empty would let it vote without the log it had acknowledged,
//!   so it refuses to start, naming the recovery (remove the member, then
//!   add it back as a new one);
//! - a peer with state does not list it: it joins as a new member (to be
//!   added with `arbiter cluster add`);
//! - every other peer answers and none has state: a new cluster. The
//!   lowest id initialises it; it is the only way a cluster is initialised,
//!   so a lowest-id member that lost its disk never starts a second one.
//!
//! Until one of these holds (peers unreachable), it keeps asking. The
//! initialising member makes itself the only voter, then adds the others as
//! learners and makes each a voter once it has caught up: a voter has
//! always received the log, so an empty voter is one that lost it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Node, NodeError};
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::raft::network::{decode, encode, with_cluster};
use crate::raft::NodeId;

pub use crate::raft::network::{ClusterId, CLUSTER_HEADER};

/// How often an empty node asks its peers again.
const ASK_EVERY: Duration = Duration::from_millis(500);

/// What a data directory records about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    #[serde(default)]
    pub cluster_id: Option<String>,
}

/// A node's answer to `Identify`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identified {
    pub node_id: NodeId,
    /// Whether the node holds Raft state (a vote, log or snapshot).
    pub has_state: bool,
    pub cluster_id: Option<String>,
    /// The voters of its current membership.
    pub voters: Vec<NodeId>,
}

/// Where an empty node stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Asking the peers; Raft traffic is refused.
    Checking,
    Admitted,
    /// Must not take part: why, and what to do.
    Refused(String),
}

/// A new cluster id: 128 bits mixed from the time, the process, the heap
/// and a counter.
pub fn new_cluster_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    static MADE: AtomicU64 = AtomicU64::new(0);
    let n = u128::from(MADE.fetch_add(1, Ordering::Relaxed));
    let here = Box::new(0u8);
    let addr = &*here as *const u8 as usize as u128;
    let mix = |x: u128| x.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ (x >> 61);
    let id = mix(mix(t ^ (u128::from(std::process::id()) << 64) ^ (addr << 17)) ^ n);
    format!("{id:032x}")
}

/// Why a data directory cannot serve as this node.
pub fn check_node_id(stored: &Identity, node_id: NodeId) -> Result<(), String> {
    if stored.node_id != node_id {
        return Err(format!(
            "the data directory belongs to node {}, not node {node_id}: start node {} on it, \
             or give node {node_id} a data directory of its own",
            stored.node_id, stored.node_id
        ));
    }
    Ok(())
}

/// What an empty node concludes from its peers' answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Refused: the message says why and what to do.
    Refuse(String),
    /// Join an existing cluster as a new member.
    Join,
    /// Every peer is empty: a new cluster (initialised by the lowest id).
    NewCluster,
    /// Not enough answers yet.
    Wait,
}

/// Decides from the answers of the other initial members (`None`: no
/// answer).
pub fn verdict(me: NodeId, answers: &[(NodeId, Option<Identified>)]) -> Verdict {
    for (peer, answer) in answers {
        let Some(a) = answer else { continue };
        if !a.has_state {
            continue;
        }
        if a.voters.contains(&me) {
            return Verdict::Refuse(format!(
                "node {me} has an empty data directory, but node {peer} lists it as a voter of \
                 the cluster{}: its data was lost or replaced, and rejoining empty could elect \
                 a leader without acknowledged writes. Recover by removing it \
                 (`arbiter cluster remove {me}`), then starting it again on an empty directory \
                 and adding it back as a new member (`arbiter cluster add {me} <peer-address>`)",
                a.cluster_id
                    .as_deref()
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default()
            ));
        }
        return Verdict::Join;
    }
    if answers.iter().all(|(_, a)| a.is_some()) {
        Verdict::NewCluster
    } else {
        Verdict::Wait
    }
}

impl Node {
    /// Where this node stands (see the module docs).
    pub fn admission(&self) -> watch::Receiver<Admission> {
        self.admission.subscribe()
    }

    pub fn admitted(&self) -> bool {
        *self.admission.borrow() == Admission::Admitted
    }

    /// This node's answer to a peer's `Identify`.
    pub fn identify(&self) -> Identified {
        let m = self.raft.metrics().borrow().clone();
        let has_state = m.vote.leader_id().get_term() > 0
            || m.last_log_index.is_some()
            || m.snapshot.is_some()
            || m.membership_config.log_id().is_some();
        Identified {
            node_id: self.id,
            has_state,
            cluster_id: self.cluster.get().cloned(),
            voters: m.membership_config.voter_ids().collect(),
        }
    }

    /// Checks a peer message's cluster id against this node's, and learns
    /// it if this node has none yet (a new member's first contact).
    pub fn check_cluster(&self, sender: Option<&str>) -> Result<(), String> {
        let Some(theirs) = sender else {
            return Ok(()); // a peer from before cluster ids, or still empty
        };
        if let Some(ours) = self.cluster.get() {
            return if ours == theirs {
                Ok(())
            } else {
                Err(format!(
                    "node {} belongs to cluster {ours}; refusing a message from cluster {theirs}",
                    self.id
                ))
            };
        }
        if !self.admitted() {
            return Ok(()); // learnt only once admitted
        }
        let _ = self.cluster.set(theirs.to_owned());
        let identity = Identity {
            node_id: self.id,
            cluster_id: Some(theirs.to_owned()),
        };
        if let Err(e) = self.store.save_identity(&identity) {
            tracing::error!(error = %e, "cannot record the cluster id");
        }
        tracing::info!(cluster = theirs, "joined cluster");
        Ok(())
    }

    /// Asks the other initial members until the verdict is known, then
    /// admits this node (initialising a new cluster if it has the lowest
    /// id) or refuses it.
    pub(super) async fn run_admission(self: Arc<Self>) {
        let others: Vec<(NodeId, String)> = self
            .initial_peers
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        loop {
            let mut answers = Vec::with_capacity(others.len());
            for (id, addr) in &others {
                answers.push((*id, self.ask_identify(addr).await.ok()));
            }
            match verdict(self.id, &answers) {
                Verdict::Refuse(why) => {
                    tracing::error!("{why}");
                    self.admission.send_replace(Admission::Refused(why));
                    return;
                }
                Verdict::Join => {
                    tracing::info!(
                        "an existing cluster does not list this node: joining as a new member"
                    );
                    self.admission.send_replace(Admission::Admitted);
                    return;
                }
                Verdict::NewCluster => {
                    if let Err(e) = self.initialise_if_lowest().await {
                        let why = format!("cannot initialise the cluster: {e}");
                        tracing::error!("{why}");
                        self.admission.send_replace(Admission::Refused(why));
                    }
                    return;
                }
                Verdict::Wait => {
                    tracing::info!(
                        "waiting for every peer to answer before joining or forming a cluster"
                    );
                }
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(ASK_EVERY) => {}
                _ = self.tasks.stopping() => return,
            }
        }
    }

    /// Asks the peer at `addr` who it is.
    async fn ask_identify(&self, addr: &str) -> Result<Identified, String> {
        let channel = self.channels.get(addr).map_err(|e| e.to_string())?;
        let mut client = RaftPeerClient::new(channel);
        let request = with_cluster(encode(&()), &self.cluster, ASK_EVERY);
        let reply = client.identify(request).await.map_err(|s| s.to_string())?;
        decode(reply.get_ref()).map_err(|e| e.to_string())
    }

    /// Admits this node to a new cluster; the lowest id initialises it
    /// (with a new cluster id, recorded first) as its only voter, then adds
    /// the other members as learners and makes each a voter once it has
    /// caught up. So a member listed as a voter has always received the
    /// log: an empty one has lost it.
    pub(super) async fn initialise_if_lowest(self: &Arc<Self>) -> Result<(), NodeError> {
        let lowest = self.initial_peers.keys().next().copied();
        if lowest != Some(self.id) {
            self.admission.send_replace(Admission::Admitted);
            return Ok(());
        }
        let cluster_id = new_cluster_id();
        let identity = Identity {
            node_id: self.id,
            cluster_id: Some(cluster_id.clone()),
        };
        self.store
            .save_identity(&identity)
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        let _ = self.cluster.set(cluster_id.clone());
        let me = &self.initial_peers[&self.id];
        let first = std::collections::BTreeMap::from([(self.id, BasicNode::new(me))]);
        tracing::info!(members = self.initial_peers.len(), cluster = %cluster_id, "initialising a new cluster");
        self.admission.send_replace(Admission::Admitted);
        self.raft
            .initialize(first)
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        if self.initial_peers.len() > 1 {
            self.tasks
                .spawn("joining members", self.clone().add_initial_members());
        }
        Ok(())
    }

    /// Adds the other initial members: each as a learner, then, once it
    /// has replicated up to the membership change that added it, as a
    /// voter. Checks every 100 ms (a member that is not up yet holds back
    /// no other) until all are voters, or this node stops leading (the rest
    /// are then added with `arbiter cluster add`, as the log says).
    async fn add_initial_members(self: Arc<Self>) {
        loop {
            let voters = self.voters();
            let pending: Vec<(NodeId, String)> = self
                .initial_peers
                .iter()
                .filter(|(id, _)| !voters.contains(id))
                .map(|(id, addr)| (*id, addr.clone()))
                .collect();
            if pending.is_empty() {
                return;
            }
            if self.is_leader() {
                self.add_step(pending).await;
            } else if voters.len() > 1 {
                tracing::warn!(
                    "no longer leading: add the remaining initial members with `arbiter cluster add`"
                );
                return;
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = self.tasks.stopping() => return,
            }
        }
    }

    /// One step for each member not yet a voter: add it as a learner, or
    /// make a caught-up learner a voter. Refusals (another change still in
    /// progress) are retried on the next step.
    async fn add_step(&self, pending: Vec<(NodeId, String)>) {
        let m = self.raft.metrics().borrow().clone();
        let config = m.membership_config.membership();
        let change_index = m.membership_config.log_id().map(|l| l.index);
        for (id, addr) in pending {
            if config.get_node(&id).is_none() {
                let _ = self
                    .raft
                    .add_learner(id, BasicNode::new(&addr), false)
                    .await;
                continue;
            }
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|l| l.index);
            if matched.is_some() && matched >= change_index {
                let mut voters = self.voters();
                voters.insert(id);
                if self.raft.change_membership(voters, false).await.is_ok() {
                    tracing::info!(node = id, "initial member joined as a voter");
                }
                // One change at a time: the next waits for this one.
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_state(voters: &[NodeId]) -> Option<Identified> {
        Some(Identified {
            node_id: 9,
            has_state: true,
            cluster_id: Some("c1".into()),
            voters: voters.to_vec(),
        })
    }

    fn empty() -> Option<Identified> {
        Some(Identified {
            node_id: 9,
            has_state: false,
            cluster_id: None,
            voters: Vec::new(),
        })
    }

    #[test]
    fn an_empty_voter_is_refused_a_new_member_joins_an_empty_cluster_forms() {
        let v = verdict(1, &[(2, with_state(&[1, 2, 3])), (3, None)]);
        match v {
            Verdict::Refuse(why) => {
                assert!(
                    why.contains("node 2 lists it as a voter of the cluster c1"),
                    "{why}"
                );
                assert!(why.contains("arbiter cluster remove 1"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            verdict(4, &[(1, with_state(&[1, 2, 3])), (2, None)]),
            Verdict::Join
        );
        assert_eq!(
            verdict(1, &[(2, empty()), (3, empty())]),
            Verdict::NewCluster
        );
        // One silent peer may be the one with the data: wait for it.
        assert_eq!(verdict(1, &[(2, empty()), (3, None)]), Verdict::Wait);
    }

    #[test]
    fn a_data_directory_of_another_node_is_refused() {
        let stored = Identity {
            node_id: 2,
            cluster_id: None,
        };
        assert!(check_node_id(&stored, 2).is_ok());
        let e = check_node_id(&stored, 3).unwrap_err();
        assert!(e.contains("belongs to node 2, not node 3"), "{e}");
    }

    #[test]
    fn cluster_ids_differ() {
        assert_ne!(new_cluster_id(), new_cluster_id());
        assert_eq!(new_cluster_id().len(), 32);
    }
}
