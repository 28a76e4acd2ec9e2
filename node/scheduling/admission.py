"""Admission of new tasks: the cluster-wide pending limit (--max-pending) and the byte
budget of etcd's quota (--submit-budget).

Pending tasks are never deleted by housekeeping, so a submit flood would drive etcd to
NOSPACE, where nothing short of deleting tasks helps. This answers RESOURCE_EXHAUSTED
first. The count is the one the counts chore publishes (keys.STATS, one get: etcd walks its
index to count, so only one node counts, node/operations/counts.py), plus what this node
admitted since that count began; with no recent published count, this node counts itself
(count-only ranges of the queued and blocked prefixes). It is trusted for
PENDING_COUNT_TTL; in between, this node adds what it admits itself, so a flood at one
node stops exactly at the limit. Other nodes' admissions are seen at the next count: the
cluster may overshoot by what they admit meanwhile.

A count alone does not bound bytes: 100,000 tasks of 1 MiB are 100 GiB. So every submit
also estimates what it will write into etcd and is refused, before anything is written,
when etcd's database in use plus that would pass the budget fraction of the quota. The
size in use is read from etcd's Status on the same cadence as the count, with this node's
own admissions added in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from node.core import keys
from node.core.errors import Overloaded
from node.core.limits import DEFAULT_SUBMIT_BUDGET, PENDING_COUNT_TTL
from node.etcd.store import Store

# A published count older than this (its holder died and no other took over yet, or the
# clocks disagree that much) is not trusted: the node counts itself.
STATS_MAX_AGE = 30.0


class Created(Protocol):
    """Marks an admission written: revision, the etcd revision of the write that created
    the tasks (0: not known, say an array's many writes)."""

    def __call__(self, revision: int = 0) -> None:
        ...


class _Tally:
    """A figure read from etcd at most every ttl seconds, plus what this node admitted
    since (and what it is admitting now): exact at one node, eventually at all."""

    def __init__(self, *, ttl: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._clock = clock
        self._read_value = 0
        self._read_at = -float("inf")
        self._in_flight = 0
        self._refresh = asyncio.Lock()

    async def _read(self) -> int:
        """The figure as etcd has it now."""
        raise NotImplementedError

    async def current(self) -> int:
        """The figure, read again when older than ttl (one read for all waiting on it)."""
        if self._clock() - self._read_at >= self._ttl:
            async with self._refresh:
                if self._clock() - self._read_at >= self._ttl:
                    self._read_value = await self._read()
                    self._read_at = self._clock()
        return self._read_value + self._in_flight

    @asynccontextmanager
    async def _hold(self, amount: int) -> AsyncIterator[Callable[[], None]]:
        """Count amount as in flight for the block; the yielded function marks it
        written, and then it counts until the next read of etcd (which includes it)."""
        self._in_flight += amount
        written = False

        def mark_written() -> None:
            nonlocal written
            written = True

        try:
            yield mark_written
        finally:
            self._in_flight -= amount
            self._read_value += amount if written else 0


class PendingLimit(_Tally):
    """Counts pending tasks (cheaply) and refuses new ones past the limit."""

    def __init__(self, *, store: Store, limit: int, ttl: float = PENDING_COUNT_TTL,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        super().__init__(ttl=ttl, clock=clock)
        self._store = store
        self.limit = limit
        self._wall_clock = wall_clock
        # What this node created: (etcd revision of the write, or 0 when unknown; wall-clock
        # time it was answered; tasks). A published count holds the writes up to its
        # revision; one of unknown revision answered before the count began is in it.
        # Entries older than STATS_MAX_AGE go.
        self._created: list[tuple[int, float, int]] = []

    async def _read(self) -> int:
        now = self._wall_clock()
        self._created = [entry for entry in self._created if entry[1] >= now - STATS_MAX_AGE]
        counts = await self._store.get_counts()
        if counts is None or now - counts.counted_at > STATS_MAX_AGE:
            # Nobody publishes (a new cluster, the holder died a moment ago): count.
            return await self._store.count(keys.QUEUED) + await self._store.count(keys.BLOCKED)
        # An entry of unknown revision answered just after the count began may be in it
        # too: counted twice, which refuses a little early, never late.
        return counts.pending + sum(
            tasks for revision, answered, tasks in self._created
            if (revision > counts.revision if revision else answered >= counts.counted_at))

    def _record(self, count: int, revision: int) -> None:
        self._created.append((revision, self._wall_clock(), count))

    @asynccontextmanager
    async def admit(self, count: int = 1) -> AsyncIterator[Created]:
        """Reserve room for count new pending tasks (an array's: all or none) for the
        duration of the block; the block calls the yielded function once they were really
        created.

        Raises Overloaded when the cluster is at its limit, StoreUnavailable when etcd
        cannot be counted. Cancellation releases the reservation.
        """
        pending = await self.current()
        if pending + count > self.limit:
            raise Overloaded(f"cluster has {pending} pending tasks (limit {self.limit}, "
                             "--max-pending); wait or raise it")
        async with self._hold(count) as mark_created:
            def created(revision: int = 0) -> None:
                mark_created()
                self._record(count, revision)

            yield created


class ByteBudget(_Tally):
    """Refuses a submit whose bytes would take etcd's database past budget x quota.

    quota is this node's --etcd-quota-bytes: etcd does not tell a client its members'
    quota, so a client-only node trusts its own configuration to match the cluster's.
    The size in use is the member this node talks to (members hold the same data).
    """

    def __init__(self, *, store: Store, quota: int, budget: float = DEFAULT_SUBMIT_BUDGET,
                 ttl: float = PENDING_COUNT_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl=ttl, clock=clock)
        self._store = store
        self.quota = quota
        self.budget = budget

    @property
    def limit(self) -> int:
        """Bytes in use past which no submit is admitted."""
        return int(self.quota * self.budget)

    async def _read(self) -> int:
        status = await self._store.member_status()
        # dbSizeInUse exists since etcd 3.4; an older member answers 0: its whole file
        # size is then the (larger, so safe) stand-in.
        return int(status.db_size_in_use or status.db_size)

    @asynccontextmanager
    async def admit(self, size: int, what: str) -> AsyncIterator[Callable[[], None]]:
        """Reserve size bytes of the budget for the block (what names the request in the
        refusal: "this task", "this array of 30 tasks"); the block calls the yielded
        function once they were written.

        Raises Overloaded, naming the numbers, when they do not fit; StoreUnavailable
        when etcd's status cannot be read. Cancellation releases the reservation.
        """
        in_use = await self.current()
        if in_use + size > self.limit:
            raise Overloaded(
                f"{what} would write ~{approximate(size)} into etcd; {approximate(in_use)} of "
                f"the {approximate(self.quota)} quota is in use and submits stop at "
                f"{self.budget:.0%} ({approximate(self.limit)}, --submit-budget): submit "
                "fewer or smaller tasks, or wait for retention to free space")
        async with self._hold(size) as mark_written:
            yield mark_written


class Admission:
    """Both checks a submit passes before it writes: the pending count and the bytes."""

    def __init__(self, *, pending: PendingLimit, budget: ByteBudget) -> None:
        self.pending = pending
        self.budget = budget

    @asynccontextmanager
    async def admit(self, count: int, size: int,
                    what: str) -> AsyncIterator[Created]:
        """Reserve count pending tasks and size bytes for the block (see
        PendingLimit.admit and ByteBudget.admit); the yielded function marks both
        written. Raises Overloaded when either does not fit."""
        async with self.pending.admit(count) as counted, \
                self.budget.admit(size, what) as spent:
            def created(revision: int = 0) -> None:
                counted(revision)
                spent()

            yield created


def approximate(size: int) -> str:
    """A byte count for a sentence: "97.7 GiB", "512.0 KiB", "80 bytes"."""
    for unit, multiplier in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= multiplier:
            return f"{size / multiplier:.1f} {unit}"
    return f"{size} bytes"
