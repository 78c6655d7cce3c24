//! The engine's state as a stream of items, so a snapshot can be written
//! and loaded piece by piece instead of as one value held whole in memory.

use std::borrow::Cow;

use crate::idempotency::Record;
use crate::leases::{Lease, LeaseTable};
use crate::limits::Cell;
use crate::semaphores::{Permit, SemaphoreTable};
use crate::{Engine, RecordTable, SlotMap, Tables};

/// One piece of the engine's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// The counters that outlive the entries they numbered: the last
    /// fencing token granted and the last idempotency attempt.
    /// And the slot map.
    Counters {
        last_token: u64,
        last_attempt: u64,
        slots: SlotMap,
        /// The semaphores' last fencing token.
        last_semaphore_token: u64,
    },
    Cell(&'a str, Cell),
    Lease(Lease),
    Permit(Permit),
    Breaker(&'a str, crate::Breaker),
    Record(&'a str, Cow<'a, Record>),
}

impl Engine {
    /// Visits the whole state: the counters, every lease and record (under
    /// the tables' lock), then every rate-limit cell, one shard locked at a
    /// time. Items are borrowed: the visitor encodes them as it goes.
    pub fn export(&self, mut visit: impl FnMut(Item<'_>)) {
        {
            let t = self.tables();
            visit(Item::Counters {
                last_token: t.leases.last_token(),
                last_attempt: t.records.last_attempt(),
                slots: (*self.slots()).clone(),
                last_semaphore_token: t.semaphores.last_token(),
            });
            for lease in t.leases.iter() {
                visit(Item::Lease(lease));
            }
            for permit in t.semaphores.iter() {
                visit(Item::Permit(permit));
            }
            for (key, record) in t.records.iter() {
                visit(Item::Record(key, Cow::Borrowed(record)));
            }
        }
        self.limits
            .for_each(|key, cell| visit(Item::Cell(key, cell)));
        for (name, breaker) in self.breakers.all() {
            visit(Item::Breaker(&name, breaker));
        }
    }

    /// Drops all state but the token and attempt counters, as the first
    /// step of loading a snapshot item by item (so the old state and the new
    /// are never held together).
    pub fn clear(&self) {
        self.limits.clear();
        self.breakers.clear();
        let mut t = self.tables();
        let (last_token, last_attempt) = (t.leases.last_token(), t.records.last_attempt());
        let last_semaphore_token = t.semaphores.last_token();
        *t = Tables {
            leases: LeaseTable::new(self.config.max_leases),
            records: RecordTable::new(self.config.max_records, self.config.max_record_bytes),
            semaphores: SemaphoreTable::new(self.config.max_semaphore_holders),
        };
        t.leases.raise_last_token(last_token);
        t.records.raise_last_attempt(last_attempt);
        t.semaphores.raise_last_token(last_semaphore_token);
        self.set_slots(SlotMap::default());
    }

    /// Stores one exported item, replacing what is stored under its key.
    /// Caps are not applied (the state was within them where it was
    /// exported); they apply to the next write.
    pub fn import(&self, item: Item<'_>) {
        match item {
            Item::Counters {
                last_token,
                last_attempt,
                slots,
                last_semaphore_token,
            } => {
                // Counters only ever rise: a snapshot older than what this
                // node has seen cannot make a token or attempt number be
                // granted twice.
                let mut t = self.tables();
                t.leases.raise_last_token(last_token);
                t.records.raise_last_attempt(last_attempt);
                t.semaphores.raise_last_token(last_semaphore_token);
                // The slot map is the snapshot's, as the rest of the state.
                self.set_slots(slots);
            }
            Item::Cell(key, cell) => self.limits.upsert([(key, cell)]),
            Item::Lease(lease) => self.tables().leases.put(lease),
            Item::Permit(permit) => self.tables().semaphores.put(permit),
            Item::Breaker(name, breaker) => {
                self.breakers.upsert([(name.to_owned(), breaker)]);
            }
            Item::Record(key, record) => self.tables().records.put(key, record.into_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Begin, Complete, EngineConfig, LimitCheck, LimitDef};

    fn busy_engine() -> Engine {
        let e = Engine::new(EngineConfig::default());
        let def = LimitDef::TokenBucket {
            capacity: 10,
            refill_tokens: 1,
            refill_interval_ms: 1000,
        };
        let checks: Vec<_> = (0..50)
            .map(|i| LimitCheck {
                key: format!("k{i}"),
                limit: def,
                cost: 3,
                dry_run: false,
                max_delay_ms: 0,
            })
            .collect();
        e.check(&checks, false, 100).unwrap();
        for i in 0..5 {
            e.execute(
                crate::Acquire {
                    quota: Default::default(),
                    principal: String::new(),
                    name: format!("lease-{i}"),
                    holder: "h".into(),
                    ttl_ms: 5_000,
                },
                100,
            )
            .unwrap();
            e.execute(
                Begin {
                    quota: Default::default(),
                    principal: String::new(),
                    key: format!("pay-{i}"),
                    fingerprint: b"fp".to_vec(),
                    lock_ttl_ms: 1_000,
                    retention_ms: 60_000,
                },
                100,
            )
            .unwrap();
        }
        e.execute(
            Complete {
                byte_quota: None,
                principal: String::new(),
                key: "pay-0".into(),
                attempt: 1,
                response: b"done".to_vec(),
            },
            150,
        )
        .unwrap();
        e
    }

    #[test]
    fn an_export_imported_into_another_engine_is_the_same_state() {
        let from = busy_engine();
        let to = Engine::new(EngineConfig::default());
        // Something to be replaced: an import starts from a cleared engine.
        to.execute(
            crate::Acquire {
                quota: Default::default(),
                principal: String::new(),
                name: "stale".into(),
                holder: "x".into(),
                ttl_ms: 1,
            },
            0,
        )
        .unwrap();
        to.clear();
        let mut items = 0;
        from.export(|item| {
            items += 1;
            to.import(item);
        });
        assert_eq!(items, 1 + 5 + 5 + 50);
        assert_eq!(to.snapshot(), from.snapshot());
        assert_eq!(to.counts(), from.counts());
        assert_eq!(to.next_expiry(), from.next_expiry());
        // The counters came along: the next grant and attempt continue them.
        let (next, _) = to
            .execute(
                crate::Acquire {
                    quota: Default::default(),
                    principal: String::new(),
                    name: "new".into(),
                    holder: "h".into(),
                    ttl_ms: 5_000,
                },
                200,
            )
            .unwrap();
        assert_eq!(next.lease.fencing_token, 6);
    }

    #[test]
    fn clear_leaves_nothing_but_the_counters() {
        let e = busy_engine();
        e.clear();
        assert_eq!(e.counts(), crate::Counts::default());
        let mut items = Vec::new();
        e.export(|item| items.push(format!("{item:?}")));
        assert_eq!(
            items,
            vec![
                "Counters { last_token: 5, last_attempt: 5, slots: SlotMap { version: 0, owners: [], drained: [] }, last_semaphore_token: 0 }"
                    .to_string()
            ]
        );
    }

    /// A snapshot taken before this engine granted its latest token and
    /// attempt cannot make either be granted again.
    #[test]
    fn an_older_snapshot_never_moves_the_counters_back() {
        let old = busy_engine();
        let e = busy_engine();
        let grant = |name: &str| {
            e.execute(
                crate::Acquire {
                    quota: Default::default(),
                    principal: String::new(),
                    name: name.into(),
                    holder: "h".into(),
                    ttl_ms: 5_000,
                },
                300,
            )
            .unwrap()
            .0
            .lease
            .fencing_token
        };
        assert_eq!(grant("later"), 6);
        let attempt = e
            .execute(
                Begin {
                    quota: Default::default(),
                    principal: String::new(),
                    key: "pay-later".into(),
                    fingerprint: b"fp".to_vec(),
                    lock_ttl_ms: 1_000,
                    retention_ms: 60_000,
                },
                300,
            )
            .unwrap()
            .0;
        assert!(
            matches!(attempt, crate::BeginOutcome::Started { attempt: 6 }),
            "{attempt:?}"
        );
        e.clear();
        old.export(|item| e.import(item));
        assert_eq!(grant("after-install"), 7);
    }
}
