//! The semaphore table against a plain reference model (a list of entries
//! per name), driven by random acquires, renews, releases, sweeps and
//! failover extensions at random times, backwards too, with random limits
//! (a limit is the caller's, so it changes between calls). Every answer
//! must equal the model's, and a replica restored from the table's
//! serialized form mid-run must answer alike from then on. Then the
//! invariants a checker would hold a history to: a grant never takes a
//! name past the limit it was asked under, and fencing tokens are unique
//! and increase.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::semaphores::{Ask, Permit, SemaphoreTable};
use crate::EngineError;

/// (holder, permits, token, ttl, expires), in grant order.
type Entries = Vec<(usize, u64, u64, u64, u64)>;

#[derive(Clone, Debug, Default)]
struct Model {
    names: BTreeMap<usize, Entries>,
    last: u64,
}

fn live(e: &Entries, now: u64) -> impl Iterator<Item = &(usize, u64, u64, u64, u64)> {
    e.iter().filter(move |x| now < x.4)
}

impl Model {
    fn held(&self, n: usize, now: u64) -> u64 {
        self.names
            .get(&n)
            .map_or(0, |e| live(e, now).map(|x| x.1).sum())
    }

    /// (granted token, held after, next lapse when refused).
    fn acquire(
        &mut self,
        n: usize,
        h: usize,
        limit: u64,
        permits: u64,
        ttl: u64,
        now: u64,
    ) -> (Option<u64>, u64, u64) {
        let e = self.names.entry(n).or_default();
        e.retain(|x| now < x.4);
        let held: u64 = e.iter().map(|x| x.1).sum();
        let next = e.iter().map(|x| x.4).min().unwrap_or(0);
        if let Some(mine) = e.iter_mut().find(|x| x.0 == h) {
            let others = held - mine.1;
            if others + permits > limit && permits > mine.1 {
                return (None, held, next);
            }
            *mine = (h, permits, mine.2, ttl, now + ttl);
            return (Some(mine.2), others + permits, 0);
        }
        if held + permits > limit {
            return (None, held, next);
        }
        self.last += 1;
        e.push((h, permits, self.last, ttl, now + ttl));
        (Some(self.last), held + permits, 0)
    }

    fn renew(&mut self, n: usize, h: usize, token: u64, ttl: u64, now: u64) -> Option<u64> {
        let e = self.names.get_mut(&n)?;
        let x = e
            .iter_mut()
            .find(|x| x.0 == h && now < x.4 && x.2 == token)?;
        x.3 = ttl;
        x.4 = now + ttl;
        Some(x.4)
    }

    fn release(&mut self, n: usize, h: usize, token: u64, now: u64) -> bool {
        let Some(e) = self.names.get_mut(&n) else {
            return false;
        };
        match e.iter().position(|x| x.0 == h && now < x.4 && x.2 == token) {
            Some(i) => {
                e.remove(i);
                true
            }
            None => false,
        }
    }

    fn sweep(&mut self, now: u64) {
        for e in self.names.values_mut() {
            e.retain(|x| now < x.4);
        }
    }

    fn extend(&mut self, by: u64, now: u64) {
        for e in self.names.values_mut() {
            for x in e.iter_mut().filter(|x| now < x.4) {
                x.4 += by;
            }
        }
    }

    fn view(&self, n: usize, now: u64) -> Vec<(String, u64, u64, u64)> {
        self.names.get(&n).map_or_else(Vec::new, |e| {
            live(e, now)
                .map(|x| (format!("h{}", x.0), x.1, x.2, x.4))
                .collect()
        })
    }
}

fn view(p: &[Permit]) -> Vec<(String, u64, u64, u64)> {
    p.iter()
        .map(|p| {
            (
                p.holder.clone(),
                p.permits,
                p.fencing_token,
                p.expires_at_ms,
            )
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        n: usize,
        h: usize,
        limit: u64,
        permits: u64,
        ttl: u64,
    },
    Renew {
        n: usize,
        h: usize,
        ttl: u64,
        stale: bool,
    },
    Release {
        n: usize,
        h: usize,
        stale: bool,
    },
    Sweep,
    Extend(u64),
}

fn any_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..2, 0usize..4, 1u64..5, 1u64..4, 1u64..300)
            .prop_map(|(n, h, limit, permits, ttl)| Op::Acquire { n, h, limit, permits, ttl }),
        2 => (0usize..2, 0usize..4, 1u64..300, prop::bool::weighted(0.2))
            .prop_map(|(n, h, ttl, stale)| Op::Renew { n, h, ttl, stale }),
        2 => (0usize..2, 0usize..4, prop::bool::weighted(0.2))
            .prop_map(|(n, h, stale)| Op::Release { n, h, stale }),
        1 => Just(Op::Sweep),
        1 => (0u64..100).prop_map(Op::Extend),
    ]
}

