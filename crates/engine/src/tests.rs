//! Engine-level tests and property tests of every algorithm invariant.

use proptest::prelude::*;

use super::*;

fn engine() -> Engine {
    Engine::new(EngineConfig {
        limit_shards: 4,
        ..EngineConfig::default()
    })
}

fn check(key: &str, limit: LimitDef, cost: u64) -> LimitCheck {
    LimitCheck {
        key: key.into(),
        limit,
        cost,
        dry_run: false,
    }
}

const TB: LimitDef = LimitDef::TokenBucket {
    capacity: 5,
    refill_tokens: 1,
    refill_interval_ms: 1000,
};

fn checked(e: &Engine, checks: Vec<LimitCheck>, aon: bool, now: u64) -> Vec<LimitResult> {
    e.check(&checks, aon, now).expect("within the key cap")
}

#[test]
fn all_or_nothing_consumes_nothing_when_one_denies() {
    let e = engine();
    let user = check("user", TB, 1);
    let tenant = check("tenant", TB, 5);
    assert!(checked(&e, vec![tenant.clone()], false, 0)[0].allowed); // tenant now empty
    let r = checked(&e, vec![user.clone(), tenant.clone()], true, 0);
    assert!(!r[0].allowed && !r[1].allowed);
    assert_eq!(
        (r[0].remaining, r[0].retry_after_ms),
        (5, 0),
        "the passing check reports no consumption"
    );
    assert_eq!(r[1].retry_after_ms, 5000);
    let peek = checked(&e, vec![check("user", TB, 0)], false, 0);
    assert_eq!(peek[0].remaining, 5);
    // Without all_or_nothing the user check consumes.
    let r = checked(&e, vec![user, tenant], false, 0);
    assert!(r[0].allowed && !r[1].allowed);
}

#[test]
fn same_key_twice_in_one_atomic_request_sees_its_own_consumption() {
    let e = engine();
    let r = checked(&e, vec![check("k", TB, 3), check("k", TB, 3)], true, 0);
    assert!(!r[1].allowed);
    let r = checked(&e, vec![check("k", TB, 3), check("k", TB, 2)], true, 0);
    assert!(r[0].allowed && r[1].allowed);
    assert_eq!(r[1].remaining, 0);
}

#[test]
fn key_cap_is_resource_exhausted_and_sweep_frees_it() {
    let e = Engine::new(EngineConfig {
        max_limit_keys: 2,
        ..EngineConfig::default()
    });
    checked(&e, vec![check("a", TB, 1), check("b", TB, 1)], false, 0);
    let err = e.check(&[check("c", TB, 1)], false, 0).unwrap_err();
    assert!(matches!(err, EngineError::Exhausted { max: 2, .. }));
    // Peeks and denials on new keys store nothing, so they still work.
    assert!(e.check(&[check("c", TB, 0)], false, 0).is_ok());
    assert!(e
        .check(&[check("a", TB, 1), check("c", TB, 1)], true, 0)
        .is_err());
    assert_eq!(e.sweep_limits(999), 0);
    assert_eq!(
        e.sweep_limits(1000),
        2,
        "both buckets are full again at 1 s"
    );
    assert!(e.check(&[check("c", TB, 1)], false, 1000).is_ok());
}

#[test]
fn snapshot_round_trips_through_serde() {
    let e = engine();
    checked(&e, vec![check("k", TB, 2)], false, 0);
    e.apply(
        Command::Acquire(Acquire {
            name: "l".into(),
            holder: "h".into(),
            ttl_ms: 100,
        }),
        0,
    )
    .unwrap();
    e.apply(
        Command::Begin(Begin {
            key: "i".into(),
            fingerprint: vec![1],
            lock_ttl_ms: 100,
            retention_ms: 100,
        }),
        0,
    )
    .unwrap();
    let snap = e.snapshot();
    let json = serde_json::to_string(&snap).unwrap();
    let restored = Engine::restore(
        EngineConfig::default(),
        serde_json::from_str(&json).unwrap(),
    );
    assert_eq!(restored.snapshot(), snap);
    assert_eq!(
        restored.check(&[check("k", TB, 0)], false, 0).unwrap()[0].remaining,
        3
    );
    // The restored fencing counter continues.
    let a = restored
        .apply(
            Command::Acquire(Acquire {
                name: "m".into(),
                holder: "h".into(),
                ttl_ms: 100,
            }),
            0,
        )
        .unwrap();
    assert!(
        matches!(a.outcome, Outcome::Acquire(Acquired { lease, .. }) if lease.fencing_token == 2)
    );
}

#[test]
fn sync_limits_upserts_state() {
    let a = engine();
    checked(&a, vec![check("k", TB, 4)], false, 0);
    let b = engine();
    b.apply(
        Command::SyncCells {
            cells: a.snapshot().limits.into_iter().collect(),
        },
        0,
    )
    .unwrap();
    assert_eq!(
        b.check(&[check("k", TB, 0)], false, 0).unwrap()[0].remaining,
        1
    );
}

