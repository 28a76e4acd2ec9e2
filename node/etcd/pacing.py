"""Bulk writes paced by etcd's commit latency.

Array submits and releases, array cancels and the resolver write many transactions at
once (node/etcd/batch_write.py). etcd answers a write once it is applied, and lease
renewals wait behind everything applied before them: four arrays of 10,000 written at
full speed on a 2-core machine kept etcd's apply queue seconds long and nodes fenced
themselves (the million-task fill of 2026-12-07). So each store connection lets at most
`limit` bulk transactions be in flight, halving the limit when one takes longer than
LATENCY_TARGET and growing it by one per transaction that is quick again (AIMD, as TCP),
and waiting out the excess when even one at a time is slow. A single write (a submit, a
steal, a renewal) is never paced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from node.core import metrics

# A bulk transaction slower than this means etcd queues: lease renewals wait that long.
LATENCY_TARGET = 0.25
# Bulk transactions of one connection in flight at most: etcd commits concurrent
# proposals with one fsync, so a few in flight multiply the write rate; more only queue.
MAX_IN_FLIGHT = 8


class Pacer:
    """Slots for bulk transactions on one store connection (one event loop)."""

    def __init__(self) -> None:
        self.limit = MAX_IN_FLIGHT
        self._in_flight = 0
        self._changed: asyncio.Condition | None = None

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of a bulk transaction."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            await changed.wait_for(lambda: self._in_flight < self.limit)
            self._in_flight += 1
        started = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - started
            if took > LATENCY_TARGET and self.limit == 1:
                # Slow even alone: keep the slot while etcd catches up, so that the next
                # bulk transaction waits too.
                metrics.BULK_WRITE_PAUSES.inc()
                await asyncio.sleep(min(took - LATENCY_TARGET, 5.0))
            async with changed:
                self._in_flight -= 1
                if took > LATENCY_TARGET:
                    self.limit = max(1, self.limit // 2)
                elif self.limit < MAX_IN_FLIGHT:
                    self.limit += 1
                metrics.BULK_WRITE_LIMIT.set(self.limit)
                changed.notify_all()
