//! A data directory knows its cluster, and an empty one is admitted to
//! Raft only once the peers say it may be.
//!
//! Each data directory records its node id and, once known, its cluster id
//! (made by the member that initialises the cluster, learnt by the others
//! from the first peer message that carries it; a cluster from before ids
//! has none and accepts any). Peer messages carry the sender's cluster id
//! (`x-arbiter-cluster`); a node refuses messages of another cluster.
//!
//! A node whose data directory holds no Raft state asks the other initial
//! members (`Identify`) before it takes part in Raft (votes, appends,
//! snapshots and pre-votes are refused until then):
//! - a peer with state lists it as a voter and has seen it take part in
//!   Raft (`raft::seen`), or lists it in a membership other than the one
//!   the cluster was formed with: its disk was lost or replaced. Rejoining
//!   empty would let it vote without the log it had acknowledged, so it
//!   refuses to start, naming the recovery (remove the member, then add it
//!   back as a new one);
//! - a peer with state lists it as a voter of the cluster's first
//!   membership and no peer has seen it take part: it never started (it
//!   died, or was slow, while the others formed the cluster). Once every
//!   other member has answered it starts as that member;
//! - a peer with state does not list it: it joins as a new member (to be
//!   added with `arbiter cluster add`);
//! - a majority of the initial members (itself included) answer and none
//!   has state: a new cluster.
//!
//! Until one of these holds, it keeps asking. A new cluster is formed as
//! etcd's static bootstrap forms one: every member that finds it new
//! initialises it with all the initial members as voters and the id they
//! all derive from their flags (`formation_id`), so no member is needed
//! for the others to finish forming it. If the members that did not
//! answer held an older cluster's data (two of three disks lost), that
//! data is not brought back: give a re-created cluster a new
//! `--cluster-token`.

use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::tasks::Stopping;
use super::view::View;
use super::NodeError;
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::raft::network::{decode, encode, with_cluster, Channels};
use crate::raft::seen::SeenWithState;
use crate::raft::NodeId;
use crate::storage::Store;

pub use crate::raft::network::{ClusterId, CLUSTER_HEADER};

/// How often an empty node asks its peers again.
const ASK_EVERY: Duration = Duration::from_millis(200);
/// How long it waits for one peer's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an empty node that the forming cluster lists as a voter waits
/// for every other member before it settles for a majority's word that
/// none has seen it take part (see [`verdict`]).
const FORMATION_PATIENCE: Duration = Duration::from_millis(500);

pub use crate::storage::Identity;

/// A node's answer to `Identify`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identified {
    pub node_id: NodeId,
    /// Whether the node holds Raft state (a vote, log or snapshot).
    pub has_state: bool,
    pub cluster_id: Option<String>,
    /// The voters of its current membership.
    pub voters: Vec<NodeId>,
    /// The log index of that membership: 0 for the one the cluster was
    /// formed with (absent from older versions, and without state).
    #[serde(default)]
    pub membership_index: Option<u64>,
    /// The peers it has seen take part in Raft with state (`raft::seen`).
    #[serde(default)]
    pub seen_with_state: Vec<NodeId>,
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
    /// No peer has state: a new cluster.
    NewCluster,
    /// The others formed the cluster without this member, which never
    /// started: it starts as the member it was meant to be.
    NeverStarted,
    /// Not enough answers yet.
    Wait,
}

