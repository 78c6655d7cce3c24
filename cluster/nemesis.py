"""Randomised fault runs on a 3-container cluster with checked histories.

Run through cluster/nemesis.sh (or `make nemesis`), which builds the image
when missing and installs grpcio. Needs root on the host: the nodes' data
directories are small tmpfs mounts (so one can be filled), and partitions
are iptables rules entered into a container's network namespace.

Each run: six client threads for DURATION seconds do lease acquire / renew /
release / get on 3 names, idempotency begin / complete / abort / get on keys
that roll on (about two new a second, eight in play), and token-bucket
checks (capacity 20, 10 per second) on 2 keys, each call with a 2 s
deadline, while a schedule drawn from the run's seed injects
faults and heals them (a quarter of the node faults with a second fault
on another node while held; calls sent while the two leave no majority
do not count towards the unknown share):

  kill-leader, kill-follower      docker kill -s KILL, then docker start
  pause-leader, pause-follower    SIGSTOP, then SIGCONT
  partition-leader, -follower     all traffic to and from the other members
                                  dropped (iptables in the node's namespace)
  oneway-leader, -follower        only traffic arriving from the other
                                  members dropped
  restart-all                     every node killed (SIGKILL) or stopped
                                  (SIGTERM), then all started
  clock                           one node's wall clock offset by up to
                                  +-300 s and the node restarted on it
  disk-full                       one node's data volume filled

Every call is recorded with its send and answer times and its result: ok,
fail (a refused precondition, certainly no effect) or unknown (a timeout
or UNAVAILABLE: it may or may not have taken effect). Any other error
fails the run, as does a run where more than 5 % of the calls sent end
unknown, or a linearizability search that runs out of its budget
(`--budget`). After
the schedule, every fault is healed, the cluster is killed and started
again, and every name and key is read. cluster/nemesis_check.py then
checks the history (linearizability per lease name and idempotency key,
fencing tokens, one holder at a time, one completed attempt per key, the
rate limits' bound per key across each leader change seen, and every
acknowledged write after the restart). A run with a violation or a lost write saves its history, fault
schedule and node logs under target/nemesis/run-<seed>/; `--check FILE`
checks a saved history again, `--seed S --runs 1` replays the schedule.

The last line is `nemesis: R runs, F faults, W acknowledged writes, L lost,
V violations`; the exit status is 0 when L and V are 0 (V counts unexpected
errors, too many unknown outcomes and exhausted searches).

  RUNS=3 DURATION=20 cluster/nemesis.sh
  cluster/nemesis.sh --check target/nemesis/run-1234/history.json
"""

import argparse
import collections
import errno
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import threading
import time

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import nemesis_check as nc  # noqa: E402
from e2e import ROOT, Cluster, compose, eventually, log, sh  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "python"))
from arbiter_pb import compile_stubs  # noqa: E402

PROJECT = os.environ.get("NEMESIS_CLUSTER", "arbiter-nemesis")
OVERLAY = "compose.nemesis.yml"
WORKERS = 6
CALL_S = 2.0
TTL_MS = 600_000  # nothing lapses within a run: the models need no time
CAPACITY, PER_S = 20, 10
SEM_LIMIT = 2  # permits per semaphore: the workers crowd it
DATA_MB = 256
KINDS = ["kill-leader", "kill-follower", "pause-leader", "pause-follower", "partition-leader",
         "partition-follower", "oneway-leader", "oneway-follower", "restart-all", "clock", "disk-full"]
# The only answers whose outcome is unknown: the server could not say (no
# majority, not reachable) or the call ran out of time. Any other error is
# the server failing and fails the run.
UNKNOWN_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
# Kinds that may come with a second fault on another node while they are
# held (a quarter of them do), and that may be that second fault.
OVERLAPPING = {"kill-leader", "kill-follower", "pause-leader", "pause-follower", "partition-leader",
               "partition-follower", "oneway-leader", "oneway-follower", "disk-full"}
OVERLAP_SHARE = 0.25


def timed_out(code, detail):
    """The call's own deadline lapsing at the server: tonic answers it
    CANCELLED "Timeout expired" (the grpc-timeout the client sent), which
    is a timeout like DEADLINE_EXCEEDED, not the server failing."""
    return code == "CANCELLED" and detail == "Timeout expired"


# ------------------------------------------------------------- the cluster


