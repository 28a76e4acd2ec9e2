"""The table of limits holds together, and batches split when etcd calls them too large.

The etcd here keeps its default --max-request-bytes (1.5 MiB), smaller than filch's write
budget, so a batch of two large records really is refused and must be split.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, limits, validation
from node.core.errors import TooLarge
from node.core.limits import MAX_BATCH, MOVE_KEYS_BYTES
from node.etcd.group_commit import GroupCommitter
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned, move_ops
from node.faces.service import TaskService
from node.scheduling.conditions import DependencyCheck
from node.scheduling.fairshare import Candidate, Usage, select
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

# etcd's default --max-request-bytes, which the test member keeps.
ETCD_DEFAULT_REQUEST_BYTES = 1536 * 1024


def test_the_table_holds_together() -> None:
    # A spec fits a record, a record fits a write batch, a write batch one etcd request.
    assert limits.MAX_SPEC_BYTES < limits.MAX_RECORD_BYTES <= limits.WRITE_BATCH_BYTES
    assert (limits.WRITE_BATCH_BYTES + MAX_BATCH * MOVE_KEYS_BYTES
            < limits.ETCD_MAX_REQUEST_BYTES <= 10 * limits.MiB)
    # A read batch of the largest records fits the store's channel.
    assert limits.READ_BATCH_RECORDS * limits.MAX_RECORD_BYTES <= limits.STORE_MAX_RECEIVE_BYTES
    assert limits.READ_BATCH_RECORDS >= 16
    # A page of ListTasks fits gRPC's default 4 MiB receive limit, with one record at least.
    assert limits.MAX_RECORD_BYTES <= limits.LIST_PAGE_BYTES < 4 * limits.MiB
    assert limits.max_concurrent_rpcs(10) > 2 * 10
    assert validation.MAX_SPEC_BYTES == limits.MAX_SPEC_BYTES


def test_batches_cut_by_count_and_bytes_and_keep_order() -> None:
    items = [5, 5, 5, 20, 1, 1, 1, 1]
    cut = list(limits.batches(items, lambda item: item, max_count=3, max_bytes=10))
    assert cut == [[5, 5], [5], [20], [1, 1, 1], [1]]
    assert [item for batch in cut for item in batch] == items
    assert list(limits.batches([], lambda item: item, max_count=3, max_bytes=10)) == []


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 9)), max_size=60),
       max_count=st.integers(1, 8), max_bytes=st.integers(1, 100), max_ops=st.integers(1, 20))
def test_every_batch_fits_one_transaction(items: list[tuple[int, int]], max_count: int,
                                          max_bytes: int, max_ops: int) -> None:
    cut = list(limits.batches(items, lambda item: item[0], ops=lambda item: item[1],
                              max_count=max_count, max_bytes=max_bytes, max_ops=max_ops))
    assert [item for batch in cut for item in batch] == items      # all of them, in order
    for position, batch in enumerate(cut):
        assert batch
        if len(batch) > 1:      # an item too large alone forms a batch of its own
            assert len(batch) <= max_count
            assert sum(size for size, _ in batch) <= max_bytes
            assert sum(ops for _, ops in batch) <= max_ops
        if position + 1 < len(cut):     # a batch ends only when the next item would not fit
            following_size, following_ops = cut[position + 1][0]
            assert (len(batch) == max_count
                    or sum(size for size, _ in batch) + following_size > max_bytes
                    or sum(ops for _, ops in batch) + following_ops > max_ops)


def test_group_commit_array_writes_and_steals_cut_by_the_same_room() -> None:
    # Each writer's own bound agrees with limits.TxnRoom: the one cutter.
    room = limits.TxnRoom()
    assert (room.max_count, room.max_bytes, room.max_ops) == (
        MAX_BATCH, limits.WRITE_BATCH_BYTES, limits.MAX_TXN_OPS)
    sizes = [limits.MAX_RECORD_BYTES] * 5
    candidates = [Candidate(task_id=str(index), priority=0, owner="o", cpu_millis=1,
                            memory_bytes=1, size=size) for index, size in enumerate(sizes)]
    picked = select(candidates, usage={}, totals=Usage(10, 10), weights={},
                    free=Usage(10, 10), limit=MAX_BATCH, max_bytes=limits.WRITE_BATCH_BYTES)
    assert len(picked) == len(next(limits.batches(sizes, lambda size: size)))


def _task(size: int) -> pb.Task:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="sh", env={"BIG": "x" * size}))
    task.submitted_at.GetCurrentTime()
    return task


async def test_a_batch_over_the_request_limit_raises_too_large(store: Store) -> None:
    moves = [Move(None, _task(900_000)) for _ in range(2)]
    with pytest.raises(TooLarge):
        await store.transition_many(moves)
    assert await store.count(keys.QUEUED) == 0


async def test_group_commit_splits_a_batch_etcd_refuses(store: Store) -> None:
    service = TaskService(store=store, check=DependencyCheck(store=store))
    specs = [validation.spec(pb.TaskSpec(command="sh", env={"BIG": str(n) * 900_000}))
             for n in range(6)]
    results = await asyncio.gather(*(service.submit(spec) for spec in specs))
    assert all(created for _, created in results)
    assert await store.count(keys.QUEUED) == len(specs)


async def test_a_single_record_etcd_cannot_take_is_refused_and_nothing_written(
        store: Store) -> None:
    committer = GroupCommitter(store=store)
    small, huge = _task(10), _task(ETCD_DEFAULT_REQUEST_BYTES)
    outcomes = await asyncio.gather(committer.transition(Move(None, small)),
                                    committer.transition(Move(None, huge)),
                                    return_exceptions=True)
    assert isinstance(outcomes[0], int)
    # The committer says "too large"; the submit service turns it into INVALID_ARGUMENT.
    assert isinstance(outcomes[1], TooLarge)
    assert await store.get_task(huge.id) is None
    assert await store.get_task(small.id) is not None


@pytest.mark.parametrize("state", [pb.TASK_STATE_UNSPECIFIED, pb.TASK_STATE_PENDING])
async def test_list_pages_stop_at_the_byte_budget(store: Store, state: int) -> None:
    service = TaskService(store=store, check=DependencyCheck(store=store))
    large = [validation.spec(pb.TaskSpec(command="sh", env={"BIG": str(n) * 1_000_000}))
             for n in range(5)]
    small = [validation.spec(pb.TaskSpec(command="true", name=f"s{n}")) for n in range(3)]
    ids = [(await service.submit(spec))[0].id for spec in large + small]
    seen: list[str] = []
    token = ""
    for _ in range(len(ids) + 1):
        tasks, token = await service.list_tasks(state, 1000, token)
        assert tasks
        assert sum(task.ByteSize() for task in tasks) <= limits.LIST_PAGE_BYTES
        seen += [task.id for task in tasks]
        if not token:
            break
    assert sorted(seen) == sorted(ids)


async def test_reads_too_large_for_the_channel_are_split(store: Store, etcd: str) -> None:
    """Records written under larger limits: a read batch that does not fit the channel is
    read again in halves, by get_tasks and by list_records alike."""
    tasks = [_task(900_000) for _ in range(4)]
    for task in tasks:
        assert await store.transition(None, task) is not None
    ids = sorted(task.id for task in tasks)
    narrow = Store(endpoint=etcd, max_receive_bytes=2 * limits.MiB)
    tiny = Store(endpoint=etcd, max_receive_bytes=limits.MiB // 2)
    try:
        assert [found.task.id for found in await narrow.get_tasks(ids)] == ids
        records, more = await narrow.list_records(limit=4)
        assert records and len(records) < 4 and more
        listed: list[str] = []
        after = b""
        for _ in range(len(ids) + 1):
            records, more = await narrow.list_records(after=after)
            listed += [record.task.id for record in records]
            if not more:
                break
            after = keys.task(records[-1].task.id)
        assert listed == ids
        with pytest.raises(TooLarge):
            await tiny.get_tasks(ids[:1])       # one record that cannot be read at all
    finally:
        await narrow.close()
        await tiny.close()


def test_a_batch_of_steals_fits_one_transaction() -> None:
    # A steal is the plainest move with the most operations (queued and queue keys out,
    # running and /placed/ keys and the record in): MAX_BATCH of them fit etcd's limit.
    task = _task(10)
    queued = pb.Task()
    queued.CopyFrom(task)
    stolen = lifecycle.stolen(queued, keys.new_node_id(), "n", "127.0.0.1:1")
    ops = move_ops(Move(Versioned(queued, 1), stolen))
    assert ops == limits.MOVE_MAX_PLAIN_OPS
    assert MAX_BATCH * ops <= limits.MAX_TXN_OPS
