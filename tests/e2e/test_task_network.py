"""Task network modes on a real two-node cluster: what a hostile task can reach.

The nodes listen (API, metrics, etcd peers) on addresses of an interface this test
creates, not on loopback, so a task's own loopback cannot stand in for the node's; etcd
clients stay on the node's loopback as filch requires. Tasks probe with python3 (they
see the host's /usr); every probe goes to those addresses only.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.running.runtime import network as net
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

pytestmark = pytest.mark.timeout(300)

# The probe: for each URL in argv, connect (TCP) and, if that works, POST an etcd v3 put
# of /pwned (the other services answer it with an error). Reports "open" for a connection
# that succeeded, else the error's name. In parallel, 1.5 s each: a dropped packet costs
# one timeout in total.
PROBE = """
import json, socket, sys, threading, urllib.parse, urllib.request
result = {}
def probe(url):
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1.5).close()
    except OSError as exc:
        result[url] = type(exc).__name__
        return
    result[url] = "open"
    body = b'{"key": "L3B3bmVk", "value": "eA=="}'
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=1.5).close()
    except Exception:
        pass
threads = [threading.Thread(target=probe, args=(url,)) for url in sys.argv[1:]]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(result))
"""

# Where the stand-in for each node's HTTP face listens (the image's port): the firewall
# drops every port of the node, not a list of them.
HTTP_PORT = 8080


class Acceptor(socketserver.ThreadingTCPServer):
    """Accepts TCP connections and closes them: a stand-in for the HTTP face."""

    daemon_threads = True

    def __init__(self, address: str) -> None:
        super().__init__((address, HTTP_PORT), socketserver.BaseRequestHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1})
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


# A distinct 198.19.X.0/24 for every HostAddresses of this process (198.18.0.0/15 is the
# benchmarking range: routed nowhere).
_THIRD_OCTETS = itertools.count(100 + os.getpid() % 100)


class HostAddresses:
    """Addresses on a veth pair of the host (the kernel here has no dummy interfaces):
    where the test's nodes listen."""

    def __init__(self, count: int) -> None:
        self.link = f"fd{uuid.uuid4().hex[:8]}"
        third = next(_THIRD_OCTETS)
        self.addresses = [f"198.19.{third}.{index + 1}" for index in range(count)]
        commands = [f"link add {self.link} type veth peer name {self.link}p"]
        commands += [f"addr add {address}/32 dev {self.link}" for address in self.addresses]
        commands += [f"link set {self.link}p up", f"link set {self.link} up", ""]
        subprocess.run(["ip", "-batch", "-"], input="\n".join(commands), text=True, check=True)
        self.acceptors = [Acceptor(address) for address in self.addresses]

    def close(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        subprocess.run(["ip", "link", "del", self.link], capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    addresses = HostAddresses(2)
    try:
        with Cluster(tmp_path_factory.mktemp("net"), size=2,
                     addresses=addresses.addresses) as started:
            yield started
    finally:
        addresses.close()


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The same, with TLS and the API token (`filch certs`)."""
    require_tools()
    addresses = HostAddresses(2)
    root = tmp_path_factory.mktemp("net-tls")
    try:
        with Cluster(root, size=2, addresses=addresses.addresses, pki=root / "pki") as started:
            yield started
    finally:
        addresses.close()


def targets(cluster: Cluster) -> list[str]:
    """Every service of every node: etcd client and peer, gRPC API, metrics, HTTP."""
    urls = []
    for node in cluster.nodes:
        urls += [f"http://{node.client_ip}:2379/v3/kv/put", f"http://{node.ip}:2380/v3/kv/put",
                 f"http://{node.ip}:7070/", f"http://{node.ip}:9470/metrics",
                 f"http://{node.ip}:{HTTP_PORT}/api/v1/tasks"]
    return urls


def run_probe(cluster: Cluster, network: str, *urls: str) -> tuple[str, dict[str, str]]:
    """The probe task's id and its findings."""
    task_id = cluster.submit("python3", "-c", PROBE, *urls, network=network)
    [task] = cluster.wait_finished([task_id], timeout=60)
    log = cluster.cli("logs", task_id).stdout
    assert task.reason == pb.REASON_EXITED and task.exit_code == 0, (task, log)
    result: dict[str, str] = json.loads(log.strip().splitlines()[-1])
    return task_id, result


# Keys the nodes rewrite by themselves: their records, chore claims, published counts, and
# what they record of the probe task (its submit's audit entry, its owner's past usage, the
# queue group mark its submit puts and a chore deletes once the group is empty).
NODES_OWN = ("/node/", "/lock/", "/stats/", "/audit/", "/usage/", "/groups/")


def keyspace(cluster: Cluster) -> dict[str, tuple[object, object]]:
    return {key: (kv.get("value"), kv.get("mod_revision"))
            for key, kv in cluster.etcd_keys().items()}


def namespaces(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(net.NETNS_DIR) if name.startswith(prefix))


def links(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], check=True, capture_output=True,
                         text=True).stdout
    return sorted(link["ifname"] for link in json.loads(out) if link["ifname"].startswith(prefix))


def task_network(cluster: Cluster, index: int) -> net.TaskNetwork:
    """Names only (touches nothing): which namespaces and links belong to node index."""
    return net.TaskNetwork(node_name=cluster.nodes[index].name, task_subnet="auto",
                           state_dir=Path("/nonexistent"))


@pytest.mark.parametrize("mode", ["none", "isolated"])
@pytest.mark.parametrize("security", ["plain", "tls"])
def test_task_reaches_no_service_of_any_node_and_keyspace_is_unchanged(
        request: pytest.FixtureRequest, mode: str, security: str) -> None:
    cluster: Cluster = request.getfixturevalue("cluster" if security == "plain"
                                               else "tls_cluster")
    before = keyspace(cluster)
    task_id, result = run_probe(cluster, mode, *targets(cluster))
    assert set(result) == set(targets(cluster))
    assert not [url for url, outcome in result.items() if outcome == "open"], result
    after = keyspace(cluster)
    # Only the probe's own task keys, the node records (allocations) and the nodes' own
    # cluster chores (claims, published counts) moved.
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert not [key for key in changed
                if task_id not in key and not key.startswith(NODES_OWN)], changed


def test_isolated_task_namespace_and_veth_are_gone_after_it_ends(cluster: Cluster) -> None:
    names = [task_network(cluster, index) for index in range(2)]
    task_id = cluster.submit("sh", "-c", "ls /sys/class/net; sleep 1", network="isolated")
    cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
    wait_for("the task's namespace", lambda: any(namespaces(n.netns_prefix) for n in names))
    [task] = cluster.wait_finished([task_id])
    assert task.exit_code == 0
    # The task saw loopback and its veth end, nothing of the host's.
    assert cluster.cli("logs", task_id).stdout.split() == ["eth0", "lo"]
    wait_for("namespaces and veths to go", lambda: all(
        not namespaces(n.netns_prefix) and not links(n.veth_prefix) for n in names), timeout=10)


def test_host_task_waits_for_a_node_that_allows_it_then_runs_there(cluster: Cluster) -> None:
    task_id = cluster.submit("true", network="host")
    task = wait_for("the pending message", lambda: (
        found := cluster.get(task_id)).message and found)
    assert task.state == pb.TASK_STATE_PENDING
    assert "--allow-host-network" in task.message
    second = cluster.nodes[1]
    second.stop()
    second.args.append("--allow-host-network")
    second.start()
    [task] = cluster.wait_finished([task_id], timeout=120)
    assert (task.reason, task.exit_code, task.node_name) == (pb.REASON_EXITED, 0, second.name)
    assert any(node.allow_host_network for node in cluster.list_nodes())
    # The same probe that finds nothing open from none and isolated finds the node's
    # services from the host network: the probe itself works.
    _, result = run_probe(cluster, "host", *targets(cluster))
    assert result[f"http://{second.ip}:9470/metrics"] == "open", result
    assert result[f"http://{second.client_ip}:2379/v3/kv/put"] == "open", result
    assert result[f"http://{second.ip}:{HTTP_PORT}/api/v1/tasks"] == "open", result


def test_agent_sigkill_and_restart_leave_nothing_of_the_old_run(cluster: Cluster) -> None:
    task_id = cluster.submit("sleep", "600", network="isolated", restart=False)
    task = wait_for("the task to run", lambda: (
        found := cluster.get(task_id)).state == pb.TASK_STATE_RUNNING and found)
    index = next(i for i, node in enumerate(cluster.nodes) if node.name == task.node_name)
    first, names = cluster.nodes[index], task_network(cluster, index)
    # RUNNING is written by the steal, before the container (and its namespace) exists.
    wait_for("the task's namespace", lambda: namespaces(names.netns_prefix), timeout=30)
    # SIGKILL the agent alone (its etcd member lives on): the watchdog kills the
    # container and deletes the namespace.
    assert first.process is not None
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait()
    wait_for("the watchdog to delete the namespace",
             lambda: not namespaces(names.netns_prefix), timeout=30)
    # ... and, the agent being dead, its bridge and table once its sweep ends.
    wait_for("the watchdog to remove the bridge", lambda: not links(names.bridge), timeout=30)
    first.kill_hard()
    first.start()
    wait_for("the node to come back", lambda: len(cluster.list_nodes()) == 2, timeout=60)
    wait_for("the new run's bridge", lambda: names.bridge in links(names.bridge))
    assert namespaces(names.netns_prefix) == []
    assert links(names.veth_prefix) == []
    tables = subprocess.run(["nft", "list", "tables"], check=True, capture_output=True,
                            text=True).stdout.split()
    assert tables.count(names.table) == 1


def test_unknown_network_mode_is_refused_naming_the_field_and_writes_nothing(
        cluster: Cluster) -> None:
    before = keyspace(cluster)
    with pytest.raises(grpc.RpcError) as caught:
        cluster.submit("true", network="bridge")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "network" in (caught.value.details() or "")
    assert {key: value for key, value in keyspace(cluster).items()
            if not key.startswith(NODES_OWN)} == {
        key: value for key, value in before.items() if not key.startswith(NODES_OWN)}


# -- fail closed: the firewall table gone, connections towards tasks ---------------------

# The attacker: connect to the task's own gateway (the node's bridge address) on argv[1],
# where the host has a listener on every address. Prints the gateway and the outcome.
GATEWAY_PROBE = """
import socket, struct, sys
for line in open("/proc/net/route").read().splitlines()[1:]:
    fields = line.split()
    if fields[1] == "00000000":
        gateway = socket.inet_ntoa(struct.pack("<L", int(fields[2], 16)))
try:
    socket.create_connection((gateway, int(sys.argv[1])), timeout=2).close()
    print(gateway, "open")
except OSError as exc:
    print(gateway, type(exc).__name__)
"""


def nft_tables() -> list[str]:
    return subprocess.run(["nft", "list", "tables"], check=True, capture_output=True,
                          text=True).stdout.split()


def test_a_deleted_firewall_table_is_restored_before_a_task_can_use_the_gap(
        cluster: Cluster) -> None:
    names = [task_network(cluster, index) for index in range(2)]
    before = [cluster.metrics(index).get("filch_task_firewall_restores_total", 0.0)
              for index in range(2)]
    # A host service on every address: reachable through the bridge gateway once the
    # node's input rules are gone. The kernel completes TCP handshakes into the backlog,
    # so nothing needs to accept.
    with socket.create_server(("0.0.0.0", 0)) as listener:
        port = listener.getsockname()[1]
        # What `nft flush ruleset` (or restarting Debian's nftables service) does to the
        # nodes' tables; never the whole ruleset on this shared host.
        for name in names:
            subprocess.run(["nft", "delete", "table", "inet", name.table], check=True)
        task_id = cluster.submit("python3", "-c", GATEWAY_PROBE, str(port), network="isolated")
        [task] = cluster.wait_finished([task_id], timeout=60)
    log = cluster.cli("logs", task_id).stdout
    assert (task.reason, task.exit_code) == (pb.REASON_EXITED, 0), (task, log)
    assert log.split()[-1] == "TimeoutError", log
    ran = next(i for i, node in enumerate(cluster.nodes) if node.name == task.node_name)
    assert cluster.metrics(ran)["filch_task_firewall_restores_total"] > before[ran]
    assert cluster.metrics(ran)["filch_task_firewall_failed"] == 0
    # The other node took no task: its next housekeeping round restores its table.
    wait_for("both tables back", lambda: all(name.table in nft_tables() for name in names),
             timeout=30)
    after = [cluster.metrics(index)["filch_task_firewall_restores_total"] for index in range(2)]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after, ran)


