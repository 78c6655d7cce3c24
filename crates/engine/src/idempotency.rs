//! Idempotency-key records.
//!
//! The first Begin for a key claims it: the record is IN_PROGRESS under a
//! lock until `lock_ttl_ms` lapses, then COMPLETED (holding the response) for
//! `retention_ms` after Complete. A record whose lock lapsed without a
//! Complete is treated as absent, so the next Begin starts a new attempt.
//! Attempt numbers come from one counter for all keys: they strictly increase
//! and are never reused, so a stale attempt can never be mistaken for a new
//! one even after its record was purged.
//!
//! With authentication on, a record also keeps the principal whose Begin
//! made its attempt; only that principal may complete or abort it. A record
//! begun without a principal is anyone's who names its attempt.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::EngineError;
use crate::usage::Usage;

/// A principal's quotas on records (`None`: none), as the leader read them
/// from its auth file when it proposed the operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordQuota {
    pub records: Option<u64>,
    pub bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    InProgress,
    Completed { response: Vec<u8> },
}

/// A record as it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub fingerprint: Vec<u8>,
    pub attempt: u64,
    pub state: RecordState,
    /// Kept for the record's Complete.
    pub retention_ms: u64,
    /// Lock lapse (in progress) or end of retention (completed).
    pub expires_at_ms: u64,
    /// The principal whose Begin made the attempt ("" without
    /// authentication).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

impl Record {
    fn bytes(key: &str, r: &Record) -> usize {
        let response = match &r.state {
            RecordState::Completed { response } => response.len(),
            RecordState::InProgress => 0,
        };
        key.len() + r.fingerprint.len() + response + r.principal.len() + 64
    }

    /// Whether `principal` may complete or abort this record's attempt.
    fn owned_by(&self, principal: &str) -> bool {
        self.principal.is_empty() || self.principal == principal
    }
}

/// What Begin decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BeginOutcome {
    Started { attempt: u64 },
    InProgress { attempt: u64, retry_after_ms: u64 },
    Completed { attempt: u64, response: Vec<u8> },
    FingerprintMismatch,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordTable {
    records: HashMap<String, Record>,
    last_attempt: u64,
    /// Approximate bytes held (keys, fingerprints, responses, overhead).
    bytes: usize,
    /// (expiry, key) of every record, so sweeps touch only what lapsed.
    #[serde(skip)]
    deadlines: BTreeSet<(u64, String)>,
    #[serde(skip)]
    max_records: usize,
    #[serde(skip)]
    max_bytes: usize,
    /// Stored records and their bytes per principal, for quotas.
    #[serde(skip)]
    usage: Usage,
    #[serde(skip)]
    usage_bytes: Usage,
}

impl RecordTable {
    pub fn new(max_records: usize, max_bytes: usize) -> Self {
        Self {
            max_records,
            max_bytes,
            ..Self::default()
        }
    }

    /// Re-applies limits and rebuilds the expiry index after a restore.
    pub(crate) fn restored(&mut self, max_records: usize, max_bytes: usize) {
        self.max_records = max_records;
        self.max_bytes = max_bytes;
        self.usage = Usage::default();
        self.usage_bytes = Usage::default();
        for (k, r) in &self.records {
            self.usage.add(&r.principal, 1);
            self.usage_bytes
                .add(&r.principal, Record::bytes(k, r) as u64);
        }
        self.deadlines = self
            .records
            .iter()
            .map(|(k, r)| (r.expires_at_ms, k.clone()))
            .collect();
    }

    fn insert(&mut self, key: &str, r: Record) {
        let size = Record::bytes(key, &r);
        self.bytes += size;
        self.usage.add(&r.principal, 1);
        self.usage_bytes.add(&r.principal, size as u64);
        self.deadlines.insert((r.expires_at_ms, key.to_owned()));
        self.records.insert(key.to_owned(), r);
    }

