"""Arrays end to end: one submit makes every task, each sees its FILCH_ARRAY_INDEX, `ls
--array` and `cancel --array` act on the whole array, and a submit that died midway is
invisible until a retry under the same request id completes it (never doubles it).

Process executor: 500 runc containers would take minutes on 2 cores; what is tested
here is the scheduling, which is the same for both executors.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.client import Client
from node.core import keys
from node.core.array_pages import ARRAY_POLL_PAGE, ARRAY_POLL_PAGES, watched_arrays
from tests.e2e.cluster import FINISHED, Cluster, wait_for
from tests.e2e.conftest import require_tools

# The second node's first array batch fails as if etcd went away after committing it:
# a client that died midway through its array submit.
PARTIAL_WRITE = "service.array_batch=1*error(unavailable)"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_tools()
    if os.geteuid() != 0:
        pytest.skip("dropping to the task uid needs root")
    # Not tmp_path: pytest makes its parent 0700, which the task uid could not traverse.
    root = Path(tempfile.mkdtemp(prefix="filch-arrays-"))
    root.chmod(0o755)
    cluster = Cluster(root, size=2, executor="process")
    cluster.nodes[1].env["FILCH_FAILPOINTS"] = PARTIAL_WRITE
    try:
        with cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def array_tasks(cluster: Cluster, array_id: str) -> list[dict[str, object]]:
    result = cluster.cli("ls", "--array", array_id, "-o", "json", check=True)
    tasks: list[dict[str, object]] = json.loads(result.stdout)
    return tasks


def listed(cluster: Cluster, array_id: str) -> list[pb.Task]:
    """The array's tasks in index order (ListTasks pages, no CLI process per poll)."""
    tasks: list[pb.Task] = []
    token = ""
    for _ in range(1000):
        page = cluster.any_stub().ListTasks(pb.ListTasksRequest(
            array_id=array_id, page_size=1000, page_token=token), timeout=10)
        tasks += page.tasks
        token = page.next_page_token
        if not token:
            return tasks
    raise AssertionError("ListTasks pages never ended")


def wait_array_finished(cluster: Cluster, array_id: str, timeout: float) -> list[pb.Task]:
    def finished() -> list[pb.Task] | None:
        tasks = listed(cluster, array_id)
        return tasks if all(task.state in FINISHED for task in tasks) else None
    return wait_for(f"array {array_id} to finish", finished, timeout=timeout, interval=0.3)


def log_of(cluster: Cluster, task_id: str) -> bytes:
    chunks = cluster.any_stub().StreamLogs(pb.StreamLogsRequest(id=task_id), timeout=10)
    return b"".join(chunk.data for chunk in chunks)


@pytest.mark.timeout(120)
def test_array_of_500_runs_every_index_once(cluster: Cluster) -> None:
    result = cluster.cli("submit", "--array", "0-499", "--cpu", "0.05", "--",
                         "sh", "-c", 'echo "index=$FILCH_ARRAY_INDEX"', check=True)
    ids = result.stdout.split()
    assert len(ids) == 500 and len(set(ids)) == 500
    array_id = cluster.get(ids[0]).array_id
    after = cluster.cli("submit", "--after-array", array_id, "--", "true", check=True)
    child = after.stdout.strip()
    tasks = wait_array_finished(cluster, array_id, timeout=90)
    done = cluster.wait_finished([child], timeout=30)[0]
    assert done.exit_code == 0 and done.reason == pb.REASON_EXITED
    last_end = max(task.finished_at.ToNanoseconds() for task in tasks)
    assert done.started_at.ToNanoseconds() >= last_end, "the dependent ran before the array"
    assert [task.id for task in tasks] == ids
    assert [task.array_index for task in tasks] == list(range(500))
    assert all(task.reason == pb.REASON_EXITED and task.exit_code == 0 for task in tasks)
    seen = sorted(int(log_of(cluster, task_id).decode().strip().removeprefix("index="))
                  for task_id in ids)
    assert seen == list(range(500))
    listed = array_tasks(cluster, array_id)
    assert [task["id"] for task in listed] == ids
    assert [task["array_index"] for task in listed] == list(range(500))


@pytest.mark.timeout(60)
def test_cancel_array_cancels_the_unfinished(cluster: Cluster) -> None:
    # 4 CPUs in the cluster: at most 4 of these run, the rest wait in the queue.
    result = cluster.cli("submit", "--array", "10-48:2", "--cpu", "1", "--",
                         "sleep", "60", check=True)
    ids = result.stdout.split()
    assert len(ids) == 20
    array_id = cluster.get(ids[0]).array_id
    wait_for("some of the array to run",
             lambda: any(cluster.get(task_id).state == pb.TASK_STATE_RUNNING for task_id in ids))
    canceled = cluster.cli("cancel", "--array", array_id, check=True)
    assert canceled.stdout.strip() == "20"
    tasks = cluster.wait_finished(ids, timeout=30)
    assert all(task.state == pb.TASK_STATE_CANCELED and task.reason == pb.REASON_CANCELED
               for task in tasks)
    assert [task["array_index"] for task in array_tasks(cluster, array_id)] == \
        list(range(10, 49, 2))
    assert cluster.cli("cancel", "--array", array_id, check=True).stdout.strip() == "0"
    unknown = cluster.cli("ls", "--array", keys.new_task_id())
    assert unknown.returncode != 0 and "no array" in unknown.stderr


