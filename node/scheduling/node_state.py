"""What the parts of one node share: its registration, liveness and capacity ledger.

Membership writes the registration and liveness; the runner, stealer and housekeeping
read them. Sharing this small state (instead of each other) keeps the agent's wiring
acyclic: every part is built from the state and from the parts it calls, in one order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.capabilities import Capabilities
from node.core.config import Config
from node.scheduling.capacity import Capacity
from node.scheduling.constraints import Eligibility
from node.scheduling.startfailures import StartBackoff


class Launcher(Protocol):
    def launch(self, task: pb.Task) -> None:
        """Run a task this node just stole (its resources already reserved)."""


@dataclass(frozen=True)
class Registration:
    """This node's current identity in the cluster."""

    node_id: str
    lease_id: int


@dataclass
class NodeState:
    capacity: Capacity
    capabilities: Capabilities = field(default_factory=Capabilities)
    """What this node can enforce (node/core/capabilities.py); published in its record."""
    registration: Registration | None = None
    """None while unregistered or fenced."""
    cluster_size: int = 1
    """Live nodes as the stealer's node watch sees them (paces the node record writes)."""
    live: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while this node holds a fresh lease; stealing and watching wait for it."""
    eligibility: Eligibility | None = None
    """Its labels and taints (--label, --taint) with its capabilities: which tasks it may run."""
    backoff: StartBackoff = field(default_factory=StartBackoff)
    """Back-off after node-side start failures in a row (the stealer pauses meanwhile)."""

    def __post_init__(self) -> None:
        if self.eligibility is None:
            self.eligibility = Eligibility(capabilities=self.capabilities)

    def refusal(self, spec: pb.TaskSpec) -> str | None:
        """None when this node may run spec; else why not (constraints.Eligibility)."""
        assert self.eligibility is not None
        return self.eligibility.refusal(spec)
    cordoned: bool = False
    """`filch node cordon/drain` (node/operations/cordon.py): published in the record."""
    draining: bool = False
    drain_deadline: float = 0.0
    """Wall clock (s) when a drain hands back what still runs; 0 when not draining."""
    _cordon_listeners: list[Callable[[], None]] = field(default_factory=list)

    def set_cordon(self, *, cordoned: bool, draining: bool, drain_deadline: float) -> None:
        """Record the cordon state; listeners (the node record's publisher) hear of a change."""
        new = (cordoned, draining, drain_deadline if draining else 0.0)
        if new == (self.cordoned, self.draining, self.drain_deadline):
            return
        self.cordoned, self.draining, self.drain_deadline = new
        for listener in self._cordon_listeners:
            listener()

    def on_cordon_change(self, listener: Callable[[], None]) -> None:
        self._cordon_listeners.append(listener)

    reserved_task: str = ""
    """The task this node holds room for (node/scheduling/reservation.py), "" for none;
    published in its record with reserved_priority and reserved_since (wall clock, s)."""
    reserved_priority: int = 0
    reserved_since: float = 0.0
    _reservation_listeners: list[Callable[[], None]] = field(default_factory=list)

    def set_reservation(self, task_id: str, priority: int, since: float) -> None:
        """Record the reservation ("" for none); listeners (the record's publisher) hear of it."""
        if (task_id, priority, since) == (self.reserved_task, self.reserved_priority,
                                          self.reserved_since):
            return
        self.reserved_task, self.reserved_priority, self.reserved_since = task_id, priority, since
        for listener in self._reservation_listeners:
            listener()

    def on_reservation_change(self, listener: Callable[[], None]) -> None:
        self._reservation_listeners.append(listener)

    @classmethod
    def for_config(cls, config: Config, *, capabilities: Capabilities | None = None,
                   disk_capacity: int = 0) -> NodeState:
        """disk_capacity: from node/running/disk.py (0: no task that counts disk fits)."""
        capabilities = capabilities if capabilities is not None else Capabilities()
        return cls(Capacity(cpu_millis=config.cpu_capacity_millis, memory_bytes=config.memory,
                            disk_bytes=disk_capacity, default_disk=config.default_disk,
                            capabilities=capabilities,
                            allow_host_network=config.allow_host_network), capabilities,
                   eligibility=Eligibility(capabilities=capabilities,
                                           node_labels=config.label_map,
                                           taints=config.taint_map))

    def owns(self, node_id: str) -> bool:
        """Whether node_id is this node's current registration."""
        return self.registration is not None and self.registration.node_id == node_id
