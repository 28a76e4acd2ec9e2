"""Who may use the HTTP face: the bearer token, the UI's session cookie, the Host allowlist
and the proof of same origin that state-changing browser requests carry.

The rules (README, "The HTTP face"):

- Every request but the probes must name this node in `Host` (a name or address on the
  allowlist). A DNS-rebinding page reaches us under its own name, so its `Host` is refused.
- Without a token, only loopback peers are served (REMOTE_ADDR, checked here whatever
  address gunicorn was told to bind: `-b` and GUNICORN_CMD_ARGS bypass gunicorn_conf.py).
- With a token configured, every `/api/` route and the UI need a credential: programs send
  `Authorization: Bearer <token>`, the cluster token (admin) or a user's token (passed on to
  the daemon, which decides: a wrong one is 401); the browser sends the session cookie that
  `POST /login` set after the user typed either token. The session carries the identity
  (the user's name, or admin for the cluster token) and every call for it names that user
  (node/faces/callers.py): the face never acts as admin for a user. The cookie holds a
  random session id (node/faces/sessions.py: server-side, expiring, ended by `POST /logout`
  on every node), not the token: it is worthless against the gRPC API. Sessions outlive a
  change of the cluster token (they were granted by whoever held the old one); a removed
  user's session stops working at once (the daemon no longer knows the name).
- A request that changes state and is not bearer-authenticated (the cookie, or no token at
  all on a loopback-only node) must carry `Content-Type: application/json`, and any `Origin`
  must be on the allowlist. A cross-site HTML form cannot send that content type, and a
  cross-site script can send it only after a CORS preflight, which this server never grants.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from node.core.errors import Refused
from node.faces.callers import Caller

COOKIE_NAME: Final = "filch_session"
# What a session id looks like (node/faces/sessions.py: secrets.token_urlsafe(32)); anything else
# in the cookie is refused here, without asking the agent.
SESSION_ID: Final = re.compile(r"^[A-Za-z0-9_-]{43}$")
# Who signs in with the cluster token (node/core/identity.py ADMIN).
ADMIN: Final = "admin"
# What a bearer token may look like before it is passed on as gRPC metadata (printable
# ASCII, bounded): anything else is wrong without asking the daemon.
TOKEN_TEXT: Final = re.compile(r"^[\x21-\x7e]{1,512}$")
WRONG_TOKEN: Final = "token: wrong token"
# Names that always mean this machine; 127.0.0.0/8 and ::1 literals are accepted as well.
LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
STATE_CHANGING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_JSON: Final = "application/json"


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


def peer_is_local(environ: Mapping[str, Any]) -> bool:
    """Whether the TCP peer is this machine: a loopback address, or none at all (a unix
    socket, which file permissions guard)."""
    peer = str(environ.get("REMOTE_ADDR") or "")
    return not peer or is_loopback(peer)


class Sessions(Protocol):
    """Where sessions live: the agent (node/faces/http.py asks it over gRPC)."""

    def create(self, identity: str) -> tuple[str, int]:
        """A new session: (its id, seconds it lasts). Raises Refused when it cannot."""

    def check(self, session_id: str) -> str | None:
        """The identity of a live session; None when it is unknown, revoked or expired.
        Raises Refused (503) when the agent cannot say."""

    def revoke(self, session_id: str) -> None:
        """End the session on every node (nothing when there is none)."""


class TokenOwners(Protocol):
    """Who holds a user token: the daemon (node/faces/http_users.py asks it, WhoAmI)."""

    def name_of(self, token: str) -> str:
        """The user name of a live user token. Raises Refused: 401 for a wrong, expired or
        revoked token, another status when the daemon cannot say."""


class NoSessions:
    """For a node without a token: there is nothing to sign in to."""

    def create(self, identity: str) -> tuple[str, int]:
        raise Refused(409, "token: this node has no token; the UI needs no sign-in")

    def check(self, session_id: str) -> str | None:
        return None

    def revoke(self, session_id: str) -> None:
        return None


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
    """The checks, given the token ("" for none), the allowed host names and where
    sessions live."""

    token: str
    allowed_hosts: frozenset[str]
    sessions: Sessions
    users: TokenOwners | None = None
    """None: only the cluster token signs in (the daemon cannot check user tokens)."""

    @classmethod
    def create(cls, token: str, hosts: Iterable[str], sessions: Sessions | None = None,
               users: TokenOwners | None = None) -> Gate:
        return cls(token, frozenset(host_name(host) for host in hosts if host_name(host)),
                   sessions or NoSessions(), users)

    def check_peer(self, environ: Mapping[str, Any]) -> None:
        """Raises Refused (403) when a node without a token is reached from another
        machine: nothing but the loopback interface may reach an unguarded node."""
        if not self.token and not peer_is_local(environ):
            raise Refused(403, f"this node's HTTP face has no token, so it serves loopback "
                               f"clients only (you are {environ.get('REMOTE_ADDR')}): give "
                               "it FILCH_TOKEN_FILE (made by `filch certs`), or bind "
                               "127.0.0.1 and reach it through an SSH tunnel")

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

    def bearer(self, environ: Mapping[str, Any]) -> str | None:
        """The token of the request's `Authorization: Bearer` header (None without one, or
        on a node without a token, where none is looked at)."""
        scheme, _, given = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        given = given.strip()
        if not self.token or scheme.lower() != "bearer" or not given:
            return None
        return given

    def is_cluster_token(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(given.encode(), self.token.encode())

    def cookie(self, environ: Mapping[str, Any]) -> str | None:
        """The identity of the live session the request's cookie names, else None."""
        if not self.token:
            return None
        value = session_of(environ)
        return None if value is None else self.sessions.check(value)

    def authenticate(self, environ: Mapping[str, Any], method: str) -> Caller:
        """Whom the request's calls act for (its address is the App's to add); raises
        Refused (401 or 403) unless it may go on. The cluster token as bearer acts as
        admin; another bearer token is passed on for the daemon to check (a wrong one comes
        back 401); anything else needs the cookie (when there is a token) and, to change
        state, the same-origin proof. Bearer requests need no such proof: a browser never
        adds the header by itself."""
        given = self.bearer(environ)
        if given is not None:
            if self.is_cluster_token(given):
                return Caller()
            # Without a daemon that checks user tokens (users None: no TLS to it, so no
            # token reaches it), another token is no credential at all.
            if self.users is not None:
                if not TOKEN_TEXT.fullmatch(given):
                    raise Refused(401, WRONG_TOKEN)
                return Caller(user_token=given)
        identity = self.cookie(environ)
        if self.token and identity is None:
            raise Refused(401, "not signed in: send Authorization: Bearer <token>, or sign "
                               "in to the web UI at /login")
        if method in STATE_CHANGING:
            self.check_same_origin(environ)
        return Caller(as_user=identity or "")

    def check_same_origin(self, environ: Mapping[str, Any]) -> None:
        """Raises Refused (403) unless a browser request provably comes from our own page."""
        content_type = str(environ.get("CONTENT_TYPE", "")).partition(";")[0].strip().lower()
        if content_type != _JSON:
            raise Refused(403, f"Content-Type: {content_type or 'missing'!s}; a browser "
                               f"request that changes state must send {_JSON}")
        origin = str(environ.get("HTTP_ORIGIN", ""))
        if origin and not self.host_allowed(host_name(urlsplit(origin).netloc)):
            raise Refused(403, f"Origin: cross-origin request from {origin} refused")

    def login(self, given: str) -> tuple[str, int]:
        """A new session (its id and lifetime in seconds) for the cluster token (as admin)
        or a live user token (as that user); raises Refused (401) for any other token, 409
        on a node without a token."""
        if not self.token:
            raise Refused(409, "token: this node has no token; the UI needs no sign-in")
        given = given.strip()
        if self.is_cluster_token(given):
            return self.sessions.create(ADMIN)
        if self.users is None or not TOKEN_TEXT.fullmatch(given):
            raise Refused(401, WRONG_TOKEN)
        return self.sessions.create(self.users.name_of(given))

    def logout(self, environ: Mapping[str, Any]) -> None:
        """End the session the cookie names, on every node (nothing when there is none)."""
        value = session_of(environ)
        if self.token and value is not None:
            self.sessions.revoke(value)


def session_of(environ: Mapping[str, Any]) -> str | None:
    """The well-formed session id in the request's cookie, else None."""
    for part in str(environ.get("HTTP_COOKIE", "")).split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME and SESSION_ID.fullmatch(value.strip()):
            return value.strip()
    return None


def session_cookie(value: str, secure: bool, max_age: int) -> str:
    """The Set-Cookie value: never readable by page scripts (HttpOnly), never sent by
    another site's page (SameSite=Strict), only over TLS when we serve TLS (Secure), and
    dropped by the browser when the session expires on the server (Max-Age)."""
    attributes = [f"{COOKIE_NAME}={value}", "Path=/", "HttpOnly", "SameSite=Strict",
                  f"Max-Age={max_age}"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def cleared_cookie(secure: bool) -> str:
    return session_cookie("", secure, 0)
