//! A linearizability checker for histories of one lease, and the test that
//! records such a history across a frozen (SIGSTOP) and resumed leader.
//!
//! The checker is Wing & Gong's search: repeatedly pick an operation that no
//! other remaining operation finished before, apply it to a sequential model
//! of the lease, and backtrack on a mismatch; visited (remaining, state)
//! pairs are memoised. Operations whose outcome the client never learned
//! (timeouts, UNAVAILABLE) may take effect at any point after they started,
//! or never.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use arbiter::proto::leases_client::LeasesClient;
use arbiter::proto::{AcquireRequest, ClusterStatusRequest, GetLeaseRequest, ReleaseRequest};

use crate::cluster::Cluster;
use crate::support::eventually;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    Acquire(u8),
    Release(u8, u64),
    Get,
}

/// What the client saw; `None` for an outcome it never learned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// acquired, current holder, its token
    Acquire(bool, u8, u64),
    Release(bool),
    Get(Option<(u8, u64)>),
}

#[derive(Clone, Debug)]
pub struct Op {
    pub start: u64,
    /// `u64::MAX` when the outcome is unknown.
    pub end: u64,
    pub call: Call,
    pub ret: Option<Ret>,
}

/// The sequential lease: holder and token (a token of 0 means "granted by
/// an operation whose reply was lost": any later observation binds it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Model {
    held: Option<(u8, u64)>,
    last_token: u64,
}

impl Model {
    /// Whether the held token `model` may be `seen`: the same, or, for a
    /// grant whose reply was lost, any token above every earlier one (a
    /// grant's token is always new).
    fn binds(&self, model: u64, seen: u64) -> bool {
        if model == 0 {
            seen > self.last_token
        } else {
            model == seen
        }
    }
}

/// Applies `call` to `m`; Some(next state) when `ret` is a legal reply.
fn step(m: &Model, call: &Call, ret: &Option<Ret>) -> Option<Model> {
    let mut n = m.clone();
    match (call, ret) {
        (Call::Acquire(h), r) => match (m.held, r) {
            (None, None) => n.held = Some((*h, 0)),
            (None, Some(Ret::Acquire(true, rh, t))) if rh == h && *t > m.last_token => {
                n.held = Some((*h, *t));
                n.last_token = *t;
            }
            (Some((mh, mt)), None) => {
                let _ = (mh, mt); // a renewal or a refusal: no change either way
            }
            (Some((mh, mt)), Some(Ret::Acquire(acq, rh, t))) => {
                if *acq != (mh == *h) || *rh != mh || !m.binds(mt, *t) {
                    return None;
                }
                n.held = Some((mh, *t));
                n.last_token = n.last_token.max(*t);
            }
            _ => return None,
        },
        (Call::Release(h, t), r) => {
            let owns = matches!(m.held, Some((mh, mt)) if mh == *h && m.binds(mt, *t));
            match r {
                None if owns => n.held = None,
                None => {}
                Some(Ret::Release(true)) if owns => n.held = None,
                Some(Ret::Release(false)) if !owns => {}
                _ => return None,
            }
        }
        (Call::Get, None) => {}
        (Call::Get, Some(Ret::Get(seen))) => match (m.held, seen) {
            (None, None) => {}
            (Some((mh, mt)), Some((sh, st))) if mh == *sh && m.binds(mt, *st) => {
                n.held = Some((mh, *st));
                n.last_token = n.last_token.max(*st);
            }
            _ => return None,
        },
        _ => return None,
    }
    Some(n)
}

/// Whether `ops` (at most 128) is linearizable for one lease starting free.
pub fn linearizable(ops: &[Op]) -> bool {
    assert!(ops.len() <= 128, "history too long for the checker");
    let all: u128 = if ops.len() == 128 {
        u128::MAX
    } else {
        (1u128 << ops.len()) - 1
    };
    let mut seen = HashSet::new();
    search(
        ops,
        all,
        Model {
            held: None,
            last_token: 0,
        },
        &mut seen,
    )
}

fn search(ops: &[Op], remaining: u128, m: Model, seen: &mut HashSet<(u128, Model)>) -> bool {
    // Done when only unknown-outcome operations remain (they may never
    // have happened).
    if (0..ops.len()).all(|i| remaining & (1 << i) == 0 || ops[i].ret.is_none()) {
        return true;
    }
    if !seen.insert((remaining, m.clone())) {
        return false;
    }
    let first_end = (0..ops.len())
        .filter(|i| remaining & (1 << i) != 0)
        .map(|i| ops[i].end)
        .min()
        .unwrap_or(u64::MAX);
    for i in 0..ops.len() {
        if remaining & (1 << i) == 0 || ops[i].start > first_end {
            continue;
        }
        if let Some(next) = step(&m, &ops[i].call, &ops[i].ret) {
            if search(ops, remaining & !(1 << i), next, seen) {
                return true;
            }
        }
    }
    false
}

