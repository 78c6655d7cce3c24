//! Leases with fencing tokens.
//!
//! A lease is live while `now < expires_at_ms`; a lapsed lease is treated as
//! absent at once (whether or not a sweep has purged it yet). Fencing tokens
//! come from one counter shared by all names, so a token is never reused
//! even after a name's lease was purged, and tokens for one name strictly
//! increase with every new grant.
//!
//! With authentication on, a lease also records the principal that was
//! granted it; only that principal may then renew it (by `renew` or by
//! acquiring it again) or release it. A lease granted without a principal
//! (authentication off) is owned by its holder name alone.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::EngineError;
use crate::usage::Usage;

/// A lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub fencing_token: u64,
    pub ttl_ms: u64,
    pub expires_at_ms: u64,
    /// The authenticated principal it was granted to ("" without
    /// authentication).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

impl Lease {
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.expires_at_ms.saturating_sub(now_ms)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseEventKind {
    Acquired,
    Renewed,
    Released,
    Expired,
}

/// A change to a lease, for watchers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEvent {
    pub kind: LeaseEventKind,
    pub lease: Lease,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Held {
    holder: String,
    fencing_token: u64,
    ttl_ms: u64,
    expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    principal: String,
}

impl Held {
    /// Whether `principal` may renew or release this lease.
    fn owned_by(&self, principal: &str) -> bool {
        self.principal.is_empty() || self.principal == principal
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTable {
    held: HashMap<String, Held>,
    /// The last fencing token granted (0 = none yet).
    last_token: u64,
    /// (deadline, name) of every stored lease: finds the next expiry and the
    /// lapsed leases without scanning the table.
    #[serde(skip)]
    deadlines: BTreeSet<(u64, String)>,
    #[serde(skip)]
    max_leases: usize,
    /// Stored leases per principal (lapsed ones not yet swept too, as in
    /// the cap), for quotas.
    #[serde(skip)]
    usage: Usage,
}

fn view(name: &str, h: &Held) -> Lease {
    Lease {
        name: name.to_owned(),
        holder: h.holder.clone(),
        fencing_token: h.fencing_token,
        ttl_ms: h.ttl_ms,
        expires_at_ms: h.expires_at_ms,
        principal: h.principal.clone(),
    }
}

impl LeaseTable {
    pub fn new(max_leases: usize) -> Self {
        Self {
            max_leases,
            ..Self::default()
        }
    }

    /// Re-applies limits and rebuilds the deadline index after a restore.
    pub(crate) fn restored(&mut self, max_leases: usize) {
        self.max_leases = max_leases;
        self.usage = Usage::default();
        for h in self.held.values() {
            self.usage.add(&h.principal, 1);
        }
        self.deadlines = self
            .held
            .iter()
            .map(|(n, h)| (h.expires_at_ms, n.clone()))
            .collect();
    }

    /// Every stored lease (lapsed ones not yet swept too), in no order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Lease> + '_ {
        self.held.iter().map(|(n, h)| view(n, h))
    }

    /// Stores a lease as exported (a snapshot being loaded), replacing any
    /// under its name; ignores the cap, as a restore does.
    pub(crate) fn put(&mut self, lease: Lease) {
        let held = Held {
            holder: lease.holder,
            fencing_token: lease.fencing_token,
            ttl_ms: lease.ttl_ms,
            expires_at_ms: lease.expires_at_ms,
            principal: lease.principal,
        };
        let old = self.held.get(&lease.name).map(|h| h.expires_at_ms);
        self.set_deadline(&lease.name, old, Some(held.expires_at_ms));
        self.insert(lease.name, held);
    }

    /// Stores `held` under `name`, keeping the usage counts.
    fn insert(&mut self, name: String, held: Held) {
        self.usage.add(&held.principal, 1);
        if let Some(old) = self.held.insert(name, held) {
            self.usage.sub(&old.principal, 1);
        }
    }

    /// Removes the lease under `name`, keeping the usage counts.
    fn remove(&mut self, name: &str) -> Option<Held> {
        let old = self.held.remove(name)?;
        self.usage.sub(&old.principal, 1);
        Some(old)
    }

    /// Stored leases of `principal`.
    pub fn held_by(&self, principal: &str) -> u64 {
        self.usage.of(principal)
    }

    /// Raises the token counter to `token` (a loaded snapshot never moves
    /// it back: a token once granted is never granted again).
    pub(crate) fn raise_last_token(&mut self, token: u64) {
        self.last_token = self.last_token.max(token);
    }

    fn set_deadline(&mut self, name: &str, old: Option<u64>, new: Option<u64>) {
        if let Some(old) = old {
            self.deadlines.remove(&(old, name.to_owned()));
        }
        if let Some(new) = new {
            self.deadlines.insert((new, name.to_owned()));
        }
    }

    /// Stored leases, including lapsed ones not yet swept.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Live leases whose deadline falls within `within_ms` after `now_ms`
    /// (lapsed ones not yet swept are not counted).
    pub fn expiring(&self, now_ms: u64, within_ms: u64) -> usize {
        let until = now_ms.saturating_add(within_ms);
        self.deadlines
            .range((now_ms.saturating_add(1), String::new())..)
            .take_while(|(deadline, _)| *deadline <= until)
            .count()
    }

    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    fn live(&self, name: &str, now_ms: u64) -> Option<&Held> {
        self.held.get(name).filter(|h| now_ms < h.expires_at_ms)
    }

    pub fn get(&self, name: &str, now_ms: u64) -> Option<Lease> {
        self.live(name, now_ms).map(|h| view(name, h))
    }

    /// Grants a free or lapsed lease, renews the holder's own, or reports the
    /// other holder's (`acquired = false`). No principal: see [`acquire_as`](Self::acquire_as).
    #[cfg(any(test, feature = "test-support"))]
    pub fn acquire(
        &mut self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: u64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<(bool, Lease), EngineError> {
        self.acquire_as(name, holder, "", None, ttl_ms, now_ms, events)
    }

    /// `acquire` by `principal`: a lease held under the
    /// same holder name by another principal is reported as held, not
    /// renewed. A new lease is refused when `principal` already holds
    /// `quota` of them.
    #[allow(clippy::too_many_arguments)]
    pub fn acquire_as(
        &mut self,
        name: &str,
        holder: &str,
        principal: &str,
        quota: Option<u64>,
        ttl_ms: u64,
        now_ms: u64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<(bool, Lease), EngineError> {
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        if let Some(h) = self.live(name, now_ms) {
            if h.holder != holder || !h.owned_by(principal) {
                return Ok((false, view(name, h)));
            }
            let h = self.held.get_mut(name).expect("live lease is stored");
            let old = std::mem::replace(&mut h.expires_at_ms, expires_at_ms);
            h.ttl_ms = ttl_ms;
            let lease = view(name, h);
            self.set_deadline(name, Some(old), Some(expires_at_ms));
            events.push(LeaseEvent {
                kind: LeaseEventKind::Renewed,
                lease: lease.clone(),
            });
            return Ok((true, lease));
        }
        if self.last_token == u64::MAX {
            return Err(EngineError::CounterAtMax {
                what: "fencing tokens".into(),
            });
        }
        // A lapsed lease of the same principal makes room for this one.
        let replaced = self.held.get(name).map(|h| h.principal == principal);
        self.usage.check(
            principal,
            u64::from(replaced != Some(true)),
            quota,
            "leases",
        )?;
        if let Some(old) = self.remove(name) {
            self.set_deadline(name, Some(old.expires_at_ms), None);
            // Lapsed but not yet swept: watchers learn it expired first.
            events.push(LeaseEvent {
                kind: LeaseEventKind::Expired,
                lease: view(name, &old),
            });
        } else if self.held.len() >= self.max_leases {
            return Err(EngineError::Exhausted {
                what: "leases".into(),
                max: self.max_leases,
            });
        }
        self.last_token += 1;
        let h = Held {
            holder: holder.to_owned(),
            fencing_token: self.last_token,
            ttl_ms,
            expires_at_ms,
            principal: principal.to_owned(),
        };
        let lease = view(name, &h);
        self.insert(name.to_owned(), h);
        self.set_deadline(name, None, Some(expires_at_ms));
        events.push(LeaseEvent {
            kind: LeaseEventKind::Acquired,
            lease: lease.clone(),
        });
        Ok((true, lease))
    }

    fn owned_mut(
        &mut self,
        name: &str,
        holder: &str,
        principal: &str,
        token: u64,
        now_ms: u64,
    ) -> Result<&mut Held, EngineError> {
        match self.held.get_mut(name) {
            Some(h) if now_ms < h.expires_at_ms && !h.owned_by(principal) => {
                Err(EngineError::NotOwner {
                    name: name.to_owned(),
                    principal: principal.to_owned(),
                })
            }
            Some(h)
                if now_ms < h.expires_at_ms && h.holder == holder && h.fencing_token == token =>
            {
                Ok(h)
            }
            _ => Err(EngineError::NotHolder {
                name: name.to_owned(),
                holder: holder.to_owned(),
                fencing_token: token,
            }),
        }
    }

    #[cfg(any(test, feature = "test-support"))]
    pub fn renew(
        &mut self,
        name: &str,
        holder: &str,
        token: u64,
        ttl_ms: u64,
        now_ms: u64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<Lease, EngineError> {
        self.renew_as(name, holder, "", token, ttl_ms, now_ms, events)
    }

    /// `renew` by `principal`, which must own the lease.
    #[allow(clippy::too_many_arguments)]
    pub fn renew_as(
        &mut self,
        name: &str,
        holder: &str,
        principal: &str,
        token: u64,
        ttl_ms: u64,
        now_ms: u64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<Lease, EngineError> {
        let h = self.owned_mut(name, holder, principal, token, now_ms)?;
        let new = now_ms.saturating_add(ttl_ms);
        let old = std::mem::replace(&mut h.expires_at_ms, new);
        h.ttl_ms = ttl_ms;
        let lease = view(name, h);
        self.set_deadline(name, Some(old), Some(new));
        events.push(LeaseEvent {
            kind: LeaseEventKind::Renewed,
            lease: lease.clone(),
        });
        Ok(lease)
    }

    #[cfg(any(test, feature = "test-support"))]
    pub fn release(
        &mut self,
        name: &str,
        holder: &str,
        token: u64,
        now_ms: u64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<Lease, EngineError> {
        self.release_as(name, holder, "", token, now_ms, events)
    }

    /// `release` by `principal`, which must own the lease.
    pub fn release_as(
        &mut self,
        name: &str,
        holder: &str,
        principal: &str,
        token: u64,
        now_ms: u64,
        events: &mut Vec<LeaseEvent>,
    ) -> Result<Lease, EngineError> {
        self.owned_mut(name, holder, principal, token, now_ms)?;
        let h = self.remove(name).expect("owned lease is stored");
        self.set_deadline(name, Some(h.expires_at_ms), None);
        let lease = view(name, &h);
        events.push(LeaseEvent {
            kind: LeaseEventKind::Released,
            lease: lease.clone(),
        });
        Ok(lease)
    }

    /// Purges lapsed leases, reporting each as expired (in deadline, then
    /// name order, the same on every replica).
    pub fn sweep(&mut self, now_ms: u64, events: &mut Vec<LeaseEvent>) -> usize {
        let mut n = 0;
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now_ms {
                break;
            }
            let (_, name) = self.deadlines.pop_first().expect("first exists");
            if let Some(h) = self.remove(&name) {
                events.push(LeaseEvent {
                    kind: LeaseEventKind::Expired,
                    lease: view(&name, &h),
                });
                n += 1;
            }
        }
        n
    }

    /// Moves every live lease's deadline `by_ms` later. Returns how many.
    pub fn extend_all(&mut self, by_ms: u64, now_ms: u64) -> usize {
        let mut n = 0;
        for h in self.held.values_mut() {
            if now_ms < h.expires_at_ms {
                h.expires_at_ms = h.expires_at_ms.saturating_add(by_ms);
                n += 1;
            }
        }
        self.deadlines = self
            .held
            .iter()
            .map(|(k, h)| (h.expires_at_ms, k.clone()))
            .collect();
        n
    }

    /// The earliest deadline of any stored lease.
    pub fn next_expiry(&self) -> Option<u64> {
        self.deadlines.first().map(|d| d.0)
    }

    /// Every stored lease, sorted by name.
    pub fn leases(&self) -> Vec<Lease> {
        let mut v: Vec<Lease> = self.held.iter().map(|(n, h)| view(n, h)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot can carry the token counter up to its maximum: the last
    /// token is granted, the next acquisition refused (never a wrapped or
    /// repeated token), and the live lease keeps working. Seen failing
    /// before the fix: the counter overflowed.
    #[test]
    fn the_fencing_token_counter_never_wraps() {
        let mut t = LeaseTable::new(10);
        let ev = &mut Vec::new();
        t.last_token = u64::MAX - 1;
        let (ok, last) = t.acquire("a", "pod", 100, 0, ev).unwrap();
        assert!(ok && last.fencing_token == u64::MAX);
        let refused = t.acquire("b", "pod", 100, 0, ev).unwrap_err();
        assert!(
            matches!(refused, EngineError::CounterAtMax { .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("fencing tokens"), "{refused}");
        // Renewing the lease that holds the last token needs no new one.
        t.acquire("a", "pod", 100, 10, ev).unwrap();
        t.release("a", "pod", u64::MAX, 20, ev).unwrap();
        assert!(t.acquire("a", "pod", 100, 30, ev).is_err());
    }

    /// Leases lapsing within a window: lapsed ones and those beyond the
    /// window are not counted, and the window's end is.
    #[test]
    fn expiring_counts_live_leases_lapsing_within_the_window() {
        let mut t = LeaseTable::new(10);
        let ev = &mut Vec::new();
        for (name, ttl) in [("a", 100), ("b", 500), ("c", 1_000), ("d", 5_000)] {
            t.acquire(name, "pod", ttl, 0, ev).unwrap();
        }
        assert_eq!(t.expiring(0, 1_000), 3);
        assert_eq!(t.expiring(0, 999), 2);
        // "a" lapsed at 100 (unswept): not live, not counted.
        assert_eq!(t.expiring(100, 900), 2);
        assert_eq!(t.expiring(100, 10_000), 3);
        assert_eq!(t.expiring(6_000, 10_000), 0);
    }

    #[test]
    fn only_the_granted_principal_renews_or_releases() {
        let mut t = LeaseTable::new(10);
        let ev = &mut Vec::new();
        let (_, l) = t.acquire_as("db", "pod", "bob", None, 100, 0, ev).unwrap();
        assert_eq!(l.principal, "bob");
        let tok = l.fencing_token;
        // Another principal knowing the holder name and token gets nowhere.
        let (ok, seen) = t
            .acquire_as("db", "pod", "alice", None, 100, 10, ev)
            .unwrap();
        assert!(!ok && seen.expires_at_ms == 100, "{seen:?}");
        let not_owner =
            |r: Result<Lease, EngineError>| matches!(r, Err(EngineError::NotOwner { .. }));
        assert!(not_owner(
            t.renew_as("db", "pod", "alice", tok, 100, 20, ev)
        ));
        assert!(not_owner(t.release_as("db", "pod", "alice", tok, 30, ev)));
        // The owner can; a lease granted without a principal is anyone's
        // who names its holder and token.
        assert_eq!(
            t.renew_as("db", "pod", "bob", tok, 100, 40, ev)
                .unwrap()
                .expires_at_ms,
            140
        );
        t.release_as("db", "pod", "bob", tok, 50, ev).unwrap();
        let (_, l) = t.acquire("db", "pod", 100, 60, ev).unwrap();
        t.renew_as("db", "pod", "alice", l.fencing_token, 100, 70, ev)
            .unwrap();
    }

    #[test]
    fn grant_renew_release_and_tokens() {
        let mut t = LeaseTable::new(10);
        let ev = &mut Vec::new();
        let (ok, a) = t.acquire("db", "alice", 100, 0, ev).unwrap();
        assert!(ok);
        assert_eq!(a.fencing_token, 1);
        let (ok, b) = t.acquire("db", "bob", 100, 50, ev).unwrap();
        assert!(!ok);
        assert_eq!(b.holder, "alice");
        // Re-acquire by the holder renews under the same token.
        let (ok, a2) = t.acquire("db", "alice", 100, 60, ev).unwrap();
        assert!(ok);
        assert_eq!((a2.fencing_token, a2.expires_at_ms), (1, 160));
        assert!(matches!(
            t.renew("db", "alice", 2, 100, 70, ev),
            Err(EngineError::NotHolder { .. })
        ));
        t.release("db", "alice", 1, 80, ev).unwrap();
        assert!(t.get("db", 80).is_none());
        let (_, b) = t.acquire("db", "bob", 100, 90, ev).unwrap();
        assert_eq!(b.fencing_token, 2);
        let kinds: Vec<_> = ev.iter().map(|e| e.kind).collect();
        use LeaseEventKind::*;
        assert_eq!(kinds, [Acquired, Renewed, Released, Acquired]);
    }

    #[test]
    fn expires_exactly_at_the_deadline() {
        let mut t = LeaseTable::new(10);
        let ev = &mut Vec::new();
        t.acquire("x", "a", 100, 1000, ev).unwrap();
        assert!(t.get("x", 1099).is_some());
        assert!(t.get("x", 1100).is_none());
        assert!(t.renew("x", "a", 1, 100, 1100, ev).is_err());
        let (ok, l) = t.acquire("x", "b", 100, 1100, ev).unwrap();
        assert!(ok);
        assert_eq!(l.fencing_token, 2);
        assert_eq!(ev[1].kind, LeaseEventKind::Expired);
        assert_eq!(t.sweep(1200, ev), 1);
        assert!(t.is_empty());
        assert_eq!(t.last_token(), 2, "purging keeps the counter");
    }

    #[test]
    fn extension_moves_only_live_deadlines() {
        let mut t = LeaseTable::new(10);
        let ev = &mut Vec::new();
        t.acquire("live", "a", 100, 0, ev).unwrap();
        t.acquire("lapsed", "a", 10, 0, ev).unwrap();
        assert_eq!(t.extend_all(600, 50), 1);
        assert_eq!(t.get("live", 50).unwrap().expires_at_ms, 700);
        assert!(t.get("lapsed", 50).is_none());
        assert_eq!(t.next_expiry(), Some(10));
    }

    #[test]
    fn cap_on_live_leases() {
        let mut t = LeaseTable::new(1);
        let ev = &mut Vec::new();
        t.acquire("a", "h", 10, 0, ev).unwrap();
        assert!(matches!(
            t.acquire("b", "h", 10, 0, ev),
            Err(EngineError::Exhausted { .. })
        ));
        // A lapsed lease's slot is reused without a sweep.
        t.acquire("a", "h2", 10, 10, ev).unwrap();
    }
}
