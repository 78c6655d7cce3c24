"""Fault tests against a 3-node Arbiter cluster in containers (cluster/compose.yml).

Run through cluster/e2e.sh, which builds the image and installs grpcio. Each
scenario prints PASS or FAIL with what it measured; the exit status is 0 only
if every scenario passed. Every wait has a deadline and every load loop a
bound, so a hung cluster fails the run rather than stalling it.

Scenarios:
  image      the containers run as uid 10001, not root, on a read-only root
             filesystem, and found their peers by DNS name
  kill       docker kill of the leader: a new leader serves within 3 s, no
             acknowledged lease or idempotency record is lost, fencing tokens
             never go backwards; the killed node restarts and catches up
  partition  the leader is cut off the network: it answers UNAVAILABLE to
             lease grants and renewals, Begin and rate-limit checks, and
             reports not ready, while the other two elect a leader and keep
             serving; after healing all three converge
  rolling    each node in turn (2, 1, 0) gets SIGTERM and is started again
             under a steady client load: every acknowledged write survives,
             no call fails except with retryable UNAVAILABLE, and every node
             exits 0 within the grace period
  scale      two more members started as a 5-replica StatefulSet would start
             them, added with `arbiter cluster add`, used, and removed
  emptydisk  node 1 (the lowest id, which forms new clusters) loses its
             volume: restarted empty it exits with an error instead of
             rejoining as a voter or forming a second cluster; the documented
             recovery (cluster remove, start, cluster add) brings it back
  secure     a second cluster with TLS, client certificates, the auth file
             and peer mutual TLS (certificates made at run time): it forms
             over mTLS, a principal is served in its namespace through a
             follower and refused outside it, unknown callers and plaintext
             are refused, the peer port refuses a non-member, and after the
             leader is killed the survivors elect a new one and keep the
             principal's lease
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from arbiter_pb import compile_stubs  # noqa: E402

PREFIX = os.environ.get("ARBITER_CLUSTER", "arbiter-e2e")
NETWORK = f"{PREFIX}_net"
REPLICAS = 3
GRACE_S = 20  # compose.yml's stop_grace_period
CALL_TIMEOUT_S = 8.0  # > the server's 3 s leader wait, so its UNAVAILABLE comes first
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
TTL_MS = 600_000  # leases outlive the run: anything missing was lost, not expired


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*args, check=True, timeout=120):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def compose(*args, timeout=180, project=PREFIX, overlays=(), env=None):
    cmd = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    files = ["-f", str(ROOT / "cluster" / "compose.yml")]
    for o in overlays:
        files += ["-f", str(ROOT / "cluster" / o)]
    r = subprocess.run([*cmd, "-p", project, *files, *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"compose {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def eventually(what, fn, timeout_s, interval_s=0.1):
    """Polls fn until it returns a truthy value; raises after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last error: {last})")


