"""Across processes and through failures: two candidate processes, one
killed; a 3-node cluster whose leader is killed under the client."""

import pathlib
import queue
import subprocess
import sys
import threading
import time

import pytest

import arbiter_client as ac
from support import Cluster

HERE = pathlib.Path(__file__).resolve().parent


class Candidate:
    def __init__(self, target, name, candidate, ttl):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "election_worker.py"), target, name, candidate, str(ttl)],
            stdout=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def leads(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        assert line.startswith("LEADER "), line
        return int(line.split()[1])

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_two_processes_elect_one_leader_and_the_survivor_takes_over_within_the_ttl(server, name):
    ttl = 2.0
    a = Candidate(server.addr, name, "a", ttl)
    b = Candidate(server.addr, name, "b", ttl)
    try:
        # Exactly one leads: whoever's line comes first, and the other stays silent.
        leaders = {}
        deadline = time.monotonic() + 20
        while not leaders and time.monotonic() < deadline:
            for who, cand in (("a", a), ("b", b)):
                token = cand.leads(timeout=0.05)
                if token is not None:
                    leaders[who] = token
        assert len(leaders) == 1, leaders
        (who, token), = leaders.items()
        leader, other = (a, b) if who == "a" else (b, a)
        with ac.Client(server.addr) as client:
            assert client.get_lease(name).holder == who
        assert other.leads(timeout=ttl) is None, "two leaders at once"
        killed = time.monotonic()
        leader.kill()
        taken = other.leads(timeout=ttl + 5)
        took = time.monotonic() - killed
        assert taken is not None and taken > token
        assert took <= ttl + 1.0, f"takeover took {took:.2f} s with a {ttl} s TTL"
    finally:
        a.kill()
        b.kill()


@pytest.fixture
def cluster():
    c = Cluster(3)
    yield c
    c.stop()


def test_calls_ride_through_a_leader_kill_within_the_retry_policy(cluster):
    policy = ac.Retry(attempts=30, base=0.05, cap=0.5, deadline=20)
    leader = cluster.leader(lambda addr: ac.Client(addr))
    follower = next(i for i in range(3) if i != leader)
    with ac.Client(cluster.nodes[follower].addr, timeout=2, retry=policy) as client:
        window = ac.FixedWindow(limit=1000, window=3600)
        assert client.check("py/failover", window).allowed
        runs = []

        @client.idempotent(lambda n: f"py/failover/{n}")
        def work(n):
            runs.append(n)
            return n

        assert work(1) == 1
        with client.lease("py/failover", ttl=10) as lease:
            token = lease.fencing_token
            cluster.kill(leader)
            # Every call is answered through the failover, by the retries.
            assert client.check("py/failover", window).allowed
            assert work(1) == 1 and work(2) == 2
            assert client.get_lease("py/failover").fencing_token == token
            begun = client.idempotency.begin("py/failover/3", b"")
            assert begun.outcome == "started"
            client.idempotency.complete("py/failover/3", begun.attempt, b"3")
            assert not lease.lost.is_set()
        assert runs == [1, 2]
        status = client.status()
        assert status.leader_id is not None and status.leader_id != leader + 1
