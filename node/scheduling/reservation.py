"""No starvation: one node holds room for a task that smaller, lower work keeps out.

Without it a task larger than any node's free room waits for as long as smaller tasks
keep every node busy: each freed CPU goes to one of them (a 2-CPU task on 2-CPU nodes
waits for a whole 1-CPU array to drain). Here, once the head of the queue (the oldest
task of the highest queued priority) has been the head for longer than the cluster's
reserve-after (`filch cluster set reserve-after 2m`), fits no node's free room, and
could start but for room (the `blocked` hook: a running quota, say), ONE node reserves
for it: no coordinator, every node computes the same choice from the node records it
watches (choose(): a node whose record already holds it, else the best rendezvous-ranked
node whose capacity could hold it when empty, whose labels, taints and capabilities admit
it, that is not cordoned and holds no other reservation). That node takes no task of a
lower priority (nor others of the same) until the reserved one fits, then takes it: its
stealer wakes by itself as its attempts end. It publishes the reservation in its record
(Node.reserved_task/priority/since), which is how readers (`filch status`) and the other
nodes see it. The reservation ends when the task leaves the queue (stolen by any node,
canceled) or when its node goes away; then the next node in rendezvous order takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import metrics, rendezvous
from node.core.errors import FilchError
from node.etcd.cluster_settings import DEFAULT_RESERVE_AFTER, ClusterSettingsView
from node.etcd.store import Store
from node.scheduling.constraints import node_refusal
from node.scheduling.fairshare import Candidate
from node.scheduling.node_state import NodeState
from node.scheduling.queue_view import Group, QueueView

log = logging.getLogger(__name__)

# How often a node looks at the head of its queue view and, holding a reservation, at
# the reserved task: a reservation starts within this of reserve-after, ends within this
# of the watch taking its task out of the queue view.
CHECK_INTERVAL = 1.0
# The holder reads the reserved task's record when the view lost it (and to learn when it
# started), else at most this often: a deletion the view missed costs a late end, never a
# wrong one, and holding room costs no read a second.
RECORD_READ_INTERVAL = 10.0


@dataclass(frozen=True)
class Held:
    """The reservation this node holds."""

    task_id: str
    priority: int
    since: float
    """Wall clock (s) when it was made."""
    spec: pb.TaskSpec
    group: Group
    """Its queue group, where the queue view holds it while it is queued."""


def never_blocked(task: pb.Task) -> bool:
    """The default `blocked` hook: no task is held back for a reason other than room."""
    return False


def could_hold(node: pb.Node, spec: pb.TaskSpec) -> bool:
    """Whether node, empty, could run spec: its capacity, its labels, taints and
    capabilities (constraints.node_refusal, as the stealer's), not cordoned or draining."""
    return (not node.cordoned and not node.draining
            and spec.cpu_millis <= node.cpu_capacity_millis
            and spec.memory_bytes <= node.memory_capacity_bytes
            and spec.disk_bytes <= node.disk_capacity_bytes
            and (spec.network != "host" or node.allow_host_network)
            and node_refusal(node, spec) is None)


def fits_free(node: pb.Node, spec: pb.TaskSpec) -> bool:
    """Whether node's record shows room for spec now (and it takes work)."""
    return (not node.start_backoff and could_hold(node, spec)
            and node.cpu_allocated_millis + spec.cpu_millis <= node.cpu_capacity_millis
            and node.memory_allocated_bytes + spec.memory_bytes <= node.memory_capacity_bytes)


def choose(task_id: str, spec: pb.TaskSpec, nodes: Iterable[pb.Node]) -> pb.Node | None:
    """The node that reserves for task_id, the same on every node that sees the same
    records: among the nodes that could hold it, the best rendezvous-ranked one whose
    record already holds it (two that both reserved, each before seeing the other, settle
    on one), else the best ranked one that holds no other reservation; None when none."""
    able = {node.id: node for node in nodes if could_hold(node, spec)}
    order = [able[node_id] for node_id in rendezvous.rank(task_id, 0, able)]
    holding = [node for node in order if node.reserved_task == task_id]
    if holding:
        return holding[0]
    free = [node for node in order if not node.reserved_task]
    return free[0] if free else None


def head(queue: QueueView) -> tuple[Group, str] | None:
    """The oldest task (smallest time-ordered id) of the highest priority in the view."""
    if not queue.groups:
        return None
    top = max(priority for priority, _ in queue.groups)
    best: tuple[Group, str] | None = None
    for group, ids in queue.groups.items():
        if group[0] == top:
            for task_id in ids:
                if best is None or task_id < best[1]:
                    best = (group, task_id)
    return best


class Reservations:
    """This node's part in reserving room: whether it holds one, and what its stealer may
    take meanwhile (admitted)."""

    def __init__(self, *, store: Store, state: NodeState,
                 settings: ClusterSettingsView | None = None,
                 blocked: Callable[[pb.Task], bool] = never_blocked) -> None:
        """settings: where reserve-after is read (None: its default); blocked: True for a
        task that cannot start for a reason other than room (its owner at a running quota):
        such a task reserves nothing."""
        self._store = store
        self._state = state
        self._settings = settings
        self._blocked = blocked
        self.held: Held | None = None
        self._queue = QueueView()
        self._nodes: Callable[[], Mapping[str, pb.Node]] = dict
        self._wake: Callable[[], None] = lambda: None
        # The head this node sees, since when (monotonic), and its record once read.
        self._head_id = ""
        self._head_at = 0.0
        self._head_task: pb.Task | None = None
        # When (monotonic) the holder last read the reserved task's record.
        self._read_at = 0.0

    def follow(self, *, queue: QueueView, nodes: Callable[[], Mapping[str, pb.Node]],
               wake: Callable[[], None],
               blocked: Callable[[pb.Task], bool] | None = None) -> None:
        """The stealer's view of the queue and of the live node records; wake: tell the
        stealer to look again (a reservation ended); blocked: replaces the constructor's
        hook (the stealer's running quotas)."""
        self._queue, self._nodes, self._wake = queue, nodes, wake
        if blocked is not None:
            self._blocked = blocked

    @property
    def reserve_after(self) -> float:
        return (self._settings.reserve_after if self._settings is not None
                else DEFAULT_RESERVE_AFTER)

    def admitted(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates the stealer may take: all of them, or while this node holds a
        reservation, the reserved task and those of a higher priority only."""
        held = self.held
        if held is None:
            return candidates
        return [candidate for candidate in candidates
                if candidate.priority > held.priority or candidate.task_id == held.task_id]

    async def run(self) -> NoReturn:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            try:
                await self.check()
            except FilchError as exc:
                log.info("reservation check skipped: %s", exc)

    async def check(self, now: float | None = None) -> None:
        """Reconcile: end the reservation this node holds when its task left the queue,
        another node holds it or this node may no longer run it; else reserve for the
        head of the queue when it starves and this node is the one to hold room. Raises
        what Store raises. now: monotonic (tests)."""
        now = time.monotonic() if now is None else now
        registration = self._state.registration
        if registration is None or self._state.cordoned:
            self._end(None, "this node is cordoned or not registered")
            return
        if self.held is not None:
            await self._keep(registration.node_id, now)
            return
        found = head(self._queue)
        if found is None:
            self._head_id = ""
            return
        group, task_id = found
        if task_id != self._head_id:
            self._head_id, self._head_at, self._head_task = task_id, now, None
        if now - self._head_at < self.reserve_after:
            return
        if self._head_task is None:
            records = await self._store.get_tasks([task_id])
            self._head_task = records[0].task if records else None
        task = self._head_task
        if task is None or task.state != pb.TASK_STATE_PENDING or task.hold != pb.HOLD_NONE:
            # Gone from the queue (taken by a node this one does not hear of): look further.
            self._queue.forget(group, task_id)
            return
        nodes = list(self._nodes().values())
        if self._blocked(task) or any(fits_free(node, task.spec) for node in nodes):
            return
        choice = choose(task_id, task.spec, nodes)
        if choice is None or choice.id != registration.node_id:
            return
        # The record read above may be old by now: read it again before holding back work.
        records = await self._store.get_tasks([task_id])
        if (records and records[0].task.state == pb.TASK_STATE_PENDING
                and records[0].task.hold == pb.HOLD_NONE):
            self._reserve(records[0].task, group, now)
        else:
            self._queue.forget(group, task_id)

    async def _keep(self, node_id: str, now: float) -> None:
        held = self.held
        assert held is not None
        viewed = self._queue.groups.get(held.group)
        if (viewed is None or held.task_id not in viewed
                or now - self._read_at >= RECORD_READ_INTERVAL):
            self._read_at = now
            records = await self._store.get_tasks([held.task_id])
            task = records[0].task if records else None
            if (task is None or task.state != pb.TASK_STATE_PENDING
                    or task.hold != pb.HOLD_NONE):
                self._end(task, "its task left the queue")
                return
        nodes = self._nodes()
        me = nodes.get(node_id)
        if me is not None and not could_hold(me, held.spec):
            self._end(None, "this node may no longer run it")
            return
        choice = choose(held.task_id, held.spec, nodes.values())
        if (choice is not None and choice.id != node_id
                and choice.reserved_task == held.task_id):
            log.info("task %s: node %s holds room for it too and ranks first: "
                     "this node lets go", held.task_id, choice.name)
            self._end(None, f"node {choice.name} holds it")

    def _reserve(self, task: pb.Task, group: Group, now: float) -> None:
        self.held = Held(task.id, task.spec.priority, time.time(), task.spec, group)
        self._read_at = now
        self._state.set_reservation(task.id, task.spec.priority, self.held.since)
        metrics.RESERVATIONS.set(1)
        log.info("task %s (priority %d, %g CPUs) has waited past reserve-after (%gs): "
                 "this node takes no lower work until it fits", task.id, task.spec.priority,
                 task.spec.cpu_millis / 1000, self.reserve_after)

    def _end(self, task: pb.Task | None, why: str) -> None:
        """Let go of the reservation (if any); task: its record now, when it left the queue."""
        held, self.held = self.held, None
        if held is None:
            return
        self._state.set_reservation("", 0, 0.0)
        metrics.RESERVATIONS.set(0)
        if task is not None and task.HasField("started_at"):
            metrics.RESERVATION_WAIT.observe(
                max(0.0, task.started_at.ToNanoseconds() / 1e9 - held.since))
        log.info("reservation for task %s ended: %s", held.task_id, why)
        self._wake()
