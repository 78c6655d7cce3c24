//! Slot ownership: which member decides which rate-limit keys.
//!
//! Keys hash to slots (`engine::slots`); the replicated slot map names each
//! slot's owner. Before the first map is assigned, and always with
//! `--slot-owners leader`, the leader decides every key under its leader
//! lease, as before slots existed. With `--slot-owners spread` the leader
//! spreads the slots over the voters it hears from, and each owner decides
//! its slots' keys locally, under a **slot lease**:
//!
//! - An owner that is not the leader asks the leader every
//!   [`SLOT_RENEW_MS`] ([`SlotRequest::Lease`]), noting on its monotonic
//!   clock when it sent the request. The leader grants only while it
//!   holds its own leader lease, and says from which map version on the
//!   grant counts. The owner then decides, until [`DECIDE_MS`] after it
//!   sent the request, the slots that the map it has applied gives it, if
//!   that map's version is at least the granted one.
//! - The leader moves a slot away from its owner only [`LEADER_LEASE_MS`]
//!   (`timing::DRIFT_MARGIN_MS` more than `DECIDE_MS`) after the last grant
//!   that covered it: from the moment it decides on a move, the owners
//!   that lose slots are granted only the new version, which they cannot
//!   use until they have applied it. A leader's own slots follow the same
//!   rule, from when it stopped deciding them. A new leader cannot know
//!   what its predecessor granted (all before its election), so it counts
//!   every voter as granted when it takes over.
//! - So by the time the new owner applies the map, the old owner's lease
//!   has lapsed: at most one node decides a slot at any moment.
//!
//! An owner whose grants stop (dead, cut off, paused) keeps its slots until
//! `LEADER_LEASE_MS` after its last grant; then the leader moves them to
//! the voters it still hears from.
//!
//! Owners replicate what they decided through the log, as the leader does:
//! a follower's sync goes to the leader ([`SlotRequest::Sync`]), which
//! proposes it tagged with the owner's node id and boot id. The engine
//! applies a synced cell only where its decider owns the slot, so a sync
//! that commits after its slot moved is dropped (what it carried is
//! forgotten: the same bound as a leader failover).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::leadership::Leadership;
use super::proposer::Proposer;
use super::tasks::Stopping;
use super::timekeeping::Timekeeper;
use super::view::View;
use crate::engine::{slot_of, Cell, Command, Engine, LimitCheck, SlotMap};
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::raft::network::{decode, encode, with_cluster, Channels, ClusterId, PEER_MESSAGE_LIMIT};
use crate::raft::{codec, NodeId, Request};
pub use crate::timing::{DECIDE_MS, LEADER_LEASE_MS};

/// How often an owner renews its slot lease (and the leader looks at the
/// map).
pub const SLOT_RENEW_MS: u64 = 50;

/// How the rate-limit slots are owned (`--slot-owners`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotOwners {
    /// The leader decides every key (no map is ever assigned).
    #[default]
    Leader,
    /// The leader spreads the slots over the voters.
    Spread,
}

/// What a member asks the leader about slots (the `Slots` peer RPC).
#[derive(Debug, Serialize, Deserialize)]
pub enum SlotRequest {
    /// A slot lease for `node`'s slots.
    Lease { node: NodeId },
    /// Propose `node`'s rate-limit sync (the cells travel in the message's
    /// `data`, as a log command), tagged with the boot id of the process
    /// that decided them.
    Sync { node: NodeId, boot_id: u64 },
}

/// The leader's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum SlotReply {
    /// Granted for the maps of at least this version; `now_ms` is the
    /// leader's time when it granted (the owner decides by it).
    Granted {
        min_version: u64,
        #[serde(default)]
        now_ms: u64,
    },
    /// The sync committed.
    Synced,
    /// Not granted, or not proposed: why.
    Refused(String),
}

/// The owner's side: the grant it holds.
#[derive(Clone, Copy, Default)]
struct OwnerLease {
    min_version: u64,
    /// Monotonic ms until which it may decide.
    until_ms: u64,
}

/// The leader's side: what it granted to whom, in one term.
#[derive(Default)]
struct Book {
    term: u64,
    /// When (monotonic ms) this leader began keeping the book: the latest
    /// any earlier leader can have granted anything.
    started_ms: u64,
    peers: HashMap<NodeId, Heard>,
    /// When this leader stopped deciding the slots the pending map takes
    /// from it.
    pending_since_ms: u64,
}

