"""Every feature again through AsyncClient (each test runs its own event
loop with asyncio.run)."""

import asyncio
import math
import time

import pytest

import arbiter_client as ac


def run(server, body):
    async def main():
        async with ac.AsyncClient(server.addr, retry=ac.Retry(attempts=3, base=0.01, deadline=2.0)) as client:
            return await body(client)

    return asyncio.run(main())


def test_checks_wait_and_the_decorator(server, name):
    async def body(client):
        bucket = ac.TokenBucket(capacity=2, refill_tokens=1, per=0.3)
        assert [(await client.check(name, bucket)).allowed for _ in range(3)] == [True, True, False]
        start = time.monotonic()
        assert (await client.wait(name, bucket, timeout=5)).allowed
        assert time.monotonic() - start >= 0.1
        with pytest.raises(ac.RateLimited):
            await client.wait(name, bucket, cost=5)
        many = await client.check_many([(f"{name}/a", ac.FixedWindow(1, 60)), (f"{name}/b", ac.FixedWindow(1, 60), 2)],
                                       all_or_nothing=True)
        assert [d.allowed for d in many] == [False, False]
        assert (await client.check(f"{name}/a", ac.FixedWindow(1, 60), dry_run=True)).allowed
        assert (await client.check(f"{name}/sw", ac.SlidingWindow(1, 60), cost=2)).retry_after == math.inf

        @client.rate_limited(lambda n: f"{name}/deco/{n}", ac.FixedWindow(1, 3600), wait=False)
        async def handle(n):
            return n * 2

        assert await handle(2) == 4
        with pytest.raises(ac.RateLimited):
            await handle(2)
        with pytest.raises(TypeError, match="coroutine"):
            client.rate_limited("k", ac.FixedWindow(1, 1))(lambda: None)

        @client.rate_limited(f"{name}/waits", ac.TokenBucket(1, 1, 0.2), timeout=5)
        async def tick():
            return time.monotonic()

        first, second = await tick(), await tick()
        assert second - first >= 0.1
        status = await client.status()
        assert status.leader_id == status.node_id and status.state == "Leader"

    run(server, body)


def test_leases_keep_alive_lose_wait_get_and_watch(server, name):
    async def body(client):
        async with client.lease(name, ttl=0.6, holder="me") as lease:
            token = lease.fencing_token
            end = time.monotonic() + 1.8
            while time.monotonic() < end:
                seen = await client.get_lease(name)
                assert seen.holder == "me" and seen.fencing_token == token
                await asyncio.sleep(0.05)
            assert not lease.lost.is_set()
        assert await client.get_lease(name) is None

        with pytest.raises(ac.LeaseLost):
            async with client.lease(name, ttl=0.6) as lease:
                await client.leases.release(name, lease.holder, lease.fencing_token)
                await asyncio.wait_for(lease.lost.wait(), timeout=5)

        watch = client.watch_lease(name)
        assert (await watch.__anext__()).kind == "current"
        first = client.lease(name, ttl=30, holder="first")
        await first.acquire()
        assert (await watch.__anext__()).kind == "acquired"
        watchers = server.gauge("arbiter_lease_watchers")
        waiter = asyncio.ensure_future(client.lease(name, ttl=30, holder="second", timeout=10).acquire())
        # The waiter watches the lease (one more watcher on the server).
        deadline = time.monotonic() + 10
        while server.gauge("arbiter_lease_watchers") <= watchers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert server.gauge("arbiter_lease_watchers") > watchers and not waiter.done()
        await first.release()
        assert (await watch.__anext__()).kind == "released"
        second = await asyncio.wait_for(waiter, timeout=10)
        assert second.holder == "second" and second.fencing_token > token
        watch.cancel()
        with pytest.raises(ac.LeaseNotHeld):
            await client.lease(name, wait=False).acquire()
        await client.leases.release(name, "second", second.fencing_token)

    run(server, body)


