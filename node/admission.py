"""Admission of new tasks against the cluster-wide pending limit (--max-pending).

Pending tasks are never deleted by housekeeping, so a submit flood would drive etcd to
NOSPACE, where nothing short of deleting tasks helps. This answers RESOURCE_EXHAUSTED
first. The count comes from etcd (count-only ranges of the queued and blocked prefixes:
no values are read) and is trusted for PENDING_COUNT_TTL; in between, this node adds what it admits
itself, so a flood at one node stops exactly at the limit. Other nodes' admissions are
seen at the next count: the cluster may overshoot by what they admit meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from node import keys
from node.errors import Overloaded
from node.limits import PENDING_COUNT_TTL
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
