"""What the blocking and the asyncio clients share: channels, request
building, response conversion, error mapping and fingerprints."""

import hashlib
import json
import os
import random
import socket
import uuid
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import grpc

from . import _pb
from .errors import ArbiterError, InvalidArgument, PermissionDenied, Unavailable
from .types import (
    TLS,
    BeginResult,
    ClusterStatus,
    Decision,
    FixedWindow,
    LeakyBucket,
    LeaseEvent,
    LeaseInfo,
    Limit,
    MemberInfo,
    PermitInfo,
    Record,
    Retry,
    SemaphoreEvent,
    SemaphoreState,
    SlidingWindow,
    TokenBucket,
    from_millis,
    millis,
    seconds,
)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

# The server's bound on the length of a key, lease name, holder or
# idempotency key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024


def _pem(value: Union[str, bytes, None]) -> Optional[bytes]:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def channel_args(tls: Optional[TLS]) -> List[Tuple[str, Any]]:
    args: List[Tuple[str, Any]] = [
        # Keep idle connections alive through load balancers and NAT.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if tls is not None and tls.server_name:
        args.append(("grpc.ssl_target_name_override", tls.server_name))
    return args


def credentials(tls: TLS) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls.ca), private_key=_pem(tls.key), certificate_chain=_pem(tls.cert)
    )


