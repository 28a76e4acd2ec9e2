"""Scenario 1: a node crashes mid-task — its daemon alone (the etcd member lives on), or
the whole machine (daemon, etcd member and task processes) — including the window
between the steal transaction and the container start."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.faults import history
from tests.e2e.faults.netcluster import NetCluster, wait_for

# Long enough that a task of the crashed node would still run when its replacement
# starts (lease TTL 5 s + requeue + steal), so I2 sees any double execution.
LONG = 9.0


def kill_first_owner(cluster: NetCluster, ids: list[str],
                     crash: Callable[[int], None]) -> tuple[int, float, dict[str, pb.Task]]:
    """Poll until one of ids is RUNNING, then crash its node at once.

    Returns (victim index, seconds from seeing RUNNING to the crash done, the records
    of the victim's tasks as read just after the crash).
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tasks = cluster.tasks()
        running = [tasks[i] for i in ids if i in tasks and tasks[i].state == pb.TASK_STATE_RUNNING]
        if running:
            seen = time.monotonic()
            victim = cluster.index_of(running[0].node_name)
            crash(victim)
            latency = cluster.crashed_at[victim] - seen
            break
        time.sleep(0.005)
    else:
        raise AssertionError("no task started within 30 s")
    name = cluster.nodes[victim].name
    on_victim = {i: t for i, t in cluster.tasks().items()
                 if t.state == pb.TASK_STATE_RUNNING and t.node_name == name}
    return victim, latency, on_victim


def wait_moved(cluster: NetCluster, on_victim: dict[str, pb.Task], since: float) -> float:
    """Seconds from `since` until none of these tasks is RUNNING on its old attempt."""
    def moved() -> bool:
        tasks = cluster.tasks()
        return all(tasks[i].state != pb.TASK_STATE_RUNNING or tasks[i].attempt > old.attempt
                   for i, old in on_victim.items())
    wait_for("the crashed node's tasks to be recovered", moved, timeout=60, interval=0.05)
    return time.monotonic() - since


def submit_burst(cluster: NetCluster) -> tuple[list[str], list[str]]:
    restartable = [cluster.submit_traced(LONG, index=i % 3) for i in range(6)]
    once_only = [cluster.submit_traced(LONG, index=i % 3, restart=False) for i in range(3)]
    return restartable, once_only


def window_report(verdict: history.Verdict, on_victim: dict[str, pb.Task], crashed: float) -> str:
    """When the victim's attempts started their container, relative to the crash (the
    kill often lands between the steal transaction and the container start)."""
    starts = [trace.start for i, t in on_victim.items()
              if (trace := verdict.traces.get((i, t.attempt))) and trace.start is not None]
    before = sum(1 for start in starts if start < crashed)
    return (f"{before} had started their container before the crash, {len(starts) - before} "
            f"after it, {len(on_victim) - len(starts)} never")


@pytest.mark.timeout(240)
def test_sigkill_daemon_only_etcd_member_lives(make_cluster: Callable[..., NetCluster]) -> None:
    """The daemon dies, its etcd member keeps serving: the lease still expires, the other
    nodes requeue its tasks (restart=false ones end NODE_LOST), and no attempt of the
    dead daemon runs on beside its replacement."""
    cluster = make_cluster(external_etcd=(0, 1, 2))
    restartable, once_only = submit_burst(cluster)
    victim, latency, on_victim = kill_first_owner(
        cluster, restartable + once_only, lambda index: cluster.kill(index, etcd_too=False))
    killed_at = cluster.crashed_at[victim]
    node = cluster.nodes[victim]
    assert node.etcd_pid() is not None, "the victim's etcd member must stay alive"
    requeue = wait_moved(cluster, on_victim, killed_at)
    orphans_alive = len(node.task_pids())
    finished = cluster.wait_finished(timeout=120)
    verdict = history.check(cluster)
    window = window_report(verdict, on_victim, cluster.crashed_wall[victim])
    outlived = history.ran_on_after(verdict, node.name, cluster.crashed_wall[victim],
                                    [(i, t.attempt) for i, t in on_victim.items()])
    print(f"\n[daemon SIGKILL, etcd alive] killed {node.name} {latency * 1000:.0f} ms after "
          f"seeing RUNNING; {len(on_victim)} tasks on it ({window}); kill -> requeue "
          f"{requeue:.2f}s (lease ttl {cluster.lease_ttl}s); {orphans_alive} of its task "
          f"processes still ran at requeue; its attempts ran on {outlived:.2f}s after the kill")
    print(f"  {verdict.summary()}")
    assert on_victim, "the victim ran none of the tasks"
    lost = [i for i in once_only if i in on_victim]
    assert all(finished[i].reason == pb.REASON_NODE_LOST for i in lost), verdict.problems()
    assert verdict.ok("I1", "I3", "I4"), verdict.problems()
    # I5: the watchdog killed the dead daemon's task processes before anything could
    # start them again elsewhere.
    assert orphans_alive == 0, f"{orphans_alive} task processes of the dead daemon ran on"
    assert outlived < requeue, (f"the dead daemon's attempts ran {outlived:.2f}s after the "
                                f"kill, past the requeue at {requeue:.2f}s")

    # Restarted (as supervisord would), the node reaps what its last run left and joins
    # under a new id.
    old_id = next(t.node_id for t in on_victim.values())
    node.start_agent()
    cluster.faulty.discard(victim)
    wait_for("the restarted node to register anew",
             lambda: cluster.node_ids().get(node.name) not in (None, old_id), timeout=60)
    assert node.live_containers() == []
    assert verdict.ok("I2"), verdict.problems("I2")


@pytest.mark.timeout(240)
def test_power_loss_of_a_node(make_cluster: Callable[..., NetCluster]) -> None:
    """Daemon, etcd member and task processes die at once (a machine losing power): the
    two remaining members keep quorum and the other nodes requeue its tasks."""
    cluster = make_cluster()
    restartable, once_only = submit_burst(cluster)
    victim, latency, on_victim = kill_first_owner(cluster, restartable + once_only,
                                                  cluster.power_off)
    killed_at = cluster.crashed_at[victim]
    node = cluster.nodes[victim]
    requeue = wait_moved(cluster, on_victim, killed_at)
    finished = cluster.wait_finished(timeout=120)
    verdict = history.check(cluster)
    window = window_report(verdict, on_victim, cluster.crashed_wall[victim])
    print(f"\n[power loss] {node.name} lost {latency * 1000:.0f} ms after seeing RUNNING; "
          f"{len(on_victim)} tasks on it ({window}); kill -> requeue {requeue:.2f}s (lease "
          f"ttl {cluster.lease_ttl}s)")
    print(f"  {verdict.summary()}")
    assert on_victim, "the victim ran none of the tasks"
    assert node.task_pids() == []
    lost = [i for i in once_only if i in on_victim]
    assert all(finished[i].reason == pb.REASON_NODE_LOST for i in lost), verdict.problems()
    moved = [i for i in restartable if i in on_victim]
    assert all(finished[i].attempt == 2 for i in moved), verdict.problems()
    assert verdict.ok(), verdict.problems()
