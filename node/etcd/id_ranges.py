"""The first keys of a range of task ids, read at a cost that does not grow with the range.

etcd 3.4 answers a Range by collecting every key of [key, range_end) from its index
before it applies the limit (and counts them all), so "the first 100 queued tasks" cost
~0.5 us per queued task: 50 ms at 100,000, half a second at a million. The keys here end
in a task id (a UUID, mostly v7: time ordered), so the range is read in windows of the id
space instead: a window's cost is the keys inside it. Windows start small at the first id
wanted and grow GROWTH times each, so a dense queue is answered in one or two windows and
an empty stretch is crossed in a few.

Two things make it cheap in practice, both learned from earlier answers (per range):
- size: etcd returns the whole range's count with any plain read. While a range is small
  (SMALL_RANGE keys) one plain read is cheapest; once it is larger, windows are used, until
  a windowed read reaches the end of the range (then its size is known again). A range
  that grew while nobody listed it is walked once by the plain read that finds out.
- horizon: the last id of the last full page read from the same start (the front of the
  range, or a page token; HORIZONS of them). The next such read starts with one read of
  [start, horizon], which holds about a page (the same tasks, fewer as they are stolen,
  plus any queued again below it), and only then opens windows after it: it does not
  cross the id space from zero, nor a stretch of ids before the queue's front again.
The one read that is not bounded: the first windowed read from a start followed by a long
stretch without ids and then a dense one (a page token after an old straggler): its last
window may hold the dense part. It is paid once per start; its horizon bounds the next.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

# The id space: 128-bit UUIDs, written canonically (lower-case hex, dashes), so that key
# order is numeric order.
ID_SPACE = 1 << 128
# The first window: 2**72 of the id space is 1/256 of one millisecond of UUIDv7s, where
# an array (all of one millisecond, 32 members per 2**64: keys.array_task_id) puts up to
# 8,192 tasks.
FIRST_WINDOW = 1 << 72
# Each next window is this many times wider: a stretch of a day without ids is crossed
# in ~15 reads; an overshoot walks at most this many times what was needed.
GROWTH = 4
# A range of at most this many keys is read plainly (etcd walks it in well under 1 ms).
SMALL_RANGE = 2000
# Starts (range, first id wanted) whose horizon is kept: the front of each range and the
# page tokens of recent listings.
HORIZONS = 256

# read(start, end, limit=..., keys_only=...): a raw etcd Range answer.
RangeRead = Callable[..., Awaitable[Any]]


def id_number(prefix: bytes, key: bytes) -> int:
    """The id at the end of key as a number (its key order)."""
    return uuid.UUID(key[len(prefix):].decode()).int


def id_key(prefix: bytes, number: int) -> bytes:
    return prefix + str(uuid.UUID(int=number)).encode()


class IdRanges:
    """Reads the first keys of [prefix + id, end) ranges; learns each range's size and
    first id as it goes (a cache: wrong values cost time, never correctness)."""

    def __init__(self, *, read: RangeRead) -> None:
        self._read = read
        self._sizes: dict[bytes, int] = {}
        self._horizons: OrderedDict[tuple[bytes, int], int] = OrderedDict()

    async def first(self, prefix: bytes, end: bytes, *, after: bytes = b"", limit: int,
                    keys_only: bool) -> tuple[list[Any], bool]:
        """Up to limit key-values of [prefix, end) after `after` (a key of the range), in
        key order; and whether more follow. Raises what read raises."""
        low = id_number(prefix, after) + 1 if after else 0
        start = (prefix, low)
        found: list[Any] = []
        horizon = self._horizons.get(start)
        if horizon is not None:
            # About the page read last time from here: no window needed when it is full.
            response = await self._read(id_key(prefix, low) if after else prefix,
                                        id_key(prefix, horizon + 1), limit=limit,
                                        keys_only=keys_only)
            found += response.kvs
            if len(found) >= limit:
                self._remember(start, prefix, found, limit)
                return found, True
            low = horizon + 1
        if self._sizes.get(prefix, 0) <= SMALL_RANGE:
            response = await self._read(id_key(prefix, low) if low else prefix, end,
                                        limit=limit - len(found), keys_only=keys_only)
            found += response.kvs
            if not after:
                self._sizes[prefix] = len(found) - len(response.kvs) + int(response.count)
            self._remember(start, prefix, found, limit)
            return found, bool(response.more)
        width = FIRST_WINDOW
        more = False
        while len(found) < limit and low < ID_SPACE:
            high = min(low + width, ID_SPACE)
            response = await self._read(
                id_key(prefix, low), id_key(prefix, high) if high < ID_SPACE else end,
                limit=limit - len(found), keys_only=keys_only)
            found += response.kvs
            more = bool(response.more)
            low, width = high, width * GROWTH
        if low >= ID_SPACE and not more:
            # Read to the end: how many remain is known (all of it, when not paged).
            if not after:
                self._sizes[prefix] = len(found)
        else:
            more = True     # stopped at limit: something may follow (a page says so)
        self._remember(start, prefix, found, limit)
        return found, more

    async def count(self, prefix: bytes, end: bytes, *, below: bytes = b"", cap: int) -> int:
        """How many keys of [prefix, end) sort before the key `below` (all of them when
        empty), exact up to cap (past it: some number > cap). Count-only reads of windows of
        the id space from the range's first key, so etcd walks about the keys counted (at
        most GROWTH times cap, plus one window's), never the whole range."""
        first, _ = await self.first(prefix, end, limit=1, keys_only=True)
        if not first:
            return 0
        low = id_number(prefix, first[0].key)
        stop = id_number(prefix, below) if below else ID_SPACE
        total, width = 0, FIRST_WINDOW
        while low < stop and total <= cap:
            high = min(low + width, stop)
            response = await self._read(id_key(prefix, low),
                                        id_key(prefix, high) if high < ID_SPACE else end,
                                        count_only=True)
            total += int(response.count)
            low, width = high, width * GROWTH
        return total

    def _remember(self, start: tuple[bytes, int], prefix: bytes, found: list[Any],
                  limit: int) -> None:
        """The horizon of a start after a windowed read: its last id when the page was
        full (a short page read to the end: nothing to remember)."""
        if len(found) >= limit:
            self._horizons[start] = id_number(prefix, found[-1].key)
            self._horizons.move_to_end(start)
            while len(self._horizons) > HORIZONS:
                self._horizons.popitem(last=False)
        else:
            self._horizons.pop(start, None)
