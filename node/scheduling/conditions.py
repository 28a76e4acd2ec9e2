"""Whether a held task's dependencies (spec.after) are met, failed for good, or still
pending, and the one write that follows from it. Any node may decide: the write is a
compare-and-swap on the child's record, so nodes deciding together is harmless.

The pure part (condition_of, verdict) decides from records; DependencyCheck reads them
and writes the outcome (released, CANCELED DEPENDENCY_FAILED, or a new message).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.errors import InvalidArgument
from node.core.limits import READ_BATCH_RECORDS
from node.core.states import FINISHED
from node.etcd.store import Store
from node.etcd.txn import Versioned

T = TypeVar("T")

MET = "met"
WAITING = "waiting"
FAILED = "failed"

# A waiting message lists this many dependencies, then "and N more": a message is part of
# the record, and a person reads the first few anyway.
LISTED_DEPENDENCIES = 5

# Arrays whose progress one node remembers (an array's record and finished tasks never
# change, so what was seen stays true); beyond it the memory starts over.
REMEMBERED_ARRAYS = 10_000


@dataclass(frozen=True)
class Condition:
    """One dependency's state: MET, WAITING or FAILED, and how to say it."""

    state: str
    text: str = ""


def state_name(state: int) -> str:
    return pb.TaskState.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]


def ended_ok(task: pb.Task) -> bool:
    """Ended COMPLETE, by itself, with exit code 0."""
    return (task.state == pb.TASK_STATE_COMPLETE and task.reason == pb.REASON_EXITED
            and task.exit_code == 0)


def how_it_ended(task: pb.Task) -> str:
    if task.state == pb.TASK_STATE_COMPLETE and task.reason == pb.REASON_EXITED:
        return f"COMPLETE with exit code {task.exit_code}"
    reason = pb.Reason.Name(task.reason).removeprefix("REASON_")
    return f"{state_name(task.state)} ({reason})"


def condition_of(dependency: pb.Dependency, parent: pb.Task | None) -> Condition:
    """The condition of a SUCCESS or ANY dependency on this parent record (None: gone)."""
    if parent is None:
        return Condition(FAILED, f"task {dependency.id} no longer exists")
    if parent.state not in FINISHED:
        return Condition(WAITING, f"{parent.id} ({state_name(parent.state)})")
    if dependency.kind == pb.DEPENDENCY_KIND_ANY or ended_ok(parent):
        return Condition(MET)
    return Condition(FAILED, f"task {parent.id} ended {how_it_ended(parent)}")


def member_condition(array_id: str, position: int, member: pb.Task | None) -> Condition:
    """The condition one task of an array (at this 0-based position) puts on an
    --after-array dependency."""
    if member is None:
        return Condition(FAILED, f"task {keys.array_task_id(array_id, position)} of array "
                                 f"{array_id} no longer exists")
    if member.state not in FINISHED:
        return Condition(WAITING)
    if ended_ok(member):
        return Condition(MET)
    return Condition(FAILED, f"task {member.id} (index {member.array_index}) of array "
                             f"{array_id} ended {how_it_ended(member)}")


def verdict(conditions: Sequence[Condition]) -> tuple[str, str]:
    """(MET | WAITING | FAILED, the task's message) for all of a task's conditions."""
    for condition in conditions:
        if condition.state == FAILED:
            return FAILED, f"dependency failed: {condition.text}"
    waiting = [condition.text for condition in conditions if condition.state == WAITING]
    if not waiting:
        return MET, ""
    noun = "dependency" if len(waiting) == 1 else "dependencies"
    listed = ", ".join(waiting[:LISTED_DEPENDENCIES])
    more = len(waiting) - LISTED_DEPENDENCIES
    return WAITING, (f"waiting for {len(waiting)} {noun}: {listed}"
                     + (f", and {more} more" if more > 0 else ""))


def unique(after: Sequence[pb.Dependency]) -> list[pb.Dependency]:
    """The dependencies with duplicates (same id and kind) collapsed, in order."""
    seen: set[tuple[str, int]] = set()
    kept = []
    for dependency in after:
        if (dependency.id, dependency.kind) not in seen:
            seen.add((dependency.id, dependency.kind))
            kept.append(dependency)
    return kept


