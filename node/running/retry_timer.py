"""Releases this node's held retries at their not_before: one timer for all of them.

A retry is written PENDING, held (HOLD_RETRY) until not_before. The node that ran the
attempt queues it again then. One asyncio task per held retry, each sleeping up to an
hour, grew without bound with the retries a node had ever held; this is one heap of
(not_before, task id) and one loop, bounded in size. A retry that does not fit the bound
(or whose releases keep failing, or whose node dies) is released by the resolver's sweep,
which releases every back-off past its not_before: this timer only makes it prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import lifecycle, metrics
from node.core.errors import FilchError
from node.etcd.store import Store

log = logging.getLogger(__name__)

# Held retries one node's timer keeps: 10,000 entries are ~1 MiB; past them the resolver
# sweep (any node) releases the rest, a sweep interval later than their not_before.
RETRY_TIMER_BOUND = 10_000

# Releasing a retry at its not_before: tries while etcd does not answer, and the pause
# between them. Bounded: past them the resolver sweep (any node) releases it.
RELEASE_TRIES = 10
RELEASE_PAUSE = 1.0


@dataclass(order=True)
class _Due:
    """One held retry: when, which task, at which retries_used it was held, tries left."""

    not_before: float
    task_id: str = field(compare=False)
    retries_used: int = field(compare=False)
    tries_left: int = field(compare=False, default=RELEASE_TRIES)


class RetryTimer:
    """One heap and one loop that queue held retries again when they are due."""

    def __init__(self, *, store: Store, bound: int = RETRY_TIMER_BOUND,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._bound = bound
        self._clock = clock
        self._heap: list[_Due] = []
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, held: pb.Task) -> bool:
        """Release held at its not_before; False when the timer is full (then the
        resolver sweep releases it)."""
        if len(self._heap) >= self._bound:
            log.info("task %s: retry timer full (%d): the resolver sweep releases it",
                     held.id, self._bound)
            return False
        heapq.heappush(self._heap, _Due(held.not_before.ToNanoseconds() / 1e9, held.id,
                                        held.retries_used))
        metrics.RETRY_TIMER_HELD.set(len(self._heap))
        self._changed.set()
        return True

    async def run(self) -> NoReturn:
        """Release each held retry when due, oldest first, one at a time. Cancellation
        stops it between two releases or during one (the sweep covers what is left)."""
        while True:
            self._changed.clear()
            delay = (self._heap[0].not_before - self._clock()) if self._heap else None
            if delay is None or delay > 0:
                # asyncio.timeout, not wait_for: no second task per wait.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                continue
            due = heapq.heappop(self._heap)
            await self._release(due)
            metrics.RETRY_TIMER_HELD.set(len(self._heap))

    async def _release(self, due: _Due) -> None:
        """Queue the task again if it still waits for that retry (same retries_used). A
        conflict means someone else moved it: fine. An unreachable etcd puts it back a
        RELEASE_PAUSE later, RELEASE_TRIES times at most."""
        try:
            found = await self._store.get_task(due.task_id)
            if (found is None or found.task.state != pb.TASK_STATE_PENDING
                    or found.task.hold != pb.HOLD_RETRY
                    or found.task.retries_used != due.retries_used):
                return
            if await self._store.transition(found, lifecycle.released(found.task)):
                log.info("task %s queued again for attempt %d", due.task_id,
                         found.task.attempt + 1)
        except FilchError as exc:
            log.info("task %s: retry not released yet: %s", due.task_id, exc)
            if due.tries_left > 1:
                due.not_before = self._clock() + RELEASE_PAUSE
                due.tries_left -= 1
                heapq.heappush(self._heap, due)
