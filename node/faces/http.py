"""The HTTP face of a node: health probes, a JSON API and the web UI, over the local daemon.

gunicorn serves `node.faces.http:app` (settings in node/faces/gunicorn_conf.py). Every
request becomes calls through node.client to the filch daemon at FILCH_SERVER (default
127.0.0.1:7070); this module holds no state of its own beyond that client. This module
routes and serves the UI; the probes and the JSON API are node/faces/http_api.py, request
parsing and JSON answers node/faces/http_wire.py, log streaming node/faces/http_logs.py.

    GET  /healthz                       liveness: the daemon answers its gRPC health check
    GET  /readyz                        readiness: daemon serving, etcd answering, lease held
    GET  /api/v1/tasks                  ?state=pending&page_size=N&page_token=T, or
                                        ?array_id=A (that array's tasks, in index order)
    POST /api/v1/tasks                  submit (JSON spec): 201 created, 200 request_id matched;
                                        with "array": {"array_id", "task_ids", "task"}
    GET  /api/v1/tasks/<id>
    POST /api/v1/tasks/<id>/cancel
    POST /api/v1/arrays/<id>/cancel     every unfinished task of the array: {"canceled": N}
    GET  /api/v1/tasks/<id>/logs        ?follow=1&attempt=N, streamed as text/plain
    GET  /api/v1/nodes
    GET  /api/v1/events                 ?since=R&task=ID: server-sent events, one message per
                                        etcd revision (node/faces/http_events.py)
    GET  /api/v1/owners                 fair share: weight, usage and share of every owner
    POST /api/v1/owners/<name>/weight   {"weight": W}
    GET  /api/v1/whoami, /api/v1/users..., /api/v1/cluster/settings, /api/v1/audit:
                                        users, settings and the audit trail
                                        (node/faces/http_users.py)
    GET  /                              the web UI (files in node/faces/web/)
    GET  /login                         the UI's sign-in form; POST /login {"token": ...}
    POST /logout                        ends the UI's session on every node, clears its cookie

Who may call what is node/faces/webauth.py's business: a node without a token serves loopback
peers only; probes are open, everything else must name this node in Host, and with a token
configured /api/ and the UI need a token (bearer: the cluster token, or a user's) or the
session cookie /login sets (a session the agent keeps in etcd: node/faces/sessions.py).
Every call a request makes to the daemon names its caller and address
(node/faces/callers.py): the daemon, not this face, decides what that caller may do.

gRPC status codes become HTTP statuses (http_wire.failure) with the body {"error": "..."};
a client never sees a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from wsgiref.types import StartResponse, WSGIEnvironment

from node.client import DEFAULT_SERVER, Client
from node.core.errors import ClientError, HttpError, InvalidRequest, NotFound, Refused
from node.core.tls import Security
from node.faces import http_events
from node.faces.callers import Caller, Network, client_address, trusted_proxies
from node.faces.http_api import Api
from node.faces.http_users import AgentUsers, UsersApi
from node.faces.http_wire import Request, Response, failure, json_response
from node.faces.webauth import Gate, cleared_cookie, default_hosts, session_cookie

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).with_name("web")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything the UI loads is served from here: no CDN, no inline script.
_UI_SECURITY_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


Handler = Callable[[Request, re.Match[str]], Response]


# Who may reach a route (node/faces/webauth.py): probes skip every check (load balancers and
# kubelets probe by IP or by names we cannot know); PUBLIC routes check Host only (the sign-in
# form and the UI's static files, which hold no data); SIGN_IN routes also need the
# same-origin proof; PRIVATE routes need the token or the session cookie.
PROBE, PUBLIC, SIGN_IN, PRIVATE = "probe", "public", "sign-in", "private"


class AgentSessions:
    """Sessions as the local agent keeps them (CreateSession, CheckSession, RevokeSession):
    this process holds none, so a sign-out anywhere is seen by every worker and node. The
    agent caches a positive check for sessions.CHECK_CACHE_SECONDS (5 s); this side does
    not cache, so a sign-out through this node is effective here at once."""

    def __init__(self, *, client: Client) -> None:
        self._client = client

    def create(self, identity: str) -> tuple[str, int]:
        try:
            created = self._client.create_session(identity)
        except ClientError as error:
            raise _refused(error) from None
        lifetime = created.session.expires_at.seconds - created.session.created_at.seconds
        return created.session_id, lifetime

    def check(self, session_id: str) -> str | None:
        try:
            return self._client.check_session(session_id).identity
        except (NotFound, InvalidRequest):
            return None
        except ClientError as error:
            raise _refused(error) from None

    def revoke(self, session_id: str) -> None:
        try:
            self._client.revoke_session(session_id)
        except (NotFound, InvalidRequest):
            pass  # already over, or never a session: signed out either way
        except ClientError as error:
            raise _refused(error) from None


def _refused(error: ClientError) -> Refused:
    failed = failure(error)
    return Refused(failed.status, f"sessions: {failed.message}")


class App:
    """The WSGI application: a small router over PATH_INFO and the method."""

    def __init__(self, *, server: str, advertise: str | None = None,
                 web_dir: Path = WEB_DIR, security: Security | None = None,
                 allowed_hosts: Iterable[str] = (), proxies: tuple[Network, ...] = ()
                 ) -> None:
        """server: the daemon's gRPC HOST:PORT. advertise: the address the daemon's node
        record carries (default: server), which readiness looks for in the node list.
        security: the CA and token when the daemon serves TLS; its token, if any, is also
        what /api/ and the UI demand. allowed_hosts: this node's names and addresses that
        Host may carry, besides loopback (see webauth.default_hosts)."""
        # The local daemon, through the one client; its token also guards /api/ and the UI.
        self.daemon = Client.with_security(server, security or Security())
        self.api = Api(client=self.daemon, advertise=advertise or server)
        self.web_dir = web_dir
        self.proxies = proxies
        self.gate = Gate.create(self.daemon.security.token, allowed_hosts,
                                AgentSessions(client=self.daemon),
                                # The daemon checks user tokens only over TLS, where
                                # the face's own token reaches it.
                                AgentUsers(client=self.daemon)
                                if self.daemon.security.tls else None)
        api = self.api
        users = UsersApi()
        routes: list[tuple[str, str, dict[str, Handler]]] = [
            (r"/healthz", PROBE, {"GET": api.healthz}),
            (r"/readyz", PROBE, {"GET": api.readyz}),
            (r"/api/v1/tasks", PRIVATE, {"GET": api.list_tasks, "POST": api.submit}),
            (r"/api/v1/tasks/(?P<id>[^/]+)", PRIVATE, {"GET": api.get_task}),
            (r"/api/v1/tasks/(?P<id>[^/]+)/cancel", PRIVATE, {"POST": api.cancel}),
            (r"/api/v1/tasks/(?P<id>[^/]+)/logs", PRIVATE, {"GET": api.logs}),
            (r"/api/v1/arrays/(?P<id>[^/]+)/cancel", PRIVATE, {"POST": api.cancel_array}),
            (r"/api/v1/nodes", PRIVATE, {"GET": api.list_nodes}),
            (r"/api/v1/events", PRIVATE, {"GET": self.events}),
            (r"/api/v1/nodes/(?P<name>[^/]+)/cordon", PRIVATE, {"POST": api.cordon_node}),
            (r"/api/v1/nodes/(?P<name>[^/]+)/uncordon", PRIVATE, {"POST": api.uncordon_node}),
            (r"/api/v1/nodes/(?P<name>[^/]+)/drain", PRIVATE, {"POST": api.drain_node}),
            (r"/api/v1/owners", PRIVATE, {"GET": api.list_owners}),
            (r"/api/v1/owners/(?P<name>[^/]+)/weight", PRIVATE, {"POST": api.set_owner_weight}),
            (r"/api/v1/whoami", PRIVATE, {"GET": users.whoami}),
            (r"/api/v1/users", PRIVATE, {"GET": users.list_users, "POST": users.add_user}),
            (r"/api/v1/users/(?P<name>[^/]+)", PRIVATE,
             {"POST": users.set_user, "DELETE": users.remove_user}),
            (r"/api/v1/users/(?P<name>[^/]+)/token", PRIVATE, {"POST": users.rotate_token}),
            (r"/api/v1/cluster/settings", PRIVATE,
             {"GET": users.get_settings, "POST": users.set_setting}),
            (r"/api/v1/audit", PRIVATE, {"GET": users.list_audit}),
            (r"/api/.*", PRIVATE, {}),  # unknown API paths: 401 before 404, as the rest
            (r"/", PRIVATE, {"GET": self.index}),
            (r"/login", PUBLIC, {"GET": self.login_page}),
            (r"/login", SIGN_IN, {"POST": self.login}),
            (r"/logout", SIGN_IN, {"POST": self.logout}),
            # A plain file name only, so no request can reach outside web_dir.
            (r"/static/(?P<name>[A-Za-z0-9_-]+\.[a-z]+)", PUBLIC, {"GET": self.static}),
        ]
        self._routes = [(re.compile(pattern), access, methods)
                        for pattern, access, methods in routes]

    @classmethod
    def from_environment(cls) -> App:
        """The app gunicorn serves: FILCH_SERVER, FILCH_ADVERTISE for readiness, FILCH_CA
        with FILCH_TOKEN_FILE (or FILCH_TOKEN), and the Host allowlist's sources
        (webauth.default_hosts, FILCH_HTTP_ALLOWED_HOSTS among them)."""
        server = os.environ.get("FILCH_SERVER") or DEFAULT_SERVER
        security = Security.load(os.environ.get("FILCH_CA", ""),
                                 token_file=os.environ.get("FILCH_TOKEN_FILE", ""),
                                 token=os.environ.get("FILCH_TOKEN", ""))
        return cls(server=server, advertise=os.environ.get("FILCH_ADVERTISE") or None,
                   security=security,
                   allowed_hosts=default_hosts(os.environ),
                   proxies=trusted_proxies(os.environ))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse
                 ) -> Iterable[bytes]:
        request = Request.from_environ(environ)
        try:
            response = self._dispatch(request)
        except HttpError as error:
            if error.status == 401 and request.path == "/":
                # A person opening the UI: a page that sends them to the sign-in form.
                response = self._file("signin-redirect.html", status=401)
            else:
                headers = list(error.headers)
                if error.status == 401 and not headers:
                    # The daemon's UNAUTHENTICATED (a wrong user token, a removed user).
                    headers.append(("WWW-Authenticate", 'Bearer realm="filch"'))
                response = json_response(error.status, {"error": error.message}, headers)
        except Exception as error:
            log.exception("internal error serving %s %s", request.method, request.path)
            response = json_response(500, {"error": f"internal error ({type(error).__name__}); "
                                                    "the HTTP server's log has details"})
        status = HTTPStatus(response.status)
        start_response(f"{status.value} {status.phrase}", response.headers)
        if request.method == "HEAD":
            _close(response.body)
            return []
        return response.body

    def _dispatch(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        matched = [(access, methods, match) for pattern, access, methods in self._routes
                   if (match := pattern.fullmatch(request.path)) is not None]
        if not matched:
            raise HttpError(404, f"no such path: {request.path}")
        found = [(access, methods[method], match) for access, methods, match in matched
                 if method in methods]
        access = found[0][0] if found else matched[0][0]
        caller = Caller()
        try:
            self.gate.check_peer(request.environ)
            if access != PROBE:
                self.gate.check_host(request.environ)
            if access == PRIVATE:
                # A method no handler takes changes nothing: it gets its 405 once signed in.
                caller = self.gate.authenticate(request.environ, method if found else "GET")
                if caller.user_token and not found:
                    self._check_token(caller.user_token)  # 401 before 404, as for the rest
            elif access == SIGN_IN and found:
                self.gate.check_same_origin(request.environ)
        except Refused as refused:
            # A 401 names the scheme; the UI page itself ("/") gets, instead, a page that
            # leads to the sign-in form (__call__).
            headers = [("WWW-Authenticate", 'Bearer realm="filch"')] \
                if refused.status == 401 else []
            raise HttpError(refused.status, refused.message, headers) from None
        if not found:
            allowed_methods = {name for _, methods, _ in matched for name in methods}
            if not allowed_methods:
                raise HttpError(404, f"no such path: {request.path}")
            allowed = ", ".join(sorted(allowed_methods | {"HEAD"} if "GET" in allowed_methods
                                       else allowed_methods))
            raise HttpError(405, f"{request.method} is not allowed on {request.path}; "
                                 f"use {allowed}", [("Allow", allowed)])
        _, handler, match = found[0]
        caller = dataclasses.replace(caller, address=client_address(request.environ,
                                                                    self.proxies))
        return handler(dataclasses.replace(request, caller=self.daemon.on_behalf(
            as_user=caller.as_user, user_token=caller.user_token, address=caller.address)),
            match)

    def _check_token(self, token: str) -> None:
        """Raises Refused (401) unless the daemon knows the user token (any other answer
        leaves the request to its 404 or 405)."""
        try:
            self.gate.users.name_of(token) if self.gate.users else None
        except Refused as refused:
            if refused.status == 401:
                raise

    def events(self, request: Request, match: re.Match[str]) -> Response:
        return http_events.events(request.daemon(), request)

    # -- the web UI ----------------------------------------------------------------------------

    def index(self, request: Request, match: re.Match[str]) -> Response:
        return self._file("index.html")

    def static(self, request: Request, match: re.Match[str]) -> Response:
        return self._file(match["name"])

    def login_page(self, request: Request, match: re.Match[str]) -> Response:
        return self._file("login.html")

    def login(self, request: Request, match: re.Match[str]) -> Response:
        """{"token": "..."} -> 204 with the session cookie; 401 for a wrong token."""
        body = request.json_body()
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            raise HttpError(400, "token: required: a JSON object {\"token\": \"...\"}")
        # A Refused is an HttpError: it answers with its own status.
        value, lifetime = self.gate.login(token)
        return Response(204, [], [("Set-Cookie", session_cookie(value, request.tls, lifetime)),
                                  ("Cache-Control", "no-store")])

    def logout(self, request: Request, match: re.Match[str]) -> Response:
        """Ends the cookie's session on every node (the agent deletes it from etcd), then
        clears the cookie; 503 when the agent cannot, so the user knows it still lives."""
        self.gate.logout(request.environ)
        return Response(204, [], [("Set-Cookie", cleared_cookie(request.tls)),
                                  ("Cache-Control", "no-store")])

    def _file(self, name: str, status: int = 200) -> Response:
        # The route allows only a plain file name, so no path can leave web_dir.
        path = self.web_dir / name
        content_type = _CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            raise HttpError(404, f"no such file: {name}")
        data = path.read_bytes()
        return Response(status, [data], [("Content-Type", content_type),
                                      ("Content-Length", str(len(data))),
                                      # Small files; always revalidate so an upgrade shows.
                                      ("Cache-Control", "no-cache"),
                                      *_UI_SECURITY_HEADERS])


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


app = App.from_environment()
