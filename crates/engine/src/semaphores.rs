//! Distributed semaphores: at most `limit` permits held at once under a
//! name, by every caller together.
//!
//! The limit is the caller's, sent with each acquire as a rate limit's
//! definition is: it bounds what that acquire may take and never evicts
//! permits already held (a lowered limit only refuses new ones until enough
//! lapse or are released). Each holder's permits are a lease: granted with
//! a fencing token from the semaphores' own counter (so tokens are unique
//! and increase), live while `now < expires_at_ms`, renewed or released by
//! their holder under that token, and treated as gone the moment they
//! lapse, whether or not a sweep has purged them yet. A holder holds one
//! entry per name: acquiring again renews it (a retried acquire never
//! takes twice).
//!
//! With authentication on, an entry records the principal it was granted
//! to; only that principal may renew or release it.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::EngineError;
use crate::usage::Usage;

/// One holder's permits under a name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permit {
    pub name: String,
    pub holder: String,
    pub permits: u64,
    pub fencing_token: u64,
    pub ttl_ms: u64,
    pub expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub principal: String,
}

impl Permit {
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.expires_at_ms.saturating_sub(now_ms)
    }
}

/// What an acquire did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemaphoreGrant {
    /// The caller's permits, when granted (or renewed).
    pub permit: Option<Permit>,
    /// Permits held under the name after the call, by everyone.
    pub held: u64,
    /// When not granted: the earliest time a live entry lapses (0: none).
    pub next_lapse_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SemaphoreEventKind {
    Acquired,
    Renewed,
    Released,
    Expired,
}

/// A change under a semaphore's name, for watchers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemaphoreEvent {
    pub kind: SemaphoreEventKind,
    pub permit: Permit,
    /// Permits held under the name after the change.
    pub held: u64,
}

/// An entry as stored, under its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    holder: String,
    permits: u64,
    fencing_token: u64,
    ttl_ms: u64,
    expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    principal: String,
}

impl Entry {
    fn view(&self, name: &str) -> Permit {
        Permit {
            name: name.to_owned(),
            holder: self.holder.clone(),
            permits: self.permits,
            fencing_token: self.fencing_token,
            ttl_ms: self.ttl_ms,
            expires_at_ms: self.expires_at_ms,
            principal: self.principal.clone(),
        }
    }

