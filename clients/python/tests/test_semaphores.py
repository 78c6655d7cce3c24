"""Semaphores through both clients: the calls one by one, and permits kept
while a block runs, with waiters woken by the watch."""

import asyncio
import threading
import time

import pytest

import arbiter_client as ac


def test_the_calls_one_by_one(client, name):
    s = client.semaphores
    a = s.acquire(name, "a", limit=3, ttl=60, permits=2)
    assert a.granted and a.held == 2 and a.permit is not None and a.permit.permits == 2
    full = s.acquire(name, "b", limit=3, ttl=60, permits=2)
    assert not full.granted and full.held == 2 and full.permit is None
    assert 55 < full.retry_after <= 60
    b = s.acquire(name, "b", limit=3, ttl=60)
    assert b.granted and b.permit.fencing_token > a.permit.fencing_token
    got = s.get(name)
    assert got.held == 3 and [(p.holder, p.permits) for p in got.holders] == [("a", 2), ("b", 1)]
    assert s.renew(name, "b", b.permit.fencing_token, ttl=30).remaining <= 30
    s.release(name, "b", b.permit.fencing_token)
    with pytest.raises(ac.PermitsLost):
        s.release(name, "b", b.permit.fencing_token)
    with pytest.raises(ac.PermitsLost):
        s.renew(name, "a", a.permit.fencing_token + 100, ttl=30)
    with pytest.raises(ValueError, match="permits"):
        s.acquire(name, "c", limit=2, ttl=60, permits=3)
    with pytest.raises(ac.InvalidArgument, match="ttl_ms"):
        s.acquire(name, "c", limit=2, ttl=2 * 86400, permits=1)


def test_no_more_than_the_limit_run_at_once_and_a_waiter_wakes_on_release(client, name):
    inside, most, lock = [0], [0], threading.Lock()
    entered = []

    def worker(n):
        with client.semaphore(name, limit=2, ttl=10, timeout=20) as permit:
            assert permit.held
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                entered.append((n, time.monotonic()))
            time.sleep(0.3)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(entered) == 5
    assert most[0] == 2, most
    # Five 0.3 s turns, two at a time: woken by releases, not by the 10 s TTL.
    assert time.monotonic() - start < 5, entered
    assert client.semaphores.get(name).held == 0


def test_a_full_semaphore_times_out_or_refuses_at_once(client, name):
    with client.semaphore(name, limit=1, ttl=10):
        with pytest.raises(ac.SemaphoreFull):
            client.semaphore(name, limit=1, wait=False).acquire()
        start = time.monotonic()
        with pytest.raises(ac.SemaphoreFull, match="in time"):
            client.semaphore(name, limit=1, timeout=0.3).acquire()
        assert time.monotonic() - start < 3


def test_permits_are_kept_alive_past_their_ttl(client, name):
    with client.semaphore(name, limit=1, ttl=0.6) as permit:
        time.sleep(1.5)
        assert permit.held and not permit.lost.is_set()
        held = client.semaphores.get(name).holders
        assert [p.fencing_token for p in held] == [permit.fencing_token]
    assert client.semaphores.get(name).held == 0


def test_the_asyncio_twin(server, name):
    async def main():
        async with ac.AsyncClient(server.addr, retry=ac.Retry(attempts=3, base=0.01, deadline=2.0)) as client:
            inside, most = [0], [0]

            async def worker():
                async with client.semaphore(name, limit=2, ttl=10, timeout=20):
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    await asyncio.sleep(0.2)
                    inside[0] -= 1

            start = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(5)))
            assert most[0] == 2 and time.monotonic() - start < 5
            got = await client.semaphores.get(name)
            assert got.held == 0
            async with client.semaphore(name, limit=1):
                with pytest.raises(ac.SemaphoreFull):
                    await client.semaphore(name, limit=1, timeout=0.2).acquire()
            watch = client.semaphores.watch(name)
            first = await watch.__anext__()
            assert first.kind == "current" and first.held == 0
            watch.cancel()

    asyncio.run(main())


def test_the_semaphore_example_runs(server):
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parent.parent / "examples" / "semaphore.py"
    out = subprocess.run([sys.executable, str(example), server.addr], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    runs = [line for line in lines if line.startswith("job ")]
    assert len(runs) == 5, out.stdout
    assert all("beside 0 other" in line or "beside 1 other" in line for line in runs), out.stdout
    assert lines[-1] == "held after: 0", out.stdout
