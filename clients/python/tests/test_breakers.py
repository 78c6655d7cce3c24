"""Shared circuit breakers through both clients: the calls one by one, and
`circuit_breaker` as a decorator and context manager that reports outcomes
itself."""

import asyncio
import time

import pytest

import arbiter_client as ac

TRIP = ac.BreakerConfig(min_calls=2, failure_percent=50, open_for=0.3, probes=1, probes_to_close=1, probe_ttl=5)


def until_half_open(allow, deadline=10.0):
    """Polls `allow` until the breaker has half-opened (its open time is
    0.3 s), with a deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        d = allow()
        if d.phase == "HALF_OPEN":
            return d
        time.sleep(0.02)
    raise AssertionError("the breaker did not half-open")


def test_the_calls_one_by_one(client, name):
    b = client.breakers
    assert b.allow(name, TRIP) == ac.BreakerDecision("CLOSED", True, 0, 0.0)
    assert b.report(name, "success", config=TRIP) == ("CLOSED", True)
    assert b.report(name, "timeout", config=TRIP) == ("OPEN", True)
    refused = b.allow(name, TRIP)
    assert refused.phase == "OPEN" and not refused.allowed and 0 < refused.retry_after <= 0.3
    state = b.get(name, TRIP)
    assert (state.phase, state.calls, state.failures) == ("OPEN", 2, 1), "the window that tripped it"
    probe = until_half_open(lambda: b.allow(name, TRIP))
    assert probe.allowed and probe.probe_token > 0
    assert not b.allow(name, TRIP).allowed, "one probe at a time"
    assert b.report(name, "success", probe.probe_token, TRIP) == ("CLOSED", True)
    with pytest.raises(ValueError, match="outcome"):
        b.report(name, "maybe")
    with pytest.raises(ac.InvalidArgument, match="config.failure_percent"):
        b.allow(name, ac.BreakerConfig(failure_percent=150))


def test_the_decorator_trips_fails_fast_and_probes_close_it(client, name):
    calls = []
    up = [False]

    @client.circuit_breaker(name, TRIP)
    def dependency(n):
        calls.append(n)
        if not up[0]:
            raise ConnectionError("down")
        return n

    for n in range(2):
        with pytest.raises(ConnectionError):
            dependency(n)
    with pytest.raises(ac.BreakerOpen) as refused:
        dependency(2)
    assert refused.value.phase == "OPEN" and refused.value.retry_after > 0
    assert calls == [0, 1], "an open breaker never calls the dependency"
    # An exception outside `failures` says nothing of the dependency.
    other = client.circuit_breaker(name + "-x", TRIP, failures=ConnectionError)
    for _ in range(3):
        with pytest.raises(KeyError):
            with other:
                raise KeyError("bad input")
    assert client.breakers.get(name + "-x", TRIP).calls == 0
    up[0] = True
    end = time.monotonic() + 10
    while True:
        try:
            assert dependency(9) == 9
            break
        except ac.BreakerOpen:
            assert time.monotonic() < end, "never half-opened"
            time.sleep(0.02)
    assert client.breakers.get(name, TRIP).phase == "CLOSED"


def test_fail_open_lets_calls_through_when_the_server_cannot_be_asked():
    with ac.Client("127.0.0.1:1", timeout=0.2, retry=ac.Retry(attempts=1)) as c:
        with c.circuit_breaker("gone", TRIP) as d:
            assert d.allowed
        closed = c.circuit_breaker("gone", TRIP, fail_open=False)
        with pytest.raises(ac.Unavailable):
            with closed:
                pass


def test_the_async_client(server, name):
    async def main():
        async with ac.AsyncClient(server.addr) as client:
            watch = client.breakers.watch(name)
            kind, first = await watch.__anext__()
            assert (kind, first.phase) == ("CURRENT", "CLOSED")

            @client.circuit_breaker(name, TRIP)
            async def dependency():
                raise asyncio.TimeoutError()

            for _ in range(2):
                with pytest.raises(asyncio.TimeoutError):
                    await dependency()
            kind, changed = await asyncio.wait_for(watch.__anext__(), 10)
            assert (kind, changed.phase) == ("CHANGED", "OPEN")
            watch.cancel()
            with pytest.raises(ac.BreakerOpen):
                async with client.circuit_breaker(name, TRIP):
                    pass
            with pytest.raises(TypeError, match="coroutine"):
                client.circuit_breaker(name)(lambda: None)

    asyncio.run(main())


def test_the_breaker_example_runs(server):
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parent.parent / "examples" / "breaker.py"
    out = subprocess.run([sys.executable, str(example), server.addr], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:4] == ["order 0: failed (payments service down)", "order 1: failed (payments service down)",
                         "order 2: failed (payments service down)", "order 3: failed (payments service down)"], lines
    assert lines[4].startswith("order 4: not tried, breaker OPEN"), lines
    assert "charged order 100" in lines, lines
    assert lines[-1] == "breaker: CLOSED", lines
