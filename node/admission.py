"""Admission of new tasks: the cluster-wide pending limit (--max-pending) and the byte
budget of etcd's quota (--submit-budget).

Pending tasks are never deleted by housekeeping, so a submit flood would drive etcd to
NOSPACE, where nothing short of deleting tasks helps. This answers RESOURCE_EXHAUSTED
first. The count comes from etcd (count-only ranges of the queued and blocked prefixes:
no values are read) and is trusted for PENDING_COUNT_TTL; in between, this node adds what it admits
itself, so a flood at one node stops exactly at the limit. Other nodes' admissions are
seen at the next count: the cluster may overshoot by what they admit meanwhile.

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

from node import keys
from node.errors import Overloaded
from node.limits import DEFAULT_SUBMIT_BUDGET, PENDING_COUNT_TTL
from node.store import Store


class PendingLimit:
    """Counts pending tasks (cheaply) and refuses new ones past the limit."""

    def __init__(self, store: Store, limit: int, *, ttl: float = PENDING_COUNT_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self.limit = limit
        self._ttl = ttl
        self._clock = clock
        self._counted = 0
        self._counted_at = -float("inf")
        self._in_flight = 0
        self._refresh = asyncio.Lock()

    @asynccontextmanager
    async def admit(self, count: int = 1) -> AsyncIterator[Callable[[], None]]:
        """Reserve room for count new pending tasks (an array's: all or none) for the
        duration of the block; the block calls the yielded function once they were really
        created.

        Raises Overloaded when the cluster is at its limit, StoreUnavailable when etcd
        cannot be counted. Cancellation releases the reservation.
        """
        await self._count_if_stale()
        pending = self._counted + self._in_flight
        if pending + count > self.limit:
            raise Overloaded(f"cluster has {pending} pending tasks (limit {self.limit}, "
                             "--max-pending); wait or raise it")
        self._in_flight += count
        created = False

        def mark_created() -> None:
            nonlocal created
            created = True

        try:
            yield mark_created
        finally:
            self._in_flight -= count
            # Counted until the next read of etcd, which then includes them.
            self._counted += count if created else 0

    async def _count_if_stale(self) -> None:
        if self._clock() - self._counted_at < self._ttl:
            return
        async with self._refresh:   # one count for all the submits waiting on it
            if self._clock() - self._counted_at >= self._ttl:
                self._counted = (await self._store.count(keys.QUEUED)
                                 + await self._store.count(keys.BLOCKED))
                self._counted_at = self._clock()


class ByteBudget:
    """Refuses a submit whose bytes would take etcd's database past budget x quota.

    quota is this node's --etcd-quota-bytes: etcd does not tell a client its members'
    quota, so a client-only node trusts its own configuration to match the cluster's.
    The size in use is the member this node talks to (members hold the same data).
    """

    def __init__(self, store: Store, *, quota: int, budget: float = DEFAULT_SUBMIT_BUDGET,
                 ttl: float = PENDING_COUNT_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self.quota = quota
        self.budget = budget
        self._ttl = ttl
        self._clock = clock
        self._in_use = 0
        self._read_at = -float("inf")
        self._in_flight = 0
        self._refresh = asyncio.Lock()

    @property
    def limit(self) -> int:
        """Bytes in use past which no submit is admitted."""
        return int(self.quota * self.budget)

    @asynccontextmanager
    async def admit(self, size: int, what: str) -> AsyncIterator[Callable[[], None]]:
        """Reserve size bytes of the budget for the block (what names the request in the
        refusal: "this task", "this array of 30 tasks"); the block calls the yielded
        function once they were written.

        Raises Overloaded, naming the numbers, when they do not fit; StoreUnavailable
        when etcd's status cannot be read. Cancellation releases the reservation.
        """
        await self._read_if_stale()
        in_use = self._in_use + self._in_flight
        if in_use + size > self.limit:
            raise Overloaded(
                f"{what} would write ~{approximate(size)} into etcd; {approximate(in_use)} of "
                f"the {approximate(self.quota)} quota is in use and submits stop at "
                f"{self.budget:.0%} ({approximate(self.limit)}, --submit-budget): submit "
                "fewer or smaller tasks, or wait for retention to free space")
        self._in_flight += size
        written = False

        def mark_written() -> None:
            nonlocal written
            written = True

        try:
            yield mark_written
        finally:
            self._in_flight -= size
            # Counted until the next read of etcd's status, which then includes them.
            self._in_use += size if written else 0

    async def _read_if_stale(self) -> None:
        if self._clock() - self._read_at < self._ttl:
            return
        async with self._refresh:   # one read for all the submits waiting on it
            if self._clock() - self._read_at >= self._ttl:
                status = await self._store.member_status()
                # dbSizeInUse exists since etcd 3.4; an older member answers 0: its whole
                # file size is then the (larger, so safe) stand-in.
                self._in_use = status.db_size_in_use or status.db_size
                self._read_at = self._clock()


class Admission:
    """Both checks a submit passes before it writes: the pending count and the bytes."""

    def __init__(self, pending: PendingLimit, budget: ByteBudget) -> None:
        self.pending = pending
        self.budget = budget

    @asynccontextmanager
    async def admit(self, count: int, size: int,
                    what: str) -> AsyncIterator[Callable[[], None]]:
        """Reserve count pending tasks and size bytes for the block (see
        PendingLimit.admit and ByteBudget.admit); the yielded function marks both
        written. Raises Overloaded when either does not fit."""
        async with self.pending.admit(count) as counted, \
                self.budget.admit(size, what) as spent:
            def created() -> None:
                counted()
                spent()

            yield created


def approximate(size: int) -> str:
    """A byte count for a sentence: "97.7 GiB", "512.0 KiB", "80 bytes"."""
    for unit, multiplier in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= multiplier:
            return f"{size / multiplier:.1f} {unit}"
    return f"{size} bytes"
