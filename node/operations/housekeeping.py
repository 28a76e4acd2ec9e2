"""Keeping etcd small for months: retention, compaction, defragmentation, NOSPACE.

Every node runs this; nothing depends on one node being alive. Deleting a finished task
is a transaction that checks its status key still exists, so nodes doing it at once is
harmless; defragmentation takes a lock on the node's lease so two members are never
defragmented together. The cluster-wide counts are a chore of one node at a time
(node/operations/counts.py), run beside the rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.array_pages import member_position
from node.core.config import Config
from node.core.copy_paths import copies_root
from node.core.errors import Compacted, FilchError
from node.etcd import failpoints
from node.etcd.store import MemberStatus, Store
from node.operations.counts import CountsChore
from node.scheduling.node_state import NodeState

log = logging.getLogger(__name__)

# Deleting is batched so one round never holds etcd busy for long.
RETENTION_BATCH = 500

# Array records one round examines for deletion (each costs reads of its task ids until
# one exists): bounded, the next round goes on from there.
ARRAY_BATCH = 100

# Array member positions one keys-only range covers (etcd walks the keys of the range,
# at most this many members), ranges per array per round (together: the largest array,
# 2**17, in one round), and keys read per range (a member, or others of its millisecond).
ARRAY_WINDOW = 4096
ARRAY_WINDOWS = 32
ARRAY_PROBE = 8

# NOSPACE is disarmed only when the live data is this far below the quota, so that the
# alarm does not go off again at the next write.
DISARM_BELOW_FRACTION = 0.9


# What housekeeping needs of the runner and the stealer, and nothing more: operations sits
# beside running and below the agent that wires them (node/operations/__init__.py).
# The one node compacting etcd's history at a time (on its lease: another takes over when
# it dies).
COMPACTION_LOCK = keys.chore_lock("compaction")

class Attempts(Protocol):
    """The attempts this node runs (node.running.runner.Runner)."""

    def runs(self, task_id: str) -> bool:
        """Whether an attempt of this task is running here."""
        ...


class Stealing(Protocol):
    """This node's stealing, paused while any reason holds (node.scheduling.stealer.Stealer)."""

    def pause(self, reason: str) -> None:
        """Stop stealing until resume(reason)."""
        ...

    def resume(self, reason: str) -> None:
        """Lift one reason to pause."""
        ...


