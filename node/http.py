"""The HTTP face of a node: health probes, a JSON API and the web UI, over the local daemon.

gunicorn serves `node.http:app` (settings in node/gunicorn_conf.py). Every request becomes
gRPC calls to the filch daemon at FILCH_SERVER (default 127.0.0.1:7070); this module holds
no state of its own beyond that connection. The JSON shapes are render.task_to_dict and
render.node_to_dict, the same ones `filch ... -o json` prints.

    GET  /healthz                       liveness: the daemon answers its gRPC health check
    GET  /readyz                        readiness: daemon serving, etcd answering, lease held
    GET  /api/v1/tasks                  ?state=pending&page_size=N&page_token=T
    POST /api/v1/tasks                  submit (JSON spec): 201 created, 200 request_id matched
    GET  /api/v1/tasks/<id>
    POST /api/v1/tasks/<id>/cancel
    GET  /api/v1/tasks/<id>/logs        ?follow=1&attempt=N, streamed as text/plain
    GET  /api/v1/nodes
    GET  /                              the web UI (files in node/web/)
    GET  /login                         the UI's sign-in form; POST /login {"token": ...}
    POST /logout                        ends the UI's session (clears its cookie)

Who may call what is node/webauth.py's business: probes are open, everything else must name
this node in Host, and with a token configured /api/ and the UI need the token (bearer) or
the session cookie /login sets.

gRPC status codes become HTTP statuses (_HTTP_STATUS) with the body {"error": "..."};
a client never sees a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIEnvironment

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node import render
from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.http_logs import LogBody, LogStream
from node.tls import Security
from node.units import CPU_FORMS, SIZE_FORMS, parse_cpu, parse_size
from node.webauth import Gate, Refused, cleared_cookie, default_hosts, session_cookie

log = logging.getLogger(__name__)

DEFAULT_SERVER = "127.0.0.1:7070"
SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name

# Per-RPC deadline for API calls, as the CLI's: rides out an etcd leader election (~1 s)
# with room to spare, yet a hung daemon fails the request in seconds rather than never.
API_TIMEOUT = 10.0
# Probes must answer well inside a prober's own timeout (Kubernetes defaults to 1 s,
# load balancers to a few), so a slow daemon reads as "not ready" instead of a hung probe.
PROBE_TIMEOUT = 2.0
# How long a log request waits for the stream's first event (data, end or error) before it
# commits to "200 OK": errors such as "not started" arrive within milliseconds and get
# their own status; a followed task that is quiet just streams once it speaks.
LOG_PEEK = 1.0
# A spec is at most 1 MiB (validation.MAX_SPEC_BYTES); JSON escaping may double it.
MAX_BODY_BYTES = 2 * 1024 * 1024
# Enough pages for any listing a person reads; the daemon caps a page at 1000 itself.
MAX_PAGE_SIZE = 1000

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

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 507,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_BAD_GATEWAY = 502  # any other gRPC failure: the daemon behind us misbehaved

_STATES = {
    "pending": pb.TASK_STATE_PENDING,
    "running": pb.TASK_STATE_RUNNING,
    "complete": pb.TASK_STATE_COMPLETE,
    "canceled": pb.TASK_STATE_CANCELED,
}
_SPEC_FIELDS = frozenset(
    {"command", "args", "cpu", "memory", "disk", "restart", "env", "workdir", "name",
     "request_id", "network"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class HttpError(Exception):
    """A request that ends in an error status; the message becomes {"error": message}.

    Local to the HTTP face (it is a response, not a filch failure), so it lives here and
    not in node/errors.py.
    """

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


@dataclass
class Response:
    status: int
    body: Iterable[bytes]
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, data: object, headers: Iterable[tuple[str, str]] = ()
                  ) -> Response:
    body = json.dumps(data, indent=2).encode() + b"\n"
    return Response(status, [body], [("Content-Type", "application/json"),
                                     ("Content-Length", str(len(body))),
                                     ("Cache-Control", "no-store"), *headers])


@dataclass(frozen=True)
class Request:
    """The parts of a WSGI environ the handlers use."""

    environ: WSGIEnvironment
    method: str
    path: str
    query: Mapping[str, list[str]]

    @classmethod
    def from_environ(cls, environ: WSGIEnvironment) -> Request:
        return cls(environ, environ.get("REQUEST_METHOD", "GET").upper(),
                   environ.get("PATH_INFO", "") or "/",
                   parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True))

    def param(self, name: str) -> str:
        values = self.query.get(name)
        return values[-1] if values else ""

    def int_param(self, name: str, limit: int) -> int:
        text = self.param(name).strip()
        if not text:
            return 0
        if not (text.isascii() and text.isdigit()) or int(text) > limit:
            raise HttpError(400, f"{name}: {text!r} is not a whole number in 0..{limit}")
        return int(text)

    def bool_param(self, name: str) -> bool:
        text = self.param(name).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise HttpError(400, f"{name}: {text!r} is not a boolean (1 or 0)")

    def json_body(self) -> Any:
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"body: {length} bytes; the limit is {MAX_BODY_BYTES}")
        stream = self.environ["wsgi.input"]
        raw: bytes = stream.read(length) if length else stream.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise HttpError(413, f"body: more than {MAX_BODY_BYTES} bytes")
        if not raw.strip():
            raise HttpError(400, "body: empty; send a JSON object")
        try:
            return json.loads(raw)
        except ValueError as error:
            raise HttpError(400, f"body: not valid JSON ({error})") from None


# -- the daemon --------------------------------------------------------------------------------


class Daemon:
    """The local filch daemon over gRPC. The channel is made on first use in each process:
    gunicorn forks its workers, and a gRPC channel must not cross a fork."""

    def __init__(self, server: str, security: Security | None = None) -> None:
        self.server = server
        self.security = security or Security()
        self._lock = threading.Lock()
        self._owner_pid = 0
        self._channel: grpc.Channel | None = None

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None or self._owner_pid != os.getpid():
                # Not closed when inherited across a fork: that belongs to the parent.
                self._channel = (
                    grpc.secure_channel(self.server, self.security.channel_credentials())
                    if self.security.tls else grpc.insecure_channel(self.server))
                self._owner_pid = os.getpid()
            return self._channel

    def close(self) -> None:
        with self._lock:
            if self._channel is not None and self._owner_pid == os.getpid():
                self._channel.close()
            self._channel = None

    @property
    def stub(self) -> pb_grpc.SchedulerStub:
        return pb_grpc.SchedulerStub(self.channel())

    def health(self, service: str) -> str:
        """The health status name ("SERVING", ...); raises grpc.RpcError if unreachable."""
        stub = health_pb2_grpc.HealthStub(self.channel())
        response = stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=PROBE_TIMEOUT)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def failure(self, error: grpc.RpcError, timeout: float = API_TIMEOUT) -> HttpError:
        """The HTTP answer to a failed call, worded like the CLI's messages."""
        code: grpc.StatusCode = error.code()
        details = " ".join((error.details() or "").split()) or code.name
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"filch daemon at {self.server} is unavailable: {details}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"filch daemon at {self.server} did not answer within {timeout:g} s"
        return HttpError(_HTTP_STATUS.get(code, _BAD_GATEWAY), details)


