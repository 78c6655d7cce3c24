//! The deterministic simulated cluster: 3 or 5 real `Node`s (real Raft,
//! state machines and redb stores) in one process, over a network the test
//! controls (`net`), each with a wall clock of its own (`cluster::SimClock`),
//! all on tokio's paused clock. One seed decides everything: the nodes'
//! clock skews and boot ids (which time their elections), every network
//! delay, the faults and the clients' calls, so a failing seed replays
//! exactly (`SIM_SEED=n cargo test --test sim -- --nocapture`).
//!
//! Each seed runs a workload of lease, idempotency and rate-limit clients
//! through random nodes while faults come and go, sometimes two at once (a
//! node cut off both ways, one-way cuts into and out of the leader,
//! dropped connections, slow links, wall-clock steps of up to five minutes
//! and drifts of 5-50 %, a full disk, a node's power cut part-way through
//! a commit, `disk`), ends with the whole cluster losing
//! power under traffic, then heals everything, and checks the
//! time-dependent guarantees on what the clients saw (`history`): no lease
//! granted to a second holder before the first could stop relying on it,
//! across failovers and skewed clocks; no lease time lost on a failover;
//! one started attempt per key; one rate-limit decider at a time, the rate
//! limit's failover bound and no early denial; every acknowledged write
//! kept. `SIM_SEEDS` sets how many seeds run (default 100; `make
//! test-sim-replay` runs 200 more); `SIM_FIRST_SEED` where they start.

mod cluster;
mod disk;
mod failover;
mod history;
mod net;
mod rng;
mod spanning;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbiter::engine::RecordState;
use arbiter::engine::{
    Acquire, Begin, BeginOutcome, Complete, LimitCheck, LimitDef, LimitResult, Renew, SemAcquire,
    SemRelease,
};
use arbiter::node::GetRecord;
use arbiter::node::{AddMember, Change, GetLease, Rebalance, RemoveMember, SlotOwners};

use cluster::{Answer, Cluster};
use disk::Loss;
use history::{Event, What, REFILLING};
use rng::Rng;

/// Cluster time each seed runs its workload for, before the final heal.
const RUN_MS: u64 = 12_000;
/// The rate limit's capacity (it does not refill within a run).
const CAPACITY: u64 = 100;
/// Clients move to a fresh rate-limit key this often (by the time a call
/// is sent), so every part of a run has a bucket to spend: the clients
/// offer about 66 checks a second.
const KEY_EVERY_MS: u64 = 2_000;
const LEASE_NAMES: [&str; 2] = ["orders", "billing"];
/// Semaphores the semaphore clients share, each with a limit of
/// [`SEM_LIMIT`] permits.
const SEM_NAMES: [&str; 2] = ["pool-a", "pool-b"];
const SEM_LIMIT: u64 = 2;
const KEYS: u64 = 6;
/// Most rate-limit checks one client has unanswered at once.
const IN_FLIGHT: usize = 32;

type History = Arc<Mutex<Vec<Event>>>;

/// Records a call by `client` through `node`, sent at `sent` and answered
/// now.
fn note(h: &History, c: &Cluster, client: usize, node: u64, sent: u64, what: What) {
    let e = Event {
        client,
        node,
        sent,
        done: c.now(),
        what,
    };
    h.lock().unwrap_or_else(|e| e.into_inner()).push(e);
}

/// The fewest semaphore grants a seed must check, on average, against
/// other holders' permits certainly held at the time (seeds 1-20 checked
/// 266, 13 a seed, on 2026-12-07).
const MIN_CROWDED_GRANTS: usize = 5;

/// The fewest calls with a definite answer (done, or certainly not) a seed
/// must have (seeds 1-500 had at least 464 on 2026-12-06, with power
/// losses; 718 before them).
const MIN_DEFINITE: usize = 400;

/// The fewest pairs of lease reads the read check must compare, on
/// average over the seeds of a run of ten or more (a holder's call of
/// unknown outcome may take effect whenever, so a seed whose holders all
/// lost a call early compares none: 2 of seeds 1-500 did, on 2026-12-06,
/// when seeds 1-100 compared 2,141 pairs, 21 a seed).
const MIN_READ_PAIRS: usize = 10;

/// The fewest watch events the watch check must check, on average over
/// the seeds of a run of ten or more.
const MIN_WATCH_EVENTS: usize = 10;

/// The fewest allowed checks answered by their slot's owner that the
/// one-owner check must look at, on average over the seeds that spread the
/// slots (in a run of five such seeds or more).
const MIN_OWNER_CHECKS: usize = 50;

/// Everything one seed did and saw.
struct Run {
    history: Vec<Event>,
    faults: Vec<String>,
    /// The whole cluster's power loss after the workload.
    power_loss: String,
    leader_changes: u64,
    /// Every node's term and role over the run.
    roles: Vec<history::Role>,
    /// Every node's applied slot maps over the run.
    slots: cluster::SlotViews,
    final_token: Option<u64>,
    /// Each key's record as read after the run.
    final_records: Vec<(String, Answer<Option<arbiter::engine::Record>>)>,
}

impl Run {
    /// The run as text: two runs of one seed must give the same.
    fn trace(&self) -> String {
        format!(
            "{:#?}\n{}\n{:#?}\n{}",
            self.faults, self.power_loss, self.history, self.leader_changes
        )
    }

