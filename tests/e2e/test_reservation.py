"""No starvation on a real two-node cluster (process executor, 2 CPUs a node): a 2-CPU
priority-100 task behind a 1-CPU priority-0 array that keeps both nodes full starts within
reserve-after plus the longest low task (plus steal and record pacing), not after the
array drained, and `filch status -o json` shows which node holds room for it meanwhile."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
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
# 40 * 2.7 / 4 = 27 s, with tasks still queued all along. Their lengths differ (2 s to
# LOW_SECONDS by index), so that a node's two tasks do not end together: a node emptied
# at once would let the big task in without any reservation.
LOW_TASKS = 40
LOW_COMMAND = "sleep $(echo $FILCH_ARRAY_INDEX | awk '{print 2 + ($1 % 5) * 0.37}')"
LOW_SECONDS = 2 + 4 * 0.37
# Steal delay, the holder's reservation check (reservation.CHECK_INTERVAL = 1 s) and its
# record's publication, and a loaded shared machine.
SLACK = 3.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_tools()
    root = Path(tempfile.mkdtemp(prefix="filch-reserve-"))
    root.chmod(0o755)
    try:
        with Cluster(root, size=2, cpus=CPUS, executor="process") as started:
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


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


def test_a_large_high_priority_task_starts_within_reserve_after_plus_the_longest_low_task(
        cluster: Cluster) -> None:
    _set_reserve_after(cluster, RESERVE_AFTER)
    with Client(cluster.nodes[0].address) as client:
        array = client.submit_array(
            pb.TaskSpec(command="sh", args=["-c", LOW_COMMAND], cpu_millis=1000,
                        memory_bytes=64 << 20),
            pb.ArraySpec(start=1, end=LOW_TASKS))
        wait_for("the low tasks to fill all 4 slots",
                 lambda: sum(node.running for node in cluster.list_nodes()) == 4)
        big = client.submit(command="true", cpu_millis=2000, memory_bytes=64 << 20,
                            priority=100)
        submitted = time.monotonic()
        seen: list[dict[str, object]] = []

        def reserved_or_started() -> bool:
            shown = json.loads(cluster.cli("status", big.id, "-o", "json", check=True).stdout)
            if shown["state"] == "PENDING" and shown.get("reserved_node"):
                seen.append(shown)
            return bool(seen) or shown["state"] != "PENDING"

        wait_for("the big task to be reserved for or to start", reserved_or_started,
                 timeout=RESERVE_AFTER + LOW_SECONDS + 30, interval=0.1)
        started = cluster.wait_state(big.id, (pb.TASK_STATE_RUNNING, pb.TASK_STATE_COMPLETE),
                                     timeout=LOW_TASKS * LOW_SECONDS)
        waited = (started.started_at.ToNanoseconds() - started.submitted_at.ToNanoseconds()) / 1e9
        print(f"2-CPU priority-100 task started {waited:.2f}s after its submit "
              f"(bound {RESERVE_AFTER + LOW_SECONDS + SLACK:.1f}s; "
              f"wall {time.monotonic() - submitted:.2f}s)")
        queued = sum(client.get(task_id).state == pb.TASK_STATE_PENDING
                     for task_id in array.task_ids)
        client.cancel_array(array.array_id)
    assert seen, "status never showed a reservation while the task waited"
    names = {node.name for node in cluster.nodes}
    assert seen[0]["reserved_node"] in names and seen[0]["reserved_since"]
    assert waited <= RESERVE_AFTER + LOW_SECONDS + SLACK, (
        f"the task waited {waited:.1f}s; {queued} low tasks were still queued")
    assert queued > 0, "the array drained before the big task started: nothing was starved"
    # The holder let go once its task started, and counted how long it held room.
    wait_for("no node to hold a reservation",
             lambda: not any(node.reserved_task for node in cluster.list_nodes()))
    assert sum(cluster.metrics(index).get("filch_reservation_wait_seconds_count", 0.0)
               for index in range(2)) == 1
