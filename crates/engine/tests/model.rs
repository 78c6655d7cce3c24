//! Model-based properties: the engine against plain reference models (maps
//! and integer arithmetic, the earliest allowed time found by trying each
//! millisecond), driven by the same random commands at random times,
//! including time going backwards. Every output must be equal: allowed,
//! remaining, retry_after_ms (denied one ms before it, allowed at it),
//! reset_after_ms, and a leaky bucket's delay_ms in reserve mode. Then
//! all-or-nothing against "check all, then apply all or
//! none", and replica determinism: the same log through a second engine fed
//! by sync entries and through snapshot + restore gives the same state.

use std::collections::{BTreeMap, HashMap};

use arbiter_engine::{
    Abort, Acquire, Begin, Command, Complete, Engine, EngineConfig, LimitCheck, LimitDef,
    LimitResult, Release, Renew, SemAcquire, SemRelease, SemRenew, Snapshot,
};
use proptest::prelude::*;

const NEVER: u64 = u64::MAX;

fn engine() -> Engine {
    Engine::new(EngineConfig {
        limit_shards: 4,
        ..EngineConfig::default()
    })
}

/// One key's state in the model.
#[derive(Clone, Debug)]
enum State {
    /// Token bucket: tokens × interval plus the partial token, as one
    /// number of units (capacity × interval when full), counted up to `last`.
    Bucket { units: u128, last: u64 },
    /// Sliding window: units admitted per aligned window (by its start), and
    /// the start of the latest window that admitted any.
    Sliding {
        counts: BTreeMap<u64, u64>,
        latest: u64,
    },
    /// Fixed window: units admitted in the window starting at `start`.
    Fixed { count: u64, start: u64 },
    /// Leaky bucket: when it is empty again, in ticks of 1/rate ms.
    Leaky { tat: u128 },
}

#[derive(Clone, Debug, Default)]
struct Model {
    keys: HashMap<String, State>,
}

