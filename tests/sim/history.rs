//! What the clients of a simulated run saw, and the checks on it.
//!
//! Times are virtual ms since the cluster started; `sent` and `done`
//! bracket the moment the cluster decided. Every check flags only what is
//! certainly wrong whatever that moment was.

use std::collections::BTreeMap;

use arbiter::engine::{
    slot_of, BeginOutcome, Lease, LeaseEvent, LeaseEventKind, LimitResult, Permit,
};

use super::cluster::Answer;

#[derive(Clone, Debug)]
pub struct Event {
    /// Which client called, through which node (read in the trace).
    #[allow(dead_code)]
    pub client: usize,
    #[allow(dead_code)]
    pub node: u64,
    pub sent: u64,
    pub done: u64,
    pub what: What,
}

#[derive(Clone, Debug)]
pub enum What {
    /// An Acquire (or a Renew) by `holder`: Ok is the lease it now holds.
    Grant {
        name: String,
        holder: String,
        ttl: u64,
        renew: bool,
        answer: Answer<Lease>,
    },
    /// A lease read: the lease, and the leader's time when it was read.
    Read {
        name: String,
        answer: Answer<(Option<Lease>, u64)>,
    },
    Begin {
        key: String,
        answer: Answer<BeginOutcome>,
    },
    Complete {
        key: String,
        attempt: u64,
        answer: Answer<()>,
    },
    Check {
        key: String,
        answer: Answer<LimitResult>,
        /// Checked all or nothing with another key (often of another
        /// owner: reserved, then confirmed or released).
        together: bool,
    },
    /// A semaphore acquire by `holder` under `limit`: Ok is the permit it
    /// now holds (a new grant, or its own renewed).
    Sem {
        name: String,
        holder: String,
        limit: u64,
        permits: u64,
        ttl: u64,
        answer: Answer<Permit>,
    },
    /// A semaphore release of the permit granted under `token`.
    SemRelease {
        /// Read in the trace.
        #[allow(dead_code)]
        name: String,
        #[allow(dead_code)]
        holder: String,
        token: u64,
        answer: Answer<()>,
    },
    /// A watch stream on a lease, through one node from `sent` to `done`:
    /// the state it opened with and what it was told after, with when.
    Watch {
        name: String,
        opened: Option<Lease>,
        events: Vec<(u64, Told)>,
    },
}

/// What a watch stream tells after its opening state.
#[derive(Clone, Debug)]
pub enum Told {
    /// A change, as the node applied it.
    Event(LeaseEvent),
    /// The lease as it is now, sent again because the node's state was
    /// replaced (a snapshot installed) or the stream fell behind.
    Current(Option<Lease>),
}

impl What {
    /// Whether the call's outcome is known.
    pub fn definite(&self) -> bool {
        match self {
            What::Grant { answer, .. } => answer.definite(),
            What::Read { answer, .. } => answer.definite(),
            What::Begin { answer, .. } => answer.definite(),
            What::Complete { answer, .. } => answer.definite(),
            What::Check { answer, .. } => answer.definite(),
            What::Sem { answer, .. } => answer.definite(),
            What::SemRelease { answer, .. } => answer.definite(),
            What::Watch { .. } => false,
        }
    }
}

/// A node's term and role from the moment `at` (virtual ms), as its
/// server metrics reported them.
#[derive(Clone, Debug)]
pub struct Role {
    pub at: u64,
    pub node: u64,
    pub term: u64,
    pub leading: bool,
}

/// The checks answered allowed, with their keys.
fn allowed_checks(history: &[Event]) -> impl Iterator<Item = (&Event, &String)> {
    history.iter().filter_map(|e| match &e.what {
        What::Check {
            key,
            answer: Answer::Ok(r),
            ..
        } if r.allowed => Some((e, key)),
        _ => None,
    })
}

/// Node `node` applied slot map `version` at `at` (virtual ms): from then
/// on it routes and decides by it (version 0: no map, the leader decides
/// every key).
#[derive(Clone, Debug)]
pub struct SlotView {
    pub at: u64,
    pub node: u64,
    pub version: u64,
}

/// The slot map version `node` had applied at `at`, and when it next
/// applied another (`u64::MAX`: never).
fn map_of(views: &[SlotView], node: u64, at: u64) -> (u64, u64) {
    let mine = views.iter().filter(|v| v.node == node);
    let version = mine.clone().rfind(|v| v.at <= at).map_or(0, |v| v.version);
    let next = mine
        .filter(|v| v.at > at && v.version != version)
        .map(|v| v.at)
        .min()
        .unwrap_or(u64::MAX);
    (version, next)
}

/// Whether `node`, by slot map `version`, decides `key` itself: the map
/// gives it the key's slot (version 0: no map; a leader decides).
fn decides_itself(maps: &BTreeMap<u64, Vec<u64>>, version: u64, node: u64, key: &str) -> bool {
    version == 0 || maps.get(&version).and_then(|m| m.get(slot_of(key))) == Some(&node)
}

/// One decider per slot at a time: once another node has applied a map
/// that gives it a key's slot, the node that owned the slot by an earlier
/// map allows nothing more from its own memory. A check sent to it after
/// that, and answered allowed before it applied any newer map, can only
/// have been its own decision (by its map it owned the slot, and an owner
/// never forwards its own slot's keys).
pub fn check_one_owner(
    history: &[Event],
    views: &[SlotView],
    maps: &BTreeMap<u64, Vec<u64>>,
) -> Result<(), String> {
    for (e, key) in allowed_checks(history) {
        let (version, learned) = map_of(views, e.node, e.sent);
        if version == 0 || !decides_itself(maps, version, e.node, key) || e.done >= learned {
            continue;
        }
        let slot = slot_of(key);
        let taken = views
            .iter()
            .filter(|v| v.node != e.node && v.version > version && v.at < e.sent)
            .find(|v| maps.get(&v.version).and_then(|m| m.get(slot)) == Some(&v.node));
        if let Some(t) = taken {
            return Err(format!(
                "{key}: node {} allowed a check at {}-{} ms as the owner of slot {slot} by map \
                 {version}, though node {} had applied map {} giving it the slot at {} ms",
                e.node, e.sent, e.done, t.node, t.version, t.at
            ));
        }
    }
    Ok(())
}

/// How many allowed checks a node answered as the owner of the key's slot
/// by its map (what [`check_one_owner`] looks at).
pub fn owner_decided(
    history: &[Event],
    views: &[SlotView],
    maps: &BTreeMap<u64, Vec<u64>>,
) -> usize {
    allowed_checks(history)
        .filter(|(e, key)| {
            let (version, _) = map_of(views, e.node, e.sent);
            version > 0 && decides_itself(maps, version, e.node, key)
        })
        .count()
}

/// Each move of `key`'s slot from one owner to another: (0, when the new
/// owner applied the map that moved it), as [`forgettable`] takes a change
/// (the old owner may have decided at any time before).
pub fn slot_moves(
    views: &[SlotView],
    maps: &BTreeMap<u64, Vec<u64>>,
    key: &str,
) -> Vec<(u64, u64)> {
    let slot = slot_of(key);
    let owner = |version: u64| maps.get(&version).and_then(|m| m.get(slot)).copied();
    let mut moves = Vec::new();
    for (version, owners) in maps {
        let Some(new) = owners.get(slot) else {
            continue;
        };
        let before = maps
            .range(..version)
            .next_back()
            .and_then(|(v, _)| owner(*v));
        if before.is_some_and(|b| b != *new) {
            let applied = views
                .iter()
                .filter(|v| v.node == *new && v.version >= *version)
                .map(|v| v.at)
                .min();
            if let Some(at) = applied {
                moves.push((0, at));
            }
        }
    }
    moves
}