class Nemesis:
    """The cluster and the faults: injecting, healing, and finding targets."""

    def __init__(self, pb, workdir):
        self.pb = pb
        self.dir = pathlib.Path(workdir)
        self.cluster = Cluster(pb, prefix=PROJECT)
        self.nodes = self.cluster.nodes
        self.env = {"ARBITER_CLUSTER": PROJECT, "NEMESIS_DIR": str(self.dir)}
        self.mounted = []

    def compose(self, *args, timeout=180):
        return compose(*args, timeout=timeout, project=PROJECT, overlays=(OVERLAY,), env=self.env)

    def up(self):
        self.compose("down", "--volumes", "--timeout", "5")
        for n in self.nodes:
            data = self.dir / f"data-{n.ordinal}"
            data.mkdir(parents=True, exist_ok=True)
            sh("mount", "-t", "tmpfs", "-o", f"size={DATA_MB}m,uid=10001,gid=10001,mode=0750", "tmpfs", str(data))
            self.mounted.append(data)
            clock = self.dir / f"clock-{n.ordinal}"
            clock.mkdir(parents=True, exist_ok=True)
            (clock / "offset").write_text("0\n")
        self.compose("up", "-d")
        eventually("the cluster to form", self.cluster.formed, 90)

    def down(self):
        try:
            self.compose("down", "--volumes", "--timeout", "5")
        finally:
            for m in self.mounted:
                sh("umount", str(m), check=False)

    def running(self, n):
        r = sh("docker", "inspect", "-f", "{{.State.Running}} {{.State.Paused}}", n.name, check=False)
        return r.stdout.strip().startswith("true")

    def restart_if_it_exits(self, n, fault, within=30.0):
        """A node whose write failed on the full disk shuts down and exits
        (as the server does on a fatal storage error), which takes a moment:
        it may still be running when the disk is freed. Starts it again once
        it has exited, as its supervisor would; returns once it is serving
        ready, or after `within` seconds (polled, with that deadline)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not self.running(n):
                fault["exited"] = True
                sh("docker", "start", n.name)
                return
            try:
                if n.status(timeout=0.5).ready:
                    return
            except Exception:  # noqa: BLE001 - not answering yet: look again
                pass
            time.sleep(0.2)

    def pid(self, n):
        return sh("docker", "inspect", "-f", "{{.State.Pid}}", n.name).stdout.strip()

    def leader(self):
        seen = collections.Counter()
        for n in self.nodes:
            try:
                st = n.status(timeout=0.5)
                if st.HasField("leader_id"):
                    seen[st.leader_id] += 1
            except Exception:  # noqa: BLE001 - an unreachable node names no leader
                pass
        return self.cluster.node(seen.most_common(1)[0][0]) if seen else None

    def target(self, rng, role, avoid=None):
        """The leader, or a follower, for a fault; never the node named
        `avoid` (another fault's target)."""
        leader = self.leader()
        nodes = [n for n in self.nodes if n.name != avoid]
        if role == "leader" and leader in nodes:
            return leader
        return rng.choice([n for n in nodes if n is not leader] or nodes)

    def iptables(self, n, *rule):
        sh("nsenter", "-t", self.pid(n), "-n", "iptables", *rule)

    def fill(self, n):
        filler = self.dir / f"data-{n.ordinal}" / "nemesis-filler"
        with open(filler, "wb", buffering=0) as f:
            for chunk in (1 << 20, 4096, 1):
                block = bytes(chunk)
                try:
                    while True:
                        f.write(block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        return filler

    def heal_all(self):
        """Undoes every fault this runner can cause, whatever state it left."""
        for n in self.nodes:
            (self.dir / f"clock-{n.ordinal}" / "offset").write_text("0\n")
            filler = self.dir / f"data-{n.ordinal}" / "nemesis-filler"
            if filler.exists():
                filler.unlink()
            if self.running(n):
                sh("docker", "kill", "-s", "CONT", n.name, check=False)
                for chain in ("INPUT", "OUTPUT"):
                    sh("nsenter", "-t", self.pid(n), "-n", "iptables", "-F", chain, check=False)
            else:
                sh("docker", "start", n.name, check=False)

    def inject(self, fault, rng, avoid=None):
        """Injects `fault` (from the schedule) and returns how to heal it.
        A fault that overlaps another never targets that one's node
        (`avoid`)."""
        kind = fault["kind"]
        if kind in ("kill-leader", "kill-follower"):
            n = self.target(rng, kind.split("-")[1], avoid)
            fault["target"] = n.name
            sh("docker", "kill", "-s", "KILL", n.name)
            return lambda: sh("docker", "start", n.name)
        if kind in ("pause-leader", "pause-follower"):
            n = self.target(rng, kind.split("-")[1], avoid)
            fault["target"] = n.name
            sh("docker", "kill", "-s", "STOP", n.name)
            return lambda: sh("docker", "kill", "-s", "CONT", n.name)
        if kind.startswith(("partition-", "oneway-")):
            n = self.target(rng, kind.split("-")[1], avoid)
            fault["target"] = n.name
            for other in self.nodes:
                if other is n:
                    continue
                ip = other.ip()
                if not ip:
                    continue
                self.iptables(n, "-A", "INPUT", "-s", ip, "-j", "DROP")
                if kind.startswith("partition-"):
                    self.iptables(n, "-A", "OUTPUT", "-d", ip, "-j", "DROP")

            def heal():
                for chain in ("INPUT", "OUTPUT"):
                    self.iptables(n, "-F", chain)
            return heal
        if kind == "restart-all":
            how = fault["how"]
            fault["target"] = "all"
            if how == "kill":
                sh("docker", "kill", "-s", "KILL", *[n.name for n in self.nodes])
            else:
                sh("docker", "stop", "-t", "20", *[n.name for n in self.nodes], timeout=90)
            return lambda: sh("docker", "start", *[n.name for n in self.nodes])
        if kind == "clock":
            n = rng.choice(self.nodes)
            fault["target"] = n.name
            offset = self.dir / f"clock-{n.ordinal}" / "offset"
            offset.write_text(f"{fault['offset_ms']}\n")
            sh("docker", "kill", "-s", "KILL", n.name)
            sh("docker", "start", n.name)
            return lambda: offset.write_text("0\n")
        if kind == "disk-full":
            n = rng.choice([n for n in self.nodes if n.name != avoid])
            fault["target"] = n.name
            filler = self.fill(n)

            def heal():
                filler.unlink()
                self.restart_if_it_exits(n, fault)
            return heal
        raise ValueError(kind)

    def logs(self, n, lines=200):
        r = sh("docker", "logs", "--tail", str(lines), n.name, check=False)
        return r.stdout + r.stderr


def schedule(rng, duration, kinds=KINDS):
    """Faults one at a time: start offset, kind (one of `kinds`), how long
    it is held and the quiet gap after its heal, drawn from the run's seed."""
    out, t = [], 1.5 + rng.random()
    while t < duration - 3:
        kind = rng.choice(kinds)
        hold = 0.0 if kind == "restart-all" else round(rng.uniform(1.0, 4.0), 2)
        f = {"kind": kind, "at": round(t, 2), "hold": hold}
        if kind == "restart-all":
            f["how"] = rng.choice(["kill", "term"])
        if kind == "clock":
            f["offset_ms"] = rng.choice([-1, 1]) * rng.randint(1_000, 300_000)
        seconds = [k for k in kinds if k in OVERLAPPING]
        if kind in OVERLAPPING and seconds and rng.random() < OVERLAP_SHARE:
            after = round(rng.uniform(0.0, hold / 2), 2)
            f["second"] = {"kind": rng.choice(seconds), "after": after,
                           "hold": round(rng.uniform(0.5, hold - after), 2)}
        out.append(f)
        t += hold + rng.uniform(1.0, 3.0) + (5.0 if kind in ("restart-all", "clock") else 0.0)
    return out


# ----------------------------------------------------------------- clients


class Worker(threading.Thread):
    """One client: picks a node at random for each call; remembers the
    leases it holds and the attempts it owns, as a real caller would."""

    def __init__(self, i, nem, run, history, stop):
        super().__init__(daemon=True)
        self.p = f"w{i}"
        self.nem = nem
        self.pb = nem.pb
        self.run_ = run
        self.rng = random.Random(run["seed"] * 1000 + i)
        self.history = history
        self.stop = stop
        self.held = {}  # lease name -> token
        self.owned = {}  # idempotency key -> attempt
        self.sems = {}  # semaphore name -> token
        self.refreshed = {}
        self.last_status = "ok"

    def call(self, f, key, args, fn):
        node = self.rng.choice(self.nem.nodes)
        try:
            ch = node.channel()
        except ConnectionError:
            return None  # nothing was sent
        o = {"p": self.p, "f": f, "key": key, "args": args, "t0": time.monotonic(), "t1": None,
             "status": "unknown", "code": None, "out": None, "node": node.name}
        try:
            out = fn(ch)
            o["t1"] = time.monotonic()
            o["status"], o["out"] = "ok", out
        except grpc.RpcError as e:
            o["code"] = e.code().name
            o["detail"] = e.details()
            if e.code() == grpc.StatusCode.UNAVAILABLE and unsent(e.details()):
                # No connection: the request never left this process.
                o["status"] = "unsent"
            elif e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                o["t1"] = time.monotonic()
                o["status"] = "fail"
            elif o["code"] not in UNKNOWN_CODES and not timed_out(o["code"], o["detail"]):
                o["t1"] = time.monotonic()
                o["status"] = "error"
            now = time.monotonic()
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and now - self.refreshed.get(node.name, 0) > 1.0:
                self.refreshed[node.name] = now
                try:
                    node.channel(refresh=True)  # a restarted container may have a new address
                except ConnectionError:
                    pass
        self.history.append(o)
        self.last_status = o["status"]
        return o

    def lease_op(self):
        ls, ls_grpc = self.pb.ls, self.pb.ls_grpc
        name = self.rng.choice(self.run_["names"])

        def lease_out(lease, acquired=None):
            d = {"holder": lease.holder, "token": lease.fencing_token}
            if acquired is not None:
                d["acquired"] = acquired
            return d

        if name in self.held and self.rng.random() < 0.8:
            token = self.held[name]
            if self.rng.random() < 0.5:
                o = self.call("renew", name, {"holder": self.p, "token": token}, lambda ch: lease_out(
                    ls_grpc.LeasesStub(ch).Renew(ls.RenewRequest(name=name, holder=self.p, fencing_token=token, ttl_ms=TTL_MS), timeout=CALL_S).lease))
                if o and o["status"] == "fail":
                    self.held.pop(name, None)
            else:
                o = self.call("release", name, {"holder": self.p, "token": token}, lambda ch: lease_out(
                    ls_grpc.LeasesStub(ch).Release(ls.ReleaseRequest(name=name, holder=self.p, fencing_token=token), timeout=CALL_S).lease))
                if o and o["status"] in ("ok", "fail"):
                    self.held.pop(name, None)
        elif self.rng.random() < 0.7:
            def acquire(ch):
                r = ls_grpc.LeasesStub(ch).Acquire(ls.AcquireRequest(name=name, holder=self.p, ttl_ms=TTL_MS), timeout=CALL_S)
                return lease_out(r.lease, r.acquired)
            o = self.call("acquire", name, {"holder": self.p}, acquire)
            if o and o["status"] == "ok":
                if o["out"]["acquired"]:
                    self.held[name] = o["out"]["token"]
                else:
                    self.held.pop(name, None)
        else:
            def get(ch):
                r = ls_grpc.LeasesStub(ch).Get(ls.GetLeaseRequest(name=name), timeout=CALL_S)
                return lease_out(r.lease) if r.HasField("lease") else {"holder": None, "token": None}
            self.call("get_lease", name, {}, get)

    def sem_op(self):
        sem, sem_grpc = self.pb.sem, self.pb.sem_grpc
        name = self.rng.choice(self.run_["sem_names"])
        if name in self.sems and self.rng.random() < 0.8:
            token = self.sems[name]
            if self.rng.random() < 0.3:
                o = self.call("sem_renew", name, {"holder": self.p, "token": token}, lambda ch: (
                    sem_grpc.SemaphoresStub(ch).Renew(sem.SemaphoreRenewRequest(
                        name=name, holder=self.p, fencing_token=token, ttl_ms=TTL_MS), timeout=CALL_S), {})[1])
                if o and o["status"] == "fail":
                    self.sems.pop(name, None)
            else:
                o = self.call("sem_release", name, {"holder": self.p, "token": token}, lambda ch: (
                    sem_grpc.SemaphoresStub(ch).Release(sem.SemaphoreReleaseRequest(
                        name=name, holder=self.p, fencing_token=token), timeout=CALL_S), {})[1])
                if o and o["status"] in ("ok", "fail"):
                    self.sems.pop(name, None)
            return
        permits = self.rng.randint(1, SEM_LIMIT)

        def acquire(ch):
            r = sem_grpc.SemaphoresStub(ch).Acquire(sem.SemaphoreAcquireRequest(
                name=name, holder=self.p, limit=SEM_LIMIT, permits=permits, ttl_ms=TTL_MS), timeout=CALL_S)
            return {"granted": r.granted, "held": r.held,
                    "token": r.permit.fencing_token if r.granted else None,
                    "permits": r.permit.permits if r.granted else 0}
        o = self.call("sem_acquire", name, {"holder": self.p, "limit": SEM_LIMIT, "permits": permits}, acquire)
        if o and o["status"] == "ok" and o["out"]["granted"]:
            self.sems[name] = o["out"]["token"]

    def idem_op(self):
        idem, idem_grpc = self.pb.idem, self.pb.idem_grpc
        # Keys roll on (about two new ones a second, eight in play), so
        # records keep starting rather than all ending COMPLETED early on.
        first = int((time.monotonic() - self.run_["t_start"]) * 2)
        key = f"{self.run_['key_prefix']}{self.rng.randint(first, first + 7)}"
        if key not in self.owned and self.owned and self.rng.random() < 0.5:
            key = self.rng.choice(sorted(self.owned))
        if key in self.owned and self.rng.random() < 0.9:
            attempt = self.owned.pop(key)
            if self.rng.random() < 0.7:
                response = f"{self.p}:{attempt}"
                self.call("complete", key, {"attempt": attempt, "response": response}, lambda ch: (
                    idem_grpc.IdempotencyStub(ch).Complete(idem.CompleteRequest(key=key, attempt=attempt, response=response.encode()), timeout=CALL_S), {})[1])
            else:
                self.call("abort", key, {"attempt": attempt}, lambda ch: (
                    idem_grpc.IdempotencyStub(ch).Abort(idem.AbortRequest(key=key, attempt=attempt), timeout=CALL_S), {})[1])
        elif self.rng.random() < 0.8:
            def begin(ch):
                r = idem_grpc.IdempotencyStub(ch).Begin(idem.BeginRequest(key=key, fingerprint=b"fp", lock_ttl_ms=TTL_MS, retention_ms=TTL_MS), timeout=CALL_S)
                return {"outcome": idem.Outcome.Name(r.outcome), "attempt": r.attempt,
                        "response": r.response.decode() if r.outcome == idem.COMPLETED else None}
            o = self.call("begin", key, {}, begin)
            if o and o["status"] == "ok":
                out = o["out"]
                # A caller retrying after a lost answer finds its own attempt
                # in progress and goes on with it: some callers do the same.
                if out["outcome"] == "STARTED" or (out["outcome"] == "IN_PROGRESS" and self.rng.random() < 0.3):
                    self.owned[key] = out["attempt"]
        else:
            self.call("get_record", key, {}, lambda ch: record_out(
                idem, idem_grpc.IdempotencyStub(ch).Get(idem.GetRecordRequest(key=key), timeout=CALL_S)))

    def check_op(self):
        rl, rl_grpc = self.pb.rl, self.pb.rl_grpc
        key = self.rng.choice(self.run_["limit_keys"])
        limit = rl.Limit(token_bucket=rl.TokenBucket(capacity=CAPACITY, refill_tokens=PER_S, refill_interval_ms=1000))
        others = [k for k in self.run_["limit_keys"] if k != key]
        if others and self.rng.random() < 0.3:
            # All or nothing with another key (with spread slots, often of
            # another owner: reserved and confirmed at each). Recorded as one
            # check per key, with the call's times and status.
            other = self.rng.choice(others)
            req = rl.CheckRequest(all_or_nothing=True, checks=[
                rl.LimitCheck(key=key, limit=limit, cost=1), rl.LimitCheck(key=other, limit=limit, cost=1)])

            def both(ch):
                rs = rl_grpc.RateLimiterStub(ch).Check(req, timeout=CALL_S).results
                return {"allowed": rs[0].allowed, "with": {other: rs[1].allowed}}
            o = self.call("check", key, {"cost": 1, "with": other}, both)
            if o is not None:
                out = None if o["out"] is None else {"allowed": o["out"]["with"][other]}
                self.history.append(dict(o, key=other, out=out, args={"cost": 1, "with": key}))
            return
        req = rl.CheckRequest(checks=[rl.LimitCheck(key=key, limit=limit, cost=1)])
        self.call("check", key, {"cost": 1}, lambda ch: {
            "allowed": rl_grpc.RateLimiterStub(ch).Check(req, timeout=CALL_S).results[0].allowed})

    def run(self):
        deadline = time.monotonic() + self.run_["duration"] + 120  # bounded even if never stopped
        while not self.stop.is_set() and time.monotonic() < deadline:
            r = self.rng.random()
            if r < 0.35:
                self.lease_op()
            elif r < 0.65:
                self.idem_op()
            elif r < 0.85:
                self.check_op()
            else:
                self.sem_op()
            # Pacing, not synchronisation; after a call that failed on a
            # fault, a pause as a real client's backoff would make.
            failed = self.last_status in ("unknown", "unsent")
            pause = self.rng.uniform(0.05, 0.25) if failed else self.rng.uniform(0, 0.01)
            time.sleep(pause)


def unsent(details):
    """Whether gRPC's UNAVAILABLE details say no connection was made (so the
    call was never sent), as opposed to one lost or refused by a server."""
    d = (details or "").lower()
    return "failed to connect" in d or "connection refused" in d


def record_out(idem, r):
    if not r.HasField("record"):
        return {"state": None, "attempt": None, "response": None}
    rec = r.record
    state = idem.Record.State.Name(rec.state)
    return {"state": state, "attempt": rec.attempt,
            "response": rec.response.decode() if state == "COMPLETED" else None}


class History:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = []

    def append(self, o):
        with self.lock:
            self.ops.append(o)


# -------------------------------------------------------------------- runs


def final_reads(nem, run, history):
    """Every name and key read once after the final restart (retried until
    a node answers, within a minute); recorded in the history too."""
    pb = nem.pb
    final = {}
    reads = [("lease", n) for n in run["names"]] + [("record", k) for k in run["keys"]]
    for what, key in reads:
        deadline = time.monotonic() + 60
        while True:
            node = random.choice(nem.nodes)
            t0 = time.monotonic()
            try:
                if what == "lease":
                    r = pb.ls_grpc.LeasesStub(node.channel()).Get(pb.ls.GetLeaseRequest(name=key), timeout=CALL_S)
                    out = {"holder": r.lease.holder, "token": r.lease.fencing_token} if r.HasField("lease") else {"holder": None, "token": None}
                    f = "get_lease"
                else:
                    out = record_out(pb.idem, pb.idem_grpc.IdempotencyStub(node.channel()).Get(pb.idem.GetRecordRequest(key=key), timeout=CALL_S))
                    f = "get_record"
                history.append({"p": "final", "f": f, "key": key, "args": {}, "t0": t0, "t1": time.monotonic(),
                                "status": "ok", "code": None, "out": out, "node": node.name})
                final[(what, key)] = out
                break
            except (grpc.RpcError, ConnectionError) as e:
                if time.monotonic() > deadline:
                    raise AssertionError(f"final read of {what} {key}: no answer within 60 s ({e})") from e
                try:
                    node.channel(refresh=True)
                except ConnectionError:
                    pass
                time.sleep(0.2)
    return final


def watch_leaders(nem, stop, observations, every_s=0.05):
    """Polls every node's Status until `stop`, recording (t, node, term,
    state, slot map version): the decider changes the rate-limit check
    allows for. One
    thread per node, so a paused or cut-off node delays only its own."""
    def poll(n):
        while not stop.is_set():
            try:
                st = n.status(timeout=0.3)
                observations.append((time.monotonic(), n.name, st.term, st.state, st.slot_map_version))
            except Exception:  # noqa: BLE001 - a node down or cut off says nothing
                pass
            stop.wait(every_s)  # the polling period, not synchronisation
    threads = [threading.Thread(target=poll, args=(n,), daemon=True) for n in nem.nodes]
    for t in threads:
        t.start()
    return threads


def one_run(nem, seed, duration, kinds=KINDS):
    rng = random.Random(seed)
    run = {"seed": seed, "duration": duration,
           "names": [f"s{seed}-lease-{i}" for i in range(3)],
           "key_prefix": f"s{seed}-idem-", "keys": [],
           "limit_keys": [f"s{seed}-limit-{i}" for i in range(2)],
           "sem_names": [f"s{seed}-sem-{i}" for i in range(2)],
           "capacity": CAPACITY, "per_s": PER_S}
    plan = schedule(rng, duration, kinds)
    faults = []
    history = History()
    stop = threading.Event()
    workers = [Worker(i, nem, run, history, stop) for i in range(WORKERS)]
    observations = run["leaders"] = []
    pollers = watch_leaders(nem, stop, observations)
    start = run["t_start"] = time.monotonic()
    for w in workers:
        w.start()
    problems = []
    try:
        for planned in plan:
            fault = dict(planned)
            wait = start + fault["at"] - time.monotonic()
            if wait > 0:
                stop.wait(wait)  # the schedule's clock, not synchronisation
            fault["t_inject"] = time.monotonic()
            faults.append(fault)
            try:
                heal = nem.inject(fault, rng)
                # The fault took effect somewhere between t_inject and
                # t_injected (finding the leader and the commands that
                # inject it take time), and its heal between t_healing and
                # t_heal: the checker's spans cover both ends.
                fault["t_injected"] = time.monotonic()
                second = fault.get("second")
                if second:
                    second = dict(second, overlaps=fault["kind"])
                    stop.wait(second["after"])
                    second["t_inject"] = time.monotonic()
                    faults.append(second)
                    heal_second = nem.inject(second, rng, avoid=fault["target"])
                    second["t_injected"] = time.monotonic()
                    stop.wait(second["hold"])
                    second["t_healing"] = time.monotonic()
                    heal_second()
                    second["t_heal"] = time.monotonic()
                    log(f"  {second['kind']} on {second.get('target')} for "
                        f"{second['t_heal'] - second['t_inject']:.1f} s, overlapping")
                stop.wait(max(0.0, fault["t_injected"] + fault["hold"] - time.monotonic()))
                fault["t_healing"] = time.monotonic()
                heal()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                # A fault the harness could not inject or heal (say, a node
                # that will not start again) is a finding, not a crash.
                problems.append(f"{fault['kind']} on {fault.get('target')}: {e}")
                nem.heal_all()
            fault["t_heal"] = time.monotonic()
            log(f"  {fault['kind']} on {fault.get('target')} for {fault['t_heal'] - fault['t_inject']:.1f} s")
        remaining = start + duration - time.monotonic()
        if remaining > 0:
            stop.wait(remaining)
    finally:
        nem.heal_all()
        stop.set()
        for w in workers + pollers:
            w.join(timeout=30)
    if any(w.is_alive() for w in workers):
        problems.append("client threads did not stop")
    # The final heal and full restart; then every name and key is read.
    try:
        eventually("the cluster to recover after the last fault", nem.cluster.formed, 90)
    except AssertionError as e:
        problems.append(str(e))
    run["keys"] = sorted({o["key"] for o in history.ops if o["f"] in nc.IDEM_OPS})
    restart = {"kind": "restart-all", "how": "kill", "final": True, "t_inject": time.monotonic()}
    nem.inject(restart, rng)()
    restart["t_heal"] = time.monotonic()
    faults.append(restart)
    final = {}
    try:
        eventually("the cluster to form after the full restart", nem.cluster.formed, 90)
        final = final_reads(nem, run, history)
    except AssertionError as e:
        problems.append(str(e))
    return run, faults, history.ops, final, problems


def evaluate(run, faults, ops, final, problems, budget):
    t = time.monotonic()
    errors = [o for o in ops if o["status"] == "error"]
    # An unexpected error fails the run (below); to the models it is a call
    # that may or may not have taken effect.
    ops = [{**o, "status": "unknown", "t1": None} if o["status"] == "error" else o
           for o in ops if o["status"] != "unsent"]
    result = nc.check(ops, faults, final, run["capacity"], run["per_s"], budget,
                      observations=[tuple(o) for o in run.get("leaders", [])])
    result["violations"] += (problems + nc.outcome_problems(errors, ops, nc.majority_lost(faults))
                             + [f"search exhausted (raise --budget): {i}" for i in result["inconclusive"]])
    result["check_s"] = time.monotonic() - t
    return result


def save(run, faults, ops, final, nem=None):
    out = ROOT / "target" / "nemesis" / f"run-{run['seed']}"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"run": run, "faults": faults, "final": [[k[0], k[1], v] for k, v in final.items()], "history": ops}
    (out / "history.json").write_text(json.dumps(doc))
    if nem:
        for n in nem.nodes:
            (out / f"{n.name}.log").write_text(nem.logs(n, 2000))
    return out


def load_saved(path):
    doc = json.loads(pathlib.Path(path).read_text())
    final = {(w, k): v for w, k, v in doc["final"]}
    return doc["run"], doc["faults"], doc["history"], final


def summary_line(runs, faults, writes, lost, violations):
    return f"nemesis: {runs} runs, {faults} faults, {writes} acknowledged writes, {lost} lost, {violations} violations"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=int(os.environ.get("RUNS", "3")))
    ap.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", "20")),
                    help="seconds of traffic and faults per run (default 20)")
    ap.add_argument("--seed", type=int, default=int(os.environ["SEED"]) if os.environ.get("SEED") else None,
                    help="first run's seed (run k uses seed + k); default random")
    ap.add_argument("--faults", default=os.environ.get("FAULTS", ""),
                    help="only these fault kinds, comma-separated (default: all of them)")
    ap.add_argument("--budget", type=int, default=2_000_000, help="linearizability search steps per object")
    ap.add_argument("--check", metavar="FILE", help="check a saved history.json again, without a cluster")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    ap.add_argument("--save", action="store_true", help="save every run's history, not only failing ones")
    args = ap.parse_args()

    if args.check:
        run, faults, ops, final = load_saved(args.check)
        r = evaluate(run, faults, ops, final, [], args.budget)
        for v in r["violations"] + r["lost"] + r["inconclusive"]:
            print(f"  {v}")
        print(summary_line(1, len(faults), r["writes"], len(r["lost"]), len(r["violations"])))
        return 0 if not r["violations"] and not r["lost"] else 1

    kinds = [k for k in args.faults.split(",") if k] or KINDS
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        print(f"nemesis: no such fault kind: {', '.join(unknown)} (kinds: {', '.join(KINDS)})", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("nemesis: needs root (tmpfs data volumes, iptables in the containers' namespaces)", file=sys.stderr)
        return 2
    base = args.seed if args.seed is not None else random.randrange(1, 1_000_000)
    pb = compile_stubs()
    workdir = tempfile.mkdtemp(prefix="arbiter-nemesis-")
    nem = Nemesis(pb, workdir)
    totals = collections.Counter()
    mix = collections.Counter()
    t_all = time.monotonic()
    log(f"nemesis: {args.runs} runs of {args.duration:.0f} s from seed {base}, cluster {PROJECT}")
    try:
        nem.up()
        for k in range(args.runs):
            seed = base + k
            t = time.monotonic()
            log(f"run {k + 1}/{args.runs} (seed {seed})")
            run, faults, ops, final, problems = one_run(nem, seed, args.duration, kinds)
            r = evaluate(run, faults, ops, final, problems, args.budget)
            by = collections.Counter(o["status"] for o in ops)
            totals.update(runs=1, faults=len(faults), writes=r["writes"], lost=len(r["lost"]),
                          violations=len(r["violations"]), inconclusive=len(r["inconclusive"]), ops=len(ops),
                          unknown=by["unknown"])
            mix.update(f["kind"] + ("(final)" if f.get("final") else "(second)" if f.get("overlaps") else "")
                       for f in faults)
            log(f"run {k + 1}: {len(ops)} calls ({by['ok']} ok, {by['fail']} refused, {by['unknown']} unknown), "
                f"{len(faults)} faults, {r['changes']} leader changes, {r['moves']} slot moves "
                f"({r['over_without_moves']} limits over without them), {r['writes']} acknowledged writes, {len(r['lost'])} lost, "
                f"{len(r['violations'])} violations, {len(r['inconclusive'])} inconclusive; "
                f"checked in {r['check_s']:.1f} s; run took {time.monotonic() - t:.0f} s")
            for v in (r["violations"] + r["lost"] + r["inconclusive"])[:10]:
                log(f"  {v}")
            if r["violations"] or r["lost"] or r["inconclusive"] or args.save:
                log(f"  history and schedule saved in {save(run, faults, ops, final, nem)}")
    finally:
        if args.keep:
            log(f"cluster left running (project {PROJECT}, data under {workdir})")
        else:
            nem.down()
    wall = time.monotonic() - t_all
    log("fault mix: " + ", ".join(f"{k} {v}" for k, v in sorted(mix.items())))
    log(f"{totals['ops']} calls, {totals['unknown']} unknown, {totals['inconclusive']} objects inconclusive; "
        f"wall time {wall / 60:.1f} min")
    print(summary_line(totals["runs"], totals["faults"], totals["writes"], totals["lost"], totals["violations"]), flush=True)
    return 0 if totals["runs"] == args.runs and not totals["lost"] and not totals["violations"] else 1


if __name__ == "__main__":
    sys.exit(main())
