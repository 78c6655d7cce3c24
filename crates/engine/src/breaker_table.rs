//! The table of circuit breakers (see `breakers`): sharded by name, with
//! the caps, the changes to replicate, and the idle sweep.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::breakers::{Breaker, BreakerDef, CallOutcome, Effect, Phase, Reported, Verdict};
use crate::EngineError;

/// A breaker as the table holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    breaker: Breaker,
    /// The principal whose call made it ("" without authentication).
    principal: String,
}

#[derive(Default)]
struct Shard {
    map: HashMap<String, Slot>,
    dirty: HashSet<String>,
}

/// A breaker's phase change, for watchers and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerChange {
    pub name: String,
    pub from: Phase,
    pub breaker: Breaker,
}

/// Who is asking, for the caps.
#[derive(Clone, Copy, Debug, Default)]
pub struct BreakerQuota<'a> {
    pub principal: &'a str,
    /// Most breakers the principal may make on this node (`None`: no quota).
    pub max: Option<u64>,
}

/// Every breaker this node decides or holds a replica of, sharded by name.
pub struct BreakerTable {
    shards: Vec<Mutex<Shard>>,
    max: usize,
    len: std::sync::atomic::AtomicUsize,
    held: Mutex<HashMap<String, u64>>,
}

const SHARDS: usize = 16;

fn shard_of(name: &str) -> usize {
    let mut h: u32 = 2_166_136_261;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    h as usize % SHARDS
}

