"""Semaphores through AsyncClient: the asyncio twins of `semaphores`."""

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Optional


from . import _common as c
from . import _pb
from ._keepalive import keep_alive_async, pump_async
from ._watch import AsyncWatch
from .errors import ArbiterError, PermitsLost, SemaphoreFull
from .types import Duration, PermitInfo, SemaphoreEvent, SemaphoreState, millis, seconds

if TYPE_CHECKING:
    from .aio import AsyncClient

log = logging.getLogger("arbiter_client")


class AsyncSemaphores:
    """As `Semaphores`, with coroutines (`client.semaphores`)."""

    def __init__(self, client: "AsyncClient") -> None:
        self._client = client

    async def acquire(self, name: str, holder: str, limit: int, ttl: Duration, permits: int = 1) -> SemaphoreState:
        request = c.sem_acquire_request(name, holder, limit, permits, ttl)
        return c.sem_state(await self._client._call("sem_acquire", request))

    async def renew(
        self, name: str, holder: str, fencing_token: int, ttl: Duration, *, timeout: Optional[float] = None
    ) -> PermitInfo:
        request = _pb.SemaphoreRenewRequest(
            name=name, holder=holder, fencing_token=fencing_token, ttl_ms=millis(ttl, "ttl")
        )
        try:
            r = await self._client._call("sem_renew", request, timeout=timeout, retry=timeout is None)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                raise PermitsLost(f"semaphore {name!r} permits are no longer {holder!r}'s: {e.details}") from e
            raise
        return c.permit_info(r.permit)

    async def release(self, name: str, holder: str, fencing_token: int) -> None:
        request = _pb.SemaphoreReleaseRequest(name=name, holder=holder, fencing_token=fencing_token)
        try:
            await self._client._call("sem_release", request)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                if e.retried:
                    return
                raise PermitsLost(f"semaphore {name!r} permits were not {holder!r}'s: {e.details}") from e
            raise

    async def get(self, name: str) -> SemaphoreState:
        r = await self._client._call("sem_get", _pb.GetSemaphoreRequest(name=c.check_key(name, "name")))
        return c.sem_holders(r)

    def watch(self, name: str) -> "AsyncSemaphoreWatch":
        request = _pb.WatchSemaphoreRequest(name=c.check_key(name, "name"))
        return AsyncSemaphoreWatch(self._client._stream("sem_watch", request))


class AsyncSemaphoreWatch(AsyncWatch[SemaphoreEvent]):
    """An open watch of one semaphore: an async iterator of SemaphoreEvent."""

    def __init__(self, call: Any) -> None:
        super().__init__(call, c.sem_event)


class AsyncSemaphore:
    """The asyncio twin of `Semaphore`; `lost` is an asyncio.Event."""

    def __init__(
        self,
        client: "AsyncClient",
        name: str,
        limit: int,
        permits: int,
        ttl: Duration,
        holder: str,
        wait: bool,
        timeout: Optional[float],
    ) -> None:
        c.sem_acquire_request(name, holder, limit, permits, ttl)
        self._client = client
        self.name, self.holder, self.limit, self.permits = name, holder, limit, permits
        self.ttl = seconds(ttl, "ttl")
        self._wait = wait
        self._timeout = timeout
        self.fencing_token: Optional[int] = None
        self.lost = asyncio.Event()
        self._renewer: Optional["asyncio.Task[None]"] = None

    @property
    def held(self) -> bool:
        return self.fencing_token is not None and not self.lost.is_set()

    async def _ask(self) -> SemaphoreState:
        return await self._client.semaphores.acquire(self.name, self.holder, self.limit, self.ttl, self.permits)

    async def acquire(self, wait: Optional[bool] = None, timeout: Optional[float] = None) -> PermitInfo:
        if self._renewer is not None:
            raise ArbiterError(f"semaphore {self.name!r} permits are already held by this object")
        wait = self._wait if wait is None else wait
        timeout = self._timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        sent = time.monotonic()
        state = await self._ask()
        if state.permit is None:
            if not wait:
                raise SemaphoreFull(f"semaphore {self.name!r} is full ({state.held} of {self.limit} held)")
            sent, state = await self._wait_for_room(state, deadline)
        assert state.permit is not None
        self.fencing_token = state.permit.fencing_token
        self.lost.clear()
        self._renewer = asyncio.ensure_future(self._keep_alive(sent + state.permit.remaining))
        return state.permit

    async def _wait_for_room(
        self, state: SemaphoreState, deadline: Optional[float]
    ) -> "tuple[float, SemaphoreState]":
        events: "asyncio.Queue[Any]" = asyncio.Queue(maxsize=64)
        repeat = 0
        while True:
            watch = self._client.semaphores.watch(self.name)
            pump = asyncio.ensure_future(pump_async(watch, events))
            try:
                while True:
                    wake = state.retry_after + 0.05 if state.retry_after > 0 else 1.0
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise SemaphoreFull(
                                f"semaphore {self.name!r} is full ({state.held} of {self.limit} held); "
                                "not granted in time"
                            )
                        wake = min(wake, left)
                    try:
                        item = await asyncio.wait_for(events.get(), timeout=max(wake, 0.0))
                    except asyncio.TimeoutError:
                        item = None
                    if isinstance(item, ArbiterError):
                        break
                    if isinstance(item, SemaphoreEvent) and not c.room_made(item, self.permits, self.limit):
                        continue
                    sent = time.monotonic()
                    state = await self._ask()
                    if state.permit is not None:
                        return sent, state
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
            info = await self._client.semaphores.renew(self.name, self.holder, token, self.ttl, timeout=timeout)
            return info.remaining

        what = f"semaphore {self.name!r} permits"
        await keep_alive_async(self.lost, expires, self.ttl, renew, PermitsLost, what)

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        token, self.fencing_token = self.fencing_token, None
        if token is None:
            return
        if self.lost.is_set():
            raise PermitsLost(f"semaphore {self.name!r} permits (token {token}) were lost while held")
        try:
            await self._client.semaphores.release(self.name, self.holder, token)
        except PermitsLost:
            self.lost.set()
            raise

    async def __aenter__(self) -> "AsyncSemaphore":
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await self.release()
        except PermitsLost:
            if exc_type is None:
                raise
        except ArbiterError as e:
            log.warning("could not release semaphore %r permits: %s", self.name, e)


