"""Scenario 4: a daemon frozen (SIGSTOP) for longer than its lease TTL, then thawed."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.faults import history
from tests.e2e.faults.netcluster import NetCluster, wait_for
from tests.e2e.faults.test_partition import busiest

# How long after SIGCONT the thawed daemon may take to notice its lease is gone and kill
# its containers (its deadline passed long ago: only the event loop's wake-up and runc
# kill remain).
THAW_FENCE_BOUND = 2.0


@pytest.mark.timeout(240)
def test_sigstop_daemon_past_ttl(make_cluster: Callable[..., NetCluster]) -> None:
    """While the daemon is frozen its lease expires and the others requeue its tasks. On
    SIGCONT it fences itself at once, nothing it writes late is accepted (I3; some of its
    tasks ended while it was frozen), and it registers again under a new id. Its
    containers are not frozen with it: I2 measures how long they ran beside their
    replacements."""
    cluster = make_cluster()
    ttl = cluster.lease_ttl
    long_ids = [cluster.submit_traced(14.0, index=i % 3) for i in range(6)]
    once_ids = [cluster.submit_traced(14.0, index=i % 3, restart=False) for i in range(2)]
    # These end while the daemon is frozen: it tries to record them when it thaws.
    short_ids = [cluster.submit_traced(2.0, index=i % 3) for i in range(3)]
    ids = long_ids + once_ids + short_ids
    cluster.wait_started(ids)
    victim, on_victim = busiest(cluster, ids)
    node = cluster.nodes[victim]
    old_ids = cluster.node_ids()

    cluster.pause(victim)
    frozen, frozen_wall = time.monotonic(), time.time()

    def moved() -> bool:
        tasks = cluster.tasks()
        return all(tasks[i].state != pb.TASK_STATE_RUNNING or tasks[i].attempt > t.attempt
                   for i, t in on_victim.items())
    wait_for("the frozen node's tasks to be recovered", moved, timeout=30, interval=0.05)
    requeued = time.monotonic() - frozen
    time.sleep(max(0.0, frozen + ttl + 3 - time.monotonic()))
    still_running = len(node.task_pids())
    cluster.resume(victim)
    thawed, thawed_wall = time.monotonic(), time.time()
    gone = cluster.wait_no_task_processes(victim, timeout=30) - thawed
    live_after = node.live_containers()
    new_id = wait_for(f"{node.name} to register anew",
                      lambda: (i := cluster.node_ids().get(node.name)) not in
                      (None, old_ids[node.name]) and i, timeout=30)
    finished = cluster.wait_finished(timeout=120)
    verdict = history.check(cluster)
    print(f"\n[SIGSTOP {ttl + 3}s > ttl {ttl}s] {node.name} froze with {len(on_victim)} tasks; "
          f"freeze -> requeue {requeued:.2f}s; {still_running} of its task processes ran on "
          f"while frozen; SIGCONT -> its task processes gone {gone:.2f}s; its tasks' last "
          f"trace line {history.ran_on_after(verdict, node.name, thawed_wall):.2f}s after "
          f"SIGCONT ({history.ran_on_after(verdict, node.name, frozen_wall):.2f}s after "
          f"SIGSTOP); results refused by the fence: {history.rejected_writes(node)}; fences "
          f"logged: {history.fences(node)}")
    print(f"  {verdict.summary()}")

    assert history.fences(node) >= 1, "the thawed daemon did not fence itself"
    assert cluster.metric(victim, "filch_self_fences_total") == history.fences(node)
    assert cluster.metric(victim, "filch_fenced_writes_total") == history.rejected_writes(node)
    assert gone <= THAW_FENCE_BOUND
    assert live_after == []
    assert new_id != old_ids[node.name]
    for i in on_victim:
        if i in once_ids:
            assert finished[i].reason == pb.REASON_NODE_LOST, finished[i]
        elif i in long_ids:
            assert finished[i].attempt == on_victim[i].attempt + 1, finished[i]
    assert verdict.ok("I1", "I3", "I4"), verdict.problems()
    assert verdict.ok("I2"), verdict.problems("I2")
