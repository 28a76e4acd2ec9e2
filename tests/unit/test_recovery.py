"""Recovery against a real etcd: a dead node's running task is handed back, once."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.config import Config
from node.etcd.store import Store
from node.running.recovery import Recovery
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


async def _running_on_dead_node(store: Store, *, restart: bool) -> str:
    """A task RUNNING on a node whose lease is gone (its running key went with it)."""
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true", restart=restart))
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    queued = await store.get_task(task.id)
    assert queued is not None
    lease = await store.grant_lease(60)
    stolen = lifecycle.stolen(queued.task, keys.new_node_id(), "dead", "127.0.0.1:1")
    assert await store.transition(queued, stolen, lease_id=lease) is not None
    await store.revoke_lease(lease)
    assert await store.count(keys.RUNNING) == 0
    return task.id


async def test_the_scan_requeues_a_restartable_task_of_a_dead_node(store: Store) -> None:
    task_id = await _running_on_dead_node(store, restart=True)
    before = metrics.REQUEUES.labels("scan")._value.get()
    recovery = Recovery(config=Config(), store=store)
    await recovery.scan()
    found = await store.get_task(task_id)
    assert found is not None and found.task.state == pb.TASK_STATE_PENDING
    assert found.task.attempt == 1 and "found by scan" in found.task.message
    assert await store.count(keys.QUEUED) == 1
    assert metrics.REQUEUES.labels("scan")._value.get() - before == 1
    await recovery.scan()       # nothing left to repair: a second scan changes nothing
    again = await store.get_task(task_id)
    assert again is not None and again.mod_revision == found.mod_revision


async def test_the_scan_ends_a_no_restart_task_node_lost(store: Store) -> None:
    task_id = await _running_on_dead_node(store, restart=False)
    await Recovery(config=Config(), store=store).scan()
    found = await store.get_task(task_id)
    assert found is not None
    assert (found.task.state, found.task.reason) == (pb.TASK_STATE_COMPLETE,
                                                     pb.REASON_NODE_LOST)
    assert await store.count(keys.COMPLETE) == 1 and await store.count(keys.QUEUED) == 0


async def test_a_live_nodes_task_is_left_alone(store: Store) -> None:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true"))
    assert await store.transition(None, task) is not None
    queued = await store.get_task(task.id)
    assert queued is not None
    stolen = lifecycle.stolen(queued.task, keys.new_node_id(), "alive", "127.0.0.1:1")
    assert await store.transition(queued, stolen, lease_id=await store.grant_lease(60))
    await Recovery(config=Config(), store=store).scan()
    found = await store.get_task(task.id)
    assert found is not None and found.task.state == pb.TASK_STATE_RUNNING
