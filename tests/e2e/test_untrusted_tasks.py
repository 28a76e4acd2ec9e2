"""A hostile task against the control plane, from every network mode (issue: tasks are
untrusted).

Two-node clusters in network namespaces of their own (tests/e2e/faults/netcluster.py), so
a node's addresses are not the task's own loopback, each node with its HTTP face. From
inside a task, tests/e2e/escape_probe.py tries to read and write etcd on every address and
port of every node, to call the gRPC API without the token, to use the HTTP face and to
reach the metrics. Every probe must be refused or unreachable, and etcd's keyspace must be
unchanged apart from the probe task's own keys:

    cluster          --network none | isolated    --network host
    plain (no TLS)   everything unreachable        (not offered: no --allow-host-network;
                                                    documented as unprotected)
    TLS + token      everything unreachable        nothing answers without credentials
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.running.runtime import network as net
from tests.e2e.cluster import wait_for
from tests.e2e.conftest import require_tools
from tests.e2e.faults.netcluster import NetCluster, unavailable_reason
from tests.tcp_probe import TCP_PROBE

PROBE = (Path(__file__).with_name("escape_probe.py")).read_text()

# Ports of a node: etcd client and peer, gRPC API, HTTP face, metrics.
ETCD, PEER, GRPC, HTTP, METRICS = 2379, 2380, 7070, 8080, 9470

# The plain cluster's nodes each get a second address on eth0 (host part SECOND + index)
# with a server on SECOND_PORT there: an address of the node that is neither advertised
# nor in an etcd URL. And they deny tasks the test host's bridge address (--task-deny).
SECOND, SECOND_PORT = 200, 8099
ACCEPT_FOREVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    server.accept()[0].close()
"""
_servers: list[subprocess.Popen[bytes]] = []


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NetCluster]]:
    """"plain" and "tls" clusters, each started when a test first needs it."""
    require_tools()
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    started: dict[str, NetCluster] = {}
    yield started
    for server in _servers:
        server.kill()
        server.wait()
    for netcluster in started.values():
        netcluster.close()


def second_address(cluster: NetCluster, index: int) -> str:
    return f"{cluster.nodes[index].ip.rpartition('.')[0]}.{SECOND + index}"


def cluster_of(clusters: dict[str, NetCluster], kind: str,
               tmp_path_factory: pytest.TempPathFactory) -> NetCluster:
    if kind not in clusters:
        tls = kind == "tls"
        # Host networking is offered only where TLS and the token protect the node.
        extra = ("--allow-host-network",) if tls else ()
        root = tmp_path_factory.mktemp(kind)
        if not tls:
            # Deny the test host's own address on the cluster's bridge (known only once
            # the cluster claimed its subnet: added to the flags below).
            extra = ("--housekeeping-interval", "2")
        netcluster = NetCluster(root, size=2, pki=root / "pki" if tls else None, http=True,
                                extra=extra)
        if tls:
            clusters[kind] = netcluster.__enter__()
            return netcluster
        for node in netcluster.nodes:
            node.agent_args += ["--task-deny", f"{netcluster.bridge_ip}/32"]
        try:
            netcluster.setup_network()
            for index, node in enumerate(netcluster.nodes):
                address = second_address(netcluster, index)
                node.netns_exec("ip", "addr", "add", f"{address}/24", "dev", "eth0")
                _servers.append(node.spawn([sys.executable, "-c", ACCEPT_FOREVER, address,
                                            str(SECOND_PORT)], root / f"second-{index}.log"))
            netcluster.start()
        except BaseException:
            netcluster.close()
            raise
        clusters[kind] = netcluster
    return clusters[kind]