/// One rate-limit decider at a time: once a leader of a later term is
/// elected, a deposed leader allows nothing more from its own memory. A
/// check sent to it after that election, and answered allowed before it
/// even learned of the later term, can only have been its own decision
/// (knowing no other leader, it cannot have forwarded the call).
///
/// With slots spread, only the checks of keys the node's own slot map gave
/// it count here (it forwards the others to their owner).
pub fn check_one_decider(
    history: &[Event],
    roles: &[Role],
    slots: &[SlotView],
    maps: &BTreeMap<u64, Vec<u64>>,
) -> Result<(), String> {
    for (e, key) in allowed_checks(history) {
        let (version, _) = map_of(slots, e.node, e.sent);
        if !decides_itself(maps, version, e.node, key) {
            continue;
        }
        let Some(mine) = roles
            .iter()
            .rev()
            .find(|r| r.node == e.node && r.at <= e.sent)
        else {
            continue;
        };
        if !mine.leading {
            continue;
        }
        let elected = roles
            .iter()
            .filter(|r| r.leading && r.term > mine.term && r.at < e.sent)
            .map(|r| r.at)
            .min();
        let Some(elected) = elected else { continue };
        let learned = roles
            .iter()
            .filter(|r| r.node == e.node && r.term > mine.term)
            .map(|r| r.at)
            .min()
            .unwrap_or(u64::MAX);
        if e.done < learned {
            return Err(format!(
                "{key}: node {} allowed a check at {}-{} ms as the leader of term {}, though a leader of a later term was elected at {elected} ms",
                e.node, e.sent, e.done, mine.term
            ));
        }
    }
    Ok(())
}

/// The response a client stores for `key`'s `attempt`.
pub fn response(key: &str, attempt: u64) -> Vec<u8> {
    format!("{key}:{attempt}").into_bytes()
}

struct Granted<'a> {
    name: &'a str,
    lease: &'a Lease,
    ttl: u64,
    renew: bool,
    sent: u64,
    done: u64,
}

fn granted(history: &[Event]) -> Vec<Granted<'_>> {
    history
        .iter()
        .filter_map(|e| match &e.what {
            What::Grant {
                name,
                ttl,
                renew,
                answer: Answer::Ok(lease),
                ..
            } => Some(Granted {
                name,
                lease,
                ttl: *ttl,
                renew: *renew,
                sent: e.sent,
                done: e.done,
            }),
            _ => None,
        })
        .collect()
}

/// Never two holders, no early expiry: a holder granted a lease by a call
/// sent at `s` may rely on it until `s + ttl`, so a later holder's grant
/// (a higher token) must not have been answered before then. Fencing
/// tokens: one token, one grant, across every name; acquisitions in real
/// time order get non-decreasing tokens.
pub fn check_leases(history: &[Event]) -> Result<(), String> {
    let grants = granted(history);
    let mut owner: BTreeMap<u64, (&str, &str)> = BTreeMap::new();
    for g in &grants {
        let who = (g.name, g.lease.holder.as_str());
        if let Some(other) = owner.insert(g.lease.fencing_token, who) {
            if other != who {
                return Err(format!(
                    "token {} granted to {other:?} and to {who:?}",
                    g.lease.fencing_token
                ));
            }
        }
    }
    for a in &grants {
        for b in grants.iter().filter(|b| b.name == a.name) {
            if b.lease.holder != a.lease.holder
                && b.lease.fencing_token > a.lease.fencing_token
                && b.done < a.sent + a.ttl
            {
                return Err(format!(
                    "lease {}: {} was granted token {} at {} ms, while {} could rely on token {} until {} ms",
                    a.name,
                    b.lease.holder,
                    b.lease.fencing_token,
                    b.done,
                    a.lease.holder,
                    a.lease.fencing_token,
                    a.sent + a.ttl
                ));
            }
            if !b.renew && a.done < b.sent && b.lease.fencing_token < a.lease.fencing_token {
                return Err(format!(
                    "lease {}: token {} granted after token {}",
                    a.name, b.lease.fencing_token, a.lease.fencing_token
                ));
            }
        }
    }
    Ok(())
}

/// A semaphore grant as the history saw it.
struct SemGrant<'a> {
    name: &'a str,
    holder: &'a str,
    limit: u64,
    asked: u64,
    ttl: u64,
    sent: u64,
    done: u64,
    permit: &'a Permit,
}

/// Semaphores: a token is granted to one (name, holder) only; a new
/// grant decided after another was acknowledged has a greater token; and
/// no grant takes a name past the limit it was asked under. For the last,
/// a grant `b` counts every other holder's permit that was certainly held
/// when `b` was decided: granted before `b` was sent, certainly not lapsed
/// by the time `b` was answered (its latest grant's send time plus its
/// TTL; a new leader only ever extends), and with no release of it sent
/// before then (one of unknown outcome may have taken effect). Returns
/// how many grants were checked against others held at once.
pub fn check_semaphores(history: &[Event]) -> Result<usize, String> {
    let grants: Vec<SemGrant> = history
        .iter()
        .filter_map(|e| match &e.what {
            What::Sem {
                name,
                holder,
                limit,
                permits,
                ttl,
                answer: Answer::Ok(permit),
            } => Some(SemGrant {
                name,
                holder,
                limit: *limit,
                asked: *permits,
                ttl: *ttl,
                sent: e.sent,
                done: e.done,
                permit,
            }),
            _ => None,
        })
        .collect();
    let mut owner: BTreeMap<u64, (&str, &str)> = BTreeMap::new();
    for g in &grants {
        if g.permit.permits != g.asked {
            return Err(format!(
                "semaphore {}: {} asked for {} permit(s) and was granted {}",
                g.name, g.holder, g.asked, g.permit.permits
            ));
        }
        let who = (g.name, g.holder);
        if let Some(other) = owner.insert(g.permit.fencing_token, who) {
            if other != who {
                return Err(format!(
                    "semaphore token {} granted to {other:?} and to {who:?}",
                    g.permit.fencing_token
                ));
            }
        }
    }
    // The first grant of each token is the new one; later ones renew it.
    let mut first: BTreeMap<u64, &SemGrant> = BTreeMap::new();
    for g in &grants {
        let f = first.entry(g.permit.fencing_token).or_insert(g);
        if g.done < f.done {
            *f = g;
        }
    }
    // A holder's acquire of unknown outcome may have been the grant that a
    // later acknowledged acquire of its only renewed: such a grant is not
    // known to be new.
    let maybe_renewal = |b: &SemGrant| {
        history.iter().any(|e| {
            matches!(&e.what, What::Sem { name, holder, answer: Answer::Unknown(_), .. }
                if name == b.name && holder == b.holder && e.sent < b.sent)
        })
    };
    for a in first.values() {
        for b in first.values().filter(|b| !maybe_renewal(b)) {
            if a.done < b.sent && b.permit.fencing_token < a.permit.fencing_token {
                return Err(format!(
                    "semaphore token {} granted at {}-{} ms, after token {} was acknowledged at {} ms",
                    b.permit.fencing_token, b.sent, b.done, a.permit.fencing_token, a.done
                ));
            }
        }
    }
    let releases: Vec<(u64, u64)> = history
        .iter()
        .filter_map(|e| match &e.what {
            What::SemRelease { token, .. } => Some((*token, e.sent)),
            _ => None,
        })
        .collect();
    let mut crowded = 0;
    for b in &grants {
        let mut held = b.permit.permits;
        let mut others = 0;
        for (token, _) in first
            .iter()
            .filter(|(t, a)| **t != b.permit.fencing_token && a.name == b.name)
        {
            let before: Vec<&SemGrant> = grants
                .iter()
                .filter(|a| a.permit.fencing_token == *token && a.done < b.sent)
                .collect();
            let Some(until) = before.iter().map(|a| a.sent + a.ttl).max() else {
                continue;
            };
            let released = releases
                .iter()
                .any(|(t, sent)| t == token && *sent < b.done);
            if until > b.done && !released {
                // The fewest permits the token may have had when b was
                // decided: a holder's acquire renews with the count it asks.
                held += grants
                    .iter()
                    .filter(|a| a.permit.fencing_token == *token && a.sent < b.done)
                    .map(|a| a.permit.permits)
                    .min()
                    .unwrap_or(0);
                others += 1;
            }
        }
        if held > b.limit {
            return Err(format!(
                "semaphore {}: {} was granted {} permit(s) at {}-{} ms under a limit of {}, while others held {}",
                b.name,
                b.holder,
                b.permit.permits,
                b.sent,
                b.done,
                b.limit,
                held - b.permit.permits
            ));
        }
        crowded += usize::from(others > 0);
    }
    Ok(crowded)
}