class Node:
    """One container, reached from the host at its address on the private
    network (looked up again whenever the container restarts)."""

    def __init__(self, pb, ordinal, prefix=PREFIX, creds=None):
        self.pb = pb
        self.ordinal = ordinal
        self.id = ordinal + 1
        self.name = f"{prefix}-{ordinal}"
        self.network = f"{prefix}_net"
        # With TLS: channel credentials (the server certificate names localhost).
        self.creds = creds
        self._lock = threading.Lock()
        self._ip = None
        self._channel = None

    def ip(self):
        r = sh("docker", "inspect", "-f", f'{{{{with index .NetworkSettings.Networks "{self.network}"}}}}{{{{.IPAddress}}}}{{{{end}}}}', self.name, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    def channel(self, refresh=False):
        with self._lock:
            if refresh or self._channel is None:
                ip = self.ip()
                if not ip:
                    raise ConnectionError(f"{self.name} has no address on {self.network}")
                if ip != self._ip or self._channel is None:
                    # Not closed: other threads may be mid-call on it.
                    self._ip = ip
                    # HTTP/2 keepalive: a connection to a killed container
                    # gets no reset, so only a missed ping reveals it (the
                    # call then fails UNAVAILABLE instead of hanging).
                    if self.creds is None:
                        self._channel = grpc.insecure_channel(f"{ip}:7070", options=KEEPALIVE)
                    else:
                        self._channel = grpc.secure_channel(
                            f"{ip}:7070", self.creds,
                            options=KEEPALIVE + [("grpc.ssl_target_name_override", "localhost")])
            return self._channel

    def reachable(self, timeout_s=1.0):
        """Whether a connection to the node is up (or comes up within
        timeout_s): a killed container's address answers nothing at all, so
        a call to it would hang until its deadline rather than fail."""
        try:
            grpc.channel_ready_future(self.channel()).result(timeout=timeout_s)
            return True
        except (grpc.FutureTimeoutError, ConnectionError):
            return False

    def leases(self):
        return self.pb.ls_grpc.LeasesStub(self.channel())

    def idem(self):
        return self.pb.idem_grpc.IdempotencyStub(self.channel())

    def limits(self):
        return self.pb.rl_grpc.RateLimiterStub(self.channel())

    def status(self, timeout=2.0):
        return self.pb.cl_grpc.ClusterStub(self.channel()).Status(self.pb.cl.ClusterStatusRequest(), timeout=timeout)

    def cli(self, *args, timeout=30):
        """The arbiter CLI inside the container, against its own port: works
        even while the container is cut off the network."""
        return sh("docker", "exec", self.name, "arbiter", *args, check=False, timeout=timeout)


class Cluster:
    def __init__(self, pb, prefix=PREFIX, creds=None):
        self.pb = pb
        self.nodes = [Node(pb, i, prefix, creds) for i in range(REPLICAS)]

    def node(self, node_id):
        return self.nodes[node_id - 1]

    def agreed_leader(self, nodes=None):
        """The leader id when every given node (default all) names the same one."""
        nodes = nodes or self.nodes
        leaders = set()
        for n in nodes:
            st = n.status()
            leaders.add(st.leader_id if st.HasField("leader_id") else None)
        if len(leaders) == 1 and None not in leaders:
            return leaders.pop()
        return None

    def wait_leader(self, nodes=None, timeout_s=30):
        return eventually("an agreed leader", lambda: self.agreed_leader(nodes), timeout_s)

    def formed(self):
        """Every node names the same leader and lists every member as a voter."""
        st = [n.status() for n in self.nodes]
        return self.agreed_leader() and all(sum(m.voter for m in s.members) == REPLICAS for s in st)

    def converged(self):
        """Every node names the same leader and has applied the same index."""
        st = [n.status() for n in self.nodes]
        leaders = {s.leader_id if s.HasField("leader_id") else None for s in st}
        applied = {s.applied_index for s in st}
        return len(leaders) == 1 and None not in leaders and len(applied) == 1


class Ledger:
    """What the cluster acknowledged, to be checked after the faults."""

    def __init__(self):
        self.lock = threading.Lock()
        self.leases = {}  # name -> (holder, fencing token)
        self.records = {}  # key -> response bytes
        self.tokens = []  # fencing tokens in the order one client saw them acknowledged

    def lease(self, name, holder, token):
        with self.lock:
            self.leases[name] = (holder, token)

    def record(self, key, response):
        with self.lock:
            self.records[key] = response


def code_of(e):
    return e.code() if isinstance(e, grpc.RpcError) else None


class Client:
    """A client the way a user should write one: try a node it can connect
    to (with a 1 s connect timeout), and on UNAVAILABLE try the next. Counts
    UNAVAILABLE answers and unreachable nodes; any other error, including a
    call that hits its deadline, is a failure."""

    def __init__(self, cluster, ledger, start=0, name="client", nodes=None):
        self.cluster = cluster
        self.nodes = nodes or cluster.nodes
        self.pb = cluster.pb
        self.ledger = ledger
        self.next = start
        self.name = name
        self.unavailable = 0
        self.unreachable = 0
        self.skip_until = {}  # node ordinal -> time before which it is not tried
        self.failures = []
        self.ops = 0

    def call(self, fn, attempts=40, deadline_s=40):
        end = time.monotonic() + deadline_s
        tries = 0
        while tries < attempts and time.monotonic() < end:
            node = self.nodes[self.next % len(self.nodes)]
            self.next += 1
            if self.skip_until.get(node.ordinal, 0) > time.monotonic():
                time.sleep(0.02)
                continue
            tries += 1
            if not node.reachable():
                self.unreachable += 1
                self.skip_until[node.ordinal] = time.monotonic() + 2.0
                try:
                    node.channel(refresh=True)  # a restarted container may have a new address
                except ConnectionError:
                    pass
                continue
            try:
                return fn(node)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.unavailable += 1
                try:
                    node.channel(refresh=True)  # a restarted container may have a new address
                except ConnectionError:
                    pass
            except ConnectionError:
                self.unavailable += 1
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no node answered within {deadline_s} s")

    def acquire(self, name, holder="e2e"):
        ls = self.pb.ls
        invoked = time.monotonic()
        r = self.call(lambda n: n.leases().Acquire(ls.AcquireRequest(name=name, holder=holder, ttl_ms=TTL_MS), timeout=CALL_TIMEOUT_S))
        acked = time.monotonic()
        assert r.acquired, f"{name}: not acquired: {r}"
        self.ledger.lease(name, holder, r.lease.fencing_token)
        with self.ledger.lock:
            self.ledger.tokens.append((self.name, r.lease.fencing_token, invoked, acked))
        return r.lease

    def record(self, key):
        idem = self.pb.idem
        b = self.call(lambda n: n.idem().Begin(idem.BeginRequest(key=key, fingerprint=b"fp", lock_ttl_ms=60_000, retention_ms=TTL_MS), timeout=CALL_TIMEOUT_S))
        # The key is this call's own, so a retried Begin whose first try was
        # applied (its answer lost) finds that try's attempt IN_PROGRESS: it
        # is ours to complete. Any other outcome is wrong.
        assert b.outcome in (idem.STARTED, idem.IN_PROGRESS), f"{key}: Begin answered {b}"
        assert b.attempt > 0, f"{key}: Begin answered no attempt: {b}"
        response = f"done:{key}".encode()

        def complete(n):
            try:
                n.idem().Complete(idem.CompleteRequest(key=key, attempt=b.attempt, response=response), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                # A retried Complete whose first try was applied: check it was.
                got = n.idem().Get(idem.GetRecordRequest(key=key), timeout=CALL_TIMEOUT_S)
                if not (got.HasField("record") and got.record.response == response):
                    raise

        self.call(complete)
        self.ledger.record(key, response)
        return True

    def check(self, key):
        """One unit of a bucket far larger than one client's rate (1000
        per second, refilled as fast): every check is allowed, and leaves
        less than the capacity (a failover may forget consumption, never
        invent it)."""
        rl = self.pb.rl
        limit = rl.Limit(token_bucket=rl.TokenBucket(capacity=1000, refill_tokens=1000, refill_interval_ms=1000))
        check = rl.LimitCheck(key=key, limit=limit, cost=1)
        r = self.call(lambda n: n.limits().Check(rl.CheckRequest(checks=[check]), timeout=CALL_TIMEOUT_S))
        assert len(r.results) == 1, f"{key}: {len(r.results)} results for one check"
        got = r.results[0]
        assert got.allowed and got.remaining <= 999 and got.limit == 1000, f"{key}: {got}"
        return r


def verify_ledger(cluster, ledger, via):
    """Every acknowledged lease and record is there, unchanged, read through `via`."""
    pb = cluster.pb
    client = Client(cluster, Ledger(), start=via.ordinal, name="verify")
    with ledger.lock:
        leases = dict(ledger.leases)
        records = dict(ledger.records)
    missing = []
    for name, (holder, token) in leases.items():
        got = client.call(lambda n: n.leases().Get(pb.ls.GetLeaseRequest(name=name), timeout=CALL_TIMEOUT_S))
        if not got.HasField("lease") or got.lease.holder != holder or got.lease.fencing_token != token:
            missing.append(f"lease {name}: acknowledged ({holder}, {token}), now {got}")
    for key, response in records.items():
        got = client.call(lambda n: n.idem().Get(pb.idem.GetRecordRequest(key=key), timeout=CALL_TIMEOUT_S))
        if not got.HasField("record") or got.record.response != response:
            missing.append(f"record {key}: acknowledged {response!r}, now {got}")
    assert not missing, f"{len(missing)} acknowledged writes lost: {missing[:5]}"
    return len(leases), len(records)


def tokens_monotonic(ledger):
    """Across all clients: no fencing token is granted twice, and a grant
    invoked after another was acknowledged has a larger token (real-time
    order, whichever clients and nodes made them)."""
    with ledger.lock:
        grants = list(ledger.tokens)
    seen = {}
    for client, token, _, _ in grants:
        if token in seen:
            raise AssertionError(f"fencing token {token} granted to {seen[token]} and to {client}")
        seen[token] = client
    by_ack = sorted(grants, key=lambda g: g[3])
    for client, token, invoked, _ in grants:
        for other, earlier, _, acked in by_ack:
            if acked >= invoked:
                break
            if earlier >= token:
                raise AssertionError(
                    f"{client} got token {token}, invoked after {other}'s token {earlier} was acknowledged")


def self_test_checkers():
    """The ledger checks fail on hand-made bad histories, so a pass means
    something."""
    def bad(tokens, why):
        ledger = Ledger()
        ledger.tokens = tokens
        try:
            tokens_monotonic(ledger)
        except AssertionError:
            return
        raise AssertionError(f"tokens_monotonic accepted {why}")

    bad([("a", 5, 0.0, 1.0), ("b", 5, 2.0, 3.0)], "a token granted twice")
    bad([("a", 7, 0.0, 1.0), ("b", 6, 2.0, 3.0)], "a smaller token after an acknowledged larger one, another client")
    ok = Ledger()
    ok.tokens = [("a", 7, 0.0, 2.0), ("b", 6, 1.0, 3.0)]  # overlapping: either order
    tokens_monotonic(ok)


class Load:
    """Steady background writes: `workers` threads, each acquiring leases,
    completing idempotency records and checking a rate limit in turn, until
    stopped or `max_ops` each. Failures other than UNAVAILABLE are recorded."""

    def __init__(self, cluster, ledger, tag, workers=3, max_ops=100_000, pause_s=0.01):
        self.clients = [Client(cluster, ledger, start=i, name=f"{tag}-w{i}") for i in range(workers)]
        self.stop = threading.Event()
        self.tag = tag
        self.max_ops = max_ops
        self.pause_s = pause_s
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.clients]

    def _run(self, c):
        for k in range(self.max_ops):
            if self.stop.is_set():
                return
            try:
                match k % 3:
                    case 0:
                        c.acquire(f"{c.name}-lease-{k}")
                    case 1:
                        c.record(f"{c.name}-idem-{k}")
                    case 2:
                        c.check(f"{c.name}-limit")
                c.ops += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                c.failures.append(f"{type(e).__name__}: {code_of(e) or ''} {e}")
            time.sleep(self.pause_s)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"

    def ops(self):
        return sum(c.ops for c in self.clients)

    def summary(self):
        failures = [f for c in self.clients for f in c.failures]
        retried = sum(c.unavailable + c.unreachable for c in self.clients)
        return self.ops(), retried, failures


# ---------------------------------------------------------------- scenarios


def scenario_image(cluster):
    for n in cluster.nodes:
        user = sh("docker", "inspect", "-f", "{{.Config.User}}", n.name).stdout.strip()
        assert user.startswith("10001"), f"{n.name}: image user {user!r}"
        # The server process as the host kernel sees it.
        pid = sh("docker", "inspect", "-f", "{{.State.Pid}}", n.name).stdout.strip()
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uids) == {"10001"}, f"{n.name}: process runs as uids {uids}"
        ro = sh("docker", "inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", n.name).stdout.strip()
        assert ro == "true", f"{n.name}: root filesystem is writable"
        # Name resolution inside the image (static NSS config, no shell): the
        # node reached its peers by DNS name, so it knows the whole cluster.
        st = n.status()
        assert len(st.members) == REPLICAS and all(".arbiter-peers:" in m.peer_addr for m in st.members), st
    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", os.environ.get("ARBITER_IMAGE", "arbiter:local")).stdout)
    return f"all nodes run as uid 10001 on a read-only root filesystem; peers found by DNS; image {size / 1e6:.1f} MB"