def targets(cluster: NetCluster, network: str) -> list[dict[str, object]]:
    """What the probe attacks: every port of every node, by each address it has, plus the
    loopback addresses a task sharing a node's network would find etcd and the UI on."""
    tls = cluster.pki is not None
    found: list[dict[str, object]] = []

    def add(kind: str, host: str, port: int, *schemes: bool) -> None:
        found.extend({"kind": kind, "host": host, "port": port, "tls": scheme}
                     for scheme in schemes)

    for host in [node.ip for node in cluster.nodes] + ["127.0.0.1"]:
        for kind in ("etcd-read", "etcd-write"):
            add(kind, host, ETCD, False, True)
        add("peer-read", host, PEER, False, True)
        add("grpc", host, GRPC, tls)
        for kind in ("http-read", "http-write"):
            add(kind, host, HTTP, tls)
        if network != "host":
            # Under host networking the metrics are as reachable as from any host process
            # (they hold no secrets); the other modes reach nothing of the node.
            add("tcp", host, METRICS, False)
    return found


def run_probe(cluster: NetCluster, network: str) -> tuple[pb.Task, list[dict[str, str]]]:
    spec = pb.TaskSpec(command="python3",
                       args=["-c", PROBE, json.dumps(targets(cluster, network))],
                       network=network, memory_bytes=128 * 2**20)
    task = cluster.any_stub().Submit(pb.SubmitRequest(spec=spec), timeout=10).task
    finished = cluster.wait_finished([task.id], timeout=90)[task.id]
    node = cluster.nodes[cluster.index_of(finished.node_name)]
    log = (node.data_dir / "logs" / task.id / f"{finished.attempt}.log").read_text()
    results = [json.loads(line[len("PROBE "):]) for line in log.splitlines()
               if line.startswith("PROBE ")]
    assert results, f"the probe printed nothing:\n{log}"
    return finished, results


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kind", "network"), [
    ("plain", "none"), ("plain", "isolated"),
    # Host networking without certificates is documented as unprotected: not probed.
    ("tls", "none"), ("tls", "isolated"), ("tls", "host"),
])
def test_a_task_cannot_reach_the_control_plane(
        clusters: dict[str, NetCluster], tmp_path_factory: pytest.TempPathFactory,
        kind: str, network: str) -> None:
    cluster = cluster_of(clusters, kind, tmp_path_factory)
    tls = cluster.pki is not None
    before = cluster.etcd_keys()
    task, results = run_probe(cluster, network)
    assert (task.state, task.exit_code) == (pb.TASK_STATE_COMPLETE, 0), task

    table = "\n".join(f"  {r['kind']:<10} {r['host']}:{r['port']} tls={r['tls']}: "
                      f"{r['outcome']}" for r in results)
    print(f"\n{network} network, {'TLS + token' if tls else 'plain'} cluster:\n{table}")
    got_through = [r for r in results if r["outcome"].startswith("GOT")]
    assert not got_through, f"the task got through:\n{table}"
    if network != "host":
        # Not even a TCP connection: the node and its peers are out of the task's reach.
        reached = [r for r in results if not r["outcome"].startswith("unreachable")]
        assert not reached, f"the task reached a node:\n{table}"

    # The task's own keys may change, and the nodes' own chores (claims, counts) and records
    # of the task (its submit's audit entry, its owner's past usage, its queue group's mark).
    own_keys = {key for key in cluster.etcd_keys() ^ before
                if task.id in key
                or key.startswith(("/lock/", "/stats/", "/audit/", "/usage/", "/groups/"))}
    assert cluster.etcd_keys() ^ before <= own_keys, "the keyspace changed beyond the task"
    assert not any(key.startswith("/probe") for key in cluster.etcd_keys())


