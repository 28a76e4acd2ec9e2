"""Priority and fair share, decided locally: which queued tasks a stealing node takes.

Pure functions, no I/O: the stealer hands them what it sees in etcd (candidates, every
node's per-owner usage, the owners' weights) and its own free capacity. Dominant resource
fairness (Ghodsi et al., NSDI 2011): an owner's share is the larger of its fractions of
the cluster's CPU and memory, divided by its weight; among tasks of one priority, the
owner with the lowest order goes next: that share mixed with its share of the decayed past
usage (node/scheduling/decay.py; with a usage weight of 0, the share alone).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.limits import TxnRoom
from node.scheduling.decay import NO_PAST, Past, order

# An owner nobody gave a weight has this one.
DEFAULT_WEIGHT = 1.0
# Weights relative to the default of 1: a thousandfold preference is already "this owner
# first, always"; beyond it a typo (1e9) would starve everyone else for good.
MAX_WEIGHT = 1000.0


@dataclass(frozen=True)
class Candidate:
    """A queued task as selection sees it."""

    task_id: str
    priority: int
    owner: str
    cpu_millis: int
    memory_bytes: int
    size: int = 0
    """What stealing it adds to a transaction, in bytes."""
    disk_bytes: int = 0
    """The disk it counts on the stealing node (Capacity.disk_of)."""


@dataclass(frozen=True)
class Usage:
    """Resources held (by an owner, or free on a node)."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    running: int = 0

    def plus(self, cpu_millis: int, memory_bytes: int, running: int = 1) -> Usage:
        return Usage(self.cpu_millis + cpu_millis, self.memory_bytes + memory_bytes,
                     self.running + running)


def share(usage: Usage, totals: Usage, weight: float = DEFAULT_WEIGHT) -> float:
    """An owner's weighted dominant share of the cluster (0 when the cluster is empty)."""
    fractions = [used / total for used, total in ((usage.cpu_millis, totals.cpu_millis),
                                                   (usage.memory_bytes, totals.memory_bytes))
                 if total > 0]
    return max(fractions, default=0.0) / (weight if weight > 0 else DEFAULT_WEIGHT)


def owner_order(usage: Usage, totals: Usage, weight: float, usage_share: float,
                usage_weight: float) -> float:
    """decay.order of an owner holding usage now, with usage_share of the decayed past."""
    return order(share(usage, totals), usage_share,
                 weight=weight if weight > 0 else DEFAULT_WEIGHT, usage_weight=usage_weight)


def cluster_usage(nodes: Iterable[pb.Node], own_node_id: str | None,
                  own: Mapping[str, Usage], own_capacity: Usage) -> tuple[dict[str, Usage], Usage]:
    """(usage per owner, cluster totals) from the node records, with this node's live
    ledger in place of its own (possibly stale, possibly not yet written) record."""
    usage: dict[str, Usage] = {owner: Usage(held.cpu_millis, held.memory_bytes, held.running)
                               for owner, held in own.items()}
    totals = own_capacity
    for node in nodes:
        if node.id == own_node_id:
            continue
        totals = totals.plus(node.cpu_capacity_millis, node.memory_capacity_bytes, 0)
        for owner, held in node.owners.items():
            usage[owner] = usage.get(owner, Usage()).plus(held.cpu_millis, held.memory_bytes,
                                                          held.running)
    return usage, totals


def select(candidates: Sequence[Candidate], *, usage: Mapping[str, Usage], totals: Usage,
           weights: Mapping[str, float], free: Usage, limit: int,
           max_bytes: int = 0, disk_free: int | None = None,
           owner_room: Mapping[str, Usage] | None = None, past: Past = NO_PAST
           ) -> list[Candidate]:
    """The candidates to steal now, in the order picked.

    candidates: oldest first within each (priority, owner). Highest priority first; within
    one priority the owner with the lowest order next (owner_order: its weighted dominant
    share mixed with past.shares by past.weight; ties: by name),
    taking that owner's oldest candidate that fits what is still free. Each pick counts
    at once towards its owner's usage and against free, so one batch spreads over owners
    as the cluster would. A task that does not fit never blocks smaller ones behind it.
    Stops at limit tasks, or (max_bytes > 0) before the picks' sizes pass max_bytes.
    disk_free (None: not counted) is the node's free disk, counted like CPU and memory
    (disk is not part of the share: it is no scarce, contended resource of the cluster).
    owner_room: what owners with a running quota may still start (node/scheduling/
    running_quota.py), counted down by each pick like free; other owners are unbounded.
    """
    by_priority: dict[int, dict[str, list[Candidate]]] = {}
    for candidate in candidates:
        by_priority.setdefault(candidate.priority, {}).setdefault(
            candidate.owner, []).append(candidate)
    held = dict(usage)
    cpu_free, memory_free = free.cpu_millis, free.memory_bytes
    disk_left = disk_free
    room_left = dict(owner_room or {})
    chosen: list[Candidate] = []
    # The picks become one steal transaction: cut like every other write (limits.TxnRoom).
    room = TxnRoom(max_count=limit, max_bytes=max_bytes or sys.maxsize, max_ops=sys.maxsize)
    for priority in sorted(by_priority, reverse=True):
        queues = by_priority[priority]
        while queues and len(chosen) < limit:
            owner = min(queues, key=lambda name: (owner_order(
                held.get(name, Usage()), totals, weights.get(name, DEFAULT_WEIGHT),
                past.shares.get(name, 0.0), past.weight), name))
            queue = queues[owner]
            pick = next((candidate for candidate in queue
                         if candidate.cpu_millis <= cpu_free
                         and candidate.memory_bytes <= memory_free
                         and (disk_left is None or candidate.disk_bytes <= disk_left)
                         and _within(room_left.get(owner), candidate)
                         and room.fits(candidate.size)), None)
            if pick is None:
                del queues[owner]       # nothing of this owner fits: the next owner
                continue
            queue.remove(pick)
            if not queue:
                del queues[owner]
            chosen.append(pick)
            room.take(pick.size)
            cpu_free -= pick.cpu_millis
            memory_free -= pick.memory_bytes
            if disk_left is not None:
                disk_left -= pick.disk_bytes
            held[owner] = held.get(owner, Usage()).plus(pick.cpu_millis, pick.memory_bytes)
            if owner in room_left:
                room_left[owner] = room_left[owner].plus(-pick.cpu_millis, -pick.memory_bytes)
        if len(chosen) >= limit:
            break
    return chosen


def _within(room: Usage | None, candidate: Candidate) -> bool:
    """Whether candidate fits its owner's remaining quota room (None: no quota)."""
    return room is None or (candidate.cpu_millis <= room.cpu_millis
                            and candidate.memory_bytes <= room.memory_bytes)


def valid_weight(weight: float) -> bool:
    """A weight an owner may have: finite, > 0 and <= MAX_WEIGHT."""
    return math.isfinite(weight) and 0 < weight <= MAX_WEIGHT