/// A call whose outcome is unknown: only a node that could not be reached,
/// or a call this client gave up on (the 700 ms deadline below: tonic reports
/// it as CANCELLED "Timeout expired", or as the server's DEADLINE_EXCEEDED).
/// Any other error fails the test.
fn unknown(s: tonic::Status) {
    let gave_up = s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired";
    assert!(
        gave_up
            || matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ),
        "a call failed with {s:?}, which is neither a definite outcome nor an unknown one"
    );
}

/// Requests give up after 700 ms: a frozen node must not stall a client.
fn timeout<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
    r.set_timeout(Duration::from_millis(700));
    r
}

fn op(start: u64, end: u64, call: Call, ret: Option<Ret>) -> Op {
    Op {
        start,
        end,
        call,
        ret,
    }
}

#[test]
fn checker_accepts_a_good_history() {
    use Call::*;
    let h = [
        op(0, 10, Acquire(1), Some(Ret::Acquire(true, 1, 5))),
        op(5, 20, Acquire(2), Some(Ret::Acquire(false, 1, 5))),
        op(21, 30, Release(1, 5), Some(Ret::Release(true))),
        // Concurrent with the release: may see it held or free.
        op(22, 28, Get, Some(Ret::Get(None))),
        op(31, 40, Acquire(2), Some(Ret::Acquire(true, 2, 6))),
        // Lost reply: it may have happened.
        op(41, u64::MAX, Release(2, 6), None),
        op(50, 60, Acquire(3), Some(Ret::Acquire(true, 3, 7))),
    ];
    assert!(linearizable(&h));
}

#[test]
fn checker_rejects_two_holders_and_stale_reads() {
    use Call::*;
    // Two grants without a release in between.
    let two = [
        op(0, 10, Acquire(1), Some(Ret::Acquire(true, 1, 5))),
        op(20, 30, Acquire(2), Some(Ret::Acquire(true, 2, 6))),
    ];
    assert!(!linearizable(&two));
    // A read after the release completed still sees the old holder.
    let stale = [
        op(0, 10, Acquire(1), Some(Ret::Acquire(true, 1, 5))),
        op(11, 20, Release(1, 5), Some(Ret::Release(true))),
        op(21, 30, Get, Some(Ret::Get(Some((1, 5))))),
    ];
    assert!(!linearizable(&stale));
    // A token that goes backwards.
    let backwards = [
        op(0, 10, Acquire(1), Some(Ret::Acquire(true, 1, 5))),
        op(11, 20, Release(1, 5), Some(Ret::Release(true))),
        op(21, 30, Acquire(2), Some(Ret::Acquire(true, 2, 4))),
    ];
    assert!(!linearizable(&backwards));
    // A token that goes backwards behind a grant whose reply was lost: the
    // lost grant's token, seen later, is still a new one.
    let backwards_unseen = [
        op(0, 10, Acquire(1), Some(Ret::Acquire(true, 1, 5))),
        op(11, 20, Release(1, 5), Some(Ret::Release(true))),
        op(21, u64::MAX, Acquire(2), None),
        op(30, 40, Get, Some(Ret::Get(Some((2, 4))))),
    ];
    assert!(!linearizable(&backwards_unseen));
    // The same history seeing a new token is fine.
    let mut forwards = backwards_unseen.clone();
    forwards[3].ret = Some(Ret::Get(Some((2, 6))));
    assert!(linearizable(&forwards));
}

