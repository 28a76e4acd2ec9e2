"""How every RPC of the servicer is wrapped: malformed requests become INVALID_ARGUMENT,
filch's errors become their gRPC status codes, anything else INTERNAL (logged with its
traceback, never shown), and every call is counted in the API metrics."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from node.core import metrics
from node.core.errors import (
    Conflict,
    FilchError,
    InvalidArgument,
    NodeNotFound,
    NotStarted,
    Overloaded,
    OwnerUnavailable,
    PermissionDenied,
    QuotaExceeded,
    SessionNotFound,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
    UserNotFound,
)

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")

_CODES: list[tuple[type[FilchError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (TaskNotFound, grpc.StatusCode.NOT_FOUND),
    (NodeNotFound, grpc.StatusCode.NOT_FOUND),
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (UserNotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (OwnerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (NotStarted, grpc.StatusCode.FAILED_PRECONDITION),
]


async def abort_call(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            await context.abort(code, str(exc))
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error ({type(exc).__name__}); the node's log has details")
    raise AssertionError("unreachable")


class Malformed:
    """What the safe deserializer hands a method for bytes that are no valid request."""

    def __init__(self, *, message: str) -> None:
        self.message = message


def safe_parser(message_class: Any) -> Callable[[bytes], Any]:
    """Parse a request; undecodable bytes become Malformed (answered INVALID_ARGUMENT),
    where gRPC's own deserializer would make the call fail with INTERNAL."""
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return Malformed(message=f"the request is not a valid "
                                     f"{message_class.DESCRIPTOR.full_name} protobuf message")
    return parse


def count_call(method: str, context: Any, started: float) -> None:
    code = context.code() or grpc.StatusCode.OK
    metrics.API_REQUESTS.labels(method, code.name).inc()
    metrics.API_LATENCY.labels(method).observe(time.monotonic() - started)


def unary(method: Callable[[Any, Request, Any], Awaitable[Response]]
           ) -> Callable[[Any, Request, Any], Awaitable[Response]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: Any) -> Response:
        started = time.monotonic()
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument("request", request.message)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped to a status code, never swallowed
            await abort_call(context, exc)
        finally:
            count_call(method.__name__, context, started)
    return wrapper