#[derive(Clone, Copy)]
struct Heard {
    /// The last lease request from it.
    asked_ms: u64,
    /// The last grant that covered the applied map.
    granted_ms: u64,
}

pub struct Slots {
    view: View,
    leadership: Arc<Leadership>,
    engine: Arc<Engine>,
    proposer: Proposer,
    time: Arc<Timekeeper>,
    channels: Channels,
    cluster: ClusterId,
    owners: SlotOwners,
    lease: Mutex<OwnerLease>,
    book: Mutex<Book>,
    /// The map this leader has decided on and not yet seen applied.
    pending: RwLock<Option<Arc<SlotMap>>>,
    /// The drained members an operator asked this leader for, and in
    /// which term, until a map holding them is applied (then the map's own
    /// set counts). Kept across the book's opening: asked for early in a
    /// term, it may come before the book is.
    wanted: Mutex<Option<(u64, Vec<NodeId>)>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The slots whose owner differs between `from` and `to`, by old owner.
fn losers(from: &SlotMap, to: &SlotMap) -> BTreeSet<NodeId> {
    if !from.assigned() {
        return BTreeSet::new();
    }
    (0..from.owners.len())
        .filter(|s| from.owner(*s) != to.owner(*s))
        .filter_map(|s| from.owner(s))
        .collect()
}

impl Slots {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        view: View,
        leadership: Arc<Leadership>,
        engine: Arc<Engine>,
        proposer: Proposer,
        time: Arc<Timekeeper>,
        channels: Channels,
        cluster: ClusterId,
        owners: SlotOwners,
    ) -> Self {
        Self {
            view,
            leadership,
            engine,
            proposer,
            time,
            channels,
            cluster,
            owners,
            lease: Mutex::default(),
            book: Mutex::default(),
            pending: RwLock::default(),
            wanted: Mutex::default(),
        }
    }

    /// At the leader: from now on, spreads the slots over the voters but
    /// `drained` (`arbiter cluster rebalance`).
    pub fn want_drained(&self, drained: Vec<NodeId>) {
        let term = self.view.term_and_leading().0;
        *locked(&self.wanted) = Some((term, drained));
    }

    /// Whether the slots are spread over the voters (`--slot-owners spread`).
    pub fn spread(&self) -> bool {
        self.owners == SlotOwners::Spread
    }

    /// Whether this node may decide every one of `checks` now, by the map
    /// `map` (assigned): it owns each key's slot and holds its slot lease
    /// (as leader: its leader lease, and no move of the slot pending).
    pub fn may_decide(&self, map: &SlotMap, checks: &[LimitCheck]) -> bool {
        self.may_decide_keys(map, || checks.iter().map(|c| c.key.as_str()))
    }

    /// [`may_decide`](Self::may_decide) for the keys `keys` yields.
    pub fn may_decide_keys<'k, I: Iterator<Item = &'k str>>(
        &self,
        map: &SlotMap,
        keys: impl Fn() -> I,
    ) -> bool {
        let me = self.view.id();
        if !keys().all(|k| map.owner(slot_of(k)) == Some(me)) {
            return false;
        }
        if self.view.is_leader() {
            let pending = self.pending.read().unwrap_or_else(|e| e.into_inner());
            return self.leadership.may_decide()
                && pending
                    .as_ref()
                    .is_none_or(|p| keys().all(|k| p.owner(slot_of(k)) == Some(me)));
        }
        let lease = *locked(&self.lease);
        lease.min_version <= map.version && self.leadership.mono_ms() < lease.until_ms
    }

