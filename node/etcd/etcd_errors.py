"""etcd's failures as node.core.errors, mapped by type: the gRPC status code etcd answers with
(under aetcd's exception classes too), the message only where etcd shares one code among
several errors and says which in words alone."""

from __future__ import annotations

import asyncio

import aetcd.exceptions
import grpc

from node.core.errors import Compacted, FilchError, StoreFull, StoreUnavailable, TooLarge

# Everything an etcd call may raise that is not a bug of ours.
ETCD_ERRORS = (aetcd.exceptions.ClientError, grpc.aio.AioRpcError, asyncio.TimeoutError,
               ConnectionError)

# INVALID_ARGUMENT from etcd for a request it refuses by size (--max-request-bytes,
# --max-txn-ops); etcd's other INVALID_ARGUMENTs (empty key...) would be our bugs.
_ETCD_TOO_LARGE = ("request is too large", "too many operations in txn request")
# RESOURCE_EXHAUSTED is both etcd's NOSPACE and gRPC's own message size limits on
# either side ("Received/Sent message larger than max"), and etcd's "too many requests".
_GRPC_TOO_LARGE = "larger than max"
_NOSPACE = "database space exceeded"
# OUT_OF_RANGE is "required revision has been compacted" or "... is a future revision".
_COMPACTED = "compacted"


def rpc_error(exc: BaseException) -> grpc.aio.AioRpcError | None:
    """The gRPC error under exc: itself, or what aetcd wrapped (it raises `from` it)."""
    while exc is not None:
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc
        exc = exc.__cause__  # type: ignore[assignment]  # None ends the loop
    return None


def translate(exc: BaseException, *, compacted_at: int = 0) -> FilchError:
    """Map an etcd failure to Compacted, TooLarge, StoreFull or StoreUnavailable.
    compacted_at: the compact revision when the caller knows it (a watch reports it)."""
    if isinstance(exc, aetcd.exceptions.RevisionCompactedError):
        return Compacted(int(exc.compacted_revision))
    rpc = rpc_error(exc)
    if rpc is None:  # timeouts, refused connections, aetcd's own errors
        return StoreUnavailable(f"etcd unavailable: {exc or type(exc).__name__}")
    code, details = rpc.code(), rpc.details() or ""
    if code == grpc.StatusCode.OUT_OF_RANGE and _COMPACTED in details:
        return Compacted(compacted_at)
    if code == grpc.StatusCode.INVALID_ARGUMENT and any(m in details for m in _ETCD_TOO_LARGE):
        return TooLarge(f"etcd refused the request for its size: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _GRPC_TOO_LARGE in details:
        return TooLarge(f"the etcd channel refused a message for its size: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _NOSPACE in details:
        return StoreFull("etcd is out of space (NOSPACE alarm); "
                         "finished tasks must be cleaned up before new work is accepted")
    return StoreUnavailable(f"etcd unavailable ({code.name}): {details or type(exc).__name__}")


def etcd_error(code: str, details: str) -> FilchError:
    """The error a failed etcd call with this gRPC status name and message raises here
    (failpoints use it to fail exactly like etcd does)."""
    return translate(grpc.aio.AioRpcError(grpc.StatusCode[code], grpc.aio.Metadata(),
                                          grpc.aio.Metadata(), details))
