"""The resolver's sweep against a real etcd: every kind of hold is decided again."""

from __future__ import annotations

import time

import pytest

from node import keys
from node._gen.filch.v1 import filch_pb2 as pb
from node.conditions import DependencyCheck
from node.config import Config
from node.dependencies import ABANDONED_ARRAY_AGE, Resolver
from node.store import Store
from node.txn import Move
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
