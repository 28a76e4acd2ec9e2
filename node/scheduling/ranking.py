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
import itertools
from collections.abc import Iterable, Iterator

from node.scheduling.queue_view import Group, QueueView

# Points per node on the ring: enough that each node comes first for a fair part of the
# tasks (spread ~1/sqrt(points)), few enough that a ring of 1,000 nodes builds in ms.
POINTS_PER_NODE = 32

# Ranks remembered at most (one per task seen): past it the cache starts over.
MAX_CACHED_RANKS = 100_000

# Places after which every node may try a task: a task whose first MAX_RANK nodes are all
# full or gone waits at most MAX_RANK steps before every node competes for it.
MAX_RANK = 3


def _hash(value: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(value, digest_size=8).digest(), "big")


class Ring:
    """A consistent-hash ring of the live nodes' ids."""

    def __init__(self) -> None:
        self._points: list[int] = []
        self._owners: list[str] = []
        self._members: frozenset[str] = frozenset()

    @property
    def members(self) -> frozenset[str]:
        return self._members

    def update(self, node_ids: Iterable[str]) -> None:
        """Rebuild the ring for this set of live nodes (nothing to do when unchanged)."""
        members = frozenset(node_ids)
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
            if owner not in seen:
                seen.append(owner)
                if len(seen) >= MAX_RANK:
                    return MAX_RANK
        return MAX_RANK

    @staticmethod
    def score(node_id: str, task_id: str) -> int:
        """A tie-break among tasks every node may try, different on every node, so that
        two nodes do not both reach for the same one."""
        return _hash(f"{node_id}/{task_id}".encode())


class Preference:
    """This node's order over the queue view's candidates: a task's ring rank first (its
    first node at once, the next ones RANK_STEP after another), then age; past MAX_RANK,
    a per-node score, so that nodes which may all try a task reach for different ones."""

    def __init__(self) -> None:
        self.ring = Ring()
        self._ranks: dict[str, int] = {}
        self._ranked_for: tuple[str, frozenset[str]] = ("", frozenset())
        self.next_ready: float | None = None
        """After reads(): when the earliest task held back by its rank may be tried."""

    def rank(self, node_id: str, task_id: str) -> int:
        """Cached per task while the ring and this node's id stay the same."""
        if self._ranked_for != (node_id, self.ring.members):
            self._ranks.clear()
            self._ranked_for = (node_id, self.ring.members)
        rank = self._ranks.get(task_id)
        if rank is None:
            if len(self._ranks) >= MAX_CACHED_RANKS:
                self._ranks.clear()
            rank = self._ranks[task_id] = self.ring.rank(node_id, task_id)
        return rank

    def reads(self, view: QueueView, node_id: str, *, step: float, per_group: int,
              per_read: int, now: float) -> Iterator[list[tuple[Group, str]]]:
        """Candidates to read, read by read, highest priority first (whole priorities, as
        QueueView.reads), per group the per_group this node may try now and prefers.
        A priority that still holds tasks this node may not try yet ends the reads: no
        lower task is taken while a higher one waits for its first nodes (at most
        MAX_RANK steps); next_ready says when to look again."""
        self.next_ready = None
        chunk: list[tuple[Group, str]] = []
        ordered = sorted(view.groups, key=lambda group: (-group[0], group[1]))
        for _, same in itertools.groupby(ordered, key=lambda group: group[0]):
            if len(chunk) >= per_read:
                yield chunk
                chunk = []
            held_back = False
            for group in same:
                ready: list[tuple[int, int, str]] = []
                for position, task_id in enumerate(view.groups.get(group, ())):
                    rank = self.rank(node_id, task_id)
                    at = view.first_seen.get(task_id, now) + rank * step
                    if at > now:
                        held_back = True
                        self.next_ready = at if self.next_ready is None else min(
                            self.next_ready, at)
                        continue
                    tie = position if rank < MAX_RANK else Ring.score(node_id, task_id)
                    ready.append((rank, tie, task_id))
                ready.sort()
                chunk += [(group, task_id) for _, _, task_id in ready[:per_group]]
            if held_back:
                break
        if chunk:
            yield chunk
