"""Who a call comes from: the bearer token (the cluster token or a user's), resolved once
per call into the Identity the services check (node/core/identity.py).

- The cluster token (`filch certs`) acts as ADMIN. It is what nodes use among themselves
  and what the HTTP face holds; from it alone, the impersonation metadata is honored:
  `filch-as-user` (a signed-in browser session's user) and `filch-user-token` (a user's
  own token a program gave the HTTP face, checked here), plus `filch-client-address`.
- A user's token acts as that user, with its role; expired, rotated or removed tokens
  are refused (UNAUTHENTICATED) as soon as this node's watch of /user/ saw the change.
- A node without a token (plain text, loopback or a trusted network) serves everyone as
  ADMIN: there is nothing to tell callers apart by.
Health checks stay open so that load balancers and grpc_health_probe need no secret.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import identity as ids
from node.core.errors import NotAuthenticated
from node.core.identity import Identity
from node.etcd.users import UserDirectory

OPEN_METHODS = ("/grpc.health.v1.Health/",)
DENIED_TOKEN = ("missing or wrong bearer token: pass --token-file or set FILCH_TOKEN to the "
                "cluster's token (made by `filch certs`) or to your user token (`filch user "
                "token`)")


def role_name(role: int) -> str:
    return ids.ROLE_ADMIN if role == pb.ROLE_ADMIN else ids.ROLE_USER


class Authenticator:
    """Resolves a call's credentials: token "" means this node has none (all are admin)."""

    def __init__(self, *, token: str, users: UserDirectory) -> None:
        self._token = token.encode()
        self.users = users

    @property
    def open(self) -> bool:
        return not self._token

    def identify(self, bearer: bytes, metadata: Mapping[str, str], *, address: str,
                 via: str) -> Identity:
        """The identity of a call with this bearer token and metadata; raises
        NotAuthenticated with the reason."""
        if not self._token:
            return Identity(ids.ADMIN, ids.ROLE_ADMIN, address, via, cluster_token=True)
        if hmac.compare_digest(bearer, self._token):
            return self._on_behalf(metadata, address, via)
        user = self.users.by_token(bearer.decode(errors="replace"))
        if user is None:
            raise NotAuthenticated(DENIED_TOKEN)
        return Identity(user.name, role_name(user.role), address, via)

    def _on_behalf(self, metadata: Mapping[str, str], address: str, via: str) -> Identity:
        """The cluster token's caller, or whom it calls for (the HTTP face)."""
        address = metadata.get(ids.CLIENT_ADDRESS_HEADER, "") or address
        as_user = metadata.get(ids.AS_USER_HEADER, "")
        user_token = metadata.get(ids.USER_TOKEN_HEADER, "")
        if not (as_user or user_token):
            return Identity(ids.ADMIN, ids.ROLE_ADMIN, address, via, cluster_token=True)
        via = "http"
        if user_token:
            user = self.users.by_token(user_token)
            if user is None:
                raise NotAuthenticated("wrong, expired or revoked user token")
            return Identity(user.name, role_name(user.role), address, via)
        if as_user == ids.ADMIN:
            return Identity(ids.ADMIN, ids.ROLE_ADMIN, address, via, cluster_token=True)
        user = self.users.get(as_user)
        if user is None:
            raise NotAuthenticated(f"user {as_user!r} no longer exists: sign in again")
        return Identity(user.name, role_name(user.role), address, via)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs every call (but health checks) as the identity its credentials name, or
    answers UNAUTHENTICATED."""

    def __init__(self, *, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS):
            return handler
        metadata = {key: value if isinstance(value, str) else value.decode(errors="replace")
                    for key, value in handler_call_details.invocation_metadata or ()}
        scheme, _, given = metadata.get("authorization", "").partition(" ")
        bearer = given.strip().encode() if scheme.lower() == "bearer" else b""
        return _as_caller(handler, lambda peer: self._auth.identify(
            bearer, metadata, address=_address(peer), via="grpc"))


def _address(peer: str) -> str:
    """ipv4:1.2.3.4:5 -> 1.2.3.4:5; ipv6:[::1]:5 -> [::1]:5; unix:... stays."""
    kind, _, rest = peer.partition(":")
    return rest if kind in ("ipv4", "ipv6") else peer


def _as_caller(handler: grpc.RpcMethodHandler[Any, Any],
               resolve: Callable[[str], Identity]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape that resolves the caller (peer known only now), then
    runs the original behavior as it, or aborts UNAUTHENTICATED."""
    async def who(context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        try:
            return resolve(context.peer() or "")
        except NotAuthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise AssertionError("unreachable") from exc

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with ids.acting_as(await who(context)):
            behavior: Any = handler.unary_unary or handler.stream_unary
            return await behavior(request, context)

    async def streaming(request: Any,
                        context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        with ids.acting_as(await who(context)):
            behavior: Any = handler.unary_stream or handler.stream_stream
            async for item in behavior(request, context):
                yield item

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
