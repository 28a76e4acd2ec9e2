"""The capacity ledger: the CPU, memory and disk this node has promised to its attempts.

The stealer reserves before it steals (so the next candidate sees less room), the runner
releases when an attempt ends, membership publishes the totals in the node record. Every
change sets the events handed out by subscribe(), so those parts wake without knowing
each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.capabilities import Capabilities
from node.scheduling.fairshare import Usage


@dataclass(frozen=True)
class Allocation:
    cpu_millis: int
    memory_bytes: int
    running: int
    disk_bytes: int = 0


class Capacity:
    """Reservations against this node's CPU, memory and disk, and how many attempts run."""

    def __init__(self, *, cpu_millis: int, memory_bytes: int, disk_bytes: int = 0,
                 default_disk: int = 0, capabilities: Capabilities | None = None,
                 allow_host_network: bool = False) -> None:
        """disk_bytes: the /work capacity (node/running/disk.py); default_disk: what a task without
        --disk counts where sizes are enforced; capabilities: whether they are."""
        self.cpu_millis = cpu_millis
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._default_disk = default_disk
        self._capabilities = capabilities or Capabilities()
        self._allow_host_network = allow_host_network
        self._cpu = 0
        self._memory = 0
        self._disk = 0
        self._running = 0
        self._steals_in_flight = 0
        # Per owner (fair share): what this node's reserved and running attempts hold.
        self._owners: dict[str, Usage] = {}
        self._listeners: list[asyncio.Event] = []

    def subscribe(self) -> asyncio.Event:
        """An event set on every change of the ledger (its holder clears it)."""
        event = asyncio.Event()
        self._listeners.append(event)
        return event

    def allocation(self) -> Allocation:
        return Allocation(self._cpu, self._memory, self._running, self._disk)

    def disk_of(self, spec: pb.TaskSpec) -> int:
        """The disk a task counts here. Its --disk when set (it runs only where that is
        enforced: capabilities.may_run). Else, where sizes are enforced, the node's
        default: its image can fill to that. Else 0: nothing limits what such a task
        writes, so a number would only pretend; the reserve kept free on the file system
        (node/running/disk.py) and the free-space check at start are what protect the node there."""
        if spec.disk_bytes:
            return spec.disk_bytes
        return self._default_disk if self._capabilities.disk_enforced else 0

    @property
    def disk_free(self) -> int:
        return self.disk_bytes - self._disk

    def owners(self) -> dict[str, Usage]:
        """What each owner's attempts on this node hold (reserved or running); owners
        holding nothing are left out."""
        return dict(self._owners)

    def load(self) -> float:
        """Fraction of this node in use: the largest of CPU, memory and disk."""
        disk = self._disk / self.disk_bytes if self.disk_bytes > 0 else 0.0
        return max(self._cpu / self.cpu_millis, self._memory / self.memory_bytes, disk)

    def fits_free(self, spec: pb.TaskSpec) -> bool:
        return (self._cpu + spec.cpu_millis <= self.cpu_millis
                and self._memory + spec.memory_bytes <= self.memory_bytes
                and self._disk + self.disk_of(spec) <= self.disk_bytes)

    def fits_ever(self, spec: pb.TaskSpec) -> bool:
        """Whether this node could ever run the task: capacity, and --network host only
        where the agent allows it (service.explain_pending says so on the task)."""
        if spec.network == "host" and not self._allow_host_network:
            return False
        return (spec.cpu_millis <= self.cpu_millis and spec.memory_bytes <= self.memory_bytes
                and self.disk_of(spec) <= self.disk_bytes)

    def reserve(self, spec: pb.TaskSpec) -> None:
        self._cpu += spec.cpu_millis
        self._memory += spec.memory_bytes
        self._disk += self.disk_of(spec)
        self._count_owner(spec, 1)
        self._changed()

    def release(self, spec: pb.TaskSpec) -> None:
        self._cpu -= spec.cpu_millis
        self._memory -= spec.memory_bytes
        self._disk -= self.disk_of(spec)
        self._count_owner(spec, -1)
        self._changed()

    def _count_owner(self, spec: pb.TaskSpec, sign: int) -> None:
        owner = spec.owner or keys.DEFAULT_OWNER
        held = self._owners.get(owner, Usage()).plus(
            sign * spec.cpu_millis, sign * spec.memory_bytes, sign)
        if held.running > 0:
            self._owners[owner] = held
        else:
            self._owners.pop(owner, None)

    def started(self) -> None:
        """An attempt of a reserved task now runs (released with its end)."""
        self._running += 1
        self._changed()

    def ended(self, spec: pb.TaskSpec) -> None:
        """A started attempt ended: its reservation goes back."""
        self._running -= 1
        self.release(spec)

    @contextlib.contextmanager
    def stealing(self) -> Iterator[None]:
        """Held by the stealer from sending a steal until its attempts are launched: a
        running key of this node without an attempt may meanwhile be that steal's."""
        self._steals_in_flight += 1
        try:
            yield
        finally:
            self._steals_in_flight -= 1

    @property
    def steals_in_flight(self) -> bool:
        return self._steals_in_flight > 0

    def _changed(self) -> None:
        metrics.CPU_ALLOCATED.set(self._cpu / 1000)
        metrics.MEMORY_ALLOCATED.set(self._memory)
        metrics.DISK_ALLOCATED.set(self._disk)
        metrics.RUNNING.set(self._running)
        for event in self._listeners:
            event.set()