/// Decides from the answers of the other initial members (`None`: no
/// answer); `members` counts the initial members, this one included.
/// `patient`: this node has been asking for [`FORMATION_PATIENCE`].
///
/// A node listed as a voter of the cluster's first membership that no
/// peer has seen take part never started, and the cluster is still
/// forming (its leader seals the formation, re-committing the membership
/// at a later index, once it has seen every initial member take part). It
/// starts when every other member says so, or, once patient, a majority of
/// the members: a member that died during the first start must not hold
/// the others back. Of three members, the one that did not answer cannot
/// be the only one to have seen it (the answering one would have, or it
/// never took part); of five, a member that took part, lost its disk, and
/// whose witnesses stayed unreachable for that long while the cluster was
/// still forming would be taken for one that never started.
pub fn verdict(
    me: NodeId,
    members: usize,
    answers: &[(NodeId, Option<Identified>)],
    patient: bool,
) -> Verdict {
    let stateful: Vec<(NodeId, &Identified)> = answers
        .iter()
        .filter_map(|(peer, a)| a.as_ref().filter(|a| a.has_state).map(|a| (*peer, a)))
        .collect();
    for (peer, a) in &stateful {
        let lost = a.voters.contains(&me)
            && (a.seen_with_state.contains(&me) || a.membership_index != Some(0));
        if lost {
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
    }
    let answered = 1 + answers.iter().filter(|(_, a)| a.is_some()).count();
    if stateful.iter().any(|(_, a)| a.voters.contains(&me)) {
        let all = answered == members;
        return if all || (patient && answered * 2 > members) {
            Verdict::NeverStarted
        } else {
            Verdict::Wait
        };
    }
    if !stateful.is_empty() {
        return Verdict::Join;
    }
    if answered * 2 > members {
        Verdict::NewCluster
    } else {
        Verdict::Wait
    }
}

/// Whether this node may take part in Raft, and the cluster id every
/// peer message is checked against.
pub struct Gate {
    view: View,
    id: NodeId,
    admission: watch::Sender<Admission>,
    /// This node's cluster id, once known (sent with every peer message).
    cluster: ClusterId,
    /// The id a new cluster of the initial members takes (see
    /// [`formation_id`]).
    formation_id: String,
    /// Whether peer messages without a cluster id are accepted (one
    /// upgrade's switch).
    accept_unnamed_peers: bool,
    /// Peers seen taking part in Raft with state (see `raft::seen`).
    seen: Arc<SeenWithState>,
    /// Where the identity (node and cluster id) is recorded.
    store: Store,
    channels: Channels,
}

/// What a [`Gate`] starts from.
pub struct GateOptions {
    pub admission: Admission,
    pub cluster: ClusterId,
    pub formation_id: String,
    pub accept_unnamed_peers: bool,
    pub seen: Arc<SeenWithState>,
    pub store: Store,
    pub channels: Channels,
}

impl Gate {
    pub fn new(view: View, options: GateOptions) -> Self {
        Self {
            id: view.id(),
            view,
            admission: watch::channel(options.admission).0,
            cluster: options.cluster,
            formation_id: options.formation_id,
            accept_unnamed_peers: options.accept_unnamed_peers,
            seen: options.seen,
            store: options.store,
            channels: options.channels,
        }
    }

    /// The id the initial members form a new cluster with.
    pub fn formation_id(&self) -> &str {
        &self.formation_id
    }

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
        let m = self.view.raft().metrics().borrow().clone();
        let has_state = m.vote.leader_id().get_term() > 0
            || m.last_log_index.is_some()
            || m.snapshot.is_some()
            || m.membership_config.log_id().is_some();
        Identified {
            node_id: self.id,
            has_state,
            cluster_id: self.cluster.get().cloned(),
            voters: m.membership_config.voter_ids().collect(),
            membership_index: m.membership_config.log_id().map(|l| l.index),
            seen_with_state: self.seen.all(),
        }
    }

    /// Checks a peer message's cluster id against this node's, and learns
    /// it if this node has none yet (a new member's first contact, once
    /// admitted). A message without one is refused, unless
    /// `--accept-peers-without-cluster-id` (for one upgrade) says
    /// otherwise. An empty node that is still asking its peers accepts
    /// only its own formation's id.
    ///
    /// Only a leader's messages (`learn`: appends and snapshots) teach a
    /// new member its cluster id: an `Identify` from another new member
    /// carries that member's formation id, not the cluster's.
    pub fn check_cluster(&self, sender: Option<&str>, learn: bool) -> Result<(), String> {
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
        if !self.admitted() || !learn {
            if theirs == self.formation_id {
                return Ok(()); // learnt only once admitted, from a leader
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
    /// admits this node (initialising the cluster as one of its initial
    /// voters when it is new or formed without it) or refuses it.
    pub async fn run_admission(self: Arc<Self>, stop: Stopping) {
        let initial = self.view.initial_peers();
        let others: Vec<(NodeId, String)> = initial
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        let asking = tokio::time::Instant::now();
        loop {
            let mut answers = Vec::with_capacity(others.len());
            for (id, addr) in &others {
                answers.push((*id, self.ask_identify(addr).await.ok()));
            }
            let patient = asking.elapsed() >= FORMATION_PATIENCE;
            match verdict(self.id, initial.len(), &answers, patient) {
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
                Verdict::NewCluster | Verdict::NeverStarted => {
                    if let Err(e) = self.initialise().await {
                        let why = format!("cannot initialise the cluster: {e}");
                        tracing::error!("{why}");
                        self.admission.send_replace(Admission::Refused(why));
                    }
                    return;
                }
                Verdict::Wait => {
                    tracing::info!(
                        "waiting for a majority of the initial members to answer before \
                         joining or forming a cluster"
                    );
                }
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(ASK_EVERY) => {}
                _ = stop.wait() => return,
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
            ASK_TIMEOUT,
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
                    membership_index: None,
                    seen_with_state: Vec::new(),
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

    /// Initialises this node as a member of the cluster the initial
    /// members form: every one of them a voter, the cluster id the one they
    /// all derive (recorded first). Each initial member does the same, so
    /// their first log entries are identical and no member waits for
    /// another to add it.
    pub async fn initialise(&self) -> Result<(), NodeError> {
        self.adopt_cluster_id(&self.formation_id)?;
        let members: std::collections::BTreeMap<NodeId, BasicNode> = self
            .view
            .initial_peers()
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        tracing::info!(
            members = members.len(),
            cluster = %self.formation_id,
            "initialising the cluster with every initial member as a voter"
        );
        self.admission.send_replace(Admission::Admitted);
        self.view
            .raft()
            .initialize(members)
            .await
            .map_err(|e| NodeError::Unavailable(e.to_string()))
    }

    /// While the cluster's membership is still the one it was formed with
    /// (log index 0), its leader re-commits it once it has seen every
    /// initial member take part: from then on an empty voter is always one
    /// that lost its disk (see [`verdict`]). Checks every 200 ms until the
    /// membership has moved on.
    pub async fn run_formation_seal(self: Arc<Self>, stop: Stopping) {
        let server = self.view.changes();
        loop {
            let (index, voters) = {
                let m = server.borrow();
                let config = &m.membership_config;
                (
                    config.log_id().map(|l| l.index),
                    config
                        .membership()
                        .voter_ids()
                        .collect::<std::collections::BTreeSet<_>>(),
                )
            };
            if index.is_some_and(|i| i > 0) {
                return;
            }
            let seen = self.seen.all();
            let everyone = voters.iter().all(|v| *v == self.id || seen.contains(v));
            if index == Some(0) && everyone && self.view.is_leader() {
                match self.view.raft().change_membership(voters, false).await {
                    Ok(_) => tracing::info!("every initial member took part: formation sealed"),
                    Err(e) => tracing::debug!(error = %e, "sealing the formation: retrying"),
                }
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.wait() => return,
            }
        }
    }

    /// Records `id` as this node's cluster id (before it is used).
    pub fn adopt_cluster_id(&self, id: &str) -> Result<(), NodeError> {
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

    /// Peers seen taking part in Raft with state (see `raft::seen`).
    pub fn seen(&self) -> &SeenWithState {
        &self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_state(voters: &[NodeId], index: u64, seen: &[NodeId]) -> Option<Identified> {
        Some(Identified {
            node_id: 9,
            has_state: true,
            cluster_id: Some("c1".into()),
            voters: voters.to_vec(),
            membership_index: Some(index),
            seen_with_state: seen.to_vec(),
        })
    }

    fn empty() -> Option<Identified> {
        Some(Identified {
            node_id: 9,
            has_state: false,
            cluster_id: None,
            voters: Vec::new(),
            membership_index: None,
            seen_with_state: Vec::new(),
        })
    }

    #[test]
    fn an_empty_voter_that_took_part_is_refused_one_that_never_started_starts() {
        let listed = |index, seen: &[NodeId]| with_state(&[1, 2, 3], index, seen);
        // Seen taking part: its disk was lost.
        match verdict(1, 3, &[(2, listed(0, &[1])), (3, None)], true) {
            Verdict::Refuse(why) => {
                assert!(
                    why.contains("node 2 lists it as a voter of the cluster c1"),
                    "{why}"
                );
                assert!(why.contains("arbiter cluster remove 1"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // Listed in a later membership (the formation was sealed, or it was
        // added), or by a peer of an older version: every voter there had
        // received the log.
        assert!(matches!(
            verdict(1, 3, &[(2, listed(7, &[])), (3, empty())], true),
            Verdict::Refuse(_)
        ));
        let old_peer = Identified {
            membership_index: None,
            ..listed(0, &[]).unwrap()
        };
        assert!(matches!(
            verdict(1, 3, &[(2, Some(old_peer)), (3, empty())], true),
            Verdict::Refuse(_)
        ));
        // In the first membership and seen by nobody: it never started.
        // Every member's word settles it at once; a majority's once patient.
        let all = [(2, listed(0, &[3])), (3, listed(0, &[2]))];
        assert_eq!(verdict(1, 3, &all, false), Verdict::NeverStarted);
        let some = [(2, listed(0, &[3])), (3, None)];
        assert_eq!(verdict(1, 3, &some, false), Verdict::Wait);
        assert_eq!(verdict(1, 3, &some, true), Verdict::NeverStarted);
        let few = [(2, listed(0, &[])), (3, None), (4, None), (5, None)];
        assert_eq!(verdict(1, 5, &few, true), Verdict::Wait);
        // One peer says it took part, another not: refused.
        let mixed = [(2, listed(0, &[])), (3, listed(0, &[1]))];
        assert!(matches!(verdict(1, 3, &mixed, true), Verdict::Refuse(_)));
    }

    #[test]
    fn a_new_member_joins_and_a_majority_of_empty_members_forms_a_cluster() {
        let member_list = with_state(&[1, 2, 3], 5, &[]);
        assert_eq!(
            verdict(4, 4, &[(1, member_list), (2, None)], false),
            Verdict::Join
        );
        let both = [(2, empty()), (3, empty())];
        assert_eq!(verdict(1, 3, &both, false), Verdict::NewCluster);
        // A majority (this node and one more) is enough: the third may be
        // dead, and must not hold the others back.
        let one = [(1, None), (2, empty())];
        assert_eq!(verdict(3, 3, &one, false), Verdict::NewCluster);
        let none = [(2, None), (3, None)];
        assert_eq!(verdict(1, 3, &none, true), Verdict::Wait);
        let two_of_five = [(2, empty()), (3, None), (4, None), (5, None)];
        assert_eq!(verdict(1, 5, &two_of_five, true), Verdict::Wait);
        let three_of_five = [(2, empty()), (3, empty()), (4, None), (5, None)];
        assert_eq!(verdict(1, 5, &three_of_five, false), Verdict::NewCluster);
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