def _connects(address: str) -> bool:
    try:
        socket.create_connection((address, SECOND_PORT), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.timeout(300)
def test_a_task_reaches_no_address_of_any_node_nor_a_denied_range(
        clusters: dict[str, NetCluster], tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = cluster_of(clusters, "plain", tmp_path_factory)
    seconds = [second_address(cluster, index) for index in range(2)]
    # The second addresses serve (the test host reaches them) and each node publishes its.
    for address in seconds:
        wait_for(f"the server on {address}", lambda address=address: _connects(address))
    published = {address for node in cluster.list_nodes() for address in node.addresses}
    assert set(seconds) <= published, published
    # Each node's firewall takes them in at its first fill or next housekeeping round.
    for node in cluster.nodes:
        table = net.TaskNetwork(node_name=node.name, task_subnet="auto",
                                state_dir=Path("/nonexistent")).table
        wait_for(f"{node.name}'s firewall to hold the second addresses", lambda node=node,
                 table=table: all(address in node.netns_exec(
                     "nft", "list", "set", "inet", table, "cluster4").stdout
                     for address in seconds), timeout=30, interval=0.5)
    with socket.create_server((cluster.bridge_ip, 0)) as host_server:
        denied = f"{cluster.bridge_ip}:{host_server.getsockname()[1]}"
        targets = [f"{address}:{SECOND_PORT}" for address in seconds] + [denied]
        spec = pb.TaskSpec(command="python3", args=["-c", TCP_PROBE, *targets],
                           network="isolated", memory_bytes=128 * 2**20)
        task = cluster.any_stub().Submit(pb.SubmitRequest(spec=spec), timeout=10).task
        finished = cluster.wait_finished([task.id], timeout=90)[task.id]
    node = cluster.nodes[cluster.index_of(finished.node_name)]
    log = (node.data_dir / "logs" / task.id / f"{finished.attempt}.log").read_text()
    assert (finished.state, finished.exit_code) == (pb.TASK_STATE_COMPLETE, 0), log
    result = json.loads(log.strip().splitlines()[-1])
    assert set(result) == set(targets)
    assert not [target for target, outcome in result.items() if outcome == "open"], result


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_every_probe_gets_through_with_the_credentials(
        clusters: dict[str, NetCluster], tmp_path_factory: pytest.TempPathFactory,
        kind: str) -> None:
    """The positive control: the same probes, run by root in a node's namespace with the
    token and certificates, report GOT for every kind. A probe that spoke its protocol
    wrongly would report "denied" here too, and the tests above would prove nothing."""
    cluster = cluster_of(clusters, kind, tmp_path_factory)
    # ListTasks answers with data only when there is a task to list.
    seed = cluster.any_stub().Submit(pb.SubmitRequest(spec=pb.TaskSpec(command="true")),
                                     timeout=10).task
    cluster.wait_finished([seed.id], timeout=90)
    credentials: dict[str, object] = {}
    if cluster.pki is not None:
        name = cluster.nodes[0].name
        credentials = {
            "token": (cluster.pki / "token").read_text().strip(),
            "cert": [str(cluster.pki / f"{name}.crt"), str(cluster.pki / f"{name}.key")],
            "etcd_cert": [str(cluster.pki / f"{name}-etcd.crt"),
                          str(cluster.pki / f"{name}-etcd.key")]}
    before = {task_id for task_id in cluster.tasks()}
    out = cluster.nodes[0].netns_exec(sys.executable, "-c", PROBE,
                                      json.dumps(targets(cluster, "isolated")),
                                      json.dumps(credentials)).stdout
    results = [json.loads(line[len("PROBE "):]) for line in out.splitlines()
               if line.startswith("PROBE ")]
    table = "\n".join(f"  {r['kind']:<10} {r['host']}:{r['port']} tls={r['tls']}: "
                      f"{r['outcome']}" for r in results)
    got = {r["kind"] for r in results if r["outcome"].startswith("GOT")}
    assert got == {r["kind"] for r in results}, f"a probe never gets through:\n{table}"
    # Leave the cluster as the other tests expect it: no probe key, nothing running.
    cluster.nodes[0].etcdctl("del", "/probe/", "--prefix")
    written = set(cluster.tasks()) - before
    assert written, "the http-write probe submitted nothing"
    cluster.wait_finished(written, timeout=90)
