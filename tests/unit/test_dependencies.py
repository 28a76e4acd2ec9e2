"""The resolver against a real etcd: a parent's end is marked by its writer and releases its
children in one pass (the sweep out of the way), and the sweep decides every kind of hold
again and marks what a dead writer left unmarked."""

from __future__ import annotations

import asyncio
import time

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.core.config import Config
from node.etcd.store import Store
from node.etcd.txn import Move
from node.scheduling.conditions import DependencyCheck
from node.scheduling.dependencies import ABANDONED_ARRAY_AGE, Resolver
from node.scheduling.node_state import NodeState, Registration
from tests.unit.etcd_fixture import etcdctl, require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


def held(hold: int, **fields: object) -> pb.Task:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING, hold=hold,  # type: ignore[arg-type]
                   spec=pb.TaskSpec(command="true"), **fields)  # type: ignore[arg-type]
    task.submitted_at.GetCurrentTime()
    return task


async def create(store: Store, *tasks: pb.Task) -> None:
    assert await store.transition_many([Move(None, task) for task in tasks]) is not None


async def registered(store: Store, config: Config) -> NodeState:
    state = NodeState.for_config(config)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(30))
    return state


async def resolver_of(store: Store, config: Config) -> Resolver:
    return Resolver(config=config, store=store, check=DependencyCheck(store=store),
                    state=await registered(store, config))


async def end(store: Store, task_id: str, exit_code: int = 0) -> None:
    found = await store.get_task(task_id)
    assert found is not None
    ended = lifecycle.finished(found.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED)
    ended.exit_code = exit_code
    assert await store.transition(found, ended) is not None


async def test_a_parents_end_releases_its_child_without_a_sweep(store: Store) -> None:
    """The end's writer marks the parent (it has a dependent); one release pass, no sweep."""
    resolver = await resolver_of(store, Config(name="n", sweep_interval=3600.0))
    parent = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true"))
    lonely = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true"))
    child = held(pb.HOLD_DEPENDENCIES)
    child.spec.after.add(id=parent.id, kind=pb.DEPENDENCY_KIND_SUCCESS)
    await create(store, parent, lonely, child)
    assert await store.exists(keys.has_dependents(parent.id))
    await end(store, lonely.id)
    assert await store.list_ids(keys.RELEASES) == [], "nobody waits for it: no mark"
    running = asyncio.create_task(resolver.run())
    try:
        await end(store, parent.id)
        deadline = time.monotonic() + 5
        while (released := await store.get_task(child.id)) is not None \
                and released.task.hold != pb.HOLD_NONE:
            assert time.monotonic() < deadline, f"the child is still held: {released.task}"
            await asyncio.sleep(0.02)
        while await store.list_ids(keys.RELEASES) or await store.list_ids(keys.DEPENDENTS) \
                or await store.list_ids(keys.LOCKS):
            assert time.monotonic() < deadline, "the mark, the flag or the lock stayed"
            await asyncio.sleep(0.02)
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert released is not None and released.task.state == pb.TASK_STATE_PENDING
    assert keys.queued(child.id) in await store.list_ids(keys.QUEUED)


async def test_an_array_is_marked_once_its_last_member_ends_or_one_fails(store: Store) -> None:
    array_id = keys.new_task_id()
    members = [pb.Task(id=keys.array_task_id(array_id, at), state=pb.TASK_STATE_PENDING,
                       array_id=array_id, spec=pb.TaskSpec(command="true")) for at in range(3)]
    child = held(pb.HOLD_DEPENDENCIES)
    child.spec.after.add(id=array_id, kind=pb.DEPENDENCY_KIND_ARRAY)
    await create(store, *members, child)
    assert await store.create_array(pb.Array(id=array_id, count=3))
    assert len(await store.list_ids(keys.open_members(array_id))) == 3
    await end(store, members[0].id)
    await end(store, members[1].id)
    assert await store.list_ids(keys.RELEASES) == []
    await end(store, members[2].id, exit_code=3)
    assert await store.release_mark(array_id) is not None
    assert await store.list_ids(keys.open_members(array_id)) == []
    resolver = await resolver_of(store, Config(name="n"))
    assert await resolver.release(array_id)
    failed = await store.get_task(child.id)
    assert failed is not None and failed.task.reason == pb.REASON_DEPENDENCY_FAILED
    assert f"task {members[2].id} (index 0) of array {array_id} ended COMPLETE with exit " \
        "code 3" in failed.task.message
    assert await store.list_ids(keys.RELEASES) == [] and await store.list_ids(keys.DEPENDENTS) == []


async def test_the_sweep_marks_a_parent_whose_writer_died_before_the_mark(
        store: Store, etcd: str) -> None:
    parent = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true"))
    child = held(pb.HOLD_DEPENDENCIES)
    child.spec.after.add(id=parent.id, kind=pb.DEPENDENCY_KIND_SUCCESS)
    await create(store, parent, child)
    await end(store, parent.id)
    etcdctl(etcd, "del", keys.RELEASES.decode(), "--prefix")   # as if its writer died first
    resolver = await resolver_of(store, Config(name="n"))
    await resolver.mark_missed()
    assert await store.release_mark(parent.id) is not None
    assert await resolver.release(parent.id)
    released = await store.get_task(child.id)
    assert released is not None and released.task.hold == pb.HOLD_NONE


