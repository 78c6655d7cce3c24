"""Slot routing: a client given the members sends each check to the member
that owns its key's slot (a cluster started with --slot-owners spread)."""

import binascii

import pytest

from arbiter_client import Client, TokenBucket, _pb
from arbiter_client._routing import HINT_GAP, SLOTS, SlotRoutes, hash_tag, slot_of
from support import Cluster, poll


def test_a_keys_slot_is_redis_clusters_crc16_of_its_hash_tag():
    # Redis Cluster's reference value: CRC16/XMODEM("123456789") = 0x31C3.
    assert binascii.crc_hqx(b"123456789", 0) == 0x31C3
    assert slot_of("123456789") == 0x31C3 % SLOTS
    assert hash_tag("{user1000}.following") == b"user1000"
    assert slot_of("{user1000}.following") == slot_of("{user1000}.followers") == slot_of("user1000")
    # An empty tag, or none closed, is no tag: the whole key counts.
    assert hash_tag("{}.x") == b"{}.x"
    assert hash_tag("a{b") == b"a{b"
    assert hash_tag("{ü}") == "ü".encode()


def test_routes_split_a_call_by_owner_in_first_seen_order():
    routes = SlotRoutes(["a:1", "b:1"], refresh=5.0)
    assert routes.split(["x", "y"]) == [(None, [0, 1])], "no map yet: all to the target"
    owners = [1 if s % 2 == 0 else 2 for s in range(SLOTS)]
    routes.update(7, owners, {1: "a:1", 2: "b:1"})
    keys = [f"k{i}" for i in range(20)]
    groups = routes.split(keys)
    assert sorted(i for _, idx in groups for i in idx) == list(range(20))
    for member, idx in groups:
        assert all(routes.member_for(keys[i]) == member for i in idx)
        assert member == ("a:1" if slot_of(keys[idx[0]]) % 2 == 0 else "b:1")
    assert not routes.due()
    routes.stale()
    assert routes.due()
    with pytest.raises(ValueError):
        SlotRoutes([], refresh=1.0)


def test_an_owner_hint_reads_the_map_again_at_most_once_a_gap():
    routes = SlotRoutes(["a:1", "b:1"], refresh=60.0)
    routes.update(7, [1] * SLOTS, {1: "a:1", 2: "b:1"})
    routes.hinted(7, [])
    assert not routes.due(), "an answer from the owner at the same version says nothing"
    routes.hinted(7, [2])
    assert not routes.due(), "not again within the gap"
    # As if the gap had passed since the read.
    routes.last_read -= HINT_GAP
    routes.read_at -= HINT_GAP
    assert routes.due()
    routes.update(8, [1] * SLOTS, {1: "a:1"})
    routes.hinted(9, [])
    routes.last_read -= HINT_GAP
    routes.read_at -= HINT_GAP
    assert routes.due(), "a newer map than ours is a hint too"


def spread_routes(client: Client) -> SlotRoutes:
    """The client's routes once every member owns a share (until then,
    routing has nothing to go by)."""
    routes = client._routes
    assert routes is not None

    def spread() -> bool:
        client._read_routes(routes)
        return all(n in routes.owners for n in (1, 2, 3))

    poll(spread, 30, "the slots spread")
    return routes


def test_a_routed_client_sends_each_check_to_its_owner():
    cluster = Cluster(3, "--slot-owners", "spread")
    try:
        addrs = cluster.addrs
        with Client(addrs[0]) as probe:
            poll(lambda: all(m.voter for m in probe.status().members) and len(probe.status().members) == 3,
                 30, "three voters")
        with Client(addrs[0], members=addrs, route_refresh=0.2) as client:
            routes = spread_routes(client)
            before = sum(n.gauge("arbiter_check_stream_checks_total") for n in cluster.nodes)
            limit = TokenBucket(capacity=2, refill_tokens=1, per=3600)
            keys = [f"routed-{i}" for i in range(60)]
            for _ in range(2):
                assert all(d.allowed for d in client.check_many([(k, limit) for k in keys]))
            assert not any(d.allowed for d in client.check_many([(k, limit) for k in keys]))
            assert not client.check(keys[0], limit).allowed
            after = sum(n.gauge("arbiter_check_stream_checks_total") for n in cluster.nodes)
            # Every check went straight to its owner: none was forwarded.
            assert after == before, f"{after - before} checks forwarded"
            decided = [n.gauge("arbiter_checks_decided_here_total") for n in cluster.nodes]
            assert all(d > 0 for d in decided), decided
    finally:
        cluster.stop()


def test_an_answer_through_a_non_owner_makes_the_client_read_the_map_again():
    cluster = Cluster(3, "--slot-owners", "spread")
    try:
        addrs = cluster.addrs
        with Client(addrs[0], members=addrs, route_refresh=3600) as client:
            routes = spread_routes(client)
            right = list(routes.owners)
            # The member asked below has applied that map too.
            poll(
                lambda: client._call("status", _pb.ClusterStatusRequest()).slot_map_version >= routes.version,
                30,
                "the first member applying the map",
            )
            first = next(n for n, a in routes.member_of_node.items() if a == addrs[0])
            key = next(f"hinted-{i}" for i in range(1000) if right[slot_of(f"hinted-{i}")] != first)
            # A map that is wrong for `key`: every slot to the first member.
            routes.update(routes.version, [first] * SLOTS, routes.member_of_node)
            limit = TokenBucket(capacity=100, refill_tokens=1, per=1)
            assert client.check(key, limit).allowed
            assert routes.read_at < routes.last_read, "the answer carried no owner hint"

            def fixed() -> bool:
                client.check(key, limit)
                return routes.owners == right

            poll(fixed, 10, "the map read again after the hint")
    finally:
        cluster.stop()


def test_an_async_routed_client_splits_and_answers_in_order():
    import asyncio

    from arbiter_client import AsyncClient

    cluster = Cluster(3, "--slot-owners", "spread")
    try:
        addrs = cluster.addrs

        async def run() -> None:
            async with AsyncClient(addrs[1], members=addrs, route_refresh=0.2) as client:
                routes = client._routes
                assert routes is not None
                deadline = asyncio.get_running_loop().time() + 30
                while not all(n in routes.owners for n in (1, 2, 3)):
                    assert asyncio.get_running_loop().time() < deadline, "the slots never spread"
                    await client._read_routes(routes)
                    await asyncio.sleep(0.05)
                keys = [f"async-{i}" for i in range(30)]
                # Capacities 1..3 by position: the answers come back in order.
                limits = [TokenBucket(capacity=1 + i % 3, refill_tokens=1, per=3600) for i in range(30)]
                first = await client.check_many(list(zip(keys, limits)))
                assert [d.remaining for d in first] == [i % 3 for i in range(30)]

        asyncio.run(run())
    finally:
        cluster.stop()
