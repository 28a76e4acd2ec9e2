"""Audit retention: a chore one node at a time does for the cluster.

The node holding chore_lock("audit-retention") (on its lease: when it dies another takes
over) deletes, every RETENTION_INTERVAL, the entries older than the cluster's
audit-retention and, beyond audit-max-entries, the oldest. Entries are keyed by time, so
each deletion is one DeleteRange up to a key found with a keys-only read of at most
DELETE_BATCH keys, and a run does at most MAX_BATCHES of them: bounded work, the next
run goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from node.core import keys, metrics
from node.core.errors import FilchError
from node.etcd import audit_records
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.store import Store
from node.scheduling.node_state import NodeState

log = logging.getLogger(__name__)

# Often enough that the trail never runs far past its bound (a run deletes up to
# DELETE_BATCH * MAX_BATCHES entries), rare enough to cost nothing.
RETENTION_INTERVAL = 300.0
# Keys one deletion removes at most (one keys-only read finds its end), and deletions per
# run: 50,000 entries a run at most.
DELETE_BATCH = 5000
MAX_BATCHES = 10

AUDIT_LOCK = keys.chore_lock("audit-retention")


def deletion_end(oldest: list[bytes], *, cutoff: bytes, excess: int) -> bytes | None:
    """Of these oldest keys (in key order), the last to delete: every key older than
    cutoff (an audit_records.epoch_key) and at least the `excess` oldest; None: none."""
    count = max(excess, 0)
    while count < len(oldest) and oldest[count] < cutoff:
        count += 1
    count = min(count, len(oldest))
    return oldest[count - 1] if count else None


class AuditRetention:
    """Trims the trail when this node holds the chore."""

    def __init__(self, *, store: Store, state: NodeState, settings: ClusterSettingsView,
                 interval: float = RETENTION_INTERVAL,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._state = state
        self._settings = settings
        self._interval = interval
        self._clock = clock

    async def run(self) -> None:
        """A run every interval until cancelled; an etcd failure skips one run."""
        while True:
            try:
                await self.round()
            except FilchError as exc:
                log.info("audit retention skipped: %s", exc)
            await asyncio.sleep(self._interval)

    async def round(self) -> int | None:
        """Trim (holder) and return how many entries went; None when another node holds
        the chore."""
        registration = self._state.registration
        if registration is None or (
                await self._store.lock_holder(AUDIT_LOCK) != registration.node_id
                and not await self._store.try_lock(AUDIT_LOCK, registration.node_id,
                                                   registration.lease_id)):
            return None
        return await self.trim()

    async def trim(self) -> int:
        """Delete past audit-retention and beyond audit-max-entries (bounded, see above)."""
        cutoff = audit_records.epoch_key(self._clock() - self._settings.audit_retention)
        excess = await audit_records.count(self._store) - self._settings.audit_max_entries
        deleted = 0
        for _ in range(MAX_BATCHES):
            oldest = await audit_records.oldest_keys(self._store, DELETE_BATCH)
            last = deletion_end(oldest, cutoff=cutoff, excess=excess)
            if last is None:
                break
            count = await audit_records.delete_through(self._store, last)
            deleted += count
            excess -= count
            if last != oldest[-1] or len(oldest) < DELETE_BATCH:
                break       # stopped inside this page: nothing older is left
        if deleted:
            metrics.AUDIT_DELETED.inc(deleted)
            log.info("audit retention deleted %d entries", deleted)
        return deleted
