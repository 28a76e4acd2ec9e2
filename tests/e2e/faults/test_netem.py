"""Scenario 6: a slow, lossy network between the nodes. Work goes on and I1-I4 hold."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.e2e.faults import history
from tests.e2e.faults.netcluster import (
    NetCluster,
    iptables_unavailable_reason,
    netem_unavailable_reason,
)

# Enough work to keep every slot busy for ~3 lease TTLs: renewals, steals and finishes
# all cross the faulty links many times.
TASKS = 30
TASK_SECONDS = 2.0
CPU_MILLIS = 1000         # two tasks at a time per 2-CPU node


def run_under_fault(cluster: NetCluster, label: str) -> None:
    started = time.monotonic()
    for i in range(TASKS):
        # A lossy link can stall one etcd round trip past the server's deadline: the node
        # answers UNAVAILABLE and a careful client retries under its request_id.
        cluster.submit_traced(TASK_SECONDS, index=i % 3, cpu_millis=CPU_MILLIS, timeout=30,
                              retry=60)
    cluster.wait_finished(timeout=150)
    elapsed = time.monotonic() - started
    verdict = history.check(cluster)
    fences = {node.name: history.fences(node) for node in cluster.nodes}
    dropped = sum(cluster.dropped_packets(index) for index in range(cluster.size))
    print(f"\n[{label}] {TASKS} tasks of {TASK_SECONDS}s done in {elapsed:.1f}s; fences "
          f"logged: {fences}; results refused by the fence: "
          f"{sum(history.rejected_writes(node) for node in cluster.nodes)}; packets dropped "
          f"by iptables: {dropped}")
    print(f"  {verdict.summary()}")
    assert verdict.ok(), verdict.problems()


@pytest.mark.timeout(240)
def test_netem_delay_and_loss(make_cluster: Callable[..., NetCluster]) -> None:
    """tc netem "delay 200ms loss 10%" on every node's link (egress)."""
    reason = netem_unavailable_reason()
    if reason:
        pytest.skip(f"{reason}; test_random_packet_loss covers the loss half with iptables")
    cluster = make_cluster()
    for index in range(cluster.size):
        cluster.netem(index, "delay 200ms loss 10%")
    run_under_fault(cluster, "netem delay 200ms loss 10% on every link")


@pytest.mark.timeout(240)
def test_random_packet_loss(make_cluster: Callable[..., NetCluster]) -> None:
    """10 % of the packets arriving at each node dropped at random (iptables statistic
    match): the loss of scenario 6 on kernels without sch_netem."""
    if netem_unavailable_reason() is None:
        pytest.skip("tc netem works here: test_netem_delay_and_loss covers packet loss")
    reason = iptables_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = make_cluster()
    for index in range(cluster.size):
        cluster.random_loss(index, 0.10)
    run_under_fault(cluster, "10% random loss on every node's incoming packets (iptables)")
