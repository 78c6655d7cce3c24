//! Every reader of an earlier release's formats, in one place, to be
//! deleted together in the release that stops reading them (see
//! `docs/design.md`, "Formats"). Nothing is written in them any more:
//! - log entries in the first format (JSON), as earlier releases stored
//!   them and as their leaders send them ([`decode_entry`],
//!   [`LegacyEntry`]);
//! - a snapshot kept in the store as one JSON document
//!   ([`snapshot_bytes`], [`decode_snapshot`]), rewritten as a snapshot
//!   file at start.
//!
//! The first format of entries differs from today's JSON encoding of the same types in one place: a
//! rate-limit sync's cells were one base64 string of packed varints (the
//! key's length, the key, then the cell's five words).

use openraft::{BasicNode, EntryPayload};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::{Entry, LogId, NodeId, Request};
use crate::engine::{Cell, Command};

/// One entry in the first format.
#[derive(Deserialize)]
pub struct LegacyEntry {
    log_id: LogId,
    payload: Payload,
}

#[derive(Deserialize)]
enum Payload {
    Blank,
    Normal(LegacyRequest),
    Membership(openraft::Membership<NodeId, BasicNode>),
}

#[derive(Deserialize)]
struct LegacyRequest {
    now_ms: u64,
    commands: Vec<LegacyCommand>,
    #[serde(default)]
    sync_origin: Option<u64>,
}

#[derive(Deserialize)]
enum LegacyCommand {
    SyncCells {
        cells: Packed,
    },
    /// Every other command reads as it is encoded today.
    #[serde(untagged)]
    Same(Command),
}

/// Packed cells behind base64.
struct Packed(Vec<(String, Cell)>);

impl<'de> Deserialize<'de> for Packed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64_decode(&text).ok_or_else(|| de::Error::custom("invalid base64"))?;
        let mut rest = bytes.as_slice();
        let mut cells = Vec::new();
        while !rest.is_empty() {
            cells.push(
                take_cell(&mut rest)
                    .ok_or_else(|| de::Error::custom("malformed packed rate-limit cells"))?,
            );
        }
        Ok(Packed(cells))
    }
}

impl LegacyEntry {
    pub fn into_entry(self) -> Entry {
        let payload = match self.payload {
            Payload::Blank => EntryPayload::Blank,
            Payload::Membership(m) => EntryPayload::Membership(m),
            Payload::Normal(r) => EntryPayload::Normal(Request {
                now_ms: r.now_ms,
                commands: r
                    .commands
                    .into_iter()
                    .map(|c| match c {
                        LegacyCommand::SyncCells { cells } => Command::SyncCells {
                            cells: cells.0,
                            decider: None,
                        },
                        LegacyCommand::Same(c) => c,
                    })
                    .collect(),
                sync_origin: r.sync_origin,
            }),
        };
        Entry {
            log_id: self.log_id,
            payload,
        }
    }
}

/// An entry from its JSON.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, String> {
    serde_json::from_slice::<LegacyEntry>(bytes)
        .map(LegacyEntry::into_entry)
        .map_err(|e| format!("log entry in the JSON format: {e}"))
}

fn take_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn take_cell(buf: &mut &[u8]) -> Option<(String, Cell)> {
    let len = usize::try_from(take_varint(buf)?).ok()?;
    if buf.len() < len {
        return None;
    }
    let (key, rest) = buf.split_at(len);
    *buf = rest;
    let key = std::str::from_utf8(key).ok()?.to_owned();
    let tag = u32::try_from(take_varint(buf)?).ok()?;
    let aux = u32::try_from(take_varint(buf)?).ok()?;
    let (a, b, c) = (take_varint(buf)?, take_varint(buf)?, take_varint(buf)?);
    Some((key, Cell::from_parts((tag, aux, a, b, c))))
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (q, quad) in text.chunks(4).enumerate() {
        let pad = if q + 1 == quads {
            quad.iter().rev().take_while(|&&c| c == b'=').count()
        } else {
            0
        };
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            };
            n = n << 6 | u32::from(v);
        }
        n <<= 6 * pad as u32;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

/// A snapshot as earlier releases wrote it (one JSON document), read from
/// their data directories and from their leaders.
#[derive(Deserialize)]
struct LegacySnapshot {
    last_now: u64,
    engine: crate::engine::Snapshot,
}

/// Decodes a snapshot document: its time and the engine's state.
pub fn decode_snapshot(data: &[u8]) -> std::io::Result<(u64, crate::engine::Snapshot)> {
    let legacy: LegacySnapshot = serde_json::from_slice(data)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((legacy.last_now, legacy.engine))
}

/// The snapshot document as the store holds it: the first releases stored
/// it as a JSON array of its bytes, later ones as the bytes.
pub fn snapshot_bytes(stored: Vec<u8>) -> Result<Vec<u8>, serde_json::Error> {
    if stored.first() == Some(&b'[') {
        serde_json::from_slice::<Vec<u8>>(&stored)
    } else {
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync entry as the first format wrote it: two cells, packed and
    /// base64-encoded (bytes written out by hand from the format above).
    #[test]
    fn reads_a_packed_sync_entry() {
        // key "k" (len 1), tag 1, aux 2, a 3, b 300 (0xac 0x02), c 5;
        // key "jj", tag 3, aux 0, a 0, b 0, c 0.
        let packed: &[u8] = &[
            1, b'k', 1, 2, 3, 0xac, 0x02, 5, 2, b'j', b'j', 3, 0, 0, 0, 0,
        ];
        let b64 = "AWsBAgOsAgUCamoDAAAAAA==";
        assert_eq!(base64_decode(b64).as_deref(), Some(packed));
        let json = format!(
            r#"{{"log_id":{{"leader_id":{{"term":2,"node_id":1}},"index":7}},"payload":{{"Normal":{{"now_ms":9,"commands":[{{"SyncCells":{{"cells":"{b64}"}}}},{{"Acquire":{{"name":"n","holder":"h","ttl_ms":5}}}},"Sweep"],"sync_origin":4}}}}}}"#
        );
        let entry = decode_entry(json.as_bytes()).unwrap();
        assert_eq!(entry.log_id.index, 7);
        let EntryPayload::Normal(r) = entry.payload else {
            panic!("a normal entry")
        };
        assert_eq!((r.now_ms, r.sync_origin, r.commands.len()), (9, Some(4), 3));
        assert_eq!(
            r.commands[0],
            Command::SyncCells {
                cells: vec![
                    ("k".into(), Cell::from_parts((1, 2, 3, 300, 5))),
                    ("jj".into(), Cell::from_parts((3, 0, 0, 0, 0))),
                ],
                decider: None,
            }
        );
        assert!(matches!(&r.commands[1], Command::Acquire(a) if a.ttl_ms == 5));
        assert_eq!(r.commands[2], Command::Sweep);
    }

    #[test]
    fn refuses_malformed_cells() {
        for bad in ["AWs=", "not base64!", "AQ=="] {
            let json = format!(
                r#"{{"log_id":{{"leader_id":{{"term":1,"node_id":1}},"index":1}},"payload":{{"Normal":{{"now_ms":1,"commands":[{{"SyncCells":{{"cells":"{bad}"}}}}]}}}}}}"#
            );
            assert!(decode_entry(json.as_bytes()).is_err(), "{bad}");
        }
    }
}
