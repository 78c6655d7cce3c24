//! Shared circuit breakers: one breaker under a name for every caller, so a
//! dependency that fails trips it for all of them at once.
//!
//! A breaker is CLOSED (calls go), OPEN (calls fail fast until
//! `open_until_ms`) or HALF_OPEN (up to `probes` calls at once may try the
//! dependency, each under a probe permit that lapses after `probe_ttl_ms`).
//! Callers report each call's outcome. While closed, outcomes count in a
//! sliding window (two aligned windows of `window_ms`, the previous one
//! weighted by how much of it the sliding window still covers, as the
//! sliding-window limit does); once the window holds at least `min_calls`
//! and failures are at least `failure_percent` of them, the breaker opens
//! for `open_ms`. It half-opens when that has passed (on the next call that
//! looks); `probes_to_close` successful probes close it (with an empty
//! window), and one failed probe opens it again. Reports of calls made
//! without a probe while it is open or half-open are not counted: they
//! tell of the dependency before it tripped.
//!
//! Like a rate limit's definition, the thresholds are the caller's, sent
//! with each call; a breaker keeps only its state. Everything here is a
//! pure function of (state, definition, call, now). Time never goes back
//! for a breaker: a call stamped before the latest time it has seen counts
//! as made at that time.

use serde::{Deserialize, Serialize};

pub use crate::breaker_table::{BreakerChange, BreakerQuota, BreakerTable};

/// Most probe permits a breaker may hand out at once.
pub const MAX_PROBES: u32 = 1_000;
/// Longest open duration or probe permit: one day.
pub const MAX_BREAKER_MS: u64 = 86_400_000;
/// About what a breaker takes in a log entry, beyond its name and probes.
pub const STORED_BYTES: usize = 96;
/// Largest `min_calls` and `probes_to_close`.
pub const MAX_BREAKER_CALLS: u32 = 1_000_000;

/// A breaker's thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerDef {
    /// Length of the sliding window outcomes count in.
    pub window_ms: u64,
    /// Fewest calls in the window before failures can trip it.
    pub min_calls: u32,
    /// Failures, as a percentage of the window's calls, that trip it.
    pub failure_percent: u32,
    /// How long it stays open once tripped.
    pub open_ms: u64,
    /// Most probe permits out at once while half-open.
    pub probes: u32,
    /// Successful probes that close it.
    pub probes_to_close: u32,
    /// How long a probe permit lasts without a report.
    pub probe_ttl_ms: u64,
}

impl Default for BreakerDef {
    fn default() -> Self {
        Self {
            window_ms: 10_000,
            min_calls: 20,
            failure_percent: 50,
            open_ms: 5_000,
            probes: 1,
            probes_to_close: 3,
            probe_ttl_ms: 10_000,
        }
    }
}

impl BreakerDef {
    /// Checks every bound: `Err((field, bound))` names the first one broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let ms = |v: u64, max: u64| (1..=max).contains(&v);
        let calls = |v: u32, max: u32| (1..=max).contains(&v);
        let day = format!("must be 1 to {MAX_BREAKER_MS} ms");
        if !ms(self.window_ms, crate::MAX_WINDOW_MS) {
            return Err((
                "window_ms",
                format!("must be 1 to {} ms", crate::MAX_WINDOW_MS),
            ));
        }
        if !calls(self.min_calls, MAX_BREAKER_CALLS) {
            return Err(("min_calls", format!("must be 1 to {MAX_BREAKER_CALLS}")));
        }
        if !calls(self.failure_percent, 100) {
            return Err(("failure_percent", "must be 1 to 100".into()));
        }
        if !ms(self.open_ms, MAX_BREAKER_MS) {
            return Err(("open_ms", day));
        }
        if !calls(self.probes, MAX_PROBES) {
            return Err(("probes", format!("must be 1 to {MAX_PROBES}")));
        }
        if !calls(self.probes_to_close, MAX_BREAKER_CALLS) {
            return Err((
                "probes_to_close",
                format!("must be 1 to {MAX_BREAKER_CALLS}"),
            ));
        }
        if !ms(self.probe_ttl_ms, MAX_BREAKER_MS) {
            return Err(("probe_ttl_ms", day));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

/// What a caller reports of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallOutcome {
    Success,
    Failure,
    /// Counted as a failure.
    Timeout,
}

/// A probe permit out while half-open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub token: u64,
    pub until_ms: u64,
}

