"""A node whose etcd data was wiped: refused with the recovery named, then `--rejoin`.

Real 3-node loopback clusters (real etcd members, real agents, runc). The wiped node's old
member id must never come back: the plain restart is refused before etcd starts, and
`--rejoin` replaces the member by a new one that syncs from the leader.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.operations.rejoin import MARKER_NAME
from tests.e2e.cluster import FILCH, Cluster, Node, wait_for
from tests.e2e.conftest import require_tools

pytestmark = pytest.mark.timeout(300)

ETCDCTL_ENV = dict(os.environ, ETCDCTL_API="3")


def etcdctl_argv(cluster: Cluster, endpoint: str) -> list[str]:
    """etcdctl against endpoint; with TLS it presents node-1's etcd certificate (every
    member trusts the etcd CA)."""
    argv = ["etcdctl", "--endpoints", endpoint]
    if cluster.pki is not None:
        name = cluster.nodes[0].name
        argv += ["--cacert", str(cluster.pki / "etcd-ca.crt"),
                 "--cert", str(cluster.pki / f"{name}-etcd.crt"),
                 "--key", str(cluster.pki / f"{name}-etcd.key")]
    return argv


def etcdctl(cluster: Cluster, endpoint: str, *args: str) -> str:
    return subprocess.run([*etcdctl_argv(cluster, endpoint), "--command-timeout", "5s",
                           *args], env=ETCDCTL_ENV, capture_output=True, text=True,
                          check=True, timeout=30).stdout


def members(cluster: Cluster, index: int) -> dict[str, dict[str, object]]:
    """The member list as node `index`'s etcd member sees it, keyed by "node-N" (the
    cluster's names carry a suffix that keeps them unique per test run)."""
    answer = json.loads(etcdctl(cluster, cluster.nodes[index].etcd_endpoint, "member",
                                "list", "-w", "json"))
    short = {node.name: f"node-{i + 1}" for i, node in enumerate(cluster.nodes)}
    return {short.get(str(m.get("name", "")), str(m.get("name", ""))): m
            for m in answer["members"]}


def wipe(node: Node) -> None:
    """Stop the node and delete its etcd data dir, as a disk swap or a careless rm would."""
    node.stop()
    node.kill_hard()
    shutil.rmtree(node.data_dir / "etcd")


def put_before_wipe(cluster: Cluster) -> str:
    """A task that completed and a raw key, both written while all three members ran."""
    task_id = cluster.submit("true")
    cluster.wait_finished([task_id])
    etcdctl(cluster, cluster.nodes[0].etcd_endpoint, "put", "/rejoin-test/before", "kept")
    return task_id


