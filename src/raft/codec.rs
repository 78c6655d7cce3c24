//! The log entry format: a prost [`log_proto::Entry`] behind a format byte,
//! as stored in the log and sent to followers.
//!
//! Entries written before this format are JSON; [`decode_entry`] still reads
//! them (see `legacy`), so a data directory of an earlier release needs no
//! migration: its entries are read as they are, and compaction replaces
//! them with new ones over time.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, CommittedLeaderId, EntryPayload};
use prost::Message;

use super::{compat, Entry, LogId, NodeId, Request};
use crate::engine::{self as e, Cell, Command};
use crate::log_proto as pb;

/// The first byte of a binary entry. A JSON entry starts with `{`.
const FORMAT_PROTO: u8 = 0xA2;

/// An entry's bytes.
pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    let message = to_proto(entry);
    let mut out = Vec::with_capacity(1 + message.encoded_len());
    out.push(FORMAT_PROTO);
    message
        .encode(&mut out)
        .expect("a Vec grows to fit any message");
    out
}

/// An entry from bytes written by [`encode_entry`], or by an earlier
/// release (JSON).
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, String> {
    match bytes.first() {
        Some(&FORMAT_PROTO) => {
            let message = pb::Entry::decode(&bytes[1..]).map_err(|e| e.to_string())?;
            from_proto(message)
        }
        Some(b'{') => compat::decode_entry(bytes),
        Some(b) => Err(format!("unknown log entry format (first byte {b:#04x})")),
        None => Err("empty log entry".into()),
    }
}

/// One command's bytes, in the log's format (for a sync an owner sends
/// its leader to propose).
pub fn encode_command(command: &Command) -> Vec<u8> {
    command_to_proto(command).encode_to_vec()
}

/// A command from [`encode_command`]'s bytes.
pub fn decode_command(bytes: &[u8]) -> Result<Command, String> {
    command_from_proto(pb::Command::decode(bytes).map_err(|e| e.to_string())?)
}

fn to_proto(entry: &Entry) -> pb::Entry {
    let payload = match &entry.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(r) => pb::entry::Payload::Normal(pb::Batch {
            now_ms: r.now_ms,
            commands: r.commands.iter().map(command_to_proto).collect(),
            sync_origin: r.sync_origin,
        }),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(pb::Membership {
            configs: m
                .get_joint_config()
                .iter()
                .map(|ids| pb::VoterSet {
                    ids: ids.iter().copied().collect(),
                })
                .collect(),
            nodes: m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
        }),
    };
    pb::Entry {
        term: entry.log_id.leader_id.term,
        leader: entry.log_id.leader_id.node_id,
        index: entry.log_id.index,
        payload: Some(payload),
    }
}

fn from_proto(m: pb::Entry) -> Result<Entry, String> {
    let payload = match m.payload.ok_or("log entry without a payload")? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Normal(b) => EntryPayload::Normal(Request {
            now_ms: b.now_ms,
            commands: b
                .commands
                .into_iter()
                .map(command_from_proto)
                .collect::<Result<_, _>>()?,
            sync_origin: b.sync_origin,
        }),
        pb::entry::Payload::Membership(m) => {
            let configs: Vec<BTreeSet<NodeId>> = m
                .configs
                .into_iter()
                .map(|c| c.ids.into_iter().collect())
                .collect();
            let nodes: BTreeMap<NodeId, BasicNode> = m
                .nodes
                .into_iter()
                .map(|(id, addr)| (id, BasicNode::new(addr)))
                .collect();
            EntryPayload::Membership(openraft::Membership::new(configs, nodes))
        }
    };
    Ok(Entry {
        log_id: LogId::new(CommittedLeaderId::new(m.term, m.leader), m.index),
        payload,
    })
}

