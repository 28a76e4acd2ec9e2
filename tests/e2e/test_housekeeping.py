"""Housekeeping on a real node: retention deletes exactly the old finished tasks, and etcd
compaction plus defragmentation shrink the database after a burst of finished tasks."""

from __future__ import annotations

import base64
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.limits import ETCD_KEY_OVERHEAD_BYTES
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# Fast housekeeping so the test sees several rounds; the process executor so that 10,000
# tasks are bounded by etcd, not by container start-up.
FAST = ("--housekeeping-interval", "1", "--compaction-interval", "3",
        "--compaction-keep", "100", "--defrag-threshold", "1Mi")


@pytest.fixture
def retention_node(tmp_path: Path) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path, size=1, executor="process",
                 extra=("--retention", "4", *FAST)) as cluster:
        yield cluster


def test_retention_deletes_old_finished_tasks_only(retention_node: Cluster) -> None:
    cluster = retention_node
    running = cluster.submit("sleep", "300")
    never_fits = cluster.submit("true", cpu_millis=500_000)
    old = [cluster.submit("true") for _ in range(3)]
    canceled_old = cluster.submit("true", cpu_millis=500_000)
    cluster.cli("cancel", canceled_old, check=True)
    cluster.wait_finished(old)
    # Awaited, not slept past: retention deletes them once they are 4 s old.
    wait_for("the old finished tasks to be deleted",
             lambda: not any(key.endswith(task_id) for key in cluster.etcd_keys()
                             for task_id in [*old, canceled_old]), timeout=20)
    recent = cluster.submit("true")
    cluster.wait_finished([recent])
    survivors = {task_id: cluster.get(task_id).state for task_id in (running, never_fits, recent)}
    assert survivors == {running: pb.TASK_STATE_RUNNING, never_fits: pb.TASK_STATE_PENDING,
                         recent: pb.TASK_STATE_COMPLETE}
    result = cluster.cli("status", old[0])
    assert result.returncode == 1 and "no task" in result.stderr
    samples = cluster.metrics(0)
    assert samples['filch_tasks_deleted_total{state="complete"}'] >= 3
    assert samples['filch_tasks_deleted_total{state="canceled"}'] >= 1


def test_max_finished_keeps_the_newest(tmp_path: Path) -> None:
    require_tools()
    with Cluster(tmp_path, size=1, executor="process",
                 extra=("--max-finished", "3", *FAST)) as cluster:
        ids = []
        for _ in range(6):
            ids.append(cluster.submit("true"))
            cluster.wait_finished(ids[-1:])
        wait_for("only 3 finished tasks to remain",
                 lambda: len(list(cluster.any_stub().ListTasks(pb.ListTasksRequest()).tasks)) == 3,
                 timeout=20)
        kept = {task.id for task in cluster.any_stub().ListTasks(pb.ListTasksRequest()).tasks}
        assert kept == set(ids[3:])


def audit_bytes(cluster: Cluster) -> int:
    """What the audit trail holds in etcd: its keys and values, and etcd's per-key cost."""
    return sum(len(key) + len(base64.b64decode(str(kv.get("value", "")))) +
               ETCD_KEY_OVERHEAD_BYTES
               for key, kv in cluster.etcd_keys().items() if key.startswith("/audit/"))


def test_burst_of_10000_finished_tasks_is_compacted_and_defragmented(tmp_path: Path) -> None:
    require_tools()
    burst = 10_000
    with Cluster(tmp_path, size=1, executor="process", cpus=64,
                 extra=("--retention", "2", *FAST)) as cluster:
        stub = cluster.stub()
        spec = pb.TaskSpec(command="true", cpu_millis=10, memory_bytes=4 << 20)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(lambda _: stub.Submit(pb.SubmitRequest(spec=spec),
                                                      timeout=30).task.id, range(burst)))
        peak = 0.0

        def drained() -> bool:
            nonlocal peak
            samples = cluster.metrics(0)
            peak = max(peak, samples["filch_etcd_db_size_bytes"])
            left = sum(samples[f'filch_tasks{{state="{s}"}}']
                       for s in ("pending", "running", "complete"))
            return left == 0 and samples["filch_etcd_defrags_total"] >= 1

        wait_for("10,000 tasks to run and be cleaned up", drained, timeout=600, interval=1)
        elapsed = time.monotonic() - started
        # The submits' audit entries stay (audit-retention, 30 days by default): what
        # housekeeping must give back is the rest.
        kept = audit_bytes(cluster)
        samples = wait_for("a defragmentation after the last deletion",
                           lambda: (s := cluster.metrics(0))["filch_etcd_db_size_bytes"]
                           - kept < peak / 4 and s, timeout=60, interval=1)
        print(f"\n{burst} tasks in {elapsed:.0f}s; etcd db {peak / 1e6:.1f} MB at peak -> "
              f"{samples['filch_etcd_db_size_bytes'] / 1e6:.2f} MB after housekeeping, "
              f"{kept / 1e6:.2f} MB of it the audit trail "
              f"({samples['filch_etcd_compactions_total']:.0f} compactions, "
              f"{samples['filch_etcd_defrags_total']:.0f} defrags)")
        assert samples['filch_tasks_deleted_total{state="complete"}'] == burst
        # Compaction is a chore: one node (whichever holds /lock/compaction) compacts.
        assert sum(cluster.metrics(index)["filch_etcd_compactions_total"]
                   for index in range(len(cluster.nodes))) >= 1
        assert len(ids) == burst
