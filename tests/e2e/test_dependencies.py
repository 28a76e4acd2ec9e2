"""Dependencies end to end: order, failure cascades, unknown parents, a parent's node
killed mid-run, and retention that waits for dependents."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from tests.e2e.cluster import FILCH, Cluster, wait_for
from tests.e2e.conftest import require_tools


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path_factory.mktemp("deps"), size=3) as cluster:
        yield cluster


def after(*parents: str, kind: int = pb.DEPENDENCY_KIND_SUCCESS) -> list[pb.Dependency]:
    return [pb.Dependency(id=parent, kind=kind) for parent in parents]


def seconds(stamp: object) -> float:
    return stamp.ToNanoseconds() / 1e9  # type: ignore[attr-defined,no-any-return]


@pytest.mark.timeout(90)
def test_diamond_runs_in_order(cluster: Cluster) -> None:
    a = cluster.submit("sh", "-c", "sleep 1")
    b = cluster.submit("sh", "-c", "sleep 0.5", after=after(a), index=1)
    c = cluster.submit("true", after=after(a), index=2)
    d = cluster.submit("true", after=after(b, c))
    held = cluster.get(d)
    assert held.state == pb.TASK_STATE_PENDING and held.hold == pb.HOLD_DEPENDENCIES
    assert held.message.startswith("waiting for 2 dependencies: ")
    assert b in held.message and c in held.message
    tasks = dict(zip("abcd", cluster.wait_finished([a, b, c, d], timeout=60), strict=True))
    assert all(task.reason == pb.REASON_EXITED and task.exit_code == 0
               for task in tasks.values()), tasks
    for child, parents in (("b", "a"), ("c", "a"), ("d", "bc")):
        for parent in parents:
            assert seconds(tasks[child].started_at) >= seconds(tasks[parent].finished_at), \
                f"{child} started before {parent} finished"


@pytest.mark.timeout(90)
def test_failed_parent_fails_the_diamond_below_it(cluster: Cluster) -> None:
    a = cluster.submit("sh", "-c", "sleep 1; exit 1")
    b = cluster.submit("true", after=after(a))
    c = cluster.submit("true", after=after(a))
    env = dict(os.environ, FILCH_SERVER=cluster.nodes[0].address)
    waiting = subprocess.Popen([FILCH, "submit", "--wait", "--after", b, "--after", c, "--",
                                "true"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 125, (out, err)
    d = out.split()[0]
    tasks = cluster.wait_finished([a, b, c, d], timeout=30)
    assert tasks[0].state == pb.TASK_STATE_COMPLETE and tasks[0].exit_code == 1
    for task in tasks[1:]:
        assert task.state == pb.TASK_STATE_CANCELED, task
        assert task.reason == pb.REASON_DEPENDENCY_FAILED, task
        assert task.attempt == 0
    assert f"task {a} ended COMPLETE with exit code 1" in tasks[1].message
    assert "ended CANCELED (DEPENDENCY_FAILED)" in tasks[3].message
    # Submitted after the failure: created ended, the same outcome.
    late = cluster.get(cluster.submit("true", after=after(a)))
    assert late.state == pb.TASK_STATE_CANCELED and late.reason == pb.REASON_DEPENDENCY_FAILED
    # --after-any runs whatever the parent's end.
    anyway = cluster.submit("true", after=after(a, kind=pb.DEPENDENCY_KIND_ANY))
    assert cluster.wait_finished([anyway], timeout=30)[0].exit_code == 0


@pytest.mark.timeout(60)
def test_unknown_parent_is_refused_and_nothing_written(cluster: Cluster) -> None:
    def task_keys() -> set[str]:
        return {key for key in cluster.etcd_keys()
                if key.startswith(("/task/", "/dep/", "/queue/", "/array/"))}

    unknown = keys.new_task_id()
    known = cluster.submit("true")
    cluster.wait_finished([known], timeout=30)
    before = task_keys()
    result = cluster.cli("submit", "--after", known, "--after", unknown, "--", "true")
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert f"spec.after: no task {unknown}" in result.stderr
    assert "Traceback" not in result.stderr
    array = cluster.cli("submit", "--after-array", unknown, "--", "true")
    assert array.returncode == 2 and f"no array {unknown}" in array.stderr
    with pytest.raises(grpc.RpcError) as refused:
        cluster.stub(1).Submit(pb.SubmitRequest(spec=pb.TaskSpec(
            command="true", after=after(unknown))), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert task_keys() == before


@pytest.mark.timeout(120)
def test_dependent_starts_once_after_its_parent_survives_a_node_kill(cluster: Cluster) -> None:
    """Runs last in this module: it kills a node of the shared cluster."""
    parent = cluster.submit("sh", "-c", "sleep 4")
    child = cluster.submit("true", after=after(parent))
    running = cluster.wait_state(parent, (pb.TASK_STATE_RUNNING,), timeout=30)
    victim = next(index for index, node in enumerate(cluster.nodes)
                  if node.name == running.node_name)
    process = cluster.nodes[victim].process
    assert process is not None
    process.kill()      # the agent only: its etcd member lives on, quorum stays
    process.wait()
    done = cluster.wait_finished([parent, child], timeout=90)
    assert done[0].reason == pb.REASON_EXITED and done[0].exit_code == 0
    assert done[0].attempt >= 2 and done[0].node_name != running.node_name
    assert done[1].reason == pb.REASON_EXITED and done[1].exit_code == 0
    assert done[1].attempt == 1, "the dependent ran more than once"
    assert seconds(done[1].started_at) >= seconds(done[0].finished_at)


@pytest.mark.timeout(90)
def test_retention_keeps_a_parent_while_a_dependent_waits(tmp_path: Path) -> None:
    require_tools()
    with Cluster(tmp_path, size=1,
                 extra=("--retention", "1", "--housekeeping-interval", "0.5")) as cluster:
        blocker = cluster.submit("sleep", "6")
        parent = cluster.submit("true")
        witness = cluster.submit("true")
        child = cluster.submit("true", after=after(parent) + after(blocker))
        array = cluster.stub().Submit(pb.SubmitRequest(
            spec=pb.TaskSpec(command="true"), array=pb.ArraySpec(start=1, end=3)), timeout=10)

        def gone(task_id: str) -> bool:
            try:
                cluster.get(task_id)
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.NOT_FOUND
            return False

        # The witness finished with the parent and nothing waits for it: retention ran.
        wait_for("retention to delete the witness", lambda: gone(witness), timeout=30)
        assert cluster.get(parent).state == pb.TASK_STATE_COMPLETE
        assert cluster.get(child).state == pb.TASK_STATE_PENDING
        wait_for("retention to delete the parent once the child was released",
                 lambda: gone(parent), timeout=45)
        assert gone(child) or cluster.get(child).state != pb.TASK_STATE_PENDING
        # An array's record goes once none of its tasks is left.
        wait_for("housekeeping to delete the array record",
                 lambda: f"/array/{array.array_id}" not in cluster.etcd_keys(), timeout=30)