/// Reads never see a lease's time run faster than real time, across any
/// failover: a read that found `r` ms left means the lease holds until at
/// least `r` ms after the read, so a later read must find at least what is
/// left of that, and must not find it gone (nobody releases). Only the
/// holder may change that, by renewing: a renewal sets the lease to its
/// TTL from then, which can undo the time a failover added, so pairs of
/// reads around a call of the holder's are not compared (nor, after a
/// call of the holder's whose outcome is unknown, any later pair: it may
/// take effect whenever). Returns how many pairs were compared.
pub fn check_reads(history: &[Event]) -> Result<usize, String> {
    // When each holder's calls on each name could have taken effect (an
    // unanswered call at any time after it was sent).
    let mut calls: BTreeMap<(&str, &str), Vec<(u64, u64)>> = BTreeMap::new();
    for e in history {
        if let What::Grant {
            name,
            holder,
            answer,
            ..
        } = &e.what
        {
            let until = match answer {
                Answer::Unknown(_) => u64::MAX,
                _ => e.done,
            };
            calls
                .entry((name, holder))
                .or_default()
                .push((e.sent, until));
        }
    }
    let untouched = |name: &str, holder: &str, from: u64, to: u64| {
        calls
            .get(&(name, holder))
            .is_none_or(|c| c.iter().all(|(sent, until)| *until < from || *sent > to))
    };
    let reads: Vec<(&Event, &str, Option<&Lease>, u64)> = history
        .iter()
        .filter_map(|e| match &e.what {
            What::Read {
                name,
                answer: Answer::Ok((lease, now)),
            } => Some((e, name.as_str(), lease.as_ref(), *now)),
            _ => None,
        })
        .collect();
    let mut compared = 0;
    for (first, name, lease, now) in &reads {
        let Some(lease) = lease else { continue };
        let left = lease.expires_at_ms.saturating_sub(*now);
        let holds_until = first.sent + left;
        for (later, _, seen, now2) in reads.iter().filter(|r| {
            r.1 == *name
                && r.0.sent >= first.done
                && r.0.done < holds_until
                && untouched(name, &lease.holder, first.sent, r.0.done)
        }) {
            compared += 1;
            match seen {
                Some(l) if l.fencing_token == lease.fencing_token => {
                    let left2 = l.expires_at_ms.saturating_sub(*now2);
                    if left2 + (later.done - first.sent) < left {
                        return Err(format!(
                            "lease {name} token {}: {left} ms left at {}-{} ms, then {left2} ms at {}-{} ms",
                            lease.fencing_token, first.sent, first.done, later.sent, later.done
                        ));
                    }
                }
                Some(l) if l.holder == lease.holder => {}
                other => {
                    return Err(format!(
                        "lease {name} token {} read at {}-{} ms with {left} ms left, but at {}-{} ms: {other:?}",
                        lease.fencing_token, first.sent, first.done, later.sent, later.done
                    ))
                }
            }
        }
    }
    Ok(compared)
}

