"""Semaphores through the blocking client: the calls one by one
(`client.semaphores`) and permits kept renewed while a block runs
(`client.semaphore(...)`)."""

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from . import _common as c
from . import _pb
from ._keepalive import keep_alive, pump as pump_events
from ._watch import Watch
from .errors import ArbiterError, PermitsLost, SemaphoreFull
from .types import Duration, PermitInfo, SemaphoreEvent, SemaphoreState, millis, seconds

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("arbiter_client")


class Semaphores:
    """Semaphore calls one by one (`client.semaphores`);
    `client.semaphore(...)` keeps permits renewed for you."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def acquire(self, name: str, holder: str, limit: int, ttl: Duration, permits: int = 1) -> SemaphoreState:
        """Takes `permits` if they fit under `limit` with every holder's;
        not granted otherwise (`retry_after`: until the next lapse). The
        holder acquiring again renews (same token)."""
        request = c.sem_acquire_request(name, holder, limit, permits, ttl)
        return c.sem_state(self._client._call("sem_acquire", request))

    def renew(
        self, name: str, holder: str, fencing_token: int, ttl: Duration, *, timeout: Optional[float] = None
    ) -> PermitInfo:
        """Extends the permits by `ttl` from now; PermitsLost when they are
        no longer this holder's under this token."""
        request = _pb.SemaphoreRenewRequest(
            name=name, holder=holder, fencing_token=fencing_token, ttl_ms=millis(ttl, "ttl")
        )
        try:
            r = self._client._call("sem_renew", request, timeout=timeout, retry=timeout is None)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                raise PermitsLost(f"semaphore {name!r} permits are no longer {holder!r}'s: {e.details}") from e
            raise
        return c.permit_info(r.permit)

    def release(self, name: str, holder: str, fencing_token: int) -> None:
        """Gives the permits back; PermitsLost when they were not this
        holder's (a release repeated after a lost answer counts as done)."""
        request = _pb.SemaphoreReleaseRequest(name=name, holder=holder, fencing_token=fencing_token)
        try:
            self._client._call("sem_release", request)
        except ArbiterError as e:
            if e.code == "FAILED_PRECONDITION":
                if e.retried:
                    return
                raise PermitsLost(f"semaphore {name!r} permits were not {holder!r}'s: {e.details}") from e
            raise

    def get(self, name: str) -> SemaphoreState:
        """The live holders (`holders`) and what they hold (`held`)."""
        r = self._client._call("sem_get", _pb.GetSemaphoreRequest(name=c.check_key(name, "name")))
        return c.sem_holders(r)

    def watch(self, name: str) -> "SemaphoreWatch":
        request = _pb.WatchSemaphoreRequest(name=c.check_key(name, "name"))
        return SemaphoreWatch(self._client._stream("sem_watch", request))


class SemaphoreWatch(Watch[SemaphoreEvent]):
    """An open watch of one semaphore: an iterator of SemaphoreEvent."""

    def __init__(self, call: Any) -> None:
        super().__init__(call, c.sem_event)


class Semaphore:
    """Permits under a semaphore, kept renewed in the background while held
    (see `Client.semaphore`). `fencing_token` is the grant's token (None
    until acquired); `lost` is set when a renewal fails or the permits lapse
    before they could be renewed."""

    def __init__(
        self,
        client: "Client",
        name: str,
        limit: int,
        permits: int,
        ttl: Duration,
        holder: str,
        wait: bool,
        timeout: Optional[float],
    ) -> None:
        # Checked now, so a bad argument fails before any call.
        c.sem_acquire_request(name, holder, limit, permits, ttl)
        self._client = client
        self.name, self.holder, self.limit, self.permits = name, holder, limit, permits
        self.ttl = seconds(ttl, "ttl")
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

    def _ask(self) -> SemaphoreState:
        return self._client.semaphores.acquire(self.name, self.holder, self.limit, self.ttl, self.permits)

    def acquire(self, wait: Optional[bool] = None, timeout: Optional[float] = None) -> PermitInfo:
        """Takes the permits and starts renewing them. While there is no
        room, waits (watching the semaphore, not polling) unless `wait` is
        False; SemaphoreFull when not granted (within `timeout`)."""
        if self._renewer is not None:
            raise ArbiterError(f"semaphore {self.name!r} permits are already held by this object")
        wait = self._wait if wait is None else wait
        timeout = self._timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + seconds(timeout, "timeout")
        sent = time.monotonic()
        state = self._ask()
        if state.permit is None:
            if not wait:
                raise SemaphoreFull(f"semaphore {self.name!r} is full ({state.held} of {self.limit} held)")
            sent, state = self._wait_for_room(state, deadline)
        assert state.permit is not None
        self.fencing_token = state.permit.fencing_token
        self.lost.clear()
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._keep_alive,
            args=(sent + state.permit.remaining,),
            name=f"arbiter-semaphore-{self.name}",
            daemon=True,
        )
        self._renewer.start()
        return state.permit

    def _wait_for_room(self, state: SemaphoreState, deadline: Optional[float]) -> "tuple[float, SemaphoreState]":
        """Watches the semaphore and asks again whenever a change may have
        made room (or when the next lapse is due, in case an event is late).
        Returns once granted."""
        events: "queue.Queue[Any]" = queue.Queue(maxsize=64)
        repeat = 0
        while True:
            watch = self._client.semaphores.watch(self.name)
            pump = threading.Thread(target=pump_events, args=(watch, events), daemon=True)
            pump.start()
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
                        item = events.get(timeout=max(wake, 0.0))
                    except queue.Empty:
                        item = None
                    if isinstance(item, ArbiterError):
                        break
                    if isinstance(item, SemaphoreEvent) and not c.room_made(item, self.permits, self.limit):
                        continue
                    sent = time.monotonic()
                    state = self._ask()
                    if state.permit is not None:
                        return sent, state
                    repeat = 0
            finally:
                watch.cancel()
                pump.join()
            # The watch broke (a failover, a restart): open it again.
            time.sleep(self._client.retry.delay(min(repeat, 5)))
            repeat += 1

    def _keep_alive(self, expires: float) -> None:
        """Renews in the background (see `_keepalive.keep_alive`)."""
        token = self.fencing_token
        assert token is not None

        def renew(timeout: float) -> float:
            return self._client.semaphores.renew(self.name, self.holder, token, self.ttl, timeout=timeout).remaining

        what = f"semaphore {self.name!r} permits"
        keep_alive(self._stop, self.lost, expires, self.ttl, renew, PermitsLost, what)

    def release(self) -> None:
        """Stops renewing and gives the permits back; PermitsLost when they
        had been lost."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        token, self.fencing_token = self.fencing_token, None
        if token is None:
            return
        if self.lost.is_set():
            raise PermitsLost(f"semaphore {self.name!r} permits (token {token}) were lost while held")
        try:
            self._client.semaphores.release(self.name, self.holder, token)
        except PermitsLost:
            self.lost.set()
            raise

    def __enter__(self) -> "Semaphore":
        self.acquire()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.release()
        except PermitsLost:
            if exc_type is None:
                raise
        except ArbiterError as e:
            # Not released (the server is unreachable): they lapse at their TTL.
            log.warning("could not release semaphore %r permits: %s", self.name, e)


