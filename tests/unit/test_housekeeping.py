"""Housekeeping against a real etcd: a failing task firewall step skips nothing else."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.core.config import Config
from node.core.errors import ExecutorError
from node.etcd.store import Store
from node.operations.housekeeping import Housekeeping
from node.scheduling.node_state import NodeState, Registration
from node.scheduling.stealer import Stealer
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


class NothingRuns:
    """Stands in for the runner: housekeeping asks it which logs are in use."""

    def runs(self, task_id: str) -> bool:
        return False

    def launch(self, task: pb.Task) -> None:
        raise AssertionError("housekeeping launches nothing")


async def _finished_task(store: Store) -> str:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true", cpu_millis=100, memory_bytes=1 << 20))
    assert await store.transition(None, task) is not None
    [old] = await store.get_tasks([task.id])
    done = lifecycle.finished(old.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, exit_code=0)
    assert await store.transition(old, done) is not None
    return task.id


async def test_a_failing_firewall_step_skips_nothing_else(store: Store, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    async def firewall(addresses: list[str]) -> None:
        calls.append(addresses)
        raise ExecutorError("nft -f - failed: Error: No such file or directory")

    config = Config(name="a", data_dir=str(tmp_path), retention=0.0, compaction_interval=0.0,
                    compaction_keep=0)
    state = NodeState.for_config(config)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    runner: Any = NothingRuns()
    stealer = Stealer(config=config, store=store, state=state, runner=runner)
    housekeeping = Housekeeping(config=config, store=store, state=state, runner=runner,
                                stealer=stealer, firewall=firewall)
    task_id = await _finished_task(store)
    await asyncio.sleep(0.01)   # finished strictly before the retention cutoff
    errors = REGISTRY.get_sample_value("filch_task_firewall_errors_total") or 0.0
    compactions = REGISTRY.get_sample_value("filch_etcd_compactions_total") or 0.0

    await housekeeping.round()

    assert calls, "the firewall step did not run"
    # Retention and compaction ran all the same; the failure is counted.
    assert await store.get_tasks([task_id]) == []
    assert await store.count(keys.COMPLETE) == 0
    assert REGISTRY.get_sample_value("filch_etcd_compactions_total") == compactions + 1
    assert REGISTRY.get_sample_value("filch_task_firewall_errors_total") == errors + 1
