"""Envoy's rate limit service from an ordinary grpcio client built from
Envoy's proto contract (package envoy.service.ratelimit.v3, the field numbers
Envoy sends), against a real `arbiter serve --limits FILE --rls-headers`."""

import pathlib
import tempfile

import grpc
import pytest
from arbiter_pb import serve

LIMITS = """\
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: path
    value: /login
    rate_limit: {unit: hour, requests_per_unit: 3, name: login}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 1, algorithm: token_bucket}
  - key: path
    value: /api/*
    rate_limit: {unit: second, requests_per_unit: 1000, algorithm: sliding_window}
"""


@pytest.fixture(scope="module")
def rls(pb):
    path = pathlib.Path(tempfile.mkdtemp(prefix="arbiter-py-limits-")) / "edge.yaml"
    path.write_text(LIMITS)
    with serve("--limits", str(path), "--rls-headers") as addr, grpc.insecure_channel(addr) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield pb.rls_grpc.RateLimitServiceStub(ch)


def request(pb, *descriptors, domain="edge", hits_addend=0):
    entry = pb.rl_common.RateLimitDescriptor.Entry
    return pb.rls.RateLimitRequest(
        domain=domain,
        hits_addend=hits_addend,
        descriptors=[pb.rl_common.RateLimitDescriptor(entries=[entry(key=k, value=v) for k, v in d])
                     for d in descriptors],
    )


def test_each_value_gets_its_own_counter(pb, rls):
    code = pb.rls.RateLimitResponse
    ann = request(pb, [("remote_address", "10.0.0.1")])
    answers = [rls.ShouldRateLimit(ann) for _ in range(3)]
    assert [a.overall_code for a in answers] == [code.OK, code.OK, code.OVER_LIMIT]
    assert [a.statuses[0].limit_remaining for a in answers] == [1, 0, 0]
    last = answers[2].statuses[0]
    assert last.current_limit.requests_per_unit == 2
    assert last.current_limit.unit == code.RateLimit.MINUTE
    assert 0 < last.duration_until_reset.seconds <= 60
    other = rls.ShouldRateLimit(request(pb, [("remote_address", "10.0.0.2")]))
    assert other.overall_code == code.OK and other.statuses[0].limit_remaining == 1


def test_nested_rules_names_and_headers(pb, rls):
    code = pb.rls.RateLimitResponse
    both = request(pb, [("path", "/login")], [("path", "/login"), ("user", "bob")])
    first = rls.ShouldRateLimit(both)
    assert first.overall_code == code.OK
    assert [s.current_limit.name for s in first.statuses][0] == "login"
    assert [s.limit_remaining for s in first.statuses] == [2, 0]
    headers = {h.key: h.value for h in first.response_headers_to_add}
    assert headers["RateLimit-Limit"] == "1"
    assert headers["RateLimit-Remaining"] == "0"
    # The user's bucket is empty: the request is denied and, all-or-nothing,
    # the login rule's counter is not consumed by it (its status says what
    # is left).
    second = rls.ShouldRateLimit(both)
    assert second.overall_code == code.OVER_LIMIT
    assert [s.code for s in second.statuses] == [code.OK, code.OVER_LIMIT]
    assert second.statuses[0].limit_remaining == 2
    alone = rls.ShouldRateLimit(request(pb, [("path", "/login")]))
    assert alone.overall_code == code.OK and alone.statuses[0].limit_remaining == 1


def test_hits_addend_wildcards_and_unmatched(pb, rls):
    code = pb.rls.RateLimitResponse
    big = rls.ShouldRateLimit(request(pb, [("path", "/api/orders")], hits_addend=600))
    assert big.overall_code == code.OK and big.statuses[0].limit_remaining == 400
    over = rls.ShouldRateLimit(request(pb, [("path", "/api/orders")], hits_addend=500))
    assert over.overall_code == code.OVER_LIMIT
    # As in envoyproxy/ratelimit, each value a wildcard matches is counted on its own.
    users = rls.ShouldRateLimit(request(pb, [("path", "/api/users")], hits_addend=500))
    assert users.overall_code == code.OK and users.statuses[0].limit_remaining == 500
    assert users.statuses[0].current_limit.name == ""  # unnamed, as envoyproxy/ratelimit reports it
    unmatched = rls.ShouldRateLimit(request(pb, [("path", "/elsewhere")], [("nothing", "here")]))
    assert unmatched.overall_code == code.OK
    assert [s.code for s in unmatched.statuses] == [code.OK, code.OK]
    other_domain = rls.ShouldRateLimit(request(pb, [("remote_address", "10.0.0.1")], domain="unknown"))
    assert other_domain.overall_code == code.OK


def test_a_request_without_a_domain_is_refused(pb, rls):
    with pytest.raises(grpc.RpcError) as err:
        rls.ShouldRateLimit(request(pb, [("path", "/login")], domain=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "domain" in err.value.details()