    /// Every stored record (lapsed ones not yet swept too), in no order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Record)> {
        self.records.iter().map(|(k, r)| (k.as_str(), r))
    }

    /// Stores a record as exported (a snapshot being loaded), replacing any
    /// under its key; ignores the caps, as a restore does.
    pub(crate) fn put(&mut self, key: &str, r: Record) {
        self.remove(key);
        self.insert(key, r);
    }

    pub(crate) fn last_attempt(&self) -> u64 {
        self.last_attempt
    }

    /// Raises the attempt counter to `attempt`, never lowers it.
    pub(crate) fn raise_last_attempt(&mut self, attempt: u64) {
        self.last_attempt = self.last_attempt.max(attempt);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn get(&self, key: &str, now_ms: u64) -> Option<&Record> {
        self.records.get(key).filter(|r| now_ms < r.expires_at_ms)
    }

    fn room_for(&self, extra_records: usize, extra_bytes: usize) -> Result<(), EngineError> {
        if self.records.len() + extra_records > self.max_records {
            return Err(EngineError::Exhausted {
                what: "idempotency records".into(),
                max: self.max_records,
            });
        }
        if self.bytes + extra_bytes > self.max_bytes {
            return Err(EngineError::Exhausted {
                what: "idempotency record bytes".into(),
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    /// `OverQuota` if `principal` holding `extra_records` and `extra_bytes`
    /// more would pass one of its quotas.
    fn within_quota(
        &self,
        principal: &str,
        quota: RecordQuota,
        extra_records: u64,
        extra_bytes: u64,
    ) -> Result<(), EngineError> {
        self.usage.check(
            principal,
            extra_records,
            quota.records,
            "idempotency records",
        )?;
        self.usage_bytes.check(
            principal,
            extra_bytes,
            quota.bytes,
            "idempotency record bytes",
        )
    }

    /// Records and record bytes stored for `principal`.
    pub fn held_by(&self, principal: &str) -> (u64, u64) {
        (self.usage.of(principal), self.usage_bytes.of(principal))
    }

    fn remove(&mut self, key: &str) -> Option<Record> {
        let r = self.records.remove(key)?;
        let size = Record::bytes(key, &r);
        self.bytes -= size;
        self.usage.sub(&r.principal, 1);
        self.usage_bytes.sub(&r.principal, size as u64);
        self.deadlines.remove(&(r.expires_at_ms, key.to_owned()));
        Some(r)
    }

    pub fn begin(
        &mut self,
        key: &str,
        fingerprint: &[u8],
        lock_ttl_ms: u64,
        retention_ms: u64,
        now_ms: u64,
    ) -> Result<BeginOutcome, EngineError> {
        let no_quota = RecordQuota::default();
        self.begin_as(
            key,
            fingerprint,
            lock_ttl_ms,
            retention_ms,
            "",
            no_quota,
            now_ms,
        )
    }

    /// [`begin`](Self::begin) by `principal`, who then owns the attempt,
    /// within its `quota`.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_as(
        &mut self,
        key: &str,
        fingerprint: &[u8],
        lock_ttl_ms: u64,
        retention_ms: u64,
        principal: &str,
        quota: RecordQuota,
        now_ms: u64,
    ) -> Result<BeginOutcome, EngineError> {
        if let Some(r) = self.get(key, now_ms) {
            if r.fingerprint != fingerprint {
                return Ok(BeginOutcome::FingerprintMismatch);
            }
            return Ok(match &r.state {
                RecordState::InProgress => BeginOutcome::InProgress {
                    attempt: r.attempt,
                    retry_after_ms: r.expires_at_ms - now_ms,
                },
                RecordState::Completed { response } => BeginOutcome::Completed {
                    attempt: r.attempt,
                    response: response.clone(),
                },
            });
        }
        if self.last_attempt == u64::MAX {
            return Err(EngineError::CounterAtMax {
                what: "idempotency attempt numbers".into(),
            });
        }
        let lapsed = self.remove(key).is_some();
        let record = Record {
            fingerprint: fingerprint.to_vec(),
            attempt: self.last_attempt + 1,
            state: RecordState::InProgress,
            retention_ms,
            expires_at_ms: now_ms.saturating_add(lock_ttl_ms),
            principal: principal.to_owned(),
        };
        let size = Record::bytes(key, &record);
        self.room_for(usize::from(!lapsed), size)?;
        self.within_quota(principal, quota, 1, size as u64)?;
        self.last_attempt += 1;
        self.insert(key, record);
        Ok(BeginOutcome::Started {
            attempt: self.last_attempt,
        })
    }

    fn owned(
        &self,
        key: &str,
        attempt: u64,
        principal: &str,
        now_ms: u64,
    ) -> Result<&Record, EngineError> {
        match self.get(key, now_ms) {
            // Another principal's record: refused before its attempt is
            // compared, so guessing attempts learns nothing.
            Some(r) if !r.owned_by(principal) => Err(EngineError::NotRecordOwner {
                key: key.to_owned(),
                principal: principal.to_owned(),
            }),
            Some(r) if r.attempt == attempt && r.state == RecordState::InProgress => Ok(r),
            _ => Err(EngineError::StaleAttempt {
                key: key.to_owned(),
                attempt,
            }),
        }
    }

    pub fn complete(
        &mut self,
        key: &str,
        attempt: u64,
        response: &[u8],
        now_ms: u64,
    ) -> Result<(), EngineError> {
        self.complete_as(key, attempt, response, "", None, now_ms)
    }

    /// [`complete`](Self::complete) by `principal`, whose records may
    /// hold `byte_quota` bytes.
    pub fn complete_as(
        &mut self,
        key: &str,
        attempt: u64,
        response: &[u8],
        principal: &str,
        byte_quota: Option<u64>,
        now_ms: u64,
    ) -> Result<(), EngineError> {
        let r = self.owned(key, attempt, principal, now_ms)?;
        self.room_for(0, response.len())?;
        // Counted against the record's owner (the caller, unless the
        // record was begun without a principal).
        let owner = r.principal.clone();
        self.usage_bytes.check(
            &owner,
            response.len() as u64,
            byte_quota,
            "idempotency record bytes",
        )?;
        let expires_at_ms = now_ms.saturating_add(r.retention_ms);
        let mut r = self.remove(key).expect("owned record is stored");
        r.state = RecordState::Completed {
            response: response.to_vec(),
        };
        r.expires_at_ms = expires_at_ms;
        self.insert(key, r);
        Ok(())
    }

    pub fn abort(&mut self, key: &str, attempt: u64, now_ms: u64) -> Result<(), EngineError> {
        self.abort_as(key, attempt, "", now_ms)
    }

    /// [`abort`](Self::abort) by `principal`.
    pub fn abort_as(
        &mut self,
        key: &str,
        attempt: u64,
        principal: &str,
        now_ms: u64,
    ) -> Result<(), EngineError> {
        self.owned(key, attempt, principal, now_ms)?;
        self.remove(key);
        Ok(())
    }

    /// Purges lapsed locks and records past retention.
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now_ms {
                break;
            }
            let (_, key) = self.deadlines.first().cloned().expect("first exists");
            self.remove(&key);
            n += 1;
        }
        n
    }

    pub fn next_expiry(&self) -> Option<u64> {
        self.deadlines.first().map(|d| d.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the principal that began an attempt completes or aborts it;
    /// another is refused whatever attempt it names; one begun without a
    /// principal is anyone's.
    #[test]
    fn only_the_principal_that_began_an_attempt_ends_it() {
        let mut t = RecordTable::new(10, 1 << 20);
        let BeginOutcome::Started { attempt } = t
            .begin_as("k", b"fp", 100, 1000, "alice", RecordQuota::default(), 0)
            .unwrap()
        else {
            panic!("not started")
        };
        for guess in [attempt, attempt + 1] {
            let e = t
                .complete_as("k", guess, b"bob", "bob", None, 10)
                .unwrap_err();
            assert!(matches!(e, EngineError::NotRecordOwner { .. }), "{e}");
            assert!(!e.to_string().contains("alice"), "{e}");
        }
        assert!(t.abort_as("k", attempt, "bob", 10).is_err());
        t.complete_as("k", attempt, b"ok", "alice", None, 20)
            .unwrap();
        assert_eq!(t.get("k", 30).unwrap().principal, "alice");
        let BeginOutcome::Started { attempt } = t.begin("j", b"fp", 100, 1000, 0).unwrap() else {
            panic!("not started")
        };
        t.abort_as("j", attempt, "anyone", 10).unwrap();
    }

    /// The attempt counter at its maximum (a snapshot can carry it there):
    /// the last attempt starts, the next Begin is refused, never wrapped.
    /// Seen failing before the fix: the counter overflowed.
    #[test]
    fn the_attempt_counter_never_wraps() {
        let mut t = RecordTable::new(10, 1 << 20);
        t.last_attempt = u64::MAX - 1;
        assert_eq!(
            t.begin("k", b"fp", 100, 1000, 0).unwrap(),
            BeginOutcome::Started { attempt: u64::MAX }
        );
        let refused = t.begin("j", b"fp", 100, 1000, 0).unwrap_err();
        assert!(
            matches!(refused, EngineError::CounterAtMax { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("attempt"), "{refused}");
        t.complete("k", u64::MAX, b"ok", 10).unwrap();
    }

    #[test]
    fn first_attempt_starts_retries_wait_then_see_the_result() {
        let mut t = RecordTable::new(10, 1 << 20);
        assert_eq!(
            t.begin("k", b"fp", 100, 1000, 0).unwrap(),
            BeginOutcome::Started { attempt: 1 }
        );
        assert_eq!(
            t.begin("k", b"fp", 100, 1000, 40).unwrap(),
            BeginOutcome::InProgress {
                attempt: 1,
                retry_after_ms: 60
            }
        );
        assert_eq!(
            t.begin("k", b"other", 100, 1000, 40).unwrap(),
            BeginOutcome::FingerprintMismatch
        );
        t.complete("k", 1, b"ok", 50).unwrap();
        assert_eq!(
            t.begin("k", b"fp", 100, 1000, 60).unwrap(),
            BeginOutcome::Completed {
                attempt: 1,
                response: b"ok".to_vec()
            }
        );
        // Retention: kept until 50 + 1000.
        assert!(t.get("k", 1049).is_some());
        assert!(t.get("k", 1050).is_none());
        assert_eq!(t.sweep(1050), 1);
        assert_eq!(t.bytes(), 0);
    }

    #[test]
    fn lapsed_lock_lets_a_new_attempt_start_and_fences_the_old() {
        let mut t = RecordTable::new(10, 1 << 20);
        t.begin("k", b"", 100, 1000, 0).unwrap();
        assert_eq!(
            t.begin("k", b"", 100, 1000, 100).unwrap(),
            BeginOutcome::Started { attempt: 2 }
        );
        assert!(matches!(
            t.complete("k", 1, b"late", 110),
            Err(EngineError::StaleAttempt { .. })
        ));
        assert!(matches!(
            t.abort("k", 1, 110),
            Err(EngineError::StaleAttempt { .. })
        ));
        t.abort("k", 2, 120).unwrap();
        assert!(t.get("k", 120).is_none());
        assert_eq!(
            t.begin("k", b"", 100, 1000, 130).unwrap(),
            BeginOutcome::Started { attempt: 3 }
        );
        // The owner's lock lapsed: completing now is refused.
        assert!(t.complete("k", 3, b"", 230).is_err());
    }

    #[test]
    fn caps_on_count_and_bytes() {
        let mut t = RecordTable::new(1, 1 << 20);
        t.begin("a", b"", 10, 10, 0).unwrap();
        assert!(matches!(
            t.begin("b", b"", 10, 10, 0),
            Err(EngineError::Exhausted { .. })
        ));
        let mut t = RecordTable::new(10, 200);
        t.begin("a", b"", 10, 10, 0).unwrap();
        assert!(matches!(
            t.complete("a", 1, &[0; 200], 0),
            Err(EngineError::Exhausted { .. })
        ));
        t.complete("a", 1, &[0; 10], 0).unwrap();
    }
}
