"""Work stealing: take queued tasks that fit, after a delay proportional to this node's load.

Watch events and the periodic sweep only add candidate ids; the worker reads each
candidate's record and tries the steal transaction. Losing a race is normal: another
node's transaction won, and the compare makes ours fail harmlessly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from typing import NoReturn, Protocol

from node import failpoints, keys, lifecycle, metrics
from node._gen.filch.v1 import filch_pb2 as pb
from node.config import Config
from node.errors import FilchError, TooLarge
from node.limits import ETCD_MAX_REQUEST_BYTES, MAX_BATCH, MOVE_KEYS_BYTES, WRITE_BATCH_BYTES
from node.node_state import NodeState, Registration
from node.store import Store, WatchEvent
from node.txn import Move, Versioned
from node.watching import list_and_watch

log = logging.getLogger(__name__)

# How many queued ids one sweep reads: enough to keep every node busy, small enough that a
# queue of 100,000 tasks costs one short range per sweep, not a full scan.
SWEEP_BATCH = 1000

# How many candidates one pass reads (one round trip) before re-checking for new events.
PASS_LIMIT = 64

# Tasks per steal transaction start here, double after a won steal and halve after a lost
# one (up to store.MAX_BATCH): large batches while the queue is ours alone, single steals
# while nodes contend for the same tasks. A batch also stops at limits.WRITE_BATCH_BYTES.
INITIAL_BATCH = 4

# Random extra delay, as a fraction of steal_delay, so equally loaded nodes do not collide
# in lockstep.
JITTER_FRACTION = 0.1

# Back-off after etcd refused a steal for a reason other than losing the race.
ERROR_RETRY = 0.5


class Launcher(Protocol):
    def launch(self, task: pb.Task) -> None:
        """Run a task this node just stole (its resources already reserved)."""


class Stealer:
    """Finds queued tasks and steals those this node has room for."""

    def __init__(self, *, config: Config, store: Store, state: NodeState,
                 runner: Launcher) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._capacity = state.capacity
        self._runner = runner
        self._candidates: dict[str, None] = {}   # insertion-ordered set: oldest first
        self._never_fits: set[str] = set()
        # Set by new candidates and by every change of the capacity ledger (freed room).
        self._wake = state.capacity.subscribe()
        self._pauses: set[str] = set()
        self._batch = INITIAL_BATCH

    def wake(self) -> None:
        """Something changed (new task, freed capacity): look at the queue again."""
        self._wake.set()

    @property
    def paused(self) -> bool:
        """Stealing runs only while no reason to pause is left."""
        return bool(self._pauses)

    def pause(self, reason: str) -> None:
        """Stop taking new work for reason ("shutdown", "nospace") until resume(reason)."""
        self._pauses.add(reason)

    def resume(self, reason: str) -> None:
        """Drop one reason to pause; stealing resumes once none is left."""
        self._pauses.discard(reason)
        if not self._pauses:
            self.wake()

    async def shutdown(self) -> None:
        """Stop stealing for good (idempotent); attempts already stolen go on."""
        self.pause("shutdown")

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            group.create_task(list_and_watch(self._store, keys.QUEUED, self._relist,
                                             self._on_event))
            group.create_task(self._sweep())
            group.create_task(self._work())
        raise AssertionError("unreachable")

    async def _relist(self) -> None:
        for key in await self._store.list_ids(keys.QUEUED, limit=SWEEP_BATCH):
            self._add(keys.last_segment(key))
        self.wake()

    def _add(self, task_id: str) -> None:
        if task_id not in self._never_fits:
            self._candidates[task_id] = None

    async def _on_event(self, event: WatchEvent) -> None:
        task_id = keys.last_segment(event.key)
        if event.deleted:
            self._candidates.pop(task_id, None)
            self._never_fits.discard(task_id)
        else:
            self._add(task_id)
            self.wake()

    async def _sweep(self) -> NoReturn:
        while True:
            await asyncio.sleep(self._config.sweep_interval)
            try:
                await self._relist()
            except FilchError as exc:
                log.info("queue sweep skipped: %s", exc)

    def _delay(self) -> float:
        base = self._config.steal_delay
        return base * self._capacity.load() + random.uniform(0, base * JITTER_FRACTION)

    async def _work(self) -> NoReturn:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._state.live.wait()
            if self.paused:
                continue
            try:
                stole = await self._pass()
            except FilchError as exc:
                log.info("stealing paused: %s", exc)
                await asyncio.sleep(ERROR_RETRY)
                stole = True
            if stole:
                # There may be more: look again without waiting for an event.
                self._wake.set()

    async def _pass(self) -> bool:
        """Read the oldest candidates and steal, in one transaction, those that fit now.

        True when a steal succeeded.
        """
        registration = self._state.registration
        if registration is None or self.paused or self._capacity.load() >= 1.0:
            return False
        delay = self._delay()
        metrics.STEAL_DELAY.observe(delay)
        await asyncio.sleep(delay)
        # The oldest candidates, without copying all of a deep queue; another node may have
        # taken some of them while we waited.
        ids = list(itertools.islice(self._candidates, PASS_LIMIT))
        if not ids:
            return False
        found = {record.task.id: record for record in await self._store.get_tasks(ids)}
        chosen: list[Versioned] = []
        chosen_bytes = 0
        for task_id in ids:
            record = found.get(task_id)
            if record is None or record.task.state != pb.TASK_STATE_PENDING:
                self._candidates.pop(task_id, None)
            elif not self._capacity.fits_ever(record.task.spec):
                self._candidates.pop(task_id, None)
                self._never_fits.add(task_id)
            elif (self._capacity.fits_free(record.task.spec) and len(chosen) < self._batch
                  and (not chosen or chosen_bytes + _steal_bytes(record) <= WRITE_BATCH_BYTES)):
                self._capacity.reserve(record.task.spec)   # so the next one sees less room
                chosen.append(record)
                chosen_bytes += _steal_bytes(record)
        if not chosen:
            return False
        with self._capacity.stealing():
            return await self._steal(chosen, registration)

    async def _steal(self, chosen: list[Versioned], registration: Registration) -> bool:
        """The steal transaction for a batch (resources already reserved)."""
        moves = [Move(record, lifecycle.stolen(record.task, registration.node_id,
                                               self._config.name,
                                               self._config.advertise_address))
                 for record in chosen]
        metrics.STEALS_ATTEMPTED.inc(len(moves))
        try:
            await failpoints.hit("stealer.before_commit")
            token = await self._store.transition_many(moves, lease_id=registration.lease_id)
            await failpoints.hit("stealer.after_commit")
        except TooLarge:
            self._release(moves)
            if len(moves) > 1:
                # Split: the next pass tries half as many (and halves again if need be).
                self._batch = max(1, len(moves) // 2)
                return True
            await self._refuse(chosen[0])
            return True
        except BaseException:
            self._release(moves)
            raise
        if token is None:
            # Another node took at least one of them; the next pass re-reads them all.
            metrics.STEALS_LOST.inc(len(moves))
            self._release(moves)
            self._batch = max(1, self._batch // 2)
            return False
        metrics.STEALS_WON.inc(len(moves))
        self._batch = min(MAX_BATCH, self._batch * 2)
        for move in moves:
            self._candidates.pop(move.new.id, None)
            metrics.START_LATENCY.observe(max(0.0, (move.new.started_at.ToNanoseconds()
                                                    - move.new.submitted_at.ToNanoseconds()) / 1e9))
            log.debug("stole task %s (attempt %d)", move.new.id, move.new.attempt)
            self._runner.launch(lifecycle.started(move.new, token))
        log.info("stole %d task(s) at revision %d", len(moves), token)
        return True

    async def _refuse(self, record: Versioned) -> None:
        """A task whose record alone is too large to write: a permanent error, recorded on
        the task (COMPLETE, START_FAILED), never retried."""
        self._candidates.pop(record.task.id, None)
        failed = lifecycle.too_large(lifecycle.finished(
            record.task, pb.TASK_STATE_COMPLETE, pb.REASON_START_FAILED),
            ETCD_MAX_REQUEST_BYTES)
        if await self._store.transition(record, failed) is not None:
            log.error("task %s: %s", record.task.id, failed.message)

    def _release(self, moves: list[Move]) -> None:
        for move in moves:
            self._capacity.release(move.new.spec)


def _steal_bytes(record: Versioned) -> int:
    """What stealing this task adds to a transaction: its record, grown by a few node
    fields (WRITE_BATCH_BYTES leaves a whole record of headroom for those), and keys."""
    return record.task.ByteSize() + MOVE_KEYS_BYTES
