"""Checkers for nemesis histories (cluster/nemesis.py). Pure Python, no gRPC.

A history is a list of operations, each a dict:

    {"p": "w3", "f": "acquire", "key": "lease-a", "args": {...},
     "t0": 12.031, "t1": 12.044 or None, "status": "ok" | "fail" | "unknown",
     "code": "FAILED_PRECONDITION" or None, "out": {...}}

t0 is when the call was sent and t1 when its answer came (host monotonic
seconds). "fail" means the call certainly had no effect (a refused
precondition); "unknown" means it may or may not have taken effect (a
timeout, UNAVAILABLE, a lost connection): such an operation has no t1.

Functions here return lists of violations (strings); an empty list passes.
`check(history, faults)` runs them all and also counts acknowledged writes
and lost ones.

Leases live 600 s and idempotency locks 600 s in the runner, so within a run
nothing expires and the models need no time.
"""

import collections

INF = float("inf")

LEASE_OPS = ("acquire", "renew", "release", "get_lease")
IDEM_OPS = ("begin", "complete", "abort", "get_record")


# ------------------------------------------------------- linearizability


def linearizable(ops, init, step, budget=2_000_000):
    """Whether `ops` (one object's operations) have a linearization under
    `step(state, op) -> list of next states` (empty: illegal) from `init`.

    Wing & Gong's search with Lowe's memo, as porcupine does it: walk the
    calls and returns in time order, linearize a pending call when its step
    is legal, backtrack at a return whose call is not yet linearized; a set
    of (linearized ops, states) already tried is never tried again. States
    are frozensets of model states, so a nondeterministic step (an unknown
    release may or may not have matched) stays one branch. Unknown
    operations return at infinity: they may be linearized anywhere after
    their call, or never. Returns (True|False|None, detail); None means the
    budget of steps ran out (inconclusive)."""
    ops = [o for o in ops if o["status"] != "unknown" or not _no_effect_when_unknown(o)]
    n = len(ops)
    if n == 0:
        return True, ""
    events = []
    for i, o in enumerate(ops):
        t1 = o["t1"] if o["status"] != "unknown" else INF
        events.append((o["t0"], 0, i))  # calls before returns at equal times
        events.append((t1, 1, i))
    events.sort()
    # A doubly linked list over the events: [kind, op index, prev, next].
    nodes = [[None, None, None, None] for _ in range(len(events) + 1)]
    head = len(events)
    nodes[head] = [None, None, None, 0 if events else None]
    ret_node = {}
    for k, (_, kind, i) in enumerate(events):
        nodes[k] = [kind, i, k - 1 if k > 0 else head, k + 1 if k + 1 < len(events) else None]
        if kind == 1:
            ret_node[i] = k

    def unlink(k):
        _, _, p, nx = nodes[k]
        nodes[p][3] = nx
        if nx is not None:
            nodes[nx][2] = p

    def relink(k):
        _, _, p, nx = nodes[k]
        nodes[p][3] = k
        if nx is not None:
            nodes[nx][2] = k

    known = sum(1 for o in ops if o["status"] != "unknown")
    # Unknown operations with the same call and arguments are
    # interchangeable (they never return): only the earliest one not yet
    # linearized is tried, which keeps many timed-out retries of one call
    # from multiplying the search. `passed` holds the classes of unknown
    # calls passed over since the walk last restarted from the head.
    cls = [_unknown_class(o) if o["status"] == "unknown" else None for o in ops]
    state = frozenset([init])
    linearized = 0
    done_known = 0
    seen = set()
    stack = []
    passed = set()
    entry = nodes[head][3]
    steps = 0
    deepest = 0
    while True:
        steps += 1
        if steps > budget:
            return None, f"inconclusive after {budget} steps ({len(ops)} ops)"
        if done_known == known or entry is None:
            # Everything known is placed; what is left is unknown calls,
            # which never have to take effect.
            return True, ""
        kind, i, _, _ = nodes[entry]
        if kind == 0:
            if cls[i] is not None and cls[i] in passed:
                entry = nodes[entry][3]
                continue
            nxt = frozenset(s2 for s in state for s2 in step(s, ops[i]))
            bit = linearized | (1 << i)
            if nxt and (bit, nxt) not in seen:
                seen.add((bit, nxt))
                stack.append((entry, state, passed))
                state = nxt
                linearized = bit
                passed = set()
                if cls[i] is None:
                    done_known += 1
                deepest = max(deepest, done_known)
                unlink(entry)
                unlink(ret_node[i])
                entry = nodes[head][3]
            else:
                if cls[i] is not None:
                    passed.add(cls[i])
                entry = nodes[entry][3]
        else:
            if cls[i] is not None:
                # Every call before infinity was skipped or placed: what is
                # left never has to take effect.
                return True, ""
            if not stack:
                return False, _stuck(ops, deepest)
            entry, state, passed = stack.pop()
            j = nodes[entry][1]
            linearized &= ~(1 << j)
            if cls[j] is None:
                done_known -= 1
            else:
                passed = passed | {cls[j]}
            relink(ret_node[j])
            relink(entry)
            entry = nodes[entry][3]


