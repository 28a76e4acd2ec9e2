"""Recovery against a real etcd: a dead node's running task is handed back, once, found
through the running-task index (/placed/), never by reading every record."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.config import Config
from node.etcd.handback import Cause, handback
from node.etcd.store import Store
from node.etcd.txn import Versioned
from node.running.recovery import SWEEP_LOCK, Recovery
from node.scheduling.node_state import NodeState, Registration
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


def _recovery(store: Store, registration: Registration | None = None) -> Recovery:
    state = NodeState.for_config(Config())
    state.registration = registration
    return Recovery(config=Config(), store=store, state=state)


async def _submit(store: Store, *, restart: bool = True) -> Versioned:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true", restart=restart))
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    found = await store.get_task(task.id)
    assert found is not None
    return found


async def _steal(store: Store, queued: Versioned, node_id: str, lease: int) -> Versioned:
    stolen = lifecycle.stolen(queued.task, node_id, "n", "127.0.0.1:1")
    assert await store.transition(queued, stolen, lease_id=lease) is not None
    found = await store.get_task(queued.task.id)
    assert found is not None
    return found


async def _running_on_dead_node(store: Store, *, restart: bool) -> tuple[str, str]:
    """A task RUNNING on a node whose lease is gone (its running key went with it, its
    /placed/ key did not); returns (task id, node id)."""
    queued = await _submit(store, restart=restart)
    lease = await store.grant_lease(60)
    node_id = keys.new_node_id()
    await _steal(store, queued, node_id, lease)
    await store.revoke_lease(lease)
    assert await store.count(keys.RUNNING) == 0
    assert await store.list_ids(keys.placed_on_node(node_id)) == [
        keys.placed(node_id, queued.task.id)]
    return queued.task.id, node_id


def _reads(kind: str) -> float:
    return float(metrics.RECOVERY_READS.labels(kind)._value.get())


async def _index_matches_records(store: Store) -> None:
    """Every RUNNING record has exactly its /placed/ key, and every /placed/ key a RUNNING
    record on that node."""
    records, _ = await store.list_records()
    expected = {keys.placed(found.task.node_id, found.task.id) for found in records
                if found.task.state == pb.TASK_STATE_RUNNING}
    assert set(await store.list_ids(keys.PLACED)) == expected


async def test_the_sweep_requeues_a_restartable_task_reading_index_keys_only(
        store: Store) -> None:
    backlog = [await _submit(store) for _ in range(40)]      # a queue the sweep must not read
    task_id, _ = await _running_on_dead_node(store, restart=True)
    before = metrics.REQUEUES.labels("scan")._value.get()
    records_before, placed_before = _reads("record"), _reads("placed")
    recovery = _recovery(store)
    assert await recovery.sweep() == 1
    found = await store.get_task(task_id)
    assert found is not None and found.task.state == pb.TASK_STATE_PENDING
    assert found.task.attempt == 1 and "recovery sweep" in found.task.message
    assert await store.count(keys.QUEUED) == len(backlog) + 1
    assert await store.list_ids(keys.PLACED) == []
    assert metrics.REQUEUES.labels("scan")._value.get() - before == 1
    # One index key and the one record it handed back: not the 40 queued records.
    assert (_reads("placed") - placed_before, _reads("record") - records_before) == (1, 1)
    assert await recovery.sweep() == 0      # nothing left to repair
    again = await store.get_task(task_id)
    assert again is not None and again.mod_revision == found.mod_revision


async def test_the_sweep_ends_a_no_restart_task_node_lost(store: Store) -> None:
    task_id, _ = await _running_on_dead_node(store, restart=False)
    await _recovery(store).sweep()
    found = await store.get_task(task_id)
    assert found is not None
    assert (found.task.state, found.task.reason) == (pb.TASK_STATE_COMPLETE,
                                                     pb.REASON_NODE_LOST)
    assert await store.count(keys.COMPLETE) == 1 and await store.count(keys.QUEUED) == 0
    await _index_matches_records(store)


async def test_a_node_deletion_recovers_that_nodes_tasks_from_its_index(store: Store) -> None:
    task_id, node_id = await _running_on_dead_node(store, restart=True)
    other_id, _ = await _running_on_dead_node(store, restart=True)
    assert await _recovery(store).recover_node(node_id, "gone", cause="lease_expired") == 1
    found = await store.get_task(task_id)
    assert found is not None and found.task.state == pb.TASK_STATE_PENDING
    other = await store.get_task(other_id)      # another node's task: not this event's
    assert other is not None and other.task.state == pb.TASK_STATE_RUNNING


async def test_a_live_nodes_task_is_left_alone(store: Store) -> None:
    lease = await store.grant_lease(60)
    node_id = keys.new_node_id()
    await store.put_node(pb.Node(id=node_id, name="alive"), lease)
    stolen = await _steal(store, await _submit(store), node_id, lease)
    # A node that registered after the sweep listed the live nodes: its record is there,
    # and its running key too (the hand-back's compare would fail anyway).
    late_lease = await store.grant_lease(60)
    late_id = keys.new_node_id()
    late = await _steal(store, await _submit(store), late_id, late_lease)
    await store.put_node(pb.Node(id=late_id, name="late"), late_lease)
    assert await _recovery(store).sweep() == 0
    for found in (stolen, late):
        now = await store.get_task(found.task.id)
        assert now is not None and now.mod_revision == found.mod_revision


async def test_the_index_moves_with_every_transition(store: Store) -> None:
    lease = await store.grant_lease(60)
    node_id = keys.new_node_id()
    running = [await _steal(store, await _submit(store), node_id, lease) for _ in range(4)]
    await _index_matches_records(store)
    assert len(await store.list_ids(keys.placed_on_node(node_id))) == 4
    finished = lifecycle.finished(running[0].task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED)
    assert await store.transition(running[0], finished, fence=running[0].mod_revision)
    assert await handback(store, running[1], Cause("canceled", "canceled"),
                          fence=running[1].mod_revision) is not None
    assert await handback(store, running[2], Cause("shutdown", "drained"),
                          fence=running[2].mod_revision) is not None
    await _index_matches_records(store)
    assert await store.delete_tasks([running[3]])
    assert await store.list_ids(keys.PLACED) == []


async def test_one_node_at_a_time_holds_the_sweep_and_another_takes_over(store: Store) -> None:
    first = Registration(keys.new_node_id(), await store.grant_lease(60))
    second = Registration(keys.new_node_id(), await store.grant_lease(60))
    holder, other = _recovery(store, first), _recovery(store, second)
    assert await holder.sweep_if_holder()
    assert not await other.sweep_if_holder()
    assert await holder.sweep_if_holder()       # it keeps the claim from sweep to sweep
    await store.revoke_lease(first.lease_id)    # the holder dies: its claim goes
    assert await other.sweep_if_holder()
    assert not await store.exists(keys.node(first.node_id))
    await other.shutdown()
    assert not await store.exists(SWEEP_LOCK)


async def test_a_task_stolen_by_an_older_agent_is_indexed_then_recovered(store: Store) -> None:
    # An agent older than the index stole it: running key, no /placed/ key.
    lease = await store.grant_lease(60)
    node_id = keys.new_node_id()
    await store.put_node(pb.Node(id=node_id, name="old"), lease)
    stolen = await _steal(store, await _submit(store), node_id, lease)
    indexed = await _steal(store, await _submit(store), node_id, lease)
    await store._call(lambda: store._client.delete(keys.placed(node_id, stolen.task.id)))
    recovery = _recovery(store, Registration(keys.new_node_id(), await store.grant_lease(60)))
    assert await recovery.index_unplaced() == 1
    await _index_matches_records(store)
    assert await recovery.index_unplaced() == 0
    # Its node dies: the sweep finds both tasks through the index.
    await store.revoke_lease(lease)
    assert await recovery.sweep_if_holder()
    for found in (stolen, indexed):
        now = await store.get_task(found.task.id)
        assert now is not None and now.task.state == pb.TASK_STATE_PENDING
