"""At a 2 s lease, a busy node keeps its lease, and a dead node's tasks move in seconds.

A healthy node must not fence itself because its event loop was busy (a burst of
synchronous work) while the host's CPUs were saturated: the renewals run on a thread of
their own. And a SIGKILLed node's task runs again elsewhere within a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

TTL = 2
# Failover target at TTL 2 (issue 19): the test allows twice as much, timing on a shared host.
FAILOVER_TARGET = 3.0
# The loop of node 1 is held this long at its first task start: longer than the whole fence
# budget after a renewal (TTL - 0.5 s margin = 1.5 s), so a renewal sent from that loop
# always comes too late.
BLOCK = 1.7
HOG_SECONDS = 15


@pytest.fixture(scope="module")
def ttl2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    cluster = Cluster(tmp_path_factory.mktemp("ttl2"), size=3, lease_ttl=TTL,
                      executor="process")
    cluster.nodes[0].env["FILCH_FAILPOINTS"] = f"runner.before_start=1*block({BLOCK})"
    # Only node 1 fits a 1-CPU task: the blocked loop is its.
    for node in cluster.nodes[1:]:
        node.args[node.args.index("--cpus") + 1] = "0.5"
    with cluster:
        yield cluster


def _hogs(count: int) -> list[subprocess.Popen[bytes]]:
    """CPU hogs, bounded in time (they exit by themselves after HOG_SECONDS)."""
    return [subprocess.Popen(["timeout", str(HOG_SECONDS), "sh", "-c", "while :; do :; done"],
                             stdout=subprocess.DEVNULL, start_new_session=True)
            for _ in range(count)]


def _fences(cluster: Cluster, index: int) -> float:
    return cluster.metrics(index)["filch_self_fences_total"]


def test_a_blocked_loop_on_a_loaded_host_does_not_fence_at_ttl_2(ttl2: Cluster) -> None:
    hogs = _hogs(os.cpu_count() or 2)
    try:
        # Node 1's loop is held as the first of them starts.
        ids = [ttl2.submit("sleep", "0.2", index=0, restart=False, cpu_millis=1000)
               for _ in range(2)]
        records = ttl2.wait_finished(ids, timeout=60)
    finally:
        for hog in hogs:     # the group: `timeout` does not pass SIGKILL on to the shell
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()
    assert ttl2.nodes[0].log_text().count("blocked the loop") == 1
    assert {record.node_name for record in records} == {ttl2.nodes[0].name}
    assert [_fences(ttl2, i) for i in range(3)] == [0, 0, 0]
    for record in records:
        assert record.state == pb.TASK_STATE_COMPLETE and record.exit_code == 0, record
        assert record.attempt == 1, record      # never requeued: its node never fenced
    assert len(ttl2.list_nodes()) == 3


def test_a_killed_nodes_task_runs_again_elsewhere_within_the_target(ttl2: Cluster) -> None:
    task_id = ttl2.submit("sleep", "60", index=2, cpu_millis=100)
    first = ttl2.wait_state(task_id, (pb.TASK_STATE_RUNNING,), timeout=30)
    victim = next(i for i, node in enumerate(ttl2.nodes) if node.name == first.node_name)
    killed = time.monotonic()
    ttl2.nodes[victim].kill_hard()
    moved = wait_for("the task to run on another node",
                     lambda: (lambda t: t if t.attempt >= 2 and t.state == pb.TASK_STATE_RUNNING
                              else None)(ttl2.any_stub().GetTask(
                                  pb.GetTaskRequest(id=task_id), timeout=5)),
                     timeout=30, interval=0.05)
    seconds = time.monotonic() - killed
    print(f"failover at ttl {TTL}: {seconds:.2f} s")
    assert moved.node_name != first.node_name
    assert seconds < 2 * FAILOVER_TARGET, seconds
    ttl2.any_stub().Cancel(pb.CancelRequest(id=task_id), timeout=5)