def _unknown_class(op):
    return (op["f"], tuple(sorted((k, str(v)) for k, v in op["args"].items())))


def _no_effect_when_unknown(op):
    # A read or a renewal (TTLs outlive the run) changes nothing whether or
    # not it took effect.
    return op["f"] in ("get_lease", "renew", "get_record", "check")


def _stuck(ops, deepest):
    known = sorted((o for o in ops if o["status"] != "unknown"), key=lambda o: o["t1"])
    around = known[max(0, deepest - 3): deepest + 3]
    return "no linearization; near " + "; ".join(_show(o) for o in around)


def _show(o):
    t1 = f"{o['t1']:.3f}" if o.get("t1") is not None else "?"
    return f"{o['p']} {o['f']}({o['args']}) [{o['t0']:.3f},{t1}] {o['status']} {o.get('code') or ''} {o.get('out') or ''}".strip()


# ------------------------------------------------------------ lease model

# State: (holder or None, token or None, floor). A held lease whose token
# is not yet known (granted by an unknown acquire) has token None; floor is
# the largest token the name has had, which every new grant exceeds.
LEASE_INIT = (None, None, 0)


def _bind(state, token):
    """The held state with its token equal to `token`, or None."""
    holder, tok, floor = state
    if tok is None:
        return (holder, token, max(floor, token)) if token > floor else None
    return state if tok == token else None


def lease_step(s, op):
    holder, tok, floor = s
    f, a, st, out = op["f"], op["args"], op["status"], op.get("out") or {}
    me = a.get("holder")
    if f == "acquire":
        if st == "unknown":
            return [(me, None, floor)] if holder is None else [s]
        if st == "fail":
            return [s]
        if holder is None:
            if out["acquired"] and out["holder"] == me and out["token"] > floor:
                return [(me, out["token"], out["token"])]
            return []
        if holder == me:
            b = _bind(s, out["token"]) if out["acquired"] and out["holder"] == me else None
        else:
            b = _bind(s, out["token"]) if not out["acquired"] and out["holder"] == holder else None
        return [b] if b else []
    if f == "renew":
        if st == "ok":
            b = _bind(s, a["token"]) if holder == me else None
            return [b] if b else []
        if st == "fail":
            if holder == me and tok == a["token"]:
                return []
            return [s]
        return [s]
    if f == "release":
        matches = holder == me and (tok == a["token"] or (tok is None and a["token"] > floor))
        released = (None, None, max(floor, a["token"]))
        if st == "ok":
            return [released] if matches else []
        if st == "fail":
            return [] if holder == me and tok == a["token"] else [s]
        if not matches:
            return [s]
        return [released, s] if tok is None else [released]
    if f == "get_lease":
        if st != "ok":
            return [s]
        if out["holder"] is None:
            return [s] if holder is None else []
        if holder != out["holder"]:
            return []
        b = _bind(s, out["token"])
        return [b] if b else []
    raise ValueError(f"not a lease operation: {f}")


# ------------------------------------------------------ idempotency model

# State: (kind, attempt or None, response, floor): kind None (no record),
# "ip" (in progress) or "done"; attempt None while an unknown Begin's
# attempt is not yet seen; floor is the largest attempt seen (attempts are
# never reused, so a new one exceeds it).
IDEM_INIT = (None, None, None, 0)