# -- request bodies ----------------------------------------------------------------------------


def _typed(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    # bool is an int in Python but not in JSON: true is not a number of bytes.
    if value is not None and (not isinstance(value, kind)
                              or (kind is not bool and isinstance(value, bool))):
        raise HttpError(400, f"{name}: must be {what}, not {json.dumps(value)}")
    return value


def submit_request(body: Any) -> pb.SubmitRequest:
    """The SubmitRequest a JSON body spells; HttpError 400 naming the first bad field.

    Only types and units are checked here; the daemon validates the values themselves.
    """
    if not isinstance(body, dict):
        raise HttpError(400, "body: must be a JSON object with at least \"command\"")
    unknown = sorted(set(body) - _SPEC_FIELDS)
    if unknown:
        known = ", ".join(sorted(_SPEC_FIELDS))
        raise HttpError(400, f"{unknown[0]}: unknown field (known: {known})")
    command = _typed(body, "command", str, "a string")
    if not command:
        raise HttpError(400, "command: is required: the program to run")
    args = _typed(body, "args", list, "a list of strings") or []
    for index, arg in enumerate(args):
        if not isinstance(arg, str):
            raise HttpError(400, f"args[{index}]: must be a string, not {json.dumps(arg)}")
    env = _typed(body, "env", dict, "an object of strings") or {}
    for key, value in env.items():
        if not isinstance(value, str):
            raise HttpError(400, f"env[{key}]: must be a string, not {json.dumps(value)}")
    spec = pb.TaskSpec(
        command=command, args=args, env=env,
        cpu_millis=_cpu_millis(body.get("cpu")), memory_bytes=_memory_bytes(body.get("memory")),
        disk_bytes=_size_bytes("disk", body.get("disk")),
        workdir=_typed(body, "workdir", str, "a string") or "",
        name=_typed(body, "name", str, "a string") or "",
        network=_typed(body, "network", str, "a string") or "")
    restart = _typed(body, "restart", bool, "true or false")
    if restart is not None:
        spec.restart = restart
    return pb.SubmitRequest(spec=spec,
                            request_id=_typed(body, "request_id", str, "a string") or "")


def _cpu_millis(value: Any) -> int:
    if value is None:
        return 0  # the daemon's default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise HttpError(400, f"cpu: must be {CPU_FORMS}, not {json.dumps(value)}")
    try:
        return parse_cpu(str(value))
    except ValueError as error:
        raise HttpError(400, f"cpu: {error}") from None


def _memory_bytes(value: Any) -> int:
    return _size_bytes("memory", value)


def _size_bytes(field: str, value: Any) -> int:
    if value is None:
        return 0  # the daemon's default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise HttpError(400, f"{field}: must be {SIZE_FORMS}, not {json.dumps(value)}")
    try:
        return parse_size(str(value))
    except ValueError as error:
        raise HttpError(400, f"{field}: {error}") from None


# -- the application ---------------------------------------------------------------------------

Handler = Callable[[Request, re.Match[str]], Response]


# Who may reach a route (node/webauth.py): probes skip every check (load balancers and
# kubelets probe by IP or by names we cannot know); PUBLIC routes check Host only (the sign-in
# form and the UI's static files, which hold no data); SIGN_IN routes also need the
# same-origin proof; PRIVATE routes need the token or the session cookie.
PROBE, PUBLIC, SIGN_IN, PRIVATE = "probe", "public", "sign-in", "private"


class App:
    """The WSGI application: a small router over PATH_INFO and the method."""

    def __init__(self, server: str, advertise: str | None = None,
                 web_dir: Path = WEB_DIR, security: Security | None = None,
                 allowed_hosts: Iterable[str] = ()) -> None:
        """server: the daemon's gRPC HOST:PORT. advertise: the address the daemon's node
        record carries (default: server), which readiness looks for in the node list.
        security: the CA and token when the daemon serves TLS; its token, if any, is also
        what /api/ and the UI demand. allowed_hosts: this node's names and addresses that
        Host may carry, besides loopback (see webauth.default_hosts)."""
        self.daemon = Daemon(server, security)
        self.advertise = advertise or server
        self.web_dir = web_dir
        self.gate = Gate.create(self.daemon.security.token, allowed_hosts)
        routes: list[tuple[str, str, dict[str, Handler]]] = [
            (r"/healthz", PROBE, {"GET": self.healthz}),
            (r"/readyz", PROBE, {"GET": self.readyz}),
            (r"/api/v1/tasks", PRIVATE, {"GET": self.list_tasks, "POST": self.submit}),
            (r"/api/v1/tasks/(?P<id>[^/]+)", PRIVATE, {"GET": self.get_task}),
            (r"/api/v1/tasks/(?P<id>[^/]+)/cancel", PRIVATE, {"POST": self.cancel}),
            (r"/api/v1/tasks/(?P<id>[^/]+)/logs", PRIVATE, {"GET": self.logs}),
            (r"/api/v1/nodes", PRIVATE, {"GET": self.list_nodes}),
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
        return cls(server, os.environ.get("FILCH_ADVERTISE") or None, security=security,
                   allowed_hosts=default_hosts(os.environ))

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
                response = json_response(error.status, {"error": error.message}, error.headers)
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
        try:
            if access != PROBE:
                self.gate.check_host(request.environ)
            if access == PRIVATE:
                # A method no handler takes changes nothing: it gets its 405 once signed in.
                self.gate.authenticate(request.environ, method if found else "GET")
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
        return handler(request, match)

    # -- probes --------------------------------------------------------------------------------

    def healthz(self, request: Request, match: re.Match[str]) -> Response:
        try:
            status = self.daemon.health("")
        except grpc.RpcError as error:
            reason = self.daemon.failure(error, PROBE_TIMEOUT).message
            return json_response(503, {"status": "unavailable", "reason": reason})
        if status != "SERVING":
            return json_response(503, {"status": "unavailable", "reason":
                                       f"filch daemon at {self.daemon.server} reports {status}"})
        return json_response(200, {"status": "ok"})

    def readyz(self, request: Request, match: re.Match[str]) -> Response:
        """Each check on its own, so a failing one says which part is missing."""
        checks: list[dict[str, object]] = []

        def check(name: str, ok: bool, detail: str) -> None:
            checks.append({"name": name, "ok": ok, "detail": detail})

        try:
            status = self.daemon.health(SERVICE_NAME)
            check("daemon", status == "SERVING",
                  f"{SERVICE_NAME} at {self.daemon.server} is {status}")
        except grpc.RpcError as error:
            check("daemon", False, self.daemon.failure(error, PROBE_TIMEOUT).message)
        try:
            nodes = self.daemon.stub.ListNodes(pb.ListNodesRequest(), timeout=PROBE_TIMEOUT).nodes
        except grpc.RpcError as error:
            reason = self.daemon.failure(error, PROBE_TIMEOUT).message
            check("etcd", False, f"listing nodes failed: {reason}")
            check("lease", False, "unknown: the node list could not be read")
        else:
            check("etcd", True, f"etcd answered: {len(nodes)} live node(s)")
            mine = [node for node in nodes if node.address == self.advertise]
            if mine:
                check("lease", True, f"node {mine[0].name} ({mine[0].id}) holds its lease "
                                     f"at {self.advertise}")
            else:
                check("lease", False, f"no live node advertises {self.advertise}: the "
                                      "daemon has no lease (starting, fenced or leaving)")
        ready = all(item["ok"] for item in checks)
        return json_response(200 if ready else 503, {"ready": ready, "checks": checks})

    # -- the JSON API --------------------------------------------------------------------------

    def list_tasks(self, request: Request, match: re.Match[str]) -> Response:
        state_text = request.param("state").strip().lower()
        if state_text not in ("", "all") and state_text not in _STATES:
            raise HttpError(400, f"state: {state_text!r} is not one of "
                                 f"{', '.join(_STATES)} (or empty for all)")
        grpc_request = pb.ListTasksRequest(
            state=_STATES.get(state_text, pb.TASK_STATE_UNSPECIFIED),
            page_size=request.int_param("page_size", MAX_PAGE_SIZE),
            page_token=request.param("page_token"))
        try:
            response = self.daemon.stub.ListTasks(grpc_request, timeout=API_TIMEOUT)
        except grpc.RpcError as error:
            raise self.daemon.failure(error) from None
        return json_response(200, {"tasks": [render.task_to_dict(task) for task in response.tasks],
                                   "next_page_token": response.next_page_token})

    def get_task(self, request: Request, match: re.Match[str]) -> Response:
        return json_response(200, render.task_to_dict(self._get(match["id"])))

    def _get(self, task_id: str) -> pb.Task:
        try:
            return self.daemon.stub.GetTask(pb.GetTaskRequest(id=task_id), timeout=API_TIMEOUT)
        except grpc.RpcError as error:
            raise self.daemon.failure(error) from None

    def submit(self, request: Request, match: re.Match[str]) -> Response:
        grpc_request = submit_request(request.json_body())
        try:
            response = self.daemon.stub.Submit(grpc_request, timeout=API_TIMEOUT)
        except grpc.RpcError as error:
            raise self.daemon.failure(error) from None
        return json_response(201 if response.created else 200,
                             render.task_to_dict(response.task),
                             [("Location", f"/api/v1/tasks/{response.task.id}")])

    def cancel(self, request: Request, match: re.Match[str]) -> Response:
        try:
            response = self.daemon.stub.Cancel(pb.CancelRequest(id=match["id"]),
                                               timeout=API_TIMEOUT)
        except grpc.RpcError as error:
            raise self.daemon.failure(error) from None
        return json_response(200, render.task_to_dict(response.task))

    def logs(self, request: Request, match: re.Match[str]) -> Response:
        """The log as it arrives (no deadline: a followed log lasts as long as the task)."""
        grpc_request = pb.StreamLogsRequest(id=match["id"], follow=request.bool_param("follow"),
                                            attempt=request.int_param("attempt", 2**32 - 1))
        # A bad or unknown id gets its 400 / 404 however slow the daemon is; what the
        # stream itself refuses (no such attempt, not started) is caught by the peek below.
        self._get(grpc_request.id)
        stream = LogStream(self.daemon.stub.StreamLogs(grpc_request),
                           request.environ.get("gunicorn.socket"))
        first = stream.next_event(LOG_PEEK)
        if isinstance(first, grpc.RpcError):
            stream.stop()
            raise self.daemon.failure(first)
        body = LogBody(stream, first, lambda error: self.daemon.failure(error).message)
        return Response(200, body, [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            # A reverse proxy in front (nginx) must pass chunks on, not collect them.
            ("X-Accel-Buffering", "no"),
        ])

    def list_nodes(self, request: Request, match: re.Match[str]) -> Response:
        try:
            response = self.daemon.stub.ListNodes(pb.ListNodesRequest(), timeout=API_TIMEOUT)
        except grpc.RpcError as error:
            raise self.daemon.failure(error) from None
        return json_response(200, {"nodes": [render.node_to_dict(node)
                                             for node in response.nodes]})

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
        try:
            value = self.gate.login(token)
        except Refused as refused:
            raise HttpError(refused.status, refused.message) from None
        return Response(204, [], [("Set-Cookie", session_cookie(value, _tls(request))),
                                  ("Cache-Control", "no-store")])

    def logout(self, request: Request, match: re.Match[str]) -> Response:
        return Response(204, [], [("Set-Cookie", cleared_cookie(_tls(request))),
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


def _tls(request: Request) -> bool:
    """Whether the request came over TLS, so the cookie may only travel over TLS."""
    return request.environ.get("wsgi.url_scheme") == "https"


def _close(body: Iterable[bytes]) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()


app = App.from_environment()
