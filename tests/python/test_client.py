"""Arbiter from another language: a Python gRPC client compiled from the
project's own proto files, against a real `arbiter serve` on a free port.

Run: python -m pytest tests/python (needs grpcio, grpcio-tools, pytest and a
built binary; ARBITER_BIN overrides $CARGO_TARGET_DIR or target/debug/arbiter)."""

import grpc
import pytest
from arbiter_pb import serve


@pytest.fixture(scope="session")
def server():
    with serve() as addr:
        yield addr


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def test_check_token_bucket(pb, channel):
    stub = pb.rl_grpc.RateLimiterStub(channel)
    limit = pb.rl.Limit(token_bucket=pb.rl.TokenBucket(capacity=2, refill_tokens=1, refill_interval_ms=3_600_000))
    req = pb.rl.CheckRequest(checks=[pb.rl.LimitCheck(key="py-user", limit=limit)])
    first, second, third = (stub.Check(req).results[0] for _ in range(3))
    assert (first.allowed, first.remaining, first.limit) == (True, 1, 2)
    assert (second.allowed, second.remaining) == (True, 0)
    assert not third.allowed
    assert 0 < third.retry_after_ms <= 3_600_000


def test_check_rejects_bad_input(pb, channel):
    stub = pb.rl_grpc.RateLimiterStub(channel)
    limit = pb.rl.Limit(fixed_window=pb.rl.FixedWindow(limit=1, window_ms=0))
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(pb.rl.CheckRequest(checks=[pb.rl.LimitCheck(key="k", limit=limit)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fixed_window.window_ms" in err.value.details()


def test_lease_acquire_get_release(pb, channel):
    stub = pb.ls_grpc.LeasesStub(channel)
    got = stub.Acquire(pb.ls.AcquireRequest(name="py-lock", holder="py", ttl_ms=60_000))
    assert got.acquired and got.lease.holder == "py"
    other = stub.Acquire(pb.ls.AcquireRequest(name="py-lock", holder="other", ttl_ms=60_000))
    assert not other.acquired and other.lease.holder == "py"
    now = stub.Get(pb.ls.GetLeaseRequest(name="py-lock"))
    assert now.HasField("lease") and now.lease.fencing_token == got.lease.fencing_token
    stub.Release(pb.ls.ReleaseRequest(name="py-lock", holder="py", fencing_token=got.lease.fencing_token))
    assert not stub.Get(pb.ls.GetLeaseRequest(name="py-lock")).HasField("lease")
    with pytest.raises(grpc.RpcError) as err:
        stub.Release(pb.ls.ReleaseRequest(name="py-lock", holder="py", fencing_token=got.lease.fencing_token))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_idempotency_begin_complete(pb, channel):
    stub = pb.idem_grpc.IdempotencyStub(channel)
    req = pb.idem.BeginRequest(key="py-pay", fingerprint=b"sha256:1", lock_ttl_ms=30_000)
    first = stub.Begin(req)
    assert first.outcome == pb.idem.STARTED
    assert stub.Begin(req).outcome == pb.idem.IN_PROGRESS
    stub.Complete(pb.idem.CompleteRequest(key="py-pay", attempt=first.attempt, response=b"receipt-42"))
    done = stub.Begin(req)
    assert done.outcome == pb.idem.COMPLETED and done.response == b"receipt-42"
    mismatch = stub.Begin(pb.idem.BeginRequest(key="py-pay", fingerprint=b"sha256:2", lock_ttl_ms=30_000))
    assert mismatch.outcome == pb.idem.FINGERPRINT_MISMATCH