fn ask(n: usize, h: &str, limit: u64, permits: u64, ttl: u64) -> (String, String, u64, u64, u64) {
    (format!("s{n}"), h.to_owned(), limit, permits, ttl)
}

fn acquire(
    t: &mut SemaphoreTable,
    a: &(String, String, u64, u64, u64),
    now: u64,
) -> Result<crate::SemaphoreGrant, EngineError> {
    t.acquire(
        Ask {
            name: &a.0,
            holder: &a.1,
            principal: "",
            limit: a.2,
            permits: a.3,
            ttl_ms: a.4,
            quota: None,
        },
        now,
        &mut Vec::new(),
    )
}

fn restored(t: &SemaphoreTable) -> SemaphoreTable {
    let json = serde_json::to_string(t).expect("the table serializes");
    let mut r: SemaphoreTable = serde_json::from_str(&json).expect("and reads back");
    r.restored(1000);
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_table_answers_what_the_model_answers(
        ops in prop::collection::vec((prop_oneof![8 => 0i64..120, 1 => -200i64..0], any_op()), 1..150),
        restore_at in 0usize..150,
    ) {
        let mut t = SemaphoreTable::new(1000);
        let mut m = Model::default();
        let mut now = 1_000_000u64;
        // Each holder's last granted token per name, to renew and release with.
        let mut tokens: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        let mut granted: Vec<u64> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, (dt, op)) in ops.iter().enumerate() {
            now = now.saturating_add_signed(*dt);
            if i == restore_at {
                t = restored(&t);
            }
            match *op {
                Op::Acquire { n, h, limit, permits, ttl } => {
                    let before = t.get(&format!("s{n}"), now);
                    let had = before.iter().find(|p| p.holder == format!("h{h}")).map_or(0, |p| p.permits);
                    let got = acquire(&mut t, &ask(n, &format!("h{h}"), limit, permits, ttl), now).unwrap();
                    let want = m.acquire(n, h, limit, permits, ttl, now);
                    prop_assert_eq!((got.permit.as_ref().map(|p| p.fencing_token), got.held, got.next_lapse_ms), want);
                    if let Some(p) = got.permit {
                        if seen.insert(p.fencing_token) {
                            granted.push(p.fencing_token);
                        }
                        tokens.insert((n, h), p.fencing_token);
                        // A grant that took more kept the name within the
                        // limit it was asked under; a lowered limit evicts
                        // nobody, so one that did not may be over it.
                        prop_assert!(permits <= had || got.held <= limit, "{} held under {}", got.held, limit);
                    }
                }
                Op::Renew { n, h, ttl, stale } => {
                    let token = tokens.get(&(n, h)).copied().unwrap_or(0) + u64::from(stale);
                    let got = t.renew(&format!("s{n}"), &format!("h{h}"), "", token, ttl, now, &mut Vec::new());
                    let want = m.renew(n, h, token, ttl, now);
                    prop_assert_eq!(got.as_ref().ok().map(|p| p.expires_at_ms), want, "{:?}", got);
                    if want.is_none() {
                        let not_holder = matches!(got, Err(EngineError::NotPermitHolder { .. }));
                        prop_assert!(not_holder, "{:?}", got);
                    }
                }
                Op::Release { n, h, stale } => {
                    let token = tokens.get(&(n, h)).copied().unwrap_or(0) + u64::from(stale);
                    let got = t.release(&format!("s{n}"), &format!("h{h}"), "", token, now, &mut Vec::new());
                    prop_assert_eq!(got.is_ok(), m.release(n, h, token, now));
                }
                Op::Sweep => {
                    t.sweep(now, &mut Vec::new());
                    m.sweep(now);
                }
                Op::Extend(by) => {
                    t.extend_all(by, now);
                    m.extend(by, now);
                }
            }
            for n in 0..2 {
                prop_assert_eq!(view(&t.get(&format!("s{n}"), now)), m.view(n, now), "name {}", n);
                prop_assert_eq!(t.held(&format!("s{n}"), now), m.held(n, now));
            }
        }
        // Tokens are unique and increase in grant order.
        prop_assert!(granted.windows(2).all(|w| w[0] < w[1]), "{:?}", granted);
    }
}