def _bind_attempt(s, attempt):
    kind, att, resp, floor = s
    if att is None:
        return (kind, attempt, resp, max(floor, attempt)) if attempt > floor else None
    return s if att == attempt else None


def idem_step(s, op):
    kind, att, resp, floor = s
    f, a, st, out = op["f"], op["args"], op["status"], op.get("out") or {}
    if f == "begin":
        if st == "unknown":
            return [("ip", None, None, floor)] if kind is None else [s]
        if st == "fail":
            return [s]
        outcome = out["outcome"]
        if kind is None:
            if outcome == "STARTED" and out["attempt"] > floor:
                return [("ip", out["attempt"], None, out["attempt"])]
            return []
        if kind == "ip":
            b = _bind_attempt(s, out["attempt"]) if outcome == "IN_PROGRESS" else None
            return [b] if b else []
        return [s] if outcome == "COMPLETED" and out["response"] == resp else []
    if f in ("complete", "abort"):
        matches = kind == "ip" and (att == a["attempt"] or (att is None and a["attempt"] > floor))
        if f == "complete":
            after = ("done", a["attempt"], a["response"], max(floor, a["attempt"]))
        else:
            after = (None, None, None, max(floor, a["attempt"]))
        if st == "ok":
            return [after] if matches else []
        if st == "fail":
            return [] if kind == "ip" and att == a["attempt"] else [s]
        if not matches:
            return [s]
        return [after, s]
    if f == "get_record":
        if st != "ok":
            return [s]
        if out["state"] is None:
            return [s] if kind is None else []
        if out["state"] == "IN_PROGRESS":
            b = _bind_attempt(s, out["attempt"]) if kind == "ip" else None
            return [b] if b else []
        if kind != "done" or out["response"] != resp:
            return []
        b = _bind_attempt(s, out["attempt"])
        return [b] if b else []
    raise ValueError(f"not an idempotency operation: {f}")


# ------------------------------------------------------------- checkers


def by_key(history, fs):
    groups = collections.defaultdict(list)
    for o in history:
        if o["f"] in fs:
            groups[o["key"]].append(o)
    return groups


def check_linearizable(history, budget=2_000_000):
    """Leases per name and idempotency records per key. Returns
    (violations, inconclusive keys)."""
    violations, inconclusive = [], []
    for fs, init, step, what in ((LEASE_OPS, LEASE_INIT, lease_step, "lease"), (IDEM_OPS, IDEM_INIT, idem_step, "record")):
        for key, ops in sorted(by_key(history, fs).items()):
            ok, detail = linearizable(ops, init, step, budget)
            if ok is None:
                inconclusive.append(f"{what} {key}: {detail}")
            elif not ok:
                violations.append(f"{what} {key} is not linearizable: {detail}")
    return violations, inconclusive


def _grants(history):
    """Acknowledged acquires that hold the lease: (name, holder, token, t0, t1)."""
    return [(o["key"], o["out"]["holder"], o["out"]["token"], o["t0"], o["t1"])
            for o in history
            if o["f"] == "acquire" and o["status"] == "ok" and o["out"]["acquired"]]


def check_fencing(history):
    """No token is seen for two different (name, holder) pairs, and per name
    an acquire invoked after another was acknowledged never answers a
    smaller token (tokens strictly increase in real-time order)."""
    violations = []
    owner = {}
    for o in history:
        out = o.get("out") or {}
        if o["status"] == "ok" and o["f"] in ("acquire", "get_lease") and out.get("token"):
            who = (o["key"], out["holder"])
            if owner.setdefault(out["token"], who) != who:
                violations.append(f"fencing token {out['token']} seen for {owner[out['token']]} and {who}")
    per_name = collections.defaultdict(list)
    for g in _grants(history):
        per_name[g[0]].append(g)
    for name, gs in per_name.items():
        by_end = sorted(gs, key=lambda g: g[4])
        by_start = sorted(gs, key=lambda g: g[3])
        k, best = 0, None
        for g in by_start:
            while k < len(by_end) and by_end[k][4] < g[3]:
                if best is None or by_end[k][2] > best[2]:
                    best = by_end[k]
                k += 1
            if best is not None and g[2] < best[2]:
                violations.append(
                    f"lease {name}: {g[1]} was granted token {g[2]} by an acquire sent at {g[3]:.3f}, "
                    f"after token {best[2]} ({best[1]}) was acknowledged at {best[4]:.3f}")
    return violations


