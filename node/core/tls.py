"""Transport security for the gRPC API: TLS credentials, the bearer token, channels.

With certificates configured, the API serves only TLS and every call but health checks
must carry `authorization: Bearer <token>`; nodes reach each other (log proxying) over
the same TLS with the same token. Without them the API is plain and open, for a laptop,
and the agent says so in its log.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from node.core.errors import InvalidArgument

log = logging.getLogger(__name__)

# Health checks stay open so that load balancers and grpc_health_probe need no secret.
OPEN_METHODS = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class Security:
    """What a node or client needs to speak TLS and authenticate."""

    ca: bytes = b""
    cert: bytes = b""
    key: bytes = b""
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca)

    @classmethod
    def load(cls, ca: str, cert: str = "", key: str = "", token_file: str = "",
             token: str = "") -> Security:
        """Read the files; raises InvalidArgument naming a missing or unreadable one."""
        def read(field: str, path: str) -> bytes:
            if not path:
                return b""
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidArgument(field, f"cannot read {path}: {exc.strerror}") from exc
        secret = token or read("api_token_file", token_file).decode().strip()
        return cls(read("tls_ca", ca), read("tls_cert", cert), read("tls_key", key), secret)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS trusting the cluster CA, plus the token on every call when there is one."""
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca)
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token))
        return credentials

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        """A channel from this node to another (log proxying)."""
        if self.tls:
            return grpc.aio.secure_channel(address, self.channel_credentials())
        return grpc.aio.insecure_channel(address)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, *, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        return _denied(handler, "missing or wrong bearer token: pass --token-file or set "
                                "FILCH_TOKEN to the cluster's token (made by `filch certs`)")


def _denied(handler: grpc.RpcMethodHandler[Any, Any],
            message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