/// Leases as watchers saw them, against the calls made: a watch stream
/// (one `What::Watch`) must tell only of grants that were made, in order,
/// with none left out, and must never report a lease expired before its
/// holder could stop relying on it (its call sent + TTL). Nobody releases
/// in the simulation, so a release is reported only if it happened.
/// Returns how many events were checked.
pub fn check_watches(history: &[Event]) -> Result<usize, String> {
    let grants = granted(history);
    let mut checked = 0;
    for e in history {
        let What::Watch {
            name,
            opened,
            events,
        } = &e.what
        else {
            continue;
        };
        let mut last = opened.as_ref().map_or(0, |l| l.fencing_token);
        // A change made as the stream opened may be both in the opening
        // state and its first event.
        let mut may_repeat = opened.is_some();
        for (at, told) in events {
            checked += 1;
            let ev = match told {
                Told::Event(ev) => ev,
                // The state again: what it shows must have been granted
                // by then, and must not go back; changes before it may
                // have been skipped.
                Told::Current(None) => continue,
                Told::Current(Some(l)) => {
                    let possible = grants.iter().any(|g| {
                        g.name == name && g.lease.fencing_token == l.fencing_token && g.sent <= *at
                    }) || history.iter().any(|c| {
                        matches!(&c.what, What::Grant { name: n, holder, answer: Answer::Unknown(_), .. }
                            if n == name && *holder == l.holder && c.sent <= *at)
                    });
                    if !possible || l.fencing_token < last {
                        return Err(format!(
                            "watch on {name}: sent the state again at {at} ms with token {} to {} (after token {last}), which no call sent by then granted",
                            l.fencing_token, l.holder
                        ));
                    }
                    last = l.fencing_token;
                    may_repeat = true;
                    continue;
                }
            };
            let l = &ev.lease;
            let repeat = std::mem::take(&mut may_repeat) && l.fencing_token == last;
            let here = |g: &&Granted| g.name == name && g.lease.fencing_token == l.fencing_token;
            // A definite grant of this token elsewhere, or to another holder.
            if let Some(g) = grants.iter().find(|g| {
                g.lease.fencing_token == l.fencing_token
                    && (g.name != name || g.lease.holder != l.holder)
            }) {
                return Err(format!(
                    "watch on {name}: {:?} of token {} to {} at {at} ms, but that token was granted to {} on {}",
                    ev.kind, l.fencing_token, l.holder, g.lease.holder, g.name
                ));
            }
            // A grant that could have made it: acknowledged with this
            // token, or of unknown outcome, by this holder, sent by then.
            let possible = grants.iter().filter(here).any(|g| g.sent <= *at)
                || history.iter().any(|c| {
                    matches!(&c.what, What::Grant { name: n, holder, answer: Answer::Unknown(_), .. }
                        if n == name && *holder == l.holder && c.sent <= *at)
                });
            if !possible {
                return Err(format!(
                    "watch on {name}: {:?} of token {} to {} at {at} ms, which no call sent by then could have granted",
                    ev.kind, l.fencing_token, l.holder
                ));
            }
            match ev.kind {
                LeaseEventKind::Acquired => {
                    if l.fencing_token <= last && !repeat {
                        return Err(format!(
                            "watch on {name}: token {} acquired at {at} ms after token {last}",
                            l.fencing_token
                        ));
                    }
                    // No acknowledged acquisition between the two left out:
                    // one after the last token the stream showed, or (when
                    // it has shown none) one sent after it opened, was
                    // applied after the stream opened and before this one.
                    if let Some(g) = grants.iter().find(|g| {
                        g.name == name
                            && !g.renew
                            && g.lease.fencing_token > last
                            && g.lease.fencing_token < l.fencing_token
                            && (last > 0 || g.sent >= e.sent)
                    }) {
                        return Err(format!(
                            "watch on {name}: went from token {last} to {} at {at} ms without token {} (granted to {} at {}-{} ms)",
                            l.fencing_token, g.lease.fencing_token, g.lease.holder, g.sent, g.done
                        ));
                    }
                    last = l.fencing_token;
                }
                LeaseEventKind::Renewed => {
                    if l.fencing_token < last {
                        return Err(format!(
                            "watch on {name}: token {} renewed at {at} ms after token {last}",
                            l.fencing_token
                        ));
                    }
                    last = l.fencing_token;
                }
                LeaseEventKind::Released => {
                    return Err(format!(
                        "watch on {name}: token {} released at {at} ms, though nobody releases",
                        l.fencing_token
                    ));
                }
                LeaseEventKind::Expired => {
                    if let Some(g) = grants.iter().filter(here).find(|g| *at < g.sent + g.ttl) {
                        return Err(format!(
                            "watch on {name}: token {} reported expired at {at} ms, though {} could rely on it until {} ms (call sent at {} ms)",
                            l.fencing_token,
                            g.lease.holder,
                            g.sent + g.ttl,
                            g.sent
                        ));
                    }
                }
            }
        }
    }
    Ok(checked)
}

/// One started attempt per key (locks outlast the run), and whatever
/// anyone sees of the key agrees with it.
pub fn check_records(history: &[Event]) -> Result<(), String> {
    let mut started: BTreeMap<&str, u64> = BTreeMap::new();
    for e in history {
        if let What::Begin {
            key,
            answer: Answer::Ok(BeginOutcome::Started { attempt }),
        } = &e.what
        {
            if let Some(first) = started.insert(key, *attempt) {
                return Err(format!(
                    "key {key}: attempts {first} and {attempt} both started"
                ));
            }
        }
    }
    for e in history {
        let What::Begin {
            key,
            answer: Answer::Ok(outcome),
        } = &e.what
        else {
            continue;
        };
        let seen = match outcome {
            BeginOutcome::InProgress { attempt, .. } => *attempt,
            BeginOutcome::Completed {
                attempt,
                response: r,
            } => {
                if *r != response(key, *attempt) {
                    return Err(format!("key {key}: attempt {attempt} completed with {r:?}"));
                }
                *attempt
            }
            _ => continue,
        };
        // The attempt seen may have started with an answer that was lost.
        if let Some(s) = started.get(key.as_str()) {
            if *s != seen {
                return Err(format!("key {key}: attempt {s} started, {seen} seen"));
            }
        }
    }
    Ok(())
}

/// The rate limits (buckets of `capacity` that do not refill in a run):
/// per key, never more allowed than `capacity` plus, for each change of
/// leader while the key was in use, what the old leader may have allowed
/// in its last [`FORGOTTEN_MS`] as leader; never a denial before
/// `capacity` could have been consumed.
/// The most a failover forgets: a leader cut off from the others goes on
/// deciding until its leader lease lapses (300 ms after the newest request
/// a majority acknowledged), and what it allowed since its last sync that
/// reached them (syncs go every 100 ms) is lost, plus a sync's time in
/// flight.
pub const FORGOTTEN_MS: u64 = 500;

/// How long after its call was answered a reservation of a check made
/// together with another key may still hold its tokens: a reserve that
/// reached its owner late (up to the coordinator's wait for it), held for
/// `arbiter::node::HOLD`, plus a margin for the members' clocks.
pub const HELD_MS: u64 = 1_000 + 1_000 + 100;

/// Each change of leader: (when the old leader was elected, when the new
/// one was), from the nodes' roles. A term in which nobody was elected is
/// no change.
pub fn leader_changes(roles: &[Role]) -> Vec<(u64, u64)> {
    let mut elected: BTreeMap<u64, u64> = BTreeMap::new();
    for r in roles.iter().filter(|r| r.leading) {
        let at = elected.entry(r.term).or_insert(r.at);
        *at = (*at).min(r.at);
    }
    let times: Vec<u64> = elected.into_values().collect();
    // A term's leader can be elected just after the next term's (its
    // votes were cast before the voters moved on); it can then decide
    // nothing, and its term counts as lasting no time.
    times.windows(2).map(|w| (w[0].min(w[1]), w[1])).collect()
}

/// With slots spread, each move of a key's slot counts as a change too
/// (`slot_moves`).
pub fn check_rate(
    history: &[Event],
    capacity: u64,
    roles: &[Role],
    slots: &[SlotView],
    maps: &BTreeMap<u64, Vec<u64>>,
) -> Result<(), String> {
    let mut keys: BTreeMap<&str, Vec<(&Event, &Answer<LimitResult>)>> = BTreeMap::new();
    for e in history {
        if let What::Check { key, answer, .. } = &e.what {
            keys.entry(key).or_default().push((e, answer));
        }
    }
    let changes = leader_changes(roles);
    for (key, checks) in &keys {
        // A valid check is never refused (nor answered with the wrong
        // number of results).
        if let Some((e, Answer::Refused(why))) =
            checks.iter().find(|(_, a)| matches!(a, Answer::Refused(_)))
        {
            return Err(format!(
                "{key}: a check sent at {} ms was refused: {why}",
                e.sent
            ));
        }
    }
    for (key, checks) in keys {
        let mut changes = changes.clone();
        changes.extend(slot_moves(slots, maps, key));
        if key.starts_with(REFILLING.prefix) {
            check_refilling(key, &checks, &REFILLING, &changes)?;
        } else {
            check_bucket(key, &checks, capacity, &changes)?;
        }
    }
    Ok(())
}

/// A bucket that refills within a run: keys starting with `prefix` hold
/// `capacity` tokens and gain one every `every_ms`.
pub struct Refilling {
    pub prefix: &'static str,
    pub capacity: u64,
    pub every_ms: u64,
}

