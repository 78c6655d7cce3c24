//! The sharded in-memory map of rate-limit state.
//!
//! Keys hash once; middle bits of the hash pick a shard (the map itself uses
//! the low bits for the slot and the top seven as tags, so those stay
//! independent of the shard). Each shard is a `std::sync::Mutex` around a
//! `hashbrown::HashTable`: critical sections are a lookup and a few integer
//! operations, never an await, so a blocking mutex is cheaper than an async
//! one and contention across 64 shards is negligible.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::num::NonZeroU8;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use hashbrown::{DefaultHashBuilder, HashTable};

use super::{Cell, LimitCheck, LimitResult};
use crate::EngineError;

/// Holds: tentative consumption by all-or-nothing batches spanning owners.
mod holds;
/// Draining changed cells for syncs, and marking them changed again.
mod sync;

pub use holds::Atomic;
use holds::{decide_held, held_at};

type Entry = (Key, Cell);

/// A principal's count of stored keys, shared by the keys it made.
type Owner = Arc<AtomicU64>;

/// Whose checks these are, for the quota on the keys they make.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyQuota<'a> {
    /// "" counts nothing.
    pub principal: &'a str,
    /// Most keys the principal may hold (`None`: no quota).
    pub max: Option<u64>,
}

/// Gives back a key's place in its owner's count.
fn disown(owners: &mut HashMap<u64, Owner>, h: u64) {
    if let Some(o) = owners.remove(&h) {
        o.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A key stored inline when it fits in 22 bytes (most rate-limit keys do),
/// which saves an allocation and, more to the point, a cache miss on every
/// lookup; longer keys are boxed. 24 bytes either way: `len + 1` is a
/// `NonZeroU8`, whose forbidden zero lets the compiler tell the variants
/// apart without a separate tag.
enum Key {
    Inline {
        len1: NonZeroU8,
        bytes: [u8; INLINE],
    },
    Heap(Box<str>),
}

const INLINE: usize = 22;

impl Key {
    fn new(s: &str) -> Self {
        match NonZeroU8::new(s.len() as u8 + 1).filter(|_| s.len() <= INLINE) {
            Some(len1) => {
                let mut bytes = [0u8; INLINE];
                bytes[..s.len()].copy_from_slice(s.as_bytes());
                Key::Inline { len1, bytes }
            }
            None => Key::Heap(s.into()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Key::Inline { len1, bytes } => &bytes[..usize::from(len1.get() - 1)],
            Key::Heap(s) => s.as_bytes(),
        }
    }

    fn as_str(&self) -> &str {
        // Built from a &str, so always valid UTF-8.
        std::str::from_utf8(self.bytes()).unwrap_or_default()
    }

    fn is(&self, s: &str) -> bool {
        self.bytes() == s.as_bytes()
    }
}

/// A shard's cells, and the hashes of cells changed since the last sync
/// (each pushed once: the cell's dirty bit says whether it already is).
#[derive(Default)]
struct ShardState {
    table: HashTable<Entry>,
    dirty: Vec<u64>,
    /// The owner (for quotas) of each key a principal's check made, by the
    /// key's hash: kept beside the table, so without authentication (no
    /// owners) an entry costs nothing more. Two keys sharing a 64-bit hash
    /// would share one owner slot: the quota count is then off by one.
    owners: HashMap<u64, Owner>,
    /// What reservations hold of each key, by the key's hash (empty but
    /// for all-or-nothing batches spanning owners: see `holds`).
    held: HashMap<u64, u64>,
}

impl std::ops::Deref for ShardState {
    type Target = HashTable<Entry>;
    fn deref(&self) -> &Self::Target {
        &self.table
    }
}

impl std::ops::DerefMut for ShardState {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.table
    }
}

/// Stores `cell` over an existing entry, noting it for the next sync.
fn store(entry: &mut Entry, cell: Cell, h: u64, dirty: &mut Vec<u64>) {
    if !entry.1.is_dirty() {
        dirty.push(h);
    }
    entry.1 = cell.dirty();
}

/// One shard, on its own cache line so neighbouring locks do not share one.
#[repr(align(64))]
struct Shard(Mutex<ShardState>);

pub struct LimitTable {
    shards: Box<[Shard]>,
    hasher: DefaultHashBuilder,
    live: AtomicUsize,
    max_keys: usize,
    /// Each principal's count of keys it made (kept once made: bounded by
    /// the principals the auth file names).
    owners: RwLock<HashMap<Box<str>, Owner>>,
}

fn lock(shard: &Shard) -> MutexGuard<'_, ShardState> {
    // A panic while holding a shard cannot leave a cell half-written (cells
    // are replaced whole), so a poisoned lock is still consistent.
    shard.0.lock().unwrap_or_else(|e| e.into_inner())
}

impl LimitTable {
    /// `shards` is rounded up to a power of two.
    pub fn new(shards: usize, max_keys: usize) -> Self {
        let n = shards.clamp(1, 1024).next_power_of_two();
        Self {
            shards: (0..n)
                .map(|_| Shard(Mutex::new(ShardState::default())))
                .collect(),
            hasher: DefaultHashBuilder::default(),
            live: AtomicUsize::new(0),
            max_keys,
            owners: RwLock::default(),
        }
    }

    /// The count of `principal`'s keys (`None` for "").
    fn owner(&self, principal: &str) -> Option<Owner> {
        if principal.is_empty() {
            return None;
        }
        let read = self.owners.read().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = read.get(principal) {
            return Some(o.clone());
        }
        drop(read);
        let mut write = self.owners.write().unwrap_or_else(|e| e.into_inner());
        Some(write.entry(principal.into()).or_default().clone())
    }

    /// Keys stored that `principal`'s checks made on this node.
    pub fn held_by(&self, principal: &str) -> u64 {
        let read = self.owners.read().unwrap_or_else(|e| e.into_inner());
        read.get(principal).map_or(0, |o| o.load(Ordering::Relaxed))
    }

    /// Takes `n` places in `owner`'s count, or `OverQuota`.
    fn take(owner: &Option<Owner>, n: u64, quota: KeyQuota<'_>) -> Result<(), EngineError> {
        let Some(o) = owner else { return Ok(()) };
        let before = o.fetch_add(n, Ordering::Relaxed);
        match quota.max {
            Some(max) if before + n > max => {
                o.fetch_sub(n, Ordering::Relaxed);
                Err(EngineError::OverQuota {
                    principal: quota.principal.to_owned(),
                    what: "rate-limit keys".into(),
                    quota: max,
                })
            }
            _ => Ok(()),
        }
    }

    /// Keys currently stored (including idle ones not yet swept).
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn locate(&self, key: &str) -> (u64, usize) {
        let h = self.hasher.hash_one(key);
        (h, (h >> 40) as usize & (self.shards.len() - 1))
    }

    /// Decides every check in order; `all_or_nothing` consumes only if all
    /// are allowed. Fails only when a new key would exceed the key cap (with
    /// `all_or_nothing`, before anything is consumed; otherwise the checks
    /// before the failing one keep their consumption).
    pub fn check(
        &self,
        checks: &[LimitCheck],
        all_or_nothing: bool,
        now_ms: u64,
    ) -> Result<Vec<LimitResult>, EngineError> {
        self.check_for(checks, all_or_nothing, now_ms, KeyQuota::default())
    }

    /// [`check`](Self::check) for a principal: the keys its checks make
    /// count against its quota, and a new key past it fails the check as
    /// the key cap does.
    pub fn check_for(
        &self,
        checks: &[LimitCheck],
        all_or_nothing: bool,
        now_ms: u64,
        quota: KeyQuota<'_>,
    ) -> Result<Vec<LimitResult>, EngineError> {
        if all_or_nothing && checks.len() > 1 {
            return self.check_atomic(checks, now_ms, quota, Atomic::Consume);
        }
        // Looked up on the first new key only: the hot path (known keys)
        // never touches the owners' map.
        let mut owner = None;
        let mut results = Vec::with_capacity(checks.len());
        for check in checks {
            let (h, s) = self.locate(&check.key);
            let mut guard = lock(&self.shards[s]);
            let ShardState {
                table,
                dirty,
                owners,
                held,
            } = &mut *guard;
            let stored = table.find_mut(h, |e| e.0.is(&check.key));
            let (result, cell) = decide_held(
                check,
                stored.as_ref().map(|e| &e.1),
                now_ms,
                held_at(held, h),
            );
            // A dry run decides for the real cost but stores nothing.
            if let Some(cell) = cell.filter(|_| !check.dry_run) {
                match stored {
                    Some(e) => store(e, cell, h, dirty),
                    None => {
                        let owner = owner.get_or_insert_with(|| self.owner(quota.principal));
                        self.insert(table, dirty, h, &check.key, cell, owner, quota)?;
                        if let Some(o) = owner {
                            if let Some(old) = owners.insert(h, o.clone()) {
                                old.fetch_sub(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            results.push(result);
        }
        Ok(results)
    }

    /// Stores a new key, within the key cap and `owner`'s quota (whose
    /// count it then holds a place in).
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        table: &mut HashTable<Entry>,
        dirty: &mut Vec<u64>,
        h: u64,
        key: &str,
        cell: Cell,
        owner: &Option<Owner>,
        quota: KeyQuota<'_>,
    ) -> Result<(), EngineError> {
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.max_keys {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Exhausted {
                what: "rate-limit keys".into(),
                max: self.max_keys,
            });
        }
        if let Err(e) = Self::take(owner, 1, quota) {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        let hasher = &self.hasher;
        table.insert_unique(h, (Key::new(key), cell.dirty()), |e| {
            hasher.hash_one(e.0.as_str())
        });
        dirty.push(h);
        Ok(())
    }

    /// All-or-nothing: lock every shard involved (in index order, so
    /// concurrent requests cannot deadlock), decide all checks against a
    /// scratch overlay (a key may appear twice), then store only if all pass.
    /// Counts `n` new keys against the table's cap and the caller's quota
    /// (nothing when `n` is 0); the owner the new keys are recorded under.
    fn reserve_new_keys(
        &self,
        n: usize,
        quota: KeyQuota<'_>,
    ) -> Result<Option<Owner>, EngineError> {
        if n == 0 {
            return Ok(None);
        }
        let before = self.live.fetch_add(n, Ordering::Relaxed);
        if before + n > self.max_keys {
            self.live.fetch_sub(n, Ordering::Relaxed);
            return Err(EngineError::Exhausted {
                what: "rate-limit keys".into(),
                max: self.max_keys,
            });
        }
        let owner = self.owner(quota.principal);
        if let Err(e) = Self::take(&owner, n as u64, quota) {
            self.live.fetch_sub(n, Ordering::Relaxed);
            return Err(e);
        }
        Ok(owner)
    }

    /// `mode` says what passing means: consume now, hold until confirmed
    /// or released, or confirm (consume what a reservation held).
    fn check_atomic(
        &self,
        checks: &[LimitCheck],
        now_ms: u64,
        quota: KeyQuota<'_>,
        mode: Atomic,
    ) -> Result<Vec<LimitResult>, EngineError> {
        let located: Vec<(u64, usize)> = checks.iter().map(|c| self.locate(&c.key)).collect();
        let mut order: Vec<usize> = located.iter().map(|l| l.1).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, ShardState>)> =
            order.iter().map(|&s| (s, lock(&self.shards[s]))).collect();
        let guard_of = |s: usize| order.binary_search(&s).unwrap_or(0);
        if mode == Atomic::Confirm {
            // What the reservation held is consumed below instead.
            for (i, check) in checks.iter().enumerate() {
                let (h, s) = located[i];
                holds::unhold(&mut guards[guard_of(s)].1.held, h, check);
            }
        }

        let mut results = Vec::with_capacity(checks.len());
        // (check index, new cell) for every consuming check so far.
        let mut overlay: Vec<(usize, Cell)> = Vec::new();
        let mut all_allowed = true;
        let mut new_keys = 0usize;
        for (i, check) in checks.iter().enumerate() {
            let (h, s) = located[i];
            let earlier = overlay
                .iter()
                .rev()
                .find(|(j, _)| located[*j].0 == h && checks[*j].key == check.key)
                .map(|(_, c)| *c);
            let shard = &guards[guard_of(s)].1;
            let stored = shard.find(h, |e| e.0.is(&check.key));
            let current = earlier.or(stored.map(|e| e.1));
            let (result, cell) =
                decide_held(check, current.as_ref(), now_ms, held_at(&shard.held, h));
            all_allowed &= result.allowed;
            if let Some(cell) = cell.filter(|_| !check.dry_run) {
                if stored.is_none() && earlier.is_none() {
                    new_keys += 1;
                }
                overlay.push((i, cell));
            }
            results.push(result);
        }
        if !all_allowed {
            none_consumed(&mut results, checks);
            return Ok(results);
        }
        if mode == Atomic::Hold {
            // The key cap is checked now too, so that a confirm is refused
            // for it only when other keys came in between.
            if self.live.load(Ordering::Relaxed) + new_keys > self.max_keys {
                return Err(EngineError::Exhausted {
                    what: "rate-limit keys".into(),
                    max: self.max_keys,
                });
            }
            for (i, check) in checks.iter().enumerate() {
                let (h, s) = located[i];
                holds::hold(&mut guards[guard_of(s)].1.held, h, check);
            }
            return Ok(results);
        }
        let owner = self.reserve_new_keys(new_keys, quota)?;
        let hasher = &self.hasher;
        for (i, cell) in overlay {
            let (h, s) = located[i];
            let ShardState {
                table,
                dirty,
                owners,
                ..
            } = &mut *guards[guard_of(s)].1;
            match table.find_mut(h, |e| e.0.is(&checks[i].key)) {
                Some(e) => store(e, cell, h, dirty),
                None => {
                    let entry = (Key::new(&checks[i].key), cell.dirty());
                    table.insert_unique(h, entry, |e| hasher.hash_one(e.0.as_str()));
                    dirty.push(h);
                    if let Some(o) = &owner {
                        if let Some(old) = owners.insert(h, o.clone()) {
                            old.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        Ok(results)
    }

    /// Stores cells as given (state replicated from a leader, or a restored
    /// snapshot), ignoring the key cap: the cap is enforced where decisions
    /// are made.
    pub fn upsert<K: AsRef<str>>(&self, cells: impl IntoIterator<Item = (K, Cell)>) {
        let hasher = &self.hasher;
        for (key, cell) in cells {
            let key = key.as_ref();
            let (h, s) = self.locate(key);
            let cell = cell.clean();
            let mut table = lock(&self.shards[s]);
            match table.find_mut(h, |e| e.0.is(key)) {
                Some(e) => e.1 = cell,
                None => {
                    table
                        .insert_unique(h, (Key::new(key), cell), |e| hasher.hash_one(e.0.as_str()));
                    self.live.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Drops every cell that is equivalent to an absent key at `now_ms`
    /// (full buckets, lapsed windows). Returns how many were dropped. Locks
    /// one shard at a time.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut guard = lock(shard);
            let ShardState { table, owners, .. } = &mut *guard;
            let before = table.len();
            let hasher = &self.hasher;
            table.retain(|e| {
                let keep = e.1.idle_at_ms() > now_ms;
                if !keep && !owners.is_empty() {
                    disown(owners, hasher.hash_one(e.0.as_str()));
                }
                keep
            });
            let n = before - table.len();
            if table.capacity() > 4 * table.len().max(64) {
                table.shrink_to(0, |e| self.hasher.hash_one(e.0.as_str()));
            }
            dropped += n;
        }
        self.live.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    /// Drops every cell.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut state = lock(shard);
            self.live.fetch_sub(state.len(), Ordering::Relaxed);
            for o in state.owners.values() {
                o.fetch_sub(1, Ordering::Relaxed);
            }
            *state = ShardState::default();
        }
    }

    /// Visits every stored cell (clean), one shard at a time, holding only
    /// that shard's lock while visiting it.
    pub fn for_each(&self, mut f: impl FnMut(&str, Cell)) {
        for shard in self.shards.iter() {
            for (k, c) in lock(shard).iter() {
                f(k.as_str(), c.clean());
            }
        }
    }

    /// Every stored cell, for snapshots.
    pub fn cells(&self) -> Vec<(String, Cell)> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            out.extend(
                lock(shard)
                    .iter()
                    .map(|(k, c)| (k.as_str().to_owned(), c.clean())),
            );
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// An all-or-nothing batch that was denied: a check that would have passed
/// is denied too, and nothing it would have consumed was.
pub fn none_consumed(results: &mut [LimitResult], checks: &[LimitCheck]) {
    for (r, c) in results.iter_mut().zip(checks) {
        if r.allowed {
            r.allowed = false;
            // A check that would have waited (reserve mode) found the
            // bucket too full to go now: it keeps reporting 0 left.
            if !c.dry_run && r.delay_ms == 0 {
                r.remaining = r.remaining.saturating_add(c.cost).min(r.limit);
            }
            r.delay_ms = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::CELL_BYTES;

    const BUCKET_OF_TEN: super::super::LimitDef = super::super::LimitDef::TokenBucket {
        capacity: 10,
        refill_tokens: 1,
        refill_interval_ms: 1000,
    };

    #[test]
    fn changed_cells_are_drained_once() {
        let t = LimitTable::new(4, 100);
        let def = BUCKET_OF_TEN;
        let check = |key: &str, cost| LimitCheck {
            key: key.into(),
            limit: def,
            cost,
            dry_run: false,
            max_delay_ms: 0,
        };
        t.check(&[check("a", 1), check("b", 1), check("a", 2)], false, 0)
            .unwrap();
        t.check(&[check("c", 0)], false, 0).unwrap(); // a peek changes nothing
        let mut d: Vec<(String, Cell)> = t.drain_dirty(usize::MAX, usize::MAX);
        d.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            d.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(d[0].1.a, 7, "the latest state of a");
        assert!(d.iter().all(|x| !x.1.is_dirty()));
        assert!(t.drain_dirty(usize::MAX, usize::MAX).is_empty());
        t.check(&[check("b", 1), check("d", 1)], true, 0).unwrap();
        assert_eq!(t.drain_dirty(usize::MAX, usize::MAX).len(), 2);
        // Replicated cells are stored clean, never re-shipped.
        let other = LimitTable::new(4, 100);
        other.upsert(d);
        assert!(other.drain_dirty(usize::MAX, usize::MAX).is_empty());
    }

    #[test]
    fn cells_serialize_as_compact_arrays() {
        let c = Cell {
            tag: 1,
            aux: 2,
            a: 3,
            b: 4,
            c: 5,
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, "[1,2,3,4,5]");
        assert_eq!(serde_json::from_str::<Cell>(&json).unwrap(), c);
    }

    #[test]
    fn dirty_cells_drain_in_bounded_chunks() {
        let t = LimitTable::new(4, 10_000);
        let def = BUCKET_OF_TEN;
        let checks: Vec<_> = (0..1000)
            .map(|i| LimitCheck {
                key: format!("k{i}"),
                limit: def,
                cost: 1,
                dry_run: false,
                max_delay_ms: 0,
            })
            .collect();
        t.check(&checks, false, 0).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        loop {
            let chunk = t.drain_dirty(100, usize::MAX);
            if chunk.is_empty() {
                break;
            }
            // A chunk stops at the bound (plus any keys sharing the last hash).
            assert!(chunk.len() <= 102, "chunk of {}", chunk.len());
            for (k, _) in chunk.iter() {
                assert!(seen.insert(k.to_owned()), "a cell drained twice");
            }
        }
        assert_eq!(seen.len(), 1000, "every changed cell drained once");
    }

    #[test]
    fn dirty_cells_of_long_keys_drain_in_chunks_bounded_by_bytes() {
        let t = LimitTable::new(4, 10_000);
        let checks: Vec<_> = (0..1000)
            .map(|i| LimitCheck {
                key: format!("{i:04}{}", "x".repeat(1020)),
                limit: BUCKET_OF_TEN,
                cost: 1,
                dry_run: false,
                max_delay_ms: 0,
            })
            .collect();
        t.check(&checks, false, 0).unwrap();
        const BYTES: usize = 64 * 1024;
        let mut drained = 0;
        loop {
            let chunk = t.drain_dirty(usize::MAX, BYTES);
            if chunk.is_empty() {
                break;
            }
            // Over the bound by at most the last step's cells (one, or the
            // few sharing its hash tag).
            let bytes: usize = chunk.iter().map(|(k, _)| k.len() + CELL_BYTES).sum();
            assert!(
                bytes < BYTES + 8 * 1100,
                "{bytes} bytes in {} cells",
                chunk.len()
            );
            drained += chunk.len();
        }
        assert_eq!(drained, 1000, "every changed cell drained once");
    }

    #[test]
    fn keys_round_trip_inline_and_boxed() {
        assert_eq!(std::mem::size_of::<Key>(), 24);
        for s in [
            "",
            "a",
            &"x".repeat(INLINE),
            &"y".repeat(INLINE + 1),
            "ünïcödé:ключ",
        ] {
            let k = Key::new(s);
            assert_eq!(k.as_str(), s);
            assert!(k.is(s));
            assert!(!k.is("other"));
            assert_eq!(matches!(k, Key::Inline { .. }), s.len() <= INLINE);
        }
    }
}
