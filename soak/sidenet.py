"""The collector's own network: a second bridge (10.215.<k>.0/24, k the cluster's subnet
number) with one veth into every node namespace (eth1 there).

The nemesis only ever faults eth0 and the cluster's 10.213.<k>.0/24 addresses, so a task on
a partitioned, fenced or lossy node still reaches the collector: an attempt that outlives
its fence is still seen. Tasks run with --network host (the node's namespace) to use it.
"""

from __future__ import annotations

import contextlib

from tests.e2e.faults.netcluster import NetCluster, run

SUBNET_PREFIX = "10.215"
BRIDGE_HOST = 254


class SideNet:
    """The collector bridge of one cluster; close() removes it (and the veths with it)."""

    def __init__(self, *, cluster: NetCluster) -> None:
        self.cluster = cluster
        self.bridge = f"fcbr{cluster.k}"
        self.ip = f"{SUBNET_PREFIX}.{cluster.k}.{BRIDGE_HOST}"

    def node_ip(self, index: int) -> str:
        return f"{SUBNET_PREFIX}.{self.cluster.k}.{index + 1}"

    def setup(self) -> None:
        """Create the bridge and the veths (namespaces must exist already). A bridge left
        by a killed run of the same subnet is removed first."""
        run("ip", "link", "del", self.bridge, check=False)
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.ip}/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for node in self.cluster.nodes:
            host_end = f"fc{self.cluster.k}h{node.index + 1}"
            run("ip", "link", "del", host_end, check=False)
            run("ip", "link", "add", host_end, "type", "veth", "peer", "name", f"{host_end}p")
            run("ip", "link", "set", f"{host_end}p", "netns", node.ns)
            run("ip", "-n", node.ns, "link", "set", f"{host_end}p", "name", "eth1")
            run("ip", "-n", node.ns, "addr", "add", f"{self.node_ip(node.index)}/24",
                "dev", "eth1")
            run("ip", "-n", node.ns, "link", "set", "eth1", "up")
            run("ip", "link", "set", host_end, "master", self.bridge, "up")

    def close(self) -> None:
        for node in self.cluster.nodes:
            with contextlib.suppress(RuntimeError):
                run("ip", "link", "del", f"fc{self.cluster.k}h{node.index + 1}", check=False)
        run("ip", "link", "del", self.bridge, check=False)