class Housekeeping:
    """Periodic cleanup of etcd and of this node's log files."""

    def __init__(self, *, config: Config, store: Store, state: NodeState, runner: Attempts,
                 stealer: Stealing,
                 firewall: Callable[[list[str]], Awaitable[None]] | None = None) -> None:
        """firewall, when given, receives every cluster address each round (the task
        network's set of addresses tasks may not reach)."""
        self._config = config
        self._firewall = firewall
        self._store = store
        self._state = state
        self._runner = runner
        self._stealer = stealer
        self._last_compaction = time.monotonic()
        self._compacted_to = 0
        self._stopping = asyncio.Event()
        self.paused_for_space = False
        self._array_cursor = b""
        # Per array: the lowest position that may still exist (see _any_task_left).
        self._array_positions: dict[str, int] = {}
        self._arrays_listed: set[str] = set()
        self.counts = CountsChore(store=store, state=state)

    async def run(self) -> None:
        """A round every housekeeping_interval until shutdown(); the counts chore beside
        (its own, shorter interval)."""
        metrics.ETCD_QUOTA.set(self._config.etcd_quota_bytes)
        counting = asyncio.create_task(self.counts.run(), name="counts chore")
        try:
            await self._rounds()
        finally:
            counting.cancel()
            await asyncio.wait([counting])      # never raises: its cancellation is ours

    async def _rounds(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.round()
            except FilchError as exc:
                log.info("housekeeping round skipped: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(),
                                       self._config.housekeeping_interval)

    async def shutdown(self) -> None:
        """No round starts after this (one in progress finishes). Idempotent."""
        self._stopping.set()

    async def round(self) -> None:
        """One pass: task firewall, metrics, NOSPACE, retention, compaction,
        defragmentation, old logs."""
        await self._refresh_firewall()
        status = await self._store.member_status()
        self._export(status)
        if status.nospace:
            await self._recover_space(status)
        elif self.paused_for_space:
            log.warning("etcd has space again: stealing resumes")
            self.paused_for_space = False
            self._stealer.resume("nospace")
        await self.apply_retention()
        if time.monotonic() - self._last_compaction >= self._config.compaction_interval:
            await self.compact(self._config.compaction_keep)
        if status.db_size - status.db_size_in_use >= self._config.defrag_threshold:
            await self.defragment()
        await asyncio.to_thread(self._remove_old_logs)

    async def _refresh_firewall(self) -> None:
        """Verify (restore) the task firewall and refresh its cluster addresses. A failure
        is logged and counted, never raised: retention, NOSPACE recovery and compaction
        must not stop because an nft table vanished (attach() refuses isolated tasks
        meanwhile, so nothing runs unfiltered)."""
        if self._firewall is None:
            return
        try:
            await self._firewall(await cluster_addresses(self._store))
        except FilchError as exc:
            metrics.FIREWALL_ERRORS.inc()
            log.error("task firewall step failed (the rest of housekeeping goes on): %s", exc)

    def _export(self, status: MemberStatus) -> None:
        metrics.ETCD_DB_SIZE.set(status.db_size)
        metrics.ETCD_DB_IN_USE.set(status.db_size_in_use)
        metrics.ETCD_NOSPACE.set(int(status.nospace))
        metrics.ETCD_LEADER.set(int(status.leader_id == status.member_id))
        metrics.ETCD_HAS_LEADER.set(int(status.leader_id != 0))

    async def apply_retention(self) -> int:
        """Delete finished tasks past the retention, then the oldest past max_finished."""
        cutoff = keys.epoch_ms(time.time() - self._config.retention).encode()
        deleted = 0
        for state, prefix in (("complete", keys.COMPLETE), ("canceled", keys.CANCELED)):
            while True:
                batch = [key for key in await self._store.list_ids(prefix, limit=RETENTION_BATCH)
                         if key[len(prefix):] < cutoff]
                if not batch:
                    break
                count = await self._store.delete_finished(batch, await self._array_ids(batch))
                metrics.RETENTION_DELETED.labels(state).inc(count)
                deleted += count
                if len(batch) < RETENTION_BATCH:
                    break
        if self._config.max_finished:
            deleted += await self._trim_to_max()
        if deleted:
            log.info("retention deleted %d finished tasks", deleted)
        await self._delete_arrays()
        return deleted

    async def _array_ids(self, status_keys: list[bytes]) -> dict[bytes, str]:
        """The array id of each of these finished tasks that belongs to an array (read
        from their records, READ_BATCH_RECORDS at a time; nothing read while no array
        exists), so that retention also waits for the array's dependents."""
        if not status_keys or await self._store.count(keys.ARRAYS) == 0:
            return {}
        by_id = {keys.last_segment(key): key for key in status_keys}
        records = await self._store.get_tasks(list(by_id))
        return {by_id[record.task.id]: record.task.array_id for record in records
                if record.task.array_id}

    async def _delete_arrays(self) -> None:
        """Delete up to ARRAY_BATCH array records (from where the last round stopped)
        none of whose tasks exist any more and that nothing depends on."""
        if not self._array_cursor:
            # A new pass: forget the positions of arrays the last pass did not list.
            self._array_positions = {array_id: position for array_id, position
                                     in self._array_positions.items()
                                     if array_id in self._arrays_listed}
            self._arrays_listed = set()
        arrays = await self._store.list_arrays(after=self._array_cursor, limit=ARRAY_BATCH)
        self._array_cursor = keys.array(arrays[-1].id) if len(arrays) == ARRAY_BATCH else b""
        self._arrays_listed.update(array.id for array in arrays)
        for array in arrays:
            if await self._any_task_left(array):
                continue
            self._array_positions.pop(array.id, None)
            if await self._store.delete_array(array.id):
                log.info("deleted array %s: none of its %d tasks is left", array.id,
                         array.count)

    async def _any_task_left(self, array: pb.Array) -> bool:
        """Whether a task of the array still exists: keys-only ranges over the interval of
        its member ids (they sort by position), ARRAY_WINDOW positions at a time, from the
        lowest position seen left the last time (positions below it are gone for good: an
        array's tasks are never written again once its record exists). etcd walks only the
        keys of each window, so the cost is bounded by the window, never the array."""
        position = self._array_positions.get(array.id, 0)
        for _ in range(ARRAY_WINDOWS):
            if position >= array.count:
                break
            last = min(array.count, position + ARRAY_WINDOW) - 1
            found = await self._member_in(array, position, last)
            if found is not None:
                self._array_positions[array.id] = found
                return True
            position = last + 1
        self._array_positions[array.id] = position
        return position < array.count      # not looked at yet: next round goes on

    async def _member_in(self, array: pb.Array, first: int, last: int) -> int | None:
        """The lowest position in [first, last] whose task exists, or None. A key in the
        interval may be another task created in the same millisecond as the array: it is
        a member only when the id derived for its position is its id."""
        start = keys.task(keys.array_task_id(array.id, first))
        end = keys.task(keys.array_task_id(array.id, last)) + b"\0"
        while True:
            page = await self._store.list_page(start, end, limit=ARRAY_PROBE)
            for key in page.keys:
                position = member_position(keys.last_segment(key))
                if first <= position <= last and \
                        keys.array_task_id(array.id, position) == keys.last_segment(key):
                    return position
            if not page.more:
                return None
            start = page.keys[-1] + b"\0"

    async def _trim_to_max(self) -> int:
        """Delete the oldest finished tasks (of either state) beyond max_finished."""
        excess = (await self._store.count(keys.COMPLETE) + await self._store.count(keys.CANCELED)
                  - self._config.max_finished)
        deleted = 0
        while excess > 0:
            oldest: list[bytes] = []
            for prefix in (keys.COMPLETE, keys.CANCELED):
                oldest += await self._store.list_ids(prefix, limit=min(excess, RETENTION_BATCH))
            oldest.sort(key=lambda key: key.split(b"/")[-2])   # by finish epoch
            batch = oldest[:min(excess, RETENTION_BATCH)]
            if not batch:
                break
            array_ids = await self._array_ids(batch)
            for key in batch:
                count = await self._store.delete_finished([key], array_ids)
                state = "complete" if key.startswith(keys.COMPLETE) else "canceled"
                metrics.RETENTION_DELETED.labels(state).inc(count)
                deleted += count
            excess -= len(batch)
        return deleted

    async def compact(self, keep: int, *, urgent: bool = False) -> None:
        """Compact etcd history, keeping the last `keep` revisions. A chore: only the node
        holding COMPACTION_LOCK compacts (a compaction walks every key revision written since
        the last one and takes etcd tens of seconds at a million tasks: one per interval
        for the cluster, not one per node). urgent (NOSPACE): compact anyway, and wait until
        the space is reusable."""
        self._last_compaction = time.monotonic()
        registration = self._state.registration
        if not urgent and (registration is None or (
                await self._store.lock_holder(COMPACTION_LOCK) != registration.node_id
                and not await self._store.try_lock(COMPACTION_LOCK, registration.node_id,
                                                   registration.lease_id))):
            return
        target = await self._store.current_revision() - keep
        if target <= self._compacted_to:
            return
        try:
            await self._store.compact(target, physical=urgent)
        except Compacted:
            pass    # another node compacted past this revision already: the goal anyway
        self._compacted_to = target
        metrics.COMPACTIONS.inc()
        log.info("compacted etcd history up to revision %d", target)

    async def defragment(self, *, full: bool = False) -> bool:
        """Defragment the local member under the cluster-wide lock; False if another holds it.

        full: etcd is out of space, so the lock (a write) cannot be taken; every member must
        be defragmented anyway before the alarm can go, and no write is served meanwhile.
        """
        registration = self._state.registration
        if registration is None:
            return False
        locked = not full and await self._store.try_lock(
            keys.DEFRAG_LOCK, registration.node_id, registration.lease_id)
        if not (locked or full):
            return False
        try:
            before = (await self._store.member_status()).db_size
            await self._store.defragment()
            after = (await self._store.member_status()).db_size
            metrics.DEFRAGS.inc()
            log.info("defragmented the local etcd member: %d -> %d bytes", before, after)
        finally:
            if locked:
                await self._store.unlock(keys.DEFRAG_LOCK, registration.node_id)
        return True

    async def _recover_space(self, status: MemberStatus) -> None:
        """NOSPACE: stop stealing, free space (retention, compaction, defrag), then disarm."""
        if not self.paused_for_space:
            log.error("etcd is out of space (NOSPACE alarm): stealing stops, running tasks "
                      "go on; freeing space")
            self.paused_for_space = True
            self._stealer.pause("nospace")
        await failpoints.hit("housekeeping.before_recover")
        await self.apply_retention()
        await self.compact(keep=0, urgent=True)
        await self.defragment(full=True)
        status = await self._store.member_status()
        self._export(status)
        if status.db_size_in_use < DISARM_BELOW_FRACTION * self._config.etcd_quota_bytes:
            await self._store.disarm_nospace()
            log.warning("NOSPACE alarm disarmed: %d of %d bytes in use", status.db_size_in_use,
                        self._config.etcd_quota_bytes)
        else:
            log.error("etcd is still full after cleanup (%d of %d bytes live): lower "
                      "--retention or --max-finished, or raise --etcd-quota-bytes",
                      status.db_size_in_use, self._config.etcd_quota_bytes)

    def _remove_old_logs(self) -> None:
        """Delete log directories of tasks this node no longer runs, and copies of other
        nodes' logs (node/running/log_copies.py), past log_retention: every node prunes its
        copies by the rule their origin prunes the log, so no copy outlives the log's
        retention anywhere."""
        cutoff = time.time() - self._config.log_retention
        for root in (self._config.path / "logs", copies_root(self._config.path)):
            if not root.is_dir():
                continue
            for task_dir in root.iterdir():
                if self._runner.runs(task_dir.name):
                    continue
                if _newest_mtime(task_dir) < cutoff:
                    shutil.rmtree(task_dir, ignore_errors=True)


def _newest_mtime(directory: Path) -> float:
    try:
        return max((entry.stat().st_mtime for entry in directory.iterdir()),
                   default=directory.stat().st_mtime)
    except FileNotFoundError:
        return time.time()


async def cluster_addresses(store: Store) -> list[str]:
    """Hosts of every etcd member's peer and client URLs, every live node's advertised
    address and every address each node publishes (all its interfaces): what tasks must
    never reach. Raises FilchError if etcd fails."""
    hosts = {urlsplit(url).hostname or "" for url in await store.member_urls()}
    for node in await store.list_nodes():
        hosts.add(node.address.rpartition(":")[0].strip("[]"))
        hosts.update(node.addresses)
    hosts.discard("")
    return sorted(hosts)
