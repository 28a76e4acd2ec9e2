"""Scenario 5: two of the three etcd members stop (SIGSTOP), then come back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.faults import history
from tests.e2e.faults.netcluster import NetCluster

OUTAGE = 8.0
# A container may legitimately start this long after the outage began: its steal was
# committed just before (runc start is ~50 ms; generous for a loaded machine).
LATE_START_GRACE = 1.0
# CPU of each long task: on the cluster's 2-CPU nodes, two fit and a third does not.
TASK_MILLIS = 700


@pytest.mark.timeout(240)
def test_two_of_three_etcd_members_stopped(make_cluster: Callable[..., NetCluster]) -> None:
    """Without quorum nothing is stolen and nothing started; submits fail UNAVAILABLE (and
    a retried submit with the same request_id creates one task, whatever the first did);
    every node fences itself; afterwards each task ran once or was requeued once."""
    cluster = make_cluster()
    ttl = cluster.lease_ttl
    # 0.7 CPU each: a 2-CPU node fits two and never three, so each node runs exactly two.
    ids = [cluster.submit_traced(14.0, index=i % 3, cpu_millis=TASK_MILLIS) for i in range(4)]
    ids += [cluster.submit_traced(14.0, index=i % 3, restart=False, cpu_millis=TASK_MILLIS)
            for i in range(2)]
    running = cluster.wait_started(ids)
    busy = {task.node_name for task in running.values()}
    assert busy == {node.name for node in cluster.nodes}, "every node runs two tasks"
    # Fits no node while they run: it waits in the queue, and once the nodes fence
    # themselves during the outage it fits all of them. It must still wait for quorum.
    big = cluster.submit_traced(1.0, cpu_millis=1950)
    assert cluster.tasks()[big].state == pb.TASK_STATE_PENDING
    survivor = 0
    stopped = [1, 2]

    for index in stopped:
        cluster.pause_etcd(index)
    cut, cut_wall = time.monotonic(), time.time()
    codes: dict[int, str] = {}

    def submit_during_outage(index: int) -> None:
        started = time.monotonic()
        try:
            cluster.submit(history_free_task(), index=index, request_id=f"outage-{index}",
                           timeout=OUTAGE - 1)
            codes[index] = "OK"
        except grpc.RpcError as exc:
            codes[index] = f"{exc.code().name} after {time.monotonic() - started:.1f}s"

    submitters = [threading.Thread(target=submit_during_outage, args=(i,)) for i in range(3)]
    for thread in submitters:
        thread.start()
    fenced: dict[str, float] = {}
    while time.monotonic() < cut + OUTAGE:
        for node in cluster.nodes:
            if node.name in busy and node.name not in fenced and not node.task_pids():
                fenced[node.name] = time.monotonic() - cut
        time.sleep(0.05)
    for thread in submitters:
        thread.join(OUTAGE)
    left_running = {node.name: node.live_containers() + [str(p) for p in node.task_pids()]
                    for node in cluster.nodes}
    for index in stopped:
        cluster.resume_etcd(index)
    restored_wall = time.time()

    restored = time.monotonic()
    # A client retries UNAVAILABLE with the same request_id until etcd has a leader again.
    retried = {index: cluster.submit(history_free_task(), index=survivor, timeout=5,
                                     request_id=f"outage-{index}", retry=30)
               for index in range(3)}
    available_again = time.monotonic() - restored
    finished = cluster.wait_finished(timeout=120)
    verdict = history.check(cluster)
    started_in_outage = sorted(
        (trace.start - cut_wall, trace.node) for trace in verdict.traces.values()
        if trace.start is not None and cut_wall + LATE_START_GRACE < trace.start < restored_wall)
    print(f"\n[etcd quorum lost for {OUTAGE}s: members of "
          f"{[cluster.nodes[i].name for i in stopped]} SIGSTOPped] submits during the outage: "
          f"{ {cluster.nodes[i].name: code for i, code in sorted(codes.items())} }; outage -> "
          f"all task processes of a busy node gone (self-fence): "
          f"{ {name: round(t, 2) for name, t in sorted(fenced.items())} } (ttl {ttl}s); "
          f"containers started during the outage: {len(started_in_outage)}; attempts after: "
          f"{dict(verdict.attempts)}; submits work again {available_again:.2f}s after the "
          "members resumed")
    big_started = verdict.traces.get((big, finished[big].attempt))
    big_start = big_started.start if big_started and big_started.start else float("nan")
    print(f"  the big task was PENDING at the outage and started "
          f"{big_start - restored_wall:.2f}s after the members resumed")
    print(f"  {verdict.summary()}")

    assert all(code.startswith("UNAVAILABLE") for code in codes.values()), codes
    assert started_in_outage == [], started_in_outage
    assert left_running == {node.name: [] for node in cluster.nodes}, \
        f"containers or task processes survived the fence: {left_running}"
    assert big_started is not None and big_started.start is not None
    assert big_started.start > restored_wall, "the big task started without quorum"
    assert set(fenced) == busy, f"a node kept running tasks without quorum: {fenced}"
    assert all(history.fences(node) >= 1 for node in cluster.nodes), \
        "a node did not fence itself without quorum"
    assert len(set(retried.values())) == 3
    assert all(finished[i].attempt <= 2 for i in ids), verdict.problems()
    assert verdict.requeues <= len(ids)
    assert verdict.ok(), verdict.problems()


def history_free_task() -> tuple[str, ...]:
    """A task whose spec is the same every time (a retried request_id must match it)."""
    return ("true",)
