"""Work stealing: take queued tasks that fit, after a delay proportional to this node's load.

Candidates come from the priority index /queue/<rank>/<owner>/<id> (a bounded relist) and
from the watch of the shards of it this node is in the chain of (node/scheduling/ranking.py:
its first node tries a task at once, the next ones steps later), kept in a local view
(node/scheduling/queue_view.py). Each pass reads the records of the candidates this node
may try now and lets node/scheduling/fairshare.py choose: highest priority first, then the
owner with the lowest order (its share mixed with its decayed past usage: decay.py). The
batch is one transaction with a nested transaction per task (one taken first by another
node fails alone), guarded so that no queue key of a priority above the lowest taken
appeared after the view was complete.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.config import Config
from node.core.errors import FilchError, TooLarge
from node.core.limits import ETCD_MAX_REQUEST_BYTES, MAX_BATCH, MOVE_KEYS_BYTES, WRITE_BATCH_BYTES
from node.etcd import failpoints
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.store import Store, WatchEvent
from node.etcd.txn import Move, Versioned, none_created_after
from node.etcd.users import UserDirectory
from node.etcd.watching import list_and_watch
from node.scheduling.fairshare import Candidate, Usage, cluster_usage, select
from node.scheduling.node_state import Launcher, NodeState, Registration
from node.scheduling.queue_view import QueueView, group_of
from node.scheduling.ranking import Slices, is_full
from node.scheduling.reservation import Reservations
from node.scheduling.running_quota import RunningQuotas
from node.scheduling.shares import Shares

log = logging.getLogger(__name__)

# How many candidates one read of a pass takes (a round trip), and per group at least
# this many (more while batches are larger): enough lookahead that a large task at a
# group's head does not hide the smaller ones behind it.
PASS_LIMIT = 64
MIN_GROUP_PASS = 8
# Reads one pass makes at most (when higher priorities hold nothing that fits, lower ones).
MAX_READS_PER_PASS = 4

# Tasks per steal transaction start here, double after a won steal and halve when most of
# one was lost (up to MAX_BATCH; a batch also stops at limits.WRITE_BATCH_BYTES).
INITIAL_BATCH = 4

# Random extra delay (a fraction of steal_delay): equally loaded nodes do not collide.
JITTER_FRACTION = 0.1

# The moving average of a pass's reads and steal (weight of the newest), and the most one
# pass counts with (an etcd outage must not stretch the step between ranks for minutes).
STEAL_SECONDS_WEIGHT = 0.2
MAX_STEAL_SECONDS = 0.5

ERROR_RETRY = 0.5  # back-off after etcd refused a steal for a reason other than a lost race


class Stealer:
    """Finds queued tasks and steals those this node has room for."""

    def __init__(self, *, config: Config, store: Store, state: NodeState,
                 runner: Launcher, reservations: Reservations | None = None,
                 users: UserDirectory | None = None, settings: ClusterSettingsView | None = None
                 ) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._capacity = state.capacity
        self._runner = runner
        self._quotas = RunningQuotas(store=store, users=users)   # users' running quotas
        self._slices = Slices()
        self._queue = QueueView(rank=self._rank)
        self._reservations = reservations or Reservations(store=store, state=state)
        self._reservations.follow(queue=self._queue, nodes=lambda: self._nodes, wake=self.wake,
                                  blocked=self._quotas.holds_back)
        # Set when the shard ranges this node watches change (a node joined or left).
        self._ranges_changed = asyncio.Event()
        self._ranges: list[tuple[int, int]] = []
        self._ready_timer: asyncio.TimerHandle | None = None
        self._ready_at = 0.0
        # How long this node's reads and steals take (moving average): the step between a
        # task's first node and the next must exceed it, or the next reaches for its tasks.
        self._steal_seconds = 0.0
        # What fair share reads: live node records, the owners' weights and past usage.
        self._nodes: dict[str, pb.Node] = {}
        self._shares = Shares(settings=settings)
        # Set by new candidates and by every change of the capacity ledger (freed room).
        self._wake = state.capacity.subscribe()
        # A capability that came back (a firewall policy restored) makes tasks this node
        # set aside runnable again; a start back-off's end makes it steal again.
        state.capabilities.on_change(self._capabilities_changed)
        state.backoff.on_change(self.wake)
        self._pauses: set[str] = set()
        self._batch = INITIAL_BATCH
        # Clear while a steal transaction is sent and its attempts not yet launched:
        # shutdown waits for it, so that the runner's drain sees what it committed.
        self._no_steal_in_flight = asyncio.Event()
        self._no_steal_in_flight.set()

    def wake(self) -> None:
        """Something changed (new task, freed capacity): look at the queue again."""
        self._wake.set()

    def _capabilities_changed(self) -> None:
        """Tasks set aside as never runnable here are looked at again: relist the queue."""
        self._queue.never_fits.clear()
        self._queue.refill.set()
        self.wake()

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
        """Close the door (idempotent): send no new steal, and wait up to shutdown_grace
        for one already sent to be answered and its attempts launched. The runner's drain,
        which comes next, then sees them like every other attempt; without the wait, a
        steal committed during the drain ran nowhere and its task was lost with the lease
        (a restart=false one ended NODE_LOST without having run)."""
        self.pause("shutdown")
        if self._no_steal_in_flight.is_set():
            return
        log.info("waiting for the answer of a steal in flight")
        try:
            await asyncio.wait_for(self._no_steal_in_flight.wait(), self._config.shutdown_grace)
        except TimeoutError:
            # etcd does not answer: the drain hands back whatever it committed by then.
            log.warning("a steal was still unanswered after %gs: shutting down without it",
                        self._config.shutdown_grace)

    async def run(self) -> NoReturn:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch_queue())
            group.create_task(list_and_watch(self._store, keys.NODES, self._relist_nodes,
                                             self._on_node))
            group.create_task(self._shares.watch(self._store))
            group.create_task(self._sweep())
            group.create_task(self._reservations.run())
            group.create_task(self._work())
        raise AssertionError("unreachable")

    async def _watch_queue(self) -> NoReturn:
        """Watch the shards this node is in the chain of; again when they change."""
        while True:
            self._ranges = self._watched()
            self._queue.watching_all = self._ranges == [(0, keys.SHARD_COUNT)]
            self._ranges_changed.clear()
            watches = [asyncio.create_task(list_and_watch(
                self._store, start, self._relist, self._on_event, range_end=end))
                for start, end in (keys.shard_range(first, end) for first, end in self._ranges)]
            try:
                await self._ranges_changed.wait()
            finally:
                for watch in watches:
                    watch.cancel()
                await asyncio.gather(*watches, return_exceptions=True)

    def _watched(self) -> list[tuple[int, int]]:
        registration = self._state.registration
        return self._slices.watched(registration.node_id if registration else "")

    async def _relist(self) -> None:
        await self._queue.relist(self._store)
        self.wake()

    async def _on_event(self, event: WatchEvent) -> None:
        rank = self._queue.on_event(event)
        if rank == 0:
            self.wake()
        elif rank is not None:
            # Another node comes first for it: look again when it becomes ours to try.
            self._wake_at(time.monotonic() + rank * self._step())

    def _rank(self, task_id: str) -> int:
        registration = self._state.registration
        return 0 if registration is None else self._slices.rank(registration.node_id, task_id)

    def _update_ring(self) -> None:
        """Follow the live nodes (and which of them are full): tasks' chains, and the
        shards this node watches."""
        registration = self._state.registration
        members = frozenset([*self._nodes, *([registration.node_id] if registration else [])])
        full = frozenset(node_id for node_id, node in self._nodes.items() if is_full(node))
        if members != self._slices.members or full != self._slices.full:
            self._slices.update(members, full)
            self._queue.rerank()
            if self._watched() != self._ranges:
                self._ranges_changed.set()

    def _step(self) -> float:
        return self._config.steal_delay + 2 * self._steal_seconds

    async def _relist_nodes(self) -> None:
        self._nodes = {node.id: node for node in await self._store.list_nodes()}
        self._state.cluster_size = max(1, len(self._nodes))
        self._update_ring()

    async def _on_node(self, event: WatchEvent) -> None:
        node_id = keys.last_segment(event.key)
        if event.deleted:
            self._nodes.pop(node_id, None)
            self._state.cluster_size = max(1, len(self._nodes))
            # Tasks this node came after the gone one in may be this node's to try now.
            self._update_ring()
            self.wake()
        else:
            old = self._nodes.get(node_id)
            new = self._nodes[node_id] = pb.Node.FromString(event.value)
            if old is None or is_full(old) != is_full(new):
                # Joined, or filled up or freed room: tasks' orders of nodes change.
                self._state.cluster_size = len(self._nodes)
                self._update_ring()
                self.wake()

    async def _sweep(self) -> NoReturn:
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation
                # that arrives as the event is set, and the agent's shutdown then hangs.
                async with asyncio.timeout(self._config.sweep_interval):
                    await self._queue.refill.wait()
            except TimeoutError:
                pass
            self._queue.refill.clear()
            try:
                await self._relist()
                self._shares.publish(*self._cluster_usage())
            except FilchError as exc:
                log.info("queue sweep skipped: %s", exc)

    # -- stealing --------------------------------------------------------------------------

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
        """Read the heads of the queue and steal, in one transaction, what fair share picks
        among the tasks that fit now. True when a steal succeeded."""
        registration = self._state.registration
        if (registration is None or self.paused or self._capacity.load() >= 1.0
                or self._state.backoff.active):
            return False
        delay = self._delay()
        metrics.STEAL_DELAY.observe(delay)
        await asyncio.sleep(delay)
        records: dict[str, Versioned] = {}
        candidates: list[Candidate] = []
        picks: list[Candidate] = []
        view_revision = 0
        began = time.monotonic()
        self._quotas.begin()
        self._update_ring()
        node_id = registration.node_id
        reads, ready_at = self._queue.reads(
            per_group=max(MIN_GROUP_PASS, self._batch), per_read=PASS_LIMIT, now=began,
            step=self._step(), score=lambda task_id: Slices.score(node_id, task_id))
        if ready_at is not None:
            self._wake_at(ready_at)
        for chunk in reads[:MAX_READS_PER_PASS]:
            if not view_revision:
                # What the view was complete up to when the first read was chosen (no
                # await since): every higher-priority key it held was read before any
                # lower one, so the guard below covers exactly the keys not read.
                view_revision = self._queue.complete_revision()
            # Another node may have taken some of them while we waited.
            found = {record.task.id: record for record in
                     await self._store.get_tasks([task_id for _, task_id in chunk])}
            for group, task_id in chunk:
                record = found.get(task_id)
                if (record is None or record.task.state != pb.TASK_STATE_PENDING
                        or record.task.hold != pb.HOLD_NONE):
                    self._queue.forget(group, task_id)
                elif (not self._capacity.fits_ever(record.task.spec)
                      or self._state.refusal(record.task.spec) is not None):
                    # Never here (too large, a capability, constraint or taint): set
                    # aside until it leaves the queue or the capabilities change.
                    self._queue.forget(group, task_id)
                    self._queue.never_fits.add(task_id)
                else:
                    records[task_id] = record
                    spec = record.task.spec
                    candidates.append(Candidate(
                        task_id, spec.priority, spec.owner or keys.DEFAULT_OWNER,
                        spec.cpu_millis, spec.memory_bytes,
                        record.task.ByteSize() + MOVE_KEYS_BYTES, self._capacity.disk_of(spec)))
            await self._quotas.read(candidates)
            picks = self._select(candidates)
            if len(picks) >= self._batch:
                break
        if not picks or self.paused:
            # Paused (shutdown) during the delay or the reads: send nothing. No await
            # from here until the steal is marked in flight, so shutdown waits for it.
            await self._quotas.mark(records, self._quotas.at_quota(candidates, []))
            return False
        chosen = [records[pick.task_id] for pick in picks]
        for record in chosen:
            self._capacity.reserve(record.task.spec)
        # No queue key of a priority above the lowest taken may have appeared unseen.
        guard = none_created_after(*keys.queue_above(min(pick.priority for pick in picks)),
                                   view_revision)
        self._no_steal_in_flight.clear()
        try:
            with self._capacity.stealing():
                stole = await self._steal(chosen, registration, guard, self._quotas.guards(picks))
        finally:
            self._no_steal_in_flight.set()
        if stole:   # tasks left queued by their owner's quota say so (once)
            await self._quotas.mark(records, self._quotas.at_quota(candidates, picks))
        took = time.monotonic() - began
        self._steal_seconds += STEAL_SECONDS_WEIGHT * (min(took, MAX_STEAL_SECONDS)
                                                       - self._steal_seconds)
        return stole

    def _wake_at(self, moment: float) -> None:
        """Look again at moment (a task held back becomes ours); one timer, the earliest."""
        now = time.monotonic()
        if self._ready_timer is not None and now < self._ready_at <= moment:
            return
        if self._ready_timer is not None:
            self._ready_timer.cancel()
        self._ready_at = moment
        self._ready_timer = asyncio.get_running_loop().call_later(max(0.0, moment - now),
                                                                  self.wake)

    def _select(self, candidates: list[Candidate]) -> list[Candidate]:
        capacity = self._capacity
        allocation = capacity.allocation()
        usage, totals = self._cluster_usage()
        free = Usage(capacity.cpu_millis - allocation.cpu_millis,
                     capacity.memory_bytes - allocation.memory_bytes)
        self._shares.publish(usage, totals)
        return select(self._reservations.admitted(candidates), usage=usage, totals=totals,
                      weights=self._shares.weights, free=free, limit=self._batch,
                      max_bytes=WRITE_BATCH_BYTES, disk_free=capacity.disk_free,
                      owner_room=self._quotas.room(), past=self._shares.past())

    def _cluster_usage(self) -> tuple[dict[str, Usage], Usage]:
        registration = self._state.registration
        capacity = self._capacity
        return cluster_usage(self._nodes.values(),
                             registration.node_id if registration is not None else None,
                             capacity.owners(), Usage(capacity.cpu_millis, capacity.memory_bytes))

    async def _steal(self, chosen: list[Versioned], registration: Registration,
                     guard: object = None, quota_guards: Sequence[object] = ()) -> bool:
        """The steal transaction for a batch (resources already reserved); guard: the
        priority compare (txn.none_created_after), when there is one; quota_guards: the
        running quotas' compares (node/scheduling/running_quota.py)."""
        moves = [Move(record, lifecycle.stolen(record.task, registration.node_id,
                                               self._config.name, self._config.advertise_address))
                 for record in chosen]
        metrics.STEALS_ATTEMPTED.inc(len(moves))
        try:
            await failpoints.hit("stealer.before_commit")
            token, done = await self._store.transition_each(
                moves, lease_id=registration.lease_id, guards=() if guard is None else (guard,),
                quota_guards=quota_guards)
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
        if not done:
            # The priority compare failed: a higher task this node has not seen is queued
            # (in a shard it does not watch, or newer than its last relist). Relist.
            self._queue.refill.set()
            done = [False] * len(moves)
        won = [move for move, happened in zip(moves, done, strict=True) if happened]
        lost = [move for move, happened in zip(moves, done, strict=True) if not happened]
        if lost:
            # Another node took these first (or, when all are lost, a higher priority task
            # appeared that this node has not seen yet): the next pass reads them again.
            metrics.STEALS_LOST.inc(len(lost))
            self._release(lost)
        if token is None or not won:
            self._batch = max(1, self._batch // 2)
            return False
        metrics.STEALS_WON.inc(len(won))
        # Double while the queue is ours alone; halve when most of a batch was taken.
        self._batch = (min(MAX_BATCH, self._batch * 2) if len(lost) * 2 <= len(moves)
                       else max(1, self._batch // 2))
        for move in won:
            self._queue.forget(group_of(move.new), move.new.id)
            metrics.OWNER_PICKS.labels(group_of(move.new)[1]).inc()
            metrics.START_LATENCY.observe(max(0.0, (move.new.started_at.ToNanoseconds()
                                                    - move.new.submitted_at.ToNanoseconds()) / 1e9))
            log.debug("stole task %s (attempt %d)", move.new.id, move.new.attempt)
            self._runner.launch(lifecycle.started(move.new, token))
        log.info("stole %d task(s) at revision %d%s", len(won), token,
                 f" ({len(lost)} taken by others first)" if lost else "")
        return True

    async def _refuse(self, record: Versioned) -> None:
        """A task whose record alone is too large to write: a permanent error, recorded on
        the task (COMPLETE, START_FAILED), never retried."""
        self._queue.forget(group_of(record.task), record.task.id)
        failed = lifecycle.too_large(lifecycle.finished(
            record.task, pb.TASK_STATE_COMPLETE, pb.REASON_START_FAILED),
            ETCD_MAX_REQUEST_BYTES)
        if await self._store.transition(record, failed) is not None:
            log.error("task %s: %s", record.task.id, failed.message)

    def _release(self, moves: list[Move]) -> None:
        for move in moves:
            self._capacity.release(move.new.spec)