/// One breaker's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breaker {
    pub phase: Phase,
    /// When it entered its phase.
    pub since_ms: u64,
    /// While open: when it half-opens.
    pub open_until_ms: u64,
    /// The current aligned window's start and length.
    pub window_start_ms: u64,
    pub window_ms: u64,
    /// Calls and failures in the previous and the current window.
    pub calls: [u32; 2],
    pub failures: [u32; 2],
    /// Live probe permits (half-open), in grant order.
    pub probes: Vec<Probe>,
    /// Successful probes since it half-opened.
    pub probe_successes: u32,
    /// The last probe token handed out (tokens increase).
    pub last_token: u64,
    /// The latest time it has seen.
    pub seen_ms: u64,
}

/// An answer to `allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub phase: Phase,
    /// Whether the call may go (closed, or a probe permit granted).
    pub allowed: bool,
    /// The probe permit's token (0: none).
    pub probe_token: u64,
    /// When not allowed: how long until a call may be (the end of the open
    /// time, or the earliest probe permit's lapse).
    pub retry_after_ms: u64,
}

/// What a call did to a breaker, beyond its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// Its state changed (it must be replicated).
    pub changed: bool,
    /// Its phase before, if the call moved it to another one.
    pub moved_from: Option<Phase>,
}

/// Whether a report counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub phase: Phase,
    /// False for a report of a call made without a probe while it was not
    /// closed, or of a probe whose permit lapsed.
    pub counted: bool,
}

impl Breaker {
    /// Brings it to `now` (at least the latest time it has seen): rolls the
    /// window, half-opens an open breaker whose time is up, drops lapsed
    /// probe permits. The time used. What follows from time alone (a
    /// rolled window, a lapsed permit) is not a change to replicate: a
    /// replica given the same state rolls it the same way.
    fn advance(&mut self, def: &BreakerDef, now_ms: u64, effect: &mut Effect) -> u64 {
        let now = now_ms.max(self.seen_ms);
        self.seen_ms = now;
        let start = now - now % def.window_ms;
        if self.window_ms != def.window_ms {
            self.window_ms = def.window_ms;
            self.window_start_ms = start;
            self.calls = [0, 0];
            self.failures = [0, 0];
            effect.changed = true;
        } else if start != self.window_start_ms {
            let next = self.window_start_ms.checked_add(def.window_ms) == Some(start);
            let (c, f) = (self.calls[1], self.failures[1]);
            self.calls = if next { [c, 0] } else { [0, 0] };
            self.failures = if next { [f, 0] } else { [0, 0] };
            self.window_start_ms = start;
        }
        if self.phase == Phase::Open && now >= self.open_until_ms {
            self.move_to(Phase::HalfOpen, self.open_until_ms, effect);
        }
        self.probes.retain(|p| p.until_ms > now);
        now
    }

    fn move_to(&mut self, phase: Phase, at_ms: u64, effect: &mut Effect) {
        if effect.moved_from.is_none() {
            effect.moved_from = Some(self.phase);
        }
        self.phase = phase;
        self.since_ms = at_ms;
        self.probes.clear();
        self.probe_successes = 0;
        effect.changed = true;
        if phase != Phase::Open {
            self.open_until_ms = 0;
        }
        if phase == Phase::Closed {
            self.calls = [0, 0];
            self.failures = [0, 0];
        }
    }

    fn trip(&mut self, def: &BreakerDef, now: u64, effect: &mut Effect) {
        self.move_to(Phase::Open, now, effect);
        self.open_until_ms = now.saturating_add(def.open_ms);
    }

