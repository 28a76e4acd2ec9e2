"""Metering for fair share over time: what this node's attempts held, per owner, added to
each owner's decayed usage in etcd (/usage/<owner>; node/scheduling/decay.py).

The meter integrates the capacity ledger's per-owner holdings over time (CPU core-seconds,
memory GiB-seconds of the requests), and every USAGE_FLUSH, and once more at shutdown,
adds what it accrued to each owner's record: read it, decay it to now by the cluster's
half-life, add, write with a compare on its mod_revision (retried on a fresh read when
another node wrote first). Writes per flush are the owners that ran here, whatever the
queue holds. The records are on no lease: an owner's past outlives the nodes that ran it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NoReturn

from node.core.errors import Conflict, FilchError
from node.etcd import usage_records
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.store import Store
from node.scheduling.decay import GIB, added, decayed_to
from node.scheduling.fairshare import Usage
from node.scheduling.node_state import NodeState

log = logging.getLogger(__name__)

# Between flushes (seconds): a half-life is a minute at least (days by default), so usage
# reaching etcd 15 s late moves no order; one write per running owner per node and 15 s
# stays far below what etcd commits.
USAGE_FLUSH = 15.0
# Tries of one owner's compare-and-put: each lost one means another node wrote meanwhile,
# and at most a fleet's worth of nodes flush one owner in the same moment.
MAX_TRIES = 8
# The last flush at shutdown waits this long at most (etcd may be what is going away).
SHUTDOWN_FLUSH = 3.0
# Records decayed below this (core-seconds and GiB-seconds both) are deleted, so owners of
# long ago do not stay in every stealer's view for good; a second of one core moves no
# order. Looked for every PRUNE_EVERY on each node (one short range of /usage/).
PRUNE_BELOW = 1.0
PRUNE_EVERY = 3600.0


class UsageMeter:
    """Accrues per-owner usage from the capacity ledger and adds it to /usage/<owner>."""

    def __init__(self, *, store: Store, state: NodeState, settings: ClusterSettingsView,
                 flush_every: float = USAGE_FLUSH,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._capacity = state.capacity
        self._settings = settings
        self._flush_every = flush_every
        self._clock = clock
        self._monotonic = monotonic
        self._changed = state.capacity.subscribe()
        self._held: dict[str, Usage] = {}
        self._since = monotonic()
        # Accrued and not yet in etcd: owner -> (CPU core-seconds, memory GiB-seconds).
        self._pending: dict[str, tuple[float, float]] = {}
        self._flushing = asyncio.Lock()

    def accrue(self) -> None:
        """Count what each owner held since the last call, then follow the ledger."""
        now = self._monotonic()
        elapsed = max(0.0, now - self._since)
        for owner, held in self._held.items():
            cpu, memory = self._pending.get(owner, (0.0, 0.0))
            self._pending[owner] = (cpu + held.cpu_millis / 1000 * elapsed,
                                    memory + held.memory_bytes / GIB * elapsed)
        self._held = self._capacity.owners()
        self._since = now

    @property
    def pending(self) -> dict[str, tuple[float, float]]:
        """What is accrued and not yet written (for tests and the log)."""
        return dict(self._pending)

    async def run(self) -> NoReturn:
        next_flush = self._monotonic() + self._flush_every
        next_prune = self._monotonic() + PRUNE_EVERY
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_flush - self._monotonic())):
                    await self._changed.wait()
            except TimeoutError:
                pass
            self._changed.clear()
            self.accrue()
            if self._monotonic() >= next_flush:
                try:
                    await self.flush()
                except FilchError as exc:
                    log.info("usage flush deferred: %s", exc)
                next_flush = self._monotonic() + self._flush_every
            if self._monotonic() >= next_prune:
                try:
                    await self.prune()
                except FilchError as exc:
                    log.info("usage prune deferred: %s", exc)
                next_prune = self._monotonic() + PRUNE_EVERY

    async def flush(self) -> None:
        """Add what is accrued to the owners' records. Raises FilchError (etcd down, lost
        compares) with what was not written kept for the next flush."""
        async with self._flushing:
            batch, self._pending = self._pending, {}
            try:
                while batch:
                    owner, (cpu, memory) = next(iter(batch.items()))
                    if cpu > 0 or memory > 0:
                        await self._add(owner, cpu, memory)
                    del batch[owner]
            finally:
                for owner, (cpu, memory) in batch.items():
                    more_cpu, more_memory = self._pending.get(owner, (0.0, 0.0))
                    self._pending[owner] = (cpu + more_cpu, memory + more_memory)

    async def _add(self, owner: str, cpu_seconds: float, memory_gib_seconds: float) -> None:
        for _ in range(MAX_TRIES):
            found = await usage_records.get_usage(self._store, owner)
            new = added(found.usage, cpu_seconds=cpu_seconds,
                        memory_gib_seconds=memory_gib_seconds, now=self._clock(),
                        half_life=self._settings.usage_half_life)
            if await usage_records.put_usage(self._store, owner, new, found.mod_revision):
                return
        raise Conflict(f"the usage record of owner {owner} changed {MAX_TRIES} times in a row")

    async def prune(self) -> int:
        """Delete the records that decayed to almost nothing (compared: one a node just
        added to stays); how many were deleted."""
        now, half_life = self._clock(), self._settings.usage_half_life
        deleted = 0
        for found in await usage_records.list_versioned_usage(self._store):
            current = decayed_to(found.usage, now, half_life)
            if (current.cpu_seconds < PRUNE_BELOW and current.memory_gib_seconds < PRUNE_BELOW
                    and await usage_records.delete_usage(self._store, found.owner,
                                                         found.mod_revision)):
                deleted += 1
        return deleted

    async def shutdown(self) -> None:
        """Write what the attempts of this node held up to now (best effort, bounded)."""
        self.accrue()
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH):
                await self.flush()
        except (FilchError, TimeoutError) as exc:
            log.warning("usage of this node's last %gs not recorded: %s", self._flush_every,
                        exc or "etcd did not answer")