def check_one_holder(history):
    """Per name, for acknowledged grants with tokens a < b: the holder of a
    sent a release of a (acknowledged or unknown) before b's grant was
    acknowledged; otherwise two holders held the lease at once."""
    violations = []
    releases = collections.defaultdict(list)
    for o in history:
        if o["f"] == "release" and o["status"] in ("ok", "unknown"):
            releases[(o["key"], o["args"]["holder"], o["args"]["token"])].append(o["t0"])
    first = {}
    for name, holder, token, _, t1 in _grants(history):
        k = (name, token)
        if k not in first or t1 < first[k][1]:
            first[k] = (holder, t1)
    per_name = collections.defaultdict(list)
    for (name, token), (holder, t1) in first.items():
        per_name[name].append((token, holder, t1))
    for name, gs in per_name.items():
        gs.sort()
        for (ta, ha, _), (tb, hb, t1b) in zip(gs, gs[1:]):
            sent = releases.get((name, ha, ta), [])
            if not any(t < t1b for t in sent):
                violations.append(
                    f"lease {name}: {hb} was granted token {tb} (acknowledged at {t1b:.3f}) while {ha} "
                    f"held token {ta} and had sent no release of it")
    return violations


def check_semaphores(history):
    """Semaphores (nothing lapses within a run: the TTL outlasts it). A
    token is seen for one (name, holder) only, and a grant is given the
    permits asked. An acquire sent after another's grant was acknowledged
    answers a greater token, unless its holder had an acquire of unknown
    outcome on that name before (the answer may renew that grant). And no
    grant takes a name past the limit it was asked under: a grant counts
    every other holder's permits granted (acknowledged) before it was sent,
    with no release of them sent (acknowledged or unknown) before it was
    acknowledged, at the fewest the holder's own acquires (which renew,
    with the count they ask) may have left them."""
    violations = []
    grants = [o for o in history if o["f"] == "sem_acquire" and o["status"] == "ok" and o["out"]["granted"]]
    owner = {}
    for o in grants:
        who = (o["key"], o["args"]["holder"])
        if owner.setdefault(o["out"]["token"], who) != who:
            violations.append(f"semaphore token {o['out']['token']} seen for {owner[o['out']['token']]} and {who}")
        if o["out"]["permits"] != o["args"]["permits"]:
            violations.append(f"semaphore {o['key']}: {who[1]} asked for {o['args']['permits']} permit(s), "
                              f"was granted {o['out']['permits']}")
    first = {}
    for o in grants:
        t = o["out"]["token"]
        if t not in first or o["t1"] < first[t]["t1"]:
            first[t] = o
    unknown = [(o["key"], o["args"]["holder"], o["t0"]) for o in history
               if o["f"] == "sem_acquire" and o["status"] == "unknown"]
    for b in first.values():
        if any(k == b["key"] and h == b["args"]["holder"] and t0 < b["t0"] for k, h, t0 in unknown):
            continue
        later = [a for a in first.values() if a["t1"] < b["t0"] and a["out"]["token"] > b["out"]["token"]]
        if later:
            a = max(later, key=lambda a: a["out"]["token"])
            violations.append(f"semaphore token {b['out']['token']} granted by an acquire sent at {b['t0']:.3f}, "
                              f"after token {a['out']['token']} was acknowledged at {a['t1']:.3f}")
    releases = collections.defaultdict(list)
    for o in history:
        if o["f"] == "sem_release" and o["status"] in ("ok", "unknown"):
            releases[o["args"]["token"]].append(o["t0"])
    # What a holder's acquire sent while it held a token may have set its
    # count to (a holder acquiring again renews, with the count it asks).
    counts = collections.defaultdict(list)
    for o in history:
        if o["f"] == "sem_acquire" and o["status"] == "unknown":
            counts[(o["key"], o["args"]["holder"])].append((o["t0"], o["args"]["permits"]))
    for b in grants:
        held = b["out"]["permits"]
        for t, a in first.items():
            if t == b["out"]["token"] or a["key"] != b["key"] or a["t1"] >= b["t0"]:
                continue
            if any(sent < b["t1"] for sent in releases.get(t, [])):
                continue
            # The fewest permits the token may have had when b was decided.
            may = [g["out"]["permits"] for g in grants if g["out"]["token"] == t and g["t0"] < b["t1"]]
            may += [n for t0, n in counts[(a["key"], a["args"]["holder"])] if a["t0"] <= t0 < b["t1"]]
            held += min(may)
        if held > b["args"]["limit"]:
            violations.append(f"semaphore {b['key']}: {b['args']['holder']} was granted {b['out']['permits']} "
                              f"permit(s) (acknowledged at {b['t1']:.3f}) under a limit of {b['args']['limit']}, "
                              f"while others held {held - b['out']['permits']}")
    return violations


