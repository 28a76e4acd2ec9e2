"""Who an HTTP request's calls to the daemon act for, and from which address.

The HTTP face never calls its daemon as itself for a request (that would be admin): every
call names the request's caller (node/core/call_metadata.py), the daemon checks it like any
other (node/faces/authn.py). HTTP headers never become gRPC metadata except through Caller:
a client that sends `filch-as-user` itself is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

# FILCH_HTTP_TRUSTED_PROXIES: the reverse proxies whose X-Forwarded-For is believed (comma-
# separated addresses or networks). Unset, the address is REMOTE_ADDR: anyone can write
# X-Forwarded-For, so believing it by default would let a caller choose what the audit shows.
TRUSTED_PROXIES_VARIABLE: Final = "FILCH_HTTP_TRUSTED_PROXIES"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Caller:
    """Whom a request's calls act for: a signed-in session's user (as_user; "admin" for a
    session the cluster token opened), the holder of a bearer token that is not the
    cluster token (user_token, checked by the daemon), or, both empty, the cluster token's
    own holder (admin)."""

    as_user: str = ""
    user_token: str = ""
    address: str = ""


def trusted_proxies(environ: Mapping[str, str]) -> tuple[Network, ...]:
    """The networks of FILCH_HTTP_TRUSTED_PROXIES; raises ValueError naming a bad entry."""
    networks = []
    for entry in environ.get(TRUSTED_PROXIES_VARIABLE, "").split(","):
        if entry.strip():
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{TRUSTED_PROXIES_VARIABLE}: {entry.strip()!r} is not an "
                                 "address or network (10.0.0.5, 10.0.0.0/24)") from None
    return tuple(networks)


def client_address(environ: Mapping[str, Any], proxies: tuple[Network, ...] = ()) -> str:
    """The address of the browser or program behind a request: REMOTE_ADDR, or, when that
    is a trusted proxy, the nearest X-Forwarded-For entry that is not one (entries further
    left were written by whoever called the first proxy and prove nothing)."""
    address = str(environ.get("REMOTE_ADDR") or "")
    if not proxies or not _trusted(address, proxies):
        return address
    for hop in reversed(str(environ.get("HTTP_X_FORWARDED_FOR", "")).split(",")):
        hop = hop.strip()
        if not _trusted(hop, proxies):
            return hop if _is_address(hop) else address
    return address


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)
