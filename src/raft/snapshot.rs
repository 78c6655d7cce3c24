//! The snapshot format: the engine's state as a stream of bounded frames.
//!
//! A snapshot is the 8 bytes [`MAGIC`], then frames, each a little-endian
//! `u32` length and one protobuf message (`proto/arbiter/log/v1/log.proto`):
//! a `SnapshotHeader` (openraft's meta, the last command time, the
//! counters), `SnapshotPart`s of about [`PART_BYTES`] each, and a
//! `SnapshotEnd` with the number of entries and a SHA-256 of everything
//! before it, so a cut-off or damaged file is refused rather than loaded
//! short or wrong. Nothing here holds more than one part: a
//! snapshot is written as the engine is visited and loaded frame by frame.

use std::borrow::Cow;
use std::io::{self, Read, Write};

use prost::Message;

use super::SnapshotMeta;
use crate::engine::{Cell, Engine, Item, Lease, Record, RecordState};
use crate::log_proto as pb;

/// The first bytes of a snapshot in this format. (Earlier releases wrote a
/// JSON document, which starts with `{`.)
pub const MAGIC: &[u8; 8] = b"ARBSNAP1";

/// A part is closed once its entries reach about this many bytes.
const PART_BYTES: usize = 256 << 10;

/// Largest frame a reader accepts: a part closes after the entry that
/// takes it past [`PART_BYTES`], and one entry is at most a record with a
/// 4 MiB response.
const MAX_FRAME: usize = 16 << 20;

/// What a snapshot's header says.
#[derive(Debug)]
pub struct Header {
    pub meta: SnapshotMeta,
    pub last_now_ms: u64,
}

/// Passes bytes through while hashing them (SHA-256).
struct Hashing<T> {
    inner: T,
    sha: ring::digest::Context,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            sha: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    /// The hash of everything passed so far.
    fn digest(&self) -> Vec<u8> {
        self.sha.clone().finish().as_ref().to_vec()
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

fn frame(out: &mut (impl Write + ?Sized), m: &impl Message) -> io::Result<()> {
    let len = u32::try_from(m.encoded_len()).map_err(io::Error::other)?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&m.encode_to_vec())
}

fn to_pb_record(key: &str, r: &Record) -> pb::Record {
    pb::Record {
        key: key.to_owned(),
        fingerprint: r.fingerprint.clone(),
        attempt: r.attempt,
        response: match &r.state {
            RecordState::InProgress => None,
            RecordState::Completed { response } => Some(response.clone()),
        },
        retention_ms: r.retention_ms,
        expires_at_ms: r.expires_at_ms,
        principal: r.principal.clone(),
    }
}

/// Writes the engine's whole state with `meta` to `out` (so it must be
/// called where no entry is being applied, for the state to match
/// `meta.last_log_id`), one part at a time: nothing larger than a part is
/// held in memory. The first write error ends it.
pub fn encode(
    out: impl Write,
    meta: &SnapshotMeta,
    last_now_ms: u64,
    engine: &Engine,
) -> io::Result<()> {
    let mut out = Hashing::new(out);
    out.write_all(MAGIC)?;
    let mut failed: io::Result<()> = Ok(());
    let mut put = |out: &mut dyn Write, m: &dyn ErasedFrame| {
        if failed.is_ok() {
            failed = m.write_to(out);
        }
    };
    let mut part = pb::SnapshotPart::default();
    let mut part_bytes = 0;
    let mut entries = 0u64;
    let meta_json = serde_json::to_vec(meta).expect("snapshot meta serializes to JSON");
    let part_frame = |part: pb::SnapshotPart| pb::SnapshotFrame {
        kind: Some(pb::snapshot_frame::Kind::Part(part)),
    };
    engine.export(|item| {
        part_bytes += match item {
            Item::Counters {
                last_token,
                last_attempt,
                slots,
                last_semaphore_token,
            } => {
                let header = pb::SnapshotHeader {
                    meta_json: meta_json.clone(),
                    last_now_ms,
                    last_fencing_token: last_token,
                    last_semaphore_token,
                    last_attempt,
                    slot_version: slots.version,
                    slot_owners: slots.owners,
                    slot_drained: slots.drained,
                };
                put(&mut out, &header);
                return;
            }
            item => add_to_part(&mut part, item),
        };
        entries += 1;
        if part_bytes >= PART_BYTES {
            put(&mut out, &part_frame(std::mem::take(&mut part)));
            part_bytes = 0;
        }
    });
    if part_bytes > 0 {
        put(&mut out, &part_frame(part));
    }
    let end = pb::SnapshotFrame {
        kind: Some(pb::snapshot_frame::Kind::End(pb::SnapshotEnd {
            entries,
            sha256: out.digest(),
        })),
    };
    put(&mut out, &end);
    failed?;
    out.flush()
}

/// Adds a cell, lease or record to `part`; its approximate size in bytes.
fn add_to_part(part: &mut pb::SnapshotPart, item: Item<'_>) -> usize {
    match item {
        Item::Cell(key, cell) => {
            let (tag, aux, a, b, c) = cell.to_parts();
            part.cells.push(pb::Cell {
                key: key.to_owned(),
                tag,
                aux,
                a,
                b,
                c,
            });
            key.len() + 32
        }
        Item::Lease(l) => {
            let size = l.name.len() + l.holder.len() + l.principal.len() + 24;
            part.leases.push(pb::Lease {
                name: l.name,
                holder: l.holder,
                fencing_token: l.fencing_token,
                ttl_ms: l.ttl_ms,
                expires_at_ms: l.expires_at_ms,
                principal: l.principal,
            });
            size
        }
        Item::Permit(p) => {
            let size = p.name.len() + p.holder.len() + p.principal.len() + 40;
            part.permits.push(pb::Permit {
                name: p.name,
                holder: p.holder,
                permits: p.permits,
                fencing_token: p.fencing_token,
                ttl_ms: p.ttl_ms,
                expires_at_ms: p.expires_at_ms,
                principal: p.principal,
            });
            size
        }
        Item::Breaker(name, b) => {
            let size = name.len() + crate::engine::breakers::STORED_BYTES;
            part.breakers
                .push(crate::raft::codec::breaker_to_proto(name, &b));
            size
        }
        Item::Record(key, r) => {
            let r = to_pb_record(key, &r);
            let size = key.len() + r.fingerprint.len() + r.response.as_ref().map_or(0, Vec::len);
            part.records.push(r);
            size + 32
        }
        // Written as the header, never added to a part.
        Item::Counters { .. } => 0,
    }
}

/// A message written as one frame (so frames of different types can go
/// through one writer closure).
trait ErasedFrame {
    fn write_to(&self, out: &mut dyn Write) -> io::Result<()>;
}

impl<M: Message> ErasedFrame for M {
    fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        frame(out, self)
    }
}