def test_an_election(server, name):
    async def body(client):
        a, b = client.election(name, "a", ttl=5), client.election(name, "b", ttl=5)
        observer = a.observe()
        assert await observer.__anext__() is None
        leader = await a.campaign(timeout=5)
        assert a.is_leader and a.fencing_token == leader.fencing_token
        assert await observer.__anext__() == leader
        with pytest.raises(ac.LeaseNotHeld):
            await b.campaign(timeout=0.2)
        contender = asyncio.ensure_future(b.campaign(timeout=10))
        await a.resign()
        taken = await asyncio.wait_for(contender, timeout=10)
        assert b.is_leader and taken.fencing_token > leader.fencing_token
        assert await observer.__anext__() is None
        assert await observer.__anext__() == taken
        await observer.aclose()
        await b.resign()
        async with a:
            assert a.is_leader
        assert not a.is_leader

    run(server, body)


def test_idempotent_coroutines(server, name):
    async def body(client):
        runs = []
        release = asyncio.Event()

        @client.idempotent(lambda order: f"{name}/{order}", wait=30)
        async def pay(order):
            runs.append(order)
            await release.wait()
            return {"paid": order}

        outcomes = []
        real_begin = client.idempotency.begin

        async def begin(*args, **kwargs):
            result = await real_begin(*args, **kwargs)
            outcomes.append(result.outcome)
            return result

        client.idempotency.begin = begin
        calls = [asyncio.ensure_future(pay("o1")) for _ in range(20)]
        # Hold the attempt until the others have found it in progress.
        deadline = time.monotonic() + 20
        while outcomes.count("in_progress") < 19 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert runs == ["o1"] and outcomes.count("in_progress") >= 19, (runs, outcomes)
        release.set()
        assert await asyncio.gather(*calls) == [{"paid": "o1"}] * 20
        assert runs == ["o1"]
        with pytest.raises(ac.IdempotencyKeyMismatch):
            await client.idempotent(f"{name}/o1")(_echo)(1)

        tries = []

        @client.idempotent(f"{name}/flaky")
        async def flaky():
            tries.append(1)
            if len(tries) == 1:
                raise RuntimeError("first try fails")
            return len(tries)

        with pytest.raises(RuntimeError):
            await flaky()
        assert await flaky() == 2 and await flaky() == 2

        begun = await client.idempotency.begin(f"{name}/low", b"fp", lock_ttl=30)
        with pytest.raises(ac.IdempotencyInProgress):
            await client.idempotent(f"{name}/low", fingerprint=lambda: b"fp")(_none)()
        await client.idempotency.complete(f"{name}/low", begun.attempt, b"7")
        assert (await client.idempotency.get(f"{name}/low")).response == b"7"
        assert await client.idempotent(f"{name}/low", fingerprint=lambda: b"fp")(_none)() == 7
        other = await client.idempotency.begin(f"{name}/aborted", b"")
        await client.idempotency.abort(f"{name}/aborted", other.attempt)
        assert await client.idempotency.get(f"{name}/aborted") is None
        with pytest.raises(TypeError, match="coroutine"):
            client.idempotent("k")(lambda: None)

    run(server, body)


async def _echo(x):
    return x


async def _none():
    raise AssertionError("must not run")


def test_reserve_and_a_limiter(server, name):
    async def body(client):
        bucket = ac.LeakyBucket(rate=1, per=600, burst=2)
        assert [(await client.reserve(name, bucket, max_delay=700)).delay for _ in range(2)] == [0, 0]
        third = await client.reserve(name, bucket, max_delay=700)
        assert third.allowed and 590 < third.delay <= 600
        assert not (await client.reserve(name, bucket, max_delay=700)).allowed
        limiter = client.limiter(f"{name}/shaped", ac.LeakyBucket(rate=10, per=1), max_delay=2)
        start = time.monotonic()
        # Five tasks at once leave one every 100 ms.
        decisions = await asyncio.gather(*(limiter.acquire() for _ in range(5)))
        assert all(d.allowed for d in decisions)
        assert sorted(round(d.delay, 1) for d in decisions) == [0.0, 0.1, 0.2, 0.3, 0.4]
        assert time.monotonic() - start >= 0.35
        async with client.limiter(f"{name}/ctx", bucket, max_delay=1) as d:
            assert d.allowed

    run(server, body)
