"""Values the client takes and returns: limit definitions, decisions, leases,
idempotency records, TLS settings and the retry policy."""

import math
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Tuple, Union

Duration = Union[float, int, timedelta]
"""Seconds (int or float) or a timedelta."""

U64_MAX = 2**64 - 1


def seconds(value: Duration, name: str) -> float:
    """`value` in seconds; ValueError naming `name` when it is negative or not
    a duration."""
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        s = float(value)
    else:
        raise TypeError(f"{name} must be seconds (int or float) or a timedelta, not {type(value).__name__}")
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"{name} must be a finite duration >= 0, got {value!r}")
    return s


def millis(value: Duration, name: str) -> int:
    """`value` in whole milliseconds, at least 1."""
    ms = round(seconds(value, name) * 1000)
    if ms < 1:
        raise ValueError(f"{name} must be at least 1 ms, got {value!r}")
    return ms


def from_millis(ms: int) -> float:
    """Server milliseconds in seconds; u64::MAX (never) is math.inf."""
    return math.inf if ms == U64_MAX else ms / 1000.0


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class TokenBucket:
    """Up to `capacity` tokens, refilled continuously by `refill_tokens` every
    `per`. A new bucket starts full."""

    capacity: int
    refill_tokens: int
    per: Duration

    def __post_init__(self) -> None:
        _positive("capacity", self.capacity)
        _positive("refill_tokens", self.refill_tokens)
        millis(self.per, "per")


@dataclass(frozen=True)
class SlidingWindow:
    """At most `limit` units in any `window` (estimated from two aligned
    counters)."""

    limit: int
    window: Duration

    def __post_init__(self) -> None:
        _positive("limit", self.limit)
        millis(self.window, "window")


@dataclass(frozen=True)
class FixedWindow:
    """At most `limit` units per `window`, windows aligned to the Unix
    epoch."""

    limit: int
    window: Duration

    def __post_init__(self) -> None:
        _positive("limit", self.limit)
        millis(self.window, "window")


@dataclass(frozen=True)
class LeakyBucket:
    """Work drains at `rate` units every `per`, up to `burst` at once (GCRA).
    A plain check admits what a token bucket of `burst` tokens would; in
    reserve mode (`Client.reserve`, `Client.limiter`) a check that can start
    within its max_delay is admitted and told how long to wait, so work goes
    out at the rate instead of being refused."""

    rate: int
    per: Duration
    burst: int = 1

    def __post_init__(self) -> None:
        _positive("rate", self.rate)
        _positive("burst", self.burst)
        millis(self.per, "per")


Limit = Union[TokenBucket, SlidingWindow, FixedWindow, LeakyBucket]

MAX_DELAY = 3600.0
"""The longest wait reserve mode accepts, in seconds (the server's bound)."""


def max_delay_millis(value: Duration) -> int:
    """Reserve mode's max_delay in whole ms: 0 to an hour."""
    ms = round(seconds(value, "max_delay") * 1000)
    if ms > MAX_DELAY * 1000:
        raise ValueError(f"max_delay must be at most {MAX_DELAY:.0f} s, got {value!r}")
    return ms