/// The refilling bucket the simulated clients spend alongside the other.
pub const REFILLING: Refilling = Refilling {
    prefix: "flow-",
    capacity: 10,
    every_ms: 40,
};

/// How much faster than real time a decider's clock may run while it
/// catches up with the leader's timeline (1/64: see `Timekeeper`).
pub const CATCH_UP: u64 = 64;

/// A refilling bucket's bound over every window `[a, b]` that begins at
/// an allowed check's sending and ends at another's answer: the checks
/// allowed certainly inside it (sent at or after `a`, answered by `b`)
/// are at most the capacity, plus a token per `every_ms` of the window
/// and a millisecond (the decider reads its clock in whole ms; and its
/// clock may run up to 1/[`CATCH_UP`] fast), plus what each change of
/// decider near the window may have forgotten. A decider whose clock
/// jumps forward (say, set to each replicated time it applies, which
/// arrives late by a varying delay) refills by the jump and breaks it.
fn check_refilling(
    key: &str,
    checks: &[(&Event, &Answer<LimitResult>)],
    bucket: &Refilling,
    changes: &[(u64, u64)],
) -> Result<(), String> {
    let mut allowed: Vec<(u64, u64)> = checks
        .iter()
        .filter(|(_, a)| matches!(a, Answer::Ok(r) if r.allowed))
        .map(|(e, _)| (e.sent, e.done))
        .collect();
    allowed.sort_unstable();
    for &(a, _) in &allowed {
        for &(_, b) in allowed.iter().filter(|(_, done)| *done >= a) {
            let inside = allowed
                .iter()
                .filter(|(sent, done)| *sent >= a && *done <= b)
                .count() as u64;
            let span = b - a;
            let refill = (span + 1 + span / CATCH_UP) / bucket.every_ms;
            let forgotten: u64 = changes
                .iter()
                .filter(|(from, to)| *to + FORGOTTEN_MS >= a && *from <= b)
                .map(|c| forgettable(&allowed, *c))
                .sum();
            let bound = bucket.capacity + refill + forgotten;
            if inside > bound {
                return Err(format!(
                    "{key}: {inside} allowed within [{a}, {b}] ms, more than {} plus {refill} refilled plus {forgotten} forgotten",
                    bucket.capacity
                ));
            }
        }
    }
    Ok(())
}

/// What the old leader of a change `(from, to)` may have allowed of
/// `allowed` (each a check's sent and answered times) and the new one
/// forgotten: the most that may have been decided in any FORGOTTEN_MS
/// while it led (from `from` to `to`, after which it decides nothing: see
/// [`check_one_decider`]). Nothing when the key was not in use then.
fn forgettable(allowed: &[(u64, u64)], (from, to): (u64, u64)) -> u64 {
    let in_window = |end: u64| {
        let start = end.saturating_sub(FORGOTTEN_MS).max(from);
        allowed
            .iter()
            .filter(|(sent, done)| *sent <= end && *done >= start)
            .count() as u64
    };
    allowed
        .iter()
        .map(|(sent, _)| (sent + FORGOTTEN_MS).clamp(from, to))
        .chain([to])
        .map(in_window)
        .max()
        .unwrap_or(0)
}

fn check_bucket(
    key: &str,
    checks: &[(&Event, &Answer<LimitResult>)],
    capacity: u64,
    changes: &[(u64, u64)],
) -> Result<(), String> {
    let allowed: Vec<(u64, u64)> = checks
        .iter()
        .filter(|(_, a)| matches!(a, Answer::Ok(r) if r.allowed))
        .map(|(e, _)| (e.sent, e.done))
        .collect();
    let forgotten: Vec<u64> = changes
        .iter()
        .map(|c| forgettable(&allowed, *c))
        .filter(|n| *n > 0)
        .collect();
    let bound = capacity + forgotten.iter().sum::<u64>();
    if allowed.len() as u64 > bound {
        return Err(format!(
            "{key}: {} allowed, more than {capacity} plus what {} leader changes while it was in use may have forgotten ({forgotten:?})",
            allowed.len(),
            forgotten.len()
        ));
    }
    let together = |e: &Event| matches!(e.what, What::Check { together: true, .. });
    let denied = |a: &Answer<LimitResult>| matches!(a, Answer::Ok(r) if !r.allowed);
    // A check denied together with another key may have been denied for
    // the other key's sake: not an early denial of this one.
    let first_denial = checks
        .iter()
        .filter(|(e, a)| !together(e) && denied(a))
        .map(|(e, _)| e.done)
        .min();
    if let Some(denied_at) = first_denial {
        let could_have_consumed = checks
            .iter()
            // Sent by the denial's answer (to the ms): it may have been
            // decided before the denial. One denied together with another
            // key may have held its tokens at its owner until then, or
            // [`HELD_MS`] after its answer.
            .filter(|(e, a)| {
                e.sent <= denied_at && (!denied(a) || together(e) && denied_at <= e.done + HELD_MS)
            })
            .filter(|(_, a)| !matches!(a, Answer::Refused(_)))
            .count() as u64;
        if could_have_consumed < capacity {
            return Err(format!(
                "{key}: denied at {denied_at} ms after at most {could_have_consumed} of {capacity} were consumed"
            ));
        }
    }
    Ok(())
}

