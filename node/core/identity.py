"""Who is calling: the identity every API call runs as (issue 21: users and roles).

The gRPC token interceptor and the local socket resolve the caller once per call and set
it here (a context variable: one per call's task); the services read it to decide what the
caller may do and to write the audit trail. The cluster token (`filch certs`) is the
operators' credential: it acts as ADMIN. A node without a token serves only its own
machine and trusted networks as ADMIN too (README, "Security").

The HTTP face holds the cluster token and calls its daemon on behalf of whoever signed in:
it names that caller in metadata that the daemon honors only from a cluster-token call
(impersonation, as Kubernetes' Impersonate-User: the daemon then checks everything as that
user, never as admin).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

# The name the cluster token acts under (and what the audit shows for it).
ADMIN: Final = "admin"
ROLE_USER: Final = "user"
ROLE_ADMIN: Final = "admin"

# Metadata the HTTP face sends with the cluster token (honored from no one else):
# the user a signed-in browser session belongs to,
AS_USER_HEADER: Final = "filch-as-user"
# a user's own bearer token that a program gave the HTTP face (checked by the daemon),
USER_TOKEN_HEADER: Final = "filch-user-token"
# and the address of the browser or program that called the HTTP face (for the audit).
CLIENT_ADDRESS_HEADER: Final = "filch-client-address"


@dataclass(frozen=True)
class Identity:
    """A caller: name (a user, or ADMIN), role, where it called from, and through what."""

    name: str
    role: str
    address: str = ""
    via: str = "grpc"
    """grpc, local (the CLI's Unix socket) or http (the HTTP face)"""
    cluster_token: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN


# Before any interceptor ran (in-process callers, tests, a node without a token): admin.
OPERATOR: Final = Identity(ADMIN, ROLE_ADMIN, via="internal", cluster_token=True)

_CURRENT: contextvars.ContextVar[Identity] = contextvars.ContextVar("filch_identity",
                                                                   default=OPERATOR)


def current() -> Identity:
    """The identity the running call acts as."""
    return _CURRENT.get()


@contextlib.contextmanager
def acting_as(identity: Identity) -> Iterator[Identity]:
    """Run the block as identity (restored after it)."""
    token = _CURRENT.set(identity)
    try:
        yield identity
    finally:
        _CURRENT.reset(token)
