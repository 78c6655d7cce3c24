"""The asyncio client: `AsyncClient` has every method of `Client`, as
coroutines (and async context managers and iterators)."""

import asyncio
import functools
import inspect
import logging
import random
import time
from typing import Any, AsyncIterator, Awaitable, Callable, List, Optional, Sequence, Tuple, TypeVar, Union

import grpc
import grpc.aio

from . import _common as c
from . import _pb
from ._keepalive import keep_alive_async, pump_async
from ._watch import AsyncWatch
from ._routing import READ_TIMEOUT, SlotRoutes
from .errors import (
    ArbiterError,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    LeaseLost,
    LeaseNotHeld,
    RateLimited,
    Unavailable,
)
from .types import (
    TLS,
    BeginResult,
    ClusterStatus,
    Decision,
    Duration,
    Leader,
    LeaseEvent,
    LeakyBucket,
    LeaseInfo,
    Limit,
    Record,
    Retry,
    max_delay_millis,
    millis,
    seconds,
)

from .aio_semaphores import AsyncSemaphore, AsyncSemaphores
from .breakers import AsyncBreakers, AsyncCircuitBreaker, BreakerConfig, Errors, policy

log = logging.getLogger("arbiter_client")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
KeyArg = Union[str, Callable[..., str]]

_NO_RETRY = Retry(attempts=1)


def _coroutine_function(fn: Any, decorator: str) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"AsyncClient.{decorator} decorates coroutine functions (async def); use Client for others")


