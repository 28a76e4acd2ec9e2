"""The resolver against a real etcd: a parent's end releases its children at once (the
event path, with the sweep out of the way), and the sweep decides every kind of hold again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.core.config import Config
from node.etcd.store import Store, WatchEvent
from node.etcd.txn import Move
from node.scheduling import dependencies
from node.scheduling.conditions import DependencyCheck
from node.scheduling.dependencies import ABANDONED_ARRAY_AGE, Resolver
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


def held(hold: int, **fields: object) -> pb.Task:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING, hold=hold,  # type: ignore[arg-type]
                   spec=pb.TaskSpec(command="true"), **fields)  # type: ignore[arg-type]
    task.submitted_at.GetCurrentTime()
    return task


async def create(store: Store, *tasks: pb.Task) -> None:
    assert await store.transition_many([Move(None, task) for task in tasks]) is not None


async def test_a_parents_end_releases_its_child_without_a_sweep(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = Resolver(config=Config(name="n", sweep_interval=3600.0), store=store,
                        check=DependencyCheck(store=store))
    sweeps = 0

    async def no_sweep() -> None:   # the e2e clusters' 1 s sweep would release it anyway
        nonlocal sweeps
        sweeps += 1
    monkeypatch.setattr(resolver, "sweep", no_sweep)
    listed: list[bytes] = []
    real_list_and_watch = dependencies.list_and_watch

    async def noting_list_and_watch(store: Store, prefix: bytes,
                                    relist: Callable[[], Awaitable[None]],
                                    handle: Callable[[WatchEvent], Awaitable[None]]) -> None:
        async def relist_and_note() -> None:
            await relist()
            listed.append(prefix)   # its watch starts before any later write
        await real_list_and_watch(store, prefix, relist_and_note, handle)
    monkeypatch.setattr(dependencies, "list_and_watch", noting_list_and_watch)

    parent = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true"))
    child = held(pb.HOLD_DEPENDENCIES)
    child.spec.after.add(id=parent.id, kind=pb.DEPENDENCY_KIND_SUCCESS)
    await create(store, parent, child)
    running = asyncio.create_task(resolver.run())
    try:
        deadline = time.monotonic() + 10
        while len(listed) < 3:
            assert time.monotonic() < deadline, f"the resolver's watches did not start: {listed}"
            await asyncio.sleep(0.01)
        found = await store.get_task(parent.id)
        assert found is not None
        ended = lifecycle.finished(found.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED)
        assert await store.transition(found, ended) is not None
        deadline = time.monotonic() + 5
        while (released := await store.get_task(child.id)) is not None \
                and released.task.hold != pb.HOLD_NONE:
            assert time.monotonic() < deadline, f"the child is still held: {released.task}"
            await asyncio.sleep(0.02)
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    assert released is not None and released.task.state == pb.TASK_STATE_PENDING
    assert keys.queued(child.id) in await store.list_ids(keys.QUEUED)


async def test_the_sweep_releases_finished_back_offs_and_completed_arrays(store: Store) -> None:
    resolver = Resolver(config=Config(name="n"), store=store, check=DependencyCheck(store=store))
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
    resolver = Resolver(config=Config(name="n"), store=store, check=DependencyCheck(store=store))
    array_id = keys.new_task_id()
    old = held(pb.HOLD_ARRAY, array_id=array_id)
    old.submitted_at.FromSeconds(int(time.time() - ABANDONED_ARRAY_AGE - 60))
    recent = held(pb.HOLD_ARRAY, array_id=keys.new_task_id())
    await create(store, old, recent)
    await resolver.sweep()
    assert await store.get_task(old.id) is None
    assert await store.list_ids(keys.BLOCKED) == [keys.blocked(recent.id)]
