//! The bodies of the fuzz targets (`fuzz/`, run with `cargo fuzz`), here so
//! that the committed seeds and every input that once failed also run in
//! the ordinary test suite (`tests/integration/validation.rs`). Each takes
//! any bytes and must return without panicking; the assertions are the
//! properties checked.

use prost::Message;

use crate::engine::{Engine, EngineConfig};

fn small_engine() -> Engine {
    Engine::new(EngineConfig {
        limit_shards: 2,
        max_limit_keys: 64,
        max_leases: 64,
        max_records: 64,
        max_record_bytes: 1 << 20,
        max_semaphore_holders: 64,
        max_breakers: 64,
    })
}

/// Raft log entries (and the sync entries inside them): an error or an
/// entry; a decoded entry encodes to bytes that decode to the same entry.
pub fn log_entry(data: &[u8]) {
    use crate::raft::codec::{decode_entry, encode_entry};
    if let Ok(entry) = decode_entry(data) {
        let again = decode_entry(&encode_entry(&entry)).expect("an encoded entry decodes");
        assert_eq!(format!("{entry:?}"), format!("{again:?}"));
    }
}

/// Peer messages through every decoder the peer service uses.
pub fn peer_message(data: &[u8]) {
    use crate::node::{Call, TakeOver};
    use crate::raft::network::{decode, decode_append, decode_snapshot};
    let Ok(m) = crate::proto::PeerMessage::decode(data) else {
        return;
    };
    let _ = decode_append(&m);
    let _ = decode::<Call>(&m);
    let _ = decode::<TakeOver>(&m);
    let _ = decode_snapshot(m);
}

/// Snapshot files: checked whole first (as an install does before touching
/// state), then loaded into an engine, which must then work.
pub fn snapshot(data: &[u8]) {
    use crate::raft::snapshot;
    if snapshot::read(data, None).is_ok() {
        let engine = small_engine();
        snapshot::read(data, Some(&engine)).expect("a checked snapshot loads");
        let _ = engine.snapshot();
        let _ = engine.sweep_limits(u64::MAX);
    }
}

/// `RateLimiter.Check` requests: validated as the API does (a clear error,
/// never a panic), then decided by the engine at times taken from the
/// input (the first 8 bytes), each seeing the state the last left.
pub fn check_request(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let now = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let Ok(req) = crate::proto::CheckRequest::decode(&data[8..]) else {
        return;
    };
    let Ok(checks) = req
        .checks
        .into_iter()
        .enumerate()
        .map(|(i, c)| crate::api::convert::limit_check(i, c))
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let engine = small_engine();
    for t in [now, now.wrapping_add(now >> 3), now / 2] {
        if let Ok(results) = engine.check(&checks, req.all_or_nothing, t) {
            assert_eq!(results.len(), checks.len());
        }
    }
}

/// Named-limit files: an error, or rules that match descriptors made from
/// the text's own words.
pub fn limits_config(data: &[u8]) {
    use crate::limits::file::parse;
    use crate::limits::Limits;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((domain, level)) = parse(text) {
        let limits = Limits::with(domain.clone(), level);
        let words: Vec<&str> = text.split_whitespace().take(8).collect();
        let entries: Vec<(String, String)> = words
            .chunks(2)
            .map(|p| (p[0].to_owned(), p.get(1).copied().unwrap_or("").to_owned()))
            .collect();
        if let Some(rule) = limits.matching(&domain, &entries) {
            let _ = rule.def(rule.requests_per_unit, rule.unit);
        }
    }
}

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target by name, for the suite that replays the corpora.
pub const TARGETS: [(&str, Body); 5] = [
    ("log_entry", log_entry),
    ("peer_message", peer_message),
    ("snapshot", snapshot),
    ("check_request", check_request),
    ("limits_config", limits_config),
];
