"""Streaming a task's log to an HTTP client: a StreamLogs call's chunks, moved from the
client's iterator to a WSGI body on a thread of their own (a greenlet under the gevent worker,
node/faces/http_worker.py), so the body can wait with a timeout (for the first event, and to notice
a client that went away while the log is quiet)."""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Iterator

from node.client import LogCall
from node.core.errors import ClientError
from node.faces.http_wire import failure
from node.faces.stream_pump import END, StreamPump

log = logging.getLogger(__name__)

# While a followed log is quiet, how often to check whether the client has gone away,
# so that a closed browser tab gives its worker thread back.
LOG_IDLE_CHECK = 1.0
# Chunks held between the gRPC stream and a slow HTTP client (64 KiB each): enough to keep
# the pipe full, bounded so a huge log pushes back on the daemon instead of filling memory.
LOG_BUFFER_CHUNKS = 64

class LogStream(StreamPump):
    """A StreamLogs call's chunks (bytes), and the HTTP client's socket to notice it left."""

    def __init__(self, *, call: LogCall, client: socket.socket | None) -> None:
        super().__init__(call=call, buffer=LOG_BUFFER_CHUNKS, name="filch-log-pump",
                         put_wait=LOG_IDLE_CHECK)
        self.client = client


class LogBody:
    """A WSGI body of log chunks as they arrive. Its close(), which every WSGI server calls
    (also when the client left or the body was never read), cancels the gRPC call."""

    def __init__(self, *, stream: LogStream, first: object | None) -> None:
        self._stream = stream
        self._first = first
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        event = self._first
        if event is None:
            # Nothing to say yet (a quiet or unstarted task): gunicorn sends the headers on
            # an empty write, so the client learns now that its request was accepted.
            yield b""
        while event is not END and not self._closed:
            if isinstance(event, bytes):
                yield event
            elif isinstance(event, ClientError):
                # The headers are out, so the status cannot change: end with a line that
                # says why the text stops here.
                message = failure(event).message
                log.warning("log stream broke off: %s", message)
                yield f"\n[filch: the log stream broke off: {message}]\n".encode()
                return
            elif _client_gone(self._stream.client):
                return
            event = self._stream.next(LOG_IDLE_CHECK)

    def close(self) -> None:
        self._closed = True
        self._stream.stop()


def _client_gone(client: socket.socket | None) -> bool:
    """Whether the HTTP client closed its connection (only gunicorn tells us its socket)."""
    if client is None:
        return False
    try:
        readable, _, _ = select.select([client], [], [], 0)
        return bool(readable) and client.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, ValueError):
        return False  # nothing to read after all, or a TLS socket, which cannot peek
    except OSError:
        return True