    fn check(&self) -> Result<(), String> {
        // A run whose calls mostly went unanswered, or whose faults were
        // never applied, proves little.
        let definite = self.history.iter().filter(|e| e.what.definite()).count();
        if definite < MIN_DEFINITE {
            return Err(format!(
                "only {definite} of {} calls had a definite answer (at least {MIN_DEFINITE})",
                self.history.len()
            ));
        }
        if self.faults.is_empty() {
            return Err("no fault was applied".into());
        }
        history::check_leases(&self.history)?;
        history::check_watches(&self.history)?;
        history::check_reads(&self.history)?;
        history::check_records(&self.history)?;
        history::check_semaphores(&self.history)?;
        let slots = &self.slots;
        if let Some(d) = &slots.disagreement {
            return Err(d.clone());
        }
        history::check_rate(
            &self.history,
            CAPACITY,
            &self.roles,
            &slots.applied,
            &slots.maps,
        )?;
        history::check_one_decider(&self.history, &self.roles, &slots.applied, &slots.maps)?;
        history::check_one_owner(&self.history, &slots.applied, &slots.maps)?;
        // Every acknowledged grant is still counted: a fresh lease after
        // the run gets a higher token than any acknowledged one.
        let acknowledged = self
            .history
            .iter()
            .filter_map(|e| match &e.what {
                What::Grant {
                    answer: Answer::Ok(l),
                    ..
                } => Some(l.fencing_token),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        match self.final_token {
            Some(t) if t > acknowledged => {}
            other => {
                return Err(format!(
                    "after the run a new lease got token {other:?}; {acknowledged} was acknowledged"
                ))
            }
        }
        // Every acknowledged Complete is kept.
        for e in &self.history {
            let What::Complete {
                key,
                attempt,
                answer: Answer::Ok(()),
            } = &e.what
            else {
                continue;
            };
            let kept = self.final_records.iter().find(|(k, _)| k == key);
            match kept {
                Some((_, Answer::Ok(Some(r))))
                    if r.attempt == *attempt
                        && r.state
                            == (RecordState::Completed {
                                response: history::response(key, *attempt),
                            }) => {}
                other => {
                    return Err(format!(
                        "key {key}: attempt {attempt} completed, but after the run: {other:?}"
                    ))
                }
            }
        }
        Ok(())
    }
}

fn pick(rng: &mut Rng, ids: &[u64]) -> u64 {
    ids[rng.below(ids.len() as u64) as usize]
}

async fn lease_client(c: Arc<Cluster>, me: usize, mut rng: Rng, h: History, until: u64) {
    let holder = format!("holder-{me}");
    // One TTL per name for this holder, so no call of its own ever
    // shortens a lease it holds (the read check relies on it).
    let ttls: Vec<u64> = LEASE_NAMES.iter().map(|_| rng.range(500, 2_000)).collect();
    // What this client believes it holds: name and token.
    let mut held: Vec<(usize, u64)> = Vec::new();
    while c.now() < until {
        tokio::time::sleep(Duration::from_millis(rng.range(20, 250))).await;
        let node = c.pick(&mut rng);
        let sent = c.now();
        let renewing = (!held.is_empty() && rng.chance(70))
            .then(|| held[rng.below(held.len() as u64) as usize]);
        let which = match renewing {
            Some((which, _)) => which,
            None => rng.below(LEASE_NAMES.len() as u64) as usize,
        };
        let (name, ttl) = (LEASE_NAMES[which].to_string(), ttls[which]);
        let (renew, answer) = match renewing {
            Some((_, token)) => {
                let op = Renew {
                    name: name.clone(),
                    holder: holder.clone(),
                    fencing_token: token,
                    ttl_ms: ttl,
                    principal: String::new(),
                };
                let answer = c.call(node, op).await.map(|s| s.value);
                (true, answer)
            }
            None => {
                let op = Acquire {
                    quota: Default::default(),
                    name: name.clone(),
                    holder: holder.clone(),
                    ttl_ms: ttl,
                    principal: String::new(),
                };
                let answer = match c.call(node, op).await {
                    Answer::Ok(s) if s.value.acquired => Answer::Ok(s.value.lease),
                    Answer::Ok(s) => Answer::Refused(format!("held by {}", s.value.lease.holder)),
                    Answer::Refused(e) => Answer::Refused(e),
                    Answer::Unknown(e) => Answer::Unknown(e),
                };
                (false, answer)
            }
        };
        held.retain(|(w, _)| *w != which);
        if let Answer::Ok(lease) = &answer {
            held.push((which, lease.fencing_token));
        }
        note(
            &h,
            &c,
            me,
            node,
            sent,
            What::Grant {
                name,
                holder: holder.clone(),
                ttl,
                renew,
                answer,
            },
        );
    }
}

/// Takes one or two permits of a semaphore, holds them for up to half
/// their TTL, and gives them back; three of these share two semaphores of
/// two permits, so grants are refused and crowd each other.
async fn sem_client(c: Arc<Cluster>, me: usize, mut rng: Rng, h: History, until: u64) {
    let holder = format!("sem-holder-{me}");
    while c.now() < until {
        tokio::time::sleep(Duration::from_millis(rng.range(10, 120))).await;
        let node = c.pick(&mut rng);
        let name = SEM_NAMES[rng.below(SEM_NAMES.len() as u64) as usize].to_string();
        let (permits, ttl) = (rng.range(1, 2), rng.range(300, 1_500));
        let sent = c.now();
        let op = SemAcquire {
            name: name.clone(),
            holder: holder.clone(),
            limit: SEM_LIMIT,
            permits,
            ttl_ms: ttl,
            principal: String::new(),
            quota: None,
        };
        let answer = match c.call(node, op).await {
            Answer::Ok(s) => match s.value.permit {
                Some(p) => Answer::Ok(p),
                None => Answer::Refused(format!("full: {} held", s.value.held)),
            },
            Answer::Refused(e) => Answer::Refused(e),
            Answer::Unknown(e) => Answer::Unknown(e),
        };
        let token = match &answer {
            Answer::Ok(p) => Some(p.fencing_token),
            _ => None,
        };
        note(
            &h,
            &c,
            me,
            node,
            sent,
            What::Sem {
                name: name.clone(),
                holder: holder.clone(),
                limit: SEM_LIMIT,
                permits,
                ttl,
                answer,
            },
        );
        let Some(token) = token else { continue };
        tokio::time::sleep(Duration::from_millis(rng.range(0, ttl / 2))).await;
        let node = c.pick(&mut rng);
        let sent = c.now();
        let op = SemRelease {
            name: name.clone(),
            holder: holder.clone(),
            fencing_token: token,
            principal: String::new(),
        };
        let answer = c.call(node, op).await.map(|_| ());
        note(
            &h,
            &c,
            me,
            node,
            sent,
            What::SemRelease {
                name,
                holder: holder.clone(),
                token,
                answer,
            },
        );
    }
}

async fn reader(c: Arc<Cluster>, me: usize, mut rng: Rng, h: History, until: u64) {
    while c.now() < until {
        tokio::time::sleep(Duration::from_millis(rng.range(20, 150))).await;
        let node = c.pick(&mut rng);
        let name = LEASE_NAMES[rng.below(LEASE_NAMES.len() as u64) as usize].to_string();
        let sent = c.now();
        let answer = c
            .call(node, GetLease { name: name.clone() })
            .await
            .map(|s| (s.value, s.now_ms));
        note(&h, &c, me, node, sent, What::Read { name, answer });
    }
}

/// Watches a lease through one node at a time, for 0.5-4 s each, and
/// records what each stream told (checked by `history::check_watches`).
async fn watcher(c: Arc<Cluster>, me: usize, mut rng: Rng, h: History, until: u64) {
    while c.now() < until {
        tokio::time::sleep(Duration::from_millis(rng.range(20, 200))).await;
        let node = c.pick(&mut rng);
        let name = LEASE_NAMES[rng.below(LEASE_NAMES.len() as u64) as usize].to_string();
        let sent = c.now();
        let end = (sent + rng.range(500, 4_000)).min(until);
        let Some((mut w, served_by, incarnation)) = c.watch(node, &name) else {
            continue;
        };
        let opened = w.lease.take();
        let mut events = Vec::new();
        while c.now() < end && c.still_up(node, incarnation) {
            let wait = Duration::from_millis((end - c.now()).min(100));
            match tokio::time::timeout(wait, w.events.recv()).await {
                Ok(Ok(Change::Event(e))) => events.push((c.now(), history::Told::Event(e))),
                // The node installed a snapshot: the state again, as the
                // server sends it.
                Ok(Ok(Change::Replaced)) => {
                    let now = served_by.lease_local(&name).0;
                    events.push((c.now(), history::Told::Current(now)));
                }
                // Never sent on a lease's channel.
                Ok(Ok(Change::Semaphore(_) | Change::Breaker(_))) => {}
                // A stream that fell behind is sent the current state
                // again (the server's job); here it just ends.
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
        note(
            &h,
            &c,
            me,
            node,
            sent,
            What::Watch {
                name,
                opened,
                events,
            },
        );
    }
}

async fn payer(c: Arc<Cluster>, me: usize, mut rng: Rng, h: History, until: u64) {
    while c.now() < until {
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400))).await;
        let node = c.pick(&mut rng);
        let key = format!("payment-{}", rng.below(KEYS));
        let sent = c.now();
        let op = Begin {
            quota: Default::default(),
            principal: String::new(),
            key: key.clone(),
            fingerprint: b"same".to_vec(),
            lock_ttl_ms: 60_000,
            retention_ms: 600_000,
        };
        let answer = c.call(node, op).await.map(|s| s.value);
        let started = match &answer {
            Answer::Ok(BeginOutcome::Started { attempt }) => Some(*attempt),
            _ => None,
        };
        note(
            &h,
            &c,
            me,
            node,
            sent,
            What::Begin {
                key: key.clone(),
                answer,
            },
        );
        let Some(attempt) = started else { continue };
        tokio::time::sleep(Duration::from_millis(rng.range(0, 300))).await;
        let node = c.pick(&mut rng);
        let sent = c.now();
        let op = Complete {
            byte_quota: None,
            principal: String::new(),
            key: key.clone(),
            attempt,
            response: history::response(&key, attempt),
        };
        let answer = c.call(node, op).await.map(|_| ());
        note(
            &h,
            &c,
            me,
            node,
            sent,
            What::Complete {
                key,
                attempt,
                answer,
            },
        );
    }
}

/// Open loop: a check every 10-80 ms whether or not earlier ones were
/// answered (at most [`IN_FLIGHT`] at once), so a fault that stalls some
/// calls does not stop the traffic a second decider would have to answer.
async fn limited(c: Arc<Cluster>, me: usize, mut rng: Rng, h: History, until: u64) {
    let mut calls = tokio::task::JoinSet::new();
    while c.now() < until {
        tokio::time::sleep(Duration::from_millis(rng.range(10, 80))).await;
        while calls.try_join_next().is_some() {}
        if calls.len() >= IN_FLIGHT {
            continue;
        }
        let node = c.pick(&mut rng);
        // A third of the calls all or nothing: with the slots spread, the
        // two keys mostly have different owners.
        let together = rng.chance(33);
        let (c, h) = (c.clone(), h.clone());
        calls.spawn(async move {
            let sent = c.now();
            // One key that does not refill in its time, and one that does
            // (so a decider's clock running fast shows).
            let checks = vec![
                LimitCheck {
                    key: format!("api-{}", sent / KEY_EVERY_MS),
                    limit: LimitDef::TokenBucket {
                        capacity: CAPACITY,
                        refill_tokens: 1,
                        refill_interval_ms: 3_600_000,
                    },
                    cost: 1,
                    dry_run: false,
                    max_delay_ms: 0,
                },
                LimitCheck {
                    key: format!("{}{}", REFILLING.prefix, sent / KEY_EVERY_MS),
                    limit: LimitDef::TokenBucket {
                        capacity: REFILLING.capacity,
                        refill_tokens: 1,
                        refill_interval_ms: REFILLING.every_ms,
                    },
                    cost: 1,
                    dry_run: false,
                    max_delay_ms: 0,
                },
            ];
            let keys: Vec<String> = checks.iter().map(|c| c.key.clone()).collect();
            let result = c
                .on(node, |n| async move { n.check(checks, together).await })
                .await;
            let answers: Vec<Answer<LimitResult>> = match result {
                Ok(Ok(r)) if r.len() == keys.len() => r.into_iter().map(Answer::Ok).collect(),
                Ok(Ok(r)) => {
                    let why = format!("{} results for {} checks", r.len(), keys.len());
                    keys.iter().map(|_| Answer::Refused(why.clone())).collect()
                }
                Ok(Err(arbiter::node::NodeError::Engine(e))) => keys
                    .iter()
                    .map(|_| Answer::Refused(e.to_string()))
                    .collect(),
                Ok(Err(e)) => keys
                    .iter()
                    .map(|_| Answer::Unknown(e.to_string()))
                    .collect(),
                Err(e) => keys.iter().map(|_| Answer::Unknown(e.clone())).collect(),
            };
            for (key, answer) in keys.into_iter().zip(answers) {
                let what = What::Check {
                    key,
                    answer,
                    together,
                };
                note(&h, &c, me, node, sent, what);
            }
        });
    }
    while calls.join_next().await.is_some() {}
}

/// What a fault leaves to undo when it ends (besides the network's heal).
enum Undo {
    Nothing,
    /// Cut the power now if the armed loss has not come yet, and start the
    /// node again.
    Restart(u64, Loss),
    /// Free the disk; start the node again if its Raft stopped.
    FreeDisk(u64),
    /// Stop the wall clock's drift (what it drifted stays).
    Drift(u64),
}

/// Starts a fault aimed at `victim`.
fn start_fault(c: &Cluster, rng: &mut Rng, victim: u64) -> (String, Undo) {
    let ids = c.ids();
    let fault = match rng.below(9) {
        0 => {
            c.net.isolate(victim, &ids);
            format!("isolate {victim}")
        }
        1 => {
            for &o in ids.iter().filter(|&&o| o != victim) {
                c.net.cut(victim, o);
            }
            format!("cut {victim} -> all")
        }
        2 => {
            for &o in ids.iter().filter(|&&o| o != victim) {
                c.net.cut(o, victim);
            }
            format!("cut all -> {victim}")
        }
        3 => {
            // Another node: a reset between a node and itself does nothing.
            let others: Vec<u64> = ids.iter().copied().filter(|&o| o != victim).collect();
            let other = pick(rng, &others);
            c.net.reset(victim, other);
            format!("reset {victim} <-> {other}")
        }
        4 => {
            let (lo, hi) = (rng.range(0, 20), rng.range(20, 120));
            c.net.set_delay(lo, hi);
            format!("delay {lo}-{hi} ms")
        }
        5 => {
            let step = rng.range(0, 600_000) as i64 - 300_000;
            c.nodes[&victim].clock.step(step);
            format!("step {victim}'s wall clock {step} ms")
        }
        6 => {
            let percent = rng.range(5, 50) as i64 * if rng.chance(50) { 1 } else { -1 };
            c.nodes[&victim].clock.drift(percent * 10_000);
            return (
                format!("{victim}'s wall clock runs {percent:+}% off"),
                Undo::Drift(victim),
            );
        }
        7 => {
            c.fill_disk(victim, true);
            return (
                format!(
                    "fill {victim}'s disk (then free it, and start the node again if it failed)"
                ),
                Undo::FreeDisk(victim),
            );
        }
        _ => {
            let loss = loss(rng);
            let at = rng.range(1, 40);
            c.crash_at_write(victim, at, loss, rng);
            return (
                format!(
                    "power off {victim} at its disk write {at} from now ({loss:?}), then start it"
                ),
                Undo::Restart(victim, loss),
            );
        }
    };
    (fault, Undo::Nothing)
}

/// Ends a fault started by [`start_fault`]; what became of it is added to
/// its `entry` in the log.
async fn end_fault(
    c: &Cluster,
    rng: &mut Rng,
    undo: Undo,
    entry: &mut String,
) -> Result<(), String> {
    match undo {
        Undo::Nothing => {}
        Undo::Drift(victim) => c.nodes[&victim].clock.drift(0),
        Undo::FreeDisk(victim) => {
            c.fill_disk(victim, false);
            if c.raft_failed(victim) {
                // The server exits on it; its supervisor starts it again.
                c.crash(victim, Loss::Clean, rng)?;
                c.restart(victim, rng).await?;
                entry.push_str(": its Raft stopped on a failed write");
            }
        }
        Undo::Restart(victim, loss) => {
            if !c.is_off(victim) {
                // It wrote too little in the time: the power goes now.
                c.crash(victim, loss, rng)?;
            }
            c.restart(victim, rng).await?;
        }
    }
    Ok(())
}

/// A member removed during the faults and added back after the next one
/// (with one voter fewer, a fault on any other node of three halts the
/// cluster, so a longer absence left seeds with too few definite answers).
struct MemberChange {
    /// Before which fault (counted from 0) it is removed.
    remove_at: usize,
    node: u64,
    rng: Rng,
}

/// An operator drains one member of its rate-limit slots before fault
/// `at` and restores it two faults later (`arbiter cluster rebalance`).
struct Drain {
    at: usize,
    node: u64,
    rng: Rng,
}

/// Asks a random member to drain or restore `node`, retrying until one
/// answers (a fault may be under way); the calls made.
async fn rebalance(c: &Cluster, rng: &mut Rng, node: u64, drain: bool) -> Result<usize, String> {
    let op = Rebalance {
        drain: if drain { vec![node] } else { vec![] },
        restore: if drain { vec![] } else { vec![node] },
    };
    let deadline = c.now() + MEMBERSHIP_WITHIN_MS;
    let mut calls = 0;
    while c.now() < deadline {
        calls += 1;
        let via = c.pick(rng);
        match c.call(via, op.clone()).await {
            Answer::Ok(_) => return Ok(calls),
            // Not a voter now (removed by the membership change): nothing
            // to drain or restore.
            Answer::Unknown(why) if why.contains("not a voter") => return Ok(calls),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Err(format!(
        "{} node {node} not done within {MEMBERSHIP_WITHIN_MS} ms",
        if drain { "draining" } else { "restoring" }
    ))
}

/// How long a membership change may take, faults and all.
const MEMBERSHIP_WITHIN_MS: u64 = 20_000;

/// Whether the leader's membership, once settled (no joint consensus),
/// has node `id` as a voter.
fn leader_has_voter(c: &Cluster, id: u64) -> Option<bool> {
    let leader = c.up_ids().into_iter().find_map(|n| c.node(n).leader())?;
    if !c.up_ids().contains(&leader) {
        return None;
    }
    let s = c.node(leader).standing();
    (!s.membership_changing).then(|| s.members.iter().any(|m| m.id == id && m.voter))
}

/// Asks the cluster, through any node, to remove node `id` (`add`: false)
/// or add it back, until the leader's settled membership shows it done,
/// for at most `MEMBERSHIP_WITHIN_MS`. Returns how many calls it took.
async fn change_member(c: &Cluster, rng: &mut Rng, id: u64, add: bool) -> Result<usize, String> {
    let deadline = c.now() + MEMBERSHIP_WITHIN_MS;
    let mut calls = 0;
    while c.now() < deadline {
        if leader_has_voter(c, id) == Some(add) {
            return Ok(calls);
        }
        calls += 1;
        let node = c.pick(rng);
        if add {
            let op = AddMember {
                id,
                peer_addr: cluster::peer_addr(id),
                force: false,
            };
            let _ = c.call(node, op).await;
        } else {
            let _ = c.call(node, RemoveMember { id }).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(50, 300))).await;
    }
    Err(format!(
        "node {id} not {} within {MEMBERSHIP_WITHIN_MS} ms ({calls} calls)",
        if add { "added back" } else { "removed" }
    ))
}

/// Faults, each healed before the next (a quarter of the time two at once,
/// on two nodes), then a power loss of the whole cluster under the last of
/// the traffic; the faults applied, and the power loss.
async fn nemesis(
    c: Arc<Cluster>,
    mut rng: Rng,
    until: u64,
    mut member: Option<MemberChange>,
    mut drain: Option<Drain>,
) -> Result<(Vec<String>, String), String> {
    let mut log = Vec::new();
    let ids = c.ids();
    let mut round = 0;
    while c.now() + POWER_LOSS_BEFORE_END_MS < until {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 1_500))).await;
        if let Some(m) = member.as_mut() {
            if round == m.remove_at || round == m.remove_at + 1 {
                let add = round > m.remove_at;
                let calls = change_member(&c, &mut m.rng, m.node, add).await?;
                log.push(format!(
                    "{} ms: node {} {} the membership ({calls} calls)",
                    c.now(),
                    m.node,
                    if add { "added back to" } else { "removed from" }
                ));
                if add {
                    member = None;
                }
            }
        }
        if let Some(d) = drain.as_mut() {
            if round == d.at || round == d.at + 2 {
                let draining = round == d.at;
                let calls = rebalance(&c, &mut d.rng, d.node, draining).await?;
                if std::env::var_os("SIM_DEBUG").is_some() {
                    eprintln!("{} ms: node {} drained: {draining}", c.now(), d.node);
                }
                log.push(format!(
                    "{} ms: node {} {} ({calls} calls)",
                    c.now(),
                    d.node,
                    if draining {
                        "drained of its slots"
                    } else {
                        "restored"
                    }
                ));
                if !draining {
                    drain = None;
                }
            }
        }
        round += 1;
        let leader = c
            .up_ids()
            .into_iter()
            .find_map(|id| c.node(id).leader())
            .unwrap_or(1);
        let victim = if rng.chance(50) {
            leader
        } else {
            pick(&mut rng, &ids)
        };
        let hold = Duration::from_millis(rng.range(200, 2_500));
        let mut faults = vec![start_fault(&c, &mut rng, victim)];
        if rng.chance(25) {
            let others: Vec<u64> = ids.iter().copied().filter(|&o| o != victim).collect();
            let second = pick(&mut rng, &others);
            faults.push(start_fault(&c, &mut rng, second));
        }
        let mut entry = format!(
            "{} ms: {} for {} ms",
            c.now(),
            faults
                .iter()
                .map(|(f, _)| f.as_str())
                .collect::<Vec<_>>()
                .join(", and "),
            hold.as_millis()
        );
        if std::env::var_os("SIM_DEBUG").is_some() {
            eprintln!("{entry}");
        }
        tokio::time::sleep(hold).await;
        for (_, undo) in faults {
            end_fault(&c, &mut rng, undo, &mut entry).await?;
        }
        log.push(entry);
        c.net.heal();
        c.net.set_delay(0, 2);
    }
    if let Some(mut m) = member {
        if round > m.remove_at {
            let calls = change_member(&c, &mut m.rng, m.node, true).await?;
            log.push(format!(
                "{} ms: node {} added back to the membership ({calls} calls)",
                c.now(),
                m.node
            ));
        }
    }
    let power = power_loss(&c, &mut rng).await?;
    Ok((log, power))
}

