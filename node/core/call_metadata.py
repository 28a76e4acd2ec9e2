"""Metadata added to every call of a channel: how the HTTP face names whom it calls for.

The face holds the cluster token (the channel's credentials) and calls its daemon on behalf
of the browser session or program behind each request; the daemon honors these names only
from the cluster token (node/faces/authn.py). A channel interceptor, not a keyword on each
call, so that no call of the client (unary or streaming, present or future) can forget them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc

from node.core.identity import AS_USER_HEADER, CLIENT_ADDRESS_HEADER, USER_TOKEN_HEADER

Metadata = tuple[tuple[str, str], ...]


def caller_metadata(*, as_user: str = "", user_token: str = "", address: str = "") -> Metadata:
    """The metadata naming a caller; empty names are left out (the daemon then treats the
    call as the cluster token's own: admin)."""
    pairs = ((AS_USER_HEADER, as_user), (USER_TOKEN_HEADER, user_token),
             (CLIENT_ADDRESS_HEADER, address))
    return tuple((name, value) for name, value in pairs if value)


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class CallerMetadata(grpc.UnaryUnaryClientInterceptor,
                     grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor,
                     grpc.StreamStreamClientInterceptor):
    """Adds metadata to every call, replacing any pair of the same name a caller passed."""

    def __init__(self, *, metadata: Metadata) -> None:
        self.metadata = metadata

    def _details(self, details: Any) -> _Details:
        names = {name for name, _ in self.metadata}
        kept = [(name, value) for name, value in details.metadata or ()
                if name.lower() not in names]
        return _Details(details.method, details.timeout, [*kept, *self.metadata],
                        details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                               requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                requests: Any) -> Any:
        return continuation(self._details(details), requests)
