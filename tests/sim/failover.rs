//! The README's rate-limit failover bound, measured: one key checked
//! through the leader at a steady rate, the leader then crashes (its power
//! cut) or is cut off from the others while its callers go on calling it,
//! and the new leader's count of what was consumed is compared with what
//! the callers were allowed. The difference, in ms of the callers'
//! traffic, is what the failover forgot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbiter::engine::{slot_of, Acquire, LimitCheck, LimitDef};
use arbiter::node::SlotOwners;
use tokio::time::Instant;

use super::cluster::Cluster;
use super::disk::Loss;
use super::rng::Rng;

/// One check every this many ms.
const EVERY_MS: u64 = 5;
/// Far more than a run consumes: nothing is ever denied.
const CAPACITY: u64 = 1_000_000;

#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// The leader's power is cut.
    Crash,
    /// The leader is cut off both ways; its callers still reach it.
    CutOff,
}

fn check(cost: u64) -> LimitCheck {
    check_of("steady", cost)
}

fn check_of(key: &str, cost: u64) -> LimitCheck {
    LimitCheck {
        key: key.into(),
        limit: LimitDef::TokenBucket {
            capacity: CAPACITY,
            refill_tokens: 1,
            refill_interval_ms: 3_600_000,
        },
        cost,
        dry_run: false,
        max_delay_ms: 0,
    }
}

