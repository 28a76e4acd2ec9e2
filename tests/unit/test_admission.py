"""PendingLimit against a real etcd: exact at one node, counted from etcd, cheap; the byte
budget: estimated from real serialized records, refused before anything is written."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import config, keys, limits, validation
from node.core.errors import InvalidArgument, Overloaded
from node.etcd.store import MemberStatus, Store
from node.etcd.txn import Move, written_bytes
from node.faces.service import TaskService
from node.scheduling.admission import ByteBudget, PendingLimit
from node.scheduling.arrays import footprint
from node.scheduling.conditions import MET, DependencyCheck, Prepared
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
    service = TaskService(store=store, check=DependencyCheck(store=store), max_pending=5)
    outcomes = await asyncio.gather(*(service.submit(spec()) for _ in range(12)),
                                    return_exceptions=True)
    refused = [outcome for outcome in outcomes if isinstance(outcome, Overloaded)]
    assert len(refused) == 7
    assert "cluster has 5 pending tasks (limit 5, --max-pending); wait or raise it" in str(
        refused[0])
    assert await store.count(keys.QUEUED) == 5


async def test_the_count_comes_from_etcd_once_per_interval(store: Store) -> None:
    clock = Clock()
    limit = PendingLimit(store=store, limit=2, ttl=1.0, clock=clock)
    service = TaskService(store=store, check=DependencyCheck(store=store))
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
    limit = PendingLimit(store=store, limit=1, clock=Clock())
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
    service = TaskService(store=store, check=DependencyCheck(store=store), max_pending=1)
    first, created = await service.submit(spec(), "retry-me")
    assert created
    again, created = await service.submit(spec(), "retry-me")
    assert (again.id, created) == (first.id, False)
    with pytest.raises(Overloaded):
        await service.submit(spec(), "a-new-one")


# -- the byte budget (--submit-budget) -------------------------------------------------------


def big_spec(size: int, **fields: object) -> pb.TaskSpec:
    return validation.spec(pb.TaskSpec(command="true", args=["x" * size], **fields))


def test_a_single_submit_is_estimated_from_its_serialized_record() -> None:
    task = pb.Task(id=keys.new_task_id(), spec=big_spec(100_000), state=pb.TASK_STATE_PENDING)
    size = written_bytes(Move(None, task))
    # The record once, its key, the queued and queue keys, each with etcd's overhead.
    assert task.ByteSize() + 3 * limits.ETCD_KEY_OVERHEAD_BYTES < size
    assert size < task.ByteSize() + 1024
    # --after: one dependency key per parent (instead of the queue key).
    parents = [pb.Dependency(id=keys.new_task_id()) for _ in range(64)]
    held = pb.Task(id=task.id, spec=big_spec(100_000, after=parents),
                   state=pb.TASK_STATE_PENDING, hold=pb.HOLD_DEPENDENCIES)
    edges = written_bytes(Move(None, held)) - held.ByteSize()
    assert edges > 64 * (len(keys.dependency(parents[0].id, task.id))
                         + limits.ETCD_KEY_OVERHEAD_BYTES)


def test_an_array_counts_every_task_written_held_and_then_released() -> None:
    template = pb.Task(spec=big_spec(500_000), state=pb.TASK_STATE_PENDING,
                       hold=pb.HOLD_ARRAY, array_id=keys.new_task_id())
    record = pb.Array(id=template.array_id, start=0, end=99_999, step=1, count=100_000)
    size = footprint(template, keys.array_task_id(record.id, 99_999), 99_999,
                     Prepared(MET, "", ()), record)
    # Each of the 100,000 records is written twice: ~93 GiB, nowhere near a 2 GiB quota.
    assert 2 * 100_000 * 500_000 < size < 2 * 100_000 * 501_000


class Status:
    """A store whose member status says what the test wants."""

    def __init__(self, in_use: int, size: int | None = None) -> None:
        self.in_use, self.size, self.reads = in_use, size or in_use, 0

    async def member_status(self) -> MemberStatus:
        self.reads += 1
        return MemberStatus(member_id=1, cluster_id=1, leader_id=1, db_size=self.size,
                            db_size_in_use=self.in_use, nospace=False)


async def test_the_budget_refuses_past_the_fraction_naming_the_numbers() -> None:
    status = Status(in_use=1_288_490_189)         # 1.2 GiB
    budget = ByteBudget(store=cast(Store, status), quota=2 * 1024**3, budget=0.8, clock=Clock())
    with pytest.raises(Overloaded) as refused:
        async with budget.admit(100 * 1024**3, "this array of 100000 tasks"):
            pass
    assert str(refused.value).startswith(
        "this array of 100000 tasks would write ~100.0 GiB into etcd; 1.2 GiB of the 2.0 GiB "
        "quota is in use and submits stop at 80% (1.6 GiB, --submit-budget): submit fewer or "
        "smaller tasks")
    # Exactly up to the limit fits; a byte more does not.
    room = budget.limit - status.in_use
    async with budget.admit(room, "this task"):
        pass
    with pytest.raises(Overloaded):
        async with budget.admit(room + 1, "this task"):
            pass


async def test_the_budget_adds_its_own_admissions_until_the_next_read() -> None:
    clock = Clock()
    status = Status(in_use=0)
    budget = ByteBudget(store=cast(Store, status), quota=1000, budget=0.5, clock=clock)
    async with budget.admit(300, "this task") as written:
        written()
    with pytest.raises(Overloaded):                # 300 admitted + 300 > 500
        async with budget.admit(300, "this task"):
            pass
    async with budget.admit(200, "this task"):     # not written: gives its room back
        pass
    assert status.reads == 1
    clock.now += 1.0
    status.in_use = 100                            # etcd now says what really landed
    async with budget.admit(400, "this task"):
        pass
    assert status.reads == 2


async def test_an_etcd_without_db_size_in_use_counts_its_whole_file() -> None:
    status = Status(in_use=0, size=900)
    budget = ByteBudget(store=cast(Store, status), quota=1000, budget=1.0, clock=Clock())
    with pytest.raises(Overloaded):
        async with budget.admit(101, "this task"):
            pass


async def test_an_array_past_the_budget_writes_nothing(store: Store) -> None:
    in_use = (await store.member_status()).db_size_in_use
    # Room for 150 kB more: not for a 200 kB task, nor for an array of 40 of them.
    service = TaskService(store=store, check=DependencyCheck(store=store),
                          etcd_quota_bytes=int((in_use + 150_000) / 0.8))
    with pytest.raises(Overloaded) as refused:
        await service.submit_array(big_spec(200_000), pb.ArraySpec(start=1, end=40))
    assert "this array of 40 tasks would write ~15.3 MiB into etcd" in str(refused.value)
    with pytest.raises(Overloaded) as refused:
        await service.submit(big_spec(200_000))
    assert "this task would write ~195.9 KiB into etcd" in str(refused.value)
    assert await store.count(b"/") == 0
    task, created = await service.submit(spec())
    assert created and await service.get(task.id) == task


def test_the_budget_flag_is_a_fraction() -> None:
    for value in ("0", "1.5", "-0.2"):
        with pytest.raises(InvalidArgument) as error:
            config.load({"submit_budget": value}, environ={})
        assert error.value.field == "submit_budget"
    assert config.load({"submit_budget": "1"}, environ={}).submit_budget == 1.0
