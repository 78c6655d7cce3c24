"""Message classes and method paths of the arbiter.v1 API, built at import
from the committed descriptors in a private pool (no generated code, so any
protobuf runtime from 4.25 on works, and an application that compiles the
same protos itself sees no clash)."""

import base64
from typing import Any, Callable, Dict

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ._descriptors import SERIALIZED

_POOL = descriptor_pool.DescriptorPool()
_FILES = list(descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(SERIALIZED)).file)
_LOADED: "set[str]" = set()
while _FILES:
    # A file after the files it imports (cluster.proto imports rate_limiter.proto).
    _ready = [f for f in _FILES if all(d in _LOADED for d in f.dependency)]
    if not _ready:
        raise ImportError(f"unresolvable imports among {[f.name for f in _FILES]}")
    for _file in _ready:
        _POOL.AddSerializedFile(_file.SerializeToString())
        _LOADED.add(_file.name)
    _FILES = [f for f in _FILES if f.name not in _LOADED]


def message(name: str) -> Any:
    """The message class arbiter.v1.<name>."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"arbiter.v1.{name}"))


def enum_names(full_name: str) -> Dict[int, str]:
    """Number to value name of the enum arbiter.v1.<full_name>."""
    enum = _POOL.FindEnumTypeByName(f"arbiter.v1.{full_name}")
    return {v.number: v.name for v in enum.values}


CheckRequest = message("CheckRequest")
LimitCheck = message("LimitCheck")
Limit = message("Limit")
AcquireRequest = message("AcquireRequest")
RenewRequest = message("RenewRequest")
ReleaseRequest = message("ReleaseRequest")
GetLeaseRequest = message("GetLeaseRequest")
WatchLeaseRequest = message("WatchLeaseRequest")
SemaphoreAcquireRequest = message("SemaphoreAcquireRequest")
SemaphoreRenewRequest = message("SemaphoreRenewRequest")
SemaphoreReleaseRequest = message("SemaphoreReleaseRequest")
GetSemaphoreRequest = message("GetSemaphoreRequest")
WatchSemaphoreRequest = message("WatchSemaphoreRequest")
BeginRequest = message("BeginRequest")
CompleteRequest = message("CompleteRequest")
AbortRequest = message("AbortRequest")
GetRecordRequest = message("GetRecordRequest")
ClusterStatusRequest = message("ClusterStatusRequest")
BreakerConfig = message("BreakerConfig")
BreakerAllowRequest = message("BreakerAllowRequest")
BreakerReportRequest = message("BreakerReportRequest")
GetBreakerRequest = message("GetBreakerRequest")
WatchBreakerRequest = message("WatchBreakerRequest")

OUTCOMES = enum_names("Outcome")
EVENT_KINDS = enum_names("LeaseEvent.Kind")
SEMAPHORE_EVENT_KINDS = enum_names("SemaphoreEvent.Kind")
RECORD_STATES = enum_names("Record.State")
BREAKER_PHASES = enum_names("BreakerPhase")
BREAKER_EVENT_KINDS = enum_names("BreakerEvent.Kind")

# (path, request class, response class, streaming response)
METHODS = {
    "check": ("/arbiter.v1.RateLimiter/Check", CheckRequest, message("CheckResponse"), False),
    "acquire": ("/arbiter.v1.Leases/Acquire", AcquireRequest, message("AcquireResponse"), False),
    "renew": ("/arbiter.v1.Leases/Renew", RenewRequest, message("RenewResponse"), False),
    "release": ("/arbiter.v1.Leases/Release", ReleaseRequest, message("ReleaseResponse"), False),
    "get_lease": ("/arbiter.v1.Leases/Get", GetLeaseRequest, message("GetLeaseResponse"), False),
    "watch_lease": ("/arbiter.v1.Leases/Watch", WatchLeaseRequest, message("LeaseEvent"), True),
    "sem_acquire": ("/arbiter.v1.Semaphores/Acquire", SemaphoreAcquireRequest,
                    message("SemaphoreAcquireResponse"), False),
    "sem_renew": ("/arbiter.v1.Semaphores/Renew", SemaphoreRenewRequest, message("SemaphoreRenewResponse"), False),
    "sem_release": ("/arbiter.v1.Semaphores/Release", SemaphoreReleaseRequest,
                    message("SemaphoreReleaseResponse"), False),
    "sem_get": ("/arbiter.v1.Semaphores/Get", GetSemaphoreRequest, message("GetSemaphoreResponse"), False),
    "sem_watch": ("/arbiter.v1.Semaphores/Watch", WatchSemaphoreRequest, message("SemaphoreEvent"), True),
    "begin": ("/arbiter.v1.Idempotency/Begin", BeginRequest, message("BeginResponse"), False),
    "complete": ("/arbiter.v1.Idempotency/Complete", CompleteRequest, message("CompleteResponse"), False),
    "abort": ("/arbiter.v1.Idempotency/Abort", AbortRequest, message("AbortResponse"), False),
    "get_record": ("/arbiter.v1.Idempotency/Get", GetRecordRequest, message("GetRecordResponse"), False),
    "status": ("/arbiter.v1.Cluster/Status", ClusterStatusRequest, message("ClusterStatusResponse"), False),
    "breaker_allow": ("/arbiter.v1.Breakers/Allow", BreakerAllowRequest, message("BreakerAllowResponse"), False),
    "breaker_report": ("/arbiter.v1.Breakers/Report", BreakerReportRequest,
                       message("BreakerReportResponse"), False),
    "breaker_get": ("/arbiter.v1.Breakers/Get", GetBreakerRequest, message("BreakerState"), False),
    "breaker_watch": ("/arbiter.v1.Breakers/Watch", WatchBreakerRequest, message("BreakerEvent"), True),
}


def bind(channel: Any) -> Dict[str, Callable[..., Any]]:
    """The API's methods as callables on a grpc (or grpc.aio) channel."""
    bound = {}
    for name, (path, request, response, streaming) in METHODS.items():
        factory = channel.unary_stream if streaming else channel.unary_unary
        bound[name] = factory(path, request_serializer=request.SerializeToString,
                              response_deserializer=response.FromString)
    return bound
