"""The cluster-wide task counts: a chore one node at a time does for all.

etcd answers a count-only range by walking every key of the range in its index, so at a
million pending tasks a count costs etcd a million steps. Every node counting every round
made that cost grow with the fleet too. Now the node holding chore_lock("counts") (on its
lease: when it dies another takes over within a lease TTL and a round) counts every
COUNTS_INTERVAL and publishes the figures in one small key (keys.STATS); every other node
reads that key (one get a round) for its gauges, and admission (PendingLimit) reads it
too. When the figures go stale (STALE_ROUNDS), a node whose try_lock wins takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time

from node.core import keys, metrics
from node.core.errors import FilchError
from node.core.task_counts import TaskCounts
from node.etcd.store import Store
from node.scheduling.node_state import NodeState

log = logging.getLogger(__name__)

# Seconds between two counts (and between two reads of them on the other nodes): the
# gauges and the admission of --max-pending lag the cluster by this much at most.
COUNTS_INTERVAL = 2.0

# Published counts this many rounds old are stale: another node takes the chore (if the
# lock is free: the holder's lease expired). Rounds, not seconds, so that clocks that
# disagree by a second or two do not make two nodes count.
STALE_ROUNDS = 5

COUNTS_LOCK = keys.chore_lock("counts")


class CountsChore:
    """Counts (when this node holds the chore) or reads the counts, and exports them."""

    def __init__(self, *, store: Store, state: NodeState,
                 interval: float = COUNTS_INTERVAL) -> None:
        self._store = store
        self._state = state
        self._interval = interval
        self.holding = False

    async def run(self) -> None:
        """A round every interval until cancelled; an etcd failure skips one round."""
        while True:
            try:
                await self.round()
            except FilchError as exc:
                log.info("counts round skipped: %s", exc)
            await asyncio.sleep(self._interval)

    async def round(self) -> TaskCounts | None:
        """Count and publish (holder) or read; export to the gauges; the counts (None:
        nobody published any yet). A node that does not hold the chore reads one key; it
        takes the chore only when the published counts are STALE_ROUNDS rounds old (the
        holder died or was cut off: its lock went with its lease)."""
        registration = self._state.registration
        counts: TaskCounts | None = None
        if self.holding:
            self.holding = (registration is not None and await self._store.lock_holder(
                COUNTS_LOCK) == registration.node_id)
        if not self.holding:
            counts = await self._store.get_counts()
            stale = counts is None or time.time() - counts.counted_at > \
                STALE_ROUNDS * self._interval
            if stale and registration is not None and await self._store.try_lock(
                    COUNTS_LOCK, registration.node_id, registration.lease_id):
                log.info("this node counts the cluster's tasks now (%s)", COUNTS_LOCK.decode())
                self.holding = True
        if self.holding and registration is not None:
            counts = await self._store.count_tasks(registration.node_id)
            await self._store.put_counts(counts)
        if counts is not None:
            export(counts)
        return counts


def export(counts: TaskCounts) -> None:
    """The cluster-wide gauges from the published counts."""
    metrics.QUEUE_DEPTH.set(counts.queued)
    # Held tasks are PENDING too (the resolver's sweep counts them by hold).
    metrics.TASKS.labels("pending").set(counts.pending)
    metrics.TASKS.labels("running").set(counts.running)
    metrics.TASKS.labels("complete").set(counts.complete)
    metrics.TASKS.labels("canceled").set(counts.canceled)