    /// Whether the window's failures trip it: at least `min_calls` calls
    /// and at least `failure_percent` of them failures, the previous
    /// window weighted by the part of it the sliding window still covers
    /// (compared in units of 1/window_ms, so exactly).
    fn tripped(&self, def: &BreakerDef, now: u64) -> bool {
        let w = u128::from(def.window_ms);
        let covered = w - u128::from(now - self.window_start_ms);
        let weigh = |v: [u32; 2]| u128::from(v[1]) * w + u128::from(v[0]) * covered;
        let (calls, failures) = (weigh(self.calls), weigh(self.failures));
        calls >= u128::from(def.min_calls) * w
            && failures * 100 >= u128::from(def.failure_percent) * calls
    }

    /// May a call go now? Hands out a probe permit while half-open.
    pub fn allow(&mut self, def: &BreakerDef, now_ms: u64) -> (Verdict, Effect) {
        let mut effect = Effect::default();
        let now = self.advance(def, now_ms, &mut effect);
        let mut verdict = Verdict {
            phase: self.phase,
            allowed: false,
            probe_token: 0,
            retry_after_ms: 0,
        };
        match self.phase {
            Phase::Closed => verdict.allowed = true,
            Phase::Open => verdict.retry_after_ms = self.open_until_ms - now,
            Phase::HalfOpen if self.probes.len() < def.probes as usize => {
                self.last_token = self.last_token.saturating_add(1);
                self.probes.push(Probe {
                    token: self.last_token,
                    until_ms: now.saturating_add(def.probe_ttl_ms),
                });
                effect.changed = true;
                verdict.allowed = true;
                verdict.probe_token = self.last_token;
            }
            Phase::HalfOpen => {
                let lapse = self.probes.iter().map(|p| p.until_ms).min();
                verdict.retry_after_ms = lapse.map_or(1, |t| t - now);
            }
        }
        (verdict, effect)
    }

    /// Counts one call's outcome. `probe_token` is the permit the call was
    /// made under (0: none).
    pub fn report(
        &mut self,
        def: &BreakerDef,
        outcome: CallOutcome,
        probe_token: u64,
        now_ms: u64,
    ) -> (Reported, Effect) {
        let mut effect = Effect::default();
        let now = self.advance(def, now_ms, &mut effect);
        let failed = outcome != CallOutcome::Success;
        let counted = match self.phase {
            Phase::Closed => {
                self.calls[1] = self.calls[1].saturating_add(1);
                self.failures[1] = self.failures[1].saturating_add(u32::from(failed));
                effect.changed = true;
                if failed && self.tripped(def, now) {
                    self.trip(def, now, &mut effect);
                }
                true
            }
            Phase::HalfOpen if probe_token != 0 => {
                match self.probes.iter().position(|p| p.token == probe_token) {
                    Some(i) => {
                        self.probes.remove(i);
                        effect.changed = true;
                        if failed {
                            self.trip(def, now, &mut effect);
                        } else {
                            self.probe_successes += 1;
                            if self.probe_successes >= def.probes_to_close {
                                self.move_to(Phase::Closed, now, &mut effect);
                            }
                        }
                        true
                    }
                    None => false,
                }
            }
            Phase::HalfOpen | Phase::Open => false,
        };
        let reported = Reported {
            phase: self.phase,
            counted,
        };
        (reported, effect)
    }

    /// Its state as of `now` without changing it (for reads).
    pub fn at(&self, def: &BreakerDef, now_ms: u64) -> Breaker {
        let mut b = self.clone();
        b.advance(def, now_ms, &mut Effect::default());
        b
    }

    /// Its phase as of `now`, with no definition at hand (an open breaker
    /// whose time is up is half-open).
    pub fn phase_at(&self, now_ms: u64) -> Phase {
        match self.phase {
            Phase::Open if now_ms.max(self.seen_ms) >= self.open_until_ms => Phase::HalfOpen,
            phase => phase,
        }
    }

    /// When a closed breaker means the same as no breaker: once both its
    /// windows have rolled off. Open and half-open ones never do.
    pub fn idle_at(&self) -> Option<u64> {
        (self.phase == Phase::Closed).then(|| {
            let counted = self.calls.iter().any(|c| *c > 0);
            let w = self.window_ms.max(1);
            if counted {
                self.window_start_ms.saturating_add(2 * w)
            } else {
                self.seen_ms
            }
        })
    }
}
