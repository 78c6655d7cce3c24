//! All-or-nothing calls whose two keys have different owners, sent through
//! the third member, with a fault injected between the reserve and the
//! confirm. Whatever happens there, no key is ever allowed more than its
//! bucket holds; what a fault may cost is held-back or consumed tokens of
//! a call that was not admitted, and the README says how much.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbiter::engine::{slot_of, LimitCheck, LimitDef};
use arbiter::node::{NodeError, PhaseHook, SlotOwners};
use tokio::time::Instant;

use super::cluster::Cluster;
use super::disk::Loss;
use super::rng::Rng;

/// Each key's bucket (it does not refill within a run).
pub const CAP: u64 = 3;

/// What happens between the reserve and the confirm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Between {
    Nothing,
    /// A check of the first key for its whole bucket, at its owner.
    Compete,
    /// The second key's owner is cut off from everyone.
    CutOwner,
    /// The second key's owner loses its power.
    CrashOwner,
    /// The coordinator never goes on (as if it died): the call is dropped.
    CoordinatorGone,
}

/// How one run went.
#[derive(Debug)]
pub struct Outcome {
    /// The all-or-nothing call's answer: allowed, denied, or the error.
    pub answer: Result<bool, String>,
    /// Whether the competing check (`Compete`, or during the lapse wait
    /// with `CoordinatorGone`) was allowed.
    pub competitor_allowed: Option<bool>,
    /// Checks of cost 1 allowed on each key afterwards, until denied.
    pub after: [u64; 2],
}

fn check(key: &str, cost: u64) -> LimitCheck {
    LimitCheck {
        key: key.into(),
        limit: LimitDef::TokenBucket {
            capacity: CAP,
            refill_tokens: 1,
            refill_interval_ms: 3_600_000,
        },
        cost,
        dry_run: false,
        max_delay_ms: 0,
    }
}

/// Polls `ready` every 10 ms until it holds, or fails after `within`.
async fn until(
    within: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

pub async fn run(seed: u64, between: Between) -> Result<Outcome, String> {
    let mut rng = Rng::new(seed);
    let c = Arc::new(Cluster::start_with(seed, 3, &mut rng, SlotOwners::Spread).await);
    c.leader(Duration::from_secs(10)).await.ok_or("no leader")?;
    let ids = c.ids();
    until(Duration::from_secs(10), "the slots spread", || {
        ids.iter().all(|i| {
            let map = c.node(*i).slot_map();
            ids.iter().all(|o| map.owners.contains(o))
        })
    })
    .await?;
    // Keys of two owners, and the third member as coordinator.
    let map = c.node(ids[0]).slot_map();
    let key_of = |owner: u64, prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|k| map.owner(slot_of(k)) == Some(owner))
            .unwrap_or_default()
    };
    let (via, x, y) = (ids[0], ids[1], ids[2]);
    let (a, b) = (key_of(x, "a"), key_of(y, "b"));
    let competitor = Arc::new(std::sync::Mutex::new(None::<bool>));
    let hook: Option<PhaseHook> = match between {
        Between::Nothing => None,
        Between::Compete => {
            let (c, a, competitor) = (c.clone(), a.clone(), competitor.clone());
            Some(Arc::new(move || {
                let (c, a, competitor) = (c.clone(), a.clone(), competitor.clone());
                Box::pin(async move {
                    let r = c
                        .on(
                            x,
                            |n| async move { n.check(vec![check(&a, CAP)], false).await },
                        )
                        .await;
                    if let Ok(Ok(r)) = r {
                        *competitor.lock().unwrap() = Some(r[0].allowed);
                    }
                })
            }))
        }
        Between::CutOwner => {
            let c = c.clone();
            Some(Arc::new(move || {
                c.net.isolate(y, &c.ids());
                Box::pin(async {})
            }))
        }
        Between::CrashOwner => {
            let c = c.clone();
            let fired = Arc::new(AtomicBool::new(false));
            Some(Arc::new(move || {
                if !fired.swap(true, Ordering::SeqCst) {
                    let _ = c.crash(y, Loss::Clean, &mut Rng::new(seed));
                }
                Box::pin(async {})
            }))
        }
        Between::CoordinatorGone => Some(Arc::new(|| Box::pin(std::future::pending()))),
    };
    c.node(via).holds().set_between_phases(hook);
    let both = vec![check(&a, 1), check(&b, 1)];
    let call = {
        let c = c.clone();
        tokio::spawn(async move {
            c.on(via, |n| async move { n.check(both, true).await })
                .await
        })
    };
    let answer = if between == Between::CoordinatorGone {
        // While the holds last, the rest of a's bucket is not enough for a
        // whole bucket; once they lapse, it is.
        until(Duration::from_secs(1), "a's reservation", || {
            c.node(x).holds().len() == 1
        })
        .await?;
        let whole = vec![check(&a, CAP)];
        let r = c.on(x, |n| async move { n.check(whole, true).await }).await;
        let held_back = matches!(r, Ok(Ok(ref r)) if !r[0].allowed);
        until(Duration::from_secs(3), "the reservations lapse", || {
            c.node(x).holds().is_empty() && c.node(y).holds().is_empty()
        })
        .await?;
        call.abort();
        let _ = call.await;
        *competitor.lock().unwrap() = Some(!held_back);
        Err("the coordinator went away".to_owned())
    } else {
        match call.await.map_err(|e| e.to_string())? {
            Ok(Ok(r)) if r.len() == 2 && r[0].allowed == r[1].allowed => Ok(r[0].allowed),
            Ok(Ok(r)) => return Err(format!("not all or nothing: {r:?}")),
            Ok(Err(NodeError::Unavailable(why))) => Err(why),
            Ok(Err(e)) => return Err(format!("the call failed: {e}")),
            Err(e) => Err(e),
        }
    };
    c.node(via).holds().set_between_phases(None);
    c.net.heal();
    // Spend what is left of each key, through the coordinator (which
    // routes to whoever owns the key by then).
    let mut after = [0; 2];
    for (n, key) in after.iter_mut().zip([&a, &b]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut denied = false;
        while !denied {
            if Instant::now() > deadline {
                return Err(format!("{key}: no answer after the fault"));
            }
            let k = key.clone();
            match c
                .on(
                    via,
                    |n| async move { n.check(vec![check(&k, 1)], false).await },
                )
                .await
            {
                Ok(Ok(r)) if r[0].allowed => *n += 1,
                Ok(Ok(_)) => denied = true,
                // Its slot still moving: asked again.
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            if *n > 2 * CAP {
                break;
            }
        }
    }
    let competitor_allowed = *competitor.lock().unwrap();
    let c = Arc::try_unwrap(c).map_err(|_| "the cluster is still shared".to_string())?;
    c.stop().await;
    Ok(Outcome {
        answer,
        competitor_allowed,
        after,
    })
}
