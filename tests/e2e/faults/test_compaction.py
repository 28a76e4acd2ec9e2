"""Scenario 8: a node whose watches fall behind an etcd compaction re-lists and misses
nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.faults import history
from tests.e2e.faults.netcluster import NetCluster, wait_for
from tests.e2e.faults.test_partition import busiest

# A TTL long enough that the short freeze below never makes the node fence itself: the
# point here is the watch falling behind, not the lease.
LEASE_TTL = 10


@pytest.mark.timeout(240)
def test_watch_behind_compaction_relists(make_cluster: Callable[..., NetCluster]) -> None:
    """Freeze a daemon, kill and restart its etcd member (its watch streams break), and
    meanwhile submit tasks, cancel one of its running tasks and compact etcd past every
    revision it saw. Thawed, its watches resume from a compacted revision: it must
    re-list, stop the canceled task, and go on stealing."""
    cluster = make_cluster(external_etcd=(0, 1, 2), lease_ttl=LEASE_TTL)
    long_ids = [cluster.submit_traced(40.0, index=i % 3) for i in range(6)]
    cluster.wait_started(long_ids)
    victim, on_victim = busiest(cluster, long_ids)
    node = cluster.nodes[victim]
    helper = next(i for i in range(cluster.size) if i != victim)
    target = next(iter(on_victim))
    old_ids = cluster.node_ids()

    cluster.pause(victim)
    frozen = time.monotonic()
    cluster.kill_etcd(victim)
    queued_ids = [cluster.submit_traced(0.5, index=helper, retry=30) for _ in range(20)]
    cluster.cancel(target, index=helper, retry=30)
    revision = history.current_revision(cluster.nodes[helper])
    cluster.nodes[helper].etcdctl("compact", str(revision))
    cluster.restart_etcd(victim)
    wait_for(f"{node.name}'s member to catch up past the compaction",
             lambda: history.current_revision(node) >= revision, timeout=30, interval=0.1)
    cluster.resume(victim)
    thawed = time.monotonic()
    stopped = cluster.wait_no_task_processes_of(victim, target, timeout=30) - thawed
    cluster.wait_finished(queued_ids, timeout=120)
    relisted = wait_for("the thawed node to notice the compaction",
                        lambda: node.log_text().count("fell behind compaction"), timeout=15)
    relisted_after = time.monotonic() - thawed

    # The thawed node goes on stealing: with 1 CPU per task the other two nodes (2 CPUs
    # each, busy with the long tasks) cannot take all of these at once.
    for task_id in long_ids:
        if task_id != target:
            cluster.cancel(task_id)
    after_ids = [cluster.submit_traced(2.0, index=helper, cpu_millis=1000) for _ in range(9)]
    finished = cluster.wait_finished(timeout=120)
    verdict = history.check(cluster, canceled=frozenset(long_ids))
    ran_on_victim = sum(1 for i in after_ids if finished[i].node_name == node.name)
    print(f"\n[watch behind compaction] {node.name} frozen {thawed - frozen:.2f}s while its "
          f"member was restarted and etcd compacted at revision {revision}; watches that "
          f"re-listed after 'compacted': {relisted} (within "
          f"{relisted_after:.2f}s of SIGCONT); SIGCONT -> canceled task's container "
          f"gone {stopped:.2f}s; of 9 later tasks it ran {ran_on_victim}; fences logged: "
          f"{history.fences(node)}")
    print(f"  {verdict.summary()}")

    assert finished[target].state == pb.TASK_STATE_CANCELED
    assert stopped <= 2.0, "the thawed node did not stop the task canceled while it was away"
    assert history.fences(node) == 0 and cluster.node_ids()[node.name] == old_ids[node.name]
    assert ran_on_victim >= 1, f"{node.name} stole nothing after thawing"
    assert verdict.ok(), verdict.problems()