class AsyncClient:
    """The asyncio twin of `Client`: same arguments, same methods, each a
    coroutine; `async with` closes it. Create it inside the event loop that
    uses it."""

    def __init__(
        self,
        target: str = "127.0.0.1:7070",
        *,
        tls: Optional[TLS] = None,
        token: Optional[str] = None,
        timeout: float = 5.0,
        retry: Optional[Retry] = None,
        members: Optional[Sequence[str]] = None,
        route_refresh: float = 5.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        args = c.channel_args(tls)

        def channel(addr: str) -> Any:
            if tls is None:
                return grpc.aio.insecure_channel(addr, options=args)
            return grpc.aio.secure_channel(addr, c.credentials(tls), options=args)

        self._channel = channel(target)
        self._routes = SlotRoutes(members, route_refresh) if members is not None else None
        self._member_channels = {m: channel(m) for m in members or ()}
        self._member_methods = {m: _pb.bind(ch) for m, ch in self._member_channels.items()}
        self.target = target
        self.timeout = float(timeout)
        self.retry = retry if retry is not None else Retry()
        self._metadata = c.metadata(token)
        self._methods = _pb.bind(self._channel)
        self._rng = random.Random()
        self.leases = AsyncLeases(self)
        self.semaphores = AsyncSemaphores(self)
        self.breakers = AsyncBreakers(self)
        self.idempotency = AsyncIdempotency(self)

    async def close(self) -> None:
        await self._channel.close()
        for ch in self._member_channels.values():
            await ch.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def _call(
        self,
        name: str,
        request: Any,
        *,
        timeout: Optional[float] = None,
        retry: bool = True,
        member: Optional[str] = None,
    ) -> Any:
        method = (self._methods if member is None else self._member_methods[member])[name]
        policy = self.retry if retry else _NO_RETRY
        start = time.monotonic()
        repeat = 0
        while True:
            try:
                return await method(
                    request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata
                )
            except grpc.RpcError as e:
                delay = c.retry_delay(policy, e, repeat, time.monotonic() - start)
                if delay is None:
                    raise c.map_error(e, retried=repeat > 0) from e
            await asyncio.sleep(delay)
            repeat += 1

    def _stream(self, name: str, request: Any) -> Any:
        return self._methods[name](request, metadata=self._metadata)

    async def status(self) -> ClusterStatus:
        return c.cluster_status(await self._call("status", _pb.ClusterStatusRequest()))

    # Rate limits -----------------------------------------------------------

    async def check(self, key: str, limit: Limit, cost: int = 1, dry_run: bool = False) -> Decision:
        return (await self._decide([(key, limit, cost)], all_or_nothing=False, dry_run=dry_run))[0]

    async def check_many(
        self,
        checks: Sequence[Union[Tuple[str, Limit], Tuple[str, Limit, int]]],
        all_or_nothing: bool = False,
    ) -> List[Decision]:
        return await self._decide(c.normalise_checks(checks), all_or_nothing=all_or_nothing, dry_run=False)

    async def reserve(self, key: str, limit: LeakyBucket, max_delay: Duration, cost: int = 1) -> Decision:
        """As `Client.reserve`."""
        ms = max_delay_millis(max_delay)
        return (await self._decide([(key, limit, cost)], all_or_nothing=False, dry_run=False, max_delay_ms=ms))[0]

    def limiter(self, key: str, limit: LeakyBucket, max_delay: Duration = 1.0) -> "AsyncLimiter":
        """As `Client.limiter`; `acquire()` awaits the wait."""
        return AsyncLimiter(self, key, limit, max_delay_millis(max_delay) / 1000.0)

    async def _decide(
        self, checks: List[Tuple[str, Limit, int]], *, all_or_nothing: bool, dry_run: bool, max_delay_ms: int = 0
    ) -> List[Decision]:
        """As `Client._decide`; the groups of a split call go at once."""
        routes = self._routes
        if routes is None:
            return await self._check_at(None, checks, all_or_nothing, dry_run, max_delay_ms)
        if routes.due():
            await self._read_routes(routes)
        groups = routes.split([key for key, _, _ in checks])
        if all_or_nothing or len(groups) == 1:
            return await self._check_at(groups[0][0], checks, all_or_nothing, dry_run, max_delay_ms)
        answers = await asyncio.gather(
            *(self._check_at(member, [checks[i] for i in positions], False, dry_run) for member, positions in groups)
        )
        out: List[Optional[Decision]] = [None] * len(checks)
        for (_, positions), decided in zip(groups, answers):
            for i, d in zip(positions, decided):
                out[i] = d
        return [d for d in out if d is not None]

    async def _check_at(
        self,
        member: Optional[str],
        checks: List[Tuple[str, Limit, int]],
        all_or_nothing: bool,
        dry_run: bool,
        max_delay_ms: int = 0,
    ) -> List[Decision]:
        request = c.check_request(checks, all_or_nothing=all_or_nothing, dry_run=dry_run, max_delay_ms=max_delay_ms)
        if member is not None:
            try:
                return self._hinted(await self._call("check", request, member=member, retry=False))
            except Unavailable:
                # As `Client._check_at`: on through `target`.
                assert self._routes is not None
                self._routes.stale()
        return self._hinted(await self._call("check", request))

    def _hinted(self, response: Any) -> List[Decision]:
        """The decisions of `response`, after taking its owner hint."""
        if self._routes is not None:
            self._routes.hinted(response.slot_map_version, response.owner_hint)
        return c.decisions(response)

    async def _read_routes(self, routes: SlotRoutes) -> None:
        async def ask(member: str) -> Optional[Tuple[str, Any]]:
            try:
                return member, await self._call(
                    "status",
                    _pb.ClusterStatusRequest(slot_owners=True),
                    member=member,
                    retry=False,
                    timeout=min(self.timeout, READ_TIMEOUT),
                )
            except ArbiterError:
                return None

        # Asked at once: a member that does not answer costs one timeout.
        answers = await asyncio.gather(*(ask(m) for m in routes.members))
        routes.take([a for a in answers if a is not None])

    async def wait(self, key: str, limit: Limit, cost: int = 1, timeout: Optional[float] = None) -> Decision:
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        while True:
            decision = await self.check(key, limit, cost)
            if decision.allowed:
                return decision
            pause = c.wait_delay(decision, self._rng)
            if decision.retry_after == float("inf") or (deadline is not None and time.monotonic() + pause > deadline):
                raise RateLimited(f"rate limited on {key!r}: retry after {decision.retry_after:.3f} s", decision)
            await asyncio.sleep(pause)

    def rate_limited(
        self, key: KeyArg, limit: Limit, cost: int = 1, wait: bool = True, timeout: Optional[float] = None
    ) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            _coroutine_function(fn, "rate_limited")

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = c.resolve_key(key, args, kwargs)
                if wait:
                    await self.wait(k, limit, cost, timeout)
                else:
                    decision = await self.check(k, limit, cost)
                    if not decision.allowed:
                        raise RateLimited(f"rate limited on {k!r}: retry after {decision.retry_after:.3f} s", decision)
                return await fn(*args, **kwargs)

            return wrapper  # type: ignore[return-value]

        return decorate

    # Leases ----------------------------------------------------------------

    def lease(
        self,
        name: str,
        ttl: Duration = 10.0,
        holder: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> "AsyncLease":
        """`async with client.lease(name) as lease:` (see Client.lease)."""
        return AsyncLease(self, name, ttl, holder or c.default_holder(), wait, timeout)

    async def get_lease(self, name: str) -> Optional[LeaseInfo]:
        return await self.leases.get(name)

    def watch_lease(self, name: str) -> "AsyncLeaseWatch":
        """`async for event in client.watch_lease(name):`"""
        return self.leases.watch(name)

    def circuit_breaker(
        self,
        name: str,
        config: Optional[BreakerConfig] = None,
        *,
        failures: Errors = Exception,
        timeouts: Errors = TimeoutError,
        fail_open: bool = True,
    ) -> AsyncCircuitBreaker:
        """As `Client.circuit_breaker`: `async with` or a decorator of
        coroutine functions (asyncio.TimeoutError reports "timeout")."""
        return AsyncCircuitBreaker(self, policy(name, config, failures, timeouts, fail_open))

    def semaphore(
        self,
        name: str,
        limit: int,
        permits: int = 1,
        ttl: Duration = 10.0,
        holder: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> AsyncSemaphore:
        """As `Client.semaphore`: `async with client.semaphore(name, limit=10):`."""
        return AsyncSemaphore(self, name, limit, permits, ttl, holder or c.default_holder(), wait, timeout)

    def election(self, name: str, candidate: str, ttl: Duration = 10.0) -> "AsyncElection":
        return AsyncElection(self, name, candidate, ttl)

    # Idempotency -----------------------------------------------------------

    def idempotent(
        self,
        key: KeyArg,
        lock_ttl: Duration = 30.0,
        retention: Duration = 86400.0,
        fingerprint: Optional[Callable[..., Union[bytes, str]]] = None,
        wait: Duration = 0.0,
    ) -> Callable[[F], F]:
        """Runs a coroutine function once per key (see Client.idempotent)."""
        wait_s = seconds(wait, "wait")

        def decorate(fn: F) -> F:
            _coroutine_function(fn, "idempotent")

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = c.resolve_key(key, args, kwargs)
                fp = c.fingerprint_of(fingerprint, args, kwargs)
                deadline = time.monotonic() + wait_s
                step = 0.0
                while True:
                    begun = await self.idempotency.begin(k, fp, lock_ttl, retention)
                    if begun.outcome == "started":
                        break
                    if begun.outcome == "completed":
                        return c.decode_result(begun.response)
                    if begun.outcome == "fingerprint_mismatch":
                        raise IdempotencyKeyMismatch(f"idempotency key {k!r} was used with a different payload")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise IdempotencyInProgress(
                            f"idempotency key {k!r} is in progress in another attempt", begun.retry_after
                        )
                    step = c.in_progress_step(step)
                    await asyncio.sleep(min(left, step, begun.retry_after))
                try:
                    result = await fn(*args, **kwargs)
                    data = c.encode_result(result)
                except BaseException:
                    await self._abort_quietly(k, begun.attempt)
                    raise
                await self.idempotency.complete(k, begun.attempt, data)
                return result

            return wrapper  # type: ignore[return-value]

        return decorate

    async def _abort_quietly(self, key: str, attempt: int) -> None:
        try:
            await self.idempotency.abort(key, attempt)
        except ArbiterError as e:
            log.warning("could not abort idempotency attempt %s of %r: %s", attempt, key, e)


class AsyncLimiter:
    """As `Limiter`, for asyncio (`AsyncClient.limiter`)."""

    def __init__(self, client: AsyncClient, key: str, limit: LeakyBucket, max_delay: float) -> None:
        self._client = client
        self.key = key
        self.limit = limit
        self.max_delay = max_delay

    async def acquire(self, cost: int = 1, timeout: Optional[Duration] = None) -> Decision:
        """As `Limiter.acquire`, sleeping with asyncio."""
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        while True:
            ms = c.reserve_budget(self.max_delay, deadline, time.monotonic())
            decision = (
                await self._client._decide(
                    [(self.key, self.limit, cost)], all_or_nothing=False, dry_run=False, max_delay_ms=ms
                )
            )[0]
            if decision.allowed:
                await asyncio.sleep(decision.delay)
                return decision
            pause = c.wait_delay(decision, self._client._rng)
            if decision.retry_after == float("inf") or (deadline is not None and time.monotonic() + pause > deadline):
                raise RateLimited(f"rate limited on {self.key!r}: retry after {decision.retry_after:.3f} s", decision)
            await asyncio.sleep(pause)

    async def __aenter__(self) -> Decision:
        return await self.acquire()

    async def __aexit__(self, *exc: Any) -> None:
        return None


class AsyncLeases:
    """Lease calls one by one (`client.leases`)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def acquire(self, name: str, holder: str, ttl: Duration) -> Tuple[bool, LeaseInfo]:
        r = await self._client._call("acquire", c.acquire_request(name, holder, ttl))
        return r.acquired, c.lease_info(r.lease)

    async def renew(
        self, name: str, holder: str, fencing_token: int, ttl: Duration, *, timeout: Optional[float] = None
    ) -> LeaseInfo:
        request = _pb.RenewRequest(
            name=name, holder=holder, fencing_token=fencing_token, ttl_ms=millis(ttl, "ttl")
        )
        try:
            r = await self._client._call("renew", request, timeout=timeout, retry=timeout is None)
            return c.lease_info(r.lease)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                raise LeaseNotHeld(f"lease {name!r} is no longer held by {holder!r}: {e.details}") from e
            raise

    async def release(self, name: str, holder: str, fencing_token: int) -> None:
        request = _pb.ReleaseRequest(name=name, holder=holder, fencing_token=fencing_token)
        try:
            await self._client._call("release", request)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                if e.retried:
                    return
                raise LeaseNotHeld(f"lease {name!r} is not held by {holder!r}: {e.details}") from e
            raise

    async def get(self, name: str) -> Optional[LeaseInfo]:
        r = await self._client._call("get_lease", _pb.GetLeaseRequest(name=c.check_key(name, "name")))
        return c.lease_info(r.lease) if r.HasField("lease") else None

    def watch(self, name: str) -> "AsyncLeaseWatch":
        request = _pb.WatchLeaseRequest(name=c.check_key(name, "name"))
        return AsyncLeaseWatch(self._client._stream("watch_lease", request))


class AsyncLeaseWatch(AsyncWatch[LeaseEvent]):
    """An open watch of one lease: an async iterator of LeaseEvent."""

    def __init__(self, call: Any) -> None:
        super().__init__(call, c.lease_event)


class AsyncLease:
    """The asyncio twin of `Lease`; `lost` is an asyncio.Event."""

    def __init__(
        self, client: AsyncClient, name: str, ttl: Duration, holder: str, wait: bool, timeout: Optional[float]
    ) -> None:
        self._client = client
        self.name = c.check_key(name, "name")
        self.holder = c.check_key(holder, "holder")
        self.ttl = seconds(ttl, "ttl")
        millis(ttl, "ttl")
        self._wait = wait
        self._timeout = timeout
        self.fencing_token: Optional[int] = None
        self.lost = asyncio.Event()
        self._renewer: Optional["asyncio.Task[None]"] = None

    @property
    def held(self) -> bool:
        return self.fencing_token is not None and not self.lost.is_set()

    async def acquire(self, wait: Optional[bool] = None, timeout: Optional[float] = None) -> LeaseInfo:
        if self._renewer is not None:
            raise ArbiterError(f"lease {self.name!r} is already acquired by this object")
        wait = self._wait if wait is None else wait
        timeout = self._timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        sent = time.monotonic()
        acquired, info = await self._client.leases.acquire(self.name, self.holder, self.ttl)
        if not acquired:
            if not wait:
                raise LeaseNotHeld(f"lease {self.name!r} is held by {info.holder!r}")
            sent, info = await self._wait_for_it(info, deadline)
        self.fencing_token = info.fencing_token
        self.lost.clear()
        self._renewer = asyncio.ensure_future(self._keep_alive(sent + info.remaining))
        return info

    async def _wait_for_it(self, current: LeaseInfo, deadline: Optional[float]) -> Tuple[float, LeaseInfo]:
        events: "asyncio.Queue[Any]" = asyncio.Queue(maxsize=64)
        repeat = 0
        while True:
            watch = self._client.leases.watch(self.name)
            pump = asyncio.ensure_future(pump_async(watch, events))
            try:
                while True:
                    wake = current.remaining + 0.05
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise LeaseNotHeld(
                                f"lease {self.name!r} is held by {current.holder!r}; not acquired in time"
                            )
                        wake = min(wake, left)
                    try:
                        item = await asyncio.wait_for(events.get(), timeout=max(wake, 0.0))
                    except asyncio.TimeoutError:
                        item = None
                    if isinstance(item, ArbiterError):
                        break
                    if isinstance(item, LeaseEvent) and item.kind in ("current", "acquired", "renewed"):
                        if item.lease is not None:
                            current = item.lease
                            continue
                    sent = time.monotonic()
                    acquired, info = await self._client.leases.acquire(self.name, self.holder, self.ttl)
                    if acquired:
                        return sent, info
                    current = info
                    repeat = 0
            finally:
                watch.cancel()
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            await asyncio.sleep(self._client.retry.delay(min(repeat, 5)))
            repeat += 1

    async def _keep_alive(self, expires: float) -> None:
        token = self.fencing_token
        assert token is not None

        async def renew(timeout: float) -> float:
            info = await self._client.leases.renew(self.name, self.holder, token, self.ttl, timeout=timeout)
            return info.remaining

        await keep_alive_async(self.lost, expires, self.ttl, renew, LeaseNotHeld, f"lease {self.name!r}")

    async def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None

    async def release(self) -> None:
        await self._stop_renewing()
        token, self.fencing_token = self.fencing_token, None
        if token is None:
            return
        if self.lost.is_set():
            raise LeaseLost(f"lease {self.name!r} (token {token}) was lost while held")
        try:
            await self._client.leases.release(self.name, self.holder, token)
        except LeaseNotHeld as e:
            self.lost.set()
            raise LeaseLost(f"lease {self.name!r} (token {token}) was lost while held") from e

    async def __aenter__(self) -> "AsyncLease":
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await self.release()
        except LeaseLost:
            if exc_type is None:
                raise
        except ArbiterError as e:
            log.warning("could not release lease %r: %s", self.name, e)



class AsyncElection:
    """The asyncio twin of `Election`."""

    def __init__(self, client: AsyncClient, name: str, candidate: str, ttl: Duration) -> None:
        self._client = client
        self.name = name
        self.candidate = candidate
        self._lease = AsyncLease(client, name, ttl, candidate, True, None)

    @property
    def is_leader(self) -> bool:
        return self._lease.held

    @property
    def fencing_token(self) -> Optional[int]:
        return self._lease.fencing_token if self._lease.held else None

    @property
    def lost(self) -> asyncio.Event:
        return self._lease.lost

    async def campaign(self, timeout: Optional[float] = None) -> Leader:
        if self._lease._renewer is not None and not self._lease.held:
            await self._lease._stop_renewing()
            self._lease.fencing_token = None
        if not self._lease.held:
            await self._lease.acquire(wait=True, timeout=timeout)
        assert self._lease.fencing_token is not None
        return Leader(self.candidate, self._lease.fencing_token)

    async def resign(self) -> None:
        try:
            await self._lease.release()
        except LeaseLost:
            pass

    async def observe(self) -> AsyncIterator[Optional[Leader]]:
        last: Any = ()
        repeat = 0
        while True:
            try:
                async with self._client.leases.watch(self.name) as watch:
                    async for event in watch:
                        repeat = 0
                        lease = event.lease if event.kind in ("current", "acquired", "renewed") else None
                        now = Leader(lease.holder, lease.fencing_token) if lease else None
                        if now != last:
                            last = now
                            yield now
            except Unavailable:
                await asyncio.sleep(self._client.retry.delay(min(repeat, 5)))
                repeat += 1

    async def __aenter__(self) -> "AsyncElection":
        await self.campaign()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.resign()


class AsyncIdempotency:
    """Idempotency calls one by one (`client.idempotency`)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def begin(
        self, key: str, fingerprint: bytes = b"", lock_ttl: Duration = 30.0, retention: Duration = 86400.0
    ) -> BeginResult:
        request = c.begin_request(key, fingerprint, lock_ttl, retention)
        return c.begin_result(await self._client._call("begin", request))

    async def complete(self, key: str, attempt: int, response: bytes) -> None:
        try:
            await self._client._call("complete", _pb.CompleteRequest(key=key, attempt=attempt, response=response))
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION" and e.retried:
                record = await self.get(key)
                if record is not None and record.attempt == attempt and record.state == "completed":
                    return
            raise

    async def abort(self, key: str, attempt: int) -> None:
        try:
            await self._client._call("abort", _pb.AbortRequest(key=key, attempt=attempt))
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION" and e.retried:
                record = await self.get(key)
                if record is None or record.attempt != attempt:
                    return
            raise

    async def get(self, key: str) -> Optional[Record]:
        r = await self._client._call("get_record", _pb.GetRecordRequest(key=c.check_key(key, "key")))
        return c.record(r)
