"""node/faces/http_worker.py's body deadline on its own: a body that trickles in is cut off at
the deadline (the app answers 408), one that arrives in time is read whole."""

from __future__ import annotations

import io
import time

import gevent
import pytest

from node.core.errors import HttpError, RequestReadTimeout
from node.faces.http_wire import Request
from node.faces.http_worker import DeadlineBody


class Trickle:
    """A body whose every read waits (cooperatively, as a gevent socket does)."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    def read(self, size: int | None = None) -> bytes:
        gevent.sleep(self.pause)
        return b"{"


def test_a_body_read_past_its_deadline_fails_and_marks_the_connection() -> None:
    body = DeadlineBody(body=Trickle(5.0), deadline=time.monotonic() + 0.2)
    started = time.monotonic()
    with pytest.raises(RequestReadTimeout, match="request body: not received within"):
        body.read(10)
    assert time.monotonic() - started < 2 and body.expired
    with pytest.raises(RequestReadTimeout):   # and every later read, at once
        body.read(10)


def test_the_app_answers_a_late_body_408() -> None:
    body = DeadlineBody(body=Trickle(5.0), deadline=time.monotonic() + 0.1)
    request = Request.from_environ({"REQUEST_METHOD": "POST", "PATH_INFO": "/login",
                                    "CONTENT_LENGTH": "20", "wsgi.input": body})
    with pytest.raises(HttpError) as refused:
        request.json_body()
    assert refused.value.status == 408


def test_a_body_in_time_is_read_whole() -> None:
    body = DeadlineBody(body=io.BytesIO(b'{"token": "x"}\nmore\n'), deadline=time.monotonic() + 5)
    assert body.readline() == b'{"token": "x"}\n'
    assert list(body) == [b"more\n"] and not body.expired
