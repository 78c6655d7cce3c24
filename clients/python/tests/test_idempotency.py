"""Idempotency keys through the blocking client: the decorator and the
calls one by one."""

import threading

import pytest

import arbiter_client as ac
from support import poll


def test_the_first_call_runs_and_repeats_return_its_stored_result(client, name):
    runs = []

    @client.idempotent(lambda order_id, amount: f"{name}/{order_id}")
    def pay(order_id, amount):
        runs.append(order_id)
        return {"charged": amount, "order": order_id}

    assert pay("o1", 10) == {"charged": 10, "order": "o1"}
    assert pay("o1", 10) == {"charged": 10, "order": "o1"}
    assert pay("o2", 10) == {"charged": 10, "order": "o2"}
    assert runs == ["o1", "o2"]
    record = client.idempotency.get(f"{name}/o1")
    assert record.state == "completed" and b"charged" in record.response


def test_a_repeat_with_another_payload_is_a_mismatch(client, name):
    @client.idempotent(name)
    def pay(amount):
        return amount

    assert pay(10) == 10
    with pytest.raises(ac.IdempotencyKeyMismatch):
        pay(11)

    @client.idempotent(f"{name}/custom", fingerprint=lambda amount, note: str(amount))
    def pay_noted(amount, note):
        return note

    assert pay_noted(5, "first") == "first"
    assert pay_noted(5, "notes do not count") == "first"


def test_an_exception_aborts_the_attempt_so_a_retry_runs(client, name):
    tries = []

    @client.idempotent(name)
    def flaky():
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("downstream failed")
        return "done"

    with pytest.raises(RuntimeError, match="downstream"):
        flaky()
    assert client.idempotency.get(name) is None
    assert flaky() == "done" and flaky() == "done"
    assert len(tries) == 2

    @client.idempotent(f"{name}/unencodable")
    def unencodable():
        return object()

    with pytest.raises(TypeError, match="JSON"):
        unencodable()
    assert client.idempotency.get(f"{name}/unencodable") is None


def test_twenty_concurrent_callers_run_the_function_once(client, name):
    runs = []
    in_progress = threading.Event()
    real_begin = client.idempotency.begin

    def begin(*args, **kwargs):
        result = real_begin(*args, **kwargs)
        if result.outcome == "in_progress":
            in_progress.set()
        return result

    client.idempotency.begin = begin

    @client.idempotent(name, wait=30)
    def work():
        runs.append(threading.current_thread().name)
        # Hold the attempt until another caller has found it in progress.
        assert in_progress.wait(timeout=20)
        return len(runs)

    barrier = threading.Barrier(20)
    results = []

    def call():
        barrier.wait()
        results.append(work())

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(runs) == 1
    assert results == [1] * 20


def test_a_concurrent_repeat_without_wait_raises_in_progress(client, name):
    begun = client.idempotency.begin(name, fingerprint=ac_fp(), lock_ttl=30)
    assert begun.outcome == "started"

    @client.idempotent(name, fingerprint=lambda: ac_fp())
    def work():
        raise AssertionError("must not run")

    with pytest.raises(ac.IdempotencyInProgress) as caught:
        work()
    assert 25 < caught.value.retry_after <= 30
    client.idempotency.complete(name, begun.attempt, b'"stored"')
    assert work() == "stored"


def ac_fp():
    return b"fp"


def test_the_calls_one_by_one(client, name):
    begun = client.idempotency.begin(name, b"fp", lock_ttl=0.5, retention=60)
    assert begun.outcome == "started" and begun.attempt > 0
    again = client.idempotency.begin(name, b"fp", lock_ttl=0.5)
    assert again.outcome == "in_progress" and again.attempt == begun.attempt and 0 < again.retry_after <= 0.5
    assert client.idempotency.begin(name, b"other").outcome == "fingerprint_mismatch"
    record = client.idempotency.get(name)
    assert record.state == "in_progress" and record.fingerprint == b"fp"
    client.idempotency.abort(name, begun.attempt)
    with pytest.raises(ac.ArbiterError) as caught:
        client.idempotency.abort(name, begun.attempt)
    assert caught.value.code == "FAILED_PRECONDITION"
    # A lapsed lock lets the next attempt start; the old one is fenced off.
    first = client.idempotency.begin(name, b"fp", lock_ttl=0.2)
    second = poll(lambda: _started(client, name), 5, "the lapsed lock is taken over")
    assert second.attempt > first.attempt
    with pytest.raises(ac.ArbiterError, match="FAILED_PRECONDITION"):
        client.idempotency.complete(name, first.attempt, b"late")
    client.idempotency.complete(name, second.attempt, b"result")
    done = client.idempotency.begin(name, b"fp")
    assert done.outcome == "completed" and done.response == b"result"
    assert 59 < client.idempotency.get(name).expires_after <= 60


def _started(client, name):
    b = client.idempotency.begin(name, b"fp", lock_ttl=30, retention=60)
    return b if b.outcome == "started" else None
