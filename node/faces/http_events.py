"""GET /api/v1/events: the event stream (the Watch RPC) as server-sent events.

One SSE message per etcd revision, its id the revision and its data
{"revision": R, "events": [...]} (event_records.event_to_dict). A browser's EventSource
reconnects by itself with Last-Event-ID, which resumes after that revision: nothing is
missed or repeated. Streamed like logs (node/faces/http_logs.py): the gRPC iterator runs on a
thread of its own (a greenlet under the gevent worker) so the body can wait with a timeout
and send a keep-alive comment while the cluster is quiet.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

from node._gen.filch.v1 import filch_pb2 as pb
from node.client import Client
from node.core.errors import ClientError, HttpError
from node.faces.event_records import event_to_dict
from node.faces.http_wire import Request, Response, failure
from node.faces.stream_pump import END, StreamPump

log = logging.getLogger(__name__)

# How long the request waits for the stream's first answer before it commits to 200: a
# refusal (compacted, too many streams, bad id) arrives within milliseconds and gets its own
# status; a quiet cluster just streams once something happens.
EVENTS_PEEK = 1.0
# While the cluster is quiet, a comment line this often: proxies keep the connection, and
# a write to a browser that went away ends the stream (and its etcd watch).
KEEPALIVE_SECONDS = 15.0
# What EventSource waits before reconnecting after the stream broke.
RETRY_MILLIS = 2000
# Revisions held between the gRPC stream and a slow HTTP client.
BUFFER_REVISIONS = 256
# A revision as Last-Event-ID or ?since= carries it.
_REVISION = re.compile(r"\d{1,19}")

def since(request: Request) -> int:
    """The revision to resume after: Last-Event-ID (a reconnecting EventSource sends it,
    and it is newer than the ?since= the page first asked for), else ?since=, else 0."""
    for name, text in (("Last-Event-ID", request.environ.get("HTTP_LAST_EVENT_ID", "")),
                       ("since", request.param("since"))):
        text = text.strip()
        if text:
            if not _REVISION.fullmatch(text) or int(text) >= 2**63:
                raise HttpError(400, f"{name}: {text[:32]!r} is not a revision (a whole "
                                     "number, the id of an event stream message)")
            return int(text)
    return 0


def events(client: Client, request: Request) -> Response:
    """The handler of GET /api/v1/events (?since=R, ?task=ID)."""
    task_id = request.param("task")
    stream = StreamPump(call=client.watch(since(request), task_id), buffer=BUFFER_REVISIONS,
                        name="filch-event-pump")
    first = stream.next(EVENTS_PEEK)
    if isinstance(first, ClientError):
        stream.stop()
        error = failure(first)
        if first.code.name == "OUT_OF_RANGE":
            # Gone: EventSource does not reconnect on it; the page re-lists instead.
            error = HttpError(410, first.message)
        raise error
    return Response(200, _Body(stream=stream, first=first), [
        ("Content-Type", "text/event-stream; charset=utf-8"),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Accel-Buffering", "no"),
    ])


def message(response: pb.WatchResponse) -> bytes:
    """One SSE message: the revision's events."""
    data = json.dumps({"revision": response.revision,
                       "events": [event_to_dict(event) for event in response.events]})
    return f"id: {response.revision}\ndata: {data}\n\n".encode()


class _Body:
    """The SSE body; its close() (every WSGI server calls it) cancels the Watch call."""

    def __init__(self, *, stream: StreamPump, first: object | None) -> None:
        self._stream = stream
        self._first = first
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield f"retry: {RETRY_MILLIS}\n\n".encode()
        item = self._first
        while item is not END and not self._closed:
            if isinstance(item, pb.WatchResponse):
                yield message(item)
            elif isinstance(item, ClientError):
                # The status is sent: say why the stream stops; EventSource reconnects
                # from the last id it got.
                text = failure(item).message
                log.warning("event stream broke off: %s", text)
                yield f"event: error\ndata: {json.dumps({'error': text})}\n\n".encode()
                return
            else:
                yield b": keep-alive\n\n"
            item = self._stream.next(KEEPALIVE_SECONDS)

    def close(self) -> None:
        self._closed = True
        self._stream.stop()
