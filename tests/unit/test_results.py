"""Results behind the fence, against a real etcd: written only while the running key is
the steal's (the one it created, not a later one of the same name), dropped once revoked,
and an earlier timed-out write recognised."""

from __future__ import annotations

import asyncio

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.etcd.store import Store
from node.running.results import LocalAttempt, ResultWriter
from tests.unit.etcd_fixture import etcdctl, require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


async def _running(store: Store) -> LocalAttempt:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true"))
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    queued = await store.get_task(task.id)
    assert queued is not None
    stolen = lifecycle.stolen(queued.task, keys.new_node_id(), "n", "127.0.0.1:1")
    token = await store.transition(queued, stolen, lease_id=await store.grant_lease(60))
    assert token is not None
    return LocalAttempt(lifecycle.started(stolen, token))


def _exited(local: LocalAttempt) -> pb.Task:
    return lifecycle.finished(local.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED)


async def test_results_ending_together_are_recorded_and_a_fenced_one_is_rejected(
        store: Store, etcd: str) -> None:
    kept, taken = await _running(store), await _running(store)
    # Its running key deleted and created again later (as by a lease expiry and a newer
    # steal), the record untouched: only the fence (the running key's create_revision must
    # be the attempt's token) tells the two keys apart.
    running = keys.running(taken.task.node_id, taken.task.id).decode()
    etcdctl(etcd, "del", running)
    etcdctl(etcd, "put", running, "")
    fenced_before = metrics.FENCED_WRITES._value.get()
    writer = ResultWriter(store=store)
    assert await asyncio.gather(writer.write(kept, _exited(kept)),
                                writer.write(taken, _exited(taken))) == [True, False]
    assert metrics.FENCED_WRITES._value.get() - fenced_before == 1
    recorded, untouched = await store.get_task(kept.task.id), await store.get_task(taken.task.id)
    assert recorded is not None and recorded.task.state == pb.TASK_STATE_COMPLETE
    assert untouched is not None and untouched.task.state == pb.TASK_STATE_RUNNING
    assert etcdctl(etcd, "get", running, "--print-value-only") == "\n"  # not deleted


async def test_a_revoked_attempts_result_is_dropped(store: Store) -> None:
    local = await _running(store)
    local.revoked = True
    assert not await ResultWriter(store=store).write(local, _exited(local))
    found = await store.get_task(local.task.id)
    assert found is not None and found.task.state == pb.TASK_STATE_RUNNING


async def test_a_result_an_earlier_timed_out_try_wrote_is_recognised(store: Store) -> None:
    local = await _running(store)
    new = _exited(local)
    assert await store.transition_many([local.move(new)]) is not None  # the lost answer
    assert await ResultWriter(store=store).write(local, new)
    # A different result (another finish time) is not mistaken for it.
    other = _exited(local)
    other.finished_at.FromNanoseconds(new.finished_at.ToNanoseconds() + 1)
    assert not await ResultWriter(store=store).write(local, other)