def scenario_kill(cluster, ledger):
    leader_id = cluster.wait_leader()
    leader = cluster.node(leader_id)
    survivors = [n for n in cluster.nodes if n is not leader]
    writer = Client(cluster, ledger, name="kill-writer")
    for k in range(30):
        writer.acquire(f"kill-before-{k}")
        writer.record(f"kill-before-{k}")
    with Load(cluster, ledger, "kill") as load:
        eventually("load running", lambda: load.ops() >= 10, 30)
        log(f"kill: docker kill {leader.name} (leader, node {leader_id})")
        t0 = time.monotonic()
        sh("docker", "kill", leader.name)
        new_id = eventually("a new leader among the survivors", lambda: (lid := cluster.agreed_leader(survivors)) != leader_id and lid, 10)
        # Served: a write through the new leader itself is acknowledged.
        probe = Client(cluster, ledger, start=new_id - 1, name="kill-probe")
        probe.acquire("kill-after")
        failover_s = time.monotonic() - t0
        ops_at = load.ops()
        eventually("load continuing after the failover", lambda: load.ops() >= ops_at + 20, 30)
    ops, unavailable, failures = load.summary()
    assert not failures, f"{len(failures)} calls failed other than UNAVAILABLE: {failures[:3]}"
    assert failover_s < 3.0, f"new leader served after {failover_s:.2f} s (limit 3 s)"
    n_leases, n_records = verify_ledger(cluster, ledger, survivors[0])
    tokens_monotonic(ledger)
    log(f"kill: docker start {leader.name}")
    sh("docker", "start", leader.name)
    target = cluster.node(new_id).status().applied_index
    eventually(f"{leader.name} to rejoin and catch up", lambda: leader.status().HasField("leader_id") and leader.status().applied_index >= target, 60)
    eventually("all three to converge", cluster.converged, 30)
    return (
        f"new leader (node {new_id}) served {failover_s:.2f} s after the kill; {ops} load ops, "
        f"{unavailable} retried (UNAVAILABLE or unreachable); {n_leases} leases and {n_records} records intact; "
        f"tokens monotonic; node {leader_id} rejoined"
    )


