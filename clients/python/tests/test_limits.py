"""Rate limits through the blocking client: check, check_many, wait and the
decorator, and the checks the client makes before sending."""

import math
import time
from datetime import timedelta

import pytest

import arbiter_client as ac


def test_a_token_bucket_allows_its_capacity_then_denies_with_retry_after(client, name):
    bucket = ac.TokenBucket(capacity=3, refill_tokens=1, per=60)
    seen = [client.check(name, bucket) for _ in range(4)]
    assert [d.allowed for d in seen] == [True, True, True, False]
    assert [d.remaining for d in seen] == [2, 1, 0, 0]
    assert all(d.limit == 3 for d in seen)
    assert seen[0].retry_after == 0
    # One token comes back per minute: the denial says when.
    assert 55 < seen[3].retry_after <= 60
    assert 175 < seen[3].reset_after <= 180


def test_dry_run_and_a_zero_cost_consume_nothing(client, name):
    window = ac.FixedWindow(limit=2, window=timedelta(minutes=10))
    assert client.check(name, window, cost=2, dry_run=True).allowed
    assert client.check(name, window, cost=0).remaining == 2
    assert client.check(name, window, cost=2).allowed
    denied = client.check(name, window, cost=1, dry_run=True)
    assert not denied.allowed and denied.remaining == 0


def test_a_cost_above_the_limit_is_never_allowed(client, name):
    d = client.check(name, ac.SlidingWindow(limit=2, window=1.0), cost=3)
    assert not d.allowed and d.retry_after == math.inf
    with pytest.raises(ac.RateLimited) as caught:
        client.wait(name, ac.SlidingWindow(limit=2, window=1.0), cost=3, timeout=30)
    assert caught.value.decision.retry_after == math.inf


def test_check_many_all_or_nothing_consumes_nothing_when_one_is_denied(client, name):
    wide, narrow = ac.FixedWindow(100, 600), ac.FixedWindow(1, 600)
    assert client.check(f"{name}/narrow", narrow).allowed
    results = client.check_many([(f"{name}/wide", wide, 5), (f"{name}/narrow", narrow)], all_or_nothing=True)
    assert [r.allowed for r in results] == [False, False]
    assert client.check(f"{name}/wide", wide, cost=0).remaining == 100
    results = client.check_many([(f"{name}/wide", wide, 5), (f"{name}/narrow", narrow)])
    assert [r.allowed for r in results] == [True, False]
    assert client.check(f"{name}/wide", wide, cost=0).remaining == 95


