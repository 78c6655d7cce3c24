//! Leases with fencing tokens.
//!
//! A lease is live while `now < expires_at_ms`; a lapsed lease is treated as
//! absent at once (whether or not a sweep has purged it yet). Fencing tokens
//! come from one counter shared by all names, so a token is never reused
//! even after a name's lease was purged, and tokens for one name strictly
//! increase with every new grant.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::EngineError;

/// A lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub fencing_token: u64,
    pub ttl_ms: u64,
    pub expires_at_ms: u64,
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTable {
    held: HashMap<String, Held>,
    /// The last fencing token granted (0 = none yet).
    last_token: u64,
    #[serde(skip)]
    max_leases: usize,
}

fn view(name: &str, h: &Held) -> Lease {
    Lease {
        name: name.to_owned(),
        holder: h.holder.clone(),
        fencing_token: h.fencing_token,
        ttl_ms: h.ttl_ms,
        expires_at_ms: h.expires_at_ms,
    }
}

impl LeaseTable {
    pub fn new(max_leases: usize) -> Self {
        Self {
            max_leases,
            ..Self::default()
        }
    }

    pub(crate) fn set_max(&mut self, max_leases: usize) {
        self.max_leases = max_leases;
    }

    /// Stored leases, including lapsed ones not yet swept.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
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
    /// other holder's (`acquired = false`).
    pub fn acquire(&mut self, name: &str, holder: &str, ttl_ms: u64, now_ms: u64, events: &mut Vec<LeaseEvent>) -> Result<(bool, Lease), EngineError> {
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        if let Some(h) = self.live(name, now_ms) {
            if h.holder != holder {
                return Ok((false, view(name, h)));
            }
            let h = self.held.get_mut(name).expect("live lease is stored");
            h.ttl_ms = ttl_ms;
            h.expires_at_ms = expires_at_ms;
            let lease = view(name, h);
            events.push(LeaseEvent {
                kind: LeaseEventKind::Renewed,
                lease: lease.clone(),
            });
            return Ok((true, lease));
        }
        if let Some(old) = self.held.remove(name) {
            // Lapsed but not yet swept: watchers learn it expired first.
            events.push(LeaseEvent {
                kind: LeaseEventKind::Expired,
                lease: view(name, &old),
            });
        } else if self.held.len() >= self.max_leases {
            return Err(EngineError::Exhausted {
                what: "leases",
                max: self.max_leases,
            });
        }
        self.last_token += 1;
        let h = Held {
            holder: holder.to_owned(),
            fencing_token: self.last_token,
            ttl_ms,
            expires_at_ms,
        };
        let lease = view(name, &h);
        self.held.insert(name.to_owned(), h);
        events.push(LeaseEvent {
            kind: LeaseEventKind::Acquired,
            lease: lease.clone(),
        });
        Ok((true, lease))
    }

    fn owned_mut(&mut self, name: &str, holder: &str, token: u64, now_ms: u64) -> Result<&mut Held, EngineError> {
        match self.held.get_mut(name) {
            Some(h) if now_ms < h.expires_at_ms && h.holder == holder && h.fencing_token == token => Ok(h),
            _ => Err(EngineError::NotHolder {
                name: name.to_owned(),
                holder: holder.to_owned(),
                fencing_token: token,
            }),
        }
    }

    pub fn renew(&mut self, name: &str, holder: &str, token: u64, ttl_ms: u64, now_ms: u64, events: &mut Vec<LeaseEvent>) -> Result<Lease, EngineError> {
        let h = self.owned_mut(name, holder, token, now_ms)?;
        h.ttl_ms = ttl_ms;
        h.expires_at_ms = now_ms.saturating_add(ttl_ms);
        let lease = view(name, h);
        events.push(LeaseEvent {
            kind: LeaseEventKind::Renewed,
            lease: lease.clone(),
        });
        Ok(lease)
    }

    pub fn release(&mut self, name: &str, holder: &str, token: u64, now_ms: u64, events: &mut Vec<LeaseEvent>) -> Result<Lease, EngineError> {
        self.owned_mut(name, holder, token, now_ms)?;
        let h = self.held.remove(name).expect("owned lease is stored");
        let lease = view(name, &h);
        events.push(LeaseEvent {
            kind: LeaseEventKind::Released,
            lease: lease.clone(),
        });
        Ok(lease)
    }

    /// Purges lapsed leases, reporting each as expired.
    pub fn sweep(&mut self, now_ms: u64, events: &mut Vec<LeaseEvent>) -> usize {
        let before = self.held.len();
        let first = events.len();
        self.held.retain(|name, h| {
            let live = now_ms < h.expires_at_ms;
            if !live {
                events.push(LeaseEvent {
                    kind: LeaseEventKind::Expired,
                    lease: view(name, h),
                });
            }
            live
        });
        // Sorted so every replica reports the same order.
        events[first..].sort_by(|a, b| a.lease.name.cmp(&b.lease.name));
        before - self.held.len()
    }

    /// The earliest deadline of any stored lease.
    pub fn next_expiry(&self) -> Option<u64> {
        self.held.values().map(|h| h.expires_at_ms).min()
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
        assert!(matches!(t.renew("db", "alice", 2, 100, 70, ev), Err(EngineError::NotHolder { .. })));
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
    fn cap_on_live_leases() {
        let mut t = LeaseTable::new(1);
        let ev = &mut Vec::new();
        t.acquire("a", "h", 10, 0, ev).unwrap();
        assert!(matches!(t.acquire("b", "h", 10, 0, ev), Err(EngineError::Exhausted { .. })));
        // A lapsed lease's slot is reused without a sweep.
        t.acquire("a", "h2", 10, 10, ev).unwrap();
    }
}
