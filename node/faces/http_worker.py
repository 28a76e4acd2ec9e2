"""The gunicorn worker of the HTTP face: gevent, with a deadline on reading each request.

gunicorn's gevent worker serves each connection on a greenlet (a few KiB), not a thread,
so a slow or idle client, or a followed log (a stream the UI keeps open for as long as
the task runs), costs no thread and cannot starve the others; `worker_connections`
(gunicorn_conf.py) bounds them per worker. What this class adds to it:

- grpc learns gevent (grpc.experimental.gevent.init_gevent) before the app makes its
  first channel, so a call to the agent, or a log stream, waits on the hub instead of
  blocking every greenlet of the worker.
- A read deadline on the request, not on the stream: the request line and headers must
  arrive within REQUEST_READ_TIMEOUT (also how long an idle kept-alive connection lives),
  and its body within REQUEST_READ_TIMEOUT more; then the connection is closed (a body
  past its deadline gets 408). Writing the answer has no deadline, so a followed log
  streams for hours.
"""

from __future__ import annotations

import time
from typing import Any, Final

import gevent
from gunicorn.workers.ggevent import GeventWorker

from node.core.errors import RequestReadTimeout

# Seconds for the request line and headers, and again for the body: a person's browser or
# curl sends either in milliseconds; a slowloris client, a byte now and then, is cut off
# after this, holding nothing but a greenlet meanwhile.
REQUEST_READ_TIMEOUT: Final = 10.0


class Worker(GeventWorker):  # type: ignore[misc]  # gunicorn has no type hints
    """gunicorn's gevent worker, grpc made cooperative, requests read under a deadline."""

    def load_wsgi(self) -> None:
        # Called after GeventWorker patched the standard library and before the app (and
        # with it the first gRPC channel) exists: the order grpc's gevent support needs.
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
        super().load_wsgi()

    def timeout_ctx(self) -> gevent.Timeout:
        """Bounds waiting for and reading one request's line and headers (gunicorn's own
        gevent worker uses `keepalive` here); past it the connection is closed."""
        return gevent.Timeout(REQUEST_READ_TIMEOUT, False)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        body = DeadlineBody(body=req.body, deadline=time.monotonic() + REQUEST_READ_TIMEOUT)
        req.body = body
        kept = super().handle_request(listener_name, req, sock, addr)
        if body.expired:
            # Unread body bytes are still on the socket: never parse them as a request.
            raise StopIteration()
        return kept


class DeadlineBody:
    """A request body (wsgi.input) whose reads fail with RequestReadTimeout once the
    deadline has passed, however slowly the client trickles bytes in."""

    def __init__(self, *, body: Any, deadline: float) -> None:
        self._body = body
        self._deadline = deadline
        self.expired = False

    def _bounded(self, read: Any, *args: Any) -> Any:
        remaining = self._deadline - time.monotonic()
        error = RequestReadTimeout(f"request body: not received within "
                                   f"{REQUEST_READ_TIMEOUT:g} s")
        if remaining <= 0:
            self.expired = True
            raise error
        try:
            with gevent.Timeout(remaining, error):
                return read(*args)
        except RequestReadTimeout:
            self.expired = True
            raise

    def read(self, size: int | None = None) -> bytes:
        data: bytes = self._bounded(self._body.read, size)
        return data

    def readline(self, size: int | None = None) -> bytes:
        data: bytes = self._bounded(self._body.readline, size)
        return data

    def readlines(self, hint: int | None = None) -> list[bytes]:
        lines: list[bytes] = self._bounded(self._body.readlines, hint)
        return lines

    def __iter__(self) -> DeadlineBody:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line
