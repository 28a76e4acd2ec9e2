"""Scenarios 2 and 3: one node cut off the network (its cable pulled), longer and shorter
than the lease TTL."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.config import Config
from node.running.membership import FENCE_MARGIN_FRACTION, FENCE_MARGIN_MIN
from tests.e2e.faults import history
from tests.e2e.faults.netcluster import NetCluster, wait_for

# Time allowed for killing the containers once the node decided to fence (runc kill of
# a few containers: tens of ms; generous for a loaded 2-core machine).
KILL_ALLOWANCE = 1.0
# etcd's --election-timeout (filch's default, node/core/config.py). A cut-off member that was
# the leader goes on granting lease renewals locally until check-quorum makes it step
# down, one election timeout after the cut (etcd 3.4 does not confirm its leadership on
# LeaseRenew; see etcd-io/etcd#15247): its node's fence deadline moves that much later.
# The majority's new leader extends every lease on promotion, so the fence still precedes
# the expiry.
ETCD_ELECTION_TIMEOUT = Config.etcd_election_timeout_ms / 1000


def busiest(cluster: NetCluster, ids: list[str]) -> tuple[int, dict[str, pb.Task]]:
    """The node running most of these tasks, and its tasks."""
    tasks = cluster.tasks()
    by_node = collections.Counter(tasks[i].node_name for i in ids)
    name, _ = by_node.most_common(1)[0]
    return cluster.index_of(name), {i: tasks[i] for i in ids if tasks[i].node_name == name}


@pytest.mark.timeout(240)
def test_partition_longer_than_ttl(make_cluster: Callable[..., NetCluster]) -> None:
    """The cut-off node fences itself (its containers die before its lease can expire),
    its tasks run elsewhere, nothing it writes late is accepted, and after the heal it
    rejoins as a fresh node."""
    cluster = make_cluster()
    ttl = cluster.lease_ttl
    long_ids = [cluster.submit_traced(12.0, index=i % 3) for i in range(6)]
    once_ids = [cluster.submit_traced(12.0, index=i % 3, restart=False) for i in range(3)]
    # These end during the partition: their results are the late writes to refuse.
    short_ids = [cluster.submit_traced(2.0, index=i % 3) for i in range(3)]
    ids = long_ids + once_ids + short_ids
    cluster.wait_started(ids)
    victim, on_victim = busiest(cluster, ids)
    node = cluster.nodes[victim]
    old_ids = cluster.node_ids()
    was_leader = cluster.etcd_leader() == victim

    cluster.partition(victim)
    cut, cut_wall = time.monotonic(), time.time()
    fenced = requeued = None
    live_at_fence: list[str] = ["(not checked)"]
    deadline = cut + 30
    while (fenced is None or requeued is None) and time.monotonic() < deadline:
        now = time.monotonic()
        if fenced is None and not node.task_pids():
            fenced = now - cut
            live_at_fence = node.live_containers()
        if requeued is None:
            tasks = cluster.tasks()
            if all(tasks[i].state != pb.TASK_STATE_RUNNING or tasks[i].attempt > t.attempt
                   for i, t in on_victim.items()):
                requeued = now - cut
        time.sleep(0.05)
    assert fenced is not None, f"{node.name} still runs tasks 30 s into the partition"
    assert requeued is not None, f"{node.name}'s tasks were not recovered in 30 s"

    time.sleep(max(0.0, cut + 2 * ttl - time.monotonic()))
    cluster.heal(victim)
    healed = time.monotonic()
    new_id = wait_for(f"{node.name} to rejoin under a new id",
                      lambda: (i := cluster.node_ids().get(node.name)) not in
                      (None, old_ids[node.name]) and i, timeout=60)
    rejoined = time.monotonic() - healed
    finished = cluster.wait_finished(timeout=120)
    verdict = history.check(cluster)
    margin = max(FENCE_MARGIN_MIN, ttl * FENCE_MARGIN_FRACTION)
    bound = ttl - margin + KILL_ALLOWANCE + (ETCD_ELECTION_TIMEOUT if was_leader else 0)
    print(f"\n[partition {2 * ttl}s > ttl {ttl}s] {node.name} (etcd leader: {was_leader}) ran "
          f"{len(on_victim)} tasks; self-fence (cut -> its task processes gone) {fenced:.2f}s "
          f"(bound ttl - margin + kill{' + election timeout' if was_leader else ''} = "
          f"{bound:.1f}s); cut -> requeue "
          f"{requeued:.2f}s; its tasks' last trace line "
          f"{history.ran_on_after(verdict, node.name, cut_wall):.2f}s after the cut; "
          f"heal -> rejoin as new id {rejoined:.2f}s; results it saw "
          f"rejected by the fence: {history.rejected_writes(node)}; fences logged: "
          f"{history.fences(node)}")
    print(f"  {verdict.summary()}")

    assert live_at_fence == [], f"runc still lists live containers after the fence: {live_at_fence}"
    # What an operator's dashboard shows of it (the agent process lived through it all).
    assert cluster.metric(victim, "filch_self_fences_total") >= 1
    assert cluster.metric(victim, "filch_lease_keepalive_failures_total") >= 1
    assert cluster.metric(victim, "filch_fenced_writes_total") == history.rejected_writes(node)
    assert fenced < requeued, "another node took the tasks before the cut-off node had killed them"
    assert fenced <= bound
    assert new_id != old_ids[node.name]
    for i in on_victim:
        expected = pb.REASON_NODE_LOST if i in once_ids else pb.REASON_EXITED
        if i in short_ids and finished[i].attempt == 1:
            continue    # ended before the cut-off was noticed and its result got through
        assert finished[i].reason == expected, (i, finished[i])
        assert finished[i].node_id != on_victim[i].node_id or expected == pb.REASON_NODE_LOST
    assert verdict.ok(), verdict.problems()


# Short cuts per test: each starts at another phase of the nodes' lease renewals (every
# TTL/4), so a fence budget that only sometimes covers a short cut shows up every run.
SHORT_CUTS = 4
SHORT_CUT = 1.5
BETWEEN_CUTS = 3.5


@pytest.mark.timeout(180)
@pytest.mark.parametrize("who", ["leader", "follower"])
def test_partition_shorter_than_ttl(make_cluster: Callable[..., NetCluster], who: str) -> None:
    """Cuts of 1.5 s with a TTL of 5 s are ridden out: no fence, no requeue (every task
    stays on attempt 1), no duplicate, and every node keeps its id. The node cut off is
    the etcd leader, or a follower, at the time of each cut; a follower's cut must not
    cost the others their etcd leader either (every node's leases hang on it)."""
    cluster = make_cluster()
    ids = [cluster.submit_traced(SHORT_CUTS * (SHORT_CUT + BETWEEN_CUTS) + 3, index=i % 3)
           for i in range(6)]
    cluster.wait_started(ids)
    old_ids = cluster.node_ids()
    victims: list[str] = []
    deposed = 0
    for _ in range(SHORT_CUTS):
        leader = wait_for("an etcd leader", lambda: [i for i in [cluster.etcd_leader()]
                                                     if i is not None], timeout=20)[0]
        if who == "leader":
            victim = leader
        else:
            followers = [i for i in range(3) if i != leader]
            named = [i for i in followers if cluster.nodes[i].name in victims]
            victim = (named or followers)[0]
        victims.append(cluster.nodes[victim].name)
        before = cluster.nodes[leader].etcd_leadership()
        cluster.partition(victim)
        time.sleep(SHORT_CUT)
        cluster.heal(victim)
        time.sleep(BETWEEN_CUTS)
        if who == "follower" and cluster.nodes[leader].etcd_leadership() != before:
            deposed += 1
    finished = cluster.wait_finished(timeout=120)
    after_ids = cluster.node_ids()
    verdict = history.check(cluster)
    fenced = {n.name: history.fences(n) for n in cluster.nodes}
    print(f"\n[{SHORT_CUTS} cuts of {SHORT_CUT}s < ttl {cluster.lease_ttl}s, each of the etcd "
          f"{who}: {victims}] attempts: {dict(verdict.attempts)}; fences logged per node: "
          f"{fenced}; node ids kept: {after_ids == old_ids}"
          + (f"; cuts after which the majority had lost its leader: {deposed}"
             if who == "follower" else ""))
    print(f"  {verdict.summary()}")
    assert fenced == {n.name: 0 for n in cluster.nodes}, "a short cut made nodes fence"
    assert all(task.attempt == 1 for task in finished.values()), \
        {i: (t.attempt, t.message) for i, t in finished.items() if t.attempt != 1}
    assert after_ids == old_ids
    assert verdict.ok(), verdict.problems()
    assert deposed == 0, (f"{deposed} of {SHORT_CUTS} short cuts of a follower deposed the "
                          "etcd leader when the follower came back")