/// The checks reject hand-made histories that break each guarantee (and
/// accept their correct versions), so a run that passes means something.
#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, holder: &str, token: u64, expires: u64) -> Lease {
        Lease {
            name: name.into(),
            holder: holder.into(),
            fencing_token: token,
            ttl_ms: 1_000,
            expires_at_ms: expires,
            principal: String::new(),
        }
    }

    fn event(sent: u64, done: u64, what: What) -> Event {
        Event {
            client: 0,
            node: 1,
            sent,
            done,
            what,
        }
    }

    fn grant(sent: u64, done: u64, holder: &str, token: u64, renew: bool) -> Event {
        event(
            sent,
            done,
            What::Grant {
                name: "a".into(),
                holder: holder.into(),
                ttl: 1_000,
                renew,
                answer: Answer::Ok(lease("a", holder, token, 0)),
            },
        )
    }

    fn read(sent: u64, done: u64, found: Option<(&str, u64, u64)>, now: u64) -> Event {
        event(
            sent,
            done,
            What::Read {
                name: "a".into(),
                answer: Answer::Ok((found.map(|(h, t, e)| lease("a", h, t, e)), now)),
            },
        )
    }

    fn sem(sent: u64, done: u64, holder: &str, permits: u64, token: u64) -> Event {
        event(
            sent,
            done,
            What::Sem {
                name: "pool".into(),
                holder: holder.into(),
                limit: 2,
                permits,
                ttl: 1_000,
                answer: Answer::Ok(Permit {
                    name: "pool".into(),
                    holder: holder.into(),
                    permits,
                    fencing_token: token,
                    ttl_ms: 1_000,
                    expires_at_ms: done + 1_000,
                    principal: String::new(),
                }),
            },
        )
    }

    fn sem_release(sent: u64, done: u64, holder: &str, token: u64, answer: Answer<()>) -> Event {
        event(
            sent,
            done,
            What::SemRelease {
                name: "pool".into(),
                holder: holder.into(),
                token,
                answer,
            },
        )
    }

    /// The semaphore checker on made-up histories: a limit of 2 exceeded
    /// while both earlier permits were certainly held, a token given twice,
    /// and a token that went back, are each caught; the same histories made
    /// sound (a release sent first, a lapse, renewals) pass.
    #[test]
    fn a_semaphore_over_its_limit_or_with_tokens_out_of_order_is_caught() {
        let two = [sem(0, 5, "x", 1, 1), sem(10, 15, "y", 1, 2)];
        assert_eq!(check_semaphores(&two), Ok(1));
        let three = [
            sem(0, 5, "x", 1, 1),
            sem(10, 15, "y", 1, 2),
            sem(20, 25, "z", 1, 3),
        ];
        let err = check_semaphores(&three).unwrap_err();
        assert!(err.contains("under a limit of 2"), "{err}");
        let too_many = [sem(0, 5, "x", 2, 1), sem(10, 15, "y", 1, 2)];
        assert!(check_semaphores(&too_many).is_err());
        // x released first (even of unknown outcome): room for z.
        let released = [
            sem(0, 5, "x", 1, 1),
            sem(10, 15, "y", 1, 2),
            sem_release(16, 18, "x", 1, Answer::Unknown("timeout".into())),
            sem(20, 25, "z", 1, 3),
        ];
        assert!(check_semaphores(&released).is_ok());
        // x's permit may have lapsed (1,000 ms TTL from 0) by z's answer.
        let lapsed = [
            sem(0, 5, "x", 1, 1),
            sem(10, 15, "y", 1, 2),
            sem(995, 1_005, "z", 1, 3),
        ];
        assert!(check_semaphores(&lapsed).is_ok());
        // ...unless x renewed it at 900.
        let renewed = [
            sem(0, 5, "x", 1, 1),
            sem(10, 15, "y", 1, 2),
            sem(900, 905, "x", 1, 1),
            sem(995, 1_005, "z", 1, 3),
        ];
        assert!(check_semaphores(&renewed).is_err());
        let twice = [sem(0, 5, "x", 1, 1), sem(100, 105, "y", 1, 1)];
        let err = check_semaphores(&twice).unwrap_err();
        assert!(err.contains("granted to"), "{err}");
        let back = [sem(0, 5, "x", 1, 7), sem(2_000, 2_005, "y", 1, 3)];
        let err = check_semaphores(&back).unwrap_err();
        assert!(err.contains("after token 7"), "{err}");
        // y's first acquire went unanswered: its later answer may renew
        // the grant made then, token 3 and all.
        let mut unknown = sem(10, 4_000, "y", 1, 3);
        if let What::Sem { answer, .. } = &mut unknown.what {
            *answer = Answer::Unknown("timeout".into());
        }
        let renewal = [sem(0, 5, "x", 1, 7), unknown, sem(2_000, 2_005, "y", 1, 3)];
        assert!(check_semaphores(&renewal).is_ok());
    }

    #[test]
    fn a_second_holder_before_the_first_could_stop_relying_is_caught() {
        let ok = [
            grant(0, 5, "x", 1, false),
            grant(1_000, 1_005, "y", 2, false),
        ];
        assert_eq!(check_leases(&ok), Ok(()));
        // Granted to y at 900 ms, while x may rely on its lease until 1000.
        let bad = [grant(0, 5, "x", 1, false), grant(890, 900, "y", 2, false)];
        assert!(check_leases(&bad).is_err());
        // The same through x's renewal at 500 (x may rely until 1500).
        let bad = [
            grant(0, 5, "x", 1, false),
            grant(500, 505, "x", 1, true),
            grant(1_200, 1_205, "y", 2, false),
        ];
        assert!(check_leases(&bad).is_err());
    }

    #[test]
    fn a_token_granted_twice_or_going_back_is_caught() {
        let mut other_name = grant(2_000, 2_005, "y", 1, false);
        if let What::Grant { name, answer, .. } = &mut other_name.what {
            *name = "b".into();
            *answer = Answer::Ok(lease("b", "y", 1, 0));
        }
        assert!(check_leases(&[grant(0, 5, "x", 1, false), other_name]).is_err());
        let back = [
            grant(0, 5, "x", 5, false),
            grant(3_000, 3_005, "x", 4, false),
        ];
        assert!(check_leases(&back).is_err());
    }

    #[test]
    fn lease_time_running_faster_than_real_time_is_caught() {
        // 800 ms left at 0-10; 500 ms later at most 500 ms have passed.
        let ok = [
            read(0, 10, Some(("x", 1, 1_800)), 1_000),
            read(500, 510, Some(("x", 1, 1_800)), 1_500),
        ];
        assert_eq!(check_reads(&ok), Ok(1));
        let early = [
            read(0, 10, Some(("x", 1, 1_800)), 1_000),
            read(500, 510, Some(("x", 1, 1_800)), 1_700),
        ];
        assert!(check_reads(&early).is_err());
        let gone = [
            read(0, 10, Some(("x", 1, 1_800)), 1_000),
            read(500, 510, None, 1_500),
        ];
        assert!(check_reads(&gone).is_err());
        // A renewal by the holder between the reads may shorten it.
        let renewed = [
            read(0, 10, Some(("x", 1, 1_800)), 1_000),
            grant(100, 110, "x", 1, true),
            read(500, 510, Some(("x", 1, 1_800)), 1_700),
        ];
        assert_eq!(
            check_reads(&renewed),
            Ok(0),
            "the pair around the renewal is not compared"
        );
    }

    fn begin(key: &str, outcome: BeginOutcome) -> Event {
        event(
            0,
            1,
            What::Begin {
                key: key.into(),
                answer: Answer::Ok(outcome),
            },
        )
    }

    #[test]
    fn two_started_attempts_or_a_foreign_response_are_caught() {
        let ok = [
            begin("k", BeginOutcome::Started { attempt: 1 }),
            begin(
                "k",
                BeginOutcome::Completed {
                    attempt: 1,
                    response: response("k", 1),
                },
            ),
        ];
        assert_eq!(check_records(&ok), Ok(()));
        let twice = [
            begin("k", BeginOutcome::Started { attempt: 1 }),
            begin("k", BeginOutcome::Started { attempt: 2 }),
        ];
        assert!(check_records(&twice).is_err());
        let foreign = [begin(
            "k",
            BeginOutcome::Completed {
                attempt: 1,
                response: response("j", 1),
            },
        )];
        assert!(check_records(&foreign).is_err());
        let other = [
            begin("k", BeginOutcome::Started { attempt: 1 }),
            begin(
                "k",
                BeginOutcome::InProgress {
                    attempt: 2,
                    retry_after_ms: 5,
                },
            ),
        ];
        assert!(check_records(&other).is_err());
    }

    fn limit(at: u64, allowed: bool) -> Event {
        event(
            at,
            at + 1,
            What::Check {
                key: "k".into(),
                answer: Answer::Ok(LimitResult {
                    allowed,
                    ..LimitResult::default()
                }),
                together: false,
            },
        )
    }

    #[test]
    fn a_deposed_leader_allowing_a_check_is_caught() {
        let role = |at, node, term, leading| Role {
            at,
            node,
            term,
            leading,
        };
        // Node 1 leads term 1; node 2 is elected for term 2 at 500 ms; node
        // 1 learns of it at 900 ms.
        let roles = [
            role(0, 1, 1, true),
            role(0, 2, 1, false),
            role(500, 2, 2, true),
            role(900, 1, 2, false),
        ];
        let via_1 = |sent, done, allowed| {
            Event {
                node: 1,
                ..limit(sent, allowed)
            }
            .with_done(done)
        };
        assert_eq!(
            check_one_decider(&[via_1(400, 401, true)], &roles, &[], &BTreeMap::new()),
            Ok(())
        );
        assert_eq!(
            check_one_decider(&[via_1(600, 601, false)], &roles, &[], &BTreeMap::new()),
            Ok(())
        );
        // Answered once node 1 knew of term 2 (forwarded to node 2).
        assert_eq!(
            check_one_decider(&[via_1(600, 950, true)], &roles, &[], &BTreeMap::new()),
            Ok(())
        );
        assert!(
            check_one_decider(&[via_1(600, 601, true)], &roles, &[], &BTreeMap::new()).is_err()
        );
    }

    #[test]
    fn a_former_slot_owner_allowing_a_check_is_caught() {
        let slot = slot_of("k");
        let map = |owner: u64| {
            let mut owners = vec![9; arbiter::engine::SLOTS];
            owners[slot] = owner;
            owners
        };
        // Map 1 gives "k"'s slot to node 1, map 2 to node 2; node 2 applies
        // map 2 at 500 ms, node 1 at 900 ms.
        let maps = BTreeMap::from([(1, map(1)), (2, map(2))]);
        let view = |at, node, version| SlotView { at, node, version };
        let views = [
            view(0, 1, 1),
            view(0, 2, 1),
            view(500, 2, 2),
            view(900, 1, 2),
        ];
        let via = |node, sent, done| {
            Event {
                node,
                ..limit(sent, true)
            }
            .with_done(done)
        };
        assert_eq!(check_one_owner(&[via(1, 400, 401)], &views, &maps), Ok(()));
        // Answered once node 1 had map 2 (forwarded to node 2).
        assert_eq!(check_one_owner(&[via(1, 600, 950)], &views, &maps), Ok(()));
        // Node 2, the new owner, from when it applied map 2.
        assert_eq!(check_one_owner(&[via(2, 600, 601)], &views, &maps), Ok(()));
        assert!(check_one_owner(&[via(1, 600, 601)], &views, &maps).is_err());
        // A denial decides nothing.
        let denied = Event {
            node: 1,
            ..limit(600, false)
        };
        assert_eq!(check_one_owner(&[denied], &views, &maps), Ok(()));
        // The move counts as a change for the rate check, from when the new
        // owner applied it.
        assert_eq!(slot_moves(&views, &maps, "k"), [(0, 500)]);
        // With map 1 applied, the leader check leaves node 1's checks of its
        // own slot to the owner check, and looks at none of another's.
        let roles = [
            Role {
                at: 0,
                node: 1,
                term: 1,
                leading: true,
            },
            Role {
                at: 500,
                node: 3,
                term: 2,
                leading: true,
            },
        ];
        let other_map = BTreeMap::from([(1, map(2))]);
        let views = [view(0, 1, 1)];
        assert_eq!(
            check_one_decider(&[via(1, 600, 601)], &roles, &views, &other_map),
            Ok(())
        );
        assert!(check_one_decider(&[via(1, 600, 601)], &roles, &views, &maps).is_err());
    }

    impl Event {
        fn with_done(mut self, done: u64) -> Self {
            self.done = done;
            self
        }
    }

    #[test]
    fn over_allowance_beyond_the_bound_and_early_denial_are_caught() {
        let exact: Vec<Event> = (0..10).map(|i| limit(i * 100, i < 5)).collect();
        assert_eq!(check_rate(&exact, 5, &[], &[], &BTreeMap::new()), Ok(()));
        // Six allowed of five with no leader change.
        let over: Vec<Event> = (0..10).map(|i| limit(i * 100, i < 6)).collect();
        assert!(check_rate(&over, 5, &[], &[], &BTreeMap::new()).is_err());
        // Denied after four of five.
        let early: Vec<Event> = (0..10).map(|i| limit(i * 100, i < 4)).collect();
        assert!(check_rate(&early, 5, &[], &[], &BTreeMap::new()).is_err());
        // Denied together with another key: maybe for that key's sake.
        let mut partner = early.clone();
        for e in &mut partner[4..] {
            if let What::Check { together, .. } = &mut e.what {
                *together = true;
            }
        }
        assert_eq!(check_rate(&partner, 5, &[], &[], &BTreeMap::new()), Ok(()));
        // A denial while a check denied together may still hold a token,
        // and one after that.
        let mut held: Vec<Event> = (0..5).map(|i| limit(i * 100, i < 4)).collect();
        if let What::Check { together, .. } = &mut held[4].what {
            *together = true;
        }
        held.push(limit(400 + HELD_MS, false));
        assert_eq!(check_rate(&held, 5, &[], &[], &BTreeMap::new()), Ok(()));
        held[5] = limit(401 + HELD_MS, false);
        assert!(check_rate(&held, 5, &[], &[], &BTreeMap::new()).is_err());
    }

    fn flow(at: u64) -> Event {
        let mut e = limit(at, true);
        e.what = What::Check {
            key: format!("{}0", REFILLING.prefix),
            answer: Answer::Ok(LimitResult {
                allowed: true,
                ..LimitResult::default()
            }),
            together: false,
        };
        e
    }

    /// A refilling bucket: its capacity at once, then one a refill's time
    /// apart, passes; a clock that ran 200 ms ahead (five tokens at one
    /// a 40 ms) fails, and so does one more at the start.
    #[test]
    fn a_refilling_bucket_may_not_refill_faster_than_its_rate() {
        let every = REFILLING.every_ms;
        let burst = (0..REFILLING.capacity).map(flow);
        let steady = (1..=25).map(|i| flow(100 + i * every));
        let fair: Vec<Event> = burst.chain(steady).collect();
        assert_eq!(check_rate(&fair, 5, &[], &[], &BTreeMap::new()), Ok(()));
        let jumped: Vec<Event> = fair
            .iter()
            .cloned()
            .chain((0..5).map(|i| flow(100 + 25 * every + 1 + i)))
            .collect();
        assert!(check_rate(&jumped, 5, &[], &[], &BTreeMap::new()).is_err());
        let one_more: Vec<Event> = fair.iter().cloned().chain([flow(5)]).collect();
        assert!(check_rate(&one_more, 5, &[], &[], &BTreeMap::new()).is_err());
    }

    /// A change of leader allows again what the old leader allowed in its
    /// last 500 ms as leader, and not one check more; a change while the
    /// key was idle allows nothing.
    #[test]
    fn a_leader_change_allows_only_what_it_may_have_forgotten() {
        let role = |at, node, term| Role {
            at,
            node,
            term,
            leading: true,
        };
        // Node 1 leads from 0 ms, node 2 from 2000 ms.
        let roles = [role(0, 1, 1), role(2000, 2, 2)];
        assert_eq!(leader_changes(&roles), vec![(0, 2000)]);
        // A term's leader elected a moment after the next term's (seed 266
        // had node 2 win term 3 at 13192 ms, node 3 term 4 at 13191 ms).
        let late = [role(0, 1, 2), role(13192, 2, 3), role(13191, 3, 4)];
        assert_eq!(
            leader_changes(&late),
            vec![(0, 13192), (13191, 13191)],
            "the late term lasts no time"
        );
        // Five allowed at 1600-1640 ms (the old leader's last 500 ms), then
        // five again at 3000 ms: within the bound.
        let before: Vec<Event> = (0..5).map(|i| limit(1600 + i * 10, true)).collect();
        let after: Vec<Event> = (0..5).map(|i| limit(3000 + i * 10, true)).collect();
        let both = [before.clone(), after.clone()].concat();
        assert_eq!(check_rate(&both, 5, &roles, &[], &BTreeMap::new()), Ok(()));
        // One more: over by one.
        let one_more = [both.clone(), vec![limit(3100, true)]].concat();
        assert!(check_rate(&one_more, 5, &roles, &[], &BTreeMap::new()).is_err());
        // Without the change, the second five are over already.
        assert!(check_rate(&both, 5, &[], &[], &BTreeMap::new()).is_err());
        // Used only after the change: the change forgot nothing of it.
        let later: Vec<Event> = (0..6).map(|i| limit(3000 + i * 10, true)).collect();
        assert!(check_rate(&later, 5, &roles, &[], &BTreeMap::new()).is_err());
        // Spread over the old term, only the last 500 ms's worth counts:
        // one at 0, 600, 1200 and 1800 ms, then three at 3000 ms is 7 of
        // 5 + 1 (the 1800 one; a 500 ms window holds no two of them).
        let spread: Vec<Event> = [0, 600, 1200, 1800, 3000, 3010, 3020]
            .into_iter()
            .map(|t| limit(t, true))
            .collect();
        assert!(check_rate(&spread[..6], 5, &roles, &[], &BTreeMap::new()).is_ok());
        assert!(check_rate(&spread, 5, &roles, &[], &BTreeMap::new()).is_err());
    }

    fn watch(
        sent: u64,
        done: u64,
        opened: Option<u64>,
        events: &[(u64, LeaseEventKind, &str, u64)],
    ) -> Event {
        event(
            sent,
            done,
            What::Watch {
                name: "a".into(),
                opened: opened.map(|t| lease("a", "p", t, 0)),
                events: events
                    .iter()
                    .map(|&(at, kind, holder, token)| {
                        (
                            at,
                            Told::Event(LeaseEvent {
                                kind,
                                lease: lease("a", holder, token, 0),
                            }),
                        )
                    })
                    .collect(),
            },
        )
    }

    #[test]
    fn a_watch_that_tells_what_happened_passes() {
        use LeaseEventKind::*;
        let h = vec![
            grant(0, 10, "p", 1, false),
            grant(100, 110, "p", 1, true),
            grant(2_000, 2_010, "q", 2, false),
            watch(
                0,
                3_000,
                None,
                &[
                    (12, Acquired, "p", 1),
                    (111, Renewed, "p", 1),
                    (1_200, Expired, "p", 1),
                    (2_005, Acquired, "q", 2),
                ],
            ),
        ];
        assert_eq!(check_watches(&h), Ok(4));
    }

    #[test]
    fn a_watch_that_reports_an_early_expiry_fails() {
        use LeaseEventKind::*;
        // Renewed at 100 ms for 1 s: it may be relied on until 1,100 ms.
        let h = vec![
            grant(0, 10, "p", 1, false),
            grant(100, 110, "p", 1, true),
            watch(
                0,
                3_000,
                None,
                &[(12, Acquired, "p", 1), (1_050, Expired, "p", 1)],
            ),
        ];
        assert!(check_watches(&h)
            .unwrap_err()
            .contains("reported expired at 1050 ms"));
    }

    #[test]
    fn a_watch_that_leaves_out_a_grant_or_goes_back_fails() {
        use LeaseEventKind::*;
        let grants = vec![
            grant(0, 10, "p", 1, false),
            grant(2_000, 2_010, "q", 2, false),
            grant(4_000, 4_010, "p", 3, false),
        ];
        let mut h = grants.clone();
        h.push(watch(
            0,
            5_000,
            None,
            &[(12, Acquired, "p", 1), (4_005, Acquired, "p", 3)],
        ));
        assert!(check_watches(&h).unwrap_err().contains("without token 2"));
        let mut h = grants.clone();
        h.push(watch(
            0,
            5_000,
            Some(2),
            &[(4_005, Acquired, "p", 3), (4_006, Acquired, "q", 2)],
        ));
        assert!(check_watches(&h)
            .unwrap_err()
            .contains("token 2 acquired at 4006 ms after token 3"));
    }

    #[test]
    fn a_watch_that_tells_of_a_grant_never_made_fails() {
        use LeaseEventKind::*;
        let h = vec![
            grant(0, 10, "p", 1, false),
            grant(2_000, 2_010, "q", 2, false),
            // Token 2 to the wrong holder; token 9 that nobody was granted;
            // token 2 before its call was sent; a release nobody made.
            watch(0, 5_000, None, &[(2_005, Acquired, "p", 2)]),
        ];
        assert!(check_watches(&h)
            .unwrap_err()
            .contains("but that token was granted to q"));
        let h = vec![
            grant(0, 10, "p", 1, false),
            watch(0, 5_000, None, &[(20, Acquired, "q", 9)]),
        ];
        assert!(check_watches(&h)
            .unwrap_err()
            .contains("no call sent by then"));
        let h = vec![
            grant(2_000, 2_010, "q", 2, false),
            watch(0, 5_000, None, &[(1_000, Acquired, "q", 2)]),
        ];
        assert!(check_watches(&h)
            .unwrap_err()
            .contains("no call sent by then"));
        let h = vec![
            grant(0, 10, "p", 1, false),
            watch(0, 5_000, None, &[(20, Released, "p", 1)]),
        ];
        assert!(check_watches(&h).unwrap_err().contains("nobody releases"));
    }

    #[test]
    fn a_watch_sent_the_state_again_may_skip_but_not_invent_or_go_back() {
        use LeaseEventKind::*;
        let grants = vec![
            grant(0, 10, "p", 1, false),
            grant(2_000, 2_010, "q", 2, false),
            grant(4_000, 4_010, "p", 3, false),
        ];
        let again = |at: u64, holder: &str, token: u64| {
            let mut w = watch(0, 5_000, None, &[(12, Acquired, "p", 1)]);
            if let What::Watch { events, .. } = &mut w.what {
                events.push((at, Told::Current(Some(lease("a", holder, token, 0)))));
            }
            w
        };
        let mut h = grants.clone();
        h.push(again(4_020, "p", 3));
        assert_eq!(
            check_watches(&h),
            Ok(2),
            "skipping token 2 is allowed when the state is sent again"
        );
        let mut h = grants.clone();
        h.push(again(3_000, "p", 3));
        assert!(check_watches(&h)
            .unwrap_err()
            .contains("sent the state again at 3000 ms"));
        let mut h = grants.clone();
        h.push(watch(0, 5_000, Some(2), &[]));
        if let What::Watch { events, .. } = &mut h.last_mut().unwrap().what {
            events.push((4_500, Told::Current(Some(lease("a", "p", 1, 0)))));
        }
        assert!(check_watches(&h).unwrap_err().contains("(after token 2)"));
    }
}
