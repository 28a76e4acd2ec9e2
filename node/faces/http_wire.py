"""The HTTP face's requests and responses: parsing a WSGI environ, JSON answers, and the
HTTP status a failed call to the daemon becomes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs
from wsgiref.types import WSGIEnvironment

import grpc

from node.client import Client
from node.core.errors import ClientError, HttpError

# A spec is at most 1 MiB (validation.MAX_SPEC_BYTES); JSON escaping may double it.
MAX_BODY_BYTES = 2 * 1024 * 1024

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 507,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_BAD_GATEWAY = 502  # any other gRPC failure: the daemon behind us misbehaved
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def failure(error: ClientError) -> HttpError:
    """The HTTP answer to a failed call to the daemon, worded like the CLI's messages."""
    details = error.message
    if error.code == grpc.StatusCode.UNAVAILABLE:
        details = f"filch daemon at {error.server} is unavailable: {details}"
    elif error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = (f"filch daemon at {error.server} did not answer within "
                   f"{error.timeout or 0:g} s")
    return HttpError(_HTTP_STATUS.get(error.code, _BAD_GATEWAY), details)


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
    # The daemon as this request's caller (App._dispatch sets it once the caller is known).
    caller: Client | None = None

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

    def daemon(self) -> Client:
        """The client whose calls act for this request's caller. Fails closed: a handler
        reached before the caller was known would otherwise have no identity to send."""
        if self.caller is None:
            raise HttpError(500, "internal error: no caller for this request")
        return self.caller

    @property
    def tls(self) -> bool:
        """Whether the request came over TLS, so a cookie may only travel over TLS."""
        return self.environ.get("wsgi.url_scheme") == "https"

    def json_body(self) -> Any:
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"body: {length} bytes; the limit is {MAX_BODY_BYTES}")
        stream = self.environ["wsgi.input"]
        try:
            raw: bytes = stream.read(length) if length else stream.read(MAX_BODY_BYTES + 1)
        except TimeoutError as error:
            # The server's read deadline (node/faces/http_worker.py): a client too slow to send.
            raise HttpError(408, f"{error}; send the whole request at once") from None
        if len(raw) > MAX_BODY_BYTES:
            raise HttpError(413, f"body: more than {MAX_BODY_BYTES} bytes")
        if not raw.strip():
            raise HttpError(400, "body: empty; send a JSON object")
        try:
            return json.loads(raw)
        except ValueError as error:
            raise HttpError(400, f"body: not valid JSON ({error})") from None
