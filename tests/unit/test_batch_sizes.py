"""Attempt results' batches and the stealer's steal against etcd's request limit.

The etcd here keeps its default --max-request-bytes (1.5 MiB), below filch's write budget,
so batches the budget lets through are really refused and must be split, and a record
made slightly larger by the write itself is really too large alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.core.config import Config
from node.core.errors import TooLarge
from node.etcd.store import Store
from node.etcd.txn import Versioned
from node.running.results import LocalAttempt, ResultWriter
from node.running.runner import Runner
from node.scheduling.node_state import NodeState, Registration
from node.scheduling.stealer import Stealer
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

NODE_ID = "6f1c2a9e-0d4b-4c1e-9a53-2b8f0e6d7c11"
ETCD_DEFAULT_REQUEST_BYTES = 1536 * 1024
# A record this large is written (submit, steal), but not once the write adds ~16 KiB.
NEAR_THE_LIMIT = ETCD_DEFAULT_REQUEST_BYTES - 12 * 1024


def _runner(store: Store, config: Config, state: NodeState) -> Runner:
    # The executor is not used by the parts under test.
    nothing: Any = None
    return Runner(config=config, store=store, executor=nothing, state=state)


async def _queued(store: Store, env_bytes: int) -> Versioned:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="sh", env={"BIG": "x" * env_bytes}))
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    found = await store.get_task(task.id)
    assert found is not None
    return found


async def _running(store: Store, env_bytes: int, lease: int) -> LocalAttempt:
    queued = await _queued(store, env_bytes)
    stolen = lifecycle.stolen(queued.task, NODE_ID, "n1", "127.0.0.1:1")
    token = await store.transition(queued, stolen, lease_id=lease)
    assert token is not None
    return LocalAttempt(lifecycle.started(stolen, token))


def _result(local: LocalAttempt, message: str = "") -> pb.Task:
    return lifecycle.finished(local.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED,
                              message=message)


async def test_a_finish_batch_etcd_refuses_is_written_one_by_one(store: Store) -> None:
    lease = await store.grant_lease(60)
    attempts = [await _running(store, 900_000, lease) for _ in range(2)]
    results = [_result(local) for local in attempts]
    with pytest.raises(TooLarge):       # together they really are too large
        await store.transition_many([local.move(new) for local, new
                                     in zip(attempts, results, strict=True)])
    writer = ResultWriter(store=store)
    # Ending together, they go to the group committer together and are split there.
    assert all(await asyncio.gather(*(writer.write(local, new)
                                      for local, new in zip(attempts, results, strict=True))))
    for local in attempts:
        found = await store.get_task(local.task.id)
        assert found is not None and found.task.state == pb.TASK_STATE_COMPLETE
        assert found.task.spec.env["BIG"] == "x" * 900_000


async def test_a_result_too_large_alone_is_recorded_without_args_and_env(store: Store) -> None:
    lease = await store.grant_lease(60)
    local = await _running(store, NEAR_THE_LIMIT, lease)
    result = _result(local, message="m" * 16 * 1024)
    with pytest.raises(TooLarge):       # alone it really is too large
        await store.transition_many([local.move(result)])
    assert await ResultWriter(store=store).write(local, result)
    found = await store.get_task(local.task.id)
    assert found is not None
    assert (found.task.state, found.task.reason) == (pb.TASK_STATE_COMPLETE, pb.REASON_EXITED)
    assert not found.task.spec.env
    assert "more than etcd takes in one request" in found.task.message
    assert await store.count(keys.RUNNING) == 0


async def test_a_steal_too_large_alone_ends_the_task_start_failed(store: Store) -> None:
    # A long node name makes the RUNNING record larger than the queued one etcd took.
    config = Config(name="n" * 16 * 1024, cpus=4, memory=8 << 30)
    lease = await store.grant_lease(60)
    queued = await _queued(store, NEAR_THE_LIMIT)
    state = NodeState.for_config(config)
    stealer = Stealer(config=config, store=store, state=state,
                      runner=_runner(store, config, state))
    state.capacity.reserve(queued.task.spec)
    assert await stealer._steal([queued], Registration(NODE_ID, lease))
    found = await store.get_task(queued.task.id)
    assert found is not None
    assert (found.task.state, found.task.reason) == (pb.TASK_STATE_COMPLETE,
                                                     pb.REASON_START_FAILED)
    assert not found.task.spec.env and "args and env were dropped" in found.task.message
    assert await store.count(keys.QUEUED) == 0
    assert state.capacity.load() == 0       # the reservation was released, nothing launched
