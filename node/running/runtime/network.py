"""Per-task network namespaces for the runc executor, built with iproute2 and nftables.

Modes (TaskSpec.network): "isolated" (the default, also ""): a namespace of its own with
loopback and one veth on this node's bridge, outbound access through NAT, DNS through the
host's upstream resolvers (resolv.py); "none": loopback only (runc creates that namespace
itself); "host": the host's namespace (unsafe: only on nodes started with
--allow-host-network).

Everything of one node carries names derived from the node's name, so a node finds and
removes exactly its own leftovers after a crash, even with several nodes on one machine:
  bridge     fb<6 hex of sha256(name)>            (interface names are at most 15 chars)
  host veth  fv<6 hex><n>                          (the task's end is eth0 in its namespace;
                                                    n counts attaches, see release())
  namespace  filch-<sanitised name>-<slot>         (under /run/netns)
  nft table  inet filch-<sanitised name>           (NAT and the firewall below)

The firewall, in the node's own nft table, is firewall.py's: tasks reach no address of
this host nor of any cluster node, no cloud metadata service, no --task-deny range, and
nothing opens a connection to a task. It is verified (and restored) before every attach;
an attach the firewall cannot be verified for is refused. Bridge ports are also
`isolated on`, so tasks cannot talk to each other at layer 2.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import hashlib
import ipaddress
import itertools
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.addresses import metadata_networks, parse_cidrs, parse_subnet
from node.core.errors import ExecutorError, InvalidArgument
from node.core.validation import HOST as HOST
from node.core.validation import ISOLATED as ISOLATED
from node.core.validation import NETWORK_MODES
from node.core.validation import NONE as NONE
from node.running.runtime import kill, syscalls
from node.running.runtime.commands import run as _run
from node.running.runtime.commands import run_json
from node.running.runtime.firewall import TaskFirewall
from node.running.runtime.resolv import TaskResolvConf

log = logging.getLogger(__name__)

MODES = NETWORK_MODES

NETNS_DIR = Path(kill.NETNS_DIR)
# Any node's bridge or host veth on this machine (the names TaskNetwork derives).
_FILCH_LINK = re.compile(r"fb[0-9a-f]{6}|fv[0-9a-f]{6}[0-9]+")

# Shared address space (RFC 6598): private, clear of podman's 10.88.0.0/16 and of the
# RFC 1918 ranges home and office networks use. Each node takes one /24 of it.
AUTO_POOL = ipaddress.IPv4Network("100.64.0.0/10")
AUTO_PREFIX = 24
# veth names are fv<6 hex><n> with n below this: at most 15 characters.
VETH_NUMBERS = 10_000_000
# How long an isolated attempt waits for the first fill of the cluster address set (the
# agent fills it as soon as etcd answers; a node without etcd quorum cannot steal anyway).
CLUSTER_WAIT = 30.0


def parse_mode(value: str) -> str:
    """The network mode ("" means isolated), or InvalidArgument naming spec.network."""
    mode = value or ISOLATED
    if mode not in MODES:
        raise InvalidArgument("spec.network", f"{value!r} is not one of {', '.join(MODES)}")
    return mode


def name_hash(node_name: str) -> str:
    """6 hex digits identifying the node in interface names."""
    return hashlib.sha256(node_name.encode()).hexdigest()[:6]


def sanitised(node_name: str) -> str:
    """The node name as nft and netns names accept it; a hash is appended if it changed."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", node_name)[:48]
    return clean if clean == node_name else f"{clean}_{name_hash(node_name)}"