def check_idempotency(history):
    """Per key: at most one attempt completes; once a completion is
    acknowledged every later answer shows that response; STARTED is never
    given for a second attempt unless the first was aborted (acknowledged or
    unknown) before the second Begin was answered."""
    violations = []
    for key, ops in sorted(by_key(history, IDEM_OPS).items()):
        done = [o for o in ops if o["f"] == "complete" and o["status"] == "ok"]
        attempts = {o["args"]["attempt"] for o in done}
        if len(attempts) > 1:
            violations.append(f"record {key}: attempts {sorted(attempts)} all completed")
        if done:
            first = min(done, key=lambda o: o["t1"])
            want = first["args"]["response"]
            for o in ops:
                if o["status"] != "ok" or o["t0"] <= first["t1"]:
                    continue
                out = o.get("out") or {}
                if o["f"] == "begin" and (out["outcome"] != "COMPLETED" or out["response"] != want):
                    violations.append(f"record {key}: completed with {want!r} at {first['t1']:.3f}, then Begin answered {out}")
                if o["f"] == "get_record" and (out["state"] != "COMPLETED" or out["response"] != want):
                    violations.append(f"record {key}: completed with {want!r} at {first['t1']:.3f}, then Get answered {out}")
        started = sorted((o for o in ops if o["f"] == "begin" and o["status"] == "ok" and o["out"]["outcome"] == "STARTED"),
                         key=lambda o: o["out"]["attempt"])
        aborts = collections.defaultdict(list)
        for o in ops:
            if o["f"] == "abort" and o["status"] in ("ok", "unknown"):
                aborts[o["args"]["attempt"]].append(o["t0"])
        for a, b in zip(started, started[1:]):
            if not any(t < b["t1"] for t in aborts.get(a["out"]["attempt"], [])):
                violations.append(
                    f"record {key}: STARTED attempt {a['out']['attempt']} ({a['p']}) and then attempt "
                    f"{b['out']['attempt']} ({b['p']}) with no abort of the first sent before")
    return violations


SYNC_S = 0.1      # --limit-sync-ms: how often the decider syncs its counters
DECIDE_S = 0.3    # timing::DECIDE_MS: how long a cut-off leader goes on deciding
IN_FLIGHT_S = 0.1  # a sync on its way when the decider stopped
UNPROVOKED_S = 2.0  # a change with no fault before it: how far back to look


def leader_changes(observations, faults, lookback_s=15.0):
    """The decider changes a run saw, each with the spans in which the
    decisions it may forget were made. `observations` are (t, node, term,
    state) from polling every node's Status; a change is the first time a
    node of a higher term than any before says it leads. What the old
    decider may forget (the README's bound) is what it allowed after its
    last sync that reached the others and before it stopped: from one sync
    interval (plus one in flight) before the fault that cut it off, froze or
    killed it, to the leader lease's deciding window after it. Which fault
    did is not known, so each fault event (injection or heal) since the
    previous change was seen (and within lookback_s) gives a span; a change
    with none looks back UNPROVOKED_S. An event is the harness's action
    from its start to its end (t_inject to t_injected, t_healing to
    t_heal): finding the leader and running the commands take time, and
    the fault takes effect somewhere in between."""
    seen = {}
    for t, _node, term, state, *_ in sorted(observations):
        if state == "Leader" and term not in seen:
            seen[term] = t
    terms = sorted(seen)
    changes = _changes([seen[t] for t in terms], fault_events(faults), lookback_s)
    for term, change in zip(terms[1:], changes):
        change["term"] = term
    return changes