def scenario_partition(cluster, ledger):
    pb = cluster.pb
    leader_id = cluster.wait_leader()
    victim = cluster.node(leader_id)
    majority = [n for n in cluster.nodes if n is not victim]
    client = Client(cluster, ledger, name="partition")
    held = client.acquire("partition-held")
    log(f"partition: disconnecting {victim.name} (leader, node {leader_id}) from {NETWORK}")
    sh("docker", "network", "disconnect", NETWORK, victim.name)
    try:
        # The majority elects a leader among itself and keeps serving.
        t0 = time.monotonic()
        new_id = eventually("a leader on the majority side", lambda: (lid := cluster.agreed_leader(majority)) and lid != leader_id and lid, 15)
        side = Client(cluster, ledger, name="partition-majority", nodes=majority)
        side.acquire("partition-majority")
        renewed = side.call(
            lambda n: n.leases().Renew(pb.ls.RenewRequest(name=held.name, holder="e2e", fencing_token=held.fencing_token, ttl_ms=TTL_MS), timeout=CALL_TIMEOUT_S)
        )
        assert renewed.lease.fencing_token == held.fencing_token
        serve_s = time.monotonic() - t0
        # The cut-off node cannot grant or renew: UNAVAILABLE, from inside it.
        grant = victim.cli("lease", "acquire", "partition-minority", "--holder", "m", "--ttl", "60s")
        assert grant.returncode != 0 and "Unavailable" in grant.stderr, f"minority grant: rc={grant.returncode} out={grant.stdout!r} err={grant.stderr!r}"
        renew = victim.cli("lease", "renew", held.name, "--holder", "e2e", "--token", str(held.fencing_token), "--ttl", "60s")
        assert renew.returncode != 0 and "Unavailable" in renew.stderr, f"minority renew: rc={renew.returncode} err={renew.stderr!r}"
        begin = victim.cli("idem", "begin", "partition-minority", "--lock-ttl", "10s")
        assert begin.returncode != 0 and "Unavailable" in begin.stderr, f"minority begin: rc={begin.returncode} err={begin.stderr!r}"
        # Nor decide rate limits: it stops once it has not heard from a
        # majority for an election timeout.
        check = victim.cli("check", "--key", "partition-limit", "--token-bucket", "10:1/s")
        assert check.returncode not in (0, 2) and "Unavailable" in check.stderr, f"minority check: rc={check.returncode} out={check.stdout!r} err={check.stderr!r}"
        ready = victim.cli("health", "--service", "ready")
        assert ready.returncode != 0, f"the cut-off node still reports ready: {ready.stdout!r}"
    finally:
        log(f"partition: reconnecting {victim.name}")
        sh("docker", "network", "connect", "--alias", f"arbiter-{victim.ordinal}.arbiter-peers", NETWORK, victim.name)
    eventually("all three to converge after healing", cluster.converged, 30)
    # Read through the healed node (it forwards to the leader; its first
    # forward may find a connection the cut broke, answered UNAVAILABLE).
    healed = Client(cluster, Ledger(), name="partition-healed", nodes=[victim])
    got = healed.call(lambda n: n.leases().Get(pb.ls.GetLeaseRequest(name="partition-minority"), timeout=CALL_TIMEOUT_S))
    assert not got.HasField("lease"), f"a lease granted by the cut-off node survived: {got}"
    got = healed.call(lambda n: n.leases().Get(pb.ls.GetLeaseRequest(name="partition-majority"), timeout=CALL_TIMEOUT_S))
    assert got.HasField("lease"), "the majority's grant is missing after healing"
    verify_ledger(cluster, ledger, victim)
    tokens_monotonic(ledger)
    return (
        f"majority (new leader node {new_id}) served {serve_s:.2f} s after the cut; the cut-off node "
        f"answered UNAVAILABLE to acquire, renew, begin and check and reported not ready; converged after healing"
    )