#[test]
fn syncs_carry_changed_cells() {
    let leader = engine();
    checked(
        &leader,
        vec![check("k", TB, 4), check("j", TB, 1)],
        false,
        0,
    );
    let cells = leader.drain_dirty_limits(usize::MAX, usize::MAX);
    assert_eq!(cells.len(), 2);
    let follower = engine();
    follower.apply(Command::SyncCells { cells }, 0).unwrap();
    let left = follower
        .check(&[check("k", TB, 0), check("j", TB, 0)], false, 0)
        .unwrap();
    assert_eq!((left[0].remaining, left[1].remaining), (1, 4));
    // Nothing changed since: the next drain is empty.
    assert!(leader.drain_dirty_limits(usize::MAX, usize::MAX).is_empty());
}

#[test]
fn sweep_reports_expired_leases() {
    let e = engine();
    e.apply(
        Command::Acquire(Acquire {
            name: "l".into(),
            holder: "h".into(),
            ttl_ms: 100,
        }),
        0,
    )
    .unwrap();
    assert!(!e.sweep_due(99));
    assert!(e.sweep_due(100));
    let a = e.apply(Command::Sweep, 100).unwrap();
    assert_eq!(
        a.outcome,
        Outcome::Sweep {
            leases: 1,
            records: 0
        }
    );
    assert_eq!(a.events[0].kind, LeaseEventKind::Expired);
}

// ---- properties ----

fn any_tb() -> impl Strategy<Value = (u64, u64, u64)> {
    (1u64..20, 1u64..5, 1u64..2000)
}

