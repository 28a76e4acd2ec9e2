"""runc failing before the container exists is the node's start failure, not the task's
exit (issue 22, bug B: a full data disk made `runc run` exit 1 before creating the
container, and the task ended COMPLETE / EXITED / 1 without having run).

The failpoint runc.before_run breaks the bundle's config.json, so that the real runc fails
before it creates the container, on the node's first FAILED_RUNS runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.scheduling.startfailures import FAILURES_TO_BACK_OFF
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# The task's first three runs: the node then backs off.
FAILED_RUNS = FAILURES_TO_BACK_OFF


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    env = {"FILCH_FAILPOINTS": f"runc.before_run={FAILED_RUNS}*error(executor)"}
    with Cluster(tmp_path_factory.mktemp("runc-start") / "c", size=1, env=env) as running:
        yield running


def assert_ran_after_start_failures(task: pb.Task, failures: int) -> None:
    """Not COMPLETE / EXITED / 1 from a broken start: requeued each time, no retry spent,
    then it ran to its own exit 0; each start failure says what runc said."""
    assert (task.state, task.reason, task.exit_code) == (
        pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 0), task
    assert task.retries_used == 0 and task.attempt == failures + 1, task
    *before, last = task.attempts
    assert (last.reason, last.exit_code) == (pb.REASON_EXITED, 0), task
    assert len(before) == failures, task
    for attempt in before:
        assert attempt.reason == pb.REASON_START_FAILED, task
        assert "runc exited 1 before creating container" in attempt.message, attempt
        assert "invalid character" in attempt.message, attempt      # runc's JSON error


@pytest.mark.timeout(120)
def test_runc_failing_before_the_container_exists_requeues_the_task(cluster: Cluster) -> None:
    task_id = cluster.submit("sh", "-c", "exit 0", restart=True)
    # Three node-side start failures in a row back the node off (the black-hole guard,
    # node/scheduling/startfailures.py), although each `runc run` was spawned fine.
    [node] = wait_for("the node to back off", lambda: [
        node for node in cluster.list_nodes() if node.start_backoff], timeout=30)
    assert node.node_side_start_failures == FAILURES_TO_BACK_OFF, node
    assert "runc exited 1 before creating container" in node.start_failure, node
    task = cluster.get(task_id)
    assert task.state == pb.TASK_STATE_PENDING and task.retries_used == 0, task
    assert task.message.startswith(f"requeued: attempt {FAILURES_TO_BACK_OFF} could not "
                                   f"start on node {node.name}"), task
    # The back-off (10 s) ends; the node tries again, and the task runs.
    [task] = cluster.wait_finished([task_id], timeout=60)
    assert_ran_after_start_failures(task, FAILURES_TO_BACK_OFF)
    # The attempt that started and ended resets the back-off; the node's record says so at
    # its next write (records are paced).
    wait_for("the node's record to show the back-off over",
             lambda: not cluster.list_nodes()[0].start_backoff, timeout=20)
