"""The Resolver: releases held tasks, one node per parent, and sweeps held tasks on one node.

- A parent's end is marked by whoever wrote it (node/etcd/release_marks.py): /release/<id>,
  only when a /dependents/ flag says some task waits for it. Every node watches /release/
  (a few events: one per parent with dependents, not one per task end); for each mark one
  node takes the chore lock release/<id> on its lease, pages through /dep/<id>/, decides
  the children in batches (an array parent: "any member open?" is one range of limit 1)
  and writes the outcomes in batched transactions, then deletes the mark (and the flag,
  once no dependent is left). Should it die, its lock ends with its lease, and the
  deletion wakes another node, which resumes: decided children have left /dep/. Nothing
  per edge or per member is kept between passes.
- A periodic sweep, on one node at a time (chore lock blocked-sweep, held while it lives;
  its cursor is in memory, a new holder starts over), walks the blocked keys in bounded
  batches: a retry whose back-off is over, a task of an array whose submission completed
  (or, long after, was abandoned: then deleted). It leaves tasks held for dependencies to
  the release passes, and instead walks the /dependents/ flags (FLAG_BATCH a round),
  marking a parent that ended without a mark: its writer died between the end and the
  mark, or a child's submit raced the pass. That sweep is what makes a lost event or a
  dead writer cost latency only.

A child cancelled DEPENDENCY_FAILED ends too, so its own dependents are marked in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.config import Config
from node.core.errors import FilchError
from node.core.limits import READ_BATCH_RECORDS, batches
from node.core.states import FINISHED
from node.etcd import failpoints
from node.etcd.batch_write import concurrently, write_moves
from node.etcd.store import RELEASED, Store, WatchEvent
from node.etcd.txn import Move, Versioned
from node.etcd.watching import list_and_watch
from node.scheduling.conditions import FAILED, MET, Condition, DependencyCheck, waiting_for_array
from node.scheduling.node_state import NodeState

log = logging.getLogger(__name__)

# Blocked keys one sweep reads; the next sweep goes on from there, so a backlog of any size
# costs the sweeping node one bounded pass per sweep_interval.
SWEEP_BATCH = 1000

# /dependents/ flags one sweep checks for a missed mark (each a read or two): the backstop
# of a rare death, so a small share of a sweep's budget.
FLAG_BATCH = 100

# /dep keys of one parent read per request in a release pass: the children of one page
# are then read READ_BATCH_RECORDS at a time and written in batches, so a pass's memory is
# one page of records (about a megabyte of typical ones).
DEPENDENCY_PAGE = 1000

# A task held for its array this long after submission belongs to an array whose client
# died mid-submit and never retried: a retry would have come within the client's own retry
# window (seconds), and an hour leaves a person time to rerun the command. Deleting it
# keeps the array all or nothing.
ABANDONED_ARRAY_AGE = 3600.0

# Back-off after etcd failed a pass.
ERROR_RETRY = 0.5

SWEEP_LOCK = keys.chore_lock("blocked-sweep")


def release_lock(parent_id: str) -> bytes:
    return keys.chore_lock(f"release/{parent_id}")


class Resolver:
    """Releases the dependents of marked parents, and sweeps every held task."""

    def __init__(self, *, config: Config, store: Store, check: DependencyCheck,
                 state: NodeState) -> None:
        """check: the node's one DependencyCheck, shared with TaskService (its cache).
        state: whose registration (node id, lease) holds the chore locks."""
        self._config = config
        self._store = store
        self.check = check
        self._state = state
        self._marked: dict[str, None] = {}
        # Parents whose /release/ mark exists (as the mark watch last said): a lock given
        # back re-marks only these. Re-marking on every lock deletion made the nodes take
        # and give back a finished parent's lock forever (each unlock woke them all).
        self._live_marks: set[str] = set()
        self._wake = asyncio.Event()
        self._cursor = b""
        self._flag_cursor = b""
        self._sweeper = ""      # the node id this node held the sweep lock as
        self._holds: Counter[int] = Counter()
        self._stopping = False

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            group.create_task(list_and_watch(self._store, keys.RELEASES, self._relist_marks,
                                             self._on_mark))
            group.create_task(list_and_watch(self._store, release_lock(""), self._relist_marks,
                                             self._on_lock))
            group.create_task(self._sweep_loop())
            group.create_task(self._work())
        raise AssertionError("unreachable")

    async def shutdown(self) -> None:
        """Decide nothing more (a pass in progress finishes); give the sweep back.
        Idempotent."""
        self._stopping = True
        if self._sweeper:
            with contextlib.suppress(FilchError):
                await self._store.unlock(SWEEP_LOCK, self._sweeper)
            self._sweeper = ""

    # -- marks ------------------------------------------------------------------------------

    async def _relist_marks(self) -> None:
        after = b""
        live: set[str] = set()
        while True:
            page = await self._store.list_ids(keys.RELEASES, after=after, limit=DEPENDENCY_PAGE)
            for key in page:
                live.add(keys.last_segment(key))
                self._marked[keys.last_segment(key)] = None
            if len(page) < DEPENDENCY_PAGE:
                break
            after = page[-1]
        self._live_marks = live
        self._wake.set()

    async def _on_mark(self, event: WatchEvent) -> None:
        parent_id = keys.last_segment(event.key)
        if event.deleted:
            self._live_marks.discard(parent_id)
            return
        self._live_marks.add(parent_id)
        self._marked[parent_id] = None
        self._wake.set()

    async def _on_lock(self, event: WatchEvent) -> None:
        # A pass ended, or its node died: a mark still there needs another pass.
        parent_id = keys.last_segment(event.key)
        if event.deleted and parent_id in self._live_marks:
            self._marked[parent_id] = None
            self._wake.set()

    async def _work(self) -> NoReturn:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                continue
            for parent_id in list(self._marked):
                self._marked.pop(parent_id, None)
                try:
                    await self.release(parent_id)
                except FilchError as exc:
                    log.info("release of %s's dependents failed, retrying: %s", parent_id, exc)
                    self._marked[parent_id] = None
                    await asyncio.sleep(ERROR_RETRY)
                    self._wake.set()

    async def release(self, parent_id: str) -> bool:
        """One pass over parent_id's dependents, when it is marked and no other node is at
        it; True when this node did it. Raises StoreUnavailable / StoreFull (the lock is
        given back; the mark stays)."""
        registration = self._state.registration
        if registration is None:
            raise FilchError("not registered yet")
        lock = release_lock(parent_id)
        if not await self._store.try_lock(lock, registration.node_id, registration.lease_id):
            return False
        try:
            mark = await self._store.release_mark(parent_id)
            if mark is None:
                return False
            failed_member, revision, flag_revision = mark
            if failed_member:
                member = await self._store.get_task(failed_member)
                if member is not None:
                    self.check.array_failed(parent_id, member.task)
            started = time.monotonic()
            ended = await self.parent_ended(parent_id)
            decided = await self._release_children(parent_id)
            log.info("released the dependents of %s: %d decided in %.2f s", parent_id,
                     decided, time.monotonic() - started)
            await failpoints.hit("resolver.before_end")
            await self._store.end_release(parent_id, revision, flag_revision, ended=ended)
            return True
        finally:
            with contextlib.suppress(FilchError):
                await self._store.unlock(lock, registration.node_id)

    async def _release_children(self, parent_id: str) -> int:
        """Decide every held dependent of parent_id; how many were read."""
        parents: dict[str, pb.Task | None] = {}
        arrays: dict[str, Condition] = {}
        prefix = keys.dependents_of(parent_id)
        after = b""
        decided = 0
        while True:
            page = await self._store.list_ids(prefix, after=after, limit=DEPENDENCY_PAGE)
            ids = [keys.parse_dependency(key)[1] for key in page]
            records: list[Versioned] = []

            async def read(start: int, ids: list[str] = ids,
                           records: list[Versioned] = records) -> None:
                records.extend(await self._store.get_tasks(ids[start:start + READ_BATCH_RECORDS]))

            # A page is read, decided and written with several requests in flight: one
            # round trip at a time would make a large release wait on latency, not etcd.
            await concurrently(range(0, len(ids), READ_BATCH_RECORDS), read)
            await self._decide_held(records, parents, arrays)
            decided += len(ids)
            if len(page) < DEPENDENCY_PAGE:
                return decided
            after = page[-1]

    async def _decide_held(self, records: list[Versioned], parents: dict[str, pb.Task | None],
                           arrays: dict[str, Condition]) -> None:
        """Decide these HOLD_DEPENDENCIES tasks and write the outcomes in batches."""
        moves: list[Move] = []
        verdicts: list[str] = []
        for found in records:
            task = found.task
            if task.state != pb.TASK_STATE_PENDING or task.hold != pb.HOLD_DEPENDENCIES:
                continue
            state, new = await self.check.decide(task, parents, arrays)
            if new is not None:
                moves.append(Move(found, new))
                verdicts.append(state)
        written = await write_moves(self._store, moves,
                                    after_batch=lambda: failpoints.hit("resolver.after_batch"))
        for state, revision in zip(verdicts, written, strict=True):
            if revision is None:
                continue
            if state == FAILED:
                metrics.DEPENDENCY_FAILURES.inc()
            elif state == MET:
                metrics.DEPENDENCY_RELEASES.labels("dependencies").inc()

    async def parent_ended(self, parent_id: str) -> bool:
        """Whether this parent (a task or an array) can wake no dependent any more: a task
        in a final state or gone, an array with no open member or gone."""
        found = await self._store.get_task(parent_id)
        if found is not None:
            return found.task.state in FINISHED
        if await self._store.get_array(parent_id) is None:
            return True
        return not await self._store.list_ids(keys.open_members(parent_id), limit=1)

    # -- the sweep --------------------------------------------------------------------------

    async def _sweep_loop(self) -> NoReturn:
        while True:
            await asyncio.sleep(self._config.sweep_interval)
            registration = self._state.registration
            if self._stopping or registration is None:
                continue
            try:
                if self._sweeper != registration.node_id:
                    # A new registration is a new lease: the old claim went with the old one.
                    if not await self._store.try_lock(SWEEP_LOCK, registration.node_id,
                                                      registration.lease_id):
                        continue
                    self._sweeper = registration.node_id
                    self._cursor = self._flag_cursor = b""
                await self.sweep()
                await self.mark_missed()
            except FilchError as exc:
                log.info("held-task sweep skipped: %s", exc)

    async def sweep(self) -> None:
        """Decide the next SWEEP_BATCH held tasks (wrapping around at the end)."""
        # In windows of the id space: etcd 3.4 would walk every held key behind the cursor.
        listed = await self._store.first_ids(keys.BLOCKED, after=self._cursor, limit=SWEEP_BATCH)
        self._cursor = listed[-1] if len(listed) == SWEEP_BATCH else b""
        ids = [keys.last_segment(key) for key in listed]
        parents: dict[str, pb.Task | None] = {}
        arrays: dict[str, Condition] = {}
        for start in range(0, len(ids), READ_BATCH_RECORDS):
            records = await self._store.get_tasks(ids[start:start + READ_BATCH_RECORDS])
            await self._decide_records(records, parents, arrays)
        if not self._cursor:
            # One whole pass over the blocked keys: what it saw is the gauge.
            for hold in (pb.HOLD_DEPENDENCIES, pb.HOLD_ARRAY, pb.HOLD_RETRY):
                metrics.BLOCKED.labels(hold_label(hold)).set(self._holds[hold])
            self._holds.clear()

    async def mark_missed(self) -> None:
        """Mark the next FLAG_BATCH flagged parents that ended without a mark (their
        writer died between the end and the mark): the release pass then runs as usual."""
        listed = await self._store.dependents_flags(after=self._flag_cursor, limit=FLAG_BATCH)
        self._flag_cursor = (keys.has_dependents(listed[-1][0]) if len(listed) == FLAG_BATCH
                             else b"")
        for parent_id, value in listed:
            if value == RELEASED:
                await self._store.drop_released_flag(parent_id)
                continue
            if await self._store.release_mark(parent_id) is None \
                    and await self.parent_ended(parent_id):
                log.info("%s ended without a release mark: marking it", parent_id)
                await self._store.put_release_mark(parent_id)

    async def _decide_records(self, records: list[Versioned],
                              parents: dict[str, pb.Task | None],
                              conditions: dict[str, Condition]) -> None:
        arrays: dict[str, bool] = {}
        now = time.time()
        releases: list[Move] = []
        abandoned: list[Versioned] = []
        for found in records:
            task = found.task
            if task.state != pb.TASK_STATE_PENDING or task.hold == pb.HOLD_NONE:
                continue
            self._holds[task.hold] += 1
            if task.hold == pb.HOLD_RETRY:
                if task.not_before.ToNanoseconds() / 1e9 <= now:
                    releases.append(Move(found, lifecycle.released(task)))
            elif task.hold == pb.HOLD_ARRAY:
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
                await self.check.settle(Versioned(move.new, revision), parents, conditions)
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
