"""Every query of the Grafana dashboard (helm/arbiter/files/dashboard.json),
run through a real Prometheus (Debian's `prometheus` package) scraping a real
3-node cluster under load: each must return data, every series with the
labels its legend names, and the panels the load drives must show it.

The cluster runs with TLS on the client port, bearer tokens and a limits
directory, so that refusals, handshake failures and a failed reload happen.
The Prometheus listens on a port it picks (read back from /proc). Without
the `prometheus` binary the test skips, except under CI, where it fails."""

import hashlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python" / "tests"))

import arbiter_client as ac  # noqa: E402
from tools import required  # noqa: E402
from support import Cluster, Pki, binary, poll  # noqa: E402

DASHBOARD = ROOT / "helm" / "arbiter" / "files" / "dashboard.json"
JOB = "arbiter-test"
TOKEN = "monitoring-test-token"
LIMITS = """\
domain: edge
descriptors:
  - key: path
    value: /login
    rate_limit: {unit: minute, requests_per_unit: 2, name: login}
"""
# Queries whose sum must be above 0 once the load ran (by panel title and
# target index): what the load below is there to drive.
DRIVEN = {
    ("Rate-limit decisions/s", 0),
    ("Key prefixes: decisions/s (top 10)", 0),
    ("Key prefixes: denied/s (top 10)", 0),
    ("Named limits: hits/s (top 10)", 0),
    ("Named limits: over limit/s (top 10)", 0),
    ("Forwarded share", 0),
    ("Calls/s per RPC", 0),
    ("Failed calls/s per RPC", 0),
    ("Leader", 0),
    ("Term", 0),
    ("Replication bytes/s", 0),
    ("Rate-limit sync cells/s", 0),
    ("Leases held and expiring", 0),
    ("Leases held and expiring", 1),
    ("Idempotency records", 0),
    ("Idempotency records", 1),
    ("Lease watchers", 0),
    ("Memory against the budget", 0),
    ("Memory against the budget", 1),
    ("Caps used", 0),
    ("TLS handshake failures/s", 0),
    ("Auth refusals/s by principal", 0),
    ("Configuration reloads", 0),
    ("Configuration reload failures", 0),
}


