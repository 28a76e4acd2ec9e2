"""Time limits, retries by failure class, the attempt history, logs of any attempt, and
`submit --wait --follow`, on one real 3-node cluster (runc)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.faces import records
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# SIGTERM -> SIGKILL of this cluster's nodes: short, so that a time-limited `sleep` (PID 1
# of its container ignores SIGTERM) is killed soon after its limit.
GRACE = 1.0
# What a time-limited attempt's record may show past limit + grace (started_at is written
# at the steal, finished_at with the result): the container's start, the SIGKILL and the
# container's teardown, and the result's write, on a loaded 2-core test machine.
MARGIN = 3.0

# Prints which attempt it is, fails its first two attempts, succeeds on the third.
THIRD_TIME_LUCKY = ('echo "attempt $FILCH_ATTEMPT on $FILCH_NODE"; '
                    '[ "$FILCH_ATTEMPT" -ge 3 ]')


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """This module's cluster (the conftest's, with a short cancel grace). Named like the
    conftest fixture so that a failure shows the nodes' logs."""
    require_tools()
    with Cluster(tmp_path_factory.mktemp("retry"), size=3,
                 extra=("--cancel-grace", str(GRACE))) as cluster:
        yield cluster


def status(cluster: Cluster, task_id: str) -> dict[str, Any]:
    """The task as `filch status -o json` prints it (read over gRPC: each CLI run costs a
    Python start, and the CLI's JSON is checked once, in the retry test)."""
    return dict(records.task_to_dict(cluster.get(task_id)))


def log_of(cluster: Cluster, task_id: str, attempt: int, index: int) -> str:
    request = pb.StreamLogsRequest(id=task_id, attempt=attempt)
    return b"".join(chunk.data for chunk in
                    cluster.stub(index).StreamLogs(request, timeout=10)).decode()


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def index_of(cluster: Cluster, name: str) -> int:
    return next(i for i, node in enumerate(cluster.nodes) if node.name == name)


def metric_sum(cluster: Cluster, name: str) -> float:
    return sum(cluster.metrics(index).get(name, 0.0) for index in cluster.alive())


def test_an_attempt_past_its_time_limit_ends_timed_out(three_nodes: Cluster) -> None:
    timeouts = metric_sum(three_nodes, "filch_task_timeouts_total")
    started = time.monotonic()
    result = three_nodes.cli("submit", "--time-limit", "2s", "--wait", "--", "sleep", "60")
    took = time.monotonic() - started
    assert result.returncode == 124, result.stderr
    assert "time limit" in result.stderr
    # Seen from the CLI (its own start, the steal, the container's start and the polls
    # included: seconds on a loaded machine): stopped, long before sleep's own end.
    assert 2.0 <= took < 30, took
    task = status(three_nodes, result.stdout.strip())
    assert (task["state"], task["reason"]) == ("COMPLETE", "TIMED_OUT")
    assert task["message"] == "ran longer than its time limit of 2s"
    [attempt] = task["attempts"]
    ran = seconds(attempt["finished_at"]) - seconds(attempt["started_at"])
    assert 2.0 <= ran < 2.0 + GRACE + MARGIN, ran
    node = three_nodes.nodes[index_of(three_nodes, attempt["node_name"])]
    containers = subprocess.run(["runc", "--root", str(node.data_dir / "runc"), "list", "-q"],
                                capture_output=True, text=True, check=True).stdout
    assert task["id"] not in containers
    assert metric_sum(three_nodes, "filch_task_timeouts_total") == timeouts + 1


@pytest.fixture(scope="module")
def lucky(three_nodes: Cluster) -> dict[str, Any]:
    """A task that failed twice, then succeeded (retries 3 on failed, back-off 0.5 s)."""
    retried = metric_sum(three_nodes, 'filch_task_retries_total{failure_class="failed"}')
    result = three_nodes.cli("submit", "--retries", "3", "--retry-on", "failed",
                             "--retry-backoff", "0.5s", "--wait", "--",
                             "sh", "-c", THIRD_TIME_LUCKY)
    assert result.returncode == 0, result.stderr
    task = status(three_nodes, result.stdout.strip())
    task["retries_counted"] = metric_sum(
        three_nodes, 'filch_task_retries_total{failure_class="failed"}') - retried
    return task


def test_a_task_that_fails_twice_then_succeeds_shows_three_attempts(
        three_nodes: Cluster, lucky: dict[str, Any]) -> None:
    assert (lucky["state"], lucky["reason"], lucky["exit_code"]) == ("COMPLETE", "EXITED", 0)
    assert lucky["retries_used"] == 2
    assert [(a["attempt"], a["reason"], a["exit_code"]) for a in lucky["attempts"]] == \
        [(1, "EXITED", 1), (2, "EXITED", 1), (3, "EXITED", 0)]
    assert all(a["node_name"] and a["finished_at"] for a in lucky["attempts"])
    assert lucky["retries_counted"] == 2
    for number, attempt in enumerate(lucky["attempts"], start=1):
        assert log_of(three_nodes, lucky["id"], number, 0) == \
            f"attempt {number} on {attempt['node_name']}\n"
    # The CLI: its JSON is the one above, its --attempt option reads that attempt.
    printed = json.loads(three_nodes.cli("status", lucky["id"], "-o", "json", check=True).stdout)
    assert printed["attempts"] == lucky["attempts"]
    output = three_nodes.cli("logs", "--attempt", "2", lucky["id"], check=True).stdout
    assert output == f"attempt 2 on {lucky['attempts'][1]['node_name']}\n"
    table = three_nodes.cli("status", lucky["id"], check=True).stdout
    assert "Attempts:" in table
    assert [line.split()[0] for line in table.split("Attempts:")[1].strip().splitlines()] == \
        ["ATTEMPT", "1", "2", "3"]