/// Reads one frame into `buf`; `None` at a clean end of input.
fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<()>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "a frame of {len} bytes (at most {MAX_FRAME})"
        )));
    }
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(Some(()))
}

fn invalid(e: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads a snapshot from `r` (positioned at its start). With `engine`,
/// stores every entry into it as it goes (the caller clears it first);
/// without, only checks the whole snapshot decodes, so a bad file is
/// refused before any state is dropped.
pub fn read(r: impl Read, engine: Option<&Engine>) -> io::Result<Header> {
    let mut r = Hashing::new(r);
    let mut buf = Vec::new();
    let (header, h) = read_magic_and_header(&mut r, &mut buf)?;
    let cut = || invalid("the snapshot is cut off");
    let import = |item: Item<'_>| {
        if let Some(e) = engine {
            e.import(item);
        }
    };
    if !(h.slot_owners.is_empty() || h.slot_owners.len() == crate::engine::SLOTS) {
        return Err(invalid(format!(
            "the slot map has {} owners, not {}",
            h.slot_owners.len(),
            crate::engine::SLOTS
        )));
    }
    import(Item::Counters {
        last_token: h.last_fencing_token,
        last_semaphore_token: h.last_semaphore_token,
        last_attempt: h.last_attempt,
        slots: crate::engine::SlotMap {
            version: h.slot_version,
            owners: h.slot_owners,
            drained: h.slot_drained,
        },
    });
    let mut entries = 0u64;
    loop {
        let before = r.digest();
        read_frame(&mut r, &mut buf)?.ok_or_else(cut)?;
        let part = match pb::SnapshotFrame::decode(buf.as_slice())
            .map_err(invalid)?
            .kind
        {
            Some(pb::snapshot_frame::Kind::Part(part)) => part,
            Some(pb::snapshot_frame::Kind::End(end))
                if !end.sha256.is_empty() && end.sha256 != before =>
            {
                return Err(invalid(
                    "the snapshot is damaged: its contents do not match its SHA-256",
                ))
            }
            Some(pb::snapshot_frame::Kind::End(end)) if end.entries == entries => {
                return Ok(header)
            }
            Some(pb::snapshot_frame::Kind::End(end)) => {
                return Err(invalid(format!(
                    "the snapshot holds {entries} entries, its end says {}",
                    end.entries
                )))
            }
            None => return Err(invalid("a snapshot frame of no known kind")),
        };
        entries += (part.cells.len()
            + part.leases.len()
            + part.records.len()
            + part.permits.len()
            + part.breakers.len()) as u64;
        for b in part.breakers {
            let (name, breaker) = crate::raft::codec::breaker_from_proto(b).map_err(invalid)?;
            import(Item::Breaker(&name, breaker));
        }
        for c in part.cells {
            import(Item::Cell(
                &c.key,
                Cell::from_parts((c.tag, c.aux, c.a, c.b, c.c)),
            ));
        }
        for l in part.leases {
            import(Item::Lease(Lease {
                name: l.name,
                holder: l.holder,
                fencing_token: l.fencing_token,
                ttl_ms: l.ttl_ms,
                expires_at_ms: l.expires_at_ms,
                principal: l.principal,
            }));
        }
        for p in part.permits {
            import(Item::Permit(crate::engine::Permit {
                name: p.name,
                holder: p.holder,
                permits: p.permits,
                fencing_token: p.fencing_token,
                ttl_ms: p.ttl_ms,
                expires_at_ms: p.expires_at_ms,
                principal: p.principal,
            }));
        }
        for rec in part.records {
            let record = Record {
                principal: rec.principal,
                fingerprint: rec.fingerprint,
                attempt: rec.attempt,
                state: match rec.response {
                    None => RecordState::InProgress,
                    Some(response) => RecordState::Completed { response },
                },
                retention_ms: rec.retention_ms,
                expires_at_ms: rec.expires_at_ms,
            };
            import(Item::Record(&rec.key, Cow::Owned(record)));
        }
    }
}

