"""Requeue the tasks of nodes that died (design.md, "requeue"). Runs on every node.

Every RUNNING record has a running-task index key /placed/<node-id>/<task-id>, moved in
the same transaction as the record (txn.index_keys) and, unlike the running key, not on
the node's lease: it outlives the node. When a node's lease expires etcd deletes its node
record and its running keys; every surviving node sees the node record go (a deletes-only
watch: the frequent rewrites of node records never reach it), lists that node's /placed/
keys and moves each task back to the queue (restart=true) or to COMPLETE with reason
NODE_LOST. The transaction compares "record unchanged and running key absent", so many
nodes racing to do it is harmless.

The backstop for a missed deletion event (a watch that fell behind compaction, a node
that was down meanwhile) is a cluster chore: one node at a time, holding the
"recovery-sweep" claim on its lease, pages through /placed/ keys only and recovers those
of nodes without a /node/ record. Its cost is the number of RUNNING tasks (bounded by the
fleet's capacity), never the size of the queue; no code here reads every record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.config import Config
from node.core.errors import FilchError
from node.etcd import failpoints
from node.etcd.handback import Cause, handback
from node.etcd.store import Store, WatchEvent
from node.etcd.watching import list_and_watch
from node.scheduling.node_state import NodeState, Registration

log = logging.getLogger(__name__)

SWEEP_LOCK = keys.chore_lock("recovery-sweep")
# Index keys per read: keys only (~100 bytes each), so one page is ~100 KiB however
# large the records are.
SWEEP_PAGE = 1000
# Pause between two pages of one sweep: a sweep of a fleet running 100,000 tasks costs at
# most 1 / SWEEP_PAUSE ranges per second, spread over its 100 pages.
SWEEP_PAUSE = 0.2


class Recovery:
    """Finds RUNNING tasks whose node is gone and hands them back."""

    def __init__(self, *, config: Config, store: Store, state: NodeState) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._wake = asyncio.Event()
        # The registration under which this node holds the sweep claim (None: not held).
        # The claim is on that registration's lease: a new registration must claim anew.
        self._holding: Registration | None = None

    async def shutdown(self) -> None:
        """Give the sweep claim back so another node takes it at once (best effort: else
        it goes with this node's lease)."""
        holding, self._holding = self._holding, None
        if holding is not None:
            with contextlib.suppress(FilchError):
                await self._store.unlock(SWEEP_LOCK, holding.node_id)

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            group.create_task(list_and_watch(self._store, keys.NODES, self._relisted,
                                             self._on_node_event, deletes_only=True))
            group.create_task(self._sweep_forever())
        raise AssertionError("unreachable")

    async def _relisted(self) -> None:
        """The node watch (re)starts, maybe after compaction hid deletions: sweep soon."""
        self._wake.set()

    async def _on_node_event(self, event: WatchEvent) -> None:
        if not event.deleted:
            return
        node_id = keys.last_segment(event.key)
        try:
            # Test-only: error() here drops the event, as a watch behind compaction would.
            await failpoints.hit("recovery.node_deleted")
        except FilchError:
            log.warning("failpoint: the deletion of node %s is ignored", node_id)
            return
        recovered = await self.recover_node(node_id, f"node {node_id} lost its lease",
                                            cause="lease_expired")
        if recovered:
            log.warning("node %s is gone: recovered %d running tasks", node_id, recovered)

    async def recover_node(self, node_id: str, why: str, *, cause: str) -> int:
        """Hand back every task the running-task index places on node_id (a node known
        to be gone); returns how many moved."""
        recovered = 0
        prefix = keys.placed_on_node(node_id)
        after = b""
        while True:
            page = await self._store.list_ids(prefix, after=after, limit=SWEEP_PAGE)
            metrics.RECOVERY_READS.labels("placed").inc(len(page))
            for key in page:
                recovered += await self.recover(keys.parse_placed(key)[1], node_id, why,
                                                cause=cause)
            if len(page) < SWEEP_PAGE:
                return recovered
            after = page[-1]

    async def recover(self, task_id: str, node_id: str, why: str, *,
                      cause: str = "lease_expired") -> bool:
        """Hand a task back if it is still RUNNING on node_id and that node's running key
        is gone (the transaction compares it); True when this call moved it."""
        found = await self._store.get_task(task_id)
        metrics.RECOVERY_READS.labels("record").inc()
        if (found is None or found.task.state != pb.TASK_STATE_RUNNING
                or found.task.node_id != node_id):
            return False
        # None: still owned, or another node recovered it first.
        return await handback(self._store, found, Cause(cause, why)) is not None

    async def sweep(self) -> int:
        """One pass over the running-task index: recover the tasks of every node that has
        no /node/ record; returns how many moved. Reads keys only, a page at a time."""
        metrics.RECOVERY_SWEEPS.inc()
        live = {keys.last_segment(key) for key in await self._store.list_ids(keys.NODES)}
        # Nodes first met in the index after `live` was read: registered since (their
        # first steal followed their record), or gone. Asked once per sweep.
        registered_since: dict[str, bool] = {}
        recovered = 0
        after = b""
        while True:
            page = await self._store.list_ids(keys.PLACED, after=after, limit=SWEEP_PAGE)
            metrics.RECOVERY_READS.labels("placed").inc(len(page))
            lost: list[tuple[str, str]] = []
            for key in page:
                node_id, task_id = keys.parse_placed(key)
                if node_id in live:
                    continue
                if node_id not in registered_since:
                    registered_since[node_id] = await self._store.exists(keys.node(node_id))
                if not registered_since[node_id]:
                    lost.append((node_id, task_id))
            if lost:
                await failpoints.hit("recovery.before_sweep_recover")
            for node_id, task_id in lost:
                recovered += await self.recover(
                    task_id, node_id, f"node {node_id} is gone (found by the recovery sweep)",
                    cause="scan")
            if len(page) < SWEEP_PAGE:
                return recovered
            after = page[-1]
            await asyncio.sleep(SWEEP_PAUSE)

    async def index_unplaced(self) -> int:
        """Give every running key that has no /placed/ twin its index key (RUNNING tasks
        stolen by agents older than the index, during a rolling upgrade); returns how many.
        Reads running keys and the matching span of the index, keys only, a page at a time:
        a cost of the RUNNING tasks, like the sweep's."""
        indexed = 0
        after = b""
        while True:
            page = await self._store.list_ids(keys.RUNNING, after=after, limit=SWEEP_PAGE)
            if page:
                owners = [keys.parse_running(key) for key in page]
                span = await self._store.list_page(
                    keys.placed(*owners[0]), keys.placed(*owners[-1]) + b"\0",
                    limit=len(page) + 1)
                metrics.RECOVERY_READS.labels("placed").inc(len(page) + len(span.keys))
                present = set(span.keys)
                for node_id, task_id in owners:
                    if keys.placed(node_id, task_id) in present:
                        continue
                    found = await self._store.get_task(task_id)
                    metrics.RECOVERY_READS.labels("record").inc()
                    if (found is not None and found.task.state == pb.TASK_STATE_RUNNING
                            and found.task.node_id == node_id):
                        indexed += await self._store.index_running(found)
            if len(page) < SWEEP_PAGE:
                return indexed
            after = page[-1]
            await asyncio.sleep(SWEEP_PAUSE)

    async def sweep_if_holder(self) -> bool:
        """Sweep when this node holds the cluster's sweep claim, taking it if it is free;
        False when another node holds it (or this node is not registered)."""
        registration = self._state.registration
        if registration is None:
            return False
        if self._holding != registration:
            self._holding = None
            if not await self._store.try_lock(SWEEP_LOCK, registration.node_id,
                                              registration.lease_id):
                return False
            self._holding = registration
            log.info("this node runs the recovery sweep (every %.0f s)",
                     self._config.recovery_sweep_interval)
        recovered = await self.sweep()
        if recovered:
            log.warning("recovery sweep: recovered %d tasks of nodes that are gone", recovered)
        indexed = await self.index_unplaced()
        if indexed:
            log.warning("recovery sweep: indexed %d running tasks that had no /placed/ key "
                        "(stolen by an older agent)", indexed)
        return True

    async def _sweep_forever(self) -> NoReturn:
        while True:
            self._wake.clear()
            try:
                await self.sweep_if_holder()
            except FilchError as exc:
                log.info("recovery sweep skipped: %s", exc)
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the event is set, and the agent's shutdown then hangs.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.recovery_sweep_interval):
                    await self._wake.wait()
