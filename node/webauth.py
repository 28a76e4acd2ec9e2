"""Who may use the HTTP face: the bearer token, the UI's session cookie, the Host allowlist
and the proof of same origin that state-changing browser requests carry.

The rules (README, "The HTTP face"):

- Every request but the probes must name this node in `Host` (a name or address on the
  allowlist). A DNS-rebinding page reaches us under its own name, so its `Host` is refused.
- With a token configured, every `/api/` route and the UI need it: programs send
  `Authorization: Bearer <token>`; the browser sends the session cookie that `POST /login`
  set after the user typed the token. The cookie holds HMAC(token, "filch-ui-session"), not
  the token: it is worthless against the gRPC API, and changing the token ends every session.
- A request that changes state and is not bearer-authenticated (the cookie, or no token at
  all on a loopback-only node) must carry `Content-Type: application/json`, and any `Origin`
  must be on the allowlist. A cross-site HTML form cannot send that content type, and a
  cross-site script can send it only after a CORS preflight, which this server never grants.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

COOKIE_NAME: Final = "filch_session"
# What the session value is derived from; a constant, so every worker and every node with
# the same token agrees on it without shared state.
SESSION_CONTEXT: Final = b"filch-ui-session"
# Names that always mean this machine; 127.0.0.0/8 and ::1 literals are accepted as well.
LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
STATE_CHANGING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON: Final = "application/json"


class Refused(Exception):
    """A request the rules above turn away: the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def host_name(value: str) -> str:
    """The host of a `Host` header or netloc, lower-cased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def session_value(token: str) -> str:
    return hmac.new(token.encode(), SESSION_CONTEXT, hashlib.sha256).hexdigest()


def default_hosts(environ: Mapping[str, str]) -> set[str]:
    """This node's names and addresses as the process environment knows them: the HTTP and
    gRPC bind and advertise hosts, the node name, the machine's host name, and
    FILCH_HTTP_ALLOWED_HOSTS (comma-separated, added to the rest)."""
    # Not getfqdn(): a reverse DNS lookup at start could hang where DNS is broken.
    hosts = {socket.gethostname(), environ.get("FILCH_NAME", "")}
    for variable in ("FILCH_HTTP_LISTEN", "FILCH_ADVERTISE", "FILCH_LISTEN", "FILCH_SERVER"):
        hosts.add(environ.get(variable, "").rpartition(":")[0])
    hosts.update(environ.get("FILCH_HTTP_ALLOWED_HOSTS", "").split(","))
    return {host_name(host) for host in hosts} - {"", "0.0.0.0", "::"}


@dataclass(frozen=True)
class Gate:
    """The checks, given the token ("" for none) and the allowed host names."""

    token: str
    allowed_hosts: frozenset[str]

    @classmethod
    def create(cls, token: str, hosts: Iterable[str]) -> Gate:
        return cls(token, frozenset(host_name(host) for host in hosts if host_name(host)))

    def host_allowed(self, host: str) -> bool:
        return is_loopback(host) or host in self.allowed_hosts

    def check_host(self, environ: Mapping[str, Any]) -> None:
        """Raises Refused (400) unless `Host` names this node."""
        given = str(environ.get("HTTP_HOST", ""))
        if not given:
            raise Refused(400, "Host: missing; name this node (HTTP/1.1 requires Host)")
        if not self.host_allowed(host_name(given)):
            raise Refused(400, f"Host: {given!r} is not a name or address of this node; "
                               "add it to FILCH_HTTP_ALLOWED_HOSTS if it is")

    def bearer(self, environ: Mapping[str, Any]) -> bool:
        """Whether the request carries the right `Authorization: Bearer` token."""
        scheme, _, given = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        return bool(self.token) and scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode())

    def cookie(self, environ: Mapping[str, Any]) -> bool:
        """Whether the request carries the right session cookie."""
        if not self.token:
            return False
        for part in str(environ.get("HTTP_COOKIE", "")).split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE_NAME and hmac.compare_digest(
                    value.strip().encode(), session_value(self.token).encode()):
                return True
        return False

    def authenticate(self, environ: Mapping[str, Any], method: str) -> None:
        """Raises Refused (401 or 403) unless the request may go on: a bearer token passes;
        anything else needs the cookie (when there is a token) and, to change state, the
        same-origin proof."""
        if self.bearer(environ):
            return
        if self.token and not self.cookie(environ):
            raise Refused(401, "not signed in: send Authorization: Bearer <token>, or sign "
                               "in to the web UI at /login")
        if method in STATE_CHANGING:
            self.check_same_origin(environ)

    def check_same_origin(self, environ: Mapping[str, Any]) -> None:
        """Raises Refused (403) unless a browser request provably comes from our own page."""
        content_type = str(environ.get("CONTENT_TYPE", "")).partition(";")[0].strip().lower()
        if content_type != _JSON:
            raise Refused(403, f"Content-Type: {content_type or 'missing'!s}; a browser "
                               f"request that changes state must send {_JSON}")
        origin = str(environ.get("HTTP_ORIGIN", ""))
        if origin and not self.host_allowed(host_name(urlsplit(origin).netloc)):
            raise Refused(403, f"Origin: cross-origin request from {origin} refused")

    def login(self, given: str) -> str:
        """The session value for a correct token; raises Refused (401) otherwise."""
        if not self.token:
            raise Refused(409, "token: this node has no token; the UI needs no sign-in")
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Refused(401, "token: wrong token")
        return session_value(self.token)


def session_cookie(value: str, secure: bool) -> str:
    """The Set-Cookie value: never readable by page scripts (HttpOnly), never sent by
    another site's page (SameSite=Strict), only over TLS when we serve TLS (Secure).
    No Max-Age: the session ends with the browser's, or at /logout."""
    attributes = [f"{COOKIE_NAME}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def cleared_cookie(secure: bool) -> str:
    return session_cookie("", secure) + "; Max-Age=0"
