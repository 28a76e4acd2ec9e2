"""Bounded load (issue 10, item 7): followers of pending tasks wait on etcd watches, not
polls; log streams and RPCs are limited per node; --max-pending stops a submit flood
before etcd fills. The node keeps serving throughout."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

FOLLOWERS = 200
CHANNELS = 4            # spread the streams over connections, as many clients would
TASKS_FOLLOWED = 10
MAX_PENDING = 50
FLOOD = 80
# More CPU than the test nodes offer (2 cores): such a task stays PENDING, which is the
# state whose followers used to poll etcd.
NEVER_FITS = 4000
# The window over which etcd's request counter is read while every follower waits, and
# the most requests per second the idle node may make meanwhile. Polling followers made
# one request per stream per second (200/s); the node's own loops make a few.
WINDOW = 3.0
MAX_REQUESTS_PER_SECOND = FOLLOWERS / 10
# "A normal RPC answers quickly" while the followers wait.
QUICK = 2.0


@pytest.fixture
def limited_node(tmp_path: Path) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path, size=1, extra=("--max-log-streams", str(FOLLOWERS),
                                          "--max-pending", str(MAX_PENDING))) as cluster:
        yield cluster


def etcd_requests(cluster: Cluster) -> float:
    """Requests etcd's gRPC server has started (all methods), from its own /metrics."""
    url = cluster.nodes[0].etcd_endpoint + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("grpc_server_started_total{")
               and 'grpc_type="unary"' in line)


def pending_task(cluster: Cluster) -> str:
    return cluster.submit("true", cpu_millis=NEVER_FITS)


def test_two_hundred_followers_of_pending_tasks_leave_the_node_serving(
        limited_node: Cluster) -> None:
    cluster = limited_node
    address = cluster.nodes[0].address
    task_ids = [pending_task(cluster) for _ in range(TASKS_FOLLOWED)]
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CHANNELS)]
    calls = []
    try:
        stubs = [pb_grpc.SchedulerStub(channel) for channel in channels]
        for index in range(FOLLOWERS):
            calls.append(stubs[index % CHANNELS].StreamLogs(pb.StreamLogsRequest(
                id=task_ids[index % TASKS_FOLLOWED], follow=True), timeout=120))
        wait_for("every follower to be served",
                 lambda: cluster.metrics(0).get("filch_log_streams") == FOLLOWERS)

        # One stream more is refused with a message naming the flag.
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stubs[0].StreamLogs(pb.StreamLogsRequest(id=task_ids[0], follow=True),
                                          timeout=10)))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-log-streams" in (refused.value.details() or "")

        # Waiting followers cost etcd nothing per second.
        before, started = etcd_requests(cluster), time.monotonic()
        time.sleep(WINDOW)      # a measuring window, not a wait for a condition
        rate = (etcd_requests(cluster) - before) / (time.monotonic() - started)
        print(f"\netcd requests/s with {FOLLOWERS} followers waiting: {rate:.1f}")
        assert rate < MAX_REQUESTS_PER_SECOND, rate

        # Normal calls answer quickly meanwhile.
        for call in (lambda: cluster.stub(0).ListNodes(pb.ListNodesRequest(), timeout=QUICK),
                     lambda: cluster.stub(0).GetTask(pb.GetTaskRequest(id=task_ids[0]),
                                                     timeout=QUICK),
                     lambda: cluster.stub(0).ListTasks(pb.ListTasksRequest(), timeout=QUICK)):
            started = time.monotonic()
            call()
            assert time.monotonic() - started < QUICK

        # A change of the task wakes its followers through the watch: canceled before it
        # ever started, it has no log and their streams end.
        cluster.stub(0).Cancel(pb.CancelRequest(id=task_ids[0]), timeout=10)
        ended = calls[0:FOLLOWERS:TASKS_FOLLOWED]
        with ThreadPoolExecutor(len(ended)) as pool:
            outputs = list(pool.map(lambda call: list(call), ended))
        assert outputs == [[]] * len(ended)
        wait_for("the ended streams to be released", lambda: cluster.metrics(0).get(
            "filch_log_streams") == FOLLOWERS - len(ended))
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    wait_for("every stream to be released",
             lambda: cluster.metrics(0).get("filch_log_streams") == 0)
    cluster.stub(0).ListNodes(pb.ListNodesRequest(), timeout=QUICK)


def test_a_submit_flood_stops_at_max_pending(limited_node: Cluster) -> None:
    cluster = limited_node
    stub = cluster.stub(0)

    def submit(index: int) -> grpc.StatusCode:
        try:
            stub.Submit(pb.SubmitRequest(spec=pb.TaskSpec(
                command="true", name=f"flood-{index}", cpu_millis=NEVER_FITS)), timeout=30)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            assert "--max-pending" in (exc.details() or ""), exc.details()
            assert f"limit {MAX_PENDING}" in (exc.details() or "")
            return exc.code()

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(submit, range(FLOOD)))
    assert codes.count(grpc.StatusCode.OK) == MAX_PENDING
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == FLOOD - MAX_PENDING
    # Nothing beyond the limit was written (read with etcdctl, not through filch).
    queued = [key for key in cluster.etcd_keys() if key.startswith("/task/status/queued/")]
    assert len(queued) == MAX_PENDING

    # The node keeps serving, and admits again once tasks leave the queue.
    started = time.monotonic()
    cluster.stub(0).ListNodes(pb.ListNodesRequest(), timeout=QUICK)
    assert time.monotonic() - started < QUICK
    pending = cluster.stub(0).ListTasks(pb.ListTasksRequest(state=pb.TASK_STATE_PENDING,
                                                            page_size=5), timeout=10)
    for task in pending.tasks:
        stub.Cancel(pb.CancelRequest(id=task.id), timeout=10)

    def admitted() -> bool:
        try:
            pending_task(cluster)
            return True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return False
    wait_for("a submit to be admitted after cancels", admitted, timeout=10, interval=0.3)