    /// At the leader: a lease request from `from`.
    pub fn grant(&self, from: NodeId) -> SlotReply {
        if self.owners != SlotOwners::Spread {
            return SlotReply::Refused("this leader does not spread slots".into());
        }
        if !self.leadership.may_decide() {
            return SlotReply::Refused("not the leader, or not holding its leader lease".into());
        }
        if !self.view.voters().contains(&from) {
            return SlotReply::Refused(format!("node {from} is not a voter"));
        }
        let map = self.engine.slots();
        let pending = self
            .pending
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now = self.leadership.mono_ms();
        let mut book = locked(&self.book);
        self.open_book(&mut book, now);
        let started = book.started_ms;
        let heard = book.peers.entry(from).or_insert(Heard {
            asked_ms: now,
            granted_ms: started,
        });
        heard.asked_ms = now;
        match pending {
            Some(p) if losers(&map, &p).contains(&from) => SlotReply::Granted {
                min_version: p.version,
                now_ms: self.time.now_ms(),
            },
            _ => {
                heard.granted_ms = now;
                SlotReply::Granted {
                    min_version: map.version,
                    now_ms: self.time.now_ms(),
                }
            }
        }
    }

    /// Starts the book over in a new term: every voter counts as granted
    /// and heard from now.
    fn open_book(&self, book: &mut Book, now: u64) {
        let term = self.view.term_and_leading().0;
        if book.term == term {
            return;
        }
        *book = Book {
            term,
            started_ms: now,
            peers: self
                .view
                .voters()
                .into_iter()
                .map(|v| {
                    (
                        v,
                        Heard {
                            asked_ms: now,
                            granted_ms: now,
                        },
                    )
                })
                .collect(),
            pending_since_ms: now,
        };
        *self.pending.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// At the leader, every [`SLOT_RENEW_MS`]: spreads the slots over the
    /// voters it hears from, proposing a new map once every owner that
    /// loses slots can no longer decide them.
    async fn rebalance(&self) {
        if self.owners != SlotOwners::Spread || !self.view.is_leader() {
            return;
        }
        // A new leader first applies everything committed before its
        // term (nothing else may have made it ready yet).
        if !self.leadership.may_decide() && self.leadership.ready_to_decide().await.is_err() {
            return;
        }
        if !self.leadership.may_decide() {
            return;
        }
        let me = self.view.id();
        let map = self.engine.slots();
        let now = self.leadership.mono_ms();
        let (next, due) = {
            let mut book = locked(&self.book);
            self.open_book(&mut book, now);
            let live: Vec<NodeId> = self
                .view
                .voters()
                .into_iter()
                .filter(|v| {
                    *v == me
                        || book
                            .peers
                            .get(v)
                            .is_some_and(|h| now.saturating_sub(h.asked_ms) < LEADER_LEASE_MS)
                })
                .collect();
            let mut pending = self.pending.write().unwrap_or_else(|e| e.into_inner());
            let term = self.view.term_and_leading().0;
            let drained = match &*locked(&self.wanted) {
                Some((t, wanted)) if *t == term => wanted.clone(),
                _ => map.drained.clone(),
            };
            let Some(next) = map.rebalanced_with(&live, &drained) else {
                *pending = None;
                return;
            };
            if pending.as_deref() != Some(&next) {
                tracing::info!(
                    version = next.version,
                    members = ?live,
                    "moving rate-limit slots"
                );
                *pending = Some(Arc::new(next.clone()));
                book.pending_since_ms = now;
            }
            let due = losers(&map, &next)
                .into_iter()
                .map(|l| {
                    if l == me {
                        book.pending_since_ms
                    } else {
                        book.peers.get(&l).map_or(book.started_ms, |h| h.granted_ms)
                    }
                })
                .max()
                .map_or(0, |t| t + LEADER_LEASE_MS);
            (next, due)
        };
        if now < due {
            return;
        }
        match self.proposer.propose(Command::AssignSlots(next)).await {
            Ok(_) => {
                let applied = self.engine.slots();
                let mut pending = self.pending.write().unwrap_or_else(|e| e.into_inner());
                if pending
                    .as_ref()
                    .is_some_and(|p| p.version <= applied.version)
                {
                    *pending = None;
                }
                let mut wanted = locked(&self.wanted);
                if wanted.as_ref().is_some_and(|w| w.1 == applied.drained) {
                    *wanted = None;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not assign rate-limit slots"),
        }
    }

    /// At the leader: proposes an owner's sync.
    pub async fn accept_sync(&self, from: NodeId, boot_id: u64, cells: Command) -> SlotReply {
        if !self.view.is_leader() {
            return SlotReply::Refused("not the leader".into());
        }
        if !self.view.voters().contains(&from) {
            return SlotReply::Refused(format!("node {from} is not a voter"));
        }
        let command = match cells {
            Command::SyncCells { cells, .. } => Command::SyncCells {
                cells,
                decider: Some(from),
            },
            Command::SyncBreakers { breakers, .. } => Command::SyncBreakers {
                breakers,
                decider: Some(from),
            },
            _ => return SlotReply::Refused("not a sync".into()),
        };
        let request = Request {
            now_ms: self.time.stamp(),
            commands: vec![command],
            sync_origin: Some(boot_id),
        };
        match self.view.raft().client_write(request).await {
            Ok(_) => SlotReply::Synced,
            Err(e) => SlotReply::Refused(e.to_string()),
        }
    }

    /// At an owner that does not lead: sends its sync to the leader, and
    /// waits until it commits.
    pub async fn send_sync(&self, boot_id: u64, cells: Vec<(String, Cell)>) -> Result<(), String> {
        let me = self.view.id();
        self.send_sync_command(
            boot_id,
            Command::SyncCells {
                cells,
                decider: Some(me),
            },
        )
        .await
    }

    /// [`send_sync`](Self::send_sync) for any sync command (cells or
    /// circuit breakers).
    pub async fn send_sync_command(&self, boot_id: u64, command: Command) -> Result<(), String> {
        let me = self.view.id();
        let mut message = encode(&SlotRequest::Sync { node: me, boot_id });
        message.data = codec::encode_command(&command);
        match self.ask_leader(message, Duration::from_secs(2)).await? {
            SlotReply::Synced => Ok(()),
            SlotReply::Refused(why) => Err(why),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    async fn ask_leader(
        &self,
        message: crate::proto::PeerMessage,
        timeout: Duration,
    ) -> Result<SlotReply, String> {
        let leader = self.view.leader().ok_or("no leader")?;
        let addr = self
            .view
            .addr_of(leader)
            .ok_or_else(|| format!("no address for leader {leader}"))?;
        let channel = self.channels.get(&addr).map_err(|e| e.to_string())?;
        let mut client = RaftPeerClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_LIMIT)
            .max_encoding_message_size(PEER_MESSAGE_LIMIT);
        let reply = client
            .slots(with_cluster(message, &self.cluster, timeout))
            .await
            .map_err(|s| format!("leader {leader} at {addr}: {}", s.message()))?;
        decode(&reply.into_inner()).map_err(|e| e.to_string())
    }

    /// At an owner that does not lead: renews its slot lease.
    async fn renew(&self) {
        let me = self.view.id();
        if self.view.is_leader() || !self.view.voters().contains(&me) {
            return;
        }
        let sent = self.leadership.mono_ms();
        let ask = encode(&SlotRequest::Lease { node: me });
        match self.ask_leader(ask, Duration::from_millis(DECIDE_MS)).await {
            Ok(SlotReply::Granted {
                min_version,
                now_ms,
            }) => {
                // A leader too old to send its time: the log's will do.
                let leader_ms = if now_ms > 0 {
                    now_ms
                } else {
                    self.time.now_ms()
                };
                self.time.follow_grant(leader_ms);
                // Requests go one at a time, so this is the newest grant;
                // it replaces the last (a higher version takes effect at
                // once: the slots it takes away are no longer decided).
                *locked(&self.lease) = OwnerLease {
                    min_version,
                    until_ms: sent + DECIDE_MS,
                };
            }
            Ok(SlotReply::Refused(why)) => tracing::debug!(%why, "slot lease refused"),
            Ok(other) => tracing::debug!(?other, "unexpected slot lease reply"),
            Err(e) => tracing::debug!(error = %e, "slot lease request failed"),
        }
    }

    /// Renews this node's slot lease (when it does not lead) and, when it
    /// leads, keeps the slots spread. Ends when told to stop.
    pub async fn run(self: Arc<Self>, stop: Stopping) {
        if self.owners != SlotOwners::Spread {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(SLOT_RENEW_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.wait() => return,
                _ = tick.tick() => {}
            }
            tokio::select! {
                biased;
                _ = stop.wait() => return,
                _ = async {
                    self.renew().await;
                    self.rebalance().await;
                } => {}
            }
        }
    }
}
