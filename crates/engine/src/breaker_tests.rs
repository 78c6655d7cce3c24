//! Circuit breakers against a reference model kept differently: every
//! counted outcome with its time (the windows are counted from the list
//! when asked), probe permits as a map, and replicas through sync and
//! snapshot.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::breakers::{BreakerDef, CallOutcome, Phase, Verdict};
use crate::{Command, Engine, EngineConfig};

/// The reference: what the module's doc says, in the plainest terms.
#[derive(Debug, Default)]
struct Model {
    phase: Phase,
    open_until: u64,
    /// Counted outcomes since it last closed: (time, failed).
    outcomes: Vec<(u64, bool)>,
    /// Probe token → when it lapses.
    probes: BTreeMap<u64, u64>,
    successes: u32,
    last_token: u64,
    latest: u64,
    /// Whether a report has made it (asking makes nothing, so an absent
    /// breaker has seen no time).
    exists: bool,
}

impl Model {
    fn now(&mut self, t: u64) -> u64 {
        self.latest = self.latest.max(t);
        let now = self.latest;
        if self.phase == Phase::Open && now >= self.open_until {
            self.phase = Phase::HalfOpen;
            self.probes.clear();
            self.successes = 0;
        }
        self.probes.retain(|_, until| *until > now);
        now
    }

    fn open(&mut self, def: &BreakerDef, now: u64) {
        self.phase = Phase::Open;
        self.open_until = now + def.open_ms;
        self.outcomes.clear();
        self.probes.clear();
        self.successes = 0;
    }

    fn allow(&mut self, def: &BreakerDef, t: u64) -> Verdict {
        if !self.exists {
            return Verdict {
                phase: Phase::Closed,
                allowed: true,
                probe_token: 0,
                retry_after_ms: 0,
            };
        }
        let now = self.now(t);
        let mut v = Verdict {
            phase: self.phase,
            allowed: false,
            probe_token: 0,
            retry_after_ms: 0,
        };
        match self.phase {
            Phase::Closed => v.allowed = true,
            Phase::Open => v.retry_after_ms = self.open_until - now,
            Phase::HalfOpen => {
                if (self.probes.len() as u32) < def.probes {
                    self.last_token += 1;
                    self.probes.insert(self.last_token, now + def.probe_ttl_ms);
                    v.allowed = true;
                    v.probe_token = self.last_token;
                } else {
                    v.retry_after_ms = self.probes.values().min().unwrap() - now;
                }
            }
        }
        v
    }

    fn report(&mut self, def: &BreakerDef, failed: bool, token: u64, t: u64) -> (Phase, bool) {
        self.exists = true;
        let now = self.now(t);
        let counted = match self.phase {
            Phase::Closed => {
                self.outcomes.push((now, failed));
                // The sliding window, counted from the list.
                let w = def.window_ms;
                let start = now - now % w;
                let in_window = |from: u64, f: bool| {
                    self.outcomes
                        .iter()
                        .filter(|(at, x)| *at >= from && *at < from + w && (!f || *x))
                        .count() as u128
                };
                let covered = u128::from(start + w - now);
                let prev = |f| {
                    if start >= w {
                        in_window(start - w, f)
                    } else {
                        0
                    }
                };
                let calls = in_window(start, false) * u128::from(w) + prev(false) * covered;
                let fails = in_window(start, true) * u128::from(w) + prev(true) * covered;
                if failed
                    && calls >= u128::from(def.min_calls) * u128::from(w)
                    && fails * 100 >= u128::from(def.failure_percent) * calls
                {
                    self.open(def, now);
                }
                true
            }
            Phase::HalfOpen if self.probes.remove(&token).is_some() => {
                if failed {
                    self.open(def, now);
                } else {
                    self.successes += 1;
                    if self.successes >= def.probes_to_close {
                        self.phase = Phase::Closed;
                        self.outcomes.clear();
                        self.probes.clear();
                    }
                }
                true
            }
            _ => false,
        };
        (self.phase, counted)
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Time moves by the first field (negative: back).
    Allow(i64),
    /// Outcome (0 success, 1 failure, 2 timeout), which probe token
    /// (0: none, 1: the newest, 2: one before it), time step.
    Report(u8, u8, i64),
    /// Syncs what changed to the replica, and checks it matches.
    Sync,
    /// Restores a snapshot into the replica, and checks it matches.
    Snapshot,
    /// The replica takes over as the decider.
    Failover,
}

fn op() -> impl Strategy<Value = Op> {
    let step = prop_oneof![4 => 0i64..40, 1 => -30i64..0, 1 => 0i64..3_000];
    prop_oneof![
        4 => step.clone().prop_map(Op::Allow),
        6 => (0u8..3, 0u8..3, step).prop_map(|(o, p, s)| Op::Report(o, p, s)),
        1 => Just(Op::Sync),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Failover),
    ]
}

