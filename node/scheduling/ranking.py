"""Which node tries a queued task first: a rendezvous order per task, the same on every node.

Without it every idle node reads the same oldest tasks and races for them: with 23 nodes
most steal attempts lost (issue 18). Here each task has a preference order of the live
nodes, from a consistent-hash ring every node builds alike from the node records: a node
tries a task at once when it comes first in that order, RANK_STEP later when second, and
so on; past MAX_RANK places every node may try it. So the first node usually takes a task
alone, and when it is full or gone the next one takes it a moment later. No node decides
for another: the order only spreads who tries first, the steal transaction still decides.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

# Points per node on the ring: enough that each node comes first for a fair part of the
# tasks (spread ~1/sqrt(points)), few enough that a ring of 1,000 nodes builds in ms.
POINTS_PER_NODE = 32

# Places after which every node may try a task: a task whose first MAX_RANK nodes are all
# full or gone waits at most MAX_RANK steps before every node competes for it. Until then
# one more node may try it per step, so a burst is spread without collisions.
MAX_RANK = 6


def _hash(value: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(value, digest_size=8).digest(), "big")


class Ring:
    """A consistent-hash ring of the live nodes' ids."""

    def __init__(self) -> None:
        self._points: list[int] = []
        self._owners: list[str] = []
        self._members: frozenset[str] = frozenset()
        self.full: frozenset[str] = frozenset()
        """Nodes whose record says they have no room: a task's order skips them, so the
        next node with room tries it at once instead of a step later."""

    @property
    def members(self) -> frozenset[str]:
        return self._members

    def update(self, node_ids: Iterable[str], full: Iterable[str] = ()) -> None:
        """Rebuild the ring for this set of live nodes (nothing to do when unchanged)."""
        members = frozenset(node_ids)
        self.full = frozenset(full)
        if members == self._members:
            return
        points = sorted((_hash(f"{node_id}/{point}".encode()), node_id)
                        for node_id in members for point in range(POINTS_PER_NODE))
        self._points = [point for point, _ in points]
        self._owners = [owner for _, owner in points]
        self._members = members

    def rank(self, node_id: str, task_id: str) -> int:
        """node_id's place (0 = first) in task_id's order of nodes, at most MAX_RANK."""
        if not self._points:
            return 0
        start = bisect.bisect(self._points, _hash(task_id.encode()))
        seen: list[str] = []
        count = len(self._points)
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if owner == node_id:
                return len(seen)
            if owner not in seen and owner not in self.full:
                seen.append(owner)
                if len(seen) >= MAX_RANK:
                    return MAX_RANK
        return MAX_RANK

    @staticmethod
    def score(node_id: str, task_id: str) -> int:
        """A tie-break among tasks every node may try, different on every node, so that
        two nodes do not both reach for the same one."""
        return _hash(f"{node_id}/{task_id}".encode())

