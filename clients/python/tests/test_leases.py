"""Leases and elections through the blocking client."""

import threading
import time

import pytest

import arbiter_client as ac
from support import poll


def test_a_lease_is_kept_alive_for_three_times_its_ttl_then_released(client, name):
    with client.lease(name, ttl=0.6, holder="me") as lease:
        token = lease.fencing_token
        assert token is not None and lease.held
        end = time.monotonic() + 3 * 0.6
        checks = 0
        while time.monotonic() < end:
            seen = client.get_lease(name)
            assert seen is not None and seen.holder == "me" and seen.fencing_token == token, seen
            assert not lease.lost.is_set()
            checks += 1
            time.sleep(0.05)
        assert checks > 10
    assert client.get_lease(name) is None
    assert not lease.held


def test_a_lost_lease_sets_lost_and_raises_on_exit(client, name):
    with pytest.raises(ac.LeaseLost):
        with client.lease(name, ttl=0.6) as lease:
            # Someone with the holder and token releases it under us.
            client.leases.release(name, lease.holder, lease.fencing_token)
            assert lease.lost.wait(timeout=5), "the next renewal did not notice"
            assert not lease.held
    # An error in the block wins over LeaseLost.
    with pytest.raises(KeyError):
        with client.lease(name, ttl=0.6) as lease:
            client.leases.release(name, lease.holder, lease.fencing_token)
            assert lease.lost.wait(timeout=5)
            raise KeyError("mine")


def test_a_waiting_lease_is_granted_when_the_holder_releases(client, server, name):
    first = client.lease(name, ttl=30, holder="first")
    held = first.acquire()
    watchers = server.gauge("arbiter_lease_watchers")
    got = {}

    def contend():
        with client.lease(name, ttl=30, holder="second", timeout=20) as lease:
            got["token"] = lease.fencing_token
            got["holder"] = client.get_lease(name).holder

    t = threading.Thread(target=contend)
    t.start()
    # The contender waits by watching the lease, not by polling it.
    poll(lambda: server.gauge("arbiter_lease_watchers") > watchers, 10, "the contender watches the lease")
    assert "token" not in got
    first.release()
    t.join(timeout=20)
    assert got["holder"] == "second" and got["token"] > held.fencing_token


def test_a_lapsed_holder_is_replaced_without_polling_faster_than_its_ttl(client, name):
    ok, held = client.leases.acquire(name, "crashed", 0.5)
    assert ok
    start = time.monotonic()
    with client.lease(name, ttl=5, holder="next", timeout=10) as lease:
        waited = time.monotonic() - start
        assert lease.fencing_token > held.fencing_token
    assert 0.3 < waited < 5


def test_without_wait_or_past_the_timeout_a_held_lease_raises_lease_not_held(client, name):
    assert client.leases.acquire(name, "other", 30)[0]
    with pytest.raises(ac.LeaseNotHeld, match="other"):
        with client.lease(name, wait=False):
            pass
    start = time.monotonic()
    with pytest.raises(ac.LeaseNotHeld):
        client.lease(name, timeout=0.3).acquire()
    assert 0.3 <= time.monotonic() - start < 5


def test_get_and_watch_report_every_change(client, name):
    assert client.get_lease(name) is None
    with client.watch_lease(name) as watch:
        events = iter(watch)
        assert next(events) == ac.LeaseEvent("current", None)
        ok, lease = client.leases.acquire(name, "w", 10)
        got = next(events)
        assert got.kind == "acquired" and got.lease.holder == "w" and got.lease.fencing_token == lease.fencing_token
        renewed = client.leases.renew(name, "w", lease.fencing_token, 20)
        assert renewed.ttl == 20 and next(events).kind == "renewed"
        info = client.get_lease(name)
        assert info.holder == "w" and 19 < info.remaining <= 20
        client.leases.release(name, "w", lease.fencing_token)
        assert next(events).kind == "released"
    with pytest.raises(ac.LeaseNotHeld):
        client.leases.renew(name, "w", lease.fencing_token, 10)
    with pytest.raises(ac.LeaseNotHeld):
        client.leases.release(name, "w", lease.fencing_token)


def test_an_election_has_one_leader_and_observers_see_each_change(client, name):
    a = client.election(name, "a", ttl=5)
    b = client.election(name, "b", ttl=5)
    seen = []
    observer = a.observe()
    seen.append(next(observer))
    assert seen == [None]
    leader = a.campaign(timeout=5)
    assert a.is_leader and a.fencing_token == leader.fencing_token
    assert next(observer) == ac.Leader("a", leader.fencing_token)
    with pytest.raises(ac.LeaseNotHeld):
        b.campaign(timeout=0.2)
    assert not b.is_leader and b.fencing_token is None
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("leader", b.campaign(timeout=10)))
    t.start()
    a.resign()
    t.join(timeout=10)
    assert not a.is_leader and b.is_leader
    assert result["leader"].fencing_token > leader.fencing_token
    # Resigned: none, then b.
    assert next(observer) is None
    assert next(observer) == result["leader"]
    with b:
        assert b.is_leader
    assert not b.is_leader and client.get_lease(name) is None