# A task listening for UDP on UDP_PORT: prints "READY <its address>", then "GOT" for the
# first datagram that arrives or "NOTHING" after argv[1] seconds.
UDP_PORT = 9999
UDP_LISTENER = f"""
import socket, sys
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.connect(("198.18.0.1", 9))    # a route lookup only: no packet is sent
listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listener.bind(("0.0.0.0", {UDP_PORT}))
listener.settimeout(float(sys.argv[1]))
print("READY", probe.getsockname()[0], flush=True)
try:
    listener.recvfrom(100)
    print("GOT")
except OSError:
    print("NOTHING")
"""


def test_the_host_cannot_open_connections_to_an_isolated_task(cluster: Cluster) -> None:
    task_id = cluster.submit("python3", "-c", UDP_LISTENER, "4", network="isolated")

    def ready() -> str | None:
        words = cluster.cli("logs", task_id).stdout.split()
        return words[1] if words[:1] == ["READY"] else None

    address = wait_for("the task to listen", ready, timeout=60, interval=0.3)
    # From the host (as a host-network task or another local user would): UDP needs no
    # answer, so a datagram that gets through is one the task receives.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(5):
            with contextlib.suppress(OSError):   # EPERM once the output hook drops it
                sender.sendto(b"hello", (address, UDP_PORT))
    with pytest.raises(OSError):
        socket.create_connection((address, UDP_PORT), timeout=1).close()
    [task] = cluster.wait_finished([task_id], timeout=60)
    assert task.exit_code == 0
    assert cluster.cli("logs", task_id).stdout.split()[-1] == "NOTHING"