#[test]
fn the_model_is_no_mirror() {
    // Two holders under a limit of 3: the second's 2 do not fit beside 2.
    let mut m = Model::default();
    assert_eq!(m.acquire(0, 0, 3, 2, 100, 0), (Some(1), 2, 0));
    assert_eq!(m.acquire(0, 1, 3, 2, 100, 10), (None, 2, 100));
    // The first lapses at 100: exactly then there is room.
    assert_eq!(m.acquire(0, 1, 3, 2, 100, 99), (None, 2, 100));
    assert_eq!(m.acquire(0, 1, 3, 2, 100, 100), (Some(2), 2, 0));
}

#[test]
fn caps_quotas_and_principals() {
    let mut t = SemaphoreTable::new(2);
    let ev = &mut Vec::new();
    fn a<'a>(name: &'a str, holder: &'a str, principal: &'a str, quota: Option<u64>) -> Ask<'a> {
        Ask {
            name,
            holder,
            principal,
            limit: 10,
            permits: 1,
            ttl_ms: 100,
            quota,
        }
    }
    t.acquire(a("s", "a", "alice", Some(1)), 0, ev).unwrap();
    let over = t.acquire(a("s", "b", "alice", Some(1)), 0, ev).unwrap_err();
    assert!(matches!(over, EngineError::OverQuota { .. }), "{over}");
    t.acquire(a("s", "b", "bob", None), 0, ev).unwrap();
    let full = t.acquire(a("t", "c", "carol", None), 0, ev).unwrap_err();
    assert!(
        full.to_string()
            .contains("semaphore holders limit reached (2)"),
        "{full}"
    );
    // Another principal under the same holder name neither renews nor releases.
    let theirs = t.acquire(a("s", "a", "mallory", None), 1, ev).unwrap();
    assert!(theirs.permit.is_none());
    let token = t.get("s", 1)[0].fencing_token;
    let denied = t.release("s", "a", "mallory", token, 1, ev).unwrap_err();
    assert!(
        matches!(denied, EngineError::NotPermitOwner { .. }),
        "{denied}"
    );
    // Lapsed entries still count against the cap until purged; an acquire
    // on their name purges them, and a sweep purges the rest.
    assert_eq!(t.len(), 2);
    assert_eq!(t.sweep(100, ev), 2);
    assert!(t.is_empty() && t.held_by("alice") == 0);
    assert!(
        ev.iter()
            .filter(|e| e.kind == crate::SemaphoreEventKind::Expired)
            .count()
            == 2
    );
}

#[test]
fn a_lowered_limit_evicts_nobody_and_a_failover_shortens_nothing() {
    let mut t = SemaphoreTable::new(10);
    let ev = &mut Vec::new();
    let a = |holder, limit, permits| Ask {
        name: "db",
        holder,
        principal: "",
        limit,
        permits,
        ttl_ms: 100,
        quota: None,
    };
    t.acquire(a("a", 5, 3), 0, ev).unwrap();
    t.acquire(a("b", 5, 2), 0, ev).unwrap();
    // The limit drops to 2: both keep their permits and may renew them,
    // nobody new gets in, and a holder may not grow.
    let renewed = t.acquire(a("a", 2, 3), 50, ev).unwrap();
    assert_eq!(
        (renewed.held, renewed.permit.unwrap().expires_at_ms),
        (5, 150)
    );
    assert!(t.acquire(a("c", 2, 1), 50, ev).unwrap().permit.is_none());
    assert!(t.acquire(a("b", 2, 3), 50, ev).unwrap().permit.is_none());
    assert_eq!(t.held("db", 50), 5);
    // A new leader pushes every live deadline out; lapsed ones stay lapsed.
    assert_eq!(t.extend_all(40, 120), 1);
    assert_eq!(t.get("db", 120)[0].expires_at_ms, 190);
    assert_eq!(t.held("db", 189), 3);
}