/// What one failover of the leader forgot, in ms of traffic.
pub async fn forgotten_ms(seed: u64, failure: Failure) -> Result<u64, String> {
    let mut rng = Rng::new(seed);
    let c = Arc::new(Cluster::start(seed, 3, &mut rng).await);
    let leader = c.leader(Duration::from_secs(10)).await.ok_or("no leader")?;
    // Checks allowed, and checks of unknown outcome.
    let allowed = Arc::new(AtomicU64::new(0));
    let unknown = Arc::new(AtomicU64::new(0));
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let traffic = {
        let (c, stop_at) = (c.clone(), stop_at.clone());
        let (allowed, unknown) = (allowed.clone(), unknown.clone());
        tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            while c.now() < stop_at.load(Ordering::SeqCst) {
                let (c, allowed, unknown) = (c.clone(), allowed.clone(), unknown.clone());
                calls.spawn(async move {
                    let answer = c
                        .on(
                            leader,
                            |n| async move { n.check(vec![check(1)], false).await },
                        )
                        .await;
                    match answer {
                        Ok(Ok(r)) if r.first().is_some_and(|r| r.allowed) => {
                            allowed.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) | Err(_) => {
                            unknown.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
                tokio::time::sleep(Duration::from_millis(EVERY_MS)).await;
                while calls.try_join_next().is_some() {}
            }
            while calls.join_next().await.is_some() {}
        })
    };
    // A random phase against the sync ticks.
    tokio::time::sleep(Duration::from_millis(rng.range(1_000, 1_500))).await;
    match failure {
        Failure::Crash => {
            c.crash(leader, Loss::Clean, &mut rng)?;
            stop_at.store(c.now(), Ordering::SeqCst);
        }
        Failure::CutOff => {
            c.net.isolate(leader, &c.ids());
            // Its callers go on past its lease.
            stop_at.store(c.now() + 1_000, Ordering::SeqCst);
        }
    }
    traffic.await.map_err(|e| e.to_string())?;
    let others: Vec<u64> = c.ids().into_iter().filter(|&i| i != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        if let Some(&n) = others
            .iter()
            .find(|&&i| c.node(i).leader() == Some(i) && c.node(i).ready())
        {
            break n;
        }
        if Instant::now() > deadline {
            return Err("no new leader".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // What the new leader counts as consumed (a check of cost 0 consumes
    // nothing); asked before the cut heals, so nothing held in it arrives.
    let peek = c
        .on(new, |n| async move { n.check(vec![check(0)], false).await })
        .await?
        .map_err(|e| e.to_string())?;
    let consumed = CAPACITY - peek.first().ok_or("no result")?.remaining;
    let (allowed, unknown) = (
        allowed.load(Ordering::SeqCst),
        unknown.load(Ordering::SeqCst),
    );
    c.net.heal();
    // A check in flight when the leader went may have been decided and
    // synced without its answer arriving: those are the most it may count
    // beyond what was allowed.
    if consumed > allowed + unknown {
        return Err(format!(
            "the new leader counts {consumed} consumed, more than the {allowed} allowed \
             and {unknown} unanswered"
        ));
    }
    let c = Arc::try_unwrap(c).map_err(|_| "the cluster is still shared".to_string())?;
    c.stop().await;
    Ok(allowed.saturating_sub(consumed) * EVERY_MS)
}

/// One move of a slot whose owner crashed, with the slots spread: a key the
/// owner (not the leader) decides is checked through the owner at a steady
/// rate, the owner's power is cut, and the same key is then checked (cost
/// 0) through the leader every [`EVERY_MS`] until one is answered.
/// Returns how long after the crash that first answer came, and what the
/// move forgot, in ms of traffic.
pub async fn slot_move(seed: u64) -> Result<(u64, u64), String> {
    let mut rng = Rng::new(seed);
    let c = Arc::new(Cluster::start_with(seed, 3, &mut rng, SlotOwners::Spread).await);
    let leader = c.leader(Duration::from_secs(10)).await.ok_or("no leader")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.ids().iter().all(|i| c.node(*i).slot_map().assigned()) {
        if Instant::now() > deadline {
            return Err("the slots were never assigned".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let map = c.node(leader).slot_map();
    let (key, owner) = (0..)
        .map(|i| format!("steady-{i}"))
        .find_map(|k| {
            let o = map.owner(slot_of(&k))?;
            (o != leader).then_some((k, o))
        })
        .ok_or("no key of another owner")?;
    let allowed = Arc::new(AtomicU64::new(0));
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let traffic = {
        let (c, stop_at, allowed, key) = (c.clone(), stop_at.clone(), allowed.clone(), key.clone());
        tokio::spawn(async move {
            let mut calls = tokio::task::JoinSet::new();
            while c.now() < stop_at.load(Ordering::SeqCst) {
                let (c, allowed, key) = (c.clone(), allowed.clone(), key.clone());
                calls.spawn(async move {
                    let check = check_of(&key, 1);
                    let answer = c
                        .on(owner, |n| async move { n.check(vec![check], false).await })
                        .await;
                    if let Ok(Ok(r)) = answer {
                        if r.first().is_some_and(|r| r.allowed) {
                            allowed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
                tokio::time::sleep(Duration::from_millis(EVERY_MS)).await;
                while calls.try_join_next().is_some() {}
            }
            while calls.join_next().await.is_some() {}
        })
    };
    tokio::time::sleep(Duration::from_millis(rng.range(1_000, 1_500))).await;
    c.crash(owner, Loss::Clean, &mut rng)?;
    let crashed = c.now();
    stop_at.store(crashed, Ordering::SeqCst);
    traffic.await.map_err(|e| e.to_string())?;
    // Checks through the leader every EVERY_MS, each waiting as long as it
    // takes; the first answer's time is when the key was decided again.
    let first = Arc::new(AtomicU64::new(u64::MAX));
    let remaining = Arc::new(AtomicU64::new(0));
    let mut probes = tokio::task::JoinSet::new();
    while first.load(Ordering::SeqCst) == u64::MAX && c.now() < crashed + 5_000 {
        let (c, first, remaining, key) = (c.clone(), first.clone(), remaining.clone(), key.clone());
        probes.spawn(async move {
            let check = check_of(&key, 0);
            let answer = c
                .on(leader, |n| async move { n.check(vec![check], false).await })
                .await;
            if let Ok(Ok(r)) = answer {
                if let Some(r) = r.first() {
                    if first.fetch_min(c.now(), Ordering::SeqCst) > c.now() {
                        remaining.store(r.remaining, Ordering::SeqCst);
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(EVERY_MS)).await;
    }
    probes.abort_all();
    while probes.join_next().await.is_some() {}
    let first = first.load(Ordering::SeqCst);
    if first == u64::MAX {
        return Err("the moved key was not decided again within 5 s".into());
    }
    let consumed = CAPACITY - remaining.load(Ordering::SeqCst);
    let allowed = allowed.load(Ordering::SeqCst);
    if consumed > allowed {
        return Err(format!(
            "the new owner counts {consumed} consumed, more than the {allowed} allowed"
        ));
    }
    let c = Arc::try_unwrap(c).map_err(|_| "the cluster is still shared".to_string())?;
    c.stop().await;
    Ok((first - crashed, allowed.saturating_sub(consumed) * EVERY_MS))
}

/// An owner that does not lead decides a refilling bucket (checked through
/// it every ms) while lease writes go through the leader and the network's
/// delay rises to 15-25 ms for a second and falls back to 0-2 ms. Returns,
/// for the window that most exceeds it, how many checks were allowed in
/// it and the most the bucket may allow there (its capacity and its
/// refill, at the most a decider's clock may run fast). An owner whose
/// time follows the late times it is sent (the replicated log's, or a
/// grant's) moves forward by the delay's fall, refilling the bucket by it
/// at once.
/// Also returns how many were allowed in all, and what the run's length
/// refills, to show it was not mostly refused.
pub async fn owner_clock(seed: u64) -> Result<((u64, u64), (u64, u64)), String> {
    const CAP: u64 = 1;
    const REFILL_MS: u64 = 20;
    let mut rng = Rng::new(seed);
    let c = Arc::new(Cluster::start_with(seed, 3, &mut rng, SlotOwners::Spread).await);
    let leader = c.leader(Duration::from_secs(10)).await.ok_or("no leader")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.ids().iter().all(|i| c.node(*i).slot_map().assigned()) {
        if Instant::now() > deadline {
            return Err("the slots were never assigned".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let map = c.node(leader).slot_map();
    let (key, owner) = (0..)
        .map(|i| format!("refilling-{i}"))
        .find_map(|k| {
            let o = map.owner(slot_of(&k))?;
            (o != leader).then_some((k, o))
        })
        .ok_or("no key of another owner")?;
    let check = LimitCheck {
        key,
        limit: LimitDef::TokenBucket {
            capacity: CAP,
            refill_tokens: 1,
            refill_interval_ms: REFILL_MS,
        },
        cost: 1,
        dry_run: false,
        max_delay_ms: 0,
    };
    let allowed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = c.now();
    let mut calls = tokio::task::JoinSet::new();
    // Lease writes through the leader: entries, each stamped with the
    // leader's time, reach the owner late by the network's delay.
    let mut writes = tokio::task::JoinSet::new();
    let (slow_from, slow_to, end) = (start + 300, start + 1_300, start + 1_900);
    while c.now() < end {
        match c.now() {
            t if t == slow_from => c.net.set_delay(15, 25),
            t if t == slow_to => c.net.set_delay(0, 2),
            _ => {}
        }
        if c.now() % 10 == 0 {
            let acquire = Acquire {
                quota: Default::default(),
                name: "stamps".into(),
                holder: "writer".into(),
                ttl_ms: 10_000,
                principal: String::new(),
            };
            let c = c.clone();
            writes.spawn(async move { c.call(leader, acquire).await });
            while writes.try_join_next().is_some() {}
        }
        let (c, allowed, check) = (c.clone(), allowed.clone(), check.clone());
        calls.spawn(async move {
            let sent = c.now();
            let answer = c
                .on(owner, |n| async move { n.check(vec![check], false).await })
                .await;
            if let Ok(Ok(r)) = answer {
                if r.first().is_some_and(|r| r.allowed) {
                    let mut allowed = allowed.lock().unwrap_or_else(|e| e.into_inner());
                    allowed.push((sent, c.now()));
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
    writes.abort_all();
    while writes.join_next().await.is_some() {}
    // The window that most exceeds what real time refills (sent at or
    // after its start, answered by its end).
    let allowed = allowed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut worst = (0, CAP);
    for &(a, _) in &allowed {
        for &(_, b) in allowed.iter().filter(|(_, done)| *done >= a) {
            let inside = allowed.iter().filter(|(s, d)| *s >= a && *d <= b).count() as u64;
            let span = b - a + 1;
            let bound = CAP + (span + span / 64) / REFILL_MS;
            if inside as i64 - bound as i64 > worst.0 as i64 - worst.1 as i64 {
                worst = (inside, bound);
            }
        }
    }
    let refilled = (c.now() - start) / REFILL_MS;
    let c = Arc::try_unwrap(c).map_err(|_| "the cluster is still shared".to_string())?;
    c.stop().await;
    Ok((worst, (allowed.len() as u64, refilled)))
}