def metadata(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    if token is None:
        return ()
    if not token or any(c in token for c in "\r\n"):
        raise ValueError("token must be a non-empty string without line breaks")
    return (("authorization", f"Bearer {token}"),)


def map_error(error: grpc.RpcError, *, retried: bool = False) -> ArbiterError:
    """The ArbiterError for a gRPC error."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (error.details() if callable(getattr(error, "details", None)) else None) or ""
    name = code.name if code is not None else "UNKNOWN"
    message = f"{name}: {details}" if details else name
    cls = ArbiterError
    if code in RETRYABLE:
        cls = Unavailable
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        cls = InvalidArgument
    elif code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        cls = PermissionDenied
    return cls(message, code=name, details=details, retried=retried)


def check_key(value: str, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    size = len(value.encode("utf-8"))
    if not 1 <= size <= MAX_KEY_BYTES:
        raise ValueError(f"{name} must be 1 to {MAX_KEY_BYTES} bytes of UTF-8, got {size}")
    return value


def default_holder() -> str:
    """A holder name unique to this process and call: host, pid, random."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def resolve_key(key: Union[str, Callable[..., str]], args: Sequence[Any], kwargs: Any) -> str:
    return key(*args, **kwargs) if callable(key) else key


# Rate limits ---------------------------------------------------------------


def _limit_into(limit: Limit, target: Any) -> None:
    if isinstance(limit, TokenBucket):
        target.token_bucket.capacity = limit.capacity
        target.token_bucket.refill_tokens = limit.refill_tokens
        target.token_bucket.refill_interval_ms = millis(limit.per, "per")
    elif isinstance(limit, SlidingWindow):
        target.sliding_window.limit = limit.limit
        target.sliding_window.window_ms = millis(limit.window, "window")
    elif isinstance(limit, FixedWindow):
        target.fixed_window.limit = limit.limit
        target.fixed_window.window_ms = millis(limit.window, "window")
    elif isinstance(limit, LeakyBucket):
        target.leaky_bucket.rate = limit.rate
        target.leaky_bucket.interval_ms = millis(limit.per, "per")
        target.leaky_bucket.burst = limit.burst
    else:
        raise TypeError(
            f"limit must be a TokenBucket, SlidingWindow, FixedWindow or LeakyBucket, not {type(limit).__name__}"
        )


def check_request(
    checks: Iterable[Tuple[str, Limit, int]], *, all_or_nothing: bool, dry_run: bool, max_delay_ms: int = 0
) -> Any:
    """`max_delay_ms` > 0 puts every check in reserve mode (leaky buckets)."""
    request = _pb.CheckRequest(all_or_nothing=all_or_nothing)
    for key, limit, cost in checks:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost must be an integer >= 0, got {cost!r}")
        if max_delay_ms and not isinstance(limit, LeakyBucket):
            raise ValueError(f"reserve mode needs a LeakyBucket, not {type(limit).__name__}")
        check = request.checks.add(
            key=check_key(key, "key"), cost=cost, dry_run=dry_run, max_delay_ms=max_delay_ms
        )
        _limit_into(limit, check.limit)
    if not request.checks:
        raise ValueError("check_many needs at least one check")
    return request


def normalise_checks(checks: Iterable[Union[Tuple[str, Limit], Tuple[str, Limit, int]]]) -> List[Tuple[str, Limit, int]]:
    out: List[Tuple[str, Limit, int]] = []
    for item in checks:
        if len(item) == 2:
            out.append((item[0], item[1], 1))
        elif len(item) == 3:
            out.append((item[0], item[1], item[2]))
        else:
            raise ValueError(f"each check is (key, limit) or (key, limit, cost), got {item!r}")
    return out


def decisions(response: Any) -> List[Decision]:
    return [
        Decision(
            allowed=r.allowed,
            remaining=r.remaining,
            limit=r.limit,
            retry_after=from_millis(r.retry_after_ms),
            reset_after=from_millis(r.reset_after_ms),
            delay=r.delay_ms / 1000.0,
        )
        for r in response.results
    ]


def wait_delay(decision: Decision, rng: random.Random) -> float:
    """How long to sleep before checking again after a denial: the server's
    retry_after plus up to 10 % (at most 50 ms) of jitter, so waiters that
    were denied together do not return together."""
    return decision.retry_after + rng.uniform(0.0, min(0.05, decision.retry_after * 0.1))


def reserve_budget(max_delay: float, deadline: Optional[float], now: float) -> int:
    """The max_delay_ms a limiter's next reservation may accept: its own,
    cut to what is left before `deadline` so an admitted wait always fits."""
    budget = max_delay if deadline is None else min(max_delay, max(0.0, deadline - now))
    return int(budget * 1000)


# Leases --------------------------------------------------------------------


def lease_info(lease: Any) -> LeaseInfo:
    return LeaseInfo(
        name=lease.name,
        holder=lease.holder,
        fencing_token=lease.fencing_token,
        ttl=lease.ttl_ms / 1000.0,
        remaining=lease.remaining_ms / 1000.0,
        principal=lease.principal,
    )


def lease_event(event: Any) -> LeaseEvent:
    kind = _pb.EVENT_KINDS.get(event.kind, "KIND_UNSPECIFIED").lower()
    return LeaseEvent(kind=kind, lease=lease_info(event.lease) if event.HasField("lease") else None)


def acquire_request(name: str, holder: str, ttl: Any) -> Any:
    return _pb.AcquireRequest(
        name=check_key(name, "name"), holder=check_key(holder, "holder"), ttl_ms=millis(ttl, "ttl")
    )


def renew_interval(ttl: float) -> float:
    """Renew at about a third of the TTL, so two renewals may fail before the
    lease lapses."""
    return max(ttl / 3.0, 0.001)


# Semaphores ----------------------------------------------------------------


def permit_info(p: Any) -> PermitInfo:
    return PermitInfo(
        name=p.name,
        holder=p.holder,
        permits=p.permits,
        fencing_token=p.fencing_token,
        ttl=p.ttl_ms / 1000.0,
        remaining=p.remaining_ms / 1000.0,
        principal=p.principal,
    )


def sem_acquire_request(name: str, holder: str, limit: int, permits: int, ttl: Any) -> Any:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    if isinstance(permits, bool) or not isinstance(permits, int) or not 1 <= permits <= limit:
        raise ValueError(f"permits must be an integer from 1 to limit ({limit}), got {permits!r}")
    return _pb.SemaphoreAcquireRequest(
        name=check_key(name, "name"),
        holder=check_key(holder, "holder"),
        limit=limit,
        permits=permits,
        ttl_ms=millis(ttl, "ttl"),
    )


def sem_state(r: Any) -> SemaphoreState:
    return SemaphoreState(
        granted=r.granted,
        held=r.held,
        permit=permit_info(r.permit) if r.HasField("permit") else None,
        retry_after=r.retry_after_ms / 1000.0,
    )


def sem_holders(r: Any) -> SemaphoreState:
    holders = tuple(permit_info(p) for p in r.permits)
    return SemaphoreState(granted=False, held=r.held, holders=holders)


def sem_event(e: Any) -> SemaphoreEvent:
    return SemaphoreEvent(
        kind=_pb.SEMAPHORE_EVENT_KINDS.get(e.kind, "unknown").lower(),
        held=e.held,
        permit=permit_info(e.permit) if e.HasField("permit") else None,
        holders=tuple(permit_info(p) for p in e.permits),
    )


def room_made(event: SemaphoreEvent, permits: int, limit: int) -> bool:
    """Whether a watched change may have made room for `permits`."""
    return event.kind in ("released", "expired") or event.held + permits <= limit


# Idempotency ---------------------------------------------------------------


def _describe(value: Any) -> Any:
    # Objects JSON cannot encode (a `self`, a connection) count by their type
    # alone, so a retry in another process fingerprints the same.
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_describe).encode()


