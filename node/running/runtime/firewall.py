"""The task firewall: this node's nft table `inet filch-<name>`, kept present and intact.

Rules for the traffic of this node's task bridge (inet: IPv4 and IPv6 alike):
  input        everything from the bridge to a local address is dropped (etcd, gRPC,
               HTTP, metrics, whatever listens on the host, on any of its addresses).
  forward      in this order, the first match wins:
               a packet conntrack calls invalid: drop (part of no flow: forged or stray);
               task to task (bridge to bridge): drop;  IPv6 from the bridge: drop;
               a cluster address (@cluster4/6: the etcd members' URLs and every address
                 each node publishes): drop -- --task-allow never opens these;
               --task-allow ranges: accept;
               DNS (port 53) to a metadata address: accept (Azure's and AWS's resolvers
                 live there and are what the host's resolv.conf names);
               link-local 169.254.0.0/16 and the other METADATA endpoints: drop;
               --task-deny ranges: drop;
               new connections towards the bridge: drop (nothing opens one to a task);
               only when filch itself turned net.ipv4.ip_forward on: anything that neither
                 enters nor leaves a filch bridge ("fb*", any node's on this host): drop,
                 so that the host does not start routing for its LAN.
  output       the host (and its host-network tasks) opens no connection to a task:
               towards the bridge only established and related traffic leaves.
  postrouting  the task subnet is masqueraded.

Anything that runs `nft flush ruleset` (restarting Debian's nftables service,
iptables-nft-restore) deletes the table, and with it every rule above. ensure() compares
the table with what was loaded (one `nft -j list table`, ~3 ms) before every attach and
every housekeeping round and loads it again when it is missing or altered; when that
fails, `problem` says why and attach() refuses isolated tasks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from node.core import metrics
from node.core.addresses import Network, metadata_networks
from node.core.errors import ExecutorError
from node.running.runtime.commands import run, run_json

log = logging.getLogger(__name__)

# Filch's bridges on this host, every node's: "fb" + 6 hex digits (network.py).
BRIDGE_PATTERN = "fb*"

# The fact that filch, not the operator or other software, turned IPv4 forwarding on,
# kept across restarts beside the node's other network state.
FORWARDING_MARKER = "ip_forward-enabled-by-filch"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class TaskFirewall:
    """One node's nft table: loaded by load(), kept by ensure(), removed by remove()."""

    def __init__(self, *, table: str, bridge: str, state_dir: Path,
                 deny: Iterable[Network] = (), allow: Iterable[Network] = ()) -> None:
        """Touches nothing."""
        self.table = table
        self._bridge = bridge
        self._state_dir = state_dir
        self._deny = list(deny)
        self._allow = list(allow)
        self._subnet: ipaddress.IPv4Network | None = None
        self._cluster: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self._owns_forwarding = False
        # What `nft -j list table` showed right after the last load (handles left out).
        self._loaded: str | None = None
        self._lock = asyncio.Lock()
        # The next check, not started yet: every ensure() arriving before it starts shares
        # it (a burst of attaches costs two `nft list`, not one each, queued on the lock).
        self._next: asyncio.Task[None] | None = None
        self._problem = ""
        self.on_change: Callable[[], None] | None = None

    @property
    def problem(self) -> str:
        """"" while the table is verified as loaded, else why isolated tasks are refused."""
        return self._problem

    def _set_problem(self, problem: str) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        metrics.FIREWALL_FAILED.set(int(bool(problem)))
        if self.on_change is not None:
            self.on_change()

    async def load(self, subnet: ipaddress.IPv4Network) -> None:
        """Create the table afresh (empty cluster sets) and turn IPv4 forwarding on.
        Raises ExecutorError when nft fails or forwarding cannot be turned on."""
        async with self._lock:
            self._subnet = subnet
            self._cluster = (frozenset(), frozenset())
            self._owns_forwarding = await asyncio.to_thread(self._claim_forwarding)
            await self._apply()
            # After the table: when filch turns forwarding on, its rule confining
            # forwarding to the task bridges is in place already.
            await asyncio.to_thread(_enable_forwarding)

    async def set_cluster(self, v4: frozenset[str], v6: frozenset[str]) -> None:
        """Make the cluster sets these addresses (verifying the rest of the table too).
        Raises ExecutorError when nft fails."""
        async with self._lock:
            # First the check, so that a table found missing is logged and counted even
            # when the new sets would have replaced it anyway.
            await self._ensure()
            if (v4, v6) != self._cluster:
                self._cluster = (v4, v6)
                await self._apply()

    async def ensure(self) -> None:
        """Check the table is as loaded; load it again when missing or altered (logged,
        counted in filch_task_firewall_restores_total). Raises ExecutorError naming the
        cause when it cannot be checked or restored; `problem` holds it until it can."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_task(self._check(),
                                                                name=f"check {self.table}")
            # Its failure is every sharer's to raise; nothing more to log when all left.
            self._next.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(self._next)

    async def _check(self) -> None:
        async with self._lock:
            # Started: whoever asks from now on gets a check that begins after this one,
            # so no caller is answered by a listing older than its call.
            self._next = None
            await self._ensure()

    async def remove(self) -> None:
        """Delete the table (a missing one is fine). Raises ExecutorError when nft fails."""
        async with self._lock:
            self._loaded = None
            await run("nft", "-f", "-", stdin=f"table inet {self.table} {{}}\n"
                                              f"delete table inet {self.table}\n")

    async def _ensure(self) -> None:
        if self._subnet is None:
            raise ExecutorError("the task firewall is not set up")
        try:
            found = await self._listing()
        except ExecutorError as exc:
            self._set_problem(f"cannot check the task firewall (nft table inet "
                              f"{self.table}): {exc}")
            raise ExecutorError(self._problem) from exc
        if found is not None and found == self._loaded:
            self._set_problem("")
            return
        state = "missing" if found is None else "altered"
        metrics.FIREWALL_RESTORES.inc()
        log.error("the task firewall (nft table inet %s) is %s -- something ran `nft flush "
                  "ruleset` or edited it; loading it again", self.table, state)
        try:
            await self._apply()
        except ExecutorError as exc:
            self._set_problem(f"the task firewall (nft table inet {self.table}) is {state} "
                              f"and cannot be restored: {exc}")
            raise ExecutorError(self._problem) from exc
        log.warning("the task firewall (nft table inet %s) is restored", self.table)

    async def _apply(self) -> None:
        """Load the whole table in one nft transaction and remember how it reads."""
        self._loaded = None
        await run("nft", "-f", "-", stdin=self._ruleset())
        self._loaded = await self._listing()
        if self._loaded is None:
            raise ExecutorError(f"nft table inet {self.table} vanished right after loading")
        self._set_problem("")

    async def _listing(self) -> str | None:
        """The table as nft lists it, handles left out (they change with every load);
        None when the table does not exist."""
        try:
            listing = await run_json("nft", "-j", "list", "table", "inet", self.table,
                                     empty={})
        except ExecutorError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        items = [item for item in listing.get("nftables", [])
                 if "metainfo" not in item]
        for item in items:
            for body in item.values():
                if isinstance(body, dict):
                    body.pop("handle", None)
        return json.dumps(items, sort_keys=True)

    def _claim_forwarding(self) -> bool:
        """Whether filch (this node, now or in an earlier run) turns IPv4 forwarding on;
        the fact is written down before forwarding is turned on."""
        marker = self._state_dir / FORWARDING_MARKER
        if marker.exists():
            return True
        try:
            enabled = IP_FORWARD.read_text().strip() == "1"
        except OSError:
            return False     # _enable_forwarding reports it
        if enabled:
            return False     # the operator's or other software's: left as it is
        self._state_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text("net.ipv4.ip_forward was 0 before filch turned it on\n")
        return True

    def _ruleset(self) -> str:
        if self._subnet is None:
            raise ExecutorError("the task firewall is not set up")
        bridge = json.dumps(self._bridge)
        from_bridge = f"iifname {bridge}"
        v4, v6 = self._cluster
        meta = metadata_networks()
        forwarding = (f'iifname != "{BRIDGE_PATTERN}" oifname != "{BRIDGE_PATTERN}" drop'
                      if self._owns_forwarding else "")
        return f"""