fn def() -> impl Strategy<Value = BreakerDef> {
    (
        prop_oneof![Just(7u64), Just(100), Just(1_000)],
        1u32..6,
        1u32..101,
        1u64..500,
        1u32..4,
        1u32..4,
        1u64..300,
    )
        .prop_map(
            |(window_ms, min_calls, pct, open_ms, probes, close, ttl)| BreakerDef {
                window_ms,
                min_calls,
                failure_percent: pct,
                open_ms,
                probes,
                probes_to_close: close,
                probe_ttl_ms: ttl,
            },
        )
}

const NAME: &str = "payments";

fn sync(from: &Engine, to: &Engine) {
    let breakers = from.breakers().drain_dirty(usize::MAX);
    to.apply(
        Command::SyncBreakers {
            breakers,
            decider: None,
        },
        0,
    )
    .unwrap();
}

/// Both hold the same breaker, as of `now` (past both its times).
fn same(a: &Engine, b: &Engine, def: &BreakerDef, now: u64) {
    let (a, b) = (a.breakers().get(NAME), b.breakers().get(NAME));
    let seen = |x: &Option<crate::Breaker>| x.as_ref().map_or(0, |x| x.seen_ms);
    let now = now.max(seen(&a)).max(seen(&b));
    assert_eq!(a.map(|x| x.at(def, now)), b.map(|x| x.at(def, now)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn breakers_match_the_model(def in def(), ops in prop::collection::vec(op(), 1..120)) {
        let config = EngineConfig::default();
        let mut decider = Engine::new(config);
        let mut replica = Engine::new(config);
        let mut model = Model::default();
        let mut now: u64 = 1_000;
        let step = |now: &mut u64, by: i64| *now = now.saturating_add_signed(by);
        for op in ops {
            match op {
                Op::Allow(by) => {
                    step(&mut now, by);
                    let (got, _) = decider.breakers().allow(NAME, &def, now);
                    prop_assert_eq!(got, model.allow(&def, now), "allow at {}", now);
                }
                Op::Report(o, p, by) => {
                    step(&mut now, by);
                    let outcome = [CallOutcome::Success, CallOutcome::Failure, CallOutcome::Timeout][o as usize];
                    let token = match p {
                        0 => 0,
                        1 => model.last_token,
                        _ => model.last_token.saturating_sub(1),
                    };
                    let (got, _) = decider
                        .breakers()
                        .report(NAME, &def, outcome, token, now, Default::default())
                        .unwrap();
                    let want = model.report(&def, o != 0, token, now);
                    prop_assert_eq!((got.phase, got.counted), want, "report at {}", now);
                }
                Op::Sync => {
                    sync(&decider, &replica);
                    same(&decider, &replica, &def, model.latest);
                }
                Op::Snapshot => {
                    replica = Engine::restore(config, decider.snapshot());
                    same(&decider, &replica, &def, model.latest);
                }
                Op::Failover => {
                    // The replica goes on from a sync made just before:
                    // with the time the decider had seen (what follows
                    // from time alone is not synced, so a new decider
                    // whose clock is behind that time would judge lapses
                    // a little later than the model; `Sync` checks that
                    // every other change is synced).
                    decider.breakers().mark_dirty([NAME]);
                    sync(&decider, &replica);
                    std::mem::swap(&mut decider, &mut replica);
                    same(&decider, &replica, &def, model.latest);
                }
            }
        }
    }
}

#[test]
fn a_failing_dependency_trips_it_for_everyone_and_probes_close_it() {
    let def = BreakerDef {
        window_ms: 1_000,
        min_calls: 4,
        failure_percent: 50,
        open_ms: 500,
        probes: 2,
        probes_to_close: 2,
        probe_ttl_ms: 100,
    };
    let e = Engine::new(EngineConfig::default());
    let t = e.breakers();
    let q = Default::default;
    let report = |o, token, now| t.report(NAME, &def, o, token, now, q()).unwrap();
    assert!(t.allow(NAME, &def, 0).0.allowed);
    assert_eq!(t.len(), 0, "asking makes no breaker");
    report(CallOutcome::Success, 0, 10);
    report(CallOutcome::Failure, 0, 11);
    // Two of two... but fewer than min_calls.
    assert_eq!(report(CallOutcome::Failure, 0, 12).0.phase, Phase::Closed);
    let (r, change) = report(CallOutcome::Timeout, 0, 13);
    assert_eq!(r.phase, Phase::Open);
    assert_eq!(change.unwrap().from, Phase::Closed);
    let v = t.allow(NAME, &def, 113).0;
    assert_eq!(
        (v.phase, v.allowed, v.retry_after_ms),
        (Phase::Open, false, 400)
    );
    // A late report of a call made before it tripped does not count.
    assert!(!report(CallOutcome::Success, 0, 114).0.counted);
    // Half-open at 513: two probes, then none until one lapses.
    let (a, change) = t.allow(NAME, &def, 513);
    assert_eq!(
        (a.phase, a.allowed, a.probe_token),
        (Phase::HalfOpen, true, 1)
    );
    assert_eq!(change.unwrap().from, Phase::Open);
    let b = t.allow(NAME, &def, 520).0;
    assert_eq!(b.probe_token, 2);
    let c = t.allow(NAME, &def, 530).0;
    assert_eq!((c.allowed, c.retry_after_ms), (false, 83));
    // Probe 1 lapses unreported at 613; its late report is not counted.
    let d = t.allow(NAME, &def, 613).0;
    assert_eq!(d.probe_token, 3);
    assert!(!report(CallOutcome::Success, 1, 614).0.counted);
    assert_eq!(
        report(CallOutcome::Success, 2, 615).0.phase,
        Phase::HalfOpen
    );
    let (r, change) = report(CallOutcome::Success, 3, 616);
    assert_eq!(r.phase, Phase::Closed);
    assert_eq!(change.unwrap().from, Phase::HalfOpen);
    // Closed with an empty window: idle, and swept, once it rolls off.
    assert_eq!(t.sweep(616), 1);
    assert_eq!(t.len(), 0);
}

#[test]
fn a_failed_probe_opens_it_again() {
    let def = BreakerDef {
        min_calls: 1,
        open_ms: 50,
        ..BreakerDef::default()
    };
    let e = Engine::new(EngineConfig::default());
    let t = e.breakers();
    let r = t
        .report(NAME, &def, CallOutcome::Failure, 0, 0, Default::default())
        .unwrap();
    assert_eq!(r.0.phase, Phase::Open);
    let probe = t.allow(NAME, &def, 50).0.probe_token;
    let r = t
        .report(
            NAME,
            &def,
            CallOutcome::Failure,
            probe,
            60,
            Default::default(),
        )
        .unwrap();
    assert_eq!(r.0.phase, Phase::Open);
    assert_eq!(t.allow(NAME, &def, 61).0.retry_after_ms, 49);
}

#[test]
fn the_caps_refuse_new_breakers_and_free_idle_ones() {
    let config = EngineConfig {
        max_breakers: 2,
        ..EngineConfig::default()
    };
    let e = Engine::new(config);
    let t = e.breakers();
    let def = BreakerDef::default();
    let quota = |max| crate::BreakerQuota {
        principal: "svc",
        max,
    };
    t.report("a", &def, CallOutcome::Success, 0, 0, quota(Some(1)))
        .unwrap();
    let over = t.report("b", &def, CallOutcome::Success, 0, 0, quota(Some(1)));
    assert!(
        matches!(over, Err(crate::EngineError::OverQuota { quota: 1, .. })),
        "{over:?}"
    );
    t.report("b", &def, CallOutcome::Success, 0, 0, quota(None))
        .unwrap();
    let full = t.report("c", &def, CallOutcome::Success, 0, 0, Default::default());
    assert!(
        matches!(full, Err(crate::EngineError::Exhausted { max: 2, .. })),
        "{full:?}"
    );
    // Reports to a breaker that exists still count at the cap.
    t.report("a", &def, CallOutcome::Failure, 0, 1, Default::default())
        .unwrap();
    assert_eq!(e.held_by("svc").breakers, 2);
    assert_eq!(t.sweep(2 * def.window_ms), 2);
    assert_eq!(e.held_by("svc").breakers, 0);
    t.report("c", &def, CallOutcome::Success, 0, 0, quota(Some(1)))
        .unwrap();
}

#[test]
fn bounds_name_the_field() {
    let ok = BreakerDef::default();
    assert_eq!(ok.validate(), Ok(()));
    let bad = BreakerDef {
        failure_percent: 101,
        ..ok
    };
    assert_eq!(bad.validate().unwrap_err().0, "failure_percent");
    let bad = BreakerDef { probes: 0, ..ok };
    assert_eq!(bad.validate().unwrap_err().0, "probes");
    let bad = BreakerDef {
        open_ms: crate::breakers::MAX_BREAKER_MS + 1,
        ..ok
    };
    assert_eq!(bad.validate().unwrap_err().0, "open_ms");
}
