"""Shared circuit breakers: the calls one by one (`client.breakers`), and
`client.circuit_breaker(name)`, a decorator and context manager that asks
before each call and reports its outcome itself, for `Client` and
`AsyncClient` alike.

One breaker under a name is shared by every caller of the server, so a
dependency that fails trips it for every process at once."""

import functools
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple, Type, TypeVar, Union

from . import _common as c
from . import _pb
from ._watch import AsyncWatch, Watch
from .errors import ArbiterError, BreakerOpen
from .types import Duration, millis

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .client import Client

log = logging.getLogger("arbiter_client")

F = TypeVar("F", bound=Callable[..., Any])
Errors = Union[Type[BaseException], Tuple[Type[BaseException], ...]]

OUTCOMES = {"success": 0, "failure": 1, "timeout": 2}


@dataclass(frozen=True)
class BreakerConfig:
    """A breaker's thresholds; each left None comes from the server's limits
    files, else the server's default (window 10 s, 20 calls, 50 %, open 5 s,
    1 probe, 3 to close, probe permits of 10 s)."""

    window: Optional[Duration] = None
    min_calls: Optional[int] = None
    failure_percent: Optional[int] = None
    open_for: Optional[Duration] = None
    probes: Optional[int] = None
    probes_to_close: Optional[int] = None
    probe_ttl: Optional[Duration] = None

    def to_proto(self) -> Any:
        def ms(v: Optional[Duration], name: str) -> int:
            return 0 if v is None else millis(v, name)

        return _pb.BreakerConfig(
            window_ms=ms(self.window, "window"),
            min_calls=self.min_calls or 0,
            failure_percent=self.failure_percent or 0,
            open_ms=ms(self.open_for, "open_for"),
            probes=self.probes or 0,
            probes_to_close=self.probes_to_close or 0,
            probe_ttl_ms=ms(self.probe_ttl, "probe_ttl"),
        )


@dataclass(frozen=True)
class BreakerDecision:
    """An answer to `allow`: `phase` is "CLOSED", "OPEN" or "HALF_OPEN";
    `probe_token` is the probe permit to report under (0: none);
    `retry_after` (seconds) when not allowed."""

    phase: str
    allowed: bool
    probe_token: int
    retry_after: float


@dataclass(frozen=True)
class BreakerState:
    """A breaker as it stands: its phase, the window's counts (current and
    previous), and, half-open, the probe permits out and successes so far."""

    name: str
    phase: str
    retry_after: float
    calls: int
    failures: int
    previous_calls: int
    previous_failures: int
    probes_out: int
    probe_successes: int


def _state(s: Any) -> BreakerState:
    return BreakerState(
        name=s.name,
        phase=_pb.BREAKER_PHASES.get(s.phase, str(s.phase)),
        retry_after=s.retry_after_ms / 1000.0,
        calls=s.calls,
        failures=s.failures,
        previous_calls=s.previous_calls,
        previous_failures=s.previous_failures,
        probes_out=s.probes_out,
        probe_successes=s.probe_successes,
    )


def _decision(r: Any) -> BreakerDecision:
    return BreakerDecision(
        phase=_pb.BREAKER_PHASES.get(r.phase, str(r.phase)),
        allowed=r.allowed,
        probe_token=r.probe_token,
        retry_after=r.retry_after_ms / 1000.0,
    )


def _config(config: Optional[BreakerConfig]) -> Any:
    return None if config is None else config.to_proto()


def _allow_request(name: str, config: Optional[BreakerConfig]) -> Any:
    return _pb.BreakerAllowRequest(name=c.check_key(name, "name"), config=_config(config))


def _report_request(name: str, outcome: str, probe_token: int, config: Optional[BreakerConfig]) -> Any:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
    return _pb.BreakerReportRequest(
        name=c.check_key(name, "name"), outcome=OUTCOMES[outcome], probe_token=probe_token, config=_config(config)
    )


def _get_request(name: str, config: Optional[BreakerConfig]) -> Any:
    return _pb.GetBreakerRequest(name=c.check_key(name, "name"), config=_config(config))


def _event(e: Any) -> Tuple[str, BreakerState]:
    return _pb.BREAKER_EVENT_KINDS.get(e.kind, str(e.kind)), _state(e.state)