/// How long before the clients stop the whole cluster loses power.
const POWER_LOSS_BEFORE_END_MS: u64 = 3_000;

fn loss(rng: &mut Rng) -> Loss {
    if rng.chance(50) {
        Loss::Torn
    } else {
        Loss::Clean
    }
}

/// Cuts every node's power, each at one of its next disk writes (part-way
/// through a commit; a node that writes nothing for a second loses it
/// then), so the cluster goes down one node after another under traffic
/// and the last ones go with writes in flight; then, after an outage of
/// 1-3 s, starts them all again. What was acknowledged must all be there
/// after, and a lease granted just before must have kept its time.
async fn power_loss(c: &Cluster, rng: &mut Rng) -> Result<String, String> {
    let probe = probe_before_the_outage(c, rng).await;
    let loss = loss(rng);
    let ids = c.ids();
    for &id in &ids {
        let at = rng.range(1, 30);
        c.crash_at_write(id, at, loss, rng);
    }
    let deadline = c.now() + 1_000;
    while c.now() < deadline && !ids.iter().all(|&id| c.is_off(id)) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mid_write = ids.iter().filter(|&&id| c.is_off(id)).count();
    for &id in &ids {
        if !c.is_off(id) {
            c.crash(id, loss, rng)?;
        }
    }
    let off_at = c.now();
    let outage = rng.range(1_000, 3_000);
    tokio::time::sleep(Duration::from_millis(outage)).await;
    let on_at = c.now();
    for &id in &ids {
        c.restart(id, rng).await?;
    }
    let kept = match probe {
        Some(sent) => probe_after_the_outage(c, rng, sent, off_at, on_at).await?,
        None => "no probe lease".into(),
    };
    Ok(format!(
        "{off_at} ms: every node's power cut ({loss:?}; {mid_write} of {} part-way through a write), \
         all started {outage} ms later; {kept}",
        ids.len()
    ))
}