def slot_changes(observations, faults, lookback_s=15.0):
    """The slot moves a run saw (with `--slot-owners spread`), as decider
    changes for every key: a move is the first time any node reports a
    newer slot-map version (the fifth field of an observation). The map
    does not say here which keys moved, so each move counts for all; what
    the old owner may forget is found as for `leader_changes` (an owner
    that loses a slot stops deciding it before the map moves it)."""
    seen = {}
    for t, _node, _term, _state, *rest in sorted(observations):
        version = rest[0] if rest else 0
        if version and version not in seen:
            seen[version] = t
    # Before the first map the leader decides every key: the first is a
    # move too, from the leader's first election.
    firsts = [t for t, _n, _term, state, *_ in sorted(observations) if state == "Leader"][:1]
    return _changes(firsts + [seen[v] for v in sorted(seen)], fault_events(faults), lookback_s)


def fault_events(faults):
    """Each fault's injection and heal as (start, end): the harness's
    action from its start to its end."""
    events = []
    for f in faults:
        for start, end in (("t_inject", "t_injected"), ("t_healing", "t_heal")):
            t1 = f.get(end, f.get(start))
            if t1 is not None:
                events.append((f.get(start, t1), t1))
    events.sort()
    return events


def _changes(times, events, lookback_s):
    """A change at each of `times` after the first (each one the decider
    before it handed over), with the spans it may forget."""
    changes = []
    for prev, t_seen in zip(times, times[1:]):
        causes = [(a, b) for a, b in events if prev < b and a <= t_seen and t_seen - a <= lookback_s]
        spans = [[a - SYNC_S - IN_FLIGHT_S, min(b + DECIDE_S, t_seen)] for a, b in causes]
        changes.append({"t_seen": t_seen, "forgets": spans or [[t_seen - UNPROVOKED_S, t_seen]]})
    return changes


def check_rate_limits(history, changes, capacity, per_s, window_s=10.0, tick_s=0.001, catch_up=1 / 64):
    """Per key, the documented bound: the admitted checks that certainly
    took effect inside any interval [a, b] (sent at or after a, answered by
    b) number at most capacity + per_s * (b - a), plus, for each decider
    change (`leader_changes`), the checks among them that may have been
    decided in the span that change may forget. A token bucket holds at most
    its capacity, so one decider never allows more; a change lets the new
    decider allow again what the old one allowed after its last sync. The
    server reads its clock in whole milliseconds (tick_s), so two decisions
    b - a apart by the client's clock may be up to one tick further apart
    by the server's, which refills for that tick too. A decider's clock may
    run up to `catch_up` fast while it catches up with the leader's time
    (docs/design.md, "Time"). Intervals up to window_s long are examined."""
    violations = []
    for key, ops in sorted(by_key(history, ("check",)).items()):
        admitted = sorted((o["t0"], o["t1"]) for o in ops if o["status"] == "ok" and o["out"]["allowed"])
        worst = None
        for i, (a, _) in enumerate(admitted):
            inside = sorted(((t1, t0) for t0, t1 in admitted[i:] if t1 - a <= window_s))
            forgettable = [0] * len(changes)
            for n, (b, t0) in enumerate(inside, start=1):
                for c, change in enumerate(changes):
                    if any(t0 <= end and b >= start for start, end in change["forgets"]):
                        forgettable[c] += 1
                bound = capacity + per_s * ((b - a) * (1 + catch_up) + tick_s) + sum(forgettable)
                if n > bound and (worst is None or n - bound > worst[0]):
                    worst = (n - bound, n, a, b, bound)
        if worst:
            _, n, a, b, bound = worst
            violations.append(f"limit {key}: {n} checks admitted within [{a:.3f}, {b:.3f}], bound {bound:.1f}")
    return violations