def scenario_rolling(cluster, ledger):
    stops = []
    with Load(cluster, ledger, "rolling") as load:
        eventually("load running", lambda: load.ops() >= 10, 30)
        for n in reversed(cluster.nodes):
            log(f"rolling: docker stop {n.name} (SIGTERM, {GRACE_S} s grace)")
            t0 = time.monotonic()
            sh("docker", "stop", "-t", str(GRACE_S), n.name, timeout=GRACE_S + 30)
            took = time.monotonic() - t0
            code = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", n.name).stdout.strip()
            logs = sh("docker", "logs", "--tail", "20", n.name).stderr + sh("docker", "logs", "--tail", "20", n.name).stdout
            stops.append((n.name, took, code))
            assert code == "0", f"{n.name} exited {code} on SIGTERM (137 means it was killed at the deadline)"
            assert took < GRACE_S, f"{n.name} took {took:.1f} s to stop"
            assert "arbiter stopped" in logs, f"{n.name}: no clean-shutdown line in its log"
            sh("docker", "start", n.name)
            # Like a StatefulSet: the next pod is updated once this one is ready.
            eventually(f"{n.name} ready", lambda: n.cli("health", "--service", "ready").returncode == 0, 60, 0.25)
            ops_at = load.ops()
            eventually("load progressing", lambda: load.ops() >= ops_at + 10, 30)
    ops, unavailable, failures = load.summary()
    assert not failures, f"{len(failures)} calls failed other than UNAVAILABLE: {failures[:5]}"
    n_leases, n_records = verify_ledger(cluster, ledger, cluster.nodes[0])
    tokens_monotonic(ledger)
    eventually("all three to converge", cluster.converged, 30)
    slowest = max(s[1] for s in stops)
    return (
        f"{ops} load ops across 3 restarts, {unavailable} retried (UNAVAILABLE or unreachable), 0 other failures; "
        f"{n_leases} leases and {n_records} records intact; every node exited 0, slowest stop {slowest:.1f} s"
    )