/// The lease acquired before the whole cluster's power loss.
const PROBE: &str = "across-the-outage";
/// Its TTL: longer than the outage and the restart.
const PROBE_TTL_MS: u64 = 10_000;
/// How much lease time the restarted cluster may lose beyond the time it
/// was up: what passed between the last time its leader stamped into the
/// log and the power going.
const PROBE_SLACK_MS: u64 = 500;

/// A lease for the outage probe, acquired now; when it was sent, if it was
/// granted.
async fn probe_before_the_outage(c: &Cluster, rng: &mut Rng) -> Option<u64> {
    let sent = c.now();
    let op = Acquire {
        quota: Default::default(),
        name: PROBE.into(),
        holder: "prober".into(),
        ttl_ms: PROBE_TTL_MS,
        principal: String::new(),
    };
    match settled(c, rng, op).await {
        Answer::Ok(s) if s.value.acquired => Some(sent),
        _ => None,
    }
}

/// The README: after a whole-cluster restart the timeline resumes where
/// the log left it, so a lease keeps its remaining time across the
/// outage. The probe, granted with `PROBE_TTL_MS` no earlier than `sent`,
/// may have lost only the time the cluster was up: until `off_at` (the
/// last node off), and from `on_at` (the first one starting again) until
/// the read, plus `PROBE_SLACK_MS`.
async fn probe_after_the_outage(
    c: &Cluster,
    rng: &mut Rng,
    sent: u64,
    off_at: u64,
    on_at: u64,
) -> Result<String, String> {
    if c.leader(Duration::from_secs(10)).await.is_none() {
        return Err("no leader within 10 s of the power coming back".into());
    }
    let answer = settled(c, rng, GetLease { name: PROBE.into() }).await;
    let done = c.now();
    let up = (off_at - sent) + (done - on_at);
    let lease = match answer {
        Answer::Ok(s) => s
            .value
            .map(|l| (l.expires_at_ms.saturating_sub(s.now_ms), l)),
        _ => return Ok("the probe lease was not read".into()),
    };
    let least = PROBE_TTL_MS.saturating_sub(up + PROBE_SLACK_MS);
    match lease {
        Some((left, l)) if l.holder == "prober" && left >= least => Ok(format!(
            "the probe lease had {left} ms left ({} ms up since its grant, {} ms down)",
            up,
            on_at - off_at
        )),
        other => Err(format!(
            "the lease {PROBE} granted for {PROBE_TTL_MS} ms at {sent} ms or later, with the \
             cluster up for {up} ms of it (power off at {off_at} ms, on at {on_at} ms, read by \
             {done} ms), must have at least {least} ms left; it has {other:?}"
        )),
    }
}