fn command_to_proto(c: &Command) -> pb::Command {
    use pb::command::Op;
    let op = match c {
        Command::SyncCells { cells, decider } => Op::SyncCells(pb::SyncCells {
            decider: *decider,
            cells: cells
                .iter()
                .map(|(key, cell)| {
                    let (tag, aux, a, b, c) = cell.to_parts();
                    pb::Cell {
                        key: key.clone(),
                        tag,
                        aux,
                        a,
                        b,
                        c,
                    }
                })
                .collect(),
        }),
        Command::Acquire(o) => Op::Acquire(pb::Acquire {
            name: o.name.clone(),
            holder: o.holder.clone(),
            ttl_ms: o.ttl_ms,
            principal: o.principal.clone(),
            quota: o.quota,
        }),
        Command::Renew(o) => Op::Renew(pb::Renew {
            name: o.name.clone(),
            holder: o.holder.clone(),
            fencing_token: o.fencing_token,
            ttl_ms: o.ttl_ms,
            principal: o.principal.clone(),
        }),
        Command::Release(o) => Op::Release(pb::Release {
            name: o.name.clone(),
            holder: o.holder.clone(),
            fencing_token: o.fencing_token,
            principal: o.principal.clone(),
        }),
        Command::Begin(o) => Op::Begin(pb::Begin {
            key: o.key.clone(),
            fingerprint: o.fingerprint.clone(),
            lock_ttl_ms: o.lock_ttl_ms,
            retention_ms: o.retention_ms,
            principal: o.principal.clone(),
            record_quota: o.quota.records,
            byte_quota: o.quota.bytes,
        }),
        Command::Complete(o) => Op::Complete(pb::Complete {
            key: o.key.clone(),
            attempt: o.attempt,
            response: o.response.clone(),
            principal: o.principal.clone(),
            byte_quota: o.byte_quota,
        }),
        Command::Abort(o) => Op::Abort(pb::Abort {
            key: o.key.clone(),
            attempt: o.attempt,
            principal: o.principal.clone(),
        }),
        Command::Sweep => Op::Sweep(pb::Sweep {}),
        Command::ExtendLeases { by_ms } => Op::ExtendLeases(pb::ExtendLeases { by_ms: *by_ms }),
        Command::AssignSlots(map) => Op::AssignSlots(pb::AssignSlots {
            version: map.version,
            owners: map.owners.clone(),
            drained: map.drained.clone(),
        }),
        Command::SemAcquire(o) => Op::SemAcquire(pb::SemAcquire {
            name: o.name.clone(),
            holder: o.holder.clone(),
            limit: o.limit,
            permits: o.permits,
            ttl_ms: o.ttl_ms,
            principal: o.principal.clone(),
            quota: o.quota,
        }),
        Command::SemRenew(o) => Op::SemRenew(pb::SemRenew {
            name: o.name.clone(),
            holder: o.holder.clone(),
            fencing_token: o.fencing_token,
            ttl_ms: o.ttl_ms,
            principal: o.principal.clone(),
        }),
        Command::SemRelease(o) => Op::SemRelease(pb::SemRelease {
            name: o.name.clone(),
            holder: o.holder.clone(),
            fencing_token: o.fencing_token,
            principal: o.principal.clone(),
        }),
        Command::SyncBreakers { breakers, decider } => Op::SyncBreakers(pb::SyncBreakers {
            decider: *decider,
            breakers: breakers
                .iter()
                .map(|(n, b)| breaker_to_proto(n, b))
                .collect(),
        }),
    };
    pb::Command { op: Some(op) }
}

/// A circuit breaker as log entries and snapshots carry it.
pub(crate) fn breaker_to_proto(name: &str, b: &e::Breaker) -> pb::Breaker {
    pb::Breaker {
        name: name.to_owned(),
        phase: match b.phase {
            e::Phase::Closed => 0,
            e::Phase::Open => 1,
            e::Phase::HalfOpen => 2,
        },
        since_ms: b.since_ms,
        open_until_ms: b.open_until_ms,
        window_start_ms: b.window_start_ms,
        window_ms: b.window_ms,
        calls: b.calls.to_vec(),
        failures: b.failures.to_vec(),
        probes: b
            .probes
            .iter()
            .map(|p| pb::Probe {
                token: p.token,
                until_ms: p.until_ms,
            })
            .collect(),
        probe_successes: b.probe_successes,
        last_token: b.last_token,
        seen_ms: b.seen_ms,
    }
}

/// [`breaker_to_proto`]'s inverse; an error for a state no breaker has.
pub(crate) fn breaker_from_proto(b: pb::Breaker) -> Result<(String, e::Breaker), String> {
    let phase = match b.phase {
        0 => e::Phase::Closed,
        1 => e::Phase::Open,
        2 => e::Phase::HalfOpen,
        other => return Err(format!("breaker {:?}: unknown phase {other}", b.name)),
    };
    let pair = |v: &[u32], what: &str| -> Result<[u32; 2], String> {
        match v {
            [] => Ok([0, 0]),
            [a, b] => Ok([*a, *b]),
            _ => Err(format!("breaker {what}: {} windows, not 2", v.len())),
        }
    };
    if b.probes.len() > e::breakers::MAX_PROBES as usize {
        return Err(format!("breaker {:?}: {} probes", b.name, b.probes.len()));
    }
    let breaker = e::Breaker {
        phase,
        since_ms: b.since_ms,
        open_until_ms: b.open_until_ms,
        window_start_ms: b.window_start_ms,
        window_ms: b.window_ms,
        calls: pair(&b.calls, "calls")?,
        failures: pair(&b.failures, "failures")?,
        probes: b
            .probes
            .iter()
            .map(|p| e::breakers::Probe {
                token: p.token,
                until_ms: p.until_ms,
            })
            .collect(),
        probe_successes: b.probe_successes,
        last_token: b.last_token,
        seen_ms: b.seen_ms,
    };
    Ok((b.name, breaker))
}