impl Model {
    /// What the model says `cost` on `key` under `def` at `now` gives, and
    /// the key's new state when it consumed. `max_delay` is reserve mode's
    /// (leaky buckets only).
    fn decide(
        &self,
        key: &str,
        def: LimitDef,
        now: u64,
        cost: u64,
        max_delay: u64,
    ) -> (LimitResult, Option<State>) {
        let state = self.keys.get(key);
        match def {
            LimitDef::LeakyBucket {
                rate,
                interval_ms,
                burst,
            } => {
                let (r, i, b) = (u128::from(rate), u128::from(interval_ms), u128::from(burst));
                let tat = match state {
                    Some(State::Leaky { tat }) => *tat,
                    _ => 0,
                };
                // Admitted at `t`, the bucket fills to max(tat, t) + cost;
                // the work starts once that is at most `burst` above t.
                let after = |t: u64| tat.max(u128::from(t) * r) + u128::from(cost) * i;
                let wait_ms = |t: u64| {
                    if cost == 0 {
                        0
                    } else {
                        let start = (after(t).saturating_sub(b * i)).max(u128::from(t) * r);
                        (start - u128::from(t) * r).div_ceil(r) as u64
                    }
                };
                let fits = |t: u64| cost <= burst && wait_ms(t) <= max_delay;
                let allowed = fits(now);
                let retry_after_ms = if allowed {
                    0
                } else if cost > burst {
                    NEVER
                } else {
                    (1..).find(|d| fits(now + d)).expect("the bucket drains")
                };
                let consumed = allowed && cost > 0;
                let kept = if consumed { after(now) } else { tat };
                let level = kept.saturating_sub(u128::from(now) * r);
                let result = LimitResult {
                    allowed,
                    limit: burst,
                    remaining: ((b * i).saturating_sub(level) / i) as u64,
                    retry_after_ms,
                    reset_after_ms: level.div_ceil(r) as u64,
                    delay_ms: if allowed { wait_ms(now) } else { 0 },
                };
                (result, consumed.then_some(State::Leaky { tat: kept }))
            }
            LimitDef::TokenBucket {
                capacity,
                refill_tokens,
                refill_interval_ms,
            } => {
                let (c, r, i) = (
                    u128::from(capacity),
                    u128::from(refill_tokens),
                    u128::from(refill_interval_ms),
                );
                let (units, last) = match state {
                    Some(State::Bucket { units, last }) if now > *last => {
                        ((units + u128::from(now - last) * r).min(c * i), now)
                    }
                    Some(State::Bucket { units, last }) => (*units, *last),
                    _ => (c * i, now),
                };
                let need = u128::from(cost) * i;
                let allowed = need <= units;
                let retry_after_ms = if allowed {
                    0
                } else if cost > capacity {
                    NEVER
                } else {
                    (need - units).div_ceil(r) as u64
                };
                let consumed = allowed && cost > 0;
                let after = if consumed { units - need } else { units };
                let result = LimitResult {
                    allowed,
                    limit: capacity,
                    remaining: (after / i) as u64,
                    retry_after_ms,
                    reset_after_ms: (c * i - after).div_ceil(r) as u64,
                    delay_ms: 0,
                };
                (
                    result,
                    consumed.then_some(State::Bucket { units: after, last }),
                )
            }
            LimitDef::SlidingWindow {
                limit,
                window_ms: w,
            } => {
                let (counts, latest) = match state {
                    Some(State::Sliding { counts, latest }) => (counts.clone(), Some(*latest)),
                    _ => (BTreeMap::new(), None),
                };
                // A window never goes back: a time before the latest
                // window counts as its first millisecond.
                let t = latest.map_or(now, |l| now.max(l));
                let used = |t: u64, counts: &BTreeMap<u64, u64>| -> (u64, u64, u64) {
                    let start = t - t % w;
                    let cur = counts.get(&start).copied().unwrap_or(0);
                    let prev = start
                        .checked_sub(w)
                        .and_then(|p| counts.get(&p).copied())
                        .unwrap_or(0);
                    let e = t - start;
                    let weighted = (u128::from(prev) * u128::from(w - e)).div_ceil(u128::from(w));
                    (cur + weighted as u64, cur, prev)
                };
                let (now_used, cur, prev) = used(t, &counts);
                let allowed = now_used + cost <= limit;
                let retry_after_ms = if allowed {
                    0
                } else if cost > limit {
                    NEVER
                } else {
                    (1..=t - now + 2 * w)
                        .find(|d| {
                            used(latest.map_or(now + d, |l| (now + d).max(l)), &counts).0 + cost
                                <= limit
                        })
                        .expect("a window frees up within two windows")
                };
                let consumed = allowed && cost > 0;
                let e = t % w;
                let behind = t - now;
                let cur_after = if consumed { cur + cost } else { cur };
                let result = LimitResult {
                    allowed,
                    limit,
                    remaining: limit.saturating_sub(now_used + if consumed { cost } else { 0 }),
                    retry_after_ms,
                    reset_after_ms: if cur_after > 0 {
                        2 * w - e + behind
                    } else if prev > 0 {
                        w - e + behind
                    } else {
                        0
                    },
                    delay_ms: 0,
                };
                let next = consumed.then(|| {
                    let mut counts = counts;
                    let start = t - t % w;
                    *counts.entry(start).or_insert(0) += cost;
                    State::Sliding {
                        counts,
                        latest: start,
                    }
                });
                (result, next)
            }
            LimitDef::FixedWindow {
                limit,
                window_ms: w,
            } => {
                // A window never goes back: a time before the latest
                // window counts as its first millisecond.
                let count_at = |t: u64| match state {
                    Some(State::Fixed { count, start }) if t.max(*start) < start + w => *count,
                    _ => 0,
                };
                let count = count_at(now);
                let allowed = count + cost <= limit;
                let start = match state {
                    Some(State::Fixed { start, .. }) if count > 0 => (now - now % w).max(*start),
                    _ => now - now % w,
                };
                let end_in = start + w - now;
                let retry_after_ms = if allowed {
                    0
                } else if cost > limit {
                    NEVER
                } else {
                    // The first millisecond of another window.
                    (1..=start + w - now)
                        .find(|d| count_at(now + d) + cost <= limit)
                        .expect("a window ends")
                };
                let consumed = allowed && cost > 0;
                let after = if consumed { count + cost } else { count };
                let result = LimitResult {
                    allowed,
                    limit,
                    remaining: limit - after,
                    retry_after_ms,
                    reset_after_ms: if after > 0 { end_in } else { 0 },
                    delay_ms: 0,
                };
                (
                    result,
                    consumed.then_some(State::Fixed {
                        count: after,
                        start,
                    }),
                )
            }
        }
    }