class Breakers:
    """Breaker calls one by one (`client.breakers`)."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def allow(self, name: str, config: Optional[BreakerConfig] = None) -> BreakerDecision:
        """May a call go now? Half-open, a granted call carries a probe
        permit (`probe_token`) to report its outcome under."""
        return _decision(self._client._call("breaker_allow", _allow_request(name, config)))

    def report(
        self, name: str, outcome: str, probe_token: int = 0, config: Optional[BreakerConfig] = None
    ) -> Tuple[str, bool]:
        """Reports one call's outcome ("success", "failure" or "timeout");
        the phase after it, and whether it counted."""
        r = self._client._call("breaker_report", _report_request(name, outcome, probe_token, config))
        return _pb.BREAKER_PHASES.get(r.phase, str(r.phase)), r.counted

    def get(self, name: str, config: Optional[BreakerConfig] = None) -> BreakerState:
        return _state(self._client._call("breaker_get", _get_request(name, config)))

    def watch(self, name: str) -> "BreakerWatch":
        """("CURRENT" | "CHANGED", BreakerState) pairs: the state first,
        then each phase change."""
        request = _pb.WatchBreakerRequest(name=c.check_key(name, "name"))
        return BreakerWatch(self._client._stream("breaker_watch", request))


class AsyncBreakers:
    """As `Breakers`, each a coroutine (`async_client.breakers`)."""

    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    async def allow(self, name: str, config: Optional[BreakerConfig] = None) -> BreakerDecision:
        return _decision(await self._client._call("breaker_allow", _allow_request(name, config)))

    async def report(
        self, name: str, outcome: str, probe_token: int = 0, config: Optional[BreakerConfig] = None
    ) -> Tuple[str, bool]:
        r = await self._client._call("breaker_report", _report_request(name, outcome, probe_token, config))
        return _pb.BREAKER_PHASES.get(r.phase, str(r.phase)), r.counted

    async def get(self, name: str, config: Optional[BreakerConfig] = None) -> BreakerState:
        return _state(await self._client._call("breaker_get", _get_request(name, config)))

    def watch(self, name: str) -> "AsyncBreakerWatch":
        request = _pb.WatchBreakerRequest(name=c.check_key(name, "name"))
        return AsyncBreakerWatch(self._client._stream("breaker_watch", request))


class BreakerWatch(Watch[Tuple[str, BreakerState]]):
    """An open watch of one breaker: an iterator of (kind, BreakerState)."""

    def __init__(self, call: Any) -> None:
        super().__init__(call, _event)


class AsyncBreakerWatch(AsyncWatch[Tuple[str, BreakerState]]):
    """An open watch of one breaker: an async iterator of (kind, BreakerState)."""

    def __init__(self, call: Any) -> None:
        super().__init__(call, _event)


@dataclass
class _Policy:
    name: str
    config: Optional[BreakerConfig]
    failures: Errors
    timeouts: Errors
    fail_open: bool

    def outcome(self, exc: Optional[BaseException]) -> Optional[str]:
        """What a call that raised `exc` (None: returned) reports: None for
        an exception that says nothing of the dependency (BreakerOpen, or
        one outside `failures` and `timeouts`)."""
        if exc is None:
            return "success"
        if isinstance(exc, BreakerOpen):
            return None
        if isinstance(exc, self.timeouts):
            return "timeout"
        if isinstance(exc, self.failures):
            return "failure"
        return None

    def refused(self, d: BreakerDecision) -> BreakerOpen:
        return BreakerOpen(
            f"circuit breaker {self.name!r} is {d.phase}; retry after {d.retry_after:.3f} s",
            phase=d.phase,
            retry_after=d.retry_after,
        )

    def unreachable(self, e: ArbiterError) -> None:
        """Asking failed: the call goes anyway when `fail_open` (the breaker
        guards a dependency; it must not become one), else the error."""
        if not self.fail_open:
            raise e
        log.warning("circuit breaker %r: could not ask (%s); the call goes", self.name, e)


class CircuitBreaker:
    """`client.circuit_breaker(name)`: use as `with breaker:` or as a
    decorator. Each call asks first (BreakerOpen, with `retry_after`, when
    refused), then reports its outcome: success when it returns, "timeout"
    for an exception in `timeouts`, "failure" for one in `failures`; other
    exceptions report nothing. Half-open, a call runs under a probe permit
    and reports under it. Thread-safe: each thread's calls keep their own
    permits."""

    def __init__(self, client: "Client", policy: _Policy) -> None:
        self._client = client
        self._policy = policy
        self._local = threading.local()

    def _stack(self) -> List[int]:
        stack = getattr(self._local, "tokens", None)
        if stack is None:
            stack = self._local.tokens = []
        return stack

    def __enter__(self) -> BreakerDecision:
        p = self._policy
        try:
            d = self._client.breakers.allow(p.name, p.config)
        except ArbiterError as e:
            p.unreachable(e)
            d = BreakerDecision("UNKNOWN", True, 0, 0.0)
        if not d.allowed:
            raise p.refused(d)
        self._stack().append(d.probe_token)
        return d

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        token = self._stack().pop()
        outcome = self._policy.outcome(exc)
        if outcome is None:
            return
        try:
            self._client.breakers.report(self._policy.name, outcome, token, self._policy.config)
        except ArbiterError as e:
            # The call's own result stands; a lost report is one outcome fewer.
            log.warning("circuit breaker %r: could not report %s (%s)", self._policy.name, outcome, e)

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


class AsyncCircuitBreaker:
    """As `CircuitBreaker`, for `AsyncClient`: `async with breaker:`, or a
    decorator of coroutine functions. Each task's calls keep their own
    permits."""

    def __init__(self, client: "AsyncClient", policy: _Policy) -> None:
        self._client = client
        self._policy = policy
        import contextvars

        self._tokens: "contextvars.ContextVar[Tuple[int, ...]]" = contextvars.ContextVar(
            f"breaker-{policy.name}", default=()
        )

    async def __aenter__(self) -> BreakerDecision:
        p = self._policy
        try:
            d = await self._client.breakers.allow(p.name, p.config)
        except ArbiterError as e:
            p.unreachable(e)
            d = BreakerDecision("UNKNOWN", True, 0, 0.0)
        if not d.allowed:
            raise p.refused(d)
        self._tokens.set(self._tokens.get() + (d.probe_token,))
        return d

    async def __aexit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        tokens = self._tokens.get()
        self._tokens.set(tokens[:-1])
        outcome = self._policy.outcome(exc)
        if outcome is None:
            return
        try:
            await self._client.breakers.report(self._policy.name, outcome, tokens[-1], self._policy.config)
        except ArbiterError as e:
            log.warning("circuit breaker %r: could not report %s (%s)", self._policy.name, outcome, e)

    def __call__(self, fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError("AsyncClient.circuit_breaker decorates coroutine functions (async def)")

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            async with self:
                return await fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def policy(
    name: str,
    config: Optional[BreakerConfig],
    failures: Errors,
    timeouts: Errors,
    fail_open: bool,
) -> _Policy:
    """Checks the arguments now, so a bad one fails before any call."""
    c.check_key(name, "name")
    if config is not None:
        config.to_proto()
    return _Policy(name, config, failures, timeouts, fail_open)
