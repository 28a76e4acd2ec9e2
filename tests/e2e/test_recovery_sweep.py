"""The recovery sweep: when no node hears that a node died (its deletion event dropped by a
failpoint, as a watch behind compaction would miss it), the one node holding the
recovery-sweep claim finds the dead node's tasks in the running-task index (/placed/) —
reading index keys, not the queue's records — and if that holder stops mid-sweep another
node takes the claim once the holder's lease expires and finishes the job.

The holder is frozen (SIGSTOP), not killed: every node's etcd member dies with its agent,
and after the victim's a second dead member would take the quorum with it. Frozen or
killed is the same to the cluster (its lease expires); frozen also lets the test thaw it
and check that its stale sweep then writes nothing.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# Seconds the sweep holder sleeps, once, after finding lost tasks and before handing them
# back: the window in which the test kills it.
SWEEP_STALL = 6
FAILPOINTS = ("recovery.node_deleted=error(unavailable);"
              f"recovery.before_sweep_recover=1*sleep({SWEEP_STALL})")
# Tasks no node can fit: a queue the sweep must not read.
BACKLOG = 30


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path, size=3, executor="process",
                 extra=("--recovery-sweep-interval", "1"),
                 env={"FILCH_FAILPOINTS": FAILPOINTS}) as started:
        yield started


def _holder(cluster: Cluster) -> int:
    """Index of the node holding the recovery-sweep claim."""
    def read() -> str | None:
        found = cluster.etcd_keys().get("/lock/recovery-sweep")
        return None if found is None else found["value"]     # type: ignore[return-value]
    node_id = base64.b64decode(wait_for("a node to claim the sweep", read, timeout=30)).decode()
    name = next(node.name for node in cluster.list_nodes() if node.id == node_id)
    return next(i for i, node in enumerate(cluster.nodes) if node.name == name)


@pytest.mark.timeout(180)
def test_a_holder_killed_mid_sweep_is_taken_over_and_nothing_is_lost(cluster: Cluster) -> None:
    restartable = [cluster.submit("sleep", "300", index=i % 3, cpu_millis=500)
                   for i in range(6)]
    once_only = [cluster.submit("sleep", "300", index=i % 3, cpu_millis=500, restart=False)
                 for i in range(6)]
    every = restartable + once_only

    def all_running() -> list[pb.Task] | None:
        tasks = [cluster.get(task_id) for task_id in every]
        return tasks if all(t.state == pb.TASK_STATE_RUNNING for t in tasks) else None

    tasks = {t.id: t for t in wait_for("every task to run (4 per node)", all_running, timeout=60)}
    backlog = [cluster.submit("true", cpu_millis=64_000) for _ in range(BACKLOG)]
    holder = _holder(cluster)
    victim = next(i for i in range(3) if i != holder)
    heir = next(i for i in range(3) if i not in (holder, victim))
    dead = {cluster.nodes[victim].name, cluster.nodes[holder].name}
    lost = {i for i, t in tasks.items() if t.node_name in dead}
    assert len(lost) == 8

    # The agent only (its etcd member lives on: two members keep quorum): its lease
    # expires, its deletion event is dropped everywhere, only the sweep can find its tasks.
    assert cluster.nodes[victim].process is not None
    cluster.nodes[victim].process.kill()
    killed = time.monotonic()
    wait_for("the holder to stall in its sweep",
             lambda: "failpoint recovery.before_sweep_recover" in cluster.nodes[holder].log_text(),
             timeout=30, interval=0.05)
    holder_process = cluster.nodes[holder].process
    assert holder_process is not None
    os.kill(holder_process.pid, signal.SIGSTOP)

    def get(task_id: str) -> pb.Task:
        # Through the heir: the frozen holder's API would not answer.
        return cluster.stub(heir).GetTask(pb.GetTaskRequest(id=task_id), timeout=10)

    def recovered() -> bool:
        now = {i: get(i) for i in lost}
        return all(t.state != pb.TASK_STATE_RUNNING or t.attempt > 1 for t in now.values())

    wait_for("the heir to take the sweep over and recover both dead nodes' tasks", recovered,
             timeout=90, interval=0.2)
    took = time.monotonic() - killed
    for task_id in lost:
        task = get(task_id)
        if task_id in once_only:
            assert (task.state, task.reason) == (pb.TASK_STATE_COMPLETE, pb.REASON_NODE_LOST)
        else:
            # The heir is full (its 4 tasks run on): requeued, waiting.
            assert (task.state, task.attempt) == (pb.TASK_STATE_PENDING, 1), task
            assert "recovery sweep" in task.message
    samples = cluster.metrics(heir)
    requeued = samples['filch_requeues_total{cause="scan"}']
    node_lost = samples["filch_tasks_node_lost_total"]
    records = samples['filch_recovery_keys_read_total{kind="record"}']
    placed = samples['filch_recovery_keys_read_total{kind="placed"}']
    print(f"\nvictim killed -> both dead nodes' {len(lost)} tasks recovered by the heir: "
          f"{took:.1f}s (lease 5 s, sweep every 1 s, holder stalled {SWEEP_STALL} s); heir "
          f"read {placed:.0f} index keys and {records:.0f} records in "
          f"{samples['filch_recovery_sweeps_total']:.0f} sweeps; {len(backlog)} queued "
          "records never read")
    # Thawed, the old holder wakes up in the middle of its sweep with a claim its lost
    # lease took away: its hand-backs find the tasks moved and write nothing. (Then it
    # fences, registers anew with room, and may steal the requeued tasks: that is fine.)
    os.kill(holder_process.pid, signal.SIGCONT)
    wait_for("the thawed holder to finish its stalled sweep",
             lambda: "failpoint recovery.before_sweep_recover: slept"
             in cluster.nodes[holder].log_text(), timeout=30)
    holder_samples = wait_for("the thawed holder's metrics",
                              lambda: _metrics_or_none(cluster, holder), timeout=30)
    assert holder_samples['filch_requeues_total{cause="scan"}'] == 0
    assert holder_samples["filch_tasks_node_lost_total"] == 0
    assert (requeued, node_lost) == (len(lost & set(restartable)), len(lost & set(once_only)))
    # One record per lost task, none of the backlog's: the sweep reads index keys only.
    assert records == len(lost)
    assert get(backlog[0]).state == pb.TASK_STATE_PENDING
    assert "recovery sweep: recovered 8 tasks" in cluster.nodes[heir].log_text()


def _metrics_or_none(cluster: Cluster, index: int) -> dict[str, float] | None:
    try:
        return cluster.metrics(index)
    except OSError:
        return None