    fn check(
        &mut self,
        key: &str,
        def: LimitDef,
        now: u64,
        cost: u64,
        dry_run: bool,
    ) -> LimitResult {
        self.check_within(key, def, now, cost, dry_run, 0)
    }

    fn check_within(
        &mut self,
        key: &str,
        def: LimitDef,
        now: u64,
        cost: u64,
        dry_run: bool,
        max_delay: u64,
    ) -> LimitResult {
        let (result, next) = self.decide(key, def, now, cost, max_delay);
        if let Some(next) = next.filter(|_| !dry_run) {
            self.keys.insert(key.to_owned(), next);
        }
        result
    }
}

/// A definition with small numbers, so limits are reached.
fn any_def() -> impl Strategy<Value = LimitDef> {
    prop_oneof![
        (1u64..8, 1u64..4, 1u64..400).prop_map(|(capacity, refill_tokens, refill_interval_ms)| {
            LimitDef::TokenBucket {
                capacity,
                refill_tokens,
                refill_interval_ms,
            }
        }),
        (1u64..8, 1u64..400)
            .prop_map(|(limit, window_ms)| LimitDef::SlidingWindow { limit, window_ms }),
        (1u64..8, 1u64..400)
            .prop_map(|(limit, window_ms)| LimitDef::FixedWindow { limit, window_ms }),
        (1u64..4, 1u64..400, 1u64..8).prop_map(|(rate, interval_ms, burst)| {
            LimitDef::LeakyBucket {
                rate,
                interval_ms,
                burst,
            }
        }),
    ]
}

/// A time step: mostly forward, sometimes back (a new leader's clock, a
/// stamp from before a failover).
fn any_step() -> impl Strategy<Value = i64> {
    prop_oneof![8 => 0i64..250, 1 => -300i64..0]
}

fn step(now: u64, dt: i64) -> u64 {
    now.saturating_add_signed(dt)
}

fn key_check(key: usize, def: LimitDef, cost: u64, dry_run: bool) -> LimitCheck {
    LimitCheck {
        key: format!("k{key}"),
        limit: def,
        cost,
        dry_run,
        max_delay_ms: 0,
    }
}

/// Reserve mode's wait, for a leaky bucket: none half the time.
fn any_max_delay() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 1u64..600]
}