/// `op` through random nodes, again while its outcome is unknown (as a
/// client retries `UNAVAILABLE`), at most five times.
async fn settled<O: arbiter::node::Operation>(
    c: &Cluster,
    rng: &mut Rng,
    op: O,
) -> Answer<O::Output> {
    let mut answer = Answer::Unknown("not tried".into());
    for _ in 0..5 {
        answer = c.call(c.pick(rng), op.clone()).await;
        if !matches!(answer, Answer::Unknown(_)) {
            break;
        }
    }
    answer
}

/// Who decides rate limits in a seed: half the seeds spread the slots over
/// the members (a draw of its own, so the others' stay as they were);
/// `SIM_SLOTS=spread` or `leader` sets it for every seed.
fn slot_owners(seed: u64) -> SlotOwners {
    match std::env::var("SIM_SLOTS").as_deref() {
        Ok("spread") => SlotOwners::Spread,
        Ok("leader") => SlotOwners::Leader,
        _ if Rng::new(seed ^ 0x534c_4f54_5350_5244).chance(50) => SlotOwners::Spread,
        _ => SlotOwners::Leader,
    }
}

async fn run(seed: u64, owners: SlotOwners) -> Result<Run, String> {
    let mut rng = Rng::new(seed);
    let n = if seed % 4 == 3 { 5 } else { 3 };
    let c = Arc::new(Cluster::start_with(seed, n, &mut rng, owners).await);
    if c.leader(Duration::from_secs(10)).await.is_none() {
        return Err("no leader within 10 s of starting".into());
    }
    let first_term = c.term();
    let until = c.now() + RUN_MS;
    let h: History = Arc::default();
    // Three lease holders, a reader, two payers, three rate-limit clients.
    let mut clients = Vec::new();
    for me in 0..9 {
        let (c, rng, h) = (c.clone(), rng.fork(), h.clone());
        clients.push(match me {
            0..=2 => tokio::spawn(lease_client(c, me, rng, h, until)),
            3 => tokio::spawn(reader(c, me, rng, h, until)),
            4 | 5 => tokio::spawn(payer(c, me, rng, h, until)),
            _ => tokio::spawn(limited(c, me, rng, h, until)),
        });
    }
    // A watcher, with draws of its own (the others' stay as they were).
    clients.push(tokio::spawn(watcher(
        c.clone(),
        9,
        Rng::new(seed ^ 0x5741_5443_4845_5253),
        h.clone(),
        until,
    )));
    // Three semaphore clients, with draws of their own.
    for me in 10..13 {
        let rng = Rng::new(seed ^ 0x5345_4d41_5048_4f52 ^ me as u64);
        clients.push(tokio::spawn(sem_client(
            c.clone(),
            me,
            rng,
            h.clone(),
            until,
        )));
    }
    // Half the seeds remove a member during the faults and add it back after
    // the next one, with draws of their own (the others' stay as they were).
    let member = {
        let mut m = Rng::new(seed ^ 0x4d45_4d42_4552_5348);
        m.chance(50).then(|| MemberChange {
            remove_at: m.below(4) as usize,
            node: pick(&mut m, &c.ids()),
            rng: m.fork(),
        })
    };
    // With the slots spread, half the seeds drain a member for two faults,
    // with draws of their own.
    let drain = {
        let mut d = Rng::new(seed ^ 0x4452_4149_4e53_4c54);
        (owners == SlotOwners::Spread && d.chance(50)).then(|| Drain {
            at: d.below(4) as usize,
            node: pick(&mut d, &c.ids()),
            rng: d.fork(),
        })
    };
    let (faults, power_loss) = nemesis(c.clone(), rng.fork(), until, member, drain).await?;
    for client in clients {
        client
            .await
            .map_err(|e| format!("a client panicked: {e}"))?;
    }
    c.net.heal();
    if c.leader(Duration::from_secs(10)).await.is_none() {
        return Err("no leader within 10 s of healing".into());
    }
    let leader_changes = c.term() - first_term;
    let roles = c.roles();
    let slots = c.slot_views();
    let acquire = Acquire {
        quota: Default::default(),
        name: "after-the-run".into(),
        holder: "checker".into(),
        ttl_ms: 1_000,
        principal: String::new(),
    };
    let final_token = match settled(&c, &mut rng, acquire).await {
        Answer::Ok(s) => Some(s.value.lease.fencing_token),
        _ => None,
    };
    let mut final_records = Vec::new();
    for k in 0..KEYS {
        let key = format!("payment-{k}");
        let answer = settled(&c, &mut rng, GetRecord { key: key.clone() })
            .await
            .map(|s| s.value);
        final_records.push((key, answer));
    }
    let history = std::mem::take(&mut *h.lock().unwrap_or_else(|e| e.into_inner()));
    let c = Arc::try_unwrap(c).map_err(|_| "a client still holds the cluster".to_string())?;
    c.stop().await;
    Ok(Run {
        history,
        faults,
        power_loss,
        leader_changes,
        roles,
        slots,
        final_token,
        final_records,
    })
}

