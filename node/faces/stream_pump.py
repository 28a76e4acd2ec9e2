"""A server-streaming gRPC call moved to a WSGI body on a thread of its own (a greenlet
under the gevent worker, node/faces/http_worker.py), so that the body can wait with a
timeout: for the first answer, to send a keep-alive, to notice a client that went away.
Used by the log (http_logs.py) and event (http_events.py) streams."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from node.core.errors import ClientError

END = object()
"""What next() returns once the stream finished cleanly."""


class Cancellable(Protocol):
    """A node.client stream (LogCall, EventCall): items as they come; cancel() ends it."""

    def __iter__(self) -> Iterator[Any]: ...

    def cancel(self) -> None: ...


class StreamPump:
    """Reads call on a daemon thread into a queue of at most `buffer` items (a slow HTTP
    client pushes back on the daemon instead of filling memory)."""

    def __init__(self, *, call: Cancellable, buffer: int, name: str,
                 put_wait: float = 1.0) -> None:
        """put_wait: how often a full queue checks whether the pump was stopped."""
        self._call = call
        self._items: queue.Queue[object] = queue.Queue(buffer)
        self._stopped = threading.Event()
        self._put_wait = put_wait
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            for item in self._call:
                self._put(item)
            self._put(END)
        except ClientError as error:
            self._put(error)

    def _put(self, item: object) -> None:
        while not self._stopped.is_set():
            try:
                self._items.put(item, timeout=self._put_wait)
                return
            except queue.Full:
                continue

    def next(self, timeout: float) -> object | None:
        """An item, END, a ClientError, or None when nothing came within timeout."""
        try:
            return self._items.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        """Cancel the call; idempotent. The thread ends once gRPC reports it."""
        self._stopped.set()
        self._call.cancel()
