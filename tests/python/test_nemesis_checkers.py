"""The nemesis checkers (cluster/nemesis_check.py) accept good histories and
reject hand-made bad ones, so a passing nemesis run means something."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "cluster"))
import nemesis_check as nc  # noqa: E402


def op(p, f, key, t0, t1, status="ok", code=None, out=None, **args):
    return {"p": p, "f": f, "key": key, "args": args, "t0": t0, "t1": None if status == "unknown" else t1,
            "status": status, "code": code, "out": out}


def acq(p, t0, t1, acquired, holder, token, key="L", status="ok"):
    return op(p, "acquire", key, t0, t1, status, out={"acquired": acquired, "holder": holder, "token": token}, holder=p)


def rel(p, t0, t1, token, key="L", status="ok"):
    return op(p, "release", key, t0, t1, status, code="FAILED_PRECONDITION" if status == "fail" else None, holder=p, token=token)


def get(p, t0, t1, holder, token, key="L"):
    return op(p, "get_lease", key, t0, t1, out={"holder": holder, "token": token})


def lin(history):
    violations, inconclusive = nc.check_linearizable(history)
    assert not inconclusive
    return violations


# ------------------------------------------------------------------ leases


def test_a_sequential_lease_history_is_linearizable():
    h = [acq("a", 0, 1, True, "a", 5), acq("b", 2, 3, False, "a", 5), rel("a", 4, 5, 5),
         acq("b", 6, 7, True, "b", 9), get("c", 8, 9, "b", 9)]
    assert lin(h) == []
    assert nc.check_fencing(h) == [] and nc.check_one_holder(h) == []


def test_concurrent_grants_in_either_order_are_linearizable():
    # b's acquire overlaps a's release: b may have come after it.
    h = [acq("a", 0, 1, True, "a", 5), rel("a", 2, 6, 5), acq("b", 3, 4, True, "b", 7)]
    assert lin(h) == []
    assert nc.check_one_holder(h) == []


def test_two_holders_at_once_are_rejected():
    h = [acq("a", 0, 1, True, "a", 5), acq("b", 2, 3, True, "b", 7)]
    assert lin(h), "two grants without a release passed linearizability"
    assert nc.check_one_holder(h), "two holders passed the holder check"


def test_a_read_of_a_released_lease_is_rejected():
    h = [acq("a", 0, 1, True, "a", 5), rel("a", 2, 3, 5), get("c", 4, 5, "a", 5)]
    assert lin(h)


def test_a_stale_read_after_a_regrant_is_rejected():
    h = [acq("a", 0, 1, True, "a", 5), rel("a", 2, 3, 5), acq("b", 4, 5, True, "b", 8), get("c", 6, 7, None, None)]
    assert lin(h)


def test_an_unknown_acquire_may_take_effect_later_or_never():
    # a's acquire timed out; c later sees a holding a token it never saw.
    took = [acq("a", 0, None, None, None, None, status="unknown"), get("c", 5, 6, "a", 3)]
    assert lin(took) == []
    never = [acq("a", 0, None, None, None, None, status="unknown"), get("c", 5, 6, None, None)]
    assert lin(never) == []
    # But not before it was sent.
    early = [get("c", 0, 1, "a", 3), acq("a", 2, None, None, None, None, status="unknown")]
    assert lin(early)


def test_an_unknown_release_may_or_may_not_have_freed_the_lease():
    base = [acq("a", 0, 1, True, "a", 5), rel("a", 2, None, 5, status="unknown")]
    assert lin(base + [get("c", 4, 5, None, None)]) == []
    assert lin(base + [get("c", 4, 5, "a", 5)]) == []
    # Freed then held again by a is impossible without a new acquire.
    assert lin(base + [get("c", 4, 5, None, None), get("c", 6, 7, "a", 5)])


def test_a_token_going_backwards_is_rejected():
    h = [acq("a", 0, 1, True, "a", 9), rel("a", 2, 3, 9), acq("b", 4, 5, True, "b", 7)]
    assert lin(h)
    assert nc.check_fencing(h)


def test_one_token_for_two_names_is_rejected():
    h = [acq("a", 0, 1, True, "a", 5, key="L1"), acq("b", 2, 3, True, "b", 5, key="L2")]
    assert nc.check_fencing(h)


def test_a_renewal_refused_while_held_is_rejected():
    h = [acq("a", 0, 1, True, "a", 5),
         op("a", "renew", "L", 2, 3, "fail", code="FAILED_PRECONDITION", holder="a", token=5)]
    assert lin(h)


# -------------------------------------------------------------- idempotency


def begin(p, t0, t1, outcome, attempt, response=None, key="K", status="ok"):
    return op(p, "begin", key, t0, t1, status, out={"outcome": outcome, "attempt": attempt, "response": response})


def complete(p, t0, t1, attempt, response, key="K", status="ok"):
    return op(p, "complete", key, t0, t1, status, code="FAILED_PRECONDITION" if status == "fail" else None,
              attempt=attempt, response=response)


def abort(p, t0, t1, attempt, key="K", status="ok"):
    return op(p, "abort", key, t0, t1, status, attempt=attempt)


def get_record(p, t0, t1, state, attempt=None, response=None, key="K"):
    return op(p, "get_record", key, t0, t1, out={"state": state, "attempt": attempt, "response": response})


def test_a_good_idempotency_history_passes():
    h = [begin("a", 0, 1, "STARTED", 1), begin("b", 2, 3, "IN_PROGRESS", 1), abort("a", 4, 5, 1),
         begin("b", 6, 7, "STARTED", 2), complete("b", 8, 9, 2, "r2"), begin("c", 10, 11, "COMPLETED", 2, "r2"),
         get_record("c", 12, 13, "COMPLETED", 2, "r2")]
    assert lin(h) == [] and nc.check_idempotency(h) == []


def test_two_started_at_once_are_rejected():
    h = [begin("a", 0, 1, "STARTED", 1), begin("b", 2, 3, "STARTED", 2)]
    assert lin(h)
    assert nc.check_idempotency(h)


def test_two_completed_attempts_are_rejected():
    h = [begin("a", 0, 1, "STARTED", 1), complete("a", 2, 3, 1, "r1"),
         begin("b", 4, 5, "STARTED", 2), complete("b", 6, 7, 2, "r2")]
    assert lin(h)
    assert nc.check_idempotency(h)


def test_a_changed_or_lost_response_is_rejected():
    changed = [begin("a", 0, 1, "STARTED", 1), complete("a", 2, 3, 1, "r1"), begin("b", 4, 5, "COMPLETED", 1, "other")]
    assert lin(changed) and nc.check_idempotency(changed)
    lost = [begin("a", 0, 1, "STARTED", 1), complete("a", 2, 3, 1, "r1"), get_record("b", 4, 5, None)]
    assert lin(lost) and nc.check_idempotency(lost)


def test_an_unknown_complete_may_have_completed():
    h = [begin("a", 0, 1, "STARTED", 1), complete("a", 2, None, 1, "r1", status="unknown")]
    assert lin(h + [get_record("b", 5, 6, "COMPLETED", 1, "r1")]) == []
    assert lin(h + [get_record("b", 5, 6, "IN_PROGRESS", 1)]) == []


# ------------------------------------------------------------- rate limits


def check(p, t0, t1, allowed, key="R"):
    return op(p, "check", key, t0, t1, out={"allowed": allowed}, cost=1)


def test_admissions_within_the_bucket_pass_and_beyond_fail():
    # Capacity 5, 1 per second: 5 at once, then one a second.
    ok = [check("a", 0.01 * i, 0.01 * i + 0.005, True) for i in range(5)]
    ok += [check("a", 1.0 + i, 1.0 + i + 0.005, True) for i in range(5)]
    assert nc.check_rate_limits(ok, [], capacity=5, per_s=1) == []
    # One more than the bound fails.
    over = ok + [check("b", 0.2, 0.3, True)]
    assert nc.check_rate_limits(over, [], capacity=5, per_s=1)


def test_the_servers_whole_milliseconds_are_allowed_for():
    # Capacity 20, 10 per second. The server reads whole milliseconds, so
    # two decisions 399.6 ms apart by the client's clock may be 400 ms apart
    # by the server's, which refills 4 tokens: 24 admissions are legal.
    a = 100.4904
    legal = [check("a", a + 0.0001 * i, a + 0.0001 * i + 0.00005, True) for i in range(20)]
    legal += [check("b", a + 0.1 * i, a + 0.1 * i + 0.0005, True) for i in (1, 2, 3)]
    legal.append(check("b", a + 0.3990, a + 0.3996, True))
    assert nc.check_rate_limits(legal, [], capacity=20, per_s=10) == []
    # One more within the same span exceeds any reading of the clock.
    over = legal + [check("c", a + 0.3991, a + 0.3995, True)]
    assert nc.check_rate_limits(over, [], capacity=20, per_s=10)


def burst(p, at, n, spacing=0.01):
    return [check(p, at + spacing * i, at + spacing * i + 0.005, True) for i in range(n)]


def test_a_decider_change_allows_what_it_may_have_forgotten_and_no_more():
    # Capacity 5 with (almost) no refill: 5 allowed, then a change whose
    # span covers them lets the new decider allow those 5 again.
    change = [{"term": 2, "t_seen": 0.9, "forgets": [[0.0, 0.3]]}]
    before, after = burst("a", 0.0, 5), burst("b", 1.0, 5)
    assert nc.check_rate_limits(before + after, change, capacity=5, per_s=0.001) == []
    # One more than the bound fails, with the change in the history...
    one_more = before + after + burst("c", 1.5, 1)
    assert nc.check_rate_limits(one_more, change, capacity=5, per_s=0.001)
    # ... and without it the second burst alone already exceeds it.
    assert nc.check_rate_limits(before + after, [], capacity=5, per_s=0.001)
    # A change counts only for what may have been decided in its span: one
    # that forgets a span the key was not used in allows nothing.
    elsewhere = [{"term": 2, "t_seen": 0.9, "forgets": [[0.5, 0.8]]}]
    assert nc.check_rate_limits(before + after, elsewhere, capacity=5, per_s=0.001)


def test_decider_changes_come_from_observed_terms_and_faults():
    obs = [(0.0, "n0", 1, "Leader"), (0.0, "n1", 1, "Follower"), (0.5, "n0", 1, "Leader"),
           (1.2, "n1", 2, "Candidate"), (1.4, "n1", 2, "Leader"), (1.5, "n0", 1, "Leader"),
           (1.6, "n1", 2, "Leader")]
    faults = [{"t_inject": -1.0, "t_heal": -0.5}, {"t_inject": 1.0, "t_heal": 1.2}, {"t_inject": 2.0}]
    changes = nc.leader_changes(obs, faults)
    assert len(changes) == 1, changes
    c = changes[0]
    assert c["term"] == 2 and c["t_seen"] == 1.4
    # Each fault event since the previous leader was seen and before this
    # one: from one sync (plus one in flight) before it to the deciding
    # window after it (cut at the change).
    back = nc.SYNC_S + nc.IN_FLIGHT_S
    want = [[1.0 - back, 1.0 + nc.DECIDE_S], [1.2 - back, 1.4]]
    assert [[round(t, 6) for t in span] for span in c["forgets"]] == [[round(t, 6) for t in span] for span in want], c
    # An event spans the harness's action: from its start (less a sync and
    # one in flight) to its end (plus the deciding window).
    slow = [{"t_inject": 0.9, "t_injected": 1.05, "t_healing": 3.0, "t_heal": 3.2}]
    assert [[round(t, 6) for t in span] for span in nc.leader_changes(obs, slow)[0]["forgets"]] == \
        [[round(0.9 - back, 6), round(1.05 + nc.DECIDE_S, 6)]]
    late = [{"t_inject": 0.6, "t_injected": 0.7}]
    assert [[round(t, 6) for t in span] for span in nc.leader_changes(obs, late)[0]["forgets"]] == \
        [[round(0.6 - back, 6), round(0.7 + nc.DECIDE_S, 6)]]
    # No fault before it: the span looks back UNPROVOKED_S from the change.
    assert nc.leader_changes(obs, [])[0]["forgets"] == [[1.4 - nc.UNPROVOKED_S, 1.4]]
    # The first leader seen is no change.
    assert nc.leader_changes(obs[:3], faults) == []



def test_slot_map_versions_are_decider_changes_for_every_key():
    obs = [(0.0, "n0", 1, "Leader", 0), (0.3, "n1", 1, "Follower", 1), (0.4, "n0", 1, "Leader", 1),
           (2.0, "n2", 1, "Follower", 2), (2.5, "n0", 1, "Leader", 2)]
    faults = [{"t_inject": 1.5, "t_injected": 1.6}]
    changes = nc.slot_changes(obs, faults)
    # The first map (from the leader deciding all) and the second.
    assert [c["t_seen"] for c in changes] == [0.3, 2.0], changes
    assert changes[0]["forgets"] == [[0.3 - nc.UNPROVOKED_S, 0.3]]
    back = nc.SYNC_S + nc.IN_FLIGHT_S
    assert [[round(t, 6) for t in span] for span in changes[1]["forgets"]] == \
        [[round(1.5 - back, 6), round(1.6 + nc.DECIDE_S, 6)]]
    # Observations without a version (leader mode, older runs) give none.
    assert nc.slot_changes([o[:4] for o in obs], faults) == []


def test_a_deciders_clock_may_catch_up_by_a_sixty_fourth_and_no_more():
    # 10 a second, capacity 1: 66 evenly over 6.4 s is one more than real
    # time refills, and exactly what a clock running 1/64 fast does.
    admitted = [i * 6.4 / 65 for i in range(66)]
    ops = [{"f": "check", "key": "k", "t0": t, "t1": t, "status": "ok", "out": {"allowed": True}}
           for t in admitted]
    assert nc.check_rate_limits(ops, [], capacity=1, per_s=10.0) == []
    assert nc.check_rate_limits(ops, [], capacity=1, per_s=10.0, catch_up=0)
    assert nc.check_rate_limits(ops + [dict(ops[-1])], [], capacity=1, per_s=10.0)


# --------------------------------------------------------------- durability


def test_lost_writes_are_counted():
    h = [acq("a", 0, 1, True, "a", 5), begin("a", 0, 1, "STARTED", 1), complete("a", 2, 3, 1, "r1")]
    final = {("lease", "L"): {"holder": "a", "token": 5}, ("record", "K"): {"state": "COMPLETED", "attempt": 1, "response": "r1"}}
    assert nc.lost_writes(h, final) == []
    assert len(nc.lost_writes(h, {("lease", "L"): {"holder": None, "token": None},
                                  ("record", "K"): {"state": None, "attempt": None, "response": None}})) == 2
    released = h + [rel("a", 4, 5, 5)]
    assert nc.lost_writes(released, {**final, ("lease", "L"): {"holder": None, "token": None}}) == []


def test_an_unlinearizable_history_gives_up_within_its_budget():
    # Many overlapping unknown acquires and a contradiction at the end.
    h = [acq(f"p{i}", 0, None, None, None, None, status="unknown") for i in range(12)]
    h += [get("c", 1, 2, "p3", 4), get("c", 3, 4, "p4", 4)]
    ok, _ = nc.linearizable(h, nc.LEASE_INIT, nc.lease_step, budget=100)
    assert ok is None
    ok, _ = nc.linearizable(h, nc.LEASE_INIT, nc.lease_step)
    assert ok is False


# ----------------------------------------------------------------- outcomes


def test_an_unexpected_error_fails_the_run():
    ok = [check("a", i, i + 0.1, True) for i in range(100)]
    assert nc.outcome_problems([], ok) == []
    internal = op("b", "check", "R", 5, 5.1, status="error", code="INTERNAL", cost=1)
    problems = nc.outcome_problems([internal], ok + [internal])
    assert len(problems) == 1 and "unexpected INTERNAL from check" in problems[0], problems


def test_too_many_unknown_outcomes_fail_the_run():
    ok = [check("a", i, i + 0.1, True) for i in range(95)]
    unknown = [op("b", "check", "R", i, None, status="unknown", code="UNAVAILABLE", cost=1) for i in range(5)]
    # 5 of 100 is the most allowed; one more fails.
    assert nc.outcome_problems([], ok + unknown) == []
    more = unknown + [op("c", "check", "R", 9, None, status="unknown", code="DEADLINE_EXCEEDED", cost=1)]
    problems = nc.outcome_problems([], ok + more)
    assert len(problems) == 1 and "6 of 101 calls ended unknown" in problems[0], problems


def test_calls_sent_while_two_faults_overlap_do_not_count_towards_the_unknown_share():
    ok = [check("a", i, i + 0.1, True) for i in range(95)]
    # Thirty unknowns, all sent while a second fault overlapped the first
    # (from 200 s, healed at 210 s) or within RECOVER_S after.
    lost = [op("b", "check", "R", 200 + i * 0.4, None, status="unknown", code="UNAVAILABLE", cost=1)
            for i in range(30)]
    faults = [{"kind": "kill-leader", "t_inject": 199.0, "t_heal": 215.0},
              {"kind": "pause-follower", "overlaps": "kill-leader", "t_inject": 200.0, "t_heal": 210.0}]
    spans = nc.majority_lost(faults)
    assert spans == [(200.0, 210.0 + nc.RECOVER_S)]
    assert nc.outcome_problems([], ok + lost, spans) == []
    # The same calls with no overlap fail the run ...
    problems = nc.outcome_problems([], ok + lost, nc.majority_lost(faults[:1]))
    assert len(problems) == 1 and "30 of 125 calls ended unknown" in problems[0], problems
    # ... and so do unknowns sent outside the span, overlap or not.
    late = [op("c", "check", "R", 220 + i, None, status="unknown", code="UNAVAILABLE", cost=1) for i in range(6)]
    problems = nc.outcome_problems([], ok + lost + late, spans)
    assert len(problems) == 1 and "6 of 101 calls ended unknown" in problems[0], problems


# -------------------------------------------------------------- semaphores


def sem_acq(p, t0, t1, token, permits=1, status="ok", limit=2):
    out = {"granted": token is not None, "held": 0, "token": token, "permits": permits if token else 0}
    return op(p, "sem_acquire", "S", t0, t1, status, out=out if status == "ok" else None,
              holder=p, limit=limit, permits=permits)


def sem_rel(p, t0, t1, token, status="ok"):
    return op(p, "sem_release", "S", t0, t1, status, holder=p, token=token)


def test_a_semaphore_within_its_limit_passes():
    h = [sem_acq("a", 0, 1, 5), sem_acq("b", 2, 3, 6), sem_acq("c", 4, 5, None),
         sem_rel("a", 6, 7, 5), sem_acq("c", 8, 9, 8)]
    assert nc.check_semaphores(h) == []


def test_a_semaphore_over_its_limit_is_rejected():
    h = [sem_acq("a", 0, 1, 5), sem_acq("b", 2, 3, 6), sem_acq("c", 4, 5, 8)]
    assert any("limit of 2" in v for v in nc.check_semaphores(h))
    h = [sem_acq("a", 0, 1, 5, permits=2), sem_acq("b", 2, 3, 6)]
    assert nc.check_semaphores(h)
    # A release sent before the grant was acknowledged (even unknown) made room.
    h = [sem_acq("a", 0, 1, 5), sem_acq("b", 2, 3, 6), sem_rel("a", 3.5, None, 5, status="unknown"),
         sem_acq("c", 4, 5, 8)]
    assert nc.check_semaphores(h) == []
    # a renewed its token with 1 permit of 2: room for b's one.
    h = [sem_acq("a", 0, 1, 5, permits=2), sem_acq("a", 2, 3, 5, permits=1), sem_acq("b", 4, 5, 6)]
    assert nc.check_semaphores(h) == []
    h = [sem_acq("a", 0, 1, 5, permits=2), sem_acq("b", 4, 5, 6)]
    assert nc.check_semaphores(h)


def test_semaphore_tokens_given_twice_or_going_back_are_rejected():
    assert nc.check_semaphores([sem_acq("a", 0, 1, 5), sem_acq("b", 2, 3, 5)])
    h = [sem_acq("a", 0, 1, 9), sem_rel("a", 2, 3, 9), sem_acq("b", 4, 5, 7)]
    assert any("after token 9" in v for v in nc.check_semaphores(h))
    # b's earlier acquire went unanswered: the answer may renew that grant.
    h = [sem_acq("a", 0, 1, 9), sem_rel("a", 2, 3, 9), sem_acq("b", 1.5, None, 1, status="unknown"),
         sem_acq("b", 4, 5, 7)]
    assert nc.check_semaphores(h) == []