def test_wait_sleeps_for_retry_after_instead_of_spinning(client, name, monkeypatch):
    bucket = ac.TokenBucket(capacity=1, refill_tokens=1, per=0.4)
    assert client.check(name, bucket).allowed
    denied = client.check(name, bucket, dry_run=True)
    assert not denied.allowed and denied.retry_after > 0.2
    calls = []
    real = client.check
    monkeypatch.setattr(client, "check", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    start = time.monotonic()
    decision = client.wait(name, bucket, timeout=10)
    elapsed = time.monotonic() - start
    assert decision.allowed
    # Denied once, then allowed after sleeping the retry_after it was told.
    assert elapsed >= calls[0].retry_after
    assert len(calls) <= 3, f"wait checked {len(calls)} times"


def test_wait_gives_up_at_once_when_the_timeout_would_pass(client, name):
    window = ac.FixedWindow(limit=1, window=3600)
    client.check(name, window)
    start = time.monotonic()
    with pytest.raises(ac.RateLimited) as caught:
        client.wait(name, window, timeout=0.5)
    assert time.monotonic() - start < 0.5
    assert not caught.value.decision.allowed and caught.value.decision.retry_after > 1


def test_the_decorator_limits_by_a_key_of_the_arguments(client, name):
    calls = []

    @client.rate_limited(lambda user: f"{name}/{user}", ac.FixedWindow(2, 3600), wait=False)
    def handle(user):
        calls.append(user)
        return user.upper()

    assert handle("ann") == "ANN" and handle("ann") == "ANN"
    with pytest.raises(ac.RateLimited):
        handle("ann")
    assert handle("bob") == "BOB"
    assert calls == ["ann", "ann", "bob"]

    @client.rate_limited(f"{name}/waits", ac.TokenBucket(1, 1, 0.2), timeout=5)
    def tick():
        return time.monotonic()

    first, second = tick(), tick()
    assert second - first >= 0.1


def test_bad_limits_fail_before_sending_and_the_server_names_its_bounds(client, name):
    with pytest.raises(ValueError, match="capacity"):
        ac.TokenBucket(capacity=0, refill_tokens=1, per=1)
    with pytest.raises(ValueError, match="window"):
        ac.FixedWindow(limit=1, window=0.0001)
    with pytest.raises(TypeError, match="window"):
        ac.SlidingWindow(limit=1, window="1s")
    with pytest.raises(ValueError, match="key"):
        client.check("", ac.FixedWindow(1, 1))
    with pytest.raises(ValueError, match="cost"):
        client.check(name, ac.FixedWindow(1, 1), cost=-1)
    # Past the server's bound (366 days): the server's message names it.
    with pytest.raises(ac.InvalidArgument) as caught:
        client.check(name, ac.FixedWindow(1, timedelta(days=367)))
    assert caught.value.code == "INVALID_ARGUMENT" and "window_ms" in caught.value.details


def test_an_unreachable_server_is_retried_then_unavailable():
    from support import free_port

    policy = ac.Retry(attempts=3, base=0.01, cap=0.02, deadline=5)
    with ac.Client(f"127.0.0.1:{free_port()}", timeout=1, retry=policy) as client:
        with pytest.raises(ac.Unavailable) as caught:
            client.check("k", ac.FixedWindow(1, 1))
    assert caught.value.code == "UNAVAILABLE" and caught.value.retried
    assert caught.value.__cause__ is not None


def test_retry_delays_are_full_jitter_below_the_cap():
    import random

    policy = ac.Retry(attempts=10, base=0.1, cap=0.5, rng=random.Random(7))
    delays = [policy.delay(n) for n in range(8) for _ in range(50)]
    assert all(0 <= d <= 0.5 for d in delays)
    assert max(policy.delay(0) for _ in range(200)) <= 0.1
    assert max(delays) > 0.4  # the cap is reached, not just the base
    with pytest.raises(ValueError):
        ac.Retry(attempts=0)


def test_reserve_schedules_work_on_a_leaky_bucket_instead_of_refusing_it(client, name):
    bucket = ac.LeakyBucket(rate=1, per=600, burst=1)  # one per 10 minutes
    first = client.reserve(name, bucket, max_delay=900)
    assert first.allowed and first.delay == 0 and first.limit == 1
    second = client.reserve(name, bucket, max_delay=900)
    assert second.allowed and 590 < second.delay <= 600
    # A third would wait 20 minutes: refused, consuming nothing.
    third = client.reserve(name, bucket, max_delay=900)
    assert not third.allowed and third.delay == 0
    assert 290 < third.retry_after <= 300
    assert client.reserve(name, bucket, max_delay=1200).allowed
    # Without reserve mode, a leaky bucket answers as any limit does.
    assert not client.check(name, bucket).allowed
    with pytest.raises(ValueError, match="max_delay"):
        client.reserve(name, bucket, max_delay=3601)
    with pytest.raises(ValueError, match="LeakyBucket"):
        client.reserve(name, ac.TokenBucket(1, 1, 1), max_delay=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="burst"):
        ac.LeakyBucket(rate=1, per=1, burst=0)


def test_a_limiter_sleeps_so_callers_go_out_at_the_rate(client, name):
    limiter = client.limiter(name, ac.LeakyBucket(rate=10, per=1), max_delay=2)
    starts = []
    for _ in range(5):
        decision = limiter.acquire()
        assert decision.allowed
        starts.append(time.monotonic())
    # One every 100 ms: the calls themselves take about a millisecond.
    assert starts[-1] - starts[0] >= 0.35, starts
    # As a context manager, and refused once the wait would pass the timeout.
    slow = client.limiter(f"{name}/slow", ac.LeakyBucket(rate=1, per=600), max_delay=1)
    with slow as decision:
        assert decision.delay == 0
    with pytest.raises(ac.RateLimited) as caught:
        slow.acquire(timeout=0.5)
    assert caught.value.decision.retry_after > 500


def test_the_shaping_example_runs(server):
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parent.parent / "examples" / "shape.py"
    out = subprocess.run([sys.executable, str(example), server.addr], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(" sent")[0] for line in lines[:8]] == [f"email {n}" for n in range(8)]
    # Two at once, then one every 200 ms.
    assert float(lines[7].split(" at ")[1].split(" s")[0]) >= 1.1, out.stdout
    assert lines[8].startswith("report: start in 0.0 s"), out.stdout