def start_refused(node: Node, *extra: str) -> str:
    """Run the node's agent in the foreground; assert it refused, changed nothing, and
    return its one-line error."""
    result = subprocess.run([FILCH, "agent", *node.args, *extra], capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: etcd data of member node-3"), result.stderr
    assert "'filch agent --rejoin" in last and "new member" in last
    # Refused before etcd ran: the data dir is still empty.
    assert not (node.data_dir / "etcd" / "member").exists()
    return last


def test_a_plain_restart_after_the_wipe_is_refused_and_changes_nothing(
        fresh_three_nodes: Cluster) -> None:
    cluster = fresh_three_nodes
    third = cluster.nodes[2]
    old_id = members(cluster, 0)["node-3"]["ID"]
    # The agent records its member once etcd answers, after it started serving.
    wait_for("node-3's member marker", (third.data_dir / MARKER_NAME).exists)
    wipe(third)

    line = start_refused(third)

    assert f"{int(str(old_id)):x}" in line and MARKER_NAME in line
    assert members(cluster, 0)["node-3"]["ID"] == old_id
    # The other two carry on: a quorum, and tasks run.
    task_id = cluster.submit("true")
    assert cluster.wait_finished([task_id])[0].state == pb.TASK_STATE_COMPLETE
    # The case etcd itself lets through: no peer answers at start-up (the whole cluster
    # restarts), and etcd would bootstrap an empty member under the old id, which votes.
    for node in cluster.nodes[:2]:
        node.stop()
    start_refused(third)
    # Nor can --rejoin go ahead without a healthy member; it says so and changes nothing.
    result = subprocess.run([FILCH, "agent", *third.args, "--rejoin"], capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --rejoin found no healthy etcd member"), result.stderr
    assert not (third.data_dir / "etcd" / "member").exists()
    assert (third.data_dir / MARKER_NAME).exists()


def test_without_the_marker_the_peers_evidence_refuses_an_existing_join(
        fresh_three_nodes: Cluster) -> None:
    cluster = fresh_three_nodes
    third = cluster.nodes[2]
    old_id = members(cluster, 0)["node-3"]["ID"]
    wipe(third)
    # The whole data dir was lost, or the node predates the marker.
    (third.data_dir / MARKER_NAME).unlink(missing_ok=True)

    # `existing` with an empty dir is what etcd would let rejoin under the old id.
    for state in ("existing", "new"):
        line = start_refused(third, "--initial-cluster-state", state)
        assert f"{int(str(old_id)):x}" in line and "lists it as started" in line
    assert members(cluster, 0)["node-3"]["ID"] == old_id
    task_id = cluster.submit("true")
    assert cluster.wait_finished([task_id])[0].state == pb.TASK_STATE_COMPLETE


def test_rejoin_replaces_the_member_and_the_node_serves_the_old_data(
        fresh_three_nodes: Cluster) -> None:
    cluster = fresh_three_nodes
    third = cluster.nodes[2]
    before = put_before_wipe(cluster)
    old_id = members(cluster, 0)["node-3"]["ID"]
    wipe(third)

    rejoin(cluster, third)

    assert_rejoined(cluster, old_id, before)
    # From now on the node restarts plainly, as the new member, with its data.
    new_id = members(cluster, 0)["node-3"]["ID"]
    third.stop()
    wait_for("node-3 to leave", lambda: len(cluster.list_nodes()) == 2, timeout=30)
    third.start()
    wait_for("node-3 to register again", lambda: len(cluster.list_nodes()) == 3, timeout=60)
    assert members(cluster, 0)["node-3"]["ID"] == new_id


def test_rejoin_converges_after_a_crash_between_its_steps(fresh_three_nodes: Cluster) -> None:
    cluster = fresh_three_nodes
    third = cluster.nodes[2]
    before = put_before_wipe(cluster)
    old_id = members(cluster, 0)["node-3"]["ID"]
    wipe(third)
    # An earlier --rejoin that crashed after both member changes, before etcd started:
    # the old member is gone and an unstarted one holds the peer URL.
    first = cluster.nodes[0].etcd_endpoint
    etcdctl(cluster, first, "member", "remove", f"{int(str(old_id)):x}")
    # etcd refuses a new voter until its members have been connected for 5 s.
    wait_for("etcd to accept the new member", lambda: subprocess.run(
        [*etcdctl_argv(cluster, first), "member", "add", third.name, "--peer-urls",
         f"http://{third.ip}:2380"], env=ETCDCTL_ENV, capture_output=True, timeout=30,
    ).returncode == 0, timeout=30, interval=0.5)
    listed = json.loads(etcdctl(cluster, first, "member", "list", "-w", "json"))["members"]
    added = [m for m in listed if not m.get("name")]
    assert len(added) == 1

    rejoin(cluster, third)

    assert_rejoined(cluster, old_id, before)
    assert members(cluster, 0)["node-3"]["ID"] == added[0]["ID"]  # reused, not added twice


def test_rejoin_over_mutual_tls_between_peers(tmp_path: Path) -> None:
    """With certificates the peers' GET /members needs the node's client certificate."""
    require_tools()
    with Cluster(tmp_path / "cluster", size=3, pki=tmp_path / "pki") as cluster:
        third = cluster.nodes[2]
        before = put_before_wipe(cluster)
        old_id = members(cluster, 0)["node-3"]["ID"]
        wipe(third)
        (third.data_dir / MARKER_NAME).unlink(missing_ok=True)  # the peers' word alone
        line = start_refused(third)
        assert "lists it as started" in line

        rejoin(cluster, third)

        assert_rejoined(cluster, old_id, before)


def rejoin(cluster: Cluster, node: Node) -> None:
    node.args = [*node.args, "--rejoin"]
    node.start()
    wait_for("node-3 to register again", lambda: len(cluster.list_nodes()) == 3, timeout=60)
    # Later restarts are plain ones: the new member has its data and the marker.
    node.args.remove("--rejoin")


def assert_rejoined(cluster: Cluster, old_id: object, before: str) -> None:
    def three_started() -> dict[str, dict[str, object]] | None:
        found = members(cluster, 2)
        return found if len(found) == 3 and all(found) else None  # unstarted: no name

    listed = wait_for("three started members", three_started, timeout=60)
    assert listed["node-3"]["ID"] != old_id
    health = subprocess.run(
        [*etcdctl_argv(cluster, cluster.nodes[2].etcd_endpoint), "endpoint", "health",
         "--cluster"], env=ETCDCTL_ENV, capture_output=True, text=True, timeout=30)
    assert health.returncode == 0, health.stderr
    assert health.stdout.count("is healthy") + health.stderr.count("is healthy") == 3
    # Written before the wipe, read through the new member (serializable: its own copy).
    out = etcdctl(cluster, cluster.nodes[2].etcd_endpoint, "get", "--consistency", "s",
                  "/rejoin-test/before", "--print-value-only")
    assert out.strip() == "kept"
    task = cluster.stub(2).GetTask(pb.GetTaskRequest(id=before), timeout=10)
    assert task.state == pb.TASK_STATE_COMPLETE
    assert_runs_tasks(cluster, cluster.nodes[2].name)
    # The agent records the new member once it is up: possibly after etcd lists it started.
    def marker_names_the_new_member() -> bool:
        marker = json.loads((cluster.nodes[2].data_dir / MARKER_NAME).read_text())
        return int(marker["member_id"], 16) == int(str(listed["node-3"]["ID"]))

    wait_for("the marker to name the new member", marker_names_the_new_member, timeout=30)


def assert_runs_tasks(cluster: Cluster, name: str) -> None:
    """Tasks that fill a node each: with three queued at once, every node takes one."""
    for _ in range(3):  # bounded: a busy machine may let one node take two in a row
        ids = [cluster.submit("sleep", "2", index=2, cpu_millis=2000) for _ in range(3)]
        done = cluster.wait_finished(ids, timeout=120)
        assert all(task.state == pb.TASK_STATE_COMPLETE for task in done)
        if any(task.node_name == name for task in done):
            return
    raise AssertionError(f"{name} ran none of 9 tasks that each fill a node")

