"""Three peer nodes: work spreads, logs travel between nodes, a dead node loses no work,
and etcd holds exactly the keys of design.md's schema."""

from __future__ import annotations

import collections
import re
import subprocess
import threading
import time

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import FILCH, Cluster, wait_for

UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
SCHEMA = [re.compile(pattern) for pattern in (
    rf"^/task/{UUID}$",
    rf"^/task/status/queued/{UUID}$",
    rf"^/task/status/running/{UUID}/{UUID}$",
    rf"^/task/status/complete/\d{{16}}/{UUID}$",
    rf"^/task/status/canceled/\d{{16}}/{UUID}$",
    rf"^/node/{UUID}$",
    # Beside each queued key: the priority index (rank = 1000 - priority), and owners'
    # fair-share weights.
    rf"^/queue/\d{{4}}/[A-Za-z0-9][A-Za-z0-9._@-]{{0,63}}/{UUID}$",
    # ... and its twin by shard (3 hex digits), which nodes watch in part.
    rf"^/shard/[0-9a-f]{{3}}/\d{{4}}/[A-Za-z0-9][A-Za-z0-9._@-]{{0,63}}/{UUID}$",
    # ... and the mark of each group (rank, owner) that may hold queue keys.
    r"^/groups/\d{4}/[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
    r"^/owner/[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
    # The running-task index (beside each RUNNING record, not on the lease) and the claims
    # of cluster chores (on their holder's lease), e.g. /lock/recovery-sweep.
    rf"^/placed/{UUID}/{UUID}$",
    r"^/lock/[a-z0-9/-]+$",
    # Cluster-wide counts, published by the counts chore's holder.
    r"^/stats/counts$",
    # Node names (on their node's lease) and cordons by name.
    r"^/nodename/[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
    r"^/cordon/[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
    # Dependencies: flags, release marks, open array members.
    rf"^/dependents/{UUID}$",
    rf"^/release/{UUID}$",
    rf"^/open/{UUID}/{UUID}$",
    # Many users: users, accounted tasks' quota index keys, decayed usage per owner, the
    # cluster settings, the audit trail (epoch ms / 16 random hex digits).
    r"^/user/[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
    rf"^/pending/[A-Za-z0-9][A-Za-z0-9._@-]{{0,63}}/{UUID}$",
    rf"^/charge/[A-Za-z0-9][A-Za-z0-9._@-]{{0,63}}/{UUID}/\d+/\d+$",
    r"^/usage/[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
    r"^/cluster/settings$",
    r"^/audit/\d{16}/[0-9a-f]{16}$",
)]


def test_sixty_tasks_spread_over_three_nodes(three_nodes: Cluster) -> None:
    ids = [three_nodes.submit("sh", "-c", "sleep 0.3", index=i % 3) for i in range(60)]
    tasks = three_nodes.wait_finished(ids)
    assert all(t.reason == pb.REASON_EXITED and t.exit_code == 0 for t in tasks)
    shares = collections.Counter(task.node_name for task in tasks)
    print(f"\nshares of 60 tasks: {dict(sorted(shares.items()))}")
    assert set(shares) == {node.name for node in three_nodes.nodes}
    assert min(shares.values()) >= 10, shares


