"""Arbiter's Python client: rate limits (check, wait, a decorator, and
leaky-bucket shaping that schedules work instead of refusing it), leases
kept alive in the background, leader election with fencing tokens,
`@idempotent` functions, and retries with jittered backoff. `Client` blocks;
`AsyncClient` is its asyncio twin."""

from .aio import AsyncClient, AsyncElection, AsyncLease, AsyncLeaseWatch, AsyncLimiter
from .aio_semaphores import AsyncSemaphore, AsyncSemaphoreWatch
from .client import Client, Election, Lease, LeaseWatch, Limiter
from .semaphores import Semaphore, SemaphoreWatch
from .errors import (
    ArbiterError,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    InvalidArgument,
    LeaseLost,
    LeaseNotHeld,
    PermissionDenied,
    PermitsLost,
    RateLimited,
    SemaphoreFull,
    Unavailable,
)
from .types import (
    TLS,
    BeginResult,
    ClusterStatus,
    Decision,
    FixedWindow,
    LeakyBucket,
    Leader,
    LeaseEvent,
    LeaseInfo,
    PermitInfo,
    Record,
    Retry,
    SemaphoreEvent,
    SemaphoreState,
    SlidingWindow,
    TokenBucket,
)

__version__ = "0.1.0"

__all__ = [
    "TLS",
    "ArbiterError",
    "AsyncClient",
    "AsyncElection",
    "AsyncLease",
    "AsyncLeaseWatch",
    "AsyncLimiter",
    "AsyncSemaphore",
    "AsyncSemaphoreWatch",
    "BeginResult",
    "Client",
    "ClusterStatus",
    "Decision",
    "Election",
    "FixedWindow",
    "LeakyBucket",
    "IdempotencyInProgress",
    "IdempotencyKeyMismatch",
    "InvalidArgument",
    "Leader",
    "Lease",
    "LeaseEvent",
    "LeaseInfo",
    "LeaseLost",
    "LeaseNotHeld",
    "LeaseWatch",
    "Limiter",
    "PermissionDenied",
    "PermitInfo",
    "PermitsLost",
    "RateLimited",
    "Record",
    "Retry",
    "Semaphore",
    "SemaphoreEvent",
    "SemaphoreFull",
    "SemaphoreState",
    "SemaphoreWatch",
    "SlidingWindow",
    "TokenBucket",
    "Unavailable",
]