fn command_from_proto(c: pb::Command) -> Result<Command, String> {
    use pb::command::Op;
    Ok(match c.op.ok_or("log command without an operation")? {
        Op::SyncCells(s) => Command::SyncCells {
            decider: s.decider,
            cells: s
                .cells
                .into_iter()
                .map(|c| (c.key, Cell::from_parts((c.tag, c.aux, c.a, c.b, c.c))))
                .collect(),
        },
        Op::Acquire(o) => Command::Acquire(e::Acquire {
            name: o.name,
            holder: o.holder,
            ttl_ms: o.ttl_ms,
            principal: o.principal,
            quota: o.quota,
        }),
        Op::Renew(o) => Command::Renew(e::Renew {
            name: o.name,
            holder: o.holder,
            fencing_token: o.fencing_token,
            ttl_ms: o.ttl_ms,
            principal: o.principal,
        }),
        Op::Release(o) => Command::Release(e::Release {
            name: o.name,
            holder: o.holder,
            fencing_token: o.fencing_token,
            principal: o.principal,
        }),
        Op::Begin(o) => Command::Begin(e::Begin {
            principal: o.principal,
            key: o.key,
            fingerprint: o.fingerprint,
            lock_ttl_ms: o.lock_ttl_ms,
            retention_ms: o.retention_ms,
            quota: e::RecordQuota {
                records: o.record_quota,
                bytes: o.byte_quota,
            },
        }),
        Op::Complete(o) => Command::Complete(e::Complete {
            principal: o.principal,
            key: o.key,
            attempt: o.attempt,
            response: o.response,
            byte_quota: o.byte_quota,
        }),
        Op::SemAcquire(o) => Command::SemAcquire(e::SemAcquire {
            name: o.name,
            holder: o.holder,
            limit: o.limit,
            permits: o.permits,
            ttl_ms: o.ttl_ms,
            principal: o.principal,
            quota: o.quota,
        }),
        Op::SemRenew(o) => Command::SemRenew(e::SemRenew {
            name: o.name,
            holder: o.holder,
            fencing_token: o.fencing_token,
            ttl_ms: o.ttl_ms,
            principal: o.principal,
        }),
        Op::SemRelease(o) => Command::SemRelease(e::SemRelease {
            name: o.name,
            holder: o.holder,
            fencing_token: o.fencing_token,
            principal: o.principal,
        }),
        Op::Abort(o) => Command::Abort(e::Abort {
            principal: o.principal,
            key: o.key,
            attempt: o.attempt,
        }),
        Op::SyncBreakers(s) => Command::SyncBreakers {
            decider: s.decider,
            breakers: s
                .breakers
                .into_iter()
                .map(breaker_from_proto)
                .collect::<Result<_, _>>()?,
        },
        Op::Sweep(_) => Command::Sweep,
        Op::ExtendLeases(o) => Command::ExtendLeases { by_ms: o.by_ms },
        Op::AssignSlots(o) => Command::AssignSlots(e::SlotMap {
            version: o.version,
            owners: o.owners,
            drained: o.drained,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(3, 2), index)
    }

    fn sync_entry(cells: usize) -> Entry {
        Entry {
            log_id: log_id(9),
            payload: EntryPayload::Normal(Request {
                now_ms: 1_700_000_000_000,
                commands: vec![Command::SyncCells {
                    cells: (0..cells)
                        .map(|i| {
                            let cell =
                                Cell::from_parts((1, 0, 7, 1_700_000_000_000, 1_700_000_360_000));
                            (format!("tenant:42:user:{i}"), cell)
                        })
                        .collect(),
                    decider: Some(3),
                }],
                sync_origin: Some(77),
            }),
        }
    }

    fn lease_entry() -> Entry {
        Entry {
            log_id: log_id(10),
            payload: EntryPayload::Normal(Request {
                now_ms: 1_700_000_000_000,
                commands: vec![Command::Acquire(e::Acquire {
                    quota: Default::default(),
                    principal: String::new(),
                    name: "orders-leader".into(),
                    holder: "orders-7f9c-0".into(),
                    ttl_ms: 10_000,
                })],
                sync_origin: None,
            }),
        }
    }

    #[test]
    fn every_payload_round_trips() {
        let membership = openraft::Membership::new(
            vec![[1, 2, 3].into(), [1, 2].into()],
            BTreeMap::from([
                (1, BasicNode::new("a:7071")),
                (2, BasicNode::new("b:7071")),
                (3, BasicNode::new("c:7071")),
                (4, BasicNode::new("learner:7071")),
            ]),
        );
        let commands = vec![
            Command::Acquire(e::Acquire {
                quota: Some(3),
                principal: "alice".into(),
                name: "n".into(),
                holder: "h".into(),
                ttl_ms: 5,
            }),
            Command::Renew(e::Renew {
                principal: String::new(),
                name: "n".into(),
                holder: "h".into(),
                fencing_token: 4,
                ttl_ms: 5,
            }),
            Command::Release(e::Release {
                principal: String::new(),
                name: "n".into(),
                holder: "h".into(),
                fencing_token: 4,
            }),
            Command::Begin(e::Begin {
                quota: e::RecordQuota {
                    records: Some(0),
                    bytes: Some(9),
                },
                key: "k".into(),
                fingerprint: vec![0, 255],
                lock_ttl_ms: 1,
                retention_ms: 2,
                principal: "alice".into(),
            }),
            Command::Complete(e::Complete {
                byte_quota: Some(1 << 40),
                key: "k".into(),
                attempt: 3,
                response: b"ok".to_vec(),
                principal: "alice".into(),
            }),
            Command::Abort(e::Abort {
                key: "k".into(),
                attempt: 3,
                principal: String::new(),
            }),
            Command::Sweep,
            Command::ExtendLeases { by_ms: 400 },
            Command::SemAcquire(e::SemAcquire {
                name: "db".into(),
                holder: "pod-a".into(),
                limit: 10,
                permits: 2,
                ttl_ms: 5000,
                principal: "alice".into(),
                quota: Some(7),
            }),
            Command::SemRenew(e::SemRenew {
                name: "db".into(),
                holder: "pod-a".into(),
                fencing_token: 9,
                ttl_ms: 5000,
                principal: String::new(),
            }),
            Command::SemRelease(e::SemRelease {
                name: "db".into(),
                holder: "pod-a".into(),
                fencing_token: 9,
                principal: "alice".into(),
            }),
            Command::SyncBreakers {
                breakers: vec![(
                    "payments".into(),
                    e::Breaker {
                        phase: e::Phase::HalfOpen,
                        since_ms: 3,
                        window_start_ms: 1000,
                        window_ms: 500,
                        calls: [4, 7],
                        failures: [1, 2],
                        probes: vec![e::breakers::Probe {
                            token: 6,
                            until_ms: 99,
                        }],
                        probe_successes: 1,
                        last_token: 6,
                        seen_ms: 1200,
                        ..Default::default()
                    },
                )],
                decider: Some(2),
            },
        ];
        let entries = [
            Entry {
                log_id: log_id(1),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(2),
                payload: EntryPayload::Membership(membership),
            },
            Entry {
                log_id: log_id(3),
                payload: EntryPayload::Normal(Request {
                    now_ms: 5,
                    commands,
                    sync_origin: None,
                }),
            },
            sync_entry(3),
            lease_entry(),
        ];
        for entry in entries {
            assert_eq!(decode_entry(&encode_entry(&entry)).unwrap(), entry);
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(decode_entry(&[]).is_err());
        assert!(decode_entry(&[0x07, 1, 2]).is_err());
        assert!(decode_entry(&[FORMAT_PROTO, 0xff, 0xff]).is_err());
        // A well-formed message without a payload.
        let mut empty = vec![FORMAT_PROTO];
        pb::Entry::default().encode(&mut empty).unwrap();
        assert!(decode_entry(&empty).is_err());
    }

    /// The binary format is smaller than the JSON one it replaces: a lease
    /// write, and a sync entry of 10,000 cells. (The JSON figure for syncs
    /// is today's serde encoding of the same entry, which is an upper bound
    /// on the earlier packed-and-base64 form; BENCHMARKS.md has both.)
    #[test]
    fn entries_are_smaller_than_their_json() {
        for entry in [lease_entry(), sync_entry(10_000)] {
            let binary = encode_entry(&entry).len();
            let json = serde_json::to_vec(&entry).unwrap().len();
            assert!(binary < json, "{binary} bytes binary, {json} JSON");
        }
    }
}
