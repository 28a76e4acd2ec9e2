"""The owners API against a real etcd: weights validated (nothing written when refused),
listing with usage summed over node records, queued owners, and shares."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store import Store
from node.faces.api import SchedulerServicer
from node.faces.service import TaskService
from node.faces.sessions import SessionService
from node.scheduling.conditions import DependencyCheck
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


class Context:
    """Stands in for grpc's servicer context: records the status a call aborted with."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.status = (code, message)
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self.status[0] if self.status else None


def _servicer(store: Store) -> SchedulerServicer:
    logs: Any = None        # the owner calls never read logs
    return SchedulerServicer(tasks=TaskService(store=store, check=DependencyCheck(store=store)),
                             logs=logs, sessions=SessionService(store=store, ttl=60),
                             events=logs)


@pytest.mark.parametrize(("name", "weight", "field"), [
    ("", 1.0, "name"), ("a/b", 1.0, "name"), ("-x", 1.0, "name"), ("x" * 65, 1.0, "name"),
    ("alice", 0.0, "weight"), ("alice", -1.0, "weight"), ("alice", 1000.5, "weight"),
    ("alice", float("nan"), "weight"), ("alice", float("inf"), "weight"),
])
async def test_a_bad_name_or_weight_is_refused_naming_the_field_and_nothing_is_written(
        store: Store, name: str, weight: float, field: str) -> None:
    context = Context()
    with pytest.raises(grpc.aio.AbortError):
        await _servicer(store).SetOwnerWeight(pb.SetOwnerWeightRequest(name=name, weight=weight),
                                              context)
    assert context.status is not None
    code, message = context.status
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(f"{field}:")
    assert await store.count(keys.OWNERS) == 0


async def test_owners_list_weights_usage_queued_work_and_shares(store: Store) -> None:
    servicer = _servicer(store)
    context = Context()
    owner = await servicer.SetOwnerWeight(pb.SetOwnerWeightRequest(name="bob", weight=3),
                                          context)
    assert owner.name == "bob" and owner.weight == 3 and context.status is None
    lease = await store.grant_lease(60)
    for node_id, held in (("n1", 2000), ("n2", 1000)):
        node = pb.Node(id=node_id, cpu_capacity_millis=4000, memory_capacity_bytes=8 << 30)
        node.owners["alice"].CopyFrom(pb.OwnerUsage(cpu_millis=held, memory_bytes=1 << 30,
                                                    running=held // 1000))
        await store.put_node(node, lease)
    queued = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true", owner="carol", priority=3))
    assert await store.transition(None, queued) is not None
    listed = {owner.name: owner for owner in
              (await servicer.ListOwners(pb.ListOwnersRequest(), context)).owners}
    assert sorted(listed) == ["alice", "bob", "carol"]
    alice = listed["alice"]
    assert (alice.weight, alice.usage.cpu_millis, alice.usage.running) == (1, 3000, 3)
    assert alice.share == pytest.approx(3000 / 8000)
    assert listed["bob"].weight == 3 and listed["bob"].share == 0
    assert listed["carol"].usage.running == 0
