"""Race windows held open with failpoints (node/etcd/failpoints.py), on real runc and etcd.

Each test widens one window that is microseconds wide in production, so it is hit every
run: a cancel while the container starts, and a steal whose commit landed but whose
answer was lost (run by the sweep, or handed back when the node has filled up). A steal
or a start in flight during a self-fence: tests/e2e/faults/test_fence_race.py.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# How long the failpoint holds the answer of executor.start() (the container runs
# already): long enough to cancel inside it.
START_STALL = 2.0

# SIGTERM -> SIGKILL for a canceled task (the agent's --cancel-grace); `sleep` as PID 1
# ignores SIGTERM, so the container dies only at the end of the grace.
CANCEL_GRACE = 2.0

# Scheduling noise on a loaded 2-core machine (runc kill, the revocation watch).
SLACK = 3.0


def task_pids(task_id: str) -> list[int]:
    """Host pids of every process whose environment names this task (its container)."""
    marker = f"FILCH_TASK_ID={task_id}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def containers(cluster: Cluster) -> str:
    root = cluster.nodes[0].data_dir / "runc"
    return subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True,
                          text=True, check=True, timeout=10).stdout


def record_revision(cluster: Cluster, task_id: str) -> int:
    return int(cluster.etcd_keys()[f"/task/{task_id}"]["mod_revision"])  # type: ignore[call-overload]


def test_cancel_while_the_container_starts_stops_it(tmp_path: Path) -> None:
    """Window: a cancel arrives while executor.start() is awaited (runc already runs the
    container). The attempt is marked revoked, but there is no handle to stop yet, and
    nothing looked at that mark once start() returned: the container ran to its end
    although the task was CANCELED."""
    require_tools()
    failpoint = f"runner.after_start=sleep({START_STALL})"
    with Cluster(tmp_path, size=1, env={"FILCH_FAILPOINTS": failpoint},
                 extra=("--cancel-grace", str(CANCEL_GRACE))) as cluster:
        node = cluster.nodes[0]
        task_id = cluster.submit("sleep", "300")
        wait_for("the start to stall at the failpoint",
                 lambda: "failpoint runner.after_start" in node.log_file.read_text(),
                 timeout=20, interval=0.02)
        wait_for("the container to run", lambda: task_id in containers(cluster), timeout=10,
                 interval=0.02)
        canceled_at = time.monotonic()
        assert "CANCELED" in cluster.cli("cancel", task_id, check=True).stdout
        revision = record_revision(cluster, task_id)
        # start() answers START_STALL after the stall began; the container must then be
        # stopped within the cancel grace.
        bound = START_STALL + CANCEL_GRACE + SLACK
        wait_for("the canceled task's container and processes to be gone",
                 lambda: task_id not in containers(cluster) and not task_pids(task_id),
                 timeout=max(0.1, bound - (time.monotonic() - canceled_at)), interval=0.1)
        task = cluster.get(task_id)
        assert (task.state, task.reason, task.attempt) == (
            pb.TASK_STATE_CANCELED, pb.REASON_CANCELED, 1)
        # CANCELED once: nothing wrote the record after the cancel (no late result).
        assert record_revision(cluster, task_id) == revision
        assert "/task/status/canceled/" in " ".join(cluster.etcd_keys())


def test_steal_answered_with_an_error_still_runs(tmp_path: Path) -> None:
    """Window: the steal transaction committed, but its answer was an error (deadline
    exceeded, leader changed). The stealer released the resources and never launched;
    the running key stayed on a healthy lease, so the task stayed RUNNING forever and
    `--wait` hung. The runner now adopts running keys of its own with no attempt."""
    require_tools()
    with Cluster(tmp_path, size=1,
                 env={"FILCH_FAILPOINTS": "stealer.after_commit=1*error(deadline)"}) as cluster:
        node = cluster.nodes[0]
        try:
            result = cluster.cli("submit", "--wait", "--", "sh", "-c", "echo ran; exit 7",
                                 timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("submit --wait hung: the task stayed RUNNING") from None
        assert "failpoint stealer.after_commit: error(deadline)" in node.log_file.read_text()
        assert result.returncode == 7, result.stderr
        task_id = result.stdout.strip()
        task = cluster.get(task_id)
        assert (task.state, task.reason, task.exit_code) == (
            pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 7)
        assert cluster.cli("logs", task_id, check=True).stdout == "ran\n"
        # One container ran it: the adopted attempt, not a second one besides it.
        assert task.attempt == 1
        assert not task_pids(task_id)


def test_steal_answered_with_an_error_is_handed_back_when_full(tmp_path: Path) -> None:
    """The same lost answer on a node that filled up meanwhile: the orphaned running key
    is handed back to the queue (requeued, as recovery would) and runs once there is
    room. runner.before_adopt holds the sweep until the stealer has taken the next task."""
    require_tools()
    failpoint = "stealer.after_commit=1*error(leader);runner.before_adopt=1*sleep(2)"
    with Cluster(tmp_path, size=1, cpus=1, env={"FILCH_FAILPOINTS": failpoint}) as cluster:
        node = cluster.nodes[0]
        # Each takes the whole node: the first steal (answer lost) is `lost`, then the
        # stealer takes `holder`, which still runs when the sweep looks at `lost`.
        lost = cluster.submit("sh", "-c", "echo lost", cpu_millis=1000)
        holder = cluster.submit("sleep", "4", cpu_millis=1000)
        tasks = {task.id: task for task in cluster.wait_finished([lost, holder], timeout=60)}
        log = node.log_file.read_text()
        assert "failpoint stealer.after_commit: error(leader)" in log
        assert f"task {lost} attempt 1: its steal's answer was lost and it no longer fits: " \
               "handed back" in log
        assert (tasks[lost].state, tasks[lost].reason, tasks[lost].attempt) == (
            pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 2)
        assert cluster.cli("logs", lost, check=True).stdout == "lost\n"
        assert (tasks[holder].reason, tasks[holder].attempt) == (pb.REASON_EXITED, 1)
        assert cluster.metrics(0)['filch_requeues_total{cause="lost_answer"}'] == 1
