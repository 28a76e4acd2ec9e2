"""The pending quota and the priority ceiling at submit, and the steal's quota compare,
against a real single-member etcd: exact under concurrent submits, arrays written whole
(in several guarded transactions) or not at all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, validation
from node.core.errors import PermissionDenied, QuotaExceeded
from node.core.limits import MAX_BATCH
from node.etcd.quota_txn import charged, pending_count, unchanged_charges
from node.etcd.store import Store
from node.etcd.txn import Move, none_created_after
from node.etcd.users import UserDirectory
from node.faces.service import TaskService
from node.scheduling.conditions import DependencyCheck
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

NODE_ID = "6f1c2a9e-0d4b-4c1e-9a53-2b8f0e6d7c11"


async def _service(store: Store, **quota: Any) -> TaskService:
    await store._client.put(keys.user("alice"), pb.User(
        name="alice", role=pb.ROLE_USER, quota=pb.Quota(**quota)).SerializeToString())
    users = UserDirectory()
    await users.relist(store)
    return TaskService(store=store, check=DependencyCheck(store=store), users=users)


def _spec(**fields: Any) -> pb.TaskSpec:
    return validation.spec(pb.TaskSpec(**{"command": "/bin/true", "owner": "alice", **fields}))


async def _records(store: Store) -> int:
    return len([key for key in (await store.list_created(keys.task("")))
                if not key.startswith(keys.STATUS)])


async def test_a_users_tasks_are_accounted_and_others_are_not(store: Store) -> None:
    service = await _service(store)
    mine, _ = await service.submit(_spec())
    theirs, _ = await service.submit(_spec(owner="bob"))
    assert mine.accounted and not theirs.accounted
    assert (await pending_count(store, "alice"))[0] == 1


async def test_priority_above_the_ceiling_is_refused_and_writes_nothing(store: Store) -> None:
    service = await _service(store, max_priority=100)
    with pytest.raises(PermissionDenied, match=r"priority 500 is above alice's ceiling \(100\)"):
        await service.submit(_spec(priority=500))
    with pytest.raises(PermissionDenied):
        await service.submit_array(_spec(priority=500), pb.ArraySpec(start=1, end=3))
    assert await _records(store) == 0


async def test_concurrent_submits_stop_exactly_at_the_pending_quota(store: Store) -> None:
    service = await _service(store, max_pending=7)
    outcomes = await asyncio.gather(*(service.submit(_spec()) for _ in range(20)),
                                    return_exceptions=True)
    assert sum(isinstance(outcome, tuple) for outcome in outcomes) == 7
    refused = [outcome for outcome in outcomes if isinstance(outcome, QuotaExceeded)]
    assert len(refused) == 13
    assert "owner alice has 7 pending tasks, its quota is 7" in str(refused[0])
    assert (await pending_count(store, "alice"))[0] == 7 == await _records(store)


async def test_an_array_of_many_transactions_is_written_whole_within_the_quota(
        store: Store) -> None:
    size = 3 * MAX_BATCH + 5
    service = await _service(store, max_pending=size)
    response = await service.submit_array(_spec(), pb.ArraySpec(start=1, end=size))
    assert len(response.task_ids) == size
    assert (await pending_count(store, "alice"))[0] == size
    with pytest.raises(QuotaExceeded):
        await service.submit(_spec())
    with pytest.raises(QuotaExceeded, match="this submit adds 2"):
        await service.submit_array(_spec(), pb.ArraySpec(start=1, end=2))
    assert (await pending_count(store, "alice"))[0] == size


async def test_an_array_racing_single_submits_never_passes_the_quota(store: Store) -> None:
    size = 2 * MAX_BATCH
    service = await _service(store, max_pending=size + 3)
    outcomes = await asyncio.gather(
        service.submit_array(_spec(), pb.ArraySpec(start=1, end=size)),
        *(service.submit(_spec()) for _ in range(10)), return_exceptions=True)
    pending = (await pending_count(store, "alice"))[0]
    assert pending <= size + 3
    array = outcomes[0]
    singles = sum(isinstance(outcome, tuple) for outcome in outcomes[1:])
    if isinstance(array, pb.SubmitResponse):
        assert pending == size + singles and singles <= 3
    else:
        # Refused whole: what it had written is deleted again.
        assert isinstance(array, QuotaExceeded), array
        assert pending == singles == await _records(store)


async def test_a_failed_quota_compare_is_told_apart_from_a_failed_priority_guard(
        store: Store) -> None:
    service = await _service(store, max_cpu_millis=1000)
    task, _ = await service.submit(_spec(cpu_millis=500))
    lease = await store.grant_lease(30)
    read = await charged(store, "alice")
    record = await store.get_task(task.id)
    assert record is not None
    other, _ = await service.submit(_spec(cpu_millis=500))
    other_record = await store.get_task(other.id)
    assert other_record is not None
    # Another node starts a task of alice after this one read her charge.
    assert await store.transition(other_record, lifecycle.stolen(
        other_record.task, "other-node", "n2", "127.0.0.1:2"), lease_id=lease) is not None
    stolen = Move(record, lifecycle.stolen(record.task, NODE_ID, "n1", "127.0.0.1:1"))
    revision, done = await store.transition_each(
        [stolen], lease_id=lease, quota_guards=[unchanged_charges("alice", read.revision)])
    assert (revision, done) == (None, [False])     # read again, not a relist
    # A failed priority guard (a queued key newer than the view) still says [] (relist).
    queued = none_created_after(*keys.queue_above(-1), 0)
    assert await store.transition_each([stolen], lease_id=lease, guards=[queued], quota_guards=[
        unchanged_charges("alice", read.revision)]) == (None, [])
    fresh = await charged(store, "alice")
    assert (fresh.cpu_millis, fresh.running) == (500, 1)
    revision, done = await store.transition_each(
        [stolen], lease_id=lease, quota_guards=[unchanged_charges("alice", fresh.revision)])
    assert done == [True] and (await charged(store, "alice")).cpu_millis == 1000