/// Reads only the header (the meta) of a snapshot.
pub fn read_header(mut r: impl Read) -> io::Result<Header> {
    read_magic_and_header(&mut r, &mut Vec::new()).map(|(header, _)| header)
}

fn read_magic_and_header(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> io::Result<(Header, pb::SnapshotHeader)> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("not a snapshot (bad magic bytes)"));
    }
    read_frame(r, buf)?.ok_or_else(|| invalid("the snapshot is cut off"))?;
    let h = pb::SnapshotHeader::decode(buf.as_slice()).map_err(invalid)?;
    let header = Header {
        meta: serde_json::from_slice(&h.meta_json).map_err(invalid)?,
        last_now_ms: h.last_now_ms,
    };
    Ok((header, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Acquire, Begin, EngineConfig, LimitCheck, LimitDef};

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(3, 1),
                42,
            )),
            last_membership: Default::default(),
            snapshot_id: "3-1-42-1".into(),
        }
    }

    fn encoded(meta: &SnapshotMeta, last_now_ms: u64, engine: &Engine) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, meta, last_now_ms, engine).unwrap();
        out
    }

    /// An engine with `keys` rate-limit keys, a lease and a record.
    fn engine(keys: usize) -> Engine {
        let e = Engine::new(EngineConfig::default());
        let limit = LimitDef::TokenBucket {
            capacity: 10,
            refill_tokens: 1,
            refill_interval_ms: 1000,
        };
        let checks: Vec<_> = (0..keys)
            .map(|i| LimitCheck {
                key: format!("key-{i:08}"),
                limit,
                cost: 1,
                dry_run: false,
                max_delay_ms: 0,
            })
            .collect();
        e.check(&checks, false, 5).unwrap();
        let acquire = Acquire {
            quota: Default::default(),
            principal: String::new(),
            name: "lease".into(),
            holder: "h".into(),
            ttl_ms: 1000,
        };
        e.execute(acquire, 5).unwrap();
        let begin = Begin {
            quota: Default::default(),
            key: "pay".into(),
            fingerprint: b"fp".to_vec(),
            lock_ttl_ms: 1000,
            retention_ms: 1000,
            principal: "alice".into(),
        };
        e.execute(begin, 5).unwrap();
        // A semaphore holder, and a token counter past it (a second holder
        // was granted and released): both must come back.
        for holder in ["a", "b"] {
            let acquire = crate::engine::SemAcquire {
                name: "db".into(),
                holder: holder.into(),
                limit: 5,
                permits: 2,
                ttl_ms: 1000,
                principal: String::new(),
                quota: None,
            };
            e.execute(acquire, 5).unwrap();
        }
        let release = crate::engine::SemRelease {
            name: "db".into(),
            holder: "b".into(),
            fencing_token: 2,
            principal: String::new(),
        };
        e.execute(release, 5).unwrap();
        assert_eq!(e.snapshot().semaphores.last_token(), 2);
        // A tripped circuit breaker.
        let def = crate::engine::BreakerDef {
            min_calls: 1,
            ..Default::default()
        };
        let (tripped, _) = e
            .breakers()
            .report(
                "pay",
                &def,
                crate::engine::CallOutcome::Failure,
                0,
                5,
                Default::default(),
            )
            .unwrap();
        assert_eq!(tripped.phase, crate::engine::Phase::Open);
        e
    }

    #[test]
    fn a_snapshot_loads_back_into_the_same_state_and_header() {
        let from = engine(20_000);
        let bytes = encoded(&meta(), 77, &from);
        let to = engine(3);
        to.clear();
        let header = read(bytes.as_slice(), Some(&to)).unwrap();
        assert_eq!(header.meta, meta());
        assert_eq!(header.last_now_ms, 77);
        assert_eq!(to.snapshot(), from.snapshot());
        assert_eq!(read_header(bytes.as_slice()).unwrap().meta, meta());
        // A fresh node's counters come from the snapshot alone.
        let fresh = Engine::new(EngineConfig::default());
        read(bytes.as_slice(), Some(&fresh)).unwrap();
        assert_eq!(fresh.snapshot().semaphores.last_token(), 2);
        assert_eq!(fresh.semaphore("db", 5).len(), 1);
        let breaker = fresh.breakers().get("pay").unwrap();
        assert_eq!(breaker.phase, crate::engine::Phase::Open);
    }

    #[test]
    fn a_large_state_is_written_in_bounded_parts() {
        let bytes = encoded(&meta(), 1, &engine(50_000));
        let mut r = &bytes[MAGIC.len()..];
        let mut frames = Vec::new();
        let mut buf = Vec::new();
        while read_frame(&mut r, &mut buf).unwrap().is_some() {
            frames.push(buf.len());
        }
        // Header, several parts, end.
        assert!(frames.len() > 4, "{frames:?}");
        let largest = frames.iter().max().unwrap();
        assert!(*largest < PART_BYTES + 1024, "{frames:?}");
    }

    #[test]
    fn a_cut_or_foreign_file_is_refused_without_touching_the_engine() {
        let bytes = encoded(&meta(), 1, &engine(5_000));
        let target = engine(10);
        let before = target.snapshot();
        for bad in [
            &bytes[..bytes.len() - 3],
            &bytes[..bytes.len() / 2],
            &bytes[..MAGIC.len() + 2],
            b"{\"last_now\":1}".as_slice(),
        ] {
            let err = read(bad, None).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
                ),
                "{err}"
            );
        }
        // The end frame's count is checked too.
        let mut wrong = bytes.clone();
        let end = pb::SnapshotFrame {
            kind: Some(pb::snapshot_frame::Kind::End(pb::SnapshotEnd {
                entries: 1,
                ..Default::default()
            })),
        };
        let end_len = 4 + end.encoded_len();
        let good_end_len = {
            let entries = 5_000 + 2;
            4 + pb::SnapshotFrame {
                kind: Some(pb::snapshot_frame::Kind::End(pb::SnapshotEnd {
                    entries,
                    sha256: vec![0; 32],
                })),
            }
            .encoded_len()
        };
        wrong.truncate(wrong.len() - good_end_len);
        frame(&mut wrong, &end).unwrap();
        assert_eq!(wrong.len(), bytes.len() - good_end_len + end_len);
        let err = read(wrong.as_slice(), None).unwrap_err();
        assert!(err.to_string().contains("its end says 1"), "{err}");
        assert_eq!(target.snapshot(), before);
    }

    /// A changed byte that still decodes (a letter of a key) is caught by
    /// the SHA-256 in the end frame, and nothing is loaded (seen failing
    /// before the end frame carried it: the file loaded with the key
    /// renamed).
    #[test]
    fn a_damaged_file_that_still_decodes_is_refused() {
        let bytes = encoded(&meta(), 1, &engine(100));
        let at = bytes
            .windows(12)
            .position(|w| w == b"key-00000042")
            .expect("the key is in the file");
        let mut damaged = bytes.clone();
        damaged[at + 4] = b'9';
        let err = read(damaged.as_slice(), None).unwrap_err();
        assert!(
            err.to_string().contains("do not match its SHA-256"),
            "{err}"
        );
        let target = engine(10);
        let before = target.snapshot();
        assert!(read(damaged.as_slice(), None).is_err());
        assert_eq!(target.snapshot(), before);
        // The undamaged file loads.
        read(bytes.as_slice(), None).unwrap();
    }
}