class DependencyCheck:
    """Reads what a held task waits for and writes what follows. Remembers how far each
    array is known to have succeeded (finished tasks never change), so that an array's
    tasks are read about once per node, not once per event."""

    def __init__(self, *, store: Store) -> None:
        self._store = store
        self._counts: dict[str, int] = {}
        self._frontier: dict[str, int] = {}
        self._failed: dict[str, str] = {}

    def array_failed(self, array_id: str, member: pb.Task) -> None:
        """Note that a task of this array ended otherwise than COMPLETE exit 0."""
        condition = member_condition(array_id, 0, member)
        if condition.state == FAILED:
            self._remember(self._failed, array_id, condition.text)

    async def conditions(self, task: pb.Task, parents: MutableMapping[str, pb.Task | None],
                         arrays: MutableMapping[str, Condition] | None = None
                         ) -> list[Condition]:
        """The condition of each of task's dependencies. parents: records already read
        (this call adds what it reads), shared by the tasks of one pass; arrays: likewise,
        the arrays' conditions."""
        wanted = [dependency.id for dependency in task.spec.after
                  if dependency.kind != pb.DEPENDENCY_KIND_ARRAY and dependency.id not in parents]
        if wanted:
            found = {record.task.id: record.task for record in
                     await self._store.get_tasks(wanted)}
            for parent_id in wanted:
                parents[parent_id] = found.get(parent_id)
        result = []
        for dependency in unique(task.spec.after):
            if dependency.kind == pb.DEPENDENCY_KIND_ARRAY:
                if arrays is None:
                    result.append(await self.array_condition(dependency.id))
                    continue
                if dependency.id not in arrays:
                    arrays[dependency.id] = await self.array_condition(dependency.id)
                result.append(arrays[dependency.id])
            else:
                result.append(condition_of(dependency, parents[dependency.id]))
        return result

    async def array_condition(self, array_id: str) -> Condition:
        """MET once every task of the array ended COMPLETE with exit code 0. While a task
        of it has not ended (one /open/ key, a range of limit 1) it is WAITING, unless a
        failure is known (release marks name failed members: array_failed). Once none is
        open, reads from the first task not yet known to have succeeded, in batches (once
        per node: what was seen is remembered)."""
        if array_id in self._failed:
            return Condition(FAILED, self._failed[array_id])
        count = self._counts.get(array_id)
        if count is None:
            array = await self._store.get_array(array_id)
            if array is None:
                return Condition(FAILED, f"array {array_id} no longer exists")
            count = array.count
            self._remember(self._counts, array_id, count)
        if await self._store.list_ids(keys.open_members(array_id), limit=1):
            return Condition(WAITING, f"{array_id} (array of {count} tasks)")
        position = self._frontier.get(array_id, 0)
        step = READ_BATCH_RECORDS     # none open: every task ended, read them in batches
        while position < count:
            ids = [keys.array_task_id(array_id, at)
                   for at in range(position, min(count, position + step))]
            found = {record.task.id: record.task for record in await self._store.get_tasks(ids)}
            for task_id in ids:
                condition = member_condition(array_id, position, found.get(task_id))
                if condition.state == FAILED:
                    self._remember(self._failed, array_id, condition.text)
                    return condition
                if condition.state == WAITING:
                    self._remember(self._frontier, array_id, position)
                    return Condition(WAITING, f"{array_id} (array of {count} tasks)")
                position += 1
        self._remember(self._frontier, array_id, position)
        return Condition(MET)

    @staticmethod
    def _remember(memory: dict[str, T], key: str, value: T) -> None:
        """memory[key] = value, starting over past REMEMBERED_ARRAYS keys (bounded)."""
        if len(memory) >= REMEMBERED_ARRAYS and key not in memory:
            memory.clear()
        memory[key] = value

    async def decide(self, task: pb.Task, parents: MutableMapping[str, pb.Task | None],
                     arrays: MutableMapping[str, Condition] | None = None
                     ) -> tuple[str, pb.Task | None]:
        """(MET | WAITING | FAILED, the record to write: released, CANCELED
        DEPENDENCY_FAILED, or a new message; None when nothing changes) for a
        HOLD_DEPENDENCIES task."""
        state, message = verdict(await self.conditions(task, parents, arrays))
        if state == MET:
            return state, lifecycle.released(task)
        if state == FAILED:
            return state, failed(task, message)
        if task.message == message:
            return state, None
        new = pb.Task()
        new.CopyFrom(task)
        new.message = message
        return state, new

    async def settle(self, found: Versioned,
                     parents: MutableMapping[str, pb.Task | None] | None = None,
                     arrays: MutableMapping[str, Condition] | None = None
                     ) -> Versioned | None:
        """Decide a HOLD_DEPENDENCIES task and write the outcome: queued when every
        dependency is met, CANCELED DEPENDENCY_FAILED when one can no longer be, else its
        message naming what is left (written only when it changed). Returns the new
        record, or None when nothing was written (no change, not held for dependencies,
        or another node moved it first). Raises StoreUnavailable / StoreFull."""
        task = found.task
        if task.state != pb.TASK_STATE_PENDING or task.hold != pb.HOLD_DEPENDENCIES:
            return None
        state, new = await self.decide(task, {} if parents is None else parents, arrays)
        if new is None:
            return None
        revision = await self._store.transition(found, new)
        if revision is None:
            return None
        if state == FAILED:
            metrics.DEPENDENCY_FAILURES.inc()
        elif state == MET:
            metrics.DEPENDENCY_RELEASES.labels("dependencies").inc()
        return Versioned(new, revision)