def test_retries_wait_for_their_back_off(lucky: dict[str, Any]) -> None:
    """Back-off 0.5 s doubling, jitter 0.5..1.5: at least 0.25 s, then 0.5 s."""
    attempts = lucky["attempts"]
    for earlier, later, least in ((attempts[0], attempts[1], 0.25),
                                  (attempts[1], attempts[2], 0.5)):
        gap = seconds(later["started_at"]) - seconds(earlier["finished_at"])
        assert gap >= least, (gap, earlier, later)


def test_logs_of_an_attempt_are_read_from_the_node_that_ran_it(
        three_nodes: Cluster, lucky: dict[str, Any]) -> None:
    """Asked of a node that did not run it, each attempt's log comes from the node that did
    (its address is in the attempt's record): the proxy path for any attempt."""
    for number, attempt in enumerate(lucky["attempts"], start=1):
        ran_on = index_of(three_nodes, attempt["node_name"])
        for other in (i for i in three_nodes.alive() if i != ran_on):
            assert log_of(three_nodes, lucky["id"], number, other) == \
                f"attempt {number} on {attempt['node_name']}\n"


def test_an_unknown_attempt_is_refused_with_the_valid_range(
        three_nodes: Cluster, lucky: dict[str, Any]) -> None:
    result = three_nodes.cli("logs", "--attempt", "9", lucky["id"])
    assert result.returncode == 2, result.stderr
    assert "attempt 9" in result.stderr and "1-3" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_oom_is_not_retried_when_only_failures_are(three_nodes: Cluster) -> None:
    result = three_nodes.cli("submit", "--mem", "32Mi", "--retries", "2", "--retry-on",
                             "failed", "--wait", "--", "python3", "-c",
                             "b = bytearray(400 * 1024 * 1024); print(len(b))")
    assert result.returncode == 137, result.stderr
    task = status(three_nodes, result.stdout.strip())
    assert (task["state"], task["reason"], task["retries_used"]) == ("COMPLETE", "OOM_KILLED", 0)
    assert [a["reason"] for a in task["attempts"]] == ["OOM_KILLED"]


def test_submit_wait_follow_streams_every_attempt_and_exits_with_the_last_code(
        three_nodes: Cluster) -> None:
    result = three_nodes.cli("submit", "--retries", "1", "--retry-on", "failed",
                             "--retry-backoff", "0.2s", "--wait", "--follow", "--",
                             "sh", "-c", 'echo "out of attempt $FILCH_ATTEMPT"; exit 5')
    assert result.returncode == 5, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:] == ["out of attempt 1", "out of attempt 2"], result.stdout
    assert "attempt 1" in result.stderr and "retry 1 of 1" in result.stderr


def test_follow_needs_wait(three_nodes: Cluster) -> None:
    result = three_nodes.cli("submit", "--follow", "--", "true")
    assert result.returncode == 2
    assert "--wait" in result.stderr and result.stdout == ""


def test_a_task_held_for_its_retry_can_be_canceled(three_nodes: Cluster) -> None:
    task_id = three_nodes.submit("false", retries=3, retry_on=["failed"],
                                 retry_backoff_seconds=60)
    held = wait_for("the task to be held for its retry",
                    lambda: (task := status(three_nodes, task_id))["hold"] == "RETRY" and task)
    assert held["state"] == "PENDING" and held["not_before"]
    three_nodes.stub().Cancel(pb.CancelRequest(id=task_id), timeout=10)
    task = status(three_nodes, task_id)
    assert (task["state"], task["reason"]) == ("CANCELED", "CANCELED")
    assert [a["attempt"] for a in task["attempts"]] == [1]
    assert not [key for key in three_nodes.etcd_keys() if key.endswith(task_id)
                and "/status/blocked/" in key]


def test_the_log_of_an_attempt_whose_node_is_gone_says_so(
        three_nodes: Cluster, lucky: dict[str, Any]) -> None:
    """Last in this module: it kills a node."""
    first = lucky["attempts"][0]
    ran_on = index_of(three_nodes, first["node_name"])
    three_nodes.drop_log_copies(lucky["id"])    # no peer holds a copy either
    three_nodes.nodes[ran_on].kill_hard()
    asked = next(i for i in three_nodes.alive() if i != ran_on)
    result = three_nodes.cli("logs", "--attempt", "1", lucky["id"], index=asked)
    assert result.returncode != 0
    assert first["node_name"] in result.stderr and "cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr
