"""Requeue the tasks of nodes that died (design.md, "requeue"). Runs on every node.

When a node's lease expires, etcd deletes its node record and its running keys in the
same revision R. Every surviving node sees the node record go, reads which tasks that
node was running as of revision R-1, and moves each back to the queue (restart=true) or
to COMPLETE with reason NODE_LOST. The transaction compares "record unchanged and
running key absent", so many nodes racing to do it is harmless. A periodic full scan
repairs whatever a missed event or compacted history hid.
"""

from __future__ import annotations

import asyncio
import logging
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.config import Config
from node.core.errors import Compacted, FilchError
from node.core.limits import READ_BATCH_RECORDS
from node.etcd.handback import Cause, handback
from node.etcd.store import Store, WatchEvent
from node.etcd.txn import status_key
from node.etcd.watching import list_and_watch

log = logging.getLogger(__name__)

# Full scans read every task record: rare, because the node-deletion path is exact and
# this is only its backstop.
FULL_SCAN_INTERVAL = 60.0
# Records per read: as many as fit the store channel even when each is as large as a record
# may be (node/core/limits.py).
SCAN_PAGE = READ_BATCH_RECORDS


class Recovery:
    """Finds RUNNING tasks whose node is gone and hands them back."""

    def __init__(self, *, config: Config, store: Store) -> None:
        self._config = config
        self._store = store

    async def shutdown(self) -> None:
        """Nothing to undo: recovery only reads and compares (its loop is cancelled)."""

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            group.create_task(list_and_watch(self._store, keys.NODES, self._nothing,
                                             self._on_node_event))
            group.create_task(self._scan_forever())
        raise AssertionError("unreachable")

    async def _nothing(self) -> None:
        """The node watch needs no listing: the full scan covers what happened before."""

    async def _on_node_event(self, event: WatchEvent) -> None:
        if not event.deleted:
            return
        node_id = keys.last_segment(event.key)
        try:
            running = await self._store.list_ids(keys.running_of_node(node_id),
                                                 revision=event.revision - 1)
        except Compacted:
            await self.scan()
            return
        if running:
            log.warning("node %s is gone with %d running tasks: recovering them", node_id,
                        len(running))
        for key in running:
            await self.recover(keys.last_segment(key), f"node {node_id} lost its lease")

    async def recover(self, task_id: str, why: str, cause: str = "lease_expired") -> None:
        """Hand a task back if it is still RUNNING on a node whose running key is gone."""
        found = await self._store.get_task(task_id)
        if found is not None and found.task.state == pb.TASK_STATE_RUNNING:
            # None: still owned, or another node recovered it first.
            await handback(self._store, found, Cause(cause, why))

    async def scan(self) -> None:
        """Read every record; recover RUNNING ones whose running key is missing."""
        present = set(await self._store.list_ids(keys.RUNNING))
        after = b""
        while True:
            records, more = await self._store.list_records(after=after, limit=SCAN_PAGE)
            for record in records:
                task = record.task
                if task.state == pb.TASK_STATE_RUNNING and status_key(task) not in present:
                    await self.recover(task.id, f"node {task.node_id} is gone (found by scan)",
                                       cause="scan")
            if not more or not records:
                return
            after = keys.task(records[-1].task.id)

    async def _scan_forever(self) -> NoReturn:
        while True:
            try:
                await self.scan()
            except FilchError as exc:
                log.info("recovery scan skipped: %s", exc)
            await asyncio.sleep(FULL_SCAN_INTERVAL)