/// Log lines stamped with the virtual time (ms since the process's first
/// reading).
struct VirtualTime;

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
        let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
        write!(w, "{:>8} ms", origin.elapsed().as_millis())
    }
}

/// How long virtual time may stand still, in real time, before the run is
/// declared stuck: on a paused clock, time moves only when every task
/// waits, so a task that never waits (a busy loop) stops it for good.
const STALL: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs one seed of the workload.
fn simulate(seed: u64) -> Result<Run, String> {
    simulate_as(seed, slot_owners(seed))
}

/// [`simulate`] with the rate-limit deciders given.
fn simulate_as(seed: u64, owners: SlotOwners) -> Result<Run, String> {
    on_paused_runtime(seed, move || run(seed, owners))
}

/// Runs the future `make` builds on a fresh paused runtime seeded with
/// `seed`, on a thread of its own, and fails if virtual time stands still
/// for [`STALL`] of real time.
fn on_paused_runtime<T, F>(
    seed: u64,
    make: impl FnOnce() -> F + Send + 'static,
) -> Result<T, String>
where
    T: Send + 'static,
    F: Future<Output = Result<T, String>> + 'static,
{
    if std::env::var_os("SIM_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("SIM_LOG"))
            .with_timer(VirtualTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().start_paused(true);
    // Tokio draws random numbers of its own (which branch of a `select!`
    // it polls first, the order a watch channel wakes its waiters in); only
    // a build with `--cfg tokio_unstable` can seed them.
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let rt = builder.build().map_err(|e| format!("no runtime: {e}"))?;
    // Virtual ms (plus one) as last seen by a ticking task.
    let progress = Arc::new(AtomicU64::new(0));
    let (done, result) = std::sync::mpsc::channel();
    let ticks = progress.clone();
    std::thread::Builder::new()
        .name(format!("sim-{seed}"))
        .spawn(move || {
            let outcome = rt.block_on(async move {
                let origin = tokio::time::Instant::now();
                tokio::spawn(async move {
                    loop {
                        ticks.store(origin.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
                make().await
            });
            let _ = done.send(outcome);
        })
        .map_err(|e| format!("no thread: {e}"))?;
    let (mut seen, mut since) = (0, std::time::Instant::now());
    loop {
        match result.recv_timeout(std::time::Duration::from_secs(1)) {
            Ok(outcome) => return outcome,
            Err(RecvTimeoutError::Disconnected) => return Err("the run panicked".into()),
            Err(RecvTimeoutError::Timeout) => {
                let now = progress.load(Ordering::Relaxed);
                if now != seen {
                    (seen, since) = (now, std::time::Instant::now());
                } else if since.elapsed() > STALL {
                    // The runtime's thread is left spinning; the test fails.
                    return Err(format!(
                        "virtual time stood still at {} ms for {} s of real time: a task never waits",
                        now.saturating_sub(1),
                        STALL.as_secs()
                    ));
                }
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Seeds that fail for a known, not yet fixed cause (docs/RELIABILITY.md,
/// "Known failures"): left out of the default range, and run alone with
/// `SIM_SEED=S`, which still fails until the cause is fixed.
const KNOWN_FAILING: &[(u64, &str)] = &[];

/// The guarantees hold on every seed.
#[test]
fn time_dependent_guarantees_hold_on_every_seed() {
    let (first, count) = match env_u64("SIM_SEED") {
        Some(seed) => (seed, 1),
        None => (
            env_u64("SIM_FIRST_SEED").unwrap_or(1),
            env_u64("SIM_SEEDS").unwrap_or(100),
        ),
    };
    let mut failed = Vec::new();
    let (mut calls, mut faults, mut changes) = (0, 0, 0);
    let (mut fewest_definite, mut fewest_pairs, mut pairs) = (usize::MAX, usize::MAX, 0);
    let (mut probed, mut told, mut crowded) = (0, 0, 0);
    // Seeds with slots spread, their slot maps, and the checks their owners
    // answered.
    let (mut spread, mut maps, mut owned) = (0, 0, 0);
    for seed in first..first + count {
        if let Some((_, why)) = KNOWN_FAILING.iter().find(|(s, _)| *s == seed && count > 1) {
            eprintln!("seed {seed} left out, a known failure (SIM_SEED={seed} runs it): {why}");
            continue;
        }
        let outcome = simulate(seed).and_then(|run| {
            fewest_definite =
                fewest_definite.min(run.history.iter().filter(|e| e.what.definite()).count());
            probed += usize::from(run.power_loss.contains("the probe lease had"));
            let compared = history::check_reads(&run.history).unwrap_or(0);
            fewest_pairs = fewest_pairs.min(compared);
            pairs += compared;
            told += history::check_watches(&run.history).unwrap_or(0);
            crowded += history::check_semaphores(&run.history).unwrap_or(0);
            calls += run.history.len();
            faults += run.faults.len();
            changes += run.leader_changes;
            if slot_owners(seed) == SlotOwners::Spread {
                spread += 1;
                maps += run.slots.maps.keys().filter(|v| **v > 0).count();
                owned += history::owner_decided(&run.history, &run.slots.applied, &run.slots.maps);
            }
            if count == 1 {
                println!("{}", run.trace());
            }
            run.check()
                .map_err(|e| format!("{e}\nfaults: {:#?}", run.faults))
        });
        if let Err(e) = outcome {
            eprintln!("seed {seed} failed (replay: SIM_SEED={seed}): {e}");
            failed.push(seed);
        }
    }
    println!(
        "simulated {count} seeds: {calls} calls, {faults} faults, {changes} leader changes, \
         at least {fewest_definite} definite answers a seed, {pairs} pairs of lease reads \
         compared (at least {fewest_pairs} a seed), {told} watch events checked, {crowded} \
         semaphore grants checked against others held, a lease probed across the outage in \
         {probed}; {spread} seeds spread the slots ({maps} slot maps, \
         {owned} allowed checks answered by their slot's owner)"
    );
    assert!(
        spread < 5 || owned >= spread * MIN_OWNER_CHECKS,
        "{owned} checks answered by their slot's owner in {spread} seeds: the owner check saw \
         too little"
    );
    assert!(
        spread < 5 || maps > spread,
        "{maps} slot maps in {spread} seeds: no slot ever moved"
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
    assert!(
        calls > count as usize * 100,
        "too few calls ({calls}) to check anything"
    );
    assert!(
        count < 10 || pairs >= count as usize * MIN_READ_PAIRS,
        "{pairs} pairs of lease reads compared over {count} seeds: the read check saw too little"
    );
    assert!(
        count < 10 || crowded >= count as usize * MIN_CROWDED_GRANTS,
        "{crowded} semaphore grants checked against others held over {count} seeds: the \
         semaphore check saw too little"
    );
    assert!(
        count < 10 || told >= count as usize * MIN_WATCH_EVENTS,
        "{told} watch events checked over {count} seeds: the watch check saw too little"
    );
    assert!(
        count < 10 || probed * 2 >= count as usize,
        "the lease across the outage was probed in only {probed} of {count} seeds"
    );
    // One seed may well keep its leader; many seeds must not all do.
    assert!(
        count < 10 || changes > 0,
        "no seed changed leader: the faults did nothing"
    );
}

/// A seed is a replay: the same seed gives the same run, call for call.
/// Only where tokio's own random draws are seeded too (`make
/// test-sim-replay` builds with `--cfg tokio_unstable`).
#[test]
#[cfg_attr(
    not(tokio_unstable),
    ignore = "tokio seeds its randomness only with --cfg tokio_unstable: make test-sim-replay"
)]
fn a_seed_replays_exactly() {
    // Both ways of deciding rate limits: with the slots spread, a stream's
    // waiting batches were once told it closed in a HashMap's order, and
    // the seeds did not replay.
    for seed in [3, 10] {
        for owners in [SlotOwners::Leader, SlotOwners::Spread] {
            let a = simulate_as(seed, owners).expect("the seed runs").trace();
            let b = simulate_as(seed, owners).expect("the seed runs").trace();
            assert!(a == b, "seed {seed} ({owners:?}) ran differently twice");
        }
    }
}

/// Three simulated nodes from `seed`, once they have a leader: the
/// cluster, its leader and one follower.
async fn three_nodes(seed: u64) -> Result<(Cluster, u64, u64), String> {
    let mut rng = Rng::new(seed);
    let c = Cluster::start(seed, 3, &mut rng).await;
    let leader = c.leader(Duration::from_secs(10)).await.ok_or("no leader")?;
    let follower = c
        .ids()
        .into_iter()
        .find(|&i| i != leader)
        .ok_or("no follower")?;
    Ok((c, leader, follower))
}

/// A follower cut off from its leader while a lease it knows of lapses
/// must wait for the leader's sweep, not look again at once for ever: on
/// the paused clock such a busy loop stops time, and the run fails. (It
/// did: the sweeper woke for every deadline it had not yet seen swept, and
/// on a follower, which never sweeps, a lapsed one kept it turning.)
#[test]
fn a_follower_cut_off_past_a_lease_deadline_waits_for_the_sweep() {
    on_paused_runtime(11, || async {
        let (c, leader, follower) = three_nodes(11).await?;
        let op = Acquire {
            quota: Default::default(),
            name: "short".into(),
            holder: "a".into(),
            ttl_ms: 200,
            principal: String::new(),
        };
        match c.call(leader, op).await {
            Answer::Ok(s) if s.value.acquired => {}
            other => return Err(format!("acquire: {other:?}")),
        }
        let leases = |id| c.node(id).counts().leases;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while leases(follower) != 1 {
            if tokio::time::Instant::now() > deadline {
                return Err("the follower never applied the lease".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.net.isolate(follower, &c.ids());
        // The lease lapses on the follower's clock while it is cut off.
        tokio::time::sleep(Duration::from_secs(3)).await;
        if leases(follower) != 1 {
            return Err("a follower swept a lease itself".into());
        }
        c.net.heal();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while leases(follower) != 0 {
            if tokio::time::Instant::now() > deadline {
                return Err("the follower never applied the leader's sweep".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.stop().await;
        Ok(())
    })
    .expect("the follower waits");
}

/// A call to a node whose Raft has stopped (a fatal storage error, or the
/// node shutting down) is answered at once, though the node's last view
/// still names itself leader: it must not go round its wait for a leader
/// without waiting, which on the paused clock stops time and fails the
/// run. (It did: the loop waited on Raft's metrics, and a closed channel
/// wakes at once.)
#[test]
fn a_call_to_a_node_whose_raft_stopped_ends_at_once() {
    on_paused_runtime(12, || async {
        let mut rng = Rng::new(12);
        let c = Cluster::start(12, 3, &mut rng).await;
        let leader = c.leader(Duration::from_secs(10)).await.ok_or("no leader")?;
        let node = c.node(leader);
        node.raft().shutdown().await.map_err(|e| e.to_string())?;
        let answer = node
            .execute(GetLease {
                name: "orders".into(),
            })
            .await;
        match answer {
            Err(arbiter::node::NodeError::Unavailable(_)) => {}
            other => return Err(format!("after Raft stopped: {other:?}")),
        }
        c.stop().await;
        Ok(())
    })
    .expect("the call ends");
}

/// The README's bound on what a rate-limit failover forgets, measured on
/// the simulated cluster: a crashed leader's last sync interval (100 ms,
/// plus the sync in flight) and a cut-off leader's sync interval plus its
/// leader lease (300 ms), in ms of one key's traffic.
#[test]
fn a_rate_limit_failover_forgets_no_more_than_the_readme_says() {
    use failover::Failure;
    let seeds = env_u64("SIM_FAILOVERS").unwrap_or(10);
    for (failure, bound_ms) in [(Failure::Crash, 120), (Failure::CutOff, 420)] {
        let mut forgotten = Vec::new();
        for seed in 1..=seeds {
            let ms = on_paused_runtime(seed, move || failover::forgotten_ms(seed, failure))
                .unwrap_or_else(|e| panic!("{failure:?}, seed {seed}: {e}"));
            forgotten.push(ms);
        }
        forgotten.sort_unstable();
        println!("{failure:?}: forgot {forgotten:?} ms of traffic");
        let worst = forgotten[forgotten.len() - 1];
        assert!(
            worst <= bound_ms,
            "{failure:?}: a failover forgot {worst} ms of traffic (bound {bound_ms} ms): {forgotten:?}"
        );
        assert!(
            forgotten.iter().any(|&ms| ms > 0),
            "{failure:?}: no failover forgot anything: the measure measures nothing"
        );
    }
}

/// With the slots spread, a crashed owner's slots move: the first answer
/// for one of its keys comes within the 0.6 s of the crash (median
/// of the trials; each within 1 s), and the move forgets no more than a
/// crashed leader's failover (its last sync interval, plus the sync in
/// flight).
#[test]
fn a_crashed_slot_owners_keys_are_decided_again_within_the_bound() {
    let seeds = env_u64("SIM_FAILOVERS").unwrap_or(10);
    let mut moved = Vec::new();
    let mut forgotten = Vec::new();
    for seed in 1..=seeds {
        let (ms, lost) = on_paused_runtime(seed, move || failover::slot_move(seed))
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        moved.push(ms);
        forgotten.push(lost);
    }
    moved.sort_unstable();
    forgotten.sort_unstable();
    println!("slot moves: first answer {moved:?} ms after the crash; forgot {forgotten:?} ms");
    let median = moved[moved.len() / 2];
    assert!(
        median <= 600,
        "median {median} ms to decide a moved key: {moved:?}"
    );
    assert!(moved.iter().all(|&ms| ms <= 1_000), "{moved:?}");
    assert!(
        forgotten.iter().all(|&ms| ms <= 120),
        "a slot move forgot more than a sync interval: {forgotten:?}"
    );
}

/// An all-or-nothing call whose keys have two owners, sent through the
/// third member, with each fault between its reserve and its confirm: no
/// key is ever allowed more than its bucket, a call not admitted costs at
/// most the one token it reserved at an owner that confirmed, and a
/// reservation whose coordinator is gone gives back exactly what it held
/// once it lapses (and holds it until then).
#[test]
fn a_call_across_owners_is_never_over_admitted_whatever_fails_between_reserve_and_confirm() {
    use spanning::{Between, CAP};
    for between in [
        Between::Nothing,
        Between::Compete,
        Between::CutOwner,
        Between::CrashOwner,
        Between::CoordinatorGone,
    ] {
        for seed in 1..=env_u64("SIM_SPANNING").unwrap_or(3) {
            let o = on_paused_runtime(seed, move || spanning::run(seed, between))
                .unwrap_or_else(|e| panic!("{between:?}, seed {seed}: {e}"));
            println!("{between:?}, seed {seed}: {o:?}");
            let admitted = u64::from(o.answer == Ok(true));
            let competed = if o.competitor_allowed == Some(true) {
                CAP
            } else {
                0
            };
            assert!(
                admitted + competed + o.after[0] <= CAP && admitted + o.after[1] <= CAP,
                "{between:?}, seed {seed}: over-admitted: {o:?}"
            );
            let fine = match between {
                Between::Nothing => o.answer == Ok(true) && o.after == [CAP - 1; 2],
                // The holds kept the call payable: the competitor lost.
                Between::Compete => {
                    o.answer == Ok(true)
                        && o.competitor_allowed == Some(false)
                        && o.after == [CAP - 1; 2]
                }
                Between::CutOwner | Between::CrashOwner => {
                    o.answer.is_err() && o.after.iter().all(|n| *n >= CAP - 1)
                }
                Between::CoordinatorGone => {
                    o.competitor_allowed == Some(false) && o.after == [CAP; 2]
                }
            };
            assert!(fine, "{between:?}, seed {seed}: {o:?}");
        }
    }
}

/// A watcher on a node cut off while the leader compacted its log past
/// it: the node catches up by installing a snapshot, which replays no
/// events one by one, so its watchers are sent the lease's state again
/// (`Change::Replaced`) and learn of the new holder. (Before, they heard
/// nothing and went on believing the first holder held the lease.)
#[test]
fn a_watcher_on_a_node_that_installs_a_snapshot_is_told_the_state_again() {
    on_paused_runtime(13, || async {
        let (c, leader, follower) = three_nodes(13).await?;
        let acquire = |name: &str, holder: &str| Acquire {
            quota: Default::default(),
            name: name.into(),
            holder: holder.into(),
            ttl_ms: 600_000,
            principal: String::new(),
        };
        let first = match c.call(leader, acquire("watched", "a")).await {
            Answer::Ok(s) if s.value.acquired => s.value.lease,
            other => return Err(format!("acquire: {other:?}")),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while c.node(follower).counts().leases != 1 {
            if tokio::time::Instant::now() > deadline {
                return Err("the follower never applied the lease".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (mut w, node, _) = c.watch(follower, "watched").ok_or("no watch")?;
        c.net.isolate(follower, &c.ids());
        let release = arbiter::engine::Release {
            name: "watched".into(),
            holder: "a".into(),
            fencing_token: first.fencing_token,
            principal: String::new(),
        };
        if !matches!(c.call(leader, release).await, Answer::Ok(_)) {
            return Err("the release failed".into());
        }
        let second = match c.call(leader, acquire("watched", "b")).await {
            Answer::Ok(s) if s.value.acquired => s.value.lease,
            other => return Err(format!("acquire by b: {other:?}")),
        };
        // Past two snapshots (--snapshot-logs is 500 in the simulation, and
        // as many entries are kept behind each), so the log it missed is gone.
        for i in 0..1_200 {
            if !matches!(
                c.call(leader, acquire(&format!("filler-{i}"), "h")).await,
                Answer::Ok(_)
            ) {
                return Err(format!("filler {i} failed"));
            }
        }
        // A cut holds what was sent (as a connection's buffers would):
        // break the connections, so what the leader sent is lost.
        for other in c.ids().into_iter().filter(|&o| o != follower) {
            c.net.reset(follower, other);
        }
        c.net.heal();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut told = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let holder = match tokio::time::timeout(left, w.events.recv()).await {
                Ok(Ok(Change::Event(e))) => Some((e.kind, e.lease.holder, e.lease.fencing_token)),
                Ok(Ok(Change::Replaced)) => node.lease_local("watched").0.map(|l| {
                    (
                        arbiter::engine::LeaseEventKind::Acquired,
                        l.holder,
                        l.fencing_token,
                    )
                }),
                other => {
                    return Err(format!(
                    "the watcher was never told that b holds the lease ({other:?} after {told:?})"
                ))
                }
            };
            told.push(holder.clone());
            if holder.is_some_and(|(_, h, t)| h == "b" && t == second.fencing_token) {
                break;
            }
        }
        c.stop().await;
        Ok(())
    })
    .expect("the watcher is told");
}

/// An owner that does not lead refills a bucket no faster than real time
/// (and 1/64) while the network's delay rises and falls: seen failing with
/// owners that decided by the replicated log's time, which arrives late by
/// the delay and jumped forward when the delay fell (the nemesis suite's
/// over-admissions in spread mode).
#[test]
fn an_owner_that_does_not_lead_refills_no_faster_than_real_time() {
    for seed in 1..=env_u64("SIM_FAILOVERS").unwrap_or(5) {
        let ((allowed, bound), (total, refilled)) =
            on_paused_runtime(seed, move || failover::owner_clock(seed))
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        println!("seed {seed}: worst window {allowed} allowed, bound {bound}; {total} of {refilled} in all");
        assert!(
            allowed <= bound,
            "seed {seed}: {allowed} allowed, bound {bound}"
        );
        assert!(
            total * 10 >= refilled * 6,
            "seed {seed}: only {total} of {refilled} allowed"
        );
    }
}
