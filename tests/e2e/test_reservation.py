"""No starvation on a real two-node cluster (process executor, 2 CPUs a node): a 2-CPU
priority-100 task behind a 1-CPU priority-0 array that keeps both nodes full starts within
reserve-after plus the longest low task (plus steal and record pacing), not after the
array drained; and, with every slot held by long fillers, `filch status` shows which node
holds room, that node gives a freed CPU to no queued low task, then takes the big one."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.client import Client
from node.core import keys
from node.etcd.store import Store
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

pytestmark = pytest.mark.timeout(120)

CPUS = 2
RESERVE_AFTER = 3.0
# The low tasks: a 40-task array of 1-CPU tasks keeps both nodes' 4 slots busy for about
# 40 * 3.8 / 4 = 38 s, with tasks still queued all along. Their lengths differ (3 s to
# LOW_SECONDS by index), so that a node's two tasks do not end together: a node emptied
# at once would let the big task in without any reservation. Long enough that the CLI,
# polled on a loaded machine, sees the reservation before the task fits.
LOW_TASKS = 40
LOW_COMMAND = "sleep $(echo $FILCH_ARRAY_INDEX | awk '{print 3 + ($1 % 5) * 0.4}')"
LOW_SECONDS = 3 + 4 * 0.4
# Steal delay, the holder's reservation check (reservation.CHECK_INTERVAL = 1 s) and its
# record's publication, and a loaded shared machine.
SLACK = 4.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_tools()
    root = Path(tempfile.mkdtemp(prefix="filch-reserve-"))
    root.chmod(0o755)
    try:
        with Cluster(root, size=2, cpus=CPUS, executor="process") as started:
            _set_reserve_after(started, RESERVE_AFTER)
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def client(cluster: Cluster) -> Iterator[Client]:
    with Client(cluster.nodes[0].address) as opened:
        yield opened
    # Leave the cluster empty for the next test.
    for task in opened_tasks(cluster):
        if task.state in (pb.TASK_STATE_PENDING, pb.TASK_STATE_RUNNING):
            cluster.stub().Cancel(pb.CancelRequest(id=task.id), timeout=10)
    wait_for("both nodes to be empty",
             lambda: all(node.running == 0 and not node.reserved_task
                         for node in cluster.list_nodes()))


def opened_tasks(cluster: Cluster) -> list[pb.Task]:
    return list(cluster.stub().ListTasks(pb.ListTasksRequest(page_size=1000), timeout=10).tasks)


def _set_reserve_after(cluster: Cluster, seconds: float) -> None:
    """Write the cluster settings record (what `filch cluster set reserve-after` writes)."""
    async def put() -> None:
        store = Store(endpoint=cluster.nodes[0].etcd_endpoint)
        try:
            value = pb.ClusterSettings(reserve_after_seconds=seconds).SerializeToString()
            await store._call(lambda: store._client.put(keys.CLUSTER_SETTINGS, value), "put")
        finally:
            await store.close()
    asyncio.run(put())


def _wait_running(client: Client, task_ids: list[str]) -> list[pb.Task]:
    def check() -> list[pb.Task] | None:
        tasks = [client.get(task_id) for task_id in task_ids]
        return tasks if all(task.state == pb.TASK_STATE_RUNNING for task in tasks) else None
    return wait_for(f"{len(task_ids)} tasks to run", check)


def test_the_holder_shows_in_status_takes_no_lower_work_and_then_the_task(
        cluster: Cluster, client: Client) -> None:
    fillers = [client.submit(command="sleep", args=["60"], cpu_millis=1000).id
               for _ in range(4)]
    placed = _wait_running(client, fillers)
    lows = [client.submit(command="true", cpu_millis=1000).id for _ in range(6)]
    big = client.submit(command="sleep", args=["0.2"], cpu_millis=2000, priority=100)
    waits = sum(cluster.metrics(index).get("filch_reservation_wait_seconds_count", 0.0)
                for index in range(2))

    def reserved() -> dict[str, object] | None:
        shown = json.loads(cluster.cli("status", big.id, "-o", "json", check=True).stdout)
        assert shown["state"] == "PENDING"
        return shown if shown.get("reserved_node") else None

    shown = wait_for("status to show a node holding room", reserved, timeout=RESERVE_AFTER + 15)
    holder = str(shown["reserved_node"])
    assert holder in {node.name for node in cluster.nodes} and shown["reserved_since"]
    assert f"reserved: {holder} since " in str(shown["message"])
    assert str(shown["message"]).endswith("(waiting for 2 CPUs)")
    text = cluster.cli("status", big.id, check=True).stdout
    assert f"reserved: {holder} since" in text
    # The holder's first free CPU goes to no queued low task; its second one to the task.
    on_holder = [task.id for task in placed if task.node_name == holder]
    assert len(on_holder) == 2
    client.cancel(on_holder[0])
    wait_for("the holder to have a CPU free", lambda: any(
        node.name == holder and node.cpu_allocated_millis == 1000
        for node in cluster.list_nodes()))
    client.cancel(on_holder[1])
    started = cluster.wait_state(big.id, (pb.TASK_STATE_RUNNING, pb.TASK_STATE_COMPLETE),
                                 timeout=20)
    assert started.node_name == holder
    assert all(client.get(task_id).state == pb.TASK_STATE_PENDING for task_id in lows)
    wait_for("the reservation to end and its wait to be counted", lambda: sum(
        cluster.metrics(index).get("filch_reservation_wait_seconds_count", 0.0)
        for index in range(2)) == waits + 1)


def test_a_large_high_priority_task_starts_within_reserve_after_plus_the_longest_low_task(
        cluster: Cluster, client: Client) -> None:
    array = client.submit_array(
        pb.TaskSpec(command="sh", args=["-c", LOW_COMMAND], cpu_millis=1000,
                    memory_bytes=64 << 20),
        pb.ArraySpec(start=1, end=LOW_TASKS))
    wait_for("the low tasks to fill all 4 slots",
             lambda: sum(node.running for node in cluster.list_nodes()) == 4)
    big = client.submit(command="true", cpu_millis=2000, memory_bytes=64 << 20, priority=100)
    started = cluster.wait_state(big.id, (pb.TASK_STATE_RUNNING, pb.TASK_STATE_COMPLETE),
                                 timeout=LOW_TASKS * LOW_SECONDS)
    waited = (started.started_at.ToNanoseconds() - started.submitted_at.ToNanoseconds()) / 1e9
    queued = sum(client.get(task_id).state == pb.TASK_STATE_PENDING
                 for task_id in array.task_ids)
    print(f"2-CPU priority-100 task started {waited:.2f}s after its submit "
          f"(bound {RESERVE_AFTER + LOW_SECONDS + SLACK:.1f}s), {queued} low tasks queued")
    client.cancel_array(array.array_id)
    assert waited <= RESERVE_AFTER + LOW_SECONDS + SLACK, (
        f"the task waited {waited:.1f}s; {queued} low tasks were still queued")
    assert queued > 0, "the array drained before the big task started: nothing was starved"
