"""An open watch stream, for every kind of watch (leases, semaphores,
breakers) in both clients: the server's messages converted to events,
ended by `cancel()` or by leaving `with`; a broken stream raises
Unavailable (or another ArbiterError) from the iteration."""

import asyncio
from typing import Any, Callable, Generic, Iterator, TypeVar

import grpc

from . import _common as c

T = TypeVar("T")


class Watch(Generic[T]):
    """A blocking watch: an iterator of events."""

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._convert = convert

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return self._convert(next(self._call))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise c.map_error(e) from e

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "Watch[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()


class AsyncWatch(Generic[T]):
    """An asyncio watch: an async iterator of events."""

    def __init__(self, call: Any, convert: Callable[[Any], T]) -> None:
        self._call = call
        self._events = call.__aiter__()
        self._convert = convert

    def __aiter__(self) -> "AsyncWatch[T]":
        return self

    async def __anext__(self) -> T:
        try:
            return self._convert(await self._events.__anext__())
        except asyncio.CancelledError:
            if self._call.cancelled():
                raise StopAsyncIteration from None
            raise
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise c.map_error(e) from e

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> "AsyncWatch[T]":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.cancel()
