"""The blocking client."""

import functools
import logging
import queue
import random
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from . import _common as c
from . import _pb
from ._keepalive import keep_alive, pump as pump_events
from ._watch import Watch
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
    LeaseInfo,
    LeakyBucket,
    Limit,
    Record,
    Retry,
    max_delay_millis,
    millis,
    seconds,
)

from .breakers import BreakerConfig, Breakers, CircuitBreaker, Errors, policy
from .semaphores import Semaphore, Semaphores

log = logging.getLogger("arbiter_client")

F = TypeVar("F", bound=Callable[..., Any])
KeyArg = Union[str, Callable[..., str]]

_NO_RETRY = Retry(attempts=1)


class Client:
    """A blocking client of one Arbiter server (or a cluster behind one
    address: any member answers, forwarding writes to the leader).

    `target` is a gRPC target ("host:port", "dns:///name:port"); `tls` turns
    on TLS; `token` is sent as `authorization: Bearer` on every call;
    `timeout` is each call's deadline in seconds; `retry` is the retry
    policy for UNAVAILABLE and DEADLINE_EXCEEDED (None: `Retry()`). Every
    call is safe to repeat: lease and idempotency calls are idempotent for
    their holder or attempt, and a rate-limit check repeated after a lost
    answer can only consume more (deny sooner), never admit more.

    `members` (each member's client address, e.g. a StatefulSet's pods)
    turns on slot routing for a cluster started with `--slot-owners
    spread`: the client reads the slot map (again every `route_refresh`
    seconds, and after a member fails a call), sends each check to the
    member that owns its key's slot and splits a call whose keys have
    several owners, answering in the order asked. A check whose owner is
    not known, or does not answer, goes to `target` (any member answers
    for any key). All-or-nothing calls are never split.

    Thread-safe; use one per process. Close it (or use `with`) to end its
    connections."""

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

        def channel(addr: str) -> grpc.Channel:
            if tls is None:
                return grpc.insecure_channel(addr, options=args)
            return grpc.secure_channel(addr, c.credentials(tls), options=args)

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
        self.leases = Leases(self)
        self.semaphores = Semaphores(self)
        self.breakers = Breakers(self)
        self.idempotency = Idempotency(self)

    def close(self) -> None:
        self._channel.close()
        for ch in self._member_channels.values():
            ch.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(
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
                return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = c.retry_delay(policy, e, repeat, time.monotonic() - start)
                if delay is None:
                    raise c.map_error(e, retried=repeat > 0) from e
            time.sleep(delay)
            repeat += 1

    def _stream(self, name: str, request: Any) -> Any:
        return self._methods[name](request, metadata=self._metadata)

    def status(self) -> ClusterStatus:
        """The cluster as the reached node sees it (members, leader, term)."""
        return c.cluster_status(self._call("status", _pb.ClusterStatusRequest()))

    # Rate limits -----------------------------------------------------------

    def check(self, key: str, limit: Limit, cost: int = 1, dry_run: bool = False) -> Decision:
        """Checks `key` against `limit`, consuming `cost` when allowed (not
        when `dry_run`, nor when cost is 0)."""
        return self._decide([(key, limit, cost)], all_or_nothing=False, dry_run=dry_run)[0]

    def check_many(
        self,
        checks: Sequence[Union[Tuple[str, Limit], Tuple[str, Limit, int]]],
        all_or_nothing: bool = False,
    ) -> List[Decision]:
        """Checks several keys in one call, in order. With `all_or_nothing`,
        nothing is consumed unless every check is allowed."""
        return self._decide(c.normalise_checks(checks), all_or_nothing=all_or_nothing, dry_run=False)

    def reserve(self, key: str, limit: LeakyBucket, max_delay: Duration, cost: int = 1) -> Decision:
        """Reserve mode: admits `cost` on `key` if it can start within
        `max_delay` (at most an hour), consuming it at once; the decision's
        `delay` is how long to wait before starting. Past `max_delay` it is
        denied with `retry_after`, consuming nothing. Does not sleep; see
        `limiter` for that."""
        ms = max_delay_millis(max_delay)
        return self._decide([(key, limit, cost)], all_or_nothing=False, dry_run=False, max_delay_ms=ms)[0]

    def limiter(self, key: str, limit: LeakyBucket, max_delay: Duration = 1.0) -> "Limiter":
        """A shaper for `key`: its `acquire()` reserves and sleeps until the
        work may start, so callers everywhere go out at `limit`'s rate."""
        return Limiter(self, key, limit, max_delay_millis(max_delay) / 1000.0)

    def _decide(
        self, checks: List[Tuple[str, Limit, int]], *, all_or_nothing: bool, dry_run: bool, max_delay_ms: int = 0
    ) -> List[Decision]:
        routes = self._routes
        if routes is None:
            return self._check_at(None, checks, all_or_nothing, dry_run, max_delay_ms)
        if routes.due():
            self._read_routes(routes)
        groups = routes.split([key for key, _, _ in checks])
        if all_or_nothing or len(groups) == 1:
            return self._check_at(groups[0][0], checks, all_or_nothing, dry_run, max_delay_ms)
        out: List[Optional[Decision]] = [None] * len(checks)
        for member, positions in groups:
            decided = self._check_at(member, [checks[i] for i in positions], False, dry_run)
            for i, d in zip(positions, decided):
                out[i] = d
        return [d for d in out if d is not None]

    def _check_at(
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
                return self._hinted(self._call("check", request, member=member, retry=False))
            except Unavailable:
                # Sent on through `target`: it may have been decided
                # already, which can only deny sooner, never admit more.
                assert self._routes is not None
                self._routes.stale()
        return self._hinted(self._call("check", request))

    def _hinted(self, response: Any) -> List[Decision]:
        """The decisions of `response`, after taking its owner hint."""
        if self._routes is not None:
            self._routes.hinted(response.slot_map_version, response.owner_hint)
        return c.decisions(response)

    def _read_routes(self, routes: SlotRoutes) -> None:
        """Reads each member's node id and the slot map; a member that does
        not answer is left out until the next read."""
        answers: List[Tuple[str, Any]] = []
        for member in routes.members:
            try:
                st = self._call(
                    "status",
                    _pb.ClusterStatusRequest(slot_owners=True),
                    member=member,
                    retry=False,
                    timeout=min(self.timeout, READ_TIMEOUT),
                )
            except ArbiterError:
                continue
            answers.append((member, st))
        routes.take(answers)

    def wait(self, key: str, limit: Limit, cost: int = 1, timeout: Optional[float] = None) -> Decision:
        """Checks until allowed, sleeping for each denial's retry_after (plus
        a little jitter). Raises RateLimited, with the last decision, as soon
        as the next try would fall after `timeout` seconds, or when the cost
        can never be allowed."""
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        while True:
            decision = self.check(key, limit, cost)
            if decision.allowed:
                return decision
            pause = c.wait_delay(decision, self._rng)
            if decision.retry_after == float("inf") or (deadline is not None and time.monotonic() + pause > deadline):
                raise RateLimited(f"rate limited on {key!r}: retry after {decision.retry_after:.3f} s", decision)
            time.sleep(pause)

    def rate_limited(
        self, key: KeyArg, limit: Limit, cost: int = 1, wait: bool = True, timeout: Optional[float] = None
    ) -> Callable[[F], F]:
        """Decorates a function so each call first passes the limit: waiting
        for it (`wait=True`, up to `timeout`) or raising RateLimited at once.
        `key` is a string or a callable of the function's arguments."""

        def decorate(fn: F) -> F:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = c.resolve_key(key, args, kwargs)
                if wait:
                    self.wait(k, limit, cost, timeout)
                else:
                    decision = self.check(k, limit, cost)
                    if not decision.allowed:
                        raise RateLimited(f"rate limited on {k!r}: retry after {decision.retry_after:.3f} s", decision)
                return fn(*args, **kwargs)

            return wrapper  # type: ignore[return-value]

        return decorate

    # Leases ----------------------------------------------------------------

    def circuit_breaker(
        self,
        name: str,
        config: Optional[BreakerConfig] = None,
        *,
        failures: Errors = Exception,
        timeouts: Errors = TimeoutError,
        fail_open: bool = True,
    ) -> CircuitBreaker:
        """A shared circuit breaker, as a decorator (`@client.circuit_breaker(
        "payments")`) or context manager (`with client.circuit_breaker(...)`):
        asks before each call (BreakerOpen when refused) and reports its
        outcome itself. An exception in `timeouts` reports "timeout", one
        in `failures` "failure" (others report nothing). When the server
        cannot be asked, the call goes if `fail_open` (logged), else the
        error is raised."""
        return CircuitBreaker(self, policy(name, config, failures, timeouts, fail_open))

    def semaphore(
        self,
        name: str,
        limit: int,
        permits: int = 1,
        ttl: Duration = 10.0,
        holder: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> "Semaphore":
        """Permits to use as `with client.semaphore(name, limit=10):`, at
        most `limit` held under `name` by every caller together. Entering
        takes `permits` (waiting, by watching the semaphore, until there is
        room, unless `wait` is False; SemaphoreFull when not granted within
        `timeout`), they are renewed in the background at about ttl/3, and
        leaving gives them back; leaving after they were lost raises
        PermitsLost."""
        return Semaphore(self, name, limit, permits, ttl, holder or c.default_holder(), wait, timeout)

    def lease(
        self,
        name: str,
        ttl: Duration = 10.0,
        holder: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> "Lease":
        """A lease to use as `with client.lease(name) as lease:`. Entering
        acquires it (waiting for the holder to let go, unless `wait` is
        False; LeaseNotHeld when not acquired within `timeout`), the lease
        is renewed in the background at about ttl/3, and leaving releases
        it; leaving after the lease was lost raises LeaseLost."""
        return Lease(self, name, ttl, holder or c.default_holder(), wait, timeout)

    def get_lease(self, name: str) -> Optional[LeaseInfo]:
        """The lease as it stands, or None when the name is free."""
        return self.leases.get(name)

    def watch_lease(self, name: str) -> "LeaseWatch":
        """The lease's events: first its current state, then every change.
        Iterate it; `cancel()` (or leaving `with`) ends it."""
        return self.leases.watch(name)

    def election(self, name: str, candidate: str, ttl: Duration = 10.0) -> "Election":
        """A leader election on the lease `name`; `candidate` must be unique
        among the candidates (it is the lease's holder)."""
        return Election(self, name, candidate, ttl)

    # Idempotency -----------------------------------------------------------

    def idempotent(
        self,
        key: KeyArg,
        lock_ttl: Duration = 30.0,
        retention: Duration = 86400.0,
        fingerprint: Optional[Callable[..., Union[bytes, str]]] = None,
        wait: Duration = 0.0,
    ) -> Callable[[F], F]:
        """Decorates a function so that it runs once per key.

        The first call runs it and stores its result (which must be
        JSON-serialisable) for `retention`; a repeat returns the stored
        result, decoded from JSON, without running it. While another call
        runs it, a repeat waits up to `wait` seconds, then raises
        IdempotencyInProgress. A repeat whose arguments differ (by
        `fingerprint`, default: SHA-256 of the canonical JSON of the
        arguments, objects JSON cannot encode counting by their type) raises
        IdempotencyKeyMismatch. An exception in the function aborts the
        attempt, so a retry runs it again, and is re-raised. A run that
        outlives `lock_ttl` may overlap with a retry; storing its result
        then fails with ArbiterError (code FAILED_PRECONDITION)."""
        wait_s = seconds(wait, "wait")

        def decorate(fn: F) -> F:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = c.resolve_key(key, args, kwargs)
                fp = c.fingerprint_of(fingerprint, args, kwargs)
                deadline = time.monotonic() + wait_s
                step = 0.0
                while True:
                    begun = self.idempotency.begin(k, fp, lock_ttl, retention)
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
                    time.sleep(min(left, step, begun.retry_after))
                try:
                    result = fn(*args, **kwargs)
                    data = c.encode_result(result)
                except BaseException:
                    self._abort_quietly(k, begun.attempt)
                    raise
                self.idempotency.complete(k, begun.attempt, data)
                return result

            return wrapper  # type: ignore[return-value]

        return decorate

    def _abort_quietly(self, key: str, attempt: int) -> None:
        try:
            self.idempotency.abort(key, attempt)
        except ArbiterError as e:
            # The lock lapses by itself at its TTL.
            log.warning("could not abort idempotency attempt %s of %r: %s", attempt, key, e)


class Limiter:
    """Shapes work on one key to a leaky bucket's rate (`Client.limiter`).
    Thread-safe; share one per key."""

    def __init__(self, client: Client, key: str, limit: LeakyBucket, max_delay: float) -> None:
        self._client = client
        self.key = key
        self.limit = limit
        self.max_delay = max_delay

    def acquire(self, cost: int = 1, timeout: Optional[Duration] = None) -> Decision:
        """Reserves `cost` and sleeps until it may start. A reservation
        waits at most `max_delay` (and never past `timeout`); when the bucket
        is fuller than that, it sleeps for the denial's retry_after and tries
        again. Raises RateLimited, with the last decision, when the next try
        would fall after `timeout` seconds or the cost exceeds the burst."""
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        while True:
            ms = c.reserve_budget(self.max_delay, deadline, time.monotonic())
            decision = self._client._decide(
                [(self.key, self.limit, cost)], all_or_nothing=False, dry_run=False, max_delay_ms=ms
            )[0]
            if decision.allowed:
                time.sleep(decision.delay)
                return decision
            pause = c.wait_delay(decision, self._client._rng)
            if decision.retry_after == float("inf") or (deadline is not None and time.monotonic() + pause > deadline):
                raise RateLimited(f"rate limited on {self.key!r}: retry after {decision.retry_after:.3f} s", decision)
            time.sleep(pause)

    def __enter__(self) -> Decision:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        return None


class Leases:
    """Lease calls one by one (`client.leases`); `client.lease(...)` keeps a
    lease renewed for you."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def acquire(self, name: str, holder: str, ttl: Duration) -> Tuple[bool, LeaseInfo]:
        """(acquired, the lease as it stands): not acquired when another
        holds it. The holder acquiring again renews (same token)."""
        r = self._client._call("acquire", c.acquire_request(name, holder, ttl))
        return r.acquired, c.lease_info(r.lease)

    def renew(
        self, name: str, holder: str, fencing_token: int, ttl: Duration, *, timeout: Optional[float] = None
    ) -> LeaseInfo:
        """Extends the lease by `ttl` from now; LeaseNotHeld when it is no
        longer this holder's under this token."""
        request = _pb.RenewRequest(
            name=name, holder=holder, fencing_token=fencing_token, ttl_ms=millis(ttl, "ttl")
        )
        try:
            return c.lease_info(self._client._call("renew", request, timeout=timeout, retry=timeout is None).lease)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                raise LeaseNotHeld(f"lease {name!r} is no longer held by {holder!r}: {e.details}") from e
            raise

    def release(self, name: str, holder: str, fencing_token: int) -> None:
        """Releases the lease; LeaseNotHeld when it was not this holder's
        (a release repeated after a lost answer counts as done)."""
        request = _pb.ReleaseRequest(name=name, holder=holder, fencing_token=fencing_token)
        try:
            self._client._call("release", request)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                if e.retried:
                    return
                raise LeaseNotHeld(f"lease {name!r} is not held by {holder!r}: {e.details}") from e
            raise

    def get(self, name: str) -> Optional[LeaseInfo]:
        r = self._client._call("get_lease", _pb.GetLeaseRequest(name=c.check_key(name, "name")))
        return c.lease_info(r.lease) if r.HasField("lease") else None

    def watch(self, name: str) -> "LeaseWatch":
        return LeaseWatch(self._client._stream("watch_lease", _pb.WatchLeaseRequest(name=c.check_key(name, "name"))))


class LeaseWatch(Watch[LeaseEvent]):
    """An open watch of one lease: an iterator of LeaseEvent. A broken
    stream raises Unavailable (or another ArbiterError) from the iteration."""

    def __init__(self, call: Any) -> None:
        super().__init__(call, c.lease_event)


class Lease:
    """A lease kept renewed in the background while held (see
    `Client.lease`). `fencing_token` is the grant's token (None until
    acquired); `lost` is set when a renewal fails or the lease lapses
    before it could be renewed. `acquire()` and `release()` may be called
    directly instead of `with`."""

    def __init__(
        self, client: Client, name: str, ttl: Duration, holder: str, wait: bool, timeout: Optional[float]
    ) -> None:
        self._client = client
        self.name = c.check_key(name, "name")
        self.holder = c.check_key(holder, "holder")
        self.ttl = seconds(ttl, "ttl")
        millis(ttl, "ttl")
        self._wait = wait
        self._timeout = timeout
        self.fencing_token: Optional[int] = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    @property
    def held(self) -> bool:
        """True while acquired, not released and not lost."""
        return self.fencing_token is not None and not self.lost.is_set()

    def acquire(self, wait: Optional[bool] = None, timeout: Optional[float] = None) -> LeaseInfo:
        """Acquires the lease and starts renewing it. While another holds
        it, waits (watching the lease, not polling) unless `wait` is False;
        LeaseNotHeld when not acquired (within `timeout`)."""
        if self._renewer is not None:
            raise ArbiterError(f"lease {self.name!r} is already acquired by this object")
        wait = self._wait if wait is None else wait
        timeout = self._timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        sent = time.monotonic()
        acquired, info = self._client.leases.acquire(self.name, self.holder, self.ttl)
        if not acquired:
            if not wait:
                raise LeaseNotHeld(f"lease {self.name!r} is held by {info.holder!r}")
            sent, info = self._wait_for_it(info, deadline)
        self._granted(info, sent)
        return info

    def _wait_for_it(self, current: LeaseInfo, deadline: Optional[float]) -> Tuple[float, LeaseInfo]:
        """Watches the lease and tries again whenever it is released or
        lapses (or when its remaining time has passed, in case an event is
        late). Returns when acquired."""
        events: "queue.Queue[Any]" = queue.Queue(maxsize=64)
        repeat = 0
        while True:
            watch = self._client.leases.watch(self.name)
            pump = threading.Thread(target=pump_events, args=(watch, events), daemon=True)
            pump.start()
            try:
                while True:
                    wake = current.remaining + 0.05 if current is not None else 0.0
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            holder = current.holder if current else "another holder"
                            raise LeaseNotHeld(f"lease {self.name!r} is held by {holder!r}; not acquired in time")
                        wake = min(wake, left)
                    try:
                        item = events.get(timeout=max(wake, 0.0))
                    except queue.Empty:
                        item = None
                    if isinstance(item, ArbiterError):
                        break
                    if isinstance(item, LeaseEvent) and item.kind in ("current", "acquired", "renewed"):
                        if item.lease is not None:
                            current = item.lease
                            continue
                    sent = time.monotonic()
                    acquired, info = self._client.leases.acquire(self.name, self.holder, self.ttl)
                    if acquired:
                        return sent, info
                    current = info
                    repeat = 0
            finally:
                watch.cancel()
                pump.join()
            # The watch broke (a failover, a restart): open it again.
            time.sleep(self._client.retry.delay(min(repeat, 5)))
            repeat += 1

    def _granted(self, info: LeaseInfo, sent: float) -> None:
        self.fencing_token = info.fencing_token
        self.lost.clear()
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._keep_alive, args=(sent + info.remaining,), name=f"arbiter-lease-{self.name}", daemon=True
        )
        self._renewer.start()

    def _keep_alive(self, expires: float) -> None:
        """Renews in the background (see `_keepalive.keep_alive`)."""
        token = self.fencing_token
        assert token is not None

        def renew(timeout: float) -> float:
            return self._client.leases.renew(self.name, self.holder, token, self.ttl, timeout=timeout).remaining

        keep_alive(self._stop, self.lost, expires, self.ttl, renew, LeaseNotHeld, f"lease {self.name!r}")

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None

    def release(self) -> None:
        """Stops renewing and releases the lease. Raises LeaseLost when the
        lease had been lost (or was no longer this holder's)."""
        self._stop_renewing()
        token, self.fencing_token = self.fencing_token, None
        if token is None:
            return
        if self.lost.is_set():
            raise LeaseLost(f"lease {self.name!r} (token {token}) was lost while held")
        try:
            self._client.leases.release(self.name, self.holder, token)
        except LeaseNotHeld as e:
            self.lost.set()
            raise LeaseLost(f"lease {self.name!r} (token {token}) was lost while held") from e

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.release()
        except LeaseLost:
            if exc_type is None:
                raise
        except ArbiterError as e:
            # Not released (the server is unreachable): it lapses at its TTL.
            log.warning("could not release lease %r: %s", self.name, e)



class Election:
    """A leader election over one lease (see `Client.election`).

    `campaign()` blocks until this candidate leads; while it leads, the
    lease is renewed in the background; `is_leader` turns False when it is
    lost, and `lost` is set. Pass `fencing_token` with every write the
    leader makes, so the storage can refuse a deposed leader's writes."""

    def __init__(self, client: Client, name: str, candidate: str, ttl: Duration) -> None:
        self._client = client
        self.name = name
        self.candidate = candidate
        self._lease = Lease(client, name, ttl, candidate, True, None)

    @property
    def is_leader(self) -> bool:
        return self._lease.held

    @property
    def fencing_token(self) -> Optional[int]:
        return self._lease.fencing_token if self._lease.held else None

    @property
    def lost(self) -> threading.Event:
        return self._lease.lost

    def campaign(self, timeout: Optional[float] = None) -> Leader:
        """Blocks until this candidate leads (LeaseNotHeld after `timeout`)."""
        if self._lease._renewer is not None and not self._lease.held:
            self._lease._stop_renewing()
            self._lease.fencing_token = None
        if not self._lease.held:
            self._lease.acquire(wait=True, timeout=timeout)
        assert self._lease.fencing_token is not None
        return Leader(self.candidate, self._lease.fencing_token)

    def resign(self) -> None:
        """Steps down (nothing to do when not leading)."""
        try:
            self._lease.release()
        except LeaseLost:
            pass

    def observe(self) -> Iterator[Optional[Leader]]:
        """The current leader (None while nobody leads), then each change of
        leader. Reconnects by itself after a failover."""
        last: Any = ()
        repeat = 0
        while True:
            try:
                with self._client.leases.watch(self.name) as watch:
                    for event in watch:
                        repeat = 0
                        lease = event.lease if event.kind in ("current", "acquired", "renewed") else None
                        now = Leader(lease.holder, lease.fencing_token) if lease else None
                        if now != last:
                            last = now
                            yield now
            except Unavailable:
                time.sleep(self._client.retry.delay(min(repeat, 5)))
                repeat += 1

    def __enter__(self) -> "Election":
        self.campaign()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.resign()


class Idempotency:
    """Idempotency calls one by one (`client.idempotency`); see
    `Client.idempotent` for the decorator that does it all."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def begin(
        self, key: str, fingerprint: bytes = b"", lock_ttl: Duration = 30.0, retention: Duration = 86400.0
    ) -> BeginResult:
        return c.begin_result(self._client._call("begin", c.begin_request(key, fingerprint, lock_ttl, retention)))

    def complete(self, key: str, attempt: int, response: bytes) -> None:
        """Stores the response and ends the attempt. ArbiterError (code
        FAILED_PRECONDITION) when the attempt is stale."""
        try:
            self._client._call("complete", _pb.CompleteRequest(key=key, attempt=attempt, response=response))
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION" and e.retried:
                record = self.get(key)
                if record is not None and record.attempt == attempt and record.state == "completed":
                    return
            raise

    def abort(self, key: str, attempt: int) -> None:
        """Frees the key for a retry. ArbiterError (code FAILED_PRECONDITION)
        when the attempt is stale."""
        try:
            self._client._call("abort", _pb.AbortRequest(key=key, attempt=attempt))
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION" and e.retried:
                record = self.get(key)
                if record is None or record.attempt != attempt:
                    return
            raise

    def get(self, key: str) -> Optional[Record]:
        return c.record(self._client._call("get_record", _pb.GetRecordRequest(key=c.check_key(key, "key"))))