def listening_port(pid):
    """The TCP port process `pid` listens on, from /proc (no fixed ports)."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


class Prometheus:
    def __init__(self, targets, directory):
        config = directory / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        }))
        self.log = open(directory / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [required("prometheus", "prometheus"), f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
             "--web.listen-address=127.0.0.1:0", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.port = poll(lambda: self.proc.poll() is None and listening_port(self.proc.pid), 30,
                         "prometheus listening")
        # It listens before it serves queries (503 until its storage is up).
        poll(self.ready, 30, "prometheus ready")

    def ready(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr):
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def panel_queries():
    """(panel title, target index, expr, labels the legend names)."""
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for i, target in enumerate(panel.get("targets", [])):
            labels = re.findall(r"\{\{(\w+)\}\}", target["legendFormat"])
            yield panel["title"], i, target["expr"], labels


def concrete(expr):
    return (expr.replace("$job", JOB).replace('instance=~"$instance"', 'instance=~".*"')
            .replace("$__rate_interval", "30s"))


def repeat(run, cluster, ca, limits, stop, failed):
    """Runs `run` until `stop` is set; a failure is put in `failed`."""
    try:
        run(cluster, ca, limits, stop)
    except BaseException as e:  # reported by the test
        failed.append(e)


def run_load(cluster, ca, limits, stop):
    """Checks through every member (allowed and denied), leases and their
    watches, idempotency records, refusals."""
    tls = ac.TLS(ca=str(ca))
    clients = [ac.Client(f"localhost:{a.rsplit(':', 1)[1]}", tls=tls, token=TOKEN) for a in cluster.addrs]
    # Refilled all along: some checks allowed (cells changed, synced), most denied.
    window = ac.TokenBucket(capacity=5, refill_tokens=5, per=1)
    n = 0
    try:
        with clients[0].lease("app/held", ttl=5), clients[1].watch_lease("app/held") as watch:
            next(watch)  # served: counted as a watcher
            deadline = time.monotonic() + 300
            while not stop.is_set() and time.monotonic() < deadline:
                client = clients[n % len(clients)]
                client.check(f"app/k{n % 7}", window)
                if n % 10 == 0:
                    client.leases.acquire(f"app/lease{n % 50}", "me", 8)
                    client.idempotency.begin(f"app/req{n}", b"fp")
                with pytest.raises(ac.PermissionDenied):
                    client.check("other/k", window)
                n += 1
    finally:
        for c in clients:
            c.close()


def cli(addr, ca, *args):
    port = addr.rsplit(":", 1)[1]
    return subprocess.run([binary(), *args, "--server", f"https://localhost:{port}", "--tls-ca", str(ca)],
                          env=dict(os.environ, ARBITER_TOKEN=TOKEN), capture_output=True, text=True, timeout=30)


def run_events(cluster, ca, limits, stop):
    """Every 2 s: named-limit checks (2 a minute: the rest over the limit),
    plain text to each TLS client port (a failed handshake), and a limits
    file that does not load, put right 1 s later (a failed reload, the last
    good one staying in use)."""
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline:
        for _ in range(3):
            done = cli(cluster.addrs[1], ca, "check", "--domain", "edge", "--descriptor", "path=/login")
            assert done.returncode in (0, 2), done.stderr
        for addr in cluster.addrs:
            host, port = addr.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                s.recv(100)
        (limits / "edge.yaml").write_text("domain: edge\ndescriptors: [nonsense\n")
        stop.wait(1)
        (limits / "edge.yaml").write_text(LIMITS)
        stop.wait(1)


def test_every_dashboard_query_returns_data_with_its_labels_from_a_real_cluster():
    directory = pathlib.Path(tempfile.mkdtemp(prefix="arbiter-monitoring-"))
    pki = Pki(directory)
    cert, key = pki.issue("server", dns=("localhost",))
    auth = directory / "auth.yaml"
    auth.write_text(f"principals:\n  - name: app\n    token_sha256: \"{hashlib.sha256(TOKEN.encode()).hexdigest()}\"\n"
                    "    namespaces: [\"app/\", \"rls/edge/\"]\n")
    limits = directory / "limits"
    limits.mkdir()
    (limits / "edge.yaml").write_text(LIMITS)
    cluster = Cluster(3, "--tls-cert", str(cert), "--tls-key", str(key), "--auth-file", str(auth),
                      "--limits", str(limits), "--insecure-peer-port")
    prometheus, stop, threads = None, threading.Event(), []
    try:
        cluster.leader(lambda addr: ac.Client(f"localhost:{addr.rsplit(':', 1)[1]}", tls=ac.TLS(ca=str(pki.ca)),
                                              token=TOKEN))
        prometheus = Prometheus([n.metrics for n in cluster.nodes], directory)
        poll(lambda: len(prometheus.query(f'up{{job="{JOB}"}} == 1')) == 3, 30, "3 targets up")

        failed = []
        threads = [threading.Thread(target=repeat, args=(run, cluster, pki.ca, limits, stop, failed), daemon=True)
                   for run in (run_load, run_events)]
        for t in threads:
            t.start()
        poll(lambda: failed or prometheus.query(f'arbiter_config_reload_failures_total{{job="{JOB}"}}'), 30,
             "a failed limits reload")

        missing = {}
        queries = list(panel_queries())
        assert len(queries) >= 25

        def every_query_answers():
            assert not failed, f"the load failed: {failed[0]!r}"
            missing.clear()
            for title, i, expr, labels in queries:
                result = prometheus.query(concrete(expr))
                if not result:
                    missing[(title, i)] = "no data"
                    continue
                lacking = [s["metric"] for s in result if not all(label in s["metric"] for label in labels)]
                if lacking:
                    missing[(title, i)] = f"series without {labels}: {lacking[:2]}"
                elif (title, i) in DRIVEN and sum(float(s["value"][1]) for s in result
                                                  if s["value"][1] not in ("NaN", "+Inf")) <= 0:
                    missing[(title, i)] = f"all zero: {result[:3]}"
            return not missing

        try:
            poll(every_query_answers, 60, "every dashboard query to answer", step=1.0)
        except AssertionError:
            raise AssertionError(f"queries without the data they should show: {missing}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if prometheus:
            prometheus.stop()
        cluster.stop()
