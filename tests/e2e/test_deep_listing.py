"""`ls` at depth: with more queued tasks than a plain range is used for (the id windows of
node/etcd/id_ranges.py), every page of every listing is what etcd holds, in order, and the
first page stays the same however often it is asked for."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.etcd import id_ranges
from tests.e2e.cluster import Cluster

pytestmark = pytest.mark.timeout(300)

# More than id_ranges.SMALL_RANGE, so the node reads in windows; few enough to be quick.
DEPTH = 3000


def pages(cluster: Cluster, state: int, page_size: int) -> list[str]:
    ids: list[str] = []
    token = ""
    for _ in range(1000):
        page = cluster.stub(0).ListTasks(pb.ListTasksRequest(
            state=state, page_size=page_size, page_token=token), timeout=30)  # type: ignore[arg-type]
        ids += [task.id for task in page.tasks]
        token = page.next_page_token
        if not token:
            return ids
    raise AssertionError("the pages never ended")


def test_every_page_at_depth_is_what_etcd_holds(one_node: Cluster) -> None:
    assert DEPTH > id_ranges.SMALL_RANGE
    # Too large for the node: all of them stay queued. One array, and a few single tasks
    # before and after it (ids of other milliseconds around the array's).
    spec = pb.TaskSpec(command="true", cpu_millis=64_000)
    singles = [one_node.stub(0).Submit(pb.SubmitRequest(spec=spec), timeout=10).task.id
               for _ in range(3)]
    array = one_node.stub(0).Submit(pb.SubmitRequest(
        spec=spec, array=pb.ArraySpec(start=0, end=DEPTH - 1)), timeout=120)
    singles += [one_node.stub(0).Submit(pb.SubmitRequest(spec=spec), timeout=10).task.id
                for _ in range(3)]
    try:
        queued = sorted(key.rsplit("/", 1)[1] for key in one_node.etcd_keys()
                        if key.startswith("/task/status/queued/"))
        records = sorted(key.rsplit("/", 1)[1] for key in one_node.etcd_keys()
                         if key.startswith("/task/") and not key.startswith("/task/status/"))
        assert len(queued) >= DEPTH + len(singles)
        first = pages(one_node, pb.TASK_STATE_PENDING, 100)[:100]
        for _ in range(3):      # the first page again: from the node's horizon
            page = one_node.stub(0).ListTasks(pb.ListTasksRequest(
                state=pb.TASK_STATE_PENDING, page_size=100), timeout=30)
            assert [task.id for task in page.tasks] == first == queued[:100]
        assert pages(one_node, pb.TASK_STATE_PENDING, 100) == queued
        assert pages(one_node, pb.TASK_STATE_PENDING, 1000) == queued
        assert pages(one_node, pb.TASK_STATE_UNSPECIFIED, 700) == records
    finally:
        one_node.stub(0).Cancel(pb.CancelRequest(array_id=array.array_id), timeout=300)
        for task_id in singles:
            one_node.stub(0).Cancel(pb.CancelRequest(id=task_id), timeout=10)
