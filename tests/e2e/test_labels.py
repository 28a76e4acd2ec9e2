"""Labels, taints and constraints, the start back-off (the black hole) and why a task waits,
on one real three-node runc cluster:
- node-2 is labelled zone=gpu: 100 tasks constrained to it all run there;
- node-3's task network setup fails (failpoint network.attach, what a node without a
  working nft/ip sees): it backs off after 3 node-side start failures, the others drain the
  queue, and no task ends START_FAILED or spends a retry;
- a task no live node satisfies waits, says so, and runs once a matching node joins;
- why-pending names the reason: constraint, CPU, dependency, retry back-off."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from node._gen.filch.v1 import filch_pb2 as pb
from node.scheduling.startfailures import FAILURES_TO_BACK_OFF, FIRST_BACKOFF
from tests.e2e.cluster import Cluster, Node, wait_for
from tests.e2e.conftest import require_tools

pytestmark = pytest.mark.timeout(240)

DONE = (pb.TASK_STATE_COMPLETE, pb.TASK_STATE_CANCELED)


def seconds(stamp: Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_tools()
    root = Path(tempfile.mkdtemp(prefix="filch-labels-"))
    root.chmod(0o755)
    made = Cluster(root, size=3, cpus=2)
    made.nodes[1].args += ["--label", "zone=gpu", "--label", "rack=r2"]
    made.nodes[2].env["FILCH_FAILPOINTS"] = "network.attach=error(executor)"
    try:
        with made as started:
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_black_hole_node_backs_off_and_others_drain(cluster: Cluster) -> None:
    broken = cluster.nodes[2].name
    ids = [cluster.submit("/bin/true", index=number % 3) for number in range(30)]
    tasks = cluster.wait_finished(ids, timeout=90)
    assert all(task.state == pb.TASK_STATE_COMPLETE and task.reason == pb.REASON_EXITED
               and task.exit_code == 0 for task in tasks), [t.message for t in tasks]
    assert all(task.node_name != broken for task in tasks)
    assert all(task.retries_used == 0 for task in tasks)
    bounced = [a for task in tasks for a in task.attempts if a.node_name == broken]
    assert bounced and all(a.reason == pb.REASON_START_FAILED for a in bounced)
    # Backing off: once its FAILURES_TO_BACK_OFF-th start failed, node-3 takes nothing
    # until FIRST_BACKOFF has passed. Steals already in flight may still land (how many
    # depends on the machine's load, so no fixed count): a second of slack on each side.
    ends = sorted(seconds(a.finished_at) for a in bounced)
    if len(ends) >= FAILURES_TO_BACK_OFF:
        began = ends[FAILURES_TO_BACK_OFF - 1]
        during = [seconds(a.started_at) - began for a in bounced
                  if began + 1 < seconds(a.started_at) < began + FIRST_BACKOFF - 1]
        assert not during, f"node-3 started tasks {during} s into its back-off"
    print(f"{len(bounced)} attempts bounced off node-3")
    node = wait_for("node-3 to show its back-off", lambda: next(
        (n for n in cluster.list_nodes() if n.name == broken and n.start_backoff), None), 20)
    assert node.node_side_start_failures >= 3 and "failpoint" in node.start_failure
    samples = cluster.metrics(2)
    assert samples["filch_start_backoff"] == 1
    assert samples["filch_node_side_start_failures_total"] >= 3
    listed = cluster.cli("nodes")
    assert "START-BACKOFF" in listed.stdout and "zone=gpu" in listed.stdout


def test_constrained_tasks_run_only_on_the_labelled_node(cluster: Cluster) -> None:
    began = time.monotonic()
    ids = [cluster.submit("/bin/true", index=number % 3, constraints=["zone=gpu"],
                          cpu_millis=100) for number in range(100)]
    tasks = cluster.wait_finished(ids, timeout=120)
    assert {task.node_name for task in tasks} == {cluster.nodes[1].name}
    assert all(task.reason == pb.REASON_EXITED and task.exit_code == 0 for task in tasks)
    print(f"100 constrained tasks in {time.monotonic() - began:.1f}s")


def test_bad_constraint_is_refused_in_one_line(cluster: Cluster) -> None:
    result = cluster.cli("submit", "--constraint", "zone==gpu", "--", "/bin/true")
    assert result.returncode != 0
    assert "zone==gpu" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _message(cluster: Cluster, task_id: str, needle: str) -> pb.Task:
    return wait_for(f"{task_id}'s message to say {needle!r}",
                    lambda: (task := cluster.get(task_id)).state == pb.TASK_STATE_PENDING
                    and needle in task.message and task, timeout=20)


def test_why_pending_names_the_reason(cluster: Cluster) -> None:
    # Constraint: no live node has it.
    nowhere = cluster.submit("/bin/true", constraints=["zone=moon"])
    task = _message(cluster, nowhere, "no live node satisfies constraint 'zone=moon'")
    assert task.ahead >= 0 and not task.ahead_capped
    # CPU: node-2 (the only zone=gpu node) is busy with 1.5 of its 2 CPUs.
    blocker = cluster.submit("/bin/sleep", "30", constraints=["zone=gpu"], cpu_millis=1500)
    cluster.wait_state(blocker, (pb.TASK_STATE_RUNNING,))
    big = cluster.submit("/bin/true", constraints=["zone=gpu"], cpu_millis=1000)
    _message(cluster, big, "no node has 1 CPUs free (the largest free is 0.5)")
    status = cluster.cli("status", big)
    assert "ahead" in status.stdout and "CPUs free" in status.stdout
    # Dependency.
    child = cluster.submit("/bin/true", after=[pb.Dependency(id=blocker)])
    _message(cluster, child, blocker)
    # Retry back-off.
    flaky = cluster.submit("/bin/false", retries=1, retry_backoff_seconds=120)
    _message(cluster, flaky, "retry back-off until")
    for task_id in (blocker, big, child, flaky, nowhere):
        cluster.stub().Cancel(pb.CancelRequest(id=task_id), timeout=10)


def test_unsatisfiable_task_runs_when_a_matching_node_joins(cluster: Cluster) -> None:
    task_id = cluster.submit("/bin/true", constraints=["later=yes"])
    _message(cluster, task_id, "no live node satisfies constraint 'later=yes'")
    first = cluster.nodes[0]
    ip = first.ip.rsplit(".", 1)[0] + ".9"
    data = first.data_dir.parent / "late-node"
    late = Node("late-node", ip, data, [
        "--name", f"late-{first.name}", "--data-dir", str(data), "--listen", f"{ip}:7070",
        "--etcd-endpoint", first.etcd_endpoint, "--cpus", "1", "--memory", "1Gi",
        "--executor", "process", "--lease-ttl", "5", "--sweep-interval", "1",
        "--label", "later=yes"])
    began = time.monotonic()
    late.start()
    try:
        task = cluster.wait_state(task_id, DONE, timeout=30)
        took = time.monotonic() - began
        assert task.node_name == f"late-{first.name}" and task.reason == pb.REASON_EXITED
        print(f"unsatisfiable task ran {took:.1f}s after its node was started")
        assert took < 20
    finally:
        late.stop()
        late.kill_hard()