def failed(task: pb.Task, message: str) -> pb.Task:
    """A task whose dependency can no longer be met: CANCELED, DEPENDENCY_FAILED."""
    return lifecycle.finished(task, pb.TASK_STATE_CANCELED, pb.REASON_DEPENDENCY_FAILED,
                              message=message)


def waiting_for_array(task: pb.Task) -> pb.Task:
    """A task of an array whose submission completed: out of HOLD_ARRAY, into the queue,
    or on to HOLD_DEPENDENCIES when it has dependencies (its /dep keys stay)."""
    new = lifecycle.released(task)
    if task.spec.after:
        new.hold = pb.HOLD_DEPENDENCIES
        new.message = "waiting for its dependencies"
    return new


@dataclass(frozen=True)
class Prepared:
    """What a submit found about its dependencies before writing anything."""

    state: str
    """MET (or none at all), WAITING or FAILED."""
    message: str
    requires: tuple[bytes, ...]
    """The parents' record keys: they must still exist when the task is written."""


async def prepare(store: Store, check: DependencyCheck, spec: pb.TaskSpec) -> Prepared:
    """Read every parent of spec.after. Raises InvalidArgument naming the first unknown
    one (`spec.after: no task <id>` / `no array <id>`), StoreUnavailable."""
    after = unique(spec.after)
    if not after:
        return Prepared(MET, "", ())
    task_ids = [dependency.id for dependency in after
                if dependency.kind != pb.DEPENDENCY_KIND_ARRAY]
    found: dict[str, pb.Task | None] = dict.fromkeys(task_ids)
    for record in await store.get_tasks(task_ids):
        found[record.task.id] = record.task
    requires = []
    for dependency in after:
        if dependency.kind == pb.DEPENDENCY_KIND_ARRAY:
            if await store.get_array(dependency.id) is None:
                raise InvalidArgument("spec.after", f"no array {dependency.id} (an array "
                                      "exists once its submission completed)")
            requires.append(keys.array(dependency.id))
        else:
            if found[dependency.id] is None:
                raise InvalidArgument("spec.after", f"no task {dependency.id}")
            requires.append(keys.task(dependency.id))
    state, message = verdict(await check.conditions(pb.Task(spec=spec), found))
    return Prepared(state, message, tuple(dict.fromkeys(requires)))
