"""The runner against a real etcd and the process executor: drain on shutdown hands
back what is still running — requeued (restart) or NODE_LOST (no restart)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from node import keys, lifecycle
from node._gen.filch.v1 import filch_pb2 as pb
from node.config import Config
from node.node_state import NodeState, Registration
from node.runner import Runner
from node.runtime.process import ProcessExecutor
from node.store import Store
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


async def _steal(store: Store, state: NodeState, runner: Runner, *, restart: bool) -> str:
    """Queue a long task and steal it for this node, as the stealer would."""
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="sleep", args=["30"], restart=restart,
                                    cpu_millis=100, memory_bytes=1 << 20))
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    queued = await store.get_task(task.id)
    assert queued is not None and state.registration is not None
    stolen = lifecycle.stolen(queued.task, state.registration.node_id, "n", "127.0.0.1:1")
    token = await store.transition(queued, stolen, lease_id=state.registration.lease_id)
    assert token is not None
    state.capacity.reserve(stolen.spec)
    runner.launch(lifecycle.started(stolen, token))
    return task.id


async def test_drain_requeues_restartable_tasks_and_ends_the_others_node_lost(
        store: Store, tmp_path: Path) -> None:
    config = Config(name="n", data_dir=str(tmp_path), executor="process",
                    shutdown_grace=0.2, cancel_grace=1.0)
    state = NodeState.for_config(config)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    state.live.set()
    runner = Runner(config=config, store=store, executor=ProcessExecutor(None), state=state)
    loop = asyncio.create_task(runner.run())
    await asyncio.sleep(0)      # run() enters its task group
    try:
        again = await _steal(store, state, runner, restart=True)
        lost = await _steal(store, state, runner, restart=False)
        assert runner.is_running(again, 1) and runner.is_running(lost, 1)
        await runner.shutdown()
        requeued, ended = await store.get_task(again), await store.get_task(lost)
        assert requeued is not None and requeued.task.state == pb.TASK_STATE_PENDING
        assert "shut down" in requeued.task.message
        assert ended is not None
        assert (ended.task.state, ended.task.reason) == (pb.TASK_STATE_COMPLETE,
                                                         pb.REASON_NODE_LOST)
        assert await store.count(keys.RUNNING) == 0
        # The stopped attempts write nothing over the hand-back and give their room back.
        changed = state.capacity.subscribe()
        while state.capacity.load() > 0:
            await changed.wait()
            changed.clear()
        assert not runner.runs(again) and not runner.runs(lost)
        await runner.shutdown()     # idempotent: nothing left
        after = await store.get_task(again)
        assert after is not None and after.mod_revision == requeued.mod_revision
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
