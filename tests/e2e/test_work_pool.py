"""Issue 19, target 2: /work images made ahead of time (node/running/runtime/workpool.py)
and the attempt steps timed (filch_attempt_step_seconds).

As an attacker: a task leaves files in its /work; the tasks after it on the same node,
several of them on images from the pool, find an empty file system, and cannot reach the
pool. A SIGKILLed agent's pool is gone once the node restarts; a stopped node keeps none.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.running.runtime import scratch, workpool
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

DISK = 8 * 1024 * 1024
LEAVE_BEHIND = ("echo secret > /work/secret; mkdir /work/dir; echo x > /work/dir/x; "
                "chmod 4755 /work/secret; ls -A /work")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    cluster = Cluster(tmp_path_factory.mktemp("workpool") / "cluster", size=1,
                      extra=("--default-disk", str(DISK)))
    with cluster:
        yield cluster


def pool_dir(cluster: Cluster) -> Path:
    return cluster.nodes[0].data_dir / "work-pool"


def run_logged(cluster: Cluster, script: str) -> str:
    task_id = cluster.submit("sh", "-c", script, network="none")
    task = cluster.wait_finished([task_id])[0]
    assert task.state == pb.TASK_STATE_COMPLETE and task.exit_code == 0, task
    return (cluster.nodes[0].data_dir / "logs" / task_id / f"{task.attempt}.log").read_text()


def answers(cluster: Cluster) -> bool:
    try:
        return bool(cluster.list_nodes())
    except grpc.RpcError:
        return False


def test_the_next_tasks_find_nothing_of_the_last_one(node: Cluster) -> None:
    assert "secret" in run_logged(node, LEAVE_BEHIND)
    # More than the pool holds, one after another: the later ones take pooled images.
    for _ in range(workpool.POOL_DEPTH + 2):
        seen = run_logged(node, f"ls -A /work; ls {pool_dir(node)} 2>&1 || true")
        assert seen.splitlines()[0] == "lost+found", seen
        assert "secret" not in seen and "dir" not in seen.splitlines(), seen
        assert "No such file or directory" in seen, seen   # the pool is not in the task
    samples = node.metrics(0)
    # The images came from the pool, and every step was timed.
    assert samples[f'filch_work_pool_images{{size="{DISK}"}}'] >= 1
    assert samples['filch_attempt_step_seconds_count{step="work"}'] >= workpool.POOL_DEPTH + 3
    for step in ("bundle", "run", "teardown", "etcd"):
        assert samples[f'filch_attempt_step_seconds_count{{step="{step}"}}'] >= 1
    mode = os.stat(pool_dir(node))
    assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == 0


def test_a_killed_agents_pool_is_gone_after_restart_and_a_stopped_one_keeps_none(
        node: Cluster) -> None:
    wait_for("the pool to fill", lambda: len(os.listdir(pool_dir(node))) >= 1, timeout=30)
    agent = node.nodes[0]
    assert agent.process is not None
    agent.process.kill()
    agent.process.wait(timeout=30)
    left = {entry.inode() for entry in os.scandir(pool_dir(node))}
    assert left
    agent.start()
    wait_for("the restarted node's API", lambda: answers(node), timeout=60)
    assert run_logged(node, "true") == ""
    now = {entry.inode() for entry in os.scandir(pool_dir(node))}
    assert not left & now, "images of the killed agent's pool are still there"
    assert not scratch.mounted_under(agent.data_dir)
    agent.stop()
    assert not pool_dir(node).exists()
    agent.start()        # the module's cluster stops it again at the end