@dataclass(frozen=True)
class Decision:
    """A rate-limit decision. Durations in seconds; `retry_after` is 0 when
    allowed and math.inf when the cost exceeds the limit itself; `delay` is
    reserve mode's wait."""

    allowed: bool
    remaining: int
    limit: int
    retry_after: float
    reset_after: float
    delay: float = 0.0
    """When allowed in reserve mode: seconds to wait before starting the
    work (0: now)."""


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as the server reports it. `ttl` and `remaining` in seconds."""

    name: str
    holder: str
    fencing_token: int
    ttl: float
    remaining: float
    principal: str = ""


@dataclass(frozen=True)
class LeaseEvent:
    """A change of a watched lease. `kind` is "current" (the state when the
    watch started; `lease` None when free), "acquired", "renewed",
    "released" or "expired"."""

    kind: str
    lease: Optional[LeaseInfo]


@dataclass(frozen=True)
class Leader:
    """Who leads an election, and the fencing token of its term."""

    candidate: str
    fencing_token: int


@dataclass(frozen=True)
class PermitInfo:
    """One holder's permits under a semaphore. `ttl` and `remaining` in
    seconds."""

    name: str
    holder: str
    permits: int
    fencing_token: int
    ttl: float
    remaining: float
    principal: str = ""


@dataclass(frozen=True)
class SemaphoreState:
    """A semaphore as an acquire or a get found it: whether the caller's
    permits were granted (acquire), the permits held by everyone, the
    caller's permit, the holders (get), and, when not granted, the seconds
    until the next holder's permits lapse unless renewed."""

    granted: bool
    held: int
    permit: Optional[PermitInfo] = None
    holders: Tuple[PermitInfo, ...] = ()
    retry_after: float = 0.0


@dataclass(frozen=True)
class SemaphoreEvent:
    """A change under a watched semaphore: `kind` is "current" (the holders
    as they stand, in `holders`), "acquired", "renewed", "released" or
    "expired" (about `permit`); `held` is what is held after it."""

    kind: str
    held: int
    permit: Optional[PermitInfo] = None
    holders: Tuple[PermitInfo, ...] = ()


@dataclass(frozen=True)
class BeginResult:
    """The answer to an idempotency Begin. `outcome` is "started" (this
    caller owns `attempt` and must complete or abort it), "in_progress"
    (another attempt holds the key for `retry_after` seconds more),
    "completed" (`response` is the stored result) or
    "fingerprint_mismatch"."""

    outcome: str
    attempt: int
    response: bytes = b""
    retry_after: float = 0.0


@dataclass(frozen=True)
class Record:
    """An idempotency record. `state` is "in_progress" or "completed";
    `expires_after` is the seconds until the lock lapses (in progress) or
    the record is purged (completed)."""

    key: str
    state: str
    attempt: int
    fingerprint: bytes
    response: bytes
    expires_after: float


@dataclass(frozen=True)
class MemberInfo:
    id: int
    peer_addr: str
    voter: bool


@dataclass(frozen=True)
class ClusterStatus:
    """The cluster as the node the client reached sees it."""

    node_id: int
    leader_id: Optional[int]
    term: int
    applied_index: int
    state: str
    members: Tuple[MemberInfo, ...] = ()


@dataclass(frozen=True)
class TLS:
    """TLS to the server. Each of `ca` (the CA that signed the server's
    certificate; None uses the system roots), `cert` and `key` (a client
    certificate, for servers that verify clients) is a file path or the PEM
    bytes. `server_name` overrides the name checked in the server's
    certificate (when the target is an IP address, for example)."""

    ca: Union[str, bytes, None] = None
    cert: Union[str, bytes, None] = None
    key: Union[str, bytes, None] = None
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS cert and key must be given together")


@dataclass(frozen=True)
class Retry:
    """Retries of calls that are safe to repeat, on UNAVAILABLE and
    DEADLINE_EXCEEDED: at most `attempts` tries in all, the n-th repeat
    after a delay drawn uniformly from [0, min(cap, base * 2**n)] ("full
    jitter"), and none that would start after `deadline` seconds from the
    first try (None: no deadline). Retry(attempts=1) turns retries off."""

    attempts: int = 6
    base: float = 0.1
    cap: float = 2.0
    deadline: Optional[float] = 10.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive("attempts", self.attempts)
        if self.base < 0 or self.cap < 0:
            raise ValueError("Retry base and cap must be >= 0")
        if self.deadline is not None and self.deadline < 0:
            raise ValueError("Retry deadline must be >= 0 or None")

    def delay(self, repeat: int) -> float:
        """The delay before repeat number `repeat` (0 for the first repeat)."""
        return self.rng.uniform(0.0, min(self.cap, self.base * (2.0**repeat)))