table inet {self.table} {{}}
delete table inet {self.table}
table inet {self.table} {{
  set cluster4 {{ type ipv4_addr; {_elements(v4)} }}
  set cluster6 {{ type ipv6_addr; {_elements(v6)} }}
  set metadata4 {{ type ipv4_addr; flags interval; {_elements(_of(meta, 4))} }}
  set metadata6 {{ type ipv6_addr; flags interval; {_elements(_of(meta, 6))} }}
  set allow4 {{ type ipv4_addr; flags interval; auto-merge; {_elements(_of(self._allow, 4))} }}
  set allow6 {{ type ipv6_addr; flags interval; auto-merge; {_elements(_of(self._allow, 6))} }}
  set deny4 {{ type ipv4_addr; flags interval; auto-merge; {_elements(_of(self._deny, 4))} }}
  set deny6 {{ type ipv6_addr; flags interval; auto-merge; {_elements(_of(self._deny, 6))} }}
  chain input {{
    type filter hook input priority filter; policy accept;
    {from_bridge} drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    {from_bridge} ct state invalid drop
    oifname {bridge} ct state invalid drop
    {from_bridge} oifname {bridge} drop
    {from_bridge} meta nfproto ipv6 drop
    {from_bridge} ip daddr @cluster4 drop
    {from_bridge} ip6 daddr @cluster6 drop
    {from_bridge} ip daddr @allow4 accept
    {from_bridge} ip6 daddr @allow6 accept
    {from_bridge} ip daddr @metadata4 meta l4proto {{ tcp, udp }} th dport 53 accept
    {from_bridge} ip daddr @metadata4 drop
    {from_bridge} ip6 daddr @metadata6 drop
    {from_bridge} ip daddr @deny4 drop
    {from_bridge} ip6 daddr @deny6 drop
    oifname {bridge} ct state new drop
    {forwarding}
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    oifname {bridge} ct state established,related accept
    oifname {bridge} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {self._subnet} oifname != {bridge} masquerade
  }}
}}
"""


def _of(networks: Iterable[Network], version: int) -> list[str]:
    return [str(network) for network in networks if network.version == version]


def _elements(entries: Iterable[str]) -> str:
    listed = sorted(entries)
    return f"elements = {{ {', '.join(listed)} }}" if listed else ""


def _enable_forwarding() -> None:
    """net.ipv4.ip_forward = 1 in this network namespace (NAT needs it). Raises
    ExecutorError when it is off and cannot be turned on (a read-only /proc/sys in a
    container: `podman run --sysctl net.ipv4.ip_forward=1`)."""
    try:
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1\n")
    except OSError as exc:
        raise ExecutorError(f"cannot enable net.ipv4.ip_forward ({exc}); in a container, "
                            "start it with --sysctl net.ipv4.ip_forward=1") from exc