/// Rate-limit state as plain values, changed-since-sync marks left out, in
/// key order.
fn limits_of(snapshot: &Snapshot) -> Vec<(String, serde_json::Value)> {
    let mut limits: Vec<_> = snapshot
        .limits
        .iter()
        .map(|(k, cell)| {
            let mut v = serde_json::to_value(cell).expect("a cell serializes");
            // Bit 2 of the tag (the first field) marks a cell not yet synced.
            let tag = v[0].as_u64().expect("tag") & !4;
            v[0] = tag.into();
            (k.clone(), v)
        })
        .collect();
    limits.sort_by(|a, b| a.0.cmp(&b.0));
    limits
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every check, real, peek or dry run, at any time (backwards too),
    /// answers exactly what the model answers; a denial's retry_after_ms is
    /// the first millisecond at which the same cost is allowed.
    #[test]
    fn every_check_answers_what_the_model_answers(
        defs in prop::collection::vec(any_def(), 3),
        ops in prop::collection::vec((any_step(), 0usize..3, 0u64..9, any::<bool>(), any_max_delay()), 1..120),
    ) {
        let e = engine();
        let mut model = Model::default();
        let mut now = 1_000_000u64;
        for (dt, key, cost, dry_run, max_delay) in ops {
            now = step(now, dt);
            let check = LimitCheck { max_delay_ms: max_delay, ..key_check(key, defs[key], cost, dry_run) };
            let got = e.check(std::slice::from_ref(&check), false, now).unwrap()[0];
            let want = model.check_within(&check.key, defs[key], now, cost, dry_run, max_delay);
            prop_assert_eq!(got, want, "key {} {:?} cost {} dry {} max_delay {} at {}", key, defs[key], cost, dry_run, max_delay, now);
            // The engine itself, probed with dry runs: denied a ms before
            // retry_after, allowed at it (token buckets, whose model is
            // arithmetic rather than a search; time not behind the bucket).
            if let LimitDef::TokenBucket { .. } = defs[key] {
                if !got.allowed && got.retry_after_ms != NEVER && !matches!(
                    model.keys.get(&check.key), Some(State::Bucket { last, .. }) if *last > now
                ) {
                    let probe = key_check(key, defs[key], cost, true);
                    let at = |t| e.check(std::slice::from_ref(&probe), false, t).unwrap()[0].allowed;
                    prop_assert!(!at(now + got.retry_after_ms - 1), "allowed before retry_after");
                    prop_assert!(at(now + got.retry_after_ms), "denied at retry_after");
                }
            }
        }
    }

    /// All-or-nothing equals: check every item in order against a copy,
    /// then keep the copy if all were allowed, else discard it; a denied
    /// request reports every item denied, those that would have passed
    /// with retry_after_ms 0 and the remaining of now.
    #[test]
    fn all_or_nothing_is_check_all_then_apply_all_or_none(
        defs in prop::collection::vec(any_def(), 4),
        ops in prop::collection::vec((any_step(), prop::collection::vec((0usize..4, 0u64..5, any_max_delay()), 1..5)), 1..60),
    ) {
        let e = engine();
        let mut model = Model::default();
        let mut now = 1_000_000u64;
        for (dt, batch) in ops {
            now = step(now, dt);
            let checks: Vec<_> = batch.iter().map(|&(k, cost, max_delay_ms)| LimitCheck { max_delay_ms, ..key_check(k, defs[k], cost, false) }).collect();
            let got = e.check(&checks, true, now).unwrap();
            let mut trial = model.clone();
            let want: Vec<_> = batch.iter().map(|&(k, cost, max_delay)| trial.check_within(&format!("k{k}"), defs[k], now, cost, false, max_delay)).collect();
            if want.iter().all(|r| r.allowed) {
                prop_assert_eq!(&got, &want);
                model = trial;
            } else {
                let distinct = batch.iter().map(|b| b.0).collect::<std::collections::HashSet<_>>().len() == batch.len();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    prop_assert!(!g.allowed && g.delay_ms == 0, "item {} allowed in a denied request", i);
                    prop_assert_eq!(g.retry_after_ms, w.retry_after_ms, "item {}", i);
                    if distinct {
                        // Nothing consumed: what remains now (a check that
                        // would have waited found none left).
                        let left = if w.allowed && w.delay_ms == 0 { (w.remaining + batch[i].1).min(w.limit) } else { w.remaining };
                        prop_assert_eq!(g.remaining, left, "item {}", i);
                    }
                }
            }
            // Both agree on every key afterwards.
            for (k, def) in defs.iter().enumerate() {
                let peek = e.check(&[key_check(k, *def, 0, false)], false, now).unwrap()[0];
                prop_assert_eq!(peek, model.check(&format!("k{k}"), *def, now, 0, false), "key {}", k);
            }
        }
    }
}

/// A command of the replicated log, for replica determinism.
#[derive(Clone, Debug)]
enum Op {
    Check(usize, u64),
    Acquire(usize, usize, u64),
    Renew(usize, usize, u64),
    Release(usize, usize),
    Begin(usize, u64),
    Complete(usize),
    Abort(usize),
    Sweep,
    Extend(u64),
    SemAcquire(usize, usize, u64, u64, u64),
    SemRenew(usize, usize, u64),
    SemRelease(usize, usize),
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, 0u64..4).prop_map(|(k, c)| Op::Check(k, c)),
        2 => (0usize..2, 0usize..2, 1u64..300).prop_map(|(n, h, t)| Op::Acquire(n, h, t)),
        1 => (0usize..2, 0usize..2, 1u64..300).prop_map(|(n, h, t)| Op::Renew(n, h, t)),
        1 => (0usize..2, 0usize..2).prop_map(|(n, h)| Op::Release(n, h)),
        2 => (0usize..2, 1u64..300).prop_map(|(k, t)| Op::Begin(k, t)),
        1 => (0usize..2).prop_map(Op::Complete),
        1 => (0usize..2).prop_map(Op::Abort),
        1 => Just(Op::Sweep),
        1 => (0u64..100).prop_map(Op::Extend),
        2 => (0usize..2, 0usize..3, 1u64..4, 1u64..3, 1u64..300)
            .prop_map(|(n, h, limit, p, t)| Op::SemAcquire(n, h, limit, p, t)),
        1 => (0usize..2, 0usize..3, 1u64..300).prop_map(|(n, h, t)| Op::SemRenew(n, h, t)),
        1 => (0usize..2, 0usize..3).prop_map(|(n, h)| Op::SemRelease(n, h)),
    ]
}