proptest! {
    /// Over any interval [t_i, t_j], a token bucket allows at most
    /// capacity + refill × (t_j − t_i) / interval units.
    #[test]
    fn token_bucket_never_exceeds_capacity_plus_refill(
        (cap, refill, interval) in any_tb(),
        ops in prop::collection::vec((0u64..500, 0u64..6), 1..60),
    ) {
        let def = LimitDef::TokenBucket { capacity: cap, refill_tokens: refill, refill_interval_ms: interval };
        let e = engine();
        let mut now = 1_000_000;
        let mut granted: Vec<(u64, u64)> = Vec::new();
        for (dt, cost) in ops {
            now += dt;
            let r = e.check(&[check("k", def, cost)], false, now).unwrap()[0];
            if r.allowed { granted.push((now, cost)); }
        }
        for i in 0..granted.len() {
            let mut sum = 0u128;
            for j in i..granted.len() {
                sum += u128::from(granted[j].1);
                let bound = u128::from(cap) + u128::from(refill) * u128::from(granted[j].0 - granted[i].0) / u128::from(interval);
                prop_assert!(sum <= bound, "{sum} > {bound}");
            }
        }
    }

    /// Peeks and dry runs leave every key's state as it was.
    #[test]
    fn peeks_and_dry_runs_never_change_state(
        ops in prop::collection::vec((0u64..300, 0usize..3, 0u64..4, any::<bool>(), 0usize..3), 1..40),
    ) {
        let defs = [
            TB,
            LimitDef::SlidingWindow { limit: 4, window_ms: 500 },
            LimitDef::FixedWindow { limit: 4, window_ms: 500 },
        ];
        let e = engine();
        let mut now = 10_000;
        for (dt, key, cost, dry, alg) in ops {
            now += dt;
            let key = format!("k{key}");
            let real = check(&key, defs[alg], cost);
            let peek = LimitCheck { dry_run: dry, cost: if dry { cost } else { 0 }, ..real.clone() };
            let before = e.snapshot();
            let looked = e.check(&[peek], false, now).unwrap()[0];
            prop_assert_eq!(&e.snapshot(), &before);
            let done = e.check(&[real], false, now).unwrap()[0];
            if dry {
                prop_assert_eq!(looked, done, "a dry run predicts the real decision");
            }
        }
    }

    /// A denied all-or-nothing request consumes nothing.
    #[test]
    fn denied_all_or_nothing_consumes_nothing(
        ops in prop::collection::vec((0u64..400, prop::collection::vec((0usize..4, 0u64..4), 1..5)), 1..30),
    ) {
        let e = engine();
        let mut now = 0;
        for (dt, batch) in ops {
            now += dt;
            let checks: Vec<_> = batch.iter().map(|(k, c)| check(&format!("k{k}"), TB, *c)).collect();
            let before = e.snapshot();
            let r = e.check(&checks, true, now).unwrap();
            if r.iter().any(|r| !r.allowed) {
                prop_assert!(r.iter().all(|r| !r.allowed));
                prop_assert_eq!(e.snapshot(), before);
            }
        }
    }

    /// No aligned fixed window admits more than the limit.
    #[test]
    fn fixed_window_never_exceeds_limit(
        limit in 1u64..10, window in 1u64..1000,
        ops in prop::collection::vec((0u64..300, 0u64..4), 1..80),
    ) {
        let def = LimitDef::FixedWindow { limit, window_ms: window };
        let e = engine();
        let mut now = 0;
        let mut per_window = std::collections::HashMap::new();
        for (dt, cost) in ops {
            now += dt;
            if e.check(&[check("k", def, cost)], false, now).unwrap()[0].allowed {
                *per_window.entry(now / window).or_insert(0) += cost;
            }
        }
        prop_assert!(per_window.values().all(|&n| n <= limit));
    }

    /// A sliding window admits at most `limit` per aligned window and at most
    /// 2 × limit in any window-long interval (the documented bound).
    #[test]
    fn sliding_window_stays_within_its_bound(
        limit in 1u64..10, window in 2u64..1000,
        ops in prop::collection::vec((0u64..200, 0u64..4), 1..80),
    ) {
        let def = LimitDef::SlidingWindow { limit, window_ms: window };
        let e = engine();
        let mut now = 0;
        let mut granted = Vec::new();
        for (dt, cost) in ops {
            now += dt;
            if e.check(&[check("k", def, cost)], false, now).unwrap()[0].allowed {
                granted.push((now, cost));
            }
        }
        for &(t0, _) in &granted {
            let in_interval: u64 = granted.iter().filter(|(t, _)| *t >= t0 && *t < t0 + window).map(|g| g.1).sum();
            prop_assert!(in_interval <= 2 * limit);
            let aligned: u64 = granted.iter().filter(|(t, _)| t / window == t0 / window).map(|g| g.1).sum();
            prop_assert!(aligned <= limit);
        }
    }

    /// At most one holder per lease at any instant, and fencing tokens of
    /// successive grants strictly increase.
    #[test]
    fn one_holder_at_a_time_and_tokens_increase(
        ops in prop::collection::vec((0u64..80, 0u8..4, 0usize..2, 0usize..3, 1u64..200), 1..80),
    ) {
        let e = engine();
        let mut now = 0;
        // token -> (name, start, end)
        let mut grants: std::collections::BTreeMap<u64, (usize, u64, u64)> = Default::default();
        let mut held: Vec<Option<(usize, u64)>> = vec![None; 2]; // name -> (holder, token) as last seen
        for (dt, op, name, holder, ttl) in ops {
            now += dt;
            let (n, h) = (format!("n{name}"), format!("h{holder}"));
            let token = held[name].map(|x| x.1).unwrap_or(0);
            let cmd = match op {
                0 | 1 => Command::Acquire(Acquire { name: n, holder: h, ttl_ms: ttl }),
                2 => Command::Renew(Renew { name: n, holder: h, fencing_token: token, ttl_ms: ttl }),
                _ => Command::Release(Release { name: n, holder: h, fencing_token: token }),
            };
            match e.apply(cmd, now) {
                Ok(Applied { outcome: Outcome::Acquire(Acquired { acquired: true, lease }), .. })
                | Ok(Applied { outcome: Outcome::Renew(lease), .. }) => {
                    let g = grants.entry(lease.fencing_token).or_insert((name, now, 0));
                    g.2 = lease.expires_at_ms;
                    held[name] = Some((holder, lease.fencing_token));
                }
                Ok(Applied { outcome: Outcome::Release(lease), .. }) => {
                    grants.get_mut(&lease.fencing_token).unwrap().2 = now;
                }
                _ => {}
            }
        }
        for name in 0..2 {
            let mine: Vec<_> = grants.iter().filter(|g| g.1 .0 == name).collect();
            for w in mine.windows(2) {
                // BTreeMap order is token order: later tokens start no earlier
                // than the previous grant ended.
                prop_assert!(w[1].1 .1 >= w[0].1 .2, "overlap: {:?}", w);
            }
        }
    }

    /// An idempotency key never has two STARTED attempts live at once, and
    /// attempt numbers strictly increase.
    #[test]
    fn never_two_concurrent_started_attempts(
        ops in prop::collection::vec((0u64..60, 0u8..3, 1u64..150), 1..80),
    ) {
        let e = engine();
        let mut now = 0;
        let mut attempts: Vec<(u64, u64, u64)> = Vec::new(); // (attempt, start, end)
        for (dt, op, ttl) in ops {
            now += dt;
            let last = attempts.last().map(|a| a.0).unwrap_or(0);
            let cmd = match op {
                0 => Command::Begin(Begin { key: "k".into(), fingerprint: vec![], lock_ttl_ms: ttl, retention_ms: 50 }),
                1 => Command::Complete(Complete { key: "k".into(), attempt: last, response: vec![] }),
                _ => Command::Abort(Abort { key: "k".into(), attempt: last }),
            };
            match e.apply(cmd, now) {
                Ok(Applied { outcome: Outcome::Begin(BeginOutcome::Started { attempt }), .. }) => {
                    prop_assert!(attempt > last);
                    attempts.push((attempt, now, now + ttl));
                }
                Ok(Applied { outcome: Outcome::Complete | Outcome::Abort, .. }) => {
                    attempts.last_mut().unwrap().2 = now;
                }
                _ => {}
            }
        }
        for w in attempts.windows(2) {
            prop_assert!(w[1].1 >= w[0].2, "overlapping attempts {:?}", w);
        }
    }
}
