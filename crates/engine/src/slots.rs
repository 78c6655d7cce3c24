//! Rate-limit slots: every rate-limit key hashes to one of [`SLOTS`] slots,
//! and the replicated [`SlotMap`] names the member that decides each slot's
//! keys. The leader assigns the map through the log (`Command::AssignSlots`);
//! a sync entry's cells are applied only where the node that decided them
//! owns their slot, so a late sync from a former owner cannot overwrite
//! what the new owner decided.
//!
//! The slot of a key is Redis Cluster's CRC16 (XMODEM) of the key, or of
//! its hash tag, modulo [`SLOTS`]: a key holding `{...}` with at least one
//! character between the first `{` and the first `}` after it is hashed on
//! what is between them only, so `user:{42}:reads` and `user:{42}:writes`
//! share a slot. Any client computes it the same way (in Python:
//! `binascii.crc_hqx(tag, 0) % 1024`).

use serde::{Deserialize, Serialize};

/// How many slots the keys hash to (a power of two).
pub const SLOTS: usize = 1024;

/// A node id (as the Raft membership numbers members).
pub type NodeId = u64;

/// CRC16, polynomial 0x1021, initial value 0 (XMODEM): Redis Cluster's key
/// hash.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The part of `key` that is hashed: its hash tag if it has a non-empty
/// one, else the whole key.
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The slot `key` belongs to.
pub fn slot_of(key: &str) -> usize {
    usize::from(crc16(hash_tag(key).as_bytes())) & (SLOTS - 1)
}

/// Which member decides each slot's keys. Version 0, with no owners, is
/// the map before any assignment: the leader decides every key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMap {
    /// Raised by one with every assignment.
    pub version: u64,
    /// The owner of each slot, by slot; empty before the first assignment.
    pub owners: Vec<NodeId>,
    /// Members an operator drained (`arbiter cluster rebalance --drain`):
    /// given no slots while any other member can own them. Sorted.
    #[serde(default)]
    pub drained: Vec<NodeId>,
}

impl SlotMap {
    /// Whether slots have owners (otherwise the leader decides every key).
    pub fn assigned(&self) -> bool {
        self.owners.len() == SLOTS
    }

    /// The owner of `slot`, once assigned.
    pub fn owner(&self, slot: usize) -> Option<NodeId> {
        self.owners.get(slot).copied()
    }

    /// How many slots each owner has, by node id.
    pub fn counts(&self) -> std::collections::BTreeMap<NodeId, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for o in &self.owners {
            *counts.entry(*o).or_insert(0) += 1;
        }
        counts
    }

    /// The next map that spreads the slots evenly over `members` (at most
    /// one slot more on some than on others), moving as few slots as it
    /// can: a slot stays with its owner while that owner is a member and
    /// not above its share. `None` when this map is that already, or there
    /// are no members. Drained members own nothing, unless no other
    /// member is left.
    pub fn rebalanced(&self, members: &[NodeId]) -> Option<SlotMap> {
        self.rebalanced_with(members, &self.drained)
    }

    /// [`rebalanced`](Self::rebalanced) with `drained` as the drained
    /// members (the next map keeps them); `Some` also when only the
    /// drained set changes.
    pub fn rebalanced_with(&self, members: &[NodeId], drained: &[NodeId]) -> Option<SlotMap> {
        let mut drained: Vec<NodeId> = drained.to_vec();
        drained.sort_unstable();
        drained.dedup();
        let mut members: Vec<NodeId> = members.to_vec();
        members.sort_unstable();
        members.dedup();
        if members.iter().any(|m| !drained.contains(m)) {
            members.retain(|m| !drained.contains(m));
        }
        if members.is_empty() {
            return None;
        }
        let n = members.len();
        // The first `SLOTS % n` members (by id) take one slot more.
        let share = |i: usize| SLOTS / n + usize::from(i < SLOTS % n);
        let index = |id: NodeId| members.binary_search(&id).ok();
        let mut held = vec![0usize; n];
        let mut owners: Vec<Option<NodeId>> = vec![None; SLOTS];
        if self.assigned() {
            for (slot, owner) in self.owners.iter().enumerate() {
                if let Some(i) = index(*owner) {
                    if held[i] < share(i) {
                        held[i] += 1;
                        owners[slot] = Some(*owner);
                    }
                }
            }
        }
        let mut next = 0;
        let owners: Vec<NodeId> = owners
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    while held[next] >= share(next) {
                        next += 1;
                    }
                    held[next] += 1;
                    members[next]
                })
            })
            .collect();
        (owners != self.owners || drained != self.drained).then(|| SlotMap {
            version: self.version + 1,
            owners,
            drained,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters_modulo_the_slot_count() {
        // Redis Cluster's documented CRC16 check value.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        // Redis: CLUSTER KEYSLOT foo = 12182, bar = 5061.
        assert_eq!(slot_of("foo"), 12182 % SLOTS);
        assert_eq!(slot_of("bar"), 5061 % SLOTS);
    }

    #[test]
    fn a_hash_tag_picks_what_is_hashed() {
        assert_eq!(hash_tag("user:{42}:reads"), "42");
        assert_eq!(slot_of("user:{42}:reads"), slot_of("user:{42}:writes"));
        assert_eq!(slot_of("{42}"), slot_of("42"));
        // Only the first tag counts; an empty one means no tag.
        assert_eq!(hash_tag("{a}{b}"), "a");
        assert_eq!(hash_tag("x{}y{z}"), "x{}y{z}");
        assert_eq!(hash_tag("{unclosed"), "{unclosed");
        assert_eq!(hash_tag("}{a}"), "a");
    }

    #[test]
    fn rebalancing_spreads_evenly_and_moves_only_what_it_must() {
        let first = SlotMap::default().rebalanced(&[3, 1, 2]).unwrap();
        assert_eq!(first.version, 1);
        let counts = first.counts();
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            [342, 341, 341]
        );
        assert_eq!(first.rebalanced(&[1, 2, 3]), None, "already balanced");
        // Node 3 leaves: only its slots move, half to each of the others.
        let two = first.rebalanced(&[1, 2]).unwrap();
        assert_eq!(two.version, 2);
        assert_eq!(
            two.counts().values().copied().collect::<Vec<_>>(),
            [512, 512]
        );
        for (slot, owner) in first.owners.iter().enumerate() {
            if *owner != 3 {
                assert_eq!(
                    two.owner(slot),
                    Some(*owner),
                    "slot {slot} moved needlessly"
                );
            }
        }
        // It comes back: it takes slots only from those above their share.
        let drained = first.rebalanced_with(&[1, 2, 3], &[3]).unwrap();
        assert_eq!(drained.drained, [3]);
        assert_eq!(drained.owners, two.owners, "as if 3 were gone");
        assert_eq!(drained.rebalanced(&[1, 2, 3]), None, "a drain stays");
        let alone = drained.rebalanced_with(&[3], &[3]).unwrap();
        assert_eq!(
            alone.counts().get(&3),
            Some(&SLOTS),
            "unless no one else is left"
        );
        let restored = drained.rebalanced_with(&[1, 2, 3], &[]).unwrap();
        assert!(restored.drained.is_empty());
        assert_eq!(restored.counts().get(&3), Some(&341));
        let back = two.rebalanced(&[1, 2, 3]).unwrap();
        let moved = (0..SLOTS)
            .filter(|s| back.owner(*s) != two.owner(*s))
            .count();
        assert_eq!(moved, 341);
        assert_eq!(SlotMap::default().rebalanced(&[]), None);
    }
}