def test_logs_read_followed_and_cancelled_through_other_nodes(three_nodes: Cluster) -> None:
    task_id = three_nodes.submit(
        "sh", "-c", "i=0; while [ $i -lt 600 ]; do echo line $i; i=$((i+1)); sleep 0.1; done")
    task = three_nodes.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
    owner = next(i for i, node in enumerate(three_nodes.nodes) if node.address == task.node_address)
    reader, canceller = [i for i in range(3) if i != owner]

    wait_for("some output", lambda: "line 3" in three_nodes.cli("logs", task_id,
                                                                  index=reader).stdout)
    with subprocess.Popen(
            [FILCH, "--server", three_nodes.nodes[reader].address, "logs", "-f", task_id],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as follower:
        try:
            assert follower.stdout is not None
            first = follower.stdout.readline()
            assert first == "line 0\n"
            seen = [follower.stdout.readline() for _ in range(20)]
            assert seen[-1].startswith("line ")
            result = three_nodes.cli("cancel", task_id, index=canceller, check=True)
            assert "CANCELED" in result.stdout
            # The follow ends by itself once the owner has stopped the task (bounded: 30 s).
            watchdog = threading.Timer(30, follower.kill)
            watchdog.start()
            rest = follower.stdout.read()
            watchdog.cancel()
            assert follower.wait() == 0
        finally:
            follower.kill()
    lines = [first, *seen, *rest.splitlines(keepends=True)]
    numbers = [int(line.split()[1]) for line in lines if line.startswith("line ")]
    assert numbers == list(range(len(numbers))), "the followed log skipped or repeated lines"
    assert len(numbers) < 600


def test_logs_of_a_lost_node_say_so(fresh_three_nodes: Cluster) -> None:
    cluster = fresh_three_nodes
    task_id = cluster.submit("sh", "-c", "echo kept on one node", restart=False)
    task = cluster.wait_state(task_id, (pb.TASK_STATE_COMPLETE,))
    owner = next(i for i, node in enumerate(cluster.nodes) if node.address == task.node_address)
    cluster.drop_log_copies(task_id)     # no peer holds a copy (tests/e2e/test_log_copies.py)
    cluster.nodes[owner].kill_hard()
    other = next(i for i in range(3) if i != owner)
    result = cluster.cli("logs", task_id, index=other)
    assert result.returncode == 1
    assert "cannot be reached" in result.stderr and "no live node holds a copy" in result.stderr
    assert "Traceback" not in result.stderr


def test_killed_node_loses_no_work(fresh_three_nodes: Cluster) -> None:
    cluster = fresh_three_nodes
    restartable = [cluster.submit("sleep", "6", index=i % 3) for i in range(12)]
    once_only = [cluster.submit("sleep", "6", index=i % 3, restart=False) for i in range(6)]
    every = restartable + once_only

    def all_running() -> list[pb.Task] | None:
        tasks = [cluster.get(task_id) for task_id in every]
        return tasks if all(t.state == pb.TASK_STATE_RUNNING for t in tasks) else None

    tasks = wait_for("every task to run", all_running)
    by_node = collections.Counter(task.node_name for task in tasks)
    victim_name, _ = by_node.most_common(1)[0]
    victim = next(i for i, node in enumerate(cluster.nodes) if node.name == victim_name)
    on_victim = {t.id for t in tasks if t.node_name == victim_name}
    assert on_victim

    cluster.nodes[victim].kill_hard()
    killed_at = time.monotonic()

    def moved() -> bool:
        return all(cluster.get(task_id).state != pb.TASK_STATE_RUNNING
                   or cluster.get(task_id).attempt > 1 for task_id in on_victim)

    wait_for("the dead node's tasks to be recovered", moved, timeout=60, interval=0.05)
    print(f"\nkill -> requeue: {time.monotonic() - killed_at:.2f}s "
          f"({len(on_victim)} tasks on {victim_name}, lease ttl 5s)")

    finished = {t.id: t for t in cluster.wait_finished(every, timeout=120)}
    for task_id in restartable:
        task = finished[task_id]
        assert (task.state, task.reason, task.exit_code) == \
            (pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 0), task
        if task_id in on_victim:
            assert task.attempt == 2 and task.node_name != victim_name
    for task_id in once_only:
        task = finished[task_id]
        if task_id in on_victim:
            assert (task.reason, task.attempt) == (pb.REASON_NODE_LOST, 1), task
        else:
            assert task.reason == pb.REASON_EXITED
    survivors = [i for i in range(3) if i != victim]
    requeued = sum(cluster.metrics(i).get('filch_requeues_total{cause="lease_expired"}', 0)
                   for i in survivors)
    lost = sum(cluster.metrics(i)["filch_tasks_node_lost_total"] for i in survivors)
    assert requeued >= len(on_victim & set(restartable))
    assert lost >= len(on_victim & set(once_only))
    running = [t for t in cluster.any_stub().ListTasks(
        pb.ListTasksRequest(state=pb.TASK_STATE_RUNNING)).tasks]
    assert running == []
    assert_keyspace_matches_schema(cluster)


def assert_keyspace_matches_schema(cluster: Cluster) -> None:
    """Every key is in the schema, and every record is paired with exactly its status key."""
    found = cluster.etcd_keys()
    stray = [key for key in found if not any(pattern.match(key) for pattern in SCHEMA)]
    assert stray == []
    records = {key.rsplit("/", 1)[1] for key in found
               if re.match(rf"^/task/{UUID}$", key)}
    status = collections.Counter(key.rsplit("/", 1)[1] for key in found
                                 if key.startswith("/task/status/"))
    assert set(status) == records
    assert all(count == 1 for count in status.values())
    queued = {key.rsplit("/", 1)[1] for key in found if key.startswith("/task/status/queued/")}
    assert {key.rsplit("/", 1)[1] for key in found if key.startswith("/queue/")} == queued
    # Every running key has its /placed/ twin (same node, same task), and no /placed/ key
    # outlives its running key once recovery has run.
    running = {key.removeprefix("/task/status/running/") for key in found
               if key.startswith("/task/status/running/")}
    assert {key.removeprefix("/placed/") for key in found if key.startswith("/placed/")} == running


def test_keyspace_matches_the_schema(three_nodes: Cluster) -> None:
    ids = [three_nodes.submit("true") for _ in range(5)]
    three_nodes.wait_finished(ids)
    pending = three_nodes.submit("true", cpu_millis=64_000)
    sleeping = three_nodes.submit("sleep", "30")
    three_nodes.wait_state(sleeping, (pb.TASK_STATE_RUNNING,))
    assert_keyspace_matches_schema(three_nodes)
    three_nodes.cli("cancel", sleeping, check=True)
    three_nodes.wait_state(sleeping, (pb.TASK_STATE_CANCELED,))
    assert_keyspace_matches_schema(three_nodes)
    three_nodes.cli("cancel", pending, check=True)
    assert_keyspace_matches_schema(three_nodes)