impl BreakerTable {
    pub fn new(max: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max,
            len: Default::default(),
            held: Mutex::default(),
        }
    }

    fn shard(&self, name: &str) -> MutexGuard<'_, Shard> {
        // A shard is changed only after every check passed.
        self.shards[shard_of(name)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the breaker under `name`, making it (closed) if absent
    /// and `make` (within the caps; absent and not `make`: `None`); marks
    /// it changed if `f` changed it.
    fn with<T>(
        &self,
        name: &str,
        make: Option<BreakerQuota<'_>>,
        f: impl FnOnce(&mut Breaker) -> (T, Effect),
    ) -> Result<Option<(T, Option<BreakerChange>)>, EngineError> {
        use std::sync::atomic::Ordering;
        let mut shard = self.shard(name);
        let made = !shard.map.contains_key(name);
        if made {
            let Some(quota) = make else {
                return Ok(None);
            };
            if self.len.load(Ordering::Relaxed) >= self.max {
                return Err(EngineError::Exhausted {
                    what: "circuit breakers".into(),
                    max: self.max,
                });
            }
            if !quota.principal.is_empty() {
                let mut held = self.held();
                let n = held.entry(quota.principal.to_owned()).or_default();
                if let Some(max) = quota.max.filter(|max| *n >= *max) {
                    return Err(EngineError::OverQuota {
                        principal: quota.principal.to_owned(),
                        what: "circuit breakers".into(),
                        quota: max,
                    });
                }
                *n += 1;
            }
            self.len.fetch_add(1, Ordering::Relaxed);
            let slot = Slot {
                breaker: Breaker::default(),
                principal: quota.principal.to_owned(),
            };
            shard.map.insert(name.to_owned(), slot);
        }
        let slot = shard.map.get_mut(name).expect("present");
        let (out, effect) = f(&mut slot.breaker);
        let change = effect.moved_from.map(|from| BreakerChange {
            name: name.to_owned(),
            from,
            breaker: slot.breaker.clone(),
        });
        if effect.changed || made {
            shard.dirty.insert(name.to_owned());
        }
        Ok(Some((out, change)))
    }

    /// [`Breaker::allow`] on the breaker under `name`. An absent breaker is
    /// closed, and asking does not make it.
    pub fn allow(
        &self,
        name: &str,
        def: &BreakerDef,
        now_ms: u64,
    ) -> (Verdict, Option<BreakerChange>) {
        let closed = Verdict {
            phase: Phase::Closed,
            allowed: true,
            probe_token: 0,
            retry_after_ms: 0,
        };
        match self.with(name, None, |b| b.allow(def, now_ms)) {
            Ok(Some(answer)) => answer,
            _ => (closed, None),
        }
    }

    /// [`Breaker::report`] on the breaker under `name`.
    pub fn report(
        &self,
        name: &str,
        def: &BreakerDef,
        outcome: CallOutcome,
        probe_token: u64,
        now_ms: u64,
        quota: BreakerQuota<'_>,
    ) -> Result<(Reported, Option<BreakerChange>), EngineError> {
        self.with(name, Some(quota), |b| {
            b.report(def, outcome, probe_token, now_ms)
        })
        .map(|answer| answer.expect("made"))
    }

    /// The breaker under `name` as stored (`None`: absent, which is closed).
    pub fn get(&self, name: &str) -> Option<Breaker> {
        self.shard(name).map.get(name).map(|s| s.breaker.clone())
    }

    pub fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Breakers made by `principal` on this node.
    pub fn held_by(&self, principal: &str) -> u64 {
        self.held().get(principal).copied().unwrap_or(0)
    }

    /// Takes replicated state: each breaker replaces what is held under
    /// its name. Returns the phase changes it made.
    pub fn upsert(
        &self,
        breakers: impl IntoIterator<Item = (String, Breaker)>,
    ) -> Vec<BreakerChange> {
        let mut changes = Vec::new();
        for (name, breaker) in breakers {
            let mut shard = self.shard(&name);
            let from = match shard.map.get_mut(&name) {
                Some(slot) => std::mem::replace(&mut slot.breaker, breaker.clone()).phase,
                None => {
                    self.len.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    shard.map.insert(
                        name.clone(),
                        Slot {
                            breaker: breaker.clone(),
                            principal: String::new(),
                        },
                    );
                    Phase::Closed
                }
            };
            if from != breaker.phase {
                changes.push(BreakerChange {
                    name,
                    from,
                    breaker,
                });
            }
        }
        changes
    }

    /// Up to `max` breakers changed since they were last drained.
    pub fn drain_dirty(&self, max: usize) -> Vec<(String, Breaker)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            while out.len() < max {
                let Some(name) = shard.dirty.iter().next().cloned() else {
                    break;
                };
                shard.dirty.remove(&name);
                if let Some(slot) = shard.map.get(&name) {
                    out.push((name, slot.breaker.clone()));
                }
            }
            if out.len() >= max {
                break;
            }
        }
        out
    }

    /// Marks `names` changed again (a sync that did not reach the log).
    pub fn mark_dirty<'k>(&self, names: impl IntoIterator<Item = &'k str>) {
        for name in names {
            let mut shard = self.shard(name);
            if shard.map.contains_key(name) {
                shard.dirty.insert(name.to_owned());
            }
        }
    }

    /// Drops closed breakers idle at `now_ms` (local, as idle rate-limit
    /// cells are: an idle closed breaker means the same as none).
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let Shard { map, dirty } = &mut *shard;
            map.retain(|name, slot| {
                let keep = slot.breaker.idle_at().is_none_or(|t| t > now_ms);
                if !keep {
                    dropped += 1;
                    dirty.remove(name);
                    if !slot.principal.is_empty() {
                        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(n) = held.get_mut(&slot.principal) {
                            *n = n.saturating_sub(1);
                        }
                    }
                }
                keep
            });
        }
        self.len
            .fetch_sub(dropped, std::sync::atomic::Ordering::Relaxed);
        dropped
    }

    /// Every breaker, sorted by name (for snapshots).
    pub fn all(&self) -> Vec<(String, Breaker)> {
        let mut out: Vec<(String, Breaker)> = self
            .shards
            .iter()
            .flat_map(|s| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.map
                    .iter()
                    .map(|(k, v)| (k.clone(), v.breaker.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Empties it (before loading a snapshot).
    pub fn clear(&self) {
        for shard in &self.shards {
            *shard.lock().unwrap_or_else(|e| e.into_inner()) = Shard::default();
        }
        self.held().clear();
        self.len.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}
