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

/// The cluster id a new cluster of these initial members takes: the
/// first 128 bits of a SHA-256 over the members (`ID=HOST:PORT`, by id)
/// and the optional `--cluster-token`. Every initial member computes it
/// from its own flags before any message is sent, so even the first
/// messages of a formation carry it (as etcd derives its cluster id from
/// `--initial-cluster` and `--initial-cluster-token`). Two clusters with
/// the same members and token have the same id: give a re-created cluster
/// a new token.
pub fn formation_id(
    token: Option<&str>,
    peers: &std::collections::BTreeMap<NodeId, String>,
) -> String {
    let mut text = format!("arbiter cluster\n{}\n", token.unwrap_or(""));
    for (id, addr) in peers {
        text.push_str(&format!("{id}={addr}\n"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sent by a refusing peer with `Identify`'s refusal (metadata key), so
/// that an empty node of another cluster id, or whose certificate names
/// no member yet, still learns where it stands: [`REFUSED_VOTER`] (the
/// refusing peer has state and lists the asker as a voter: its disk was
/// lost) or [`REFUSED_NOT_MEMBER`] (it has state and does not list it: a
/// new member, to be added).
pub const REFUSAL_HEADER: &str = "x-arbiter-refusal";
pub const REFUSED_VOTER: &str = "voter";
pub const REFUSED_NOT_MEMBER: &str = "not-a-member";

/// The body of an `Identify` request: who asks (absent from peers of an
/// older version, which sent `()`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdentifyRequest {
    pub node_id: NodeId,
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

    /// This node's cluster id, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster.get().cloned()
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
    /// it if this node has none yet (a new member's first contact, once
    /// admitted). A message without one is refused, unless
    /// `--accept-peers-without-cluster-id` (for one upgrade) says
    /// otherwise. An empty node that is still asking its peers accepts
    /// only its own formation's id.
    pub fn check_cluster(&self, sender: Option<&str>) -> Result<(), String> {
        let Some(theirs) = sender else {
            if self.accept_unnamed_peers {
                return Ok(());
            }
            return Err(format!(
                "node {} refuses a peer message without a cluster id ({CLUSTER_HEADER}): \
                 every member of this version sends one; for a rolling upgrade from a \
                 version without cluster ids, start with --accept-peers-without-cluster-id",
                self.id
            ));
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
            if theirs == self.formation_id {
                return Ok(()); // learnt only once admitted
            }
            return Err(format!(
                "node {} has no cluster yet and expects the cluster id {} of its initial \
                 members (--peers, --cluster-token); refusing a message from cluster {theirs}",
                self.id, self.formation_id
            ));
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
        let mut request = with_cluster(
            encode(&IdentifyRequest { node_id: self.id }),
            &self.cluster,
            ASK_EVERY,
        );
        if self.cluster.get().is_none() {
            if let Ok(v) = self.formation_id.parse() {
                request.metadata_mut().insert(CLUSTER_HEADER, v);
            }
        }
        match client.identify(request).await {
            Ok(reply) => decode(reply.get_ref()).map_err(|e| e.to_string()),
            Err(status) => {
                // A peer of another cluster id, or one that does not take
                // this node's certificate for a member's, says whether it
                // lists this node as a voter.
                let listed = match status.metadata().get(REFUSAL_HEADER).map(|v| v.to_str()) {
                    Some(Ok(REFUSED_VOTER)) => true,
                    Some(Ok(REFUSED_NOT_MEMBER)) => false,
                    _ => return Err(status.to_string()),
                };
                Ok(Identified {
                    node_id: 0,
                    has_state: true,
                    cluster_id: None,
                    voters: if listed { vec![self.id] } else { Vec::new() },
                })
            }
        }
    }

    /// Whether `asker` would be refused as [`REFUSED_VOTER`] or
    /// [`REFUSED_NOT_MEMBER`]: `None` when this node has no state to say.
    pub fn refusal_for(&self, asker: NodeId) -> Option<&'static str> {
        let me = self.identify();
        if !me.has_state {
            return None;
        }
        Some(if me.voters.contains(&asker) {
            REFUSED_VOTER
        } else {
            REFUSED_NOT_MEMBER
        })
    }

    /// Admits this node to a new cluster; the lowest id initialises it
    /// (with a new cluster id, recorded first) as its only voter, then adds
    /// the other members as learners and makes each a voter once it has
    /// caught up. So a member listed as a voter has always received the
    /// log: an empty one has lost it.
    pub(super) async fn initialise_if_lowest(self: &Arc<Self>) -> Result<(), NodeError> {
        let lowest = self.initial_peers.keys().next().copied();
        if lowest != Some(self.id) {
            // The lowest id initialises the cluster with the formation's
            // id, which this member already knows.
            self.adopt_cluster_id(&self.formation_id)?;
            self.admission.send_replace(Admission::Admitted);
            return Ok(());
        }
        let cluster_id = self.formation_id.clone();
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

    /// Records `id` as this node's cluster id (before it is used).
    pub(super) fn adopt_cluster_id(&self, id: &str) -> Result<(), NodeError> {
        let identity = Identity {
            node_id: self.id,
            cluster_id: Some(id.to_owned()),
        };
        self.store
            .save_identity(&identity)
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        let _ = self.cluster.set(id.to_owned());
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
    fn formation_ids_follow_the_members_and_the_token() {
        let peers = |list: &[(u64, &str)]| {
            list.iter()
                .map(|(id, a)| (*id, a.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let three = peers(&[(1, "a:1"), (2, "b:1"), (3, "c:1")]);
        let id = formation_id(None, &three);
        assert_eq!(id.len(), 32);
        assert_eq!(id, formation_id(None, &three));
        assert_ne!(id, formation_id(Some("t"), &three));
        assert_ne!(id, formation_id(None, &peers(&[(1, "a:1"), (2, "b:1")])));
        assert_ne!(
            id,
            formation_id(None, &peers(&[(1, "a:1"), (2, "b:1"), (3, "c:2")]))
        );
    }
}
