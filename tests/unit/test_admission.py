"""PendingLimit against a real etcd: exact at one node, counted from etcd, cheap."""

from __future__ import annotations

import asyncio

import pytest

from node import config, keys, validation
from node._gen.filch.v1 import filch_pb2 as pb
from node.admission import PendingLimit
from node.errors import InvalidArgument, Overloaded
from node.service import TaskService
from node.store import Store
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


class Clock:
    """A clock the test moves by hand, so the count's time-to-live is exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def spec() -> pb.TaskSpec:
    return validation.spec(pb.TaskSpec(command="true"))


async def test_a_concurrent_flood_stops_exactly_at_the_limit(store: Store) -> None:
    service = TaskService(store, max_pending=5)
    outcomes = await asyncio.gather(*(service.submit(spec()) for _ in range(12)),
                                    return_exceptions=True)
    refused = [outcome for outcome in outcomes if isinstance(outcome, Overloaded)]
    assert len(refused) == 7
    assert "cluster has 5 pending tasks (limit 5, --max-pending); wait or raise it" in str(
        refused[0])
    assert await store.count(keys.QUEUED) == 5


async def test_the_count_comes_from_etcd_once_per_interval(store: Store) -> None:
    clock = Clock()
    limit = PendingLimit(store, 2, ttl=1.0, clock=clock)
    service = TaskService(store)
    # Two tasks queued by "another node": seen at the first count.
    for _ in range(2):
        await service.submit(spec())
    with pytest.raises(Overloaded):
        async with limit.admit():
            pass
    # One leaves the queue; until the count is stale this node still believes 2.
    task = (await service.list_tasks(pb.TASK_STATE_PENDING, 1, ""))[0][0]
    await service.cancel(task.id)
    with pytest.raises(Overloaded):
        async with limit.admit():
            pass
    clock.now += 1.0
    async with limit.admit() as created:
        created()
    # Its own admission counts at once, without another read.
    with pytest.raises(Overloaded):
        async with limit.admit():
            pass


async def test_a_failed_or_cancelled_admission_gives_its_room_back(store: Store) -> None:
    limit = PendingLimit(store, 1, clock=Clock())
    with pytest.raises(RuntimeError):
        async with limit.admit():
            raise RuntimeError("the write failed")
    async with limit.admit():
        pass        # not created: no room used
    async with limit.admit() as created:
        created()
    with pytest.raises(Overloaded):
        async with limit.admit():
            pass


def test_the_flags_are_checked() -> None:
    for name in ("max_pending", "max_log_streams"):
        with pytest.raises(InvalidArgument) as error:
            config.load({name: 0}, environ={})
        assert error.value.field == name
    loaded = config.load({"max_pending": "50", "max_log_streams": "7"}, environ={})
    assert (loaded.max_pending, loaded.max_log_streams) == (50, 7)


async def test_a_retried_submit_that_landed_is_answered_at_the_limit(store: Store) -> None:
    service = TaskService(store, max_pending=1)
    first, created = await service.submit(spec(), "retry-me")
    assert created
    again, created = await service.submit(spec(), "retry-me")
    assert (again.id, created) == (first.id, False)
    with pytest.raises(Overloaded):
        await service.submit(spec(), "a-new-one")
