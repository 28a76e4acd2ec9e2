"""Pages of ListTasks answers: bounded by count and bytes, continued by opaque tokens."""

from __future__ import annotations

import base64
import binascii

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.errors import InvalidArgument
from node.core.limits import LIST_PAGE_BYTES


class Page:
    """Tasks of one ListTasks answer, bounded by count and bytes."""

    def __init__(self, *, page_size: int) -> None:
        self.tasks: list[pb.Task] = []
        self._size = page_size
        self._bytes = 0
        self.cut = False
        """True when the byte budget ended the page before page_size."""

    @property
    def full(self) -> bool:
        return self.cut or len(self.tasks) >= self._size

    def add(self, task: pb.Task) -> bool:
        """Add task if the page has room for it; False (and cut) when it does not."""
        size = task.ByteSize()
        if self.full or (self.tasks and self._bytes + size > LIST_PAGE_BYTES):
            self.cut = True
            return False
        self.tasks.append(task)
        self._bytes += size
        return True


def encode_token(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode()


def decode_token(token: str) -> bytes:
    if not token:
        return b""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("page_token", "is not a token returned by ListTasks") from None