    fn owned_by(&self, principal: &str) -> bool {
        self.principal.is_empty() || self.principal == principal
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemaphoreTable {
    /// Each name's entries, one per holder, in grant order.
    names: HashMap<String, Vec<Entry>>,
    /// The last fencing token granted (0 = none yet).
    last_token: u64,
    /// (deadline, name, holder) of every stored entry.
    #[serde(skip)]
    deadlines: BTreeSet<(u64, String, String)>,
    /// Stored entries, for the cap.
    #[serde(skip)]
    entries: usize,
    #[serde(skip)]
    max_entries: usize,
    /// Stored entries per principal, for quotas.
    #[serde(skip)]
    usage: Usage,
}

/// One acquire's arguments.
#[derive(Clone, Copy, Debug)]
pub struct Ask<'a> {
    pub name: &'a str,
    pub holder: &'a str,
    pub principal: &'a str,
    pub limit: u64,
    pub permits: u64,
    pub ttl_ms: u64,
    /// How many entries the principal may hold (`None`: no quota).
    pub quota: Option<u64>,
}

impl SemaphoreTable {
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            ..Self::default()
        }
    }

    /// Re-applies the cap and rebuilds the indexes after a restore.
    pub(crate) fn restored(&mut self, max_entries: usize) {
        self.max_entries = max_entries;
        self.usage = Usage::default();
        self.deadlines.clear();
        self.entries = 0;
        for (name, list) in &self.names {
            for e in list {
                self.usage.add(&e.principal, 1);
                self.deadlines
                    .insert((e.expires_at_ms, name.clone(), e.holder.clone()));
                self.entries += 1;
            }
        }
    }

    /// Stores an entry as exported (a snapshot being loaded), replacing the
    /// holder's under that name; ignores the cap, as a restore does.
    pub(crate) fn put(&mut self, p: Permit) {
        self.raise_last_token(p.fencing_token);
        let entry = Entry {
            holder: p.holder,
            permits: p.permits,
            fencing_token: p.fencing_token,
            ttl_ms: p.ttl_ms,
            expires_at_ms: p.expires_at_ms,
            principal: p.principal,
        };
        self.remove(&p.name, &entry.holder);
        self.insert(&p.name, entry);
        // Entries arrive in no order: kept in grant (token) order, as
        // granting keeps them.
        if let Some(list) = self.names.get_mut(&p.name) {
            list.sort_by_key(|e| e.fencing_token);
        }
    }

    /// Every stored entry (lapsed ones not yet swept too), in no order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Permit> + '_ {
        self.names
            .iter()
            .flat_map(|(name, list)| list.iter().map(move |e| e.view(name)))
    }

    /// Raises the token counter to `token` (never back: a snapshot older
    /// than what this node has seen cannot make a token be granted twice).
    pub(crate) fn raise_last_token(&mut self, token: u64) {
        self.last_token = self.last_token.max(token);
    }

    pub fn last_token(&self) -> u64 {
        self.last_token
    }

    /// Stored entries, lapsed ones not yet swept included.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Stored entries of `principal`.
    pub fn held_by(&self, principal: &str) -> u64 {
        self.usage.of(principal)
    }

    fn insert(&mut self, name: &str, e: Entry) {
        self.usage.add(&e.principal, 1);
        self.deadlines
            .insert((e.expires_at_ms, name.to_owned(), e.holder.clone()));
        self.entries += 1;
        self.names.entry(name.to_owned()).or_default().push(e);
    }

    fn remove(&mut self, name: &str, holder: &str) -> Option<Entry> {
        let list = self.names.get_mut(name)?;
        let i = list.iter().position(|e| e.holder == holder)?;
        let e = list.remove(i);
        if list.is_empty() {
            self.names.remove(name);
        }
        self.usage.sub(&e.principal, 1);
        self.deadlines
            .remove(&(e.expires_at_ms, name.to_owned(), e.holder.clone()));
        self.entries -= 1;
        Some(e)
    }

    /// Drops `name`'s lapsed entries, reporting each as expired.
    fn purge(&mut self, name: &str, now_ms: u64, events: &mut Vec<SemaphoreEvent>) {
        let lapsed: Vec<String> = match self.names.get(name) {
            Some(list) => list
                .iter()
                .filter(|e| e.expires_at_ms <= now_ms)
                .map(|e| e.holder.clone())
                .collect(),
            None => return,
        };
        for holder in lapsed {
            if let Some(e) = self.remove(name, &holder) {
                let held = self.held(name, now_ms);
                events.push(SemaphoreEvent {
                    kind: SemaphoreEventKind::Expired,
                    permit: e.view(name),
                    held,
                });
            }
        }
    }

    /// Permits held under `name` at `now_ms` (live entries only).
    pub fn held(&self, name: &str, now_ms: u64) -> u64 {
        self.names.get(name).map_or(0, |list| {
            list.iter()
                .filter(|e| now_ms < e.expires_at_ms)
                .map(|e| e.permits)
                .sum()
        })
    }

    /// Live entries under `name`, in grant order.
    pub fn get(&self, name: &str, now_ms: u64) -> Vec<Permit> {
        self.names.get(name).map_or_else(Vec::new, |list| {
            list.iter()
                .filter(|e| now_ms < e.expires_at_ms)
                .map(|e| e.view(name))
                .collect()
        })
    }

    /// Grants `ask.permits` if they fit under `ask.limit` with what is
    /// held, renews the holder's own entry (keeping its token; a changed
    /// count is taken if it fits), or reports how many are held and when
    /// the next entry lapses.
    pub fn acquire(
        &mut self,
        ask: Ask<'_>,
        now_ms: u64,
        events: &mut Vec<SemaphoreEvent>,
    ) -> Result<SemaphoreGrant, EngineError> {
        let name = ask.name;
        self.purge(name, now_ms, events);
        let held = self.held(name, now_ms);
        let expires_at_ms = now_ms.saturating_add(ask.ttl_ms);
        let list = self.names.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let next_lapse_ms = list.iter().map(|e| e.expires_at_ms).min().unwrap_or(0);
        let refused = |held| SemaphoreGrant {
            permit: None,
            held,
            next_lapse_ms,
        };
        if let Some(mine) = list.iter().find(|e| e.holder == ask.holder) {
            if !mine.owned_by(ask.principal) {
                return Ok(refused(held));
            }
            let others = held - mine.permits;
            if others.saturating_add(ask.permits) > ask.limit && ask.permits > mine.permits {
                return Ok(refused(held));
            }
            let old = (mine.expires_at_ms, name.to_owned(), ask.holder.to_owned());
            self.deadlines.remove(&old);
            self.deadlines
                .insert((expires_at_ms, name.to_owned(), ask.holder.to_owned()));
            let list = self
                .names
                .get_mut(name)
                .expect("the holder's entry is stored");
            let e = list
                .iter_mut()
                .find(|e| e.holder == ask.holder)
                .expect("found above");
            e.permits = ask.permits;
            e.ttl_ms = ask.ttl_ms;
            e.expires_at_ms = expires_at_ms;
            let permit = e.view(name);
            let held = others + ask.permits;
            events.push(SemaphoreEvent {
                kind: SemaphoreEventKind::Renewed,
                permit: permit.clone(),
                held,
            });
            return Ok(SemaphoreGrant {
                permit: Some(permit),
                held,
                next_lapse_ms: 0,
            });
        }
        if held.saturating_add(ask.permits) > ask.limit {
            return Ok(refused(held));
        }
        if self.last_token == u64::MAX {
            return Err(EngineError::CounterAtMax {
                what: "semaphore fencing tokens".into(),
            });
        }
        if self.entries >= self.max_entries {
            return Err(EngineError::Exhausted {
                what: "semaphore holders".into(),
                max: self.max_entries,
            });
        }
        self.usage
            .check(ask.principal, 1, ask.quota, "semaphore holders")?;
        self.last_token += 1;
        let e = Entry {
            holder: ask.holder.to_owned(),
            permits: ask.permits,
            fencing_token: self.last_token,
            ttl_ms: ask.ttl_ms,
            expires_at_ms,
            principal: ask.principal.to_owned(),
        };
        let permit = e.view(name);
        self.insert(name, e);
        let held = held + ask.permits;
        events.push(SemaphoreEvent {
            kind: SemaphoreEventKind::Acquired,
            permit: permit.clone(),
            held,
        });
        Ok(SemaphoreGrant {
            permit: Some(permit),
            held,
            next_lapse_ms: 0,
        })
    }

    /// The holder's live entry, proven by its token.
    fn owned(
        &self,
        name: &str,
        holder: &str,
        principal: &str,
        token: u64,
        now_ms: u64,
    ) -> Result<&Entry, EngineError> {
        let live = self.names.get(name).and_then(|list| {
            list.iter()
                .find(|e| e.holder == holder && now_ms < e.expires_at_ms)
        });
        match live {
            Some(e) if !e.owned_by(principal) => Err(EngineError::NotPermitOwner {
                name: name.to_owned(),
                principal: principal.to_owned(),
            }),
            Some(e) if e.fencing_token == token => Ok(e),
            _ => Err(EngineError::NotPermitHolder {
                name: name.to_owned(),
                holder: holder.to_owned(),
                fencing_token: token,
            }),
        }
    }

    /// Extends the holder's live entry to `ttl_ms` from now.
    #[allow(clippy::too_many_arguments)]
    pub fn renew(
        &mut self,
        name: &str,
        holder: &str,
        principal: &str,
        token: u64,
        ttl_ms: u64,
        now_ms: u64,
        events: &mut Vec<SemaphoreEvent>,
    ) -> Result<Permit, EngineError> {
        let old = self
            .owned(name, holder, principal, token, now_ms)?
            .expires_at_ms;
        let new = now_ms.saturating_add(ttl_ms);
        self.deadlines
            .remove(&(old, name.to_owned(), holder.to_owned()));
        self.deadlines
            .insert((new, name.to_owned(), holder.to_owned()));
        let list = self.names.get_mut(name).expect("owned entry is stored");
        let e = list
            .iter_mut()
            .find(|e| e.holder == holder)
            .expect("owned entry is stored");
        e.ttl_ms = ttl_ms;
        e.expires_at_ms = new;
        let permit = e.view(name);
        events.push(SemaphoreEvent {
            kind: SemaphoreEventKind::Renewed,
            permit: permit.clone(),
            held: self.held(name, now_ms),
        });
        Ok(permit)
    }

    /// Gives up the holder's live entry.
    pub fn release(
        &mut self,
        name: &str,
        holder: &str,
        principal: &str,
        token: u64,
        now_ms: u64,
        events: &mut Vec<SemaphoreEvent>,
    ) -> Result<Permit, EngineError> {
        self.owned(name, holder, principal, token, now_ms)?;
        let e = self.remove(name, holder).expect("owned entry is stored");
        let permit = e.view(name);
        events.push(SemaphoreEvent {
            kind: SemaphoreEventKind::Released,
            permit: permit.clone(),
            held: self.held(name, now_ms),
        });
        Ok(permit)
    }

    /// Purges lapsed entries, reporting each as expired (in deadline, name
    /// and holder order, the same on every replica).
    pub fn sweep(&mut self, now_ms: u64, events: &mut Vec<SemaphoreEvent>) -> usize {
        let mut n = 0;
        while let Some((deadline, name, holder)) = self.deadlines.first().cloned() {
            if deadline > now_ms {
                break;
            }
            if let Some(e) = self.remove(&name, &holder) {
                let held = self.held(&name, now_ms);
                events.push(SemaphoreEvent {
                    kind: SemaphoreEventKind::Expired,
                    permit: e.view(&name),
                    held,
                });
                n += 1;
            }
        }
        n
    }

    /// Moves every live entry's deadline `by_ms` later (a new leader's
    /// grace: a failover never shortens a permit). Returns how many.
    pub fn extend_all(&mut self, by_ms: u64, now_ms: u64) -> usize {
        let mut n = 0;
        for list in self.names.values_mut() {
            for e in list.iter_mut().filter(|e| now_ms < e.expires_at_ms) {
                e.expires_at_ms = e.expires_at_ms.saturating_add(by_ms);
                n += 1;
            }
        }
        let max = self.max_entries;
        self.restored(max);
        n
    }

    /// The earliest deadline of any stored entry.
    pub fn next_expiry(&self) -> Option<u64> {
        self.deadlines.first().map(|d| d.0)
    }
}