@pytest.mark.timeout(60)
def test_partial_array_is_invisible_until_a_retry_completes_it(cluster: Cluster) -> None:
    request = pb.SubmitRequest(spec=pb.TaskSpec(command="true", cpu_millis=50),
                               request_id="partial-array-1", array=pb.ArraySpec(start=1,
                                                                               end=1000))
    with pytest.raises(grpc.RpcError) as failure:
        cluster.stub(1).Submit(request, timeout=30)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    array_id = keys.task_id_for_request("partial-array-1")
    ids = [keys.array_task_id(array_id, position) for position in range(1000)]

    def written() -> list[pb.Task]:
        records = {name.removeprefix("/task/"): kv for name, kv in cluster.etcd_keys().items()}
        return [pb.Task.FromString(base64.b64decode(str(records[task_id]["value"])))
                for task_id in ids if task_id in records]

    partial = written()
    assert 0 < len(partial) < 1000
    assert f"/array/{array_id}" not in cluster.etcd_keys()
    # The resolver's sweep has seen them (the gauge counts a whole pass) and left them held.
    # One node sweeps at a time (a cluster chore): the gauge is that node's.
    wait_for("a sweep to count the held tasks",
             lambda: any(cluster.metrics(index).get('filch_tasks_blocked{hold="array"}')
                         == len(partial) for index in cluster.alive()))
    assert all(task.state == pb.TASK_STATE_PENDING and task.hold == pb.HOLD_ARRAY
               and task.attempt == 0 for task in written())
    with pytest.raises(grpc.RpcError) as missing:
        listed(cluster, array_id)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    response = cluster.stub(1).Submit(request, timeout=30)
    assert list(response.task_ids) == ids and response.array_id == array_id
    tasks = listed(cluster, array_id)
    assert [task.id for task in tasks] == ids
    assert [task.array_index for task in tasks] == list(range(1, 1001))
    assert all(task.hold == pb.HOLD_NONE for task in tasks)
    everything = json.loads(cluster.cli("ls", "-o", "json", check=True).stdout)
    assert sorted(task["id"] for task in everything if task["array_id"] == array_id) == \
        sorted(ids)
    wait_for("the array to run", lambda: any(task.attempt for task in listed(cluster, array_id)))
    again = cluster.stub(0).Submit(request, timeout=30)
    assert not again.created and list(again.task_ids) == ids
    other = pb.SubmitRequest(spec=pb.TaskSpec(command="false"), request_id="partial-array-1",
                             array=pb.ArraySpec(start=1, end=1000))
    with pytest.raises(grpc.RpcError) as conflict:
        cluster.stub(0).Submit(other, timeout=30)
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    cluster.cli("cancel", "--array", array_id, check=True)
    tasks = wait_array_finished(cluster, array_id, timeout=30)
    assert all(task.attempt <= 1 for task in tasks)


@pytest.mark.timeout(60)
def test_submit_wait_on_an_array_exits_with_its_highest_status(cluster: Cluster) -> None:
    # Index 4 exits 3 after the others have started; index 5 exits 1: the highest wins.
    script = 'case $FILCH_ARRAY_INDEX in 4) sleep 1; exit 3;; 5) exit 1;; esac; sleep 0.5'
    result = cluster.cli("submit", "--wait", "--array", "1-6", "--cpu", "0.05", "--",
                         "sh", "-c", script)
    ids = result.stdout.split()
    assert len(ids) == 6
    assert result.returncode == 3, result.stderr
    # It returned only once every task had finished, and says which ones failed.
    tasks = [cluster.get(task_id) for task_id in ids]
    assert all(task.state in FINISHED for task in tasks)
    assert [task.exit_code for task in tasks] == [0, 0, 0, 3, 1, 0]
    assert "2 of 6 tasks of the array did not succeed" in result.stderr
    assert f"task {ids[3]} (index 4) exited with code 3" in result.stderr

    fine = cluster.cli("submit", "--wait", "--array", "1-3", "--cpu", "0.05", "--", "true")
    assert fine.returncode == 0 and fine.stderr == "" and len(fine.stdout.split()) == 3

    before = {name for name in cluster.etcd_keys() if name.startswith("/array/")}
    refused = cluster.cli("submit", "--wait", "--follow", "--array", "1-3", "--", "true")
    assert refused.returncode == 2 and "filch logs -f ID" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert {name for name in cluster.etcd_keys() if name.startswith("/array/")} == before


def test_waiting_on_a_2000_task_array_reads_a_bounded_number_of_records_per_poll(
        cluster: Cluster) -> None:
    """`submit --wait --array`'s polls read from the first unfinished task on, not the
    whole array each time; the wait still ends with every task's final record."""
    client = Client(cluster.nodes[0].address)
    # Too large for any node: the 2,000 stay pending until the array is canceled.
    response = client.submit_array(pb.TaskSpec(command="true", cpu_millis=64_000),
                                   pb.ArraySpec(start=1, end=2000))
    polled = threading.Event()
    seen: list[int] = []

    def progress(tasks: list[pb.Task], elapsed: float, reconnecting: bool) -> None:
        seen.append(len(tasks))
        if len(watched_arrays[-1].read_per_poll) >= 3:
            polled.set()

    canceler = threading.Thread(target=lambda: polled.wait(60) and client.cancel_array(
        response.array_id))
    canceler.start()
    try:
        tasks = client.wait_array(response.array_id, progress, limit=120)
    finally:
        polled.set()
        canceler.join()
    watch = watched_arrays[-1]
    assert len(tasks) == 2000 and seen and seen[-1] == 2000
    assert all(task.state == pb.TASK_STATE_CANCELED for task in tasks)
    assert len(watch.read_per_poll) >= 3
    # Before: every poll listed all 2,000 records.
    assert max(watch.read_per_poll) <= ARRAY_POLL_PAGE * ARRAY_POLL_PAGES, watch.read_per_poll
    assert all(read <= ARRAY_POLL_PAGE for read in watch.read_per_poll[:3]), watch.read_per_poll