def auto_subnet(node_name: str, routed: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The /24 in AUTO_POOL this node uses: derived from its name's hash, moved on past any
    /24 that overlaps a network already routed here or holds a cloud metadata address
    (Alibaba's 100.100.100.200 is inside the pool). Raises ExecutorError if all do."""
    taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = list(routed)
    taken += metadata_networks()
    count = 1 << (AUTO_PREFIX - AUTO_POOL.prefixlen)
    first = int(hashlib.sha256(node_name.encode()).hexdigest(), 16) % count
    for step in range(count):
        index = (first + step) % count
        candidate = ipaddress.IPv4Network(
            (int(AUTO_POOL.network_address) + (index << (32 - AUTO_PREFIX)), AUTO_PREFIX))
        if not any(candidate.overlaps(network) for network in taken):
            return candidate
    raise ExecutorError(f"no free /{AUTO_PREFIX} in {AUTO_POOL} for tasks: set task_subnet")


@dataclass(frozen=True)
class Lease:
    """One isolated attempt's namespace: release it when the container is gone."""

    slot: int
    netns: str
    veth: str

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.netns)


class TaskNetwork:
    """This node's bridge, nft table and task namespaces. Root only.

    Call reset() once before attach(); set_cluster_addresses() before the first isolated
    task and again whenever membership may have changed.
    """

    def __init__(self, *, node_name: str, task_subnet: str, state_dir: Path,
                 task_deny: str = "", task_allow: str = "") -> None:
        """Derive the names; touches nothing. Raises InvalidArgument for a bad task_subnet,
        task_deny or task_allow (comma-separated CIDRs)."""
        self._explicit = parse_subnet(task_subnet)
        self._node_name = node_name
        digest = name_hash(node_name)
        self.bridge = f"fb{digest}"
        self.veth_prefix = f"fv{digest}"
        self.netns_prefix = f"filch-{sanitised(node_name)}-"
        self.table = f"filch-{sanitised(node_name)}"
        self._state_dir = state_dir
        self._subnet: ipaddress.IPv4Network | None = None
        # First in, first out: a released address is handed out again only after every
        # other free one, long after its old namespace is gone.
        self._free: collections.deque[int] = collections.deque()
        # veth numbers: never reused while the node runs, as the kernel deletes an old
        # veth a moment after its namespace (release()).
        self._veths = itertools.count()
        self._releasing: set[asyncio.Task[None]] = set()
        self._cluster_known = asyncio.Event()
        self._broken = ""
        self._dns = TaskResolvConf(path=state_dir / "resolv.conf")
        self._resolv_conf: Path | None = None
        self._firewall = TaskFirewall(
            table=self.table, bridge=self.bridge, state_dir=state_dir,
            deny=parse_cidrs(task_deny, "task_deny"), allow=parse_cidrs(task_allow, "task_allow"))
        self._firewall.on_change = self._policy_changed
        self._told_problem = ""
        # Called with the new policy_problem whenever it changes (the agent wires it to
        # the node's capability to take isolated tasks).
        self.on_policy_change: Callable[[str], None] | None = None

    @property
    def policy_problem(self) -> str:
        """"" while this node's task network and firewall are verified, else a one-line
        reason isolated tasks are refused."""
        if self._broken:
            return f"this node could not set up task networks: {self._broken}"
        return self._firewall.problem

    def _policy_changed(self) -> None:
        problem = self.policy_problem
        if problem == self._told_problem:
            return
        self._told_problem = problem
        if self.on_policy_change is not None:
            self.on_policy_change(problem)

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        if self._subnet is None:
            raise ExecutorError("the task network is not set up (reset() first)")
        return self._subnet

    @property
    def resolv_conf(self) -> str | None:
        """The generated resolv.conf to mount over the task's /etc/resolv.conf, or None."""
        return str(self._resolv_conf) if self._resolv_conf is not None else None

    async def reset(self) -> None:
        """Remove everything of this node name (namespaces, veths, bridge, table), then
        create the bridge and table afresh, enable IPv4 forwarding and write resolv.conf.
        Raises ExecutorError when ip or nft fail (e.g. no CAP_NET_ADMIN); the network is
        then unusable: attach() refuses with that reason, and nothing else touches it."""
        try:
            await self._reset()
        except ExecutorError as exc:
            self._broken = str(exc)
            self._cluster_known.set()   # nothing to wait for: attach() refuses at once
            self._policy_changed()
            raise
        self._broken = ""
        self._policy_changed()

    async def _reset(self) -> None:
        await self.remove_all()
        routed = await self._routed_networks()
        self._subnet = self._explicit or auto_subnet(self._node_name, routed)
        gateway = self._subnet.network_address + 1
        await _run("ip", "-batch", "-", stdin="\n".join([
            f"link add {self.bridge} type bridge",
            f"link set dev {self.bridge} addrgenmode none",
            f"addr add {gateway}/{self._subnet.prefixlen} dev {self.bridge}",
            f"link set dev {self.bridge} up", ""]))
        await self._firewall.load(self._subnet)
        # Slots 0..n-1 map to gateway+1 ..; the network, gateway and broadcast are not tasks'.
        self._free = collections.deque(range(self._subnet.num_addresses - 3))
        self.refresh_resolv_conf()
        log.info("task network: bridge %s, subnet %s, nft table inet %s", self.bridge,
                 self._subnet, self.table)

    async def set_cluster_addresses(self, addresses: Iterable[str]) -> None:
        """Replace the set of cluster addresses tasks may not reach (atomically), after
        verifying (and if need be restoring) the firewall, and rewrite resolv.conf.

        Entries are IP addresses or host names (resolved here). Raises ExecutorError
        when nft fails; a name that does not resolve is logged and skipped. Does nothing
        when reset() failed."""
        if self._broken:
            return
        v4: set[str] = set()
        v6: set[str] = set()
        for entry in set(addresses):
            for address in await _resolve(entry):
                if address.is_loopback or address.is_unspecified:
                    continue
                (v4 if address.version == 4 else v6).add(str(address))
        await self._firewall.set_cluster(frozenset(v4), frozenset(v6))
        if not self._cluster_known.is_set():
            log.info("task firewall: %d cluster addresses", len(v4) + len(v6))
        self._cluster_known.set()
        # The same cadence picks up a changed upstream resolver.
        self.refresh_resolv_conf()

    def refresh_resolv_conf(self) -> None:
        """(Re)write the tasks' resolv.conf from the host's upstream resolvers. Running
        tasks keep the copy they started with. Never raises."""
        self._resolv_conf = self._dns.refresh()

    async def attach(self) -> Lease:
        """Create a namespace with lo and eth0 (on the bridge, NATed) for one attempt.

        Waits up to CLUSTER_WAIT for the first fill of the cluster address set, then
        verifies the firewall (restoring it if something deleted or changed it). Raises
        ExecutorError when the set stays empty (tasks could reach the other nodes), the
        firewall cannot be verified or restored, no slot is free, or ip fails (nothing is
        left then). Cancellation releases what was made.
        """
        try:
            await asyncio.wait_for(self._cluster_known.wait(), CLUSTER_WAIT)
        except TimeoutError:
            raise ExecutorError("the task firewall does not know the cluster's addresses "
                                f"after {CLUSTER_WAIT:.0f} s (is etcd reachable?)") from None
        if self._broken:
            raise ExecutorError(f"this node could not set up task networks: {self._broken} "
                                "(use --network none, or give the agent CAP_NET_ADMIN)")
        try:
            await self._firewall.ensure()
        except ExecutorError as exc:
            raise ExecutorError(f"refused to start an isolated task without its firewall: "
                                f"{exc}") from None
        if not self._free:
            raise ExecutorError(f"no free address in the task subnet {self.subnet}")
        slot = self._free.popleft()
        lease = Lease(slot, f"{self.netns_prefix}{slot}",
                      f"{self.veth_prefix}{next(self._veths) % VETH_NUMBERS}")
        address = self.subnet.network_address + 2 + slot
        gateway = self.subnet.network_address + 1
        try:
            await _run("ip", "-batch", "-", stdin="\n".join([
                f"netns add {lease.netns}",
                f"link add {lease.veth} type veth peer name eth0 netns {lease.netns}",
                f"link set dev {lease.veth} master {self.bridge} addrgenmode none up",
                f"link set dev {lease.veth} type bridge_slave isolated on", ""]))
            await _run("ip", "-n", lease.netns, "-batch", "-", stdin="\n".join([
                f"addr add {address}/{self.subnet.prefixlen} dev eth0",
                "link set dev lo up",
                "link set dev eth0 up",
                f"route add default via {gateway}", ""]))
        except BaseException:
            await asyncio.shield(self.release(lease))
            raise
        return lease

    async def release(self, lease: Lease) -> None:
        """Delete the attempt's namespace and free its slot. Never raises (a failure is
        logged; reset() at the next start catches what is left).

        Only the namespace: with its last user gone the kernel destroys it, its eth0 and
        so the veth pair, batching the namespaces it cleans up. `link del` of each veth
        cost ~20 ms of RCU waits under the rtnl lock, stalling every other node's ip
        commands on the machine meanwhile. Until the kernel gets to it, the old veth is a
        bridge port (isolated, firewalled like any task's) of a namespace no process is in
        or can enter (its /run/netns entry is gone). What `ip netns del` does, without
        its process (syscalls.py)."""
        try:
            await asyncio.to_thread(_delete_netns, lease.path)
        except OSError as exc:
            log.warning("cannot remove the network of slot %d: %s", lease.slot, exc)
        if lease.slot not in self._free:
            self._free.append(lease.slot)

    def release_soon(self, lease: Lease) -> None:
        """release() in the background: an ended attempt's result and capacity need not
        wait for the deletion (a thread hop). The task is owned here; remove_all() awaits it."""
        task = asyncio.get_running_loop().create_task(self.release(lease),
                                                      name=f"release {lease.netns}")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def remove_all(self) -> None:
        """Delete every namespace, veth, bridge and nft table of this node name (after
        pending releases). Raises ExecutorError only when nft fails for another reason
        than a missing table."""
        if self._releasing:
            await asyncio.gather(*self._releasing)
        namespaces = [entry for entry in _listdir(NETNS_DIR)
                      if entry.startswith(self.netns_prefix)
                      and entry[len(self.netns_prefix):].isdigit()]
        links = await self._own_links()
        commands = [f"link del {link}" for link in links]
        commands += [f"netns del {netns}" for netns in namespaces]
        if commands:
            await _run("ip", "-force", "-batch", "-", stdin="\n".join(commands) + "\n",
                       quiet_missing=True)
            log.info("removed %d task namespaces and %d links (bridge, veths) of node %s",
                     len(namespaces), len(links), self._node_name)
        await self._firewall.remove()
        self._cluster_known.clear()

    async def _own_links(self) -> list[str]:
        links = await run_json("ip", "-j", "link", "show", empty=[])
        names = [str(link.get("ifname", "")) for link in links]
        return [name for name in names if name == self.bridge
                or (name.startswith(self.veth_prefix) and name[len(self.veth_prefix):].isdigit())]

    async def _routed_networks(self) -> list[ipaddress.IPv4Network]:
        networks = []
        for route in await run_json("ip", "-4", "-j", "route", "show", "table", "all",
                                    empty=[]):
            destination = str(route.get("dst", ""))
            if destination in ("", "default"):
                continue
            try:
                networks.append(ipaddress.IPv4Network(destination, strict=False))
            except ValueError:
                continue
        return networks


async def local_addresses() -> list[str]:
    """Every address of this host's interfaces that another node's tasks must not reach
    (interface_addresses). Raises ExecutorError when ip fails."""
    return interface_addresses(await run_json("ip", "-j", "addr", "show", empty=[]))


def interface_addresses(links: list[dict[str, Any]]) -> list[str]:
    """The addresses in `ip -j addr` output (parsed), sorted, except loopback, link-local and
    multicast ones and those of filch's task bridges and veths (every node's on the host:
    task gateways, not ways into the node)."""
    found: set[str] = set()
    for link in links:
        name = str(link.get("ifname", ""))
        if _FILCH_LINK.fullmatch(name):
            continue
        for info in link.get("addr_info", []):
            try:
                address = ipaddress.ip_address(str(info.get("local", "")).split("%")[0])
            except ValueError:
                continue
            if not (address.is_loopback or address.is_link_local or address.is_multicast
                    or address.is_unspecified):
                found.add(str(address))
    return sorted(found)


async def _resolve(entry: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    host = entry.strip("[]")
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve cluster address %r for the task firewall: %s", host, exc)
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def _delete_netns(path: str) -> None:
    """Detach a namespace's /run/netns mount and remove the file (a gone one is fine).
    Raises OSError."""
    try:
        syscalls.umount(path, syscalls.MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