/// Turns an op into the command the leader would log, given what the
/// leader has granted so far (tokens and attempts the clients hold).
fn command(op: &Op, leader: &Engine, now: u64) -> Option<Command> {
    let lease = |n: usize| leader.lease(&format!("n{n}"), now);
    let record = |k: usize| leader.record(&format!("i{k}"), now);
    let permit = |n: usize, h: usize| {
        leader
            .semaphore(&format!("s{n}"), now)
            .into_iter()
            .find(|p| p.holder == format!("h{h}"))
            .map_or(0, |p| p.fencing_token)
    };
    Some(match *op {
        Op::Check(..) => return None,
        Op::Acquire(n, h, ttl_ms) => Command::Acquire(Acquire {
            quota: Default::default(),
            name: format!("n{n}"),
            holder: format!("h{h}"),
            ttl_ms,
            principal: String::new(),
        }),
        Op::Renew(n, h, ttl_ms) => Command::Renew(Renew {
            name: format!("n{n}"),
            holder: format!("h{h}"),
            fencing_token: lease(n).map_or(0, |l| l.fencing_token),
            ttl_ms,
            principal: String::new(),
        }),
        Op::Release(n, h) => Command::Release(Release {
            name: format!("n{n}"),
            holder: format!("h{h}"),
            fencing_token: lease(n).map_or(0, |l| l.fencing_token),
            principal: String::new(),
        }),
        Op::Begin(k, lock_ttl_ms) => Command::Begin(Begin {
            quota: Default::default(),
            principal: String::new(),
            key: format!("i{k}"),
            fingerprint: vec![],
            lock_ttl_ms,
            retention_ms: 500,
        }),
        Op::Complete(k) => Command::Complete(Complete {
            byte_quota: None,
            principal: String::new(),
            key: format!("i{k}"),
            attempt: record(k).map_or(0, |r| r.attempt),
            response: vec![7],
        }),
        Op::Abort(k) => Command::Abort(Abort {
            principal: String::new(),
            key: format!("i{k}"),
            attempt: record(k).map_or(0, |r| r.attempt),
        }),
        Op::Sweep => Command::Sweep,
        Op::Extend(by_ms) => Command::ExtendLeases { by_ms },
        Op::SemAcquire(n, h, limit, permits, ttl_ms) => Command::SemAcquire(SemAcquire {
            name: format!("s{n}"),
            holder: format!("h{h}"),
            limit,
            permits,
            ttl_ms,
            principal: String::new(),
            quota: None,
        }),
        Op::SemRenew(n, h, ttl_ms) => Command::SemRenew(SemRenew {
            name: format!("s{n}"),
            holder: format!("h{h}"),
            fencing_token: permit(n, h),
            ttl_ms,
            principal: String::new(),
        }),
        Op::SemRelease(n, h) => Command::SemRelease(SemRelease {
            name: format!("s{n}"),
            holder: format!("h{h}"),
            fencing_token: permit(n, h),
            principal: String::new(),
        }),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The leader decides checks and applies commands; a follower applies
    /// the same commands and the sync entries the leader drains; a third
    /// replica starts from a snapshot of the follower halfway through and
    /// then applies the rest. All three end (and agree at every sync) with
    /// the same state, and every command's outcome is the same on each.
    #[test]
    fn replicas_applying_one_log_reach_one_state(
        defs in prop::collection::vec(any_def(), 4),
        ops in prop::collection::vec((0u64..120, any_op()), 1..100),
        restore_at in 0usize..100,
        sync_every in 1usize..6,
    ) {
        let leader = engine();
        let follower = engine();
        let mut late: Option<Engine> = None;
        let mut now = 1_000_000u64;
        for (i, (dt, op)) in ops.iter().enumerate() {
            now += dt;
            if i == restore_at.min(ops.len() - 1) {
                late = Some(Engine::restore(EngineConfig { limit_shards: 4, ..EngineConfig::default() }, follower.snapshot()));
            }
            if let Op::Check(k, cost) = *op {
                // Leaky buckets in reserve mode: scheduled work replicates.
                let check = LimitCheck { max_delay_ms: 300, ..key_check(k, defs[k], cost, false) };
                leader.check(&[check], false, now).unwrap();
            } else if let Some(cmd) = command(op, &leader, now) {
                let on_leader = leader.apply(cmd.clone(), now).map(|a| a.outcome);
                let on_follower = follower.apply(cmd.clone(), now).map(|a| a.outcome);
                prop_assert_eq!(&on_leader, &on_follower);
                if let Some(late) = &late {
                    prop_assert_eq!(&on_leader, &late.apply(cmd, now).map(|a| a.outcome));
                }
            }
            if i % sync_every == sync_every - 1 || i == ops.len() - 1 {
                let cells = leader.drain_dirty_limits(usize::MAX, usize::MAX);
                let sync = Command::SyncCells {
                    cells,
                    decider: None,
                };
                follower.apply(sync.clone(), now).unwrap();
                if let Some(late) = &late {
                    late.apply(sync, now).unwrap();
                }
                let (l, f) = (leader.snapshot(), follower.snapshot());
                prop_assert_eq!(limits_of(&l), limits_of(&f));
                prop_assert_eq!((&l.leases, &l.records, &l.semaphores), (&f.leases, &f.records, &f.semaphores));
            }
        }
        let late = late.expect("restored before the last op");
        let (l, r) = (leader.snapshot(), late.snapshot());
        prop_assert_eq!(limits_of(&l), limits_of(&r));
        prop_assert_eq!((&l.leases, &l.records, &l.semaphores), (&r.leases, &r.records, &r.semaphores));
        // And the states decide alike from here on.
        for (k, def) in defs.iter().enumerate() {
            for t in [now, now + 1, now + 500] {
                let c = [key_check(k, *def, 0, false)];
                prop_assert_eq!(leader.check(&c, false, t).unwrap(), late.check(&c, false, t).unwrap());
            }
        }
    }
}

/// The model is not a mirror that agrees with anything: a limiter that
/// denies everything, or answers a retry_after one ms early, disagrees
/// with it.
#[test]
fn the_model_rejects_a_limiter_that_always_denies_or_answers_early() {
    let model = Model::default();
    for def in [
        LimitDef::TokenBucket {
            capacity: 2,
            refill_tokens: 1,
            refill_interval_ms: 100,
        },
        LimitDef::SlidingWindow {
            limit: 2,
            window_ms: 100,
        },
        LimitDef::FixedWindow {
            limit: 2,
            window_ms: 100,
        },
        LimitDef::LeakyBucket {
            rate: 1,
            interval_ms: 50,
            burst: 2,
        },
    ] {
        let (fresh, _) = model.decide("k", def, 1_000, 1, 0);
        assert!(fresh.allowed, "{def:?}: a fresh key must allow");
        let mut m = Model::default();
        m.check("k", def, 1_050, 2, false);
        let denied = m.check("k", def, 1_050, 1, false);
        assert!(!denied.allowed && denied.retry_after_ms > 0, "{def:?}");
        let at = |t| m.decide("k", def, t, 1, 0).0.allowed;
        assert!(!at(1_050 + denied.retry_after_ms - 1), "{def:?}");
        assert!(at(1_050 + denied.retry_after_ms), "{def:?}");
    }
    // Reserve mode schedules one unit per 50 ms behind a burst of 2, and
    // refuses past the wait it is given, consuming nothing.
    let def = LimitDef::LeakyBucket {
        rate: 1,
        interval_ms: 50,
        burst: 2,
    };
    let mut m = Model::default();
    let delays: Vec<u64> = (0..4)
        .map(|_| m.check_within("k", def, 1_000, 1, false, 100).delay_ms)
        .collect();
    assert_eq!(delays, [0, 0, 50, 100]);
    let over = m.check_within("k", def, 1_000, 1, false, 100);
    assert!(!over.allowed && over.retry_after_ms == 50, "{over:?}");
    assert_eq!(m.check_within("k", def, 1_050, 1, false, 100).delay_ms, 100);
}