def scenario_scale(cluster):
    """The chart README's scaling procedure, on containers: start members
    4 and 5 (pods arbiter-3 and arbiter-4 of a StatefulSet scaled to 5),
    add them with `arbiter cluster add`, use them, then remove them again."""
    pb = cluster.pb
    image = os.environ.get("ARBITER_IMAGE", "arbiter:local")
    extra = [Node(pb, i) for i in (3, 4)]
    first = cluster.nodes[0]

    def voters(node):
        return sorted(m.id for m in node.status().members if m.voter)

    try:
        for n in extra:
            sh("docker", "run", "-d", "--name", n.name, "--hostname", f"arbiter-{n.ordinal}",
               "--network", NETWORK, "--network-alias", f"arbiter-{n.ordinal}.arbiter-peers",
               "--read-only", "--tmpfs", "/tmp", "-v", f"{n.name}-data:/data", image,
               "serve", "--peers-dns", "arbiter-{}.arbiter-peers:7071", "--replicas", "5")
        for n in extra:
            eventually(f"{n.name} to answer", lambda n=n: n.status(), 30)
            assert n.status().node_id == n.id
        # Not members yet: they wait to be added (no cluster of their own).
        assert voters(first) == [1, 2, 3], voters(first)
        for n in extra:
            r = first.cli("cluster", "add", str(n.id), f"arbiter-{n.ordinal}.arbiter-peers:7071", timeout=60)
            assert r.returncode == 0, f"cluster add {n.id}: {r.stderr}"
        eventually("five voters everywhere", lambda: all(voters(n) == [1, 2, 3, 4, 5] for n in cluster.nodes + extra), 30)
        eventually("the new members ready", lambda: all(n.cli("health", "--service", "ready").returncode == 0 for n in extra), 30)
        # A grant through a new member is seen through an old one.
        newcomer = Client(cluster, Ledger(), name="scale", nodes=[extra[1]])
        lease = newcomer.acquire("scale-lease")
        got = first.leases().Get(pb.ls.GetLeaseRequest(name="scale-lease"), timeout=CALL_TIMEOUT_S)
        assert got.lease.fencing_token == lease.fencing_token, got
        # Scale down: remove the highest ordinals first, then stop them.
        for n in reversed(extra):
            r = first.cli("cluster", "remove", str(n.id), timeout=60)
            assert r.returncode == 0, f"cluster remove {n.id}: {r.stderr}"
        eventually("three voters again", lambda: all(voters(n) == [1, 2, 3] for n in cluster.nodes), 30)
    finally:
        for n in extra:
            sh("docker", "rm", "-f", n.name, check=False)
            sh("docker", "volume", "rm", f"{n.name}-data", check=False)
    cluster.wait_leader()
    Client(cluster, Ledger(), name="scale-after").acquire("scale-after")
    return "members 4 and 5 added with `cluster add` (5 voters, served a grant), removed with `cluster remove`; 3 voters serve on"


def scenario_empty_disk(cluster):
    pb = cluster.pb
    n, survivor = cluster.nodes[0], cluster.nodes[1]
    Client(cluster, Ledger(), name="disk-before").acquire("disk-before")
    volume = sh("docker", "inspect", "-f", '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}', n.name).stdout.strip()
    assert volume, f"{n.name} has no /data volume"
    log(f"emptydisk: removing {n.name} and its volume {volume}, then starting it again")
    sh("docker", "rm", "-f", n.name)
    sh("docker", "volume", "rm", volume)
    compose("up", "-d", "--no-deps", "arbiter-0")

    def exited():
        return sh("docker", "inspect", "-f", "{{.State.Running}}", n.name).stdout.strip() == "false"

    eventually(f"{n.name} to refuse and exit", exited, 60, 0.25)
    code = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", n.name).stdout.strip()
    logs = sh("docker", "logs", n.name, check=False)
    text = logs.stdout + logs.stderr
    assert code != "0", f"{n.name} exited 0"
    assert "has an empty data directory" in text and "cluster remove 1" in text, text[-2000:]
    assert "initialising a new cluster" not in text, "node 1 formed a second cluster"
    Client(cluster, Ledger(), name="disk-during", nodes=cluster.nodes[1:]).acquire("disk-during")

    # The recovery the error names.
    r = survivor.cli("cluster", "remove", "1", timeout=60)
    assert r.returncode == 0, f"cluster remove 1: {r.stderr}"
    sh("docker", "start", n.name)
    eventually(f"{n.name} to answer", lambda: n.channel(refresh=True) and n.status(), 30)
    r = survivor.cli("cluster", "add", "1", "arbiter-0.arbiter-peers:7071", timeout=60)
    assert r.returncode == 0, f"cluster add 1: {r.stderr}"
    eventually("three voters again", cluster.formed, 60)
    got = n.leases().Get(pb.ls.GetLeaseRequest(name="disk-during"), timeout=CALL_TIMEOUT_S)
    assert got.lease.holder, got
    return f"{n.name} restarted empty exited {code} naming the recovery; removed and added back, it holds the data again"


def chart_peer_certificates(certs):
    """Renders the helm chart's generated peer Secret for a release named
    arbiter in namespace e2e and writes its files (ca.crt, arbiter-N.crt and
    .key) into `certs`; returns a Pki that signs with the chart's CA."""
    import base64
    import yaml
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    helm = shutil.which("helm") or str(pathlib.Path(sys.executable).parent / "helm")
    out = sh(helm, "template", "arbiter", str(ROOT / "helm" / "arbiter"), "--namespace", "e2e",
             "--set", f"replicas={REPLICAS}", "--show-only", "templates/peer-tls.yaml").stdout
    secret = yaml.safe_load(out)
    for name, value in secret["data"].items():
        path = certs / name
        path.write_bytes(base64.b64decode(value))
        path.chmod(0o644)  # read by uid 10001 in the containers; test-only keys
    ca = Pki.__new__(Pki)
    ca.x509 = x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    ca.ec, ca.oid, ca.dir = ec, NameOID, certs
    ca.cert = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    ca.name = ca.cert.subject
    ca.key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    ca.ca = certs / "ca.crt"
    return ca


