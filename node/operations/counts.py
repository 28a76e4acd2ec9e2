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
from node.scheduling.queue_view import mark_groups

log = logging.getLogger(__name__)

# Seconds between two counts (and between two reads of them on the other nodes): the
# gauges and the admission of --max-pending lag the cluster by this much at most.
COUNTS_INTERVAL = 2.0

# Published counts this many rounds old are stale: another node takes the chore (if the
# lock is free: the holder's lease expired). Rounds, not seconds, so that clocks that
# disagree by a second or two do not make two nodes count.
STALE_ROUNDS = 5

# A count walks every status key in etcd (at a million pending ~0.3 s of a member's CPU):
# the holder spaces its counts so that counting takes at most this share of the time ...
COUNTS_BUDGET = 0.1
# ... but counts at least this often (admission trusts a count for STATS_MAX_AGE, 30 s).
COUNTS_MAX_INTERVAL = 10.0

# The holder also puts the marks of queue groups that lack one (queue_view.mark_groups:
# keys queued by agents older than the marks) when it takes the chore and this often.
MARK_GROUPS_INTERVAL = 300.0

COUNTS_LOCK = keys.chore_lock("counts")


class CountsChore:
    """Counts (when this node holds the chore) or reads the counts, and exports them."""

    def __init__(self, *, store: Store, state: NodeState,
                 interval: float = COUNTS_INTERVAL) -> None:
        self._store = store
        self._state = state
        self._interval = interval
        self.holding = False
        self._count_seconds = 0.0
        self._marked_at = -float("inf")

    async def run(self) -> None:
        """A round every interval (the holder: as its counts allow) until cancelled; an
        etcd failure skips one round."""
        while True:
            wait = self._interval
            try:
                await self.round()
                wait = self.every if self.holding else self._interval
            except FilchError as exc:
                log.info("counts round skipped: %s", exc)
            await asyncio.sleep(wait)

    @property
    def every(self) -> float:
        """Seconds between the holder's counts: its interval, or more while a count takes
        more than COUNTS_BUDGET of that (never more than COUNTS_MAX_INTERVAL)."""
        return min(max(self._interval, self._count_seconds / COUNTS_BUDGET),
                   max(self._interval, COUNTS_MAX_INTERVAL))

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
                STALE_ROUNDS * max(self._interval, counts.every)
            if stale and registration is not None and await self._store.try_lock(
                    COUNTS_LOCK, registration.node_id, registration.lease_id):
                log.info("this node counts the cluster's tasks now (%s)", COUNTS_LOCK.decode())
                self.holding = True
                self._marked_at = -float("inf")
        if self.holding and registration is not None:
            started = time.monotonic()
            counts = await self._store.count_tasks(registration.node_id, self.every)
            self._count_seconds = time.monotonic() - started
            await self._store.put_counts(counts)
            if started - self._marked_at >= MARK_GROUPS_INTERVAL:
                self._marked_at = started
                if marked := await mark_groups(self._store):
                    log.info("put %d missing queue group mark(s)", marked)
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
