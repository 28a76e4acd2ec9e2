"""The Resolver: releases held tasks, on any node (design: every decision is a CAS).

- A task ends (its complete/canceled key appears): the tasks waiting for it, or for its
  array, are decided at once (node/scheduling/conditions.py). Which parents have dependents is known
  from a watch of /dep/, so the end of a task nobody waits for costs no read.
- A periodic sweep walks the blocked keys in bounded batches and decides every held task
  again: dependencies as above, a retry whose back-off is over, a task of an array whose
  submission completed (or, long after, was abandoned: then deleted). That sweep is what
  makes a lost watch event cost latency only.

A child cancelled DEPENDENCY_FAILED ends too, so its own dependents fail in turn.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.config import Config
from node.core.errors import FilchError
from node.core.limits import READ_BATCH_RECORDS, batches
from node.etcd.batch_write import write_moves
from node.etcd.store import Store, WatchEvent
from node.etcd.txn import Move, Versioned
from node.etcd.watching import list_and_watch
from node.scheduling.array_ids import task_ids
from node.scheduling.conditions import DependencyCheck, waiting_for_array

log = logging.getLogger(__name__)

# Blocked keys one sweep reads; the next sweep goes on from there, so a backlog of any size
# costs each node one bounded pass per sweep_interval.
SWEEP_BATCH = 1000

# /dep keys read per request when (re)building the dependents map.
DEPENDENCY_PAGE = 10_000

# Random delay before deciding, as a fraction of steal_delay: every node hears the same
# end at the same moment; a little spread makes their identical CAS writes rarely collide.
JITTER_FRACTION = 0.5

# A task held for its array this long after submission belongs to an array whose client
# died mid-submit and never retried: a retry would have come within the client's own retry
# window (seconds), and an hour leaves a person time to rerun the command. Deleting it
# keeps the array all or nothing.
ABANDONED_ARRAY_AGE = 3600.0

# Back-off after etcd failed a pass.
ERROR_RETRY = 0.5


class Resolver:
    """Decides held tasks when their parents end, and sweeps every held task."""

    def __init__(self, *, config: Config, store: Store, check: DependencyCheck) -> None:
        """check: the node's one DependencyCheck, shared with TaskService (its cache)."""
        self._config = config
        self._store = store
        self.check = check
        # parent id (task or array) -> its dependents, from the /dep/ watch
        self._dependents: dict[str, set[str]] = {}
        # task id -> array id, for the arrays that have dependents
        self._members: dict[str, str] = {}
        self._member_ids: dict[str, list[str]] = {}
        self._unexamined_parents: set[str] = set()
        self._ended: dict[str, None] = {}
        self._children: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self._cursor = b""
        self._holds: Counter[int] = Counter()
        self._stopping = False

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            group.create_task(list_and_watch(self._store, keys.DEPENDENCIES,
                                             self._load_dependents, self._on_dependency))
            for prefix in (keys.COMPLETE, keys.CANCELED):
                group.create_task(list_and_watch(self._store, prefix, self._relist_ended,
                                                 self._on_ended))
            group.create_task(self._sweep_loop())
            group.create_task(self._work())
        raise AssertionError("unreachable")

    async def shutdown(self) -> None:
        """Decide nothing more (a pass in progress finishes). Idempotent."""
        self._stopping = True

    # -- who depends on whom ----------------------------------------------------------------

    async def _load_dependents(self) -> None:
        dependents: dict[str, set[str]] = {}
        after = b""
        while True:
            page = await self._store.list_ids(keys.DEPENDENCIES, after=after,
                                              limit=DEPENDENCY_PAGE)
            for key in page:
                parent_id, child_id = keys.parse_dependency(key)
                dependents.setdefault(parent_id, set()).add(child_id)
            if len(page) < DEPENDENCY_PAGE:
                break
            after = page[-1]
        for gone in set(self._member_ids) - set(dependents):
            self._forget_array(gone)
        self._dependents = dependents
        self._unexamined_parents |= set(dependents) - set(self._member_ids)
        self._wake.set()

    async def _on_dependency(self, event: WatchEvent) -> None:
        parent_id, child_id = keys.parse_dependency(event.key)
        if event.deleted:
            children = self._dependents.get(parent_id)
            if children is not None:
                children.discard(child_id)
                if not children:
                    del self._dependents[parent_id]
                    self._forget_array(parent_id)
            return
        if parent_id not in self._dependents:
            self._dependents[parent_id] = set()
            self._unexamined_parents.add(parent_id)
            self._wake.set()
        self._dependents[parent_id].add(child_id)

    def _forget_array(self, array_id: str) -> None:
        for member in self._member_ids.pop(array_id, []):
            self._members.pop(member, None)

    async def _examine_parents(self) -> None:
        """For each new parent that is an array: learn its task ids, so that their ends
        are recognised as ends of an array member (ids are derived, not stored)."""
        while self._unexamined_parents:
            parent_id = self._unexamined_parents.pop()
            if parent_id not in self._dependents or parent_id in self._member_ids:
                continue
            array = await self._store.get_array(parent_id)
            if array is None:
                continue
            ids = await task_ids(parent_id, array.count)
            self._member_ids[parent_id] = ids
            self._members.update(dict.fromkeys(ids, parent_id))

    # -- ends -------------------------------------------------------------------------------

    async def _relist_ended(self) -> None:
        # Ends missed while the watch was down: the sweep decides every held task anyway.
        self._sweep_now.set()

    async def _on_ended(self, event: WatchEvent) -> None:
        if event.deleted:
            return
        task_id = keys.last_segment(event.key)
        if task_id in self._dependents or task_id in self._members:
            self._ended[task_id] = None
            self._wake.set()

    async def _work(self) -> NoReturn:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                continue
            await asyncio.sleep(random.uniform(0, self._config.steal_delay * JITTER_FRACTION))
            ended, children = list(self._ended), list(self._children)
            try:
                await self._examine_parents()
                for task_id in ended:
                    await self._dependents_of_end(task_id)
                    self._ended.pop(task_id, None)
                children = list(self._children)
                await self.decide(children)
                for child in children:
                    self._children.pop(child, None)
            except FilchError as exc:
                log.info("dependency pass failed, retrying: %s", exc)
                await asyncio.sleep(ERROR_RETRY)
                self._wake.set()

    async def _dependents_of_end(self, task_id: str) -> None:
        parents = [task_id] if task_id in self._dependents else []
        array_id = self._members.get(task_id)
        if array_id is not None:
            member = await self._store.get_task(task_id)
            if member is not None:
                self.check.array_failed(array_id, member.task)
            parents.append(array_id)
        for parent_id in parents:
            after = b""
            prefix = keys.dependents_of(parent_id)
            while True:
                page = await self._store.list_ids(prefix, after=after, limit=DEPENDENCY_PAGE)
                for key in page:
                    self._children[keys.parse_dependency(key)[1]] = None
                if len(page) < DEPENDENCY_PAGE:
                    break
                after = page[-1]

    async def decide(self, task_ids: list[str]) -> None:
        """Decide these held tasks now (read in batches; parents read once per batch)."""
        for start in range(0, len(task_ids), READ_BATCH_RECORDS):
            records = await self._store.get_tasks(task_ids[start:start + READ_BATCH_RECORDS])
            await self._decide_records(records, sweeping=False)

    # -- the sweep --------------------------------------------------------------------------

    async def _sweep_loop(self) -> NoReturn:
        while True:
            try:
                await asyncio.wait_for(self._sweep_now.wait(), self._config.sweep_interval)
            except TimeoutError:
                pass
            self._sweep_now.clear()
            if self._stopping:
                continue
            try:
                await self.sweep()
            except FilchError as exc:
                log.info("held-task sweep skipped: %s", exc)

    async def sweep(self) -> None:
        """Decide the next SWEEP_BATCH held tasks (wrapping around at the end)."""
        listed = await self._store.list_ids(keys.BLOCKED, after=self._cursor, limit=SWEEP_BATCH)
        self._cursor = listed[-1] if len(listed) == SWEEP_BATCH else b""
        ids = [keys.last_segment(key) for key in listed]
        for start in range(0, len(ids), READ_BATCH_RECORDS):
            records = await self._store.get_tasks(ids[start:start + READ_BATCH_RECORDS])
            await self._decide_records(records, sweeping=True)
        if not self._cursor:
            # One whole pass over the blocked keys: what it saw is the gauge.
            for hold in (pb.HOLD_DEPENDENCIES, pb.HOLD_ARRAY, pb.HOLD_RETRY):
                metrics.BLOCKED.labels(hold_label(hold)).set(self._holds[hold])
            self._holds.clear()

    async def _decide_records(self, records: list[Versioned], *, sweeping: bool) -> None:
        parents: dict[str, pb.Task | None] = {}
        arrays: dict[str, bool] = {}
        now = time.time()
        releases: list[Move] = []
        abandoned: list[Versioned] = []
        for found in records:
            task = found.task
            if task.state != pb.TASK_STATE_PENDING or task.hold == pb.HOLD_NONE:
                continue
            if sweeping:
                self._holds[task.hold] += 1
            if task.hold == pb.HOLD_DEPENDENCIES:
                await self.check.settle(found, parents)
            elif task.hold == pb.HOLD_RETRY and sweeping:
                if task.not_before.ToNanoseconds() / 1e9 <= now:
                    releases.append(Move(found, lifecycle.released(task)))
            elif task.hold == pb.HOLD_ARRAY and sweeping:
                if task.array_id not in arrays:
                    arrays[task.array_id] = await self._store.exists(keys.array(task.array_id))
                if arrays[task.array_id]:
                    releases.append(Move(found, waiting_for_array(task)))
                elif now - task.submitted_at.ToNanoseconds() / 1e9 > ABANDONED_ARRAY_AGE:
                    abandoned.append(found)
        written = await write_moves(self._store, releases)
        for move, revision in zip(releases, written, strict=True):
            if revision is not None:
                metrics.DEPENDENCY_RELEASES.labels(hold_label(move.old.task.hold)
                                                   if move.old else "").inc()
            if revision is not None and move.new.hold == pb.HOLD_DEPENDENCIES:
                await self.check.settle(Versioned(move.new, revision), parents)
        # A delete carries no record: the batch is bounded by its count (MAX_BATCH tasks).
        for batch in batches(abandoned, lambda found: 0):
            absent = sorted({keys.array(found.task.array_id) for found in batch})
            if await self._store.delete_tasks(batch, absent=absent):
                log.warning("deleted %d tasks of arrays whose submission was abandoned over "
                            "%.0f s ago (e.g. %s of array %s)", len(batch), ABANDONED_ARRAY_AGE,
                            batch[0].task.id, batch[0].task.array_id)


def hold_label(hold: int) -> str:
    """The metric label of a hold: dependencies, array, retry."""
    return pb.Hold.Name(hold).removeprefix("HOLD_").lower()  # type: ignore[arg-type]