class Pki:
    """A CA that issues certificates into a directory the containers mount."""

    def __init__(self, directory, name):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.x509, self.ec, self.oid = x509, ec, NameOID
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._builder(self.name, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(self.key, self._sha256())
        self.ca = self._write(f"{name}-ca.pem", self._pem(self.cert))

    @staticmethod
    def _sha256():
        from cryptography.hazmat.primitives import hashes
        return hashes.SHA256()

    @staticmethod
    def _pem(obj):
        from cryptography.hazmat.primitives import serialization
        if hasattr(obj, "private_bytes"):
            return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return obj.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject, public_key):
        import datetime
        now = datetime.datetime.now(datetime.timezone.utc)
        return (self.x509.CertificateBuilder().subject_name(subject).issuer_name(getattr(self, "name", subject))
                .public_key(public_key).serial_number(self.x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def _write(self, name, data):
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o644)  # read by uid 10001 in the containers; test-only keys
        return path

    def issue(self, cn, file, dns=("localhost",)):
        key = self.ec.generate_private_key(self.ec.SECP256R1())
        subject = self.x509.Name([self.x509.NameAttribute(self.oid.COMMON_NAME, cn)])
        cert = (self._builder(subject, key.public_key())
                .add_extension(self.x509.SubjectAlternativeName([self.x509.DNSName(d) for d in dns]), critical=False)
                .add_extension(self.x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, self._sha256()))
        return self._write(f"{file}.pem", self._pem(cert)), self._write(f"{file}.key", self._pem(key))

    def credentials(self, cert=None, key=None):
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None)


