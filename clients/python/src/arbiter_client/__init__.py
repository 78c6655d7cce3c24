"""Arbiter's Python client: rate limits (check, wait, a decorator, and
leaky-bucket shaping that schedules work instead of refusing it), leases
kept alive in the background, leader election with fencing tokens,
`@idempotent` functions, and retries with jittered backoff. `Client` blocks;
`AsyncClient` is its asyncio twin."""

from .aio import AsyncClient, AsyncElection, AsyncLease, AsyncLeaseWatch, AsyncLimiter
from .client import Client, Election, Lease, LeaseWatch, Limiter
from .errors import (
    ArbiterError,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    InvalidArgument,
    LeaseLost,
    LeaseNotHeld,
    PermissionDenied,
    RateLimited,
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
    Record,
    Retry,
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
    "RateLimited",
    "Record",
    "Retry",
    "SlidingWindow",
    "TokenBucket",
    "Unavailable",
]
