"""Cordon, drain and uncordon by node name; names unique among live nodes (issue 20).

One three-node cluster (process executor: no task networks to set up, quick starts) with
a short lease, shared by the tests in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import FILCH, Cluster, Node, wait_for
from tests.e2e.conftest import require_tools
from tests.e2e.test_events import revision_now

# Short, so that a restarted node's old name frees soon; long enough for this machine.
LEASE_TTL = 3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_tools()
    # Not tmp_path: pytest makes its parent 0700, which the task uid could not traverse.
    root = Path(tempfile.mkdtemp(prefix="filch-cordon-"))
    root.chmod(0o755)
    try:
        with Cluster(root, size=3, executor="process", lease_ttl=LEASE_TTL) as running:
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


def node_record(cluster: Cluster, name: str) -> pb.Node | None:
    return next((node for node in cluster.list_nodes() if node.name == name), None)


def wait_cordoned(cluster: Cluster, name: str, cordoned: bool = True) -> pb.Node:
    return wait_for(f"{name}'s record to say cordoned={cordoned}",
                    lambda: (node := node_record(cluster, name)) is not None
                    and node.cordoned == cordoned and node, timeout=30)


def set_cordon(cluster: Cluster, name: str, cordoned: bool) -> None:
    """Over gRPC (quicker than the CLI) where the test is not about the CLI."""
    if cordoned:
        cluster.stub(0).CordonNode(pb.CordonNodeRequest(name=name), timeout=10)
    else:
        cluster.stub(0).UncordonNode(pb.UncordonNodeRequest(name=name), timeout=10)
    wait_cordoned(cluster, name, cordoned)


def cli_ok(cluster: Cluster, *args: str) -> str:
    result = cluster.cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_cordoned_node_takes_none_of_20_queued_tasks(cluster: Cluster) -> None:
    cordoned = cluster.nodes[2].name
    before = revision_now(cluster)
    assert f"{cordoned}: cordoned" in cli_ok(cluster, "node", "cordon", cordoned)
    record = wait_cordoned(cluster, cordoned)
    # Followers of the event stream see it as a node event.
    stream = cluster.stub(0).Watch(pb.WatchRequest(since_revision=before), timeout=30)
    assert any(event.type == "node" and event.node_name == cordoned
               and event.state == "CORDONED" for response in stream
               for event in response.events), "no CORDONED node event"
    stream.cancel()
    ids = [cluster.submit("sh", "-c", "sleep 0.3", cpu_millis=100, index=index % 3)
           for index in range(20)]
    tasks = cluster.wait_finished(ids, timeout=90)
    assert all(task.state == pb.TASK_STATE_COMPLETE and task.exit_code == 0 for task in tasks)
    assert not [task.id for task in tasks if task.node_id == record.id]
    # Everyone sees it: `nodes -o json`, the table, the metrics of the node and the cluster.
    shown = {node["name"]: node for node in json.loads(cli_ok(cluster, "nodes", "-o", "json"))}
    assert shown[cordoned]["cordoned"] and not shown[cordoned]["draining"]
    assert not shown[cluster.nodes[0].name]["cordoned"]
    assert "cordoned" in cli_ok(cluster, "nodes")
    assert cluster.metrics(2)["filch_node_cordoned"] == 1
    assert cluster.metrics(0)["filch_node_cordoned"] == 0
    assert cluster.metrics(0)["filch_nodes_cordoned"] == 1


def test_the_cordon_survives_a_sigkill_and_the_name_comes_back_within_a_ttl(
        cluster: Cluster) -> None:
    node = cluster.nodes[2]
    old = node_record(cluster, node.name)
    assert old is not None and old.cordoned
    node.kill_hard()
    started = time.monotonic()
    node.start()
    # Its old record holds the name until the old lease expires: the agent waits for it.
    new = wait_for("the restarted node to register under its name",
                   lambda: (found := node_record(cluster, node.name)) is not None
                   and found.id != old.id and found, timeout=LEASE_TTL + 25)
    took = time.monotonic() - started
    assert new.cordoned      # its first record already says so: it stole nothing meanwhile
    ids = [cluster.submit("sh", "-c", "sleep 0.2", cpu_millis=100) for _ in range(6)]
    assert not [task.id for task in cluster.wait_finished(ids, timeout=60)
                if task.node_id == new.id]
    print(f"restart after SIGKILL registered in {took:.1f}s (lease TTL {LEASE_TTL}s)")


def test_drain_hands_back_a_long_task_and_lets_a_short_one_finish(cluster: Cluster) -> None:
    drained, others = cluster.nodes[1].name, [cluster.nodes[0].name, cluster.nodes[2].name]
    # Only the drained node takes these two: the others are cordoned meanwhile.
    for name in others:
        set_cordon(cluster, name, True)
    record = wait_cordoned(cluster, drained, cordoned=False)
    long_id = cluster.submit("sleep", "300", cpu_millis=100, restart=True)
    short_id = cluster.submit("sleep", "6", cpu_millis=100)
    for task_id in (long_id, short_id):
        assert cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,)).node_id == record.id
    env = dict(os.environ, FILCH_SERVER=cluster.nodes[0].address)
    drain = subprocess.Popen([FILCH, "node", "drain", drained, "--deadline", "8s"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The others take work again while the drain runs: the handed-back task goes there.
        for name in others:
            set_cordon(cluster, name, False)
        stdout, stderr = drain.communicate(timeout=60)
    finally:
        drain.kill()
    assert drain.returncode == 0, stderr
    assert "1 finished, 1 handed back" in stdout, stdout
    short = cluster.get(short_id)
    assert (short.state, short.exit_code, short.node_id) == (pb.TASK_STATE_COMPLETE, 0,
                                                             record.id)
    # Handed back as a lost node's task: requeued (--restart), no retry spent; it runs
    # on another node.
    moved = wait_for("the long task to run elsewhere",
                     lambda: (task := cluster.get(long_id)).state == pb.TASK_STATE_RUNNING
                     and task.node_id != record.id and task, timeout=30)
    assert moved.retries_used == 0
    assert [attempt.reason for attempt in moved.attempts] == [pb.REASON_NODE_LOST]
    assert "was drained" in moved.attempts[0].message
    # Its record (rewritten a moment later: writes are coalesced) says cordoned, not draining.
    wait_for("the drained node's record to say cordoned, not draining",
             lambda: (found := node_record(cluster, drained)) is not None
             and found.cordoned and not found.draining, timeout=20)
    cluster.stub(0).Cancel(pb.CancelRequest(id=long_id), timeout=10)


def test_uncordon_cancels_a_drain_under_way(cluster: Cluster) -> None:
    drained = cluster.nodes[1].name      # still cordoned by the drain before
    record = node_record(cluster, drained)
    assert record is not None
    set_cordon(cluster, drained, False)
    for name in (cluster.nodes[0].name, cluster.nodes[2].name):
        set_cordon(cluster, name, True)
    task_id = cluster.submit("sleep", "300", cpu_millis=100)
    assert cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,)).node_id == record.id
    env = dict(os.environ, FILCH_SERVER=cluster.nodes[0].address)
    drain = subprocess.Popen([FILCH, "node", "drain", drained, "--deadline", "5m"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the node to say it drains",
                 lambda: (node := node_record(cluster, drained)) is not None and node.draining,
                 timeout=30)
        out = cli_ok(cluster, "node", "uncordon", drained)
        assert "drain was canceled" in out
        _, stderr = drain.communicate(timeout=30)
    finally:
        drain.kill()
    assert drain.returncode == 1
    assert "canceled" in stderr and len(stderr.strip().splitlines()) == 1
    wait_cordoned(cluster, drained, cordoned=False)
    task = cluster.get(task_id)
    assert (task.state, task.node_id) == (pb.TASK_STATE_RUNNING, record.id)   # left alone
    cluster.stub(0).Cancel(pb.CancelRequest(id=task_id), timeout=10)
    for name in (cluster.nodes[0].name, cluster.nodes[2].name):
        set_cordon(cluster, name, False)


def test_a_drain_resumes_when_its_node_restarts_and_outlives_its_client(
        cluster: Cluster) -> None:
    node = cluster.nodes[2]
    others = [cluster.nodes[0].name, cluster.nodes[1].name]
    for name in others:
        set_cordon(cluster, name, True)
    record = wait_cordoned(cluster, node.name, cordoned=False)
    task_id = cluster.submit("sleep", "300", cpu_millis=100, restart=True)
    assert cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,)).node_id == record.id
    # The client goes away at once: the drain is the node's, not the command's.
    progress = cluster.stub(0).DrainNode(pb.DrainNodeRequest(name=node.name,
                                                             deadline_seconds=300), timeout=30)
    assert not next(progress).done
    progress.cancel()
    wait_for("the node to say it drains",
             lambda: (found := node_record(cluster, node.name)) is not None and found.draining,
             timeout=30)
    for name in others:
        set_cordon(cluster, name, False)
    node.stop()      # SIGTERM: its attempt goes back to the queue, the drain stays in etcd
    node.start()
    # Restarted, it resumes the drain (nothing runs there now) and ends it; a client that
    # follows it again sees the end.
    result = cluster.cli("node", "drain", node.name, "-o", "json", timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == node.name
    after = wait_for("the restarted node's record",
                     lambda: (found := node_record(cluster, node.name)) is not None
                     and found.id != record.id and not found.draining and found, timeout=30)
    assert after.cordoned
    moved = wait_for("the task to run elsewhere",
                     lambda: (task := cluster.get(task_id)).state == pb.TASK_STATE_RUNNING
                     and task.node_id not in (record.id, after.id) and task, timeout=30)
    cluster.stub(0).Cancel(pb.CancelRequest(id=moved.id), timeout=10)
    set_cordon(cluster, node.name, False)


def test_bad_input_gets_one_line_and_the_right_code(cluster: Cluster) -> None:
    for args, words in ((("node", "drain", "no-such-node"), "no live node is named"),
                        (("node", "cordon", "../etc"), "is not a node name")):
        result = cluster.cli(*args)
        assert result.returncode != 0, args
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
        assert "Traceback" not in result.stderr
    stub = cluster.stub(0)
    for request, code in ((pb.DrainNodeRequest(name=cluster.nodes[0].name,
                                               deadline_seconds=-1),
                           grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.DrainNodeRequest(name=cluster.nodes[0].name,
                                               deadline_seconds=float("nan")),
                           grpc.StatusCode.INVALID_ARGUMENT),
                          (pb.DrainNodeRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.DrainNode(request, timeout=10))
        assert caught.value.code() == code
    for method, request, code in (
            (stub.CordonNode, pb.CordonNodeRequest(name="nobody"), grpc.StatusCode.NOT_FOUND),
            (stub.UncordonNode, pb.UncordonNodeRequest(name="nobody"),
             grpc.StatusCode.NOT_FOUND),
            (stub.CordonNode, pb.CordonNodeRequest(name="a" * 300),
             grpc.StatusCode.INVALID_ARGUMENT),
            (stub.CordonNode, pb.CordonNodeRequest(name="x\x00/../y"),
             grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as caught:
            method(request, timeout=10)
        assert caught.value.code() == code
    # Nothing was written for any of them.
    assert not [key for key in cluster.etcd_keys() if key.startswith("/cordon/")]


def test_a_second_agent_under_a_live_nodes_name_refuses_to_start(cluster: Cluster) -> None:
    taken = cluster.nodes[0]
    before = node_record(cluster, taken.name)
    assert before is not None
    root = Path(tempfile.mkdtemp(prefix="filch-dup-"))
    ip = taken.ip.rsplit(".", 1)[0] + ".9"
    duplicate = Node(taken.name, ip, root / "dup",
                     ["--name", taken.name, "--data-dir", str(root / "dup"),
                      "--listen", f"{ip}:7070",
                      "--etcd-endpoint", taken.etcd_endpoint, "--executor", "process",
                      "--cpus", "1", "--memory", "1Gi", "--lease-ttl", str(LEASE_TTL)])
    try:
        started = time.monotonic()
        duplicate.start()
        assert duplicate.process is not None
        code = duplicate.process.wait(timeout=LEASE_TTL + 30)
        took = time.monotonic() - started
        log = duplicate.log_text()
    finally:
        duplicate.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert code == 1, log
    refusals = [line for line in log.splitlines() if "ERROR" in line]
    assert len(refusals) == 1 and f"{taken.name!r} is held by live node {before.id}" \
        in refusals[0], log
    assert took >= LEASE_TTL          # it waited out a TTL for a crashed run's record
    after = node_record(cluster, taken.name)
    assert after is not None and after.id == before.id     # the live node is untouched
