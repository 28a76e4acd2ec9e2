"""Work stealing: take queued tasks that fit, after a delay proportional to this node's load.

Watch events and the periodic sweep only add candidate ids; the worker reads each
candidate's record and tries the steal transaction. Losing a race is normal: another
node's transaction won, and the compare makes ours fail harmlessly.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import NoReturn

from node import keys, lifecycle, metrics
from node._gen.filch.v1 import filch_pb2 as pb
from node.config import Config
from node.errors import FilchError
from node.membership import Membership
from node.runner import Runner
from node.store import Store, Versioned, WatchEvent
from node.watching import list_and_watch

log = logging.getLogger(__name__)

# How many queued ids one sweep reads: enough to keep every node busy, small enough that a
# queue of 100,000 tasks costs one short range per sweep, not a full scan.
SWEEP_BATCH = 1000

# How many candidates one pass considers before re-checking for new events.
PASS_LIMIT = 64

# Random extra delay, as a fraction of steal_delay, so equally loaded nodes do not collide
# in lockstep.
JITTER_FRACTION = 0.2

# Back-off after etcd refused a steal for a reason other than losing the race.
ERROR_RETRY = 0.5


class Stealer:
    """Finds queued tasks and steals those this node has room for."""

    def __init__(self, config: Config, store: Store, runner: Runner,
                 membership: Membership) -> None:
        self._config = config
        self._store = store
        self._runner = runner
        self._membership = membership
        self._candidates: dict[str, None] = {}   # insertion-ordered set: oldest first
        self._never_fits: set[str] = set()
        self._wake = asyncio.Event()
        self.paused = False

    def wake(self) -> None:
        """Something changed (new task, freed capacity): look at the queue again."""
        self._wake.set()

    def pause(self) -> None:
        """Stop taking new work (shutdown, etcd out of space)."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

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
        return base * self._runner.load() + random.uniform(0, base * JITTER_FRACTION)

    async def _work(self) -> NoReturn:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._membership.live.wait()
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
        """Try the oldest candidates once; True when a steal succeeded."""
        stole = False
        for task_id in list(self._candidates)[:PASS_LIMIT]:
            if self.paused or self._runner.load() >= 1.0 or not self._membership.live.is_set():
                break
            delay = self._delay()
            metrics.STEAL_DELAY.observe(delay)
            await asyncio.sleep(delay)
            if task_id not in self._candidates:
                continue        # another node took it while we waited
            found = await self._store.get_task(task_id)
            if found is None or found.task.state != pb.TASK_STATE_PENDING:
                self._candidates.pop(task_id, None)
                continue
            spec = found.task.spec
            if not self._runner.fits_ever(spec):
                self._candidates.pop(task_id, None)
                self._never_fits.add(task_id)
                continue
            if not self._runner.fits_free(spec):
                continue        # keep it; capacity frees up later
            stole = await self._steal(found) or stole
        return stole

    async def _steal(self, found: Versioned) -> bool:
        registration = self._membership.registration
        if registration is None:
            return False
        task = found.task
        self._runner.reserve(task.spec)
        metrics.STEALS_ATTEMPTED.inc()
        try:
            running = lifecycle.stolen(task, registration.node_id, self._config.name,
                                       self._config.advertise_address)
            token = await self._store.transition(found, running, lease_id=registration.lease_id)
        except BaseException:
            self._runner.release(task.spec)
            raise
        self._candidates.pop(task.id, None)
        if token is None:
            metrics.STEALS_LOST.inc()
            self._runner.release(task.spec)
            return False
        metrics.STEALS_WON.inc()
        metrics.START_LATENCY.observe(max(0.0, (running.started_at.ToNanoseconds()
                                                - task.submitted_at.ToNanoseconds()) / 1e9))
        log.info("stole task %s (attempt %d)", task.id, running.attempt)
        self._runner.launch(lifecycle.started(running, token))
        return True
