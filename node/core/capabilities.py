"""What a node can enforce, as named capabilities: which tasks it may run.

A node publishes its capabilities in its record (Node.capabilities). They are facts the
node found out about itself (probed at start, or reported by the part that owns them,
e.g. the task firewall), not wishes of an operator: a task that needs a protection runs
only where the protection holds. This module owns the names and the one decision that
reads them (may_run), so the stealer (never steal what this node cannot run) and the API
(why a task waits) cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from node._gen.filch.v1 import filch_pb2 as pb

# Names are "filch.io/<name>": the fleet's labels will share the map, under other prefixes.
PREFIX = "filch.io/"
EXECUTOR = PREFIX + "executor"
""""runc" or "process"."""
NETWORK_ISOLATED = PREFIX + "network-isolated"
""""true" on a runc node whose task network is set up and whose firewall policy is
verified; "false" otherwise (and while the policy is missing)."""
DISK_ENFORCED = PREFIX + "disk-enforced"
""""true" on a runc node whose loop devices work: /work sizes are enforced and counted."""

TRUE = "true"
FALSE = "false"

# Messages of may_run, also the ones explain_pending shows when no live node qualifies.
NEEDS_DISK_ENFORCED = ("no live node enforces disk sizes (needs loop devices and the runc "
                       "executor); submit without --disk to run with the node's advisory "
                       "default")
NEEDS_NETWORK_ISOLATED = ("no live runc node has a verified task firewall (isolated network) "
                          "right now; the task waits until one has")


def may_run(capabilities: Mapping[str, str], spec: pb.TaskSpec) -> str | None:
    """None when a node with these capabilities may run spec, else the reason it may not.

    (a) A spec that names --disk needs its size enforced (a node that cannot enforce it
    would let the task fill the disk etcd lives on). (b) On a runc node an isolated task
    needs a verified firewall; a process-executor node runs every task unisolated, which
    its operator opted into with an explicit flag, so it is not filtered on network.
    A node that publishes no capabilities (older version) enforces nothing.
    """
    if spec.disk_bytes > 0 and capabilities.get(DISK_ENFORCED) != TRUE:
        return NEEDS_DISK_ENFORCED
    if (capabilities.get(EXECUTOR) == "runc" and spec.network in ("", "isolated")
            and capabilities.get(NETWORK_ISOLATED) != TRUE):
        return NEEDS_NETWORK_ISOLATED
    return None


class Capabilities:
    """This node's capabilities; listeners hear of every real change (and only of those)."""

    def __init__(self, *, initial: Mapping[str, str] | None = None) -> None:
        self._values: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []
        for name, value in (initial or {}).items():
            self.set(name, value)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call listener (synchronously, in the event loop) after each real change."""
        self._listeners.append(listener)

    def set(self, name: str, value: str) -> None:
        """Set one capability; listeners are called only when its value changed (so the
        node record, which every node watches, is rewritten only then)."""
        # Imported here: the CLI reads the names (node.faces.render) and must not pay for
        # prometheus_client (~25 ms) on every `filch nodes`.
        from node.core import metrics
        old = self._values.get(name)
        if old == value:
            return
        if old is not None:
            metrics.CAPABILITY.remove(name, old)
        metrics.CAPABILITY.labels(name, value).set(1)
        self._values[name] = value
        for listener in self._listeners:
            listener()

    def get(self, name: str) -> str:
        return self._values.get(name, "")

    def snapshot(self) -> dict[str, str]:
        return dict(self._values)

    def may_run(self, spec: pb.TaskSpec) -> str | None:
        """may_run() with this node's current capabilities."""
        return may_run(self._values, spec)

    @property
    def disk_enforced(self) -> bool:
        return self._values.get(DISK_ENFORCED) == TRUE