def lost_writes(history, final):
    """Acknowledged writes missing from the final reads (after the last heal
    and a full restart). `final` maps ("lease", name) / ("record", key) to
    the final read's out. Returns (lost descriptions)."""
    lost = []
    for key, ops in by_key(history, IDEM_OPS).items():
        done = [o for o in ops if o["f"] == "complete" and o["status"] == "ok"]
        if not done:
            continue
        got = final.get(("record", key))
        want = done[0]["args"]["response"]
        if got is None or got["state"] != "COMPLETED" or got["response"] != want:
            lost.append(f"record {key}: completed with {want!r}, finally {got}")
    for name, ops in by_key(history, LEASE_OPS).items():
        tokens = [o["out"]["token"] for o in ops
                  if o["status"] == "ok" and o["f"] == "acquire" and o["out"]["acquired"]]
        if not tokens:
            continue
        top = max(tokens)
        got = final.get(("lease", name))
        if got is None:
            lost.append(f"lease {name}: no final read")
            continue
        if got["holder"] is not None and got["token"] >= top:
            continue
        released = any(o["f"] == "release" and o["status"] in ("ok", "unknown") and o["args"]["token"] == top for o in ops)
        if got["holder"] is None and released:
            continue
        lost.append(f"lease {name}: token {top} acknowledged, finally {got}")
    return lost


MAX_UNKNOWN_SHARE = 0.05
RECOVER_S = 3.0  # after a majority comes back: its election, and calls sent before it that time out


def majority_lost(faults):
    """The spans in which two overlapping faults left a 3-node cluster
    without a majority: from the second fault's injection to RECOVER_S
    after its heal. Calls sent in them can only end unknown, so they do
    not count towards the unknown share."""
    return [(f["t_inject"], f.get("t_heal", float("inf")) + RECOVER_S)
            for f in faults if f.get("overlaps") and "t_inject" in f]


def outcome_problems(errors, ops, excused=(), max_unknown=MAX_UNKNOWN_SHARE):
    """What fails a run besides the checkers: calls answered with an error
    that is neither a refusal nor unknown (`errors`: the server failed),
    and more than max_unknown of the calls sent (`ops`) ending unknown (a
    history of mostly unknowns proves little). Calls sent in an `excused`
    span (`majority_lost`) count for neither side of that share."""
    problems = [f"unexpected {o['code']} from {o['f']}: {o.get('detail')}" for o in errors[:5]]
    if len(errors) > 5:
        problems.append(f"... and {len(errors) - 5} more unexpected errors")
    ops = [o for o in ops if not any(a <= o["t0"] <= b for a, b in excused)]
    unknown = [o for o in ops if o["status"] == "unknown"]
    if ops and len(unknown) > max_unknown * len(ops):
        codes = collections.Counter(o.get("code") or "no answer" for o in unknown)
        problems.append(f"{len(unknown)} of {len(ops)} calls ended unknown, more than {max_unknown:.0%} "
                        f"({', '.join(f'{c} {n}' for c, n in codes.most_common())})")
    return problems


def acknowledged_writes(history):
    n = 0
    for o in history:
        if o["status"] != "ok":
            continue
        out = o.get("out") or {}
        if o["f"] == "acquire" and out.get("acquired"):
            n += 1
        elif o["f"] == "sem_acquire" and out.get("granted"):
            n += 1
        elif o["f"] in ("renew", "release", "complete", "abort", "sem_renew", "sem_release"):
            n += 1
        elif o["f"] == "begin" and out.get("outcome") == "STARTED":
            n += 1
    return n


def check(history, faults, final, capacity, per_s, budget=2_000_000, observations=()):
    """Every checker over one run. Returns a dict with violations (list),
    inconclusive (list), lost (list) and writes (int)."""
    leaders = leader_changes(observations, faults)
    moves = slot_changes(observations, faults)
    lin, inconclusive = check_linearizable(history, budget)
    violations = (lin + check_fencing(history) + check_one_holder(history) + check_idempotency(history)
                  + check_semaphores(history) + check_rate_limits(history, leaders + moves, capacity, per_s))
    lost = lost_writes(history, final)
    # For the record: the windows that would be over if slot moves forgot
    # nothing (a move's allowance hides nothing the clock does then).
    over_without_moves = len(check_rate_limits(history, leaders, capacity, per_s)) if moves else 0
    return {"violations": violations, "inconclusive": inconclusive, "lost": lost,
            "writes": acknowledged_writes(history), "changes": len(leaders), "moves": len(moves),
            "over_without_moves": over_without_moves}