def scenario_secure(pb):
    import tempfile
    project = f"{PREFIX}-secure"
    certs = pathlib.Path(tempfile.mkdtemp(prefix="arbiter-e2e-certs-"))
    certs.chmod(0o755)
    clients = Pki(certs, "clients")
    # The members' peer certificates as the helm chart makes them by
    # default (tls.peer.mode=generate): a CA and one per member.
    peer_ca = chart_peer_certificates(certs)
    clients.issue("arbiter", "server")
    alice = clients.issue("alice", "alice")
    (certs / "auth.yaml").write_text('principals:\n  - name: alice\n    certificate: alice\n    namespaces: ["a/"]\n')
    (certs / "auth.yaml").chmod(0o644)
    env = {"ARBITER_CERTS": str(certs), "ARBITER_CLUSTER": project}
    up = dict(project=project, overlays=["compose.secure.yml"], env=env)
    compose("down", "--volumes", "--timeout", "5", **up)
    compose("up", "-d", **up)
    try:
        cluster = Cluster(pb, prefix=project, creds=clients.credentials(*alice))
        eventually("the secure cluster to form over mutual TLS", cluster.formed, 90)
        leader_id = cluster.agreed_leader()
        follower = next(n for n in cluster.nodes if n.id != leader_id)
        ls = pb.ls
        # Through a follower: forwarded to the leader over mTLS, as alice.
        held = follower.leases().Acquire(ls.AcquireRequest(name="a/lock", holder="pod-a", ttl_ms=TTL_MS), timeout=CALL_TIMEOUT_S)
        assert held.acquired, held
        token = held.lease.fencing_token
        try:
            follower.leases().Acquire(ls.AcquireRequest(name="b/lock", holder="pod-a", ttl_ms=TTL_MS), timeout=CALL_TIMEOUT_S)
            raise AssertionError("alice acquired a lease outside her namespace")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        ip = follower.ip()
        target = [("grpc.ssl_target_name_override", "localhost")]

        def refused(call, what):
            try:
                call()
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), (what, e)
                return
            raise AssertionError(f"{what} was answered")

        # The client CA requires a certificate: refused at the handshake.
        anon = grpc.secure_channel(f"{ip}:7070", clients.credentials(), options=target)
        refused(lambda: pb.ls_grpc.LeasesStub(anon).Get(ls.GetLeaseRequest(name="a/lock"), timeout=5),
                "a caller without a certificate")

        refused(lambda: pb.cl_grpc.ClusterStub(grpc.insecure_channel(f"{ip}:7070")).Status(
            pb.cl.ClusterStatusRequest(), timeout=3), "plaintext to the client port")
        # The peer port: plaintext and a client certificate (another CA)
        # are refused at the handshake; a certificate of the members' own CA
        # that names no member is refused on every call; a member's is
        # answered. Every peer message carries the cluster's id.
        cluster_id = follower.status().cluster_id
        peer_name = f"arbiter-{follower.ordinal}.arbiter-peers.e2e.svc.cluster.local"

        def peer_channel(cert, key):
            return grpc.secure_channel(f"{ip}:7071", grpc.ssl_channel_credentials(
                root_certificates=(certs / "ca.crt").read_bytes(), private_key=key.read_bytes(),
                certificate_chain=cert.read_bytes()), options=[("grpc.ssl_target_name_override", peer_name)])

        def identify(ch):
            return pb.cl_grpc.RaftPeerStub(ch).Identify(
                pb.cl.PeerMessage(json=b"{}"), metadata=[("x-arbiter-cluster", cluster_id)], timeout=3)

        refused(lambda: identify(grpc.insecure_channel(f"{ip}:7071")), "plaintext to the peer port")
        refused(lambda: identify(peer_channel(*alice)), "a client certificate (another CA) on the peer port")
        rogue = peer_ca.issue("rogue", "rogue", dns=["rogue.arbiter-peers.e2e.svc.cluster.local"])
        try:
            identify(peer_channel(*rogue))
            raise AssertionError("a peer-CA certificate naming no member was answered")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
        other = next(n for n in cluster.nodes if n is not follower)
        identify(peer_channel(certs / f"arbiter-{other.ordinal}.crt", certs / f"arbiter-{other.ordinal}.key"))
        # Failover over mTLS: the survivors elect a leader and keep alice's lease.
        leader = cluster.node(leader_id)
        survivors = [n for n in cluster.nodes if n is not leader]
        sh("docker", "kill", leader.name)
        new_id = eventually("a new leader among the survivors",
                            lambda: (lid := cluster.agreed_leader(survivors)) != leader_id and lid, 30)
        got = cluster.node(new_id).leases().Get(ls.GetLeaseRequest(name="a/lock"), timeout=CALL_TIMEOUT_S)
        assert (got.lease.holder, got.lease.fencing_token) == ("pod-a", token), got
        return (f"formed over mTLS; alice served via node {follower.id} in a/ and refused in b/; "
                f"no-certificate caller refused at the handshake; plaintext, a client certificate and a peer-CA "
                f"certificate naming no member refused on the peer port; "
                f"after killing leader {leader_id}, node {new_id} leads and holds a/lock under token {token}")
    finally:
        compose("down", "--volumes", "--timeout", "5", **up)
        shutil.rmtree(certs, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", default=["image", "kill", "partition", "rolling", "scale", "emptydisk", "secure"])
    ap.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    args = ap.parse_args()

    self_test_checkers()
    pb = compile_stubs()
    log(f"starting cluster {PREFIX} from image {os.environ.get('ARBITER_IMAGE', 'arbiter:local')}")
    compose("down", "--volumes", "--timeout", "5")
    compose("up", "-d")
    cluster = Cluster(pb)
    results = []
    try:
        t0 = time.monotonic()
        eventually("the cluster to form", cluster.formed, 60)
        leader = cluster.agreed_leader()
        log(f"formed: leader is node {leader} after {time.monotonic() - t0:.1f} s")
        ledger = Ledger()
        table = {
            "image": lambda: scenario_image(cluster),
            "kill": lambda: scenario_kill(cluster, ledger),
            "partition": lambda: scenario_partition(cluster, ledger),
            "rolling": lambda: scenario_rolling(cluster, ledger),
            "scale": lambda: scenario_scale(cluster),
            "emptydisk": lambda: scenario_empty_disk(cluster),
            "secure": lambda: scenario_secure(pb),
        }
        for name in args.scenarios:
            t = time.monotonic()
            try:
                detail = table[name]()
                results.append((name, True, detail))
                log(f"PASS {name} ({time.monotonic() - t:.1f} s): {detail}")
            except Exception as e:  # noqa: BLE001 - each scenario reports its own failure
                results.append((name, False, f"{type(e).__name__}: {e}"))
                log(f"FAIL {name} ({time.monotonic() - t:.1f} s): {type(e).__name__}: {e}")
                for n in cluster.nodes:
                    tail = sh("docker", "logs", "--tail", "8", n.name, check=False)
                    print(f"--- {n.name} log tail\n{tail.stdout}{tail.stderr}", flush=True)
                # Later scenarios assume three healthy nodes.
                for n in cluster.nodes:
                    sh("docker", "network", "connect", "--alias", f"arbiter-{n.ordinal}.arbiter-peers", NETWORK, n.name, check=False)
                    sh("docker", "start", n.name, check=False)
                try:
                    eventually("recovery after a failed scenario", cluster.converged, 60)
                except AssertionError as e2:
                    log(f"cluster did not recover ({e2}); stopping")
                    break
    finally:
        if not args.keep:
            compose("down", "--volumes", "--timeout", "5")
    failed = [r for r in results if not r[1]]
    ran = {r[0] for r in results}
    skipped = [s for s in args.scenarios if s not in ran]
    print(f"\ne2e: {len(results) - len(failed)} passed, {len(failed)} failed, {len(skipped)} not run", flush=True)
    return 0 if results and not failed and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
