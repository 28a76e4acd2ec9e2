"""One timer releases every held retry of a node on time, against a real etcd."""

from __future__ import annotations

import asyncio
import time

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.limits import MAX_BATCH
from node.etcd.store import Store
from node.etcd.txn import Move
from node.running.retry_timer import RetryTimer
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


def held_retry(not_before: float, retries_used: int = 1) -> pb.Task:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING, hold=pb.HOLD_RETRY,
                   retries_used=retries_used, spec=pb.TaskSpec(command="true"))
    task.submitted_at.GetCurrentTime()
    task.not_before.FromNanoseconds(int(not_before * 1e9))
    return task


async def test_500_held_retries_are_one_asyncio_task_and_are_released_on_time(
        store: Store) -> None:
    tasks = [held_retry(0.0) for _ in range(500)]
    for begin in range(0, len(tasks), MAX_BATCH):
        assert await store.transition_many(
            [Move(None, task) for task in tasks[begin:begin + MAX_BATCH]]) is not None
    # Due 2 s to 2.8 s from now (set once they are written: a loaded machine writes slowly).
    start = time.time()
    for index, task in enumerate(tasks):
        task.not_before.FromNanoseconds(int((start + 2.0 + (index % 5) * 0.2) * 1e9))
    timer = RetryTimer(store=store)
    before = len(asyncio.all_tasks())
    loop = asyncio.create_task(timer.run())
    try:
        assert all(timer.hold(task) for task in tasks)
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == before + 1     # the timer, nothing per retry
        assert len(timer) == 500
        # None is released before its not_before ...
        await asyncio.sleep(max(0.0, start + 1.5 - time.time()))
        assert await store.count(keys.QUEUED) == 0
        # ... and all of them soon after the last one's (2.8 s), not a sweep later.
        for _ in range(100):                              # 10 s at most
            if await store.count(keys.QUEUED) == 500:
                break
            await asyncio.sleep(0.1)
        released_after = time.time() - start
        assert await store.count(keys.QUEUED) == 500
        assert await store.count(keys.BLOCKED) == 0
        assert released_after < 8.0, released_after
        assert len(timer) == 0
    finally:
        loop.cancel()


async def test_a_full_timer_refuses_and_a_moved_retry_is_left_alone(store: Store) -> None:
    now = time.time()
    moved = held_retry(now - 1, retries_used=1)
    stale = pb.Task()
    stale.CopyFrom(moved)
    stale.retries_used = 0          # held for an earlier retry: someone moved it since
    assert await store.transition_many([Move(None, moved)]) is not None
    timer = RetryTimer(store=store, bound=1)
    assert timer.hold(stale)
    assert not timer.hold(held_retry(now))   # past the bound: the resolver sweep's
    loop = asyncio.create_task(timer.run())
    try:
        for _ in range(100):                              # 5 s at most
            if not len(timer):
                break
            await asyncio.sleep(0.05)
        assert len(timer) == 0
        assert await store.count(keys.QUEUED) == 0     # not this node's to release
    finally:
        loop.cancel()