/// Three clients, one per node, contend for one lease while the leader is
/// frozen with SIGSTOP and later resumed; the recorded history must be
/// linearizable, with enough definite outcomes to mean something, and every
/// failed call must be one whose outcome is honestly unknown.
#[tokio::test]
async fn lease_history_across_a_frozen_leader_is_linearizable() {
    let cluster = Cluster::start(3, &[]);
    let leader = cluster.leader().await;
    let origin = Instant::now();
    let stop_at = origin + Duration::from_secs(6);
    let mut tasks = Vec::new();
    for (c, node) in (0..3).map(|i| (i as u8 + 1, i)) {
        let addr = cluster.node(node).addr;
        tasks.push(tokio::spawn(async move {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy();
            let mut client = LeasesClient::new(ch);
            let mut ops = Vec::new();
            let mut token = 0u64;
            let mut k = 0u32;
            // Paced, so the history spans the freeze, the new leader and the
            // resumed node (at most 40 operations per client).
            let mut pace = tokio::time::interval(Duration::from_millis(140));
            while Instant::now() < stop_at && ops.len() < 40 {
                pace.tick().await;
                k += 1;
                let call = match k % 3 {
                    0 => Call::Release(c, token),
                    1 => Call::Acquire(c),
                    _ => Call::Get,
                };
                let start = origin.elapsed().as_micros() as u64;
                let ret = match &call {
                    Call::Acquire(_) => client
                        .acquire(timeout(tonic::Request::new(AcquireRequest {
                            name: "lin".into(),
                            holder: format!("h{c}"),
                            ttl_ms: 600_000,
                        })))
                        .await
                        .map_err(unknown)
                        .ok()
                        .map(|r| {
                            let r = r.into_inner();
                            let l = r.lease.unwrap();
                            if r.acquired {
                                token = l.fencing_token;
                            }
                            Ret::Acquire(
                                r.acquired,
                                l.holder[1..].parse().unwrap(),
                                l.fencing_token,
                            )
                        }),
                    Call::Release(_, t) => match client
                        .release(timeout(tonic::Request::new(ReleaseRequest {
                            name: "lin".into(),
                            holder: format!("h{c}"),
                            fencing_token: *t,
                        })))
                        .await
                    {
                        Ok(_) => Some(Ret::Release(true)),
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                            Some(Ret::Release(false))
                        }
                        Err(s) => {
                            unknown(s);
                            None
                        }
                    },
                    Call::Get => client
                        .get(timeout(tonic::Request::new(GetLeaseRequest {
                            name: "lin".into(),
                        })))
                        .await
                        .map_err(unknown)
                        .ok()
                        .map(|r| {
                            Ret::Get(
                                r.into_inner()
                                    .lease
                                    .map(|l| (l.holder[1..].parse().unwrap(), l.fencing_token)),
                            )
                        }),
                };
                let end = if ret.is_some() {
                    origin.elapsed().as_micros() as u64
                } else {
                    u64::MAX
                };
                ops.push(Op {
                    start,
                    end,
                    call,
                    ret,
                });
            }
            ops
        }));
    }
    // Freeze the leader once the clients are going, until the others have
    // elected a new one and served some calls.
    let pid = cluster.node(leader).pid();
    eventually("some operations before the freeze", || async {
        (origin.elapsed() > Duration::from_millis(300)).then_some(())
    })
    .await;
    let frozen_at = origin.elapsed().as_micros() as u64;
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let other = (leader + 1) % 3;
    eventually("a new leader among the others", || async {
        let mut c =
            arbiter::proto::cluster_client::ClusterClient::new(cluster.node(other).channel().await);
        let st = c
            .status(ClusterStatusRequest::default())
            .await
            .ok()?
            .into_inner();
        (st.leader_id.is_some() && st.leader_id != Some(leader as u64 + 1)).then_some(())
    })
    .await;
    let new_leader_at = origin.elapsed().as_micros() as u64;
    eventually("the new leader serving for a while", || async {
        (origin.elapsed().as_micros() as u64 > new_leader_at + 1_500_000).then_some(())
    })
    .await;
    let resumed_at = origin.elapsed().as_micros() as u64;
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let mut history = Vec::new();
    let mut by_client = Vec::new();
    for t in tasks {
        let ops = t.await.unwrap();
        by_client.push(ops.clone());
        history.extend(ops);
    }
    // The freeze took effect: the frozen node's client got no answer to a
    // call made while it was frozen, and answers again after it resumed.
    let old = &by_client[leader];
    assert!(
        old.iter()
            .any(|o| o.start > frozen_at && o.start < resumed_at && o.ret.is_none()),
        "no call through the frozen node went unanswered: {old:?}"
    );
    assert!(
        old.iter().any(|o| o.start > resumed_at && o.ret.is_some()),
        "the resumed node answered nothing: {old:?}"
    );
    let definite = history.iter().filter(|o| o.ret.is_some()).count();
    assert!(
        definite >= 40,
        "only {definite} of {} operations had a definite outcome",
        history.len()
    );
    let completed_after = |t: u64| {
        history
            .iter()
            .filter(|o| o.ret.is_some() && o.start > t)
            .count()
    };
    assert!(
        completed_after(new_leader_at) > 5,
        "too few operations under the new leader"
    );
    assert!(
        completed_after(resumed_at) > 3,
        "too few operations after the old leader resumed"
    );
    assert!(
        linearizable(&history),
        "history is not linearizable: {history:#?}"
    );
}
