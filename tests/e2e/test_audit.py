"""The audit trail on a real TLS + token cluster: every change once, nothing for reads or
refused calls, read from another node; a user sees only its own entries; retention."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.etcd_client import EtcdTLS
from node.etcd.store import Store
from node.etcd.users import token_hash
from node.operations.audit_retention import AuditRetention
from node.scheduling.node_state import NodeState
from tests.e2e.cluster import FILCH, Cluster
from tests.e2e.conftest import require_tools

ALICE_TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    root = tmp_path_factory.mktemp("audit")
    # The process executor (fast; no runc needed) with TLS must be allowed explicitly.
    with Cluster(root / "nodes", size=2, executor="process", cpus=4, pki=root / "pki",
                 extra=("--allow-unisolated-tasks",)) as started:
        # A user, written as the user RPCs would (they are another part of issue 21).
        alice = pb.User(name="alice", role=pb.ROLE_USER, token_hash=token_hash(ALICE_TOKEN))
        subprocess.run(started.etcdctl("put", keys.user("alice").decode()),
                       input=alice.SerializeToString(), check=True, capture_output=True,
                       env=dict(os.environ, ETCDCTL_API="3"), timeout=30)
        yield started


def audit(cluster: Cluster, *args: str, index: int = 1, token: str = "") -> Any:
    env = dict(os.environ, FILCH_SERVER=cluster.nodes[index].address,
               FILCH_CA=str(cluster.pki / "ca.crt") if cluster.pki else "")
    if token:
        env["FILCH_TOKEN"] = token
    else:
        env["FILCH_TOKEN_FILE"] = str(cluster.pki / "token") if cluster.pki else ""
    result = subprocess.run([FILCH, "audit", "-o", "json", *args], env=env, text=True,
                            capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_change_once_and_nothing_else(cluster: Cluster) -> None:
    started = time.time()
    stub = cluster.stub(0)
    other = cluster.nodes[1].name
    # Changes.
    short = cluster.submit("sleep", "0.2", owner="alice", priority=3)
    array = stub.Submit(pb.SubmitRequest(spec=pb.TaskSpec(command="true"),
                                         array=pb.ArraySpec(start=0, end=2)), timeout=10)
    long = cluster.submit("sleep", "30")
    stub.Cancel(pb.CancelRequest(id=long), timeout=10)
    stub.CordonNode(pb.CordonNodeRequest(name=other), timeout=10)
    stub.UncordonNode(pb.UncordonNodeRequest(name=other), timeout=10)
    assert list(stub.DrainNode(pb.DrainNodeRequest(name=other), timeout=30))[-1].done
    stub.UncordonNode(pb.UncordonNodeRequest(name=other), timeout=10)
    stub.SetOwnerWeight(pb.SetOwnerWeightRequest(name="alice", weight=2), timeout=10)
    # Refused calls: nothing changed, nothing recorded.
    for refused in (lambda: stub.Cancel(pb.CancelRequest(id=keys.new_task_id()), timeout=10),
                    lambda: stub.Submit(pb.SubmitRequest(spec=pb.TaskSpec()), timeout=10),
                    lambda: stub.SetOwnerWeight(pb.SetOwnerWeightRequest(name="alice",
                                                                         weight=-1), timeout=10)):
        with pytest.raises(grpc.RpcError):
            refused()
    # Reads.
    stub.ListTasks(pb.ListTasksRequest(), timeout=10)
    stub.GetTask(pb.GetTaskRequest(id=short), timeout=10)
    stub.ListNodes(pb.ListNodesRequest(), timeout=10)
    stub.ListOwners(pb.ListOwnersRequest(), timeout=10)
    assert cluster.cli("ls", "-o", "json").returncode == 0
    cluster.wait_finished([short])

    entries = audit(cluster, "--since", f"{int(time.time() - started) + 5}s")
    assert [(entry["action"], entry["target"]) for entry in reversed(entries)] == [
        ("submit", short), ("submit", array.array_id), ("submit", long), ("cancel", long),
        ("cordon", other), ("uncordon", other), ("drain", other), ("uncordon", other),
        ("owner-weight", "alice")]
    for entry in entries:
        assert entry["user"] == "admin" and entry["via"] == "grpc", entry
        assert entry["address"].startswith("127."), entry
        assert entry["node"] == cluster.nodes[0].name, entry
    by_target = {entry["target"]: entry for entry in entries}
    assert by_target[array.array_id]["detail"] == \
        "array 0-2 of 3 tasks, owner default, priority 0: true"
    assert [entry["detail"] for entry in reversed(entries) if entry["target"] == other] == [
        "cordoned", "uncordoned", "drain started, deadline 10m", "uncordoned"]
    assert by_target[short]["detail"] == "owner alice, priority 3: sleep 0.2"
    assert cluster.metrics(0)['filch_audit_entries_total{action="submit"}'] == 3


def test_a_user_sees_only_its_own_entries(cluster: Cluster) -> None:
    env = dict(os.environ, FILCH_SERVER=cluster.nodes[0].address,
               FILCH_CA=str(cluster.pki / "ca.crt") if cluster.pki else "",
               FILCH_TOKEN=ALICE_TOKEN)
    submitted = subprocess.run([FILCH, "submit", "--", "true"], env=env, text=True,
                               capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    mine = audit(cluster, token=ALICE_TOKEN)
    assert [(entry["user"], entry["action"], entry["target"]) for entry in mine] == [
        ("alice", "submit", task_id)]
    assert mine[0]["via"] == "local" and mine[0]["address"] == f"local uid {os.geteuid()}"
    # Attacker: asking for another user's entries finds none (admin's exist).
    assert audit(cluster, "--user", "admin", token=ALICE_TOKEN) == []
    assert audit(cluster, "--user", "admin")
    assert {entry["user"] for entry in audit(cluster, "--user", "alice")} == {"alice"}


def test_retention_keeps_the_newest_within_the_bound(cluster: Cluster) -> None:
    assert cluster.pki is not None
    before = audit(cluster)
    assert len(before) > 3
    node = cluster.nodes[0]
    tls = EtcdTLS(str(cluster.pki / "etcd-ca.crt"), str(cluster.pki / f"{node.name}-etcd.crt"),
                  str(cluster.pki / f"{node.name}-etcd.key"))

    async def trim() -> int:
        store = Store(endpoint=node.etcd_endpoint, tls=tls)
        try:
            settings = ClusterSettingsView()
            settings.current = pb.ClusterSettings(audit_max_entries=3)
            # trim() is the chore once its lock is held (round() takes it): no state needed.
            return await AuditRetention(store=store, state=NodeState.__new__(NodeState),
                                        settings=settings).trim()
        finally:
            await store.close()

    assert asyncio.run(trim()) == len(before) - 3
    assert audit(cluster) == before[:3]
