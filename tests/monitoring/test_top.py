"""`arbiter top` at a real terminal: run under tmux against a real 3-node
cluster under load, its screen read with capture-pane, `q` sent with
send-keys; and `--once` for scripts. Without tmux the test skips, except
under CI, where it fails."""

import re
import subprocess
import sys
import threading
import time
import uuid
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python" / "tests"))

import arbiter_client as ac  # noqa: E402
from tools import required  # noqa: E402
from support import Cluster, binary, poll  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(3)
    c.leader(ac.Client)
    stop = threading.Event()

    def load():
        # Checks through member 1 (forwarded to the leader unless it is
        # the leader), some allowed and most denied; bounded in time.
        deadline = time.monotonic() + 120
        with ac.Client(c.addrs[0]) as client:
            bucket = ac.TokenBucket(capacity=5, refill_tokens=5, per=1)
            with client.lease("top/held", ttl=10):
                while not stop.is_set() and time.monotonic() < deadline:
                    client.check("top/k", bucket)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    yield c
    stop.set()
    loader.join(timeout=30)
    c.stop()


def member_rows(screen):
    """(id, role, decisions/s) of each member row on the screen."""
    return [(int(m[1]), m[2], m[3]) for m in
            re.finditer(r"^\s+(\d+)\s+(Leader|Follower)\s+\d+\s+\d+\s+\S+\s+\d+\s+(\S+)", screen, re.M)]


def test_top_redraws_under_tmux_and_quits_on_q(cluster):
    tmux = required("tmux", "tmux")
    socket = f"arbiter-top-{uuid.uuid4().hex[:8]}"

    def run(*args, check=True):
        return subprocess.run([tmux, "-L", socket, *args], capture_output=True, text=True, timeout=10, check=check)

    command = f"{binary()} top --server http://{cluster.addrs[1]} --interval 300ms"
    run("new-session", "-d", "-s", "top", "-x", "150", "-y", "45", command)
    try:
        def screen():
            return run("capture-pane", "-p", "-t", "top").stdout

        # Three members, one leader, and checks decided: the rates need a
        # second sample, so the first frames show "-".
        def busy():
            s = screen()
            rows = member_rows(s)
            roles = sorted(role for _, role, _ in rows)
            decided = [float(d) for _, _, d in rows if d != "-"]
            return roles == ["Follower", "Follower", "Leader"] and sum(decided) > 0 and "Check" in s and s
        shown = poll(busy, 30, "top showing 3 members and checks per second", step=0.2)
        assert f"arbiter top  http://{cluster.addrs[1]}" in shown
        assert re.search(r"cluster: [\d.]+ decisions/s", shown), shown
        assert re.search(r"^Check\s+[\d.]+\s+≤ [\d.]+ [mµ]s", shown, re.M), shown
        assert re.search(r"leases 1\b", shown), shown
        # The load's key prefix, most of its checks denied.
        assert re.search(r"^top/\s+[\d.]+\s+[\d.]+%", shown, re.M), shown
        # It redraws: the frame changes with time (another second's rates).
        poll(lambda: screen() != shown, 10, "a new frame", step=0.2)

        run("send-keys", "-t", "top", "q")
        poll(lambda: run("has-session", "-t", "top", check=False).returncode != 0, 10, "top to quit on q")
    finally:
        run("kill-server", check=False)


def test_top_once_prints_one_frame_for_scripts(cluster):
    done = subprocess.run([binary(), "top", "--once", "--interval", "500ms", "--server", f"http://{cluster.addrs[2]}"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    rows = member_rows(done.stdout)
    assert sorted(i for i, _, _ in rows) == [1, 2, 3], done.stdout
    assert all(d != "-" for _, _, d in rows), done.stdout
    bad = subprocess.run([binary(), "top", "--once", "--interval", "10ms", "--server", f"http://{cluster.addrs[2]}"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "--interval: at least 100ms" in bad.stderr