async def test_the_sweep_releases_finished_back_offs_and_completed_arrays(store: Store) -> None:
    resolver = await resolver_of(store, Config(name="n"))
    due = held(pb.HOLD_RETRY)
    due.not_before.FromSeconds(int(time.time()) - 1)
    later = held(pb.HOLD_RETRY)
    later.not_before.FromSeconds(int(time.time()) + 3600)
    array_id = keys.new_task_id()
    member = held(pb.HOLD_ARRAY, array_id=array_id)
    member.id = keys.array_task_id(array_id, 0)
    await create(store, due, later, member)
    await resolver.sweep()
    queued = {keys.last_segment(key) for key in await store.list_ids(keys.QUEUED)}
    assert queued == {due.id}
    assert await store.create_array(pb.Array(id=array_id, count=1))
    await resolver.sweep()
    queued = {keys.last_segment(key) for key in await store.list_ids(keys.QUEUED)}
    assert queued == {due.id, member.id}


async def test_the_sweep_deletes_the_held_tasks_of_an_abandoned_array(store: Store) -> None:
    resolver = await resolver_of(store, Config(name="n"))
    array_id = keys.new_task_id()
    old = held(pb.HOLD_ARRAY, array_id=array_id)
    old.submitted_at.FromSeconds(int(time.time() - ABANDONED_ARRAY_AGE - 60))
    recent = held(pb.HOLD_ARRAY, array_id=keys.new_task_id())
    await create(store, old, recent)
    await resolver.sweep()
    assert await store.get_task(old.id) is None
    assert await store.list_ids(keys.BLOCKED) == [keys.blocked(recent.id)]


async def test_a_child_waiting_for_two_parents_is_released_by_the_second_pass(
        store: Store) -> None:
    first, second = (pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                             spec=pb.TaskSpec(command="true")) for _ in range(2))
    child = held(pb.HOLD_DEPENDENCIES)
    child.spec.after.add(id=first.id, kind=pb.DEPENDENCY_KIND_SUCCESS)
    child.spec.after.add(id=second.id, kind=pb.DEPENDENCY_KIND_SUCCESS)
    await create(store, first, second, child)
    resolver = await resolver_of(store, Config(name="n"))
    await end(store, first.id)
    assert await resolver.release(first.id)
    waiting = await store.get_task(child.id)
    assert waiting is not None and waiting.task.hold == pb.HOLD_DEPENDENCIES
    assert waiting.task.message == f"waiting for 1 dependency: {second.id} (PENDING)"
    # The first parent is done with: the sweep does not mark it again and again.
    await resolver.mark_missed()
    assert await store.list_ids(keys.RELEASES) == []
    await end(store, second.id)
    assert await resolver.release(second.id)
    released = await store.get_task(child.id)
    assert released is not None and released.task.hold == pb.HOLD_NONE
    assert await store.list_ids(keys.DEPENDENTS) == [keys.has_dependents(first.id)]
    await resolver.mark_missed()        # no dependent of the first is left: its flag goes
    assert await store.list_ids(keys.DEPENDENTS) == []


async def test_a_finished_release_leaves_no_lock_traffic_between_nodes(store: Store) -> None:
    """Soak seed 1 (issue 22): once a parent's release ended, every node took and gave back
    its /lock/release/ key forever (a lock's deletion re-marked the parent on every node,
    whose pass found no mark and unlocked, waking them all again). Two resolvers (two
    nodes) release one parent; then etcd must stay still."""
    config = Config(name="n", sweep_interval=3600.0)
    first, second = await resolver_of(store, config), await resolver_of(store, config)
    parent = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true"))
    child = held(pb.HOLD_DEPENDENCIES)
    child.spec.after.add(id=parent.id, kind=pb.DEPENDENCY_KIND_SUCCESS)
    await create(store, parent, child)
    running = [asyncio.create_task(resolver.run()) for resolver in (first, second)]
    try:
        await end(store, parent.id)
        deadline = time.monotonic() + 10
        while ((released := await store.get_task(child.id)) is not None \
                and released.task.hold != pb.HOLD_NONE) or await store.list_ids(keys.RELEASES):
            assert time.monotonic() < deadline, "the child was not released"
            await asyncio.sleep(0.02)
        # Let the last lock deletions reach both watches, then watch etcd stand still.
        await asyncio.sleep(0.5)
        idle_from = await store.current_revision()
        await asyncio.sleep(1.5)
        writes = await store.current_revision() - idle_from
    finally:
        for task in running:
            task.cancel()
        for task in running:
            with pytest.raises(asyncio.CancelledError):
                await task
    assert writes == 0, f"{writes} etcd writes in 1.5 s after the release ended"
