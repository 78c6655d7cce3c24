"""What leases and semaphore permits share in both clients: renewing in the
background until stopped or lost, and moving a watch's events into a
bounded queue for a waiter."""

import asyncio
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional, Type

from . import _common as c
from .errors import ArbiterError

log = logging.getLogger("arbiter_client")


def keep_alive(
    stop: threading.Event,
    lost: threading.Event,
    expires: float,
    ttl: float,
    renew: Callable[[float], float],
    gone: Type[ArbiterError],
    what: str,
) -> None:
    """Renews at about ttl/3 until `stop`; after a failed try, sooner, until
    what is held would have lapsed (`expires`, a local deadline measured from
    before each request was sent, so it never runs late). `renew(timeout)`
    renews and returns the seconds left; raising `gone` means it is lost.
    Sets `lost` when it is lost or has lapsed."""
    interval = c.renew_interval(ttl)
    pause: Optional[float] = interval
    while pause is not None and not stop.wait(pause):
        left = expires - time.monotonic()
        if left <= 0:
            pause = _lapsed(lost, what)
            continue
        sent = time.monotonic()
        try:
            expires, pause = sent + renew(min(left, interval)), interval
        except ArbiterError as e:
            pause = _failed(e, expires, interval, gone, what, lost)


async def keep_alive_async(
    lost: asyncio.Event,
    expires: float,
    ttl: float,
    renew: Callable[[float], Awaitable[float]],
    gone: Type[ArbiterError],
    what: str,
) -> None:
    """As `keep_alive`, as a task: cancelling it stops it."""
    interval = c.renew_interval(ttl)
    pause: Optional[float] = interval
    while pause is not None:
        await asyncio.sleep(pause)
        left = expires - time.monotonic()
        if left <= 0:
            pause = _lapsed(lost, what)
            continue
        sent = time.monotonic()
        try:
            expires, pause = sent + await renew(min(left, interval)), interval
        except ArbiterError as e:
            pause = _failed(e, expires, interval, gone, what, lost)


def _lapsed(lost: Any, what: str) -> Optional[float]:
    """It lapsed before it could be renewed: over (`lost` set)."""
    log.warning("%s lapsed before it could be renewed", what)
    lost.set()
    return None


def _failed(
    e: ArbiterError, expires: float, interval: float, gone: Type[ArbiterError], what: str, lost: Any
) -> Optional[float]:
    """After a renewal that failed with `e`: None when it is over (lost, or
    lapsed meanwhile: `lost` set), else how soon to try again."""
    if isinstance(e, gone):
        log.warning("%s lost: %s", what, e)
        lost.set()
        return None
    left = expires - time.monotonic()
    if left <= 0:
        log.warning("%s lapsed: renewal failed: %s", what, e)
        lost.set()
        return None
    return min(interval / 4, left)


def put_latest(events: Any, item: Any) -> None:
    """Queues an item (on a queue.Queue or an asyncio.Queue); when the queue
    is full, the oldest goes (each item is only a reason to look again, so
    the newest matters)."""
    empty = (queue.Empty, asyncio.QueueEmpty)
    full = (queue.Full, asyncio.QueueFull)
    while True:
        try:
            events.put_nowait(item)
            return
        except full:
            try:
                events.get_nowait()
            except empty:
                pass


def pump(watch: Iterable[Any], events: "queue.Queue[Any]") -> None:
    """Moves a watch's events into a queue (the last item is the error that
    ended it, unless it was cancelled)."""
    try:
        for event in watch:
            put_latest(events, event)
    except ArbiterError as e:
        put_latest(events, e)


async def pump_async(watch: AsyncIterator[Any], events: "asyncio.Queue[Any]") -> None:
    """As `pump`, for an asyncio watch."""
    try:
        async for event in watch:
            put_latest(events, event)
    except ArbiterError as e:
        put_latest(events, e)