def default_fingerprint(args: Sequence[Any], kwargs: Any) -> bytes:
    """SHA-256 of the canonical JSON of the call's arguments."""
    return hashlib.sha256(canonical_json({"args": list(args), "kwargs": kwargs})).digest()


def fingerprint_of(fingerprint: Any, args: Sequence[Any], kwargs: Any) -> bytes:
    if fingerprint is None:
        return default_fingerprint(args, kwargs)
    value = fingerprint(*args, **kwargs)
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise TypeError("fingerprint must return bytes or str")
    return value


def encode_result(value: Any) -> bytes:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"an @idempotent function must return a JSON-serialisable value: {e}") from e


def decode_result(data: bytes) -> Any:
    return json.loads(data.decode()) if data else None


def begin_request(key: str, fingerprint: bytes, lock_ttl: Any, retention: Any) -> Any:
    retention_s = seconds(retention, "retention")
    return _pb.BeginRequest(
        key=check_key(key, "key"),
        fingerprint=fingerprint,
        lock_ttl_ms=millis(lock_ttl, "lock_ttl"),
        retention_ms=round(retention_s * 1000),
    )


def begin_result(response: Any) -> BeginResult:
    return BeginResult(
        outcome=_pb.OUTCOMES.get(response.outcome, "OUTCOME_UNSPECIFIED").lower(),
        attempt=response.attempt,
        response=bytes(response.response),
        retry_after=from_millis(response.retry_after_ms),
    )


def record(response: Any) -> Optional[Record]:
    if not response.HasField("record"):
        return None
    r = response.record
    return Record(
        key=r.key,
        state=_pb.RECORD_STATES.get(r.state, "STATE_UNSPECIFIED").lower(),
        attempt=r.attempt,
        fingerprint=bytes(r.fingerprint),
        response=bytes(r.response),
        expires_after=from_millis(r.expires_after_ms),
    )


def cluster_status(r: Any) -> ClusterStatus:
    return ClusterStatus(
        node_id=r.node_id,
        leader_id=r.leader_id if r.HasField("leader_id") else None,
        term=r.term,
        applied_index=r.applied_index,
        state=r.state,
        members=tuple(MemberInfo(id=m.id, peer_addr=m.peer_addr, voter=m.voter) for m in r.members),
    )


def retry_delay(policy: Retry, error: grpc.RpcError, repeat: int, elapsed: float) -> Optional[float]:
    """The delay before repeating a call that failed with `error`, or None
    when it must not be repeated (a final answer, attempts spent, or the
    policy's deadline would pass)."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    if code not in RETRYABLE or repeat + 1 >= policy.attempts:
        return None
    delay = policy.delay(repeat)
    if policy.deadline is not None and elapsed + delay > policy.deadline:
        return None
    return delay


def in_progress_step(step: float) -> float:
    """The next pause between Begins while another attempt runs: from 20 ms,
    doubling to 500 ms."""
    return min(max(step * 2, 0.02), 0.5)
