"""Task network modes against real runc, ip and nft (root only).

Every server a task probes lives on loopback or in a network namespace this test
creates; tasks probe with python3 (they see the host's /usr).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from node.core.errors import ExecutorError, InvalidArgument
from node.running.runtime import firewall, resolv
from node.running.runtime import network as net
from node.running.runtime.runc import RuncExecutor
from tests.tcp_probe import TCP_PROBE
from tests.unit.attempts import TASK_UID, make_spec, run

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(None in (shutil.which("runc"), shutil.which("nft"), shutil.which("ip")),
                       reason="needs runc, nft and ip"),
    pytest.mark.timeout(120),
]


# The outside server: accept TCP connections on port 8000 and close them.
ACCEPT_FOREVER = """
import socket, sys
server = socket.create_server((sys.argv[1], 8000))
while True:
    server.accept()[0].close()
"""


def sh(*argv: str, stdin: str = "") -> str:
    return subprocess.run(argv, input=stdin, check=True, capture_output=True, text=True,
                          timeout=30).stdout


def links() -> set[str]:
    return {link["ifname"] for link in json.loads(sh("ip", "-j", "link", "show"))}


def namespaces(prefix: str) -> list[str]:
    return [name for name in os.listdir(net.NETNS_DIR) if name.startswith(prefix)]


def tables() -> set[str]:
    return {line.split()[-1] for line in sh("nft", "list", "tables").splitlines()}


class Outside:
    """A network namespace the test creates, linked to the host by a veth: an address
    that is neither the node's nor a cluster member's, with a TCP server in it."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.netns = f"filchtest-{tag}"
        self.host_veth = f"ft{tag}"
        self.address = "198.18.77.2"   # RFC 2544 benchmarking range: never routed anywhere
        sh("ip", "netns", "add", self.netns)
        sh("ip", "-batch", "-", stdin="\n".join([
            f"link add {self.host_veth} type veth peer name eth0 netns {self.netns}",
            f"addr add 198.18.77.1/30 dev {self.host_veth}",
            f"link set {self.host_veth} up", ""]))
        sh("ip", "-n", self.netns, "-batch", "-", stdin="\n".join([
            # No route back to the task subnet: only NAT (masquerade) gets answers home.
            f"addr add {self.address}/30 dev eth0", "link set eth0 up", "link set lo up", ""]))
        # Not `python3 -m http.server`: it looks up its own name in DNS, which this
        # namespace cannot reach, and stalls for seconds.
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", ACCEPT_FOREVER,
             self.address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "8000" in sh("ip", "netns", "exec", self.netns, "ss", "-ltn"):
                return
            time.sleep(0.05)
        raise AssertionError("the outside server did not start")

    def close(self) -> None:
        self.server.kill()
        self.server.wait()
        subprocess.run(["ip", "link", "del", self.host_veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


@pytest.fixture
def outside() -> Iterator[Outside]:
    server = Outside()
    yield server
    server.close()


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[net.TaskNetwork]:
    task_network = net.TaskNetwork(node_name=f"unit-{uuid.uuid4().hex[:8]}", task_subnet="auto",
                                   state_dir=tmp_path / "network")
    await task_network.reset()
    yield task_network
    await task_network.remove_all()


@pytest.fixture
def executor(tmp_path: Path, network: net.TaskNetwork) -> RuncExecutor:
    return RuncExecutor(runc_binary="runc", state_root=tmp_path / "runc", task_uid=TASK_UID,
                        network=network)


async def probe(executor: RuncExecutor, data_dir: Path, mode: str, *targets: str
                ) -> dict[str, str]:
    spec = make_spec(data_dir, "python3", "-c", TCP_PROBE, *targets, network=mode)
    status, log = await run(executor, spec)
    assert status.exit_code == 0, log
    result: dict[str, str] = json.loads(log.strip().splitlines()[-1])
    return result


async def serve_on_loopback() -> tuple[asyncio.Server, str]:
    """A TCP server on a host loopback address, standing in for etcd or the API."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


def host_address() -> str:
    """A non-loopback address of this host (the default route's source)."""
    routes = json.loads(sh("ip", "-4", "-j", "route", "get", "198.18.0.1"))
    return str(routes[0]["prefsrc"])


# -- names and subnets -----------------------------------------------------------------------


def test_names_fit_linux_limits_and_differ_per_node() -> None:
    a = net.TaskNetwork(node_name="a node/{x}", task_subnet="auto", state_dir=Path("/nonexistent"))
    b = net.TaskNetwork(node_name="b-node.example.com", task_subnet="auto",
                        state_dir=Path("/nonexistent"))
    assert len(a.bridge) <= 15 and len(a.veth_prefix + "65532") <= 15
    assert a.bridge != b.bridge and a.table != b.table and a.netns_prefix != b.netns_prefix
    assert a.table.startswith("filch-a_node__x__")  # sanitised, with a hash
    assert b.table == "filch-b-node.example.com"


def test_auto_subnet_is_per_name_in_cgnat_and_skips_routed_ones() -> None:
    first = net.auto_subnet("node-1", [])
    assert first.subnet_of(net.AUTO_POOL) and first.prefixlen == 24
    assert net.auto_subnet("node-1", []) == first
    assert len({net.auto_subnet(f"node-{i}", []) for i in range(1, 4)}) == 3
    moved = net.auto_subnet("node-1", [ipaddress.IPv4Network(first)])
    assert moved != first and moved.subnet_of(net.AUTO_POOL)
    with pytest.raises(ExecutorError, match="task_subnet"):
        net.auto_subnet("node-1", [net.AUTO_POOL])


@pytest.mark.parametrize("value", ["10.0.0.0/8", "10.0.0.0/30", "10.0.0.1/24", "fd00::/64",
                                   "bridge", "", "100.100.0.0/16"])
def test_bad_task_subnet_names_the_field(value: str) -> None:
    with pytest.raises(InvalidArgument, match="task_subnet"):
        net.parse_subnet(value)


def test_upstream_resolvers_skip_loopback_stubs(tmp_path: Path) -> None:
    etc, systemd = tmp_path / "etc", tmp_path / "systemd"
    etc.write_text("nameserver 127.0.0.53\noptions edns0\nsearch lan\n")
    systemd.write_text("nameserver 192.0.2.53\nnameserver ::1\nsearch corp\n")
    assert resolv.upstream_resolvers(etc, systemd) == (["192.0.2.53"], ["search corp"])
    systemd.unlink()
    assert resolv.upstream_resolvers(etc, systemd) == ([], ["options edns0", "search lan"])
    etc.write_text("nameserver 198.51.100.1\n")
    assert resolv.upstream_resolvers(etc, systemd) == (["198.51.100.1"], [])


def test_task_resolv_conf_is_replaced_only_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every housekeeping round refreshes it; a needless rename raced with runc's bind
    mount of it (ENOENT at container start under load)."""
    monkeypatch.setattr(resolv, "upstream_resolvers", lambda: (["192.0.2.53"], []))
    generated = resolv.TaskResolvConf(path=tmp_path / "net" / "resolv.conf")
    path = generated.refresh()
    assert path is not None
    inode = path.stat().st_ino
    assert generated.refresh() == path
    assert path.stat().st_ino == inode
    path.write_text("nameserver 203.0.113.9\n")
    generated.refresh()
    assert path.stat().st_ino != inode and "203.0.113.9" not in path.read_text()


# -- modes, against real containers ---------------------------------------------------------


async def test_none_reaches_only_its_own_loopback(tmp_path: Path) -> None:
    executor = RuncExecutor(runc_binary="runc", state_root=tmp_path / "runc", task_uid=TASK_UID,
                            network=None)
    server, address = await serve_on_loopback()
    async with server:
        result = await probe(executor, tmp_path, "none", address, f"{host_address()}:22",
                             "198.18.77.2:8000")
    # The host's loopback server is not the task's loopback: refused there, and no
    # route leads anywhere else.
    assert result[address] == "ConnectionRefusedError"
    assert all(outcome != "open" for outcome in result.values()), result


async def test_isolated_reaches_outside_but_not_the_node_nor_the_cluster(
        executor: RuncExecutor, network: net.TaskNetwork, tmp_path: Path,
        outside: Outside) -> None:
    server, loopback = await serve_on_loopback()
    node_server = await asyncio.start_server(lambda r, w: w.close(), host_address(), 0)
    node_address = f"{host_address()}:{node_server.sockets[0].getsockname()[1]}"
    gateway = f"{network.subnet.network_address + 1}:{loopback.rpartition(':')[2]}"
    async with server, node_server:
        await network.set_cluster_addresses([])
        result = await probe(executor, tmp_path, "isolated", "198.18.77.2:8000", loopback,
                             node_address, gateway)
        assert result == {"198.18.77.2:8000": "open", loopback: "ConnectionRefusedError",
                          node_address: "TimeoutError", gateway: "TimeoutError"}, result
        # Once the outside address is a cluster member's, it is out of reach too.
        await network.set_cluster_addresses(["198.18.77.2", "localhost"])
        result = await probe(executor, tmp_path, "isolated", "198.18.77.2:8000")
        assert result == {"198.18.77.2:8000": "TimeoutError"}


@pytest.fixture
def metadata_server(outside: Outside) -> Iterator[str]:
    """A cloud's metadata service (169.254.169.254 hands out the machine's credentials),
    stood in for by a server in the test's namespace, routed like the outside one."""
    metadata = "169.254.169.254"
    sh("ip", "-n", outside.netns, "addr", "add", f"{metadata}/32", "dev", "eth0")
    sh("ip", "route", "add", f"{metadata}/32", "dev", outside.host_veth)
    with subprocess.Popen(["ip", "netns", "exec", outside.netns, sys.executable, "-c",
                           ACCEPT_FOREVER, metadata],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
        try:
            yield f"{metadata}:8000"
        finally:
            server.kill()
            subprocess.run(["ip", "route", "del", f"{metadata}/32"], capture_output=True)


async def test_isolated_cannot_reach_link_local_metadata(
        executor: RuncExecutor, network: net.TaskNetwork, tmp_path: Path,
        metadata_server: str) -> None:
    await network.set_cluster_addresses([])
    target = metadata_server
    host = RuncExecutor(runc_binary="runc", state_root=tmp_path / "runc-host", task_uid=TASK_UID,
                        network=None)
    deadline = time.monotonic() + 10
    while await probe(host, tmp_path, "host", target) != {target: "open"}:
        assert time.monotonic() < deadline, "the stand-in metadata server did not start"
    assert await probe(executor, tmp_path, "isolated", target) == {target: "TimeoutError"}
    # The outside world stays reachable: only link-local addresses are cut off.
    assert await probe(executor, tmp_path, "isolated", "198.18.77.2:8000") == {
        "198.18.77.2:8000": "open"}


async def test_host_mode_shares_the_host_network(tmp_path: Path) -> None:
    executor = RuncExecutor(runc_binary="runc", state_root=tmp_path / "runc", task_uid=TASK_UID,
                            network=None)
    server, address = await serve_on_loopback()
    async with server:
        assert await probe(executor, tmp_path, "host", address) == {address: "open"}


async def test_isolated_tasks_cannot_reach_each_other(
        executor: RuncExecutor, network: net.TaskNetwork, tmp_path: Path) -> None:
    await network.set_cluster_addresses([])
    listener = make_spec(tmp_path, "python3", "-c", (
        "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 8000)); s.listen();"
        "print('listening', flush=True); time.sleep(30)"), network="isolated")
    attempt = await executor.start(listener)
    try:
        deadline = time.monotonic() + 20
        while "listening" not in (listener.log_path.read_text() if listener.log_path.exists()
                                  else ""):
            assert time.monotonic() < deadline, "the listener did not start"
            await asyncio.sleep(0.05)
        # Slot 0 went to the listener; its address is the subnet's third.
        peer = f"{network.subnet.network_address + 2}:8000"
        assert await probe(executor, tmp_path, "isolated", peer) == {peer: "TimeoutError"}
    finally:
        await attempt.stop(0)
        await attempt.wait()


async def test_isolated_task_gets_upstream_dns_and_no_ipv6(
        executor: RuncExecutor, network: net.TaskNetwork, tmp_path: Path) -> None:
    await network.set_cluster_addresses([])
    spec = make_spec(tmp_path, "sh", "-c",
                     "cat /etc/resolv.conf; cat /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                     "echo x >> /etc/resolv.conf || echo read-only", network="isolated")
    status, log = await run(executor, spec)
    assert status.exit_code == 0, log
    servers, _ = resolv.upstream_resolvers()
    for server in servers:
        assert f"nameserver {server}" in log
    assert "127.0.0." not in log
    assert "\n1\n" in log and log.rstrip().endswith("read-only")


async def gone(network: net.TaskNetwork) -> None:
    """Wait (up to 10 s) until no namespace or veth of the network is left: an ended
    attempt's are removed in the background."""
    deadline = time.monotonic() + 10
    while namespaces(network.netns_prefix) or [
            name for name in links() if name.startswith(network.veth_prefix)]:
        assert time.monotonic() < deadline, "the attempt's namespace or veth is still there"
        await asyncio.sleep(0.05)


async def test_attempt_end_removes_its_namespace_and_veth(
        executor: RuncExecutor, network: net.TaskNetwork, tmp_path: Path) -> None:
    await network.set_cluster_addresses([])
    for command in (("true",), ("sh", "-c", "exit 3")):
        await run(executor, make_spec(tmp_path, *command, network="isolated"))
        await gone(network)
    # A start failure (the command does not exist) leaves nothing either.
    with pytest.raises(ExecutorError):
        await executor.start(make_spec(tmp_path, "/no/such/cmd", network="isolated"))
    assert [name for name in links() if name.startswith(network.veth_prefix)] == []


async def test_isolated_refused_until_the_cluster_addresses_are_known(
        executor: RuncExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net, "CLUSTER_WAIT", 0.2)
    with pytest.raises(ExecutorError, match="cluster"):
        await executor.start(make_spec(tmp_path, "true", network="isolated"))


async def test_reset_removes_everything_an_earlier_run_left(tmp_path: Path) -> None:
    name = f"unit-{uuid.uuid4().hex[:8]}"
    earlier = net.TaskNetwork(node_name=name, task_subnet="auto", state_dir=tmp_path / "a")
    await earlier.reset()
    await earlier.set_cluster_addresses([])
    leases = [await earlier.attach() for _ in range(3)]
    # A crash: nothing released. The next run of the same node name cleans up.
    later = net.TaskNetwork(node_name=name, task_subnet="auto", state_dir=tmp_path / "b")
    await later.reset()
    try:
        for lease in leases:
            assert lease.netns not in namespaces(earlier.netns_prefix)
            assert lease.veth not in links()
        assert later.bridge in links() and later.table in tables()
    finally:
        await later.remove_all()
    assert later.bridge not in links() and later.table not in tables()


async def test_a_node_that_cannot_build_networks_refuses_isolated_tasks_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No ip or nft on the PATH: what a host without iproute2/nftables (or a container
    # without CAP_NET_ADMIN) gets. The agent still starts; isolated attempts fail closed.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    broken = net.TaskNetwork(node_name=f"unit-{uuid.uuid4().hex[:8]}", task_subnet="auto",
                             state_dir=tmp_path / "network")
    runc = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin") or "runc"
    executor = RuncExecutor(runc_binary=runc,
                            state_root=tmp_path / "runc", task_uid=TASK_UID, network=broken)
    assert await executor.reap_stale() == 0
    await broken.set_cluster_addresses(["192.0.2.1"])   # a no-op, not an error
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    with pytest.raises(ExecutorError, match="could not set up task networks"):
        await executor.start(make_spec(tmp_path, "true", network="isolated"))
    status, _ = await run(executor, make_spec(tmp_path, "true", network="none"))
    assert status.exit_code == 0


# -- fail closed: the firewall verified before every attach, metadata, deny and allow --------


def test_auto_subnet_never_hands_out_the_alibaba_metadata_24() -> None:
    # A name whose hash lands on 100.100.100.0/24, where Alibaba Cloud's metadata
    # service (100.100.100.200) answers.
    metadata = ipaddress.IPv4Network("100.100.100.0/24")
    index = (int(metadata.network_address) - int(net.AUTO_POOL.network_address)) >> 8
    count = 1 << (net.AUTO_PREFIX - net.AUTO_POOL.prefixlen)
    name = next(f"node-{i}" for i in range(1_000_000)
                if int(hashlib.sha256(f"node-{i}".encode()).hexdigest(), 16) % count == index)
    picked = net.auto_subnet(name, [])
    assert picked != metadata and ipaddress.IPv4Address("100.100.100.200") not in picked


def test_published_addresses_leave_out_loopback_link_local_and_task_bridges() -> None:
    listing = [
        {"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}, {"local": "::1"}]},
        {"ifname": "eth0", "addr_info": [{"local": "192.0.2.7"}, {"local": "fe80::1"},
                                         {"local": "2001:db8::7"}]},
        {"ifname": "eth1", "addr_info": [{"local": "10.1.2.3"}, {"local": "169.254.3.4"}]},
        {"ifname": "fb1a2b3c", "addr_info": [{"local": "100.64.9.1"}]},
        {"ifname": "fv1a2b3c12", "addr_info": []},
    ]
    assert net.interface_addresses(listing) == ["10.1.2.3", "192.0.2.7", "2001:db8::7"]


async def test_attach_refuses_without_a_verified_firewall_until_it_is_back(
        network: net.TaskNetwork, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    changes: list[str] = []
    network.on_policy_change = changes.append
    await network.set_cluster_addresses([])
    sh("nft", "delete", "table", "inet", network.table)
    # ip works but nft cannot run (a broken or missing nft): nothing can restore the table.
    only_ip = tmp_path / "only-ip"
    only_ip.mkdir()
    (only_ip / "ip").symlink_to(shutil.which("ip") or "/usr/sbin/ip")
    monkeypatch.setenv("PATH", str(only_ip))
    with pytest.raises(ExecutorError, match="firewall"):
        await network.attach()
    assert "firewall" in network.policy_problem and changes == [network.policy_problem]
    assert REGISTRY.get_sample_value("filch_task_firewall_failed") == 1
    assert not namespaces(network.netns_prefix)
    # nft is back: the next attach restores the table and goes ahead.
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    lease = await network.attach()
    await network.release(lease)
    assert network.table in tables()
    assert network.policy_problem == "" and changes[-1] == ""
    assert REGISTRY.get_sample_value("filch_task_firewall_failed") == 0


async def test_task_deny_drops_a_range_and_task_allow_opens_one_but_never_a_node(
        tmp_path: Path, outside: Outside) -> None:
    target = "198.18.77.2:8000"
    denied = net.TaskNetwork(node_name=f"unit-{uuid.uuid4().hex[:8]}", task_subnet="auto",
                             state_dir=tmp_path / "denied",
                             task_deny="198.18.77.0/24")
    allowed = net.TaskNetwork(node_name=f"unit-{uuid.uuid4().hex[:8]}", task_subnet="auto",
                              state_dir=tmp_path / "allowed",
                              task_deny="198.18.0.0/15", task_allow="198.18.77.2/32")
    for task_network, expected in ((denied, "TimeoutError"), (allowed, "open")):
        await task_network.reset()
        try:
            await task_network.set_cluster_addresses([])
            executor = RuncExecutor(runc_binary="runc", state_root=tmp_path / "runc",
                                    task_uid=TASK_UID, network=task_network)
            assert await probe(executor, tmp_path, "isolated", target) == {target: expected}
            if task_network is allowed:
                # A node's address stays out of reach whatever --task-allow says.
                await task_network.set_cluster_addresses(["198.18.77.2"])
                assert await probe(executor, tmp_path, "isolated", target) == {
                    target: "TimeoutError"}
        finally:
            await task_network.remove_all()


@pytest.mark.parametrize("value", ["10.0.0.0/33", "10.0.0.1/8", "example.com/24"])
def test_bad_task_deny_names_the_field(value: str) -> None:
    with pytest.raises(InvalidArgument, match="task_deny"):
        net.TaskNetwork(node_name="n", task_subnet="auto", state_dir=Path("/nonexistent"),
                        task_deny=f"192.0.2.0/24,{value}")


@pytest.fixture
def metadata_servers(outside: Outside) -> Iterator[list[str]]:
    """Azure's WireServer and Alibaba's metadata service, stood in for by servers in the
    test's namespace on ports 8000 (HTTP stand-in) and 53 (DNS stand-in)."""
    addresses = ["168.63.129.16", "100.100.100.200"]
    servers = []
    for address in addresses:
        sh("ip", "-n", outside.netns, "addr", "add", f"{address}/32", "dev", "eth0")
        sh("ip", "route", "add", f"{address}/32", "dev", outside.host_veth)
        for port in ("8000", "53"):
            servers.append(subprocess.Popen(
                ["ip", "netns", "exec", outside.netns, sys.executable, "-c",
                 ACCEPT_FOREVER.replace("8000", port), address],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield addresses
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for address in addresses:
            subprocess.run(["ip", "route", "del", f"{address}/32"], capture_output=True)


async def test_isolated_cannot_reach_cloud_metadata_but_their_dns(
        executor: RuncExecutor, network: net.TaskNetwork, tmp_path: Path,
        metadata_servers: list[str]) -> None:
    await network.set_cluster_addresses([])
    targets = [f"{address}:{port}" for address in metadata_servers for port in (8000, 53)]
    host = RuncExecutor(runc_binary="runc", state_root=tmp_path / "runc-host", task_uid=TASK_UID,
                        network=None)
    deadline = time.monotonic() + 10
    while set((await probe(host, tmp_path, "host", *targets)).values()) != {"open"}:
        assert time.monotonic() < deadline, "the stand-in metadata servers did not start"
    assert await probe(executor, tmp_path, "isolated", *targets) == {
        target: "open" if target.endswith(":53") else "TimeoutError" for target in targets}


async def test_forwarding_filch_turned_on_is_confined_to_task_bridges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    confined = 'iifname != "fb*" oifname != "fb*" drop'
    sysctl = tmp_path / "ip_forward"
    monkeypatch.setattr(firewall, "IP_FORWARD", sysctl)
    name = f"unit-{uuid.uuid4().hex[:8]}"
    for before, expected in (("1\n", False), ("0\n", True), ("1\n", True)):
        # Forwarding on already (another program's): left alone. Off: filch turns it on
        # and confines it; after a restart (on now, filch's marker there) still confined.
        sysctl.write_text(before)
        task_network = net.TaskNetwork(node_name=name, task_subnet="auto",
                                       state_dir=tmp_path / "state")
        await task_network.reset()
        try:
            assert sysctl.read_text().strip() == "1"
            assert (tmp_path / "state" / firewall.FORWARDING_MARKER).exists() == expected
            rules = sh("nft", "list", "table", "inet", task_network.table)
            assert (confined in rules) == expected, rules
        finally:
            await task_network.remove_all()


async def test_release_spawns_nothing_and_hands_out_neither_address_nor_veth_next(
        network: net.TaskNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
    # release() deletes only the namespace, with system calls; the kernel takes its veth
    # a moment later, so the next attempt must get neither that veth's name nor (ARP
    # caches) its address.
    await network.set_cluster_addresses([])
    first = await network.attach()
    with monkeypatch.context() as patch:
        async def spawn(*argv: object, **_: object) -> None:
            raise AssertionError(f"spawned {argv}")
        patch.setattr(asyncio, "create_subprocess_exec", spawn)
        await network.release(first)
    second = await network.attach()
    try:
        assert second.slot != first.slot
        assert second.veth != first.veth
        assert first.netns not in namespaces(network.netns_prefix)
        deadline = time.monotonic() + 10
        while first.veth in links():
            assert time.monotonic() < deadline, "the released namespace's veth stayed"
            await asyncio.sleep(0.05)
    finally:
        await network.release(second)
