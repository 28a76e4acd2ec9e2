"""An array's listing: the page token of a position, and the position in a member's id.

Shared by the node (ListTasks of an array) and the client (`submit --wait --array`, which
reads on from the first task not seen finished instead of listing the whole array again).
"""

from __future__ import annotations

import base64
import binascii
import collections
from typing import Any, Protocol

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.errors import InvalidArgument
from node.core.states import is_finished

# A poll of `submit --wait --array` reads at most this many pages of this many tasks from
# its first unfinished task: more than the tasks a large fleet runs at once, bounded.
ARRAY_POLL_PAGE = 500
ARRAY_POLL_PAGES = 2


class PageLister(Protocol):
    """What ArrayWatch needs of node.client.Client."""

    def list_page(self, state: Any, page_size: int, page_token: str = "", *,
                  array_id: str = "") -> tuple[list[pb.Task], str]:
        ...


def encode_token(array_id: str, position: int) -> str:
    """The page token that lists the array from this position (0-based) on."""
    return base64.urlsafe_b64encode(f"{array_id}:{position}".encode()).decode()


def decode_token(token: str, array_id: str) -> int:
    """The position a page token of this array's listing starts at ("" is 0). Raises
    InvalidArgument for a token of another listing."""
    if not token:
        return 0
    try:
        text = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        owner, _, position = text.partition(":")
        if owner == array_id and position.isdigit():
            return int(position)
    except (binascii.Error, ValueError):
        pass
    raise InvalidArgument("page_token", "does not belong to this array's listing")


def member_position(task_id: str) -> int:
    """The array position a member's id carries (the inverse of keys.array_task_id's
    packing: rand_a's 12 bits, then the top of rand_b). For an id that is no member, a
    number that keys.array_task_id does not map back to that id."""
    value = int(task_id.replace("-", ""), 16)
    rest = keys.ARRAY_POSITION_BITS - 12
    rand_a = (value >> 64) & 0xFFF
    return (rand_a << rest) | ((value >> (62 - rest)) & ((1 << rest) - 1))


class ArrayWatch:
    """An array's tasks as last seen, and the first one not seen finished (frontier)."""

    def __init__(self, *, lister: PageLister, array_id: str, tasks: list[pb.Task]) -> None:
        self._lister = lister
        self._array_id = array_id
        self.tasks = tasks
        self._index = {task.id: index for index, task in enumerate(tasks)}
        self.frontier = 0
        self._advance()
        # Records each poll read (a test hook: a poll's cost).
        self.read_per_poll: list[int] = []
        watched_arrays.append(self)

    def _advance(self, gone_below: int = 0, seen: frozenset[str] = frozenset()) -> None:
        """Move the frontier past finished tasks, and past those a page should have
        returned (position below gone_below) but did not: deleted meanwhile."""
        while self.frontier < len(self.tasks):
            task = self.tasks[self.frontier]
            if not is_finished(task) and (
                    task.id in seen or member_position(task.id) >= gone_below):
                break
            self.frontier += 1

    def poll(self) -> list[pb.Task]:
        """Read on from the frontier (see node.client.Client.wait_array); the tasks, updated."""
        read = 0
        for _ in range(ARRAY_POLL_PAGES):
            if self.frontier >= len(self.tasks):
                break
            start = member_position(self.tasks[self.frontier].id)
            page, next_token = self._lister.list_page(
                None, ARRAY_POLL_PAGE, encode_token(self._array_id, start),
                array_id=self._array_id)
            read += len(page)
            for task in page:
                index = self._index.get(task.id)
                if index is not None:
                    self.tasks[index] = task
            end = (decode_token(next_token, self._array_id) if next_token
                   else 1 << keys.ARRAY_POSITION_BITS)
            self._advance(end, frozenset(task.id for task in page))
            if any(not is_finished(task) for task in page):
                break       # the rest can wait for the next poll
        self.read_per_poll.append(read)
        return self.tasks


# Every _ArrayWatch polled in this process (tests read their read_per_poll), bounded.
watched_arrays: collections.deque[ArrayWatch] = collections.deque(maxlen=8)
