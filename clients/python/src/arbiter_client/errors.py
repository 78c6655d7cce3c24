"""The client's errors. Every failure of a call surfaces as an ArbiterError
subclass; the gRPC error, when there was one, is its __cause__."""

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .types import Decision


class ArbiterError(Exception):
    """Base of every error this package raises.

    `code` is the gRPC status code's name (e.g. "FAILED_PRECONDITION"), or
    None for an error raised by the client itself; `details` the server's
    message; `retried` is True when the error came from a repeat of a call
    whose earlier attempt had an unknown outcome."""

    def __init__(self, message: str, *, code: Optional[str] = None, details: str = "", retried: bool = False):
        super().__init__(message)
        self.code = code
        self.details = details
        self.retried = retried


class Unavailable(ArbiterError):
    """No answer: the server (or the cluster's leader) could not be reached
    or did not answer in time, after the retry policy was spent. The call
    may or may not have taken effect."""


class InvalidArgument(ArbiterError):
    """The server refused the request as malformed; the message names the
    field and its bound."""


class PermissionDenied(ArbiterError):
    """The caller is not authenticated (code UNAUTHENTICATED) or not allowed
    to use this key, lease or operation (code PERMISSION_DENIED)."""


class RateLimited(ArbiterError):
    """A rate limit denied the call (and, when waiting, would not allow it
    before the timeout). `decision` is the last decision seen."""

    def __init__(self, message: str, decision: "Decision"):
        super().__init__(message)
        self.decision = decision


class LeaseNotHeld(ArbiterError):
    """The lease is not this holder's: held by another (and not acquired
    before the timeout), or lapsed, released or re-granted before a renewal
    or release."""


class LeaseLost(ArbiterError):
    """The lease was lost while its block ran: a renewal failed or it lapsed
    before it could be renewed. Work done under it may have overlapped with
    a new holder's; its fencing token lets the resource refuse such writes."""


class SemaphoreFull(ArbiterError):
    """No room under the semaphore's limit: the permits were not granted
    (before the timeout, when waiting)."""


class BreakerOpen(ArbiterError):
    """A shared circuit breaker refused the call: it is OPEN, or HALF_OPEN
    with every probe permit out. `phase` says which; `retry_after`
    (seconds) when a call may be allowed again."""

    def __init__(self, message: str, *, phase: str, retry_after: float):
        super().__init__(message)
        self.phase = phase
        self.retry_after = retry_after


class PermitsLost(ArbiterError):
    """The permits are no longer this holder's: they lapsed, or a renewal
    or release found them gone. Work done under them may have overlapped
    with another holder's; their fencing token lets a resource refuse it."""


class IdempotencyInProgress(ArbiterError):
    """Another attempt holds the idempotency key. `retry_after` is the time
    in seconds until that attempt's lock lapses."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyKeyMismatch(ArbiterError):
    """The idempotency key was used before with a different payload."""
