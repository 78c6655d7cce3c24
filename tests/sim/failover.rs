//! The README's rate-limit failover bound, measured: one key checked
//! through the leader at a steady rate, the leader then crashes (its power
//! cut) or is cut off from the others while its callers go on calling it,
//! and the new leader's count of what was consumed is compared with what
//! the callers were allowed. The difference, in ms of the callers'
//! traffic, is what the failover forgot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbiter::engine::{LimitCheck, LimitDef};
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
    LimitCheck {
        key: "steady".into(),
        limit: LimitDef::TokenBucket {
            capacity: CAPACITY,
            refill_tokens: 1,
            refill_interval_ms: 3_600_000,
        },
        cost,
        dry_run: false,
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
