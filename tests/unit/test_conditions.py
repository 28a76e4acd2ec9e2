"""Deciding held tasks: the pure verdicts, and DependencyCheck / retention against a real
etcd (what any node would write)."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.core.errors import InvalidArgument
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned
from node.scheduling.conditions import (
    FAILED,
    MET,
    WAITING,
    Condition,
    DependencyCheck,
    condition_of,
    member_condition,
    prepare,
    verdict,
)
from tests.unit.etcd_fixture import require_etcd

pytestmark = pytest.mark.timeout(60)

SUCCESS, ANY = pb.DEPENDENCY_KIND_SUCCESS, pb.DEPENDENCY_KIND_ANY


def task(state: int = pb.TASK_STATE_PENDING, reason: int = 0, exit_code: int = 0,
         task_id: str = "") -> pb.Task:
    return pb.Task(id=task_id or keys.new_task_id(), state=state,  # type: ignore[arg-type]
                   reason=reason, exit_code=exit_code)  # type: ignore[arg-type]


def ended(exit_code: int = 0, reason: int = pb.REASON_EXITED,
          state: int = pb.TASK_STATE_COMPLETE) -> pb.Task:
    return task(state, reason, exit_code)


@pytest.mark.parametrize(("parent", "kind", "expected"), [
    (ended(0), SUCCESS, MET),
    (ended(1), SUCCESS, FAILED),
    (ended(0, pb.REASON_TIMED_OUT), SUCCESS, FAILED),
    (ended(0, pb.REASON_CANCELED, pb.TASK_STATE_CANCELED), SUCCESS, FAILED),
    (ended(1), ANY, MET),
    (ended(0, pb.REASON_DEPENDENCY_FAILED, pb.TASK_STATE_CANCELED), ANY, MET),
    (task(pb.TASK_STATE_RUNNING), SUCCESS, WAITING),
    (task(pb.TASK_STATE_PENDING), ANY, WAITING),
    (None, ANY, FAILED),
])
def test_condition_of_a_parent(parent: pb.Task | None, kind: int, expected: str) -> None:
    dependency = pb.Dependency(id=parent.id if parent else keys.new_task_id(),
                               kind=kind)  # type: ignore[arg-type]
    assert condition_of(dependency, parent).state == expected


def test_failed_condition_says_how_the_parent_ended() -> None:
    parent = ended(3)
    condition = condition_of(pb.Dependency(id=parent.id, kind=SUCCESS), parent)
    assert condition.text == f"task {parent.id} ended COMPLETE with exit code 3"
    oom = ended(137, pb.REASON_OOM_KILLED)
    assert "ended COMPLETE (OOM_KILLED)" in condition_of(
        pb.Dependency(id=oom.id, kind=SUCCESS), oom).text


def test_verdict_fails_first_then_waits_then_meets() -> None:
    waiting = [Condition(WAITING, f"t{n} (RUNNING)") for n in range(7)]
    assert verdict([Condition(MET), *waiting, Condition(FAILED, "task x ended")]) == (
        FAILED, "dependency failed: task x ended")
    state, message = verdict([Condition(MET), *waiting])
    assert state == WAITING
    assert message == ("waiting for 7 dependencies: t0 (RUNNING), t1 (RUNNING), t2 (RUNNING), "
                       "t3 (RUNNING), t4 (RUNNING), and 2 more")
    assert verdict([Condition(WAITING, "a (PENDING)")]) == (
        WAITING, "waiting for 1 dependency: a (PENDING)")
    assert verdict([Condition(MET), Condition(MET)]) == (MET, "")
    assert verdict([]) == (MET, "")


def test_member_condition_names_index_and_end() -> None:
    array_id = keys.new_task_id()
    member = ended(2)
    member.array_index = 41
    condition = member_condition(array_id, 0, member)
    assert condition.state == FAILED
    assert f"(index 41) of array {array_id} ended COMPLETE with exit code 2" in condition.text
    assert member_condition(array_id, 5, None).text.startswith(
        f"task {keys.array_task_id(array_id, 5)} of array")


# -- against etcd -----------------------------------------------------------------------


async def write(store: Store, new: pb.Task, old: Versioned | None = None,
                requires: tuple[bytes, ...] = ()) -> Versioned:
    revision = await store.transition_many([Move(old, new, requires=requires)])
    assert revision is not None
    return Versioned(new, revision)


def child_of(*parents: str, kind: int = SUCCESS) -> pb.Task:
    child = task()
    child.hold = pb.HOLD_DEPENDENCIES
    child.spec.command = "true"
    child.spec.after.extend(pb.Dependency(id=parent, kind=kind)  # type: ignore[arg-type]
                            for parent in parents)
    return child


async def finish(store: Store, found: Versioned, exit_code: int) -> Versioned:
    return await write(store, lifecycle.finished(found.task, pb.TASK_STATE_COMPLETE,
                                                 pb.REASON_EXITED, exit_code=exit_code), found)


async def test_settle_writes_the_message_once_then_releases(store: Store) -> None:
    require_etcd()
    parent = await write(store, task())
    child = await write(store, child_of(parent.task.id))
    check = DependencyCheck(store=store)
    waiting = await check.settle(child)
    assert waiting is not None
    assert waiting.task.message == f"waiting for 1 dependency: {parent.task.id} (PENDING)"
    assert await check.settle(waiting) is None      # unchanged message: no write
    await finish(store, parent, 0)
    released = await check.settle(waiting)
    assert released is not None and released.task.hold == pb.HOLD_NONE
    assert await store.list_ids(keys.dependents_of(parent.task.id)) == []
    assert await store.list_ids(keys.QUEUED) == [keys.queued(child.task.id)]
    assert await check.settle(waiting) is None      # stale read: the CAS refuses


async def test_settle_fails_a_child_of_a_failed_parent(store: Store) -> None:
    require_etcd()
    parent = await finish(store, await write(store, task()), 1)
    child = await write(store, child_of(parent.task.id))
    settled = await DependencyCheck(store=store).settle(child)
    assert settled is not None
    assert settled.task.state == pb.TASK_STATE_CANCELED
    assert settled.task.reason == pb.REASON_DEPENDENCY_FAILED
    assert f"task {parent.task.id} ended COMPLETE with exit code 1" in settled.task.message


async def test_array_condition_reads_on_from_the_first_unfinished(store: Store) -> None:
    require_etcd()
    array_id = keys.new_task_id()
    members = []
    for position in range(3):
        member = task(task_id=keys.array_task_id(array_id, position))
        member.array_id, member.array_index = array_id, position
        members.append(await write(store, member))
    assert await store.create_array(pb.Array(id=array_id, count=3))
    check = DependencyCheck(store=store)
    assert (await check.array_condition(array_id)).state == WAITING
    await finish(store, members[0], 0)
    await finish(store, members[2], 0)
    assert (await check.array_condition(array_id)).state == WAITING
    await finish(store, members[1], 0)
    assert (await check.array_condition(array_id)).state == MET


async def test_prepare_names_an_unknown_parent(store: Store) -> None:
    require_etcd()
    known = await write(store, task())
    unknown = keys.new_task_id()
    spec = pb.TaskSpec(command="true", after=[pb.Dependency(id=known.task.id, kind=SUCCESS),
                                              pb.Dependency(id=unknown, kind=SUCCESS)])
    with pytest.raises(InvalidArgument, match=f"spec.after: no task {unknown}"):
        await prepare(store, DependencyCheck(store=store), spec)
    spec = pb.TaskSpec(command="true", after=[pb.Dependency(
        id=unknown, kind=pb.DEPENDENCY_KIND_ARRAY)])
    with pytest.raises(InvalidArgument, match=f"no array {unknown}"):
        await prepare(store, DependencyCheck(store=store), spec)


async def test_retention_waits_while_a_task_depends_on_the_parent(store: Store) -> None:
    require_etcd()
    parent = await finish(store, await write(store, task()), 0)
    child = await write(store, child_of(parent.task.id))
    status = await store.list_ids(keys.COMPLETE)
    assert await store.delete_finished(status) == 0
    await DependencyCheck(store=store).settle(child)
    assert await store.delete_finished(status) == 1
    assert await store.get_task(parent.task.id) is None
