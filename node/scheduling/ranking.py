"""Which nodes hear of a queued task and which of them tries it first, the same on every node.

Without it every node decoded every queue event and every idle node raced for the same
oldest tasks: with 23 nodes most steal attempts were lost and every agent's CPU went to
watch responses (issue 18). Here the shard index /shard/<shard>/... (node/core/keys.py)
is cut into contiguous slices, one per live node in the order of their ids; a shard's
*chain* is the owner of its slice and the WATCHERS - 1 nodes after it. Each node watches
only the shards it is in the chain of (one or two key ranges), so a queue event reaches
WATCHERS nodes whatever the fleet's size. Within a chain, the first node with room (a
node whose record says it is full is skipped) tries a task at once, the next one a step
later, and so on; every node also relists the whole priority index now and then and may
try what it finds there after MAX_RANK steps, so work reaches idle nodes outside a full
chain. No node decides for another: the order only spreads who tries first, the steal
transaction still decides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.keys import SHARD_COUNT, shard_of

# Nodes that hear of each shard's tasks (and try them, one step apart).
WATCHERS = 4

# The place of a node outside a task's chain: it tries the task (found by a relist) after
# MAX_RANK steps, when the chain has had its turn.
MAX_RANK = WATCHERS


class Slices:
    """The live nodes, each owning a contiguous slice of the shards."""

    def __init__(self) -> None:
        self._nodes: list[str] = []
        self._index: dict[str, int] = {}
        self.full: frozenset[str] = frozenset()
        """Nodes whose record says they have no room: a chain skips them, so the next
        node with room tries the task at once instead of a step later."""

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def update(self, node_ids: Iterable[str], full: Iterable[str] = ()) -> None:
        self._nodes = sorted(set(node_ids))
        self._index = {node_id: index for index, node_id in enumerate(self._nodes)}
        self.full = frozenset(full)

    def owner(self, shard: int) -> int:
        """The index (in id order) of the node whose slice holds this shard."""
        return shard * len(self._nodes) // SHARD_COUNT

    def rank(self, node_id: str, task_id: str) -> int:
        """node_id's place (0 = first) in the chain of task_id's shard, skipping full
        nodes; MAX_RANK when it is not in the chain."""
        count = len(self._nodes)
        me = self._index.get(node_id)
        if me is None or count == 0:
            return 0 if count == 0 else MAX_RANK
        first = self.owner(shard_of(task_id))
        place = 0
        for step in range(min(WATCHERS, count)):
            index = (first + step) % count
            if index == me:
                return place
            if self._nodes[index] not in self.full:
                place += 1
        return MAX_RANK

    def watched(self, node_id: str) -> list[tuple[int, int]]:
        """The shard ranges [first, end) node_id is in the chain of: the slices of itself
        and of the WATCHERS - 1 nodes before it (wrapping around); everything while the
        fleet has no more than WATCHERS nodes."""
        count = len(self._nodes)
        me = self._index.get(node_id)
        if me is None or count <= WATCHERS:
            return [(0, SHARD_COUNT)]
        first_owner = me - (WATCHERS - 1)
        start = _slice_start(first_owner % count, count)
        end = _slice_start(me + 1, count)
        if first_owner >= 0:
            return [(start, end)] if start < end else []
        # The chain wraps around the last node: two ranges.
        return [(low, high) for low, high in ((0, end), (start, SHARD_COUNT)) if low < high]

    @staticmethod
    def score(node_id: str, task_id: str) -> int:
        """A tie-break among tasks every node may try, different on every node, so that
        two nodes do not both reach for the same one."""
        digest = hashlib.blake2b(f"{node_id}/{task_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")


def _slice_start(index: int, count: int) -> int:
    """The first shard of node index's slice (index == count: the end)."""
    # The inverse of owner(): the smallest shard s with s * count // SHARD_COUNT >= index.
    return -(-index * SHARD_COUNT // count)


def is_full(node: pb.Node) -> bool:
    """Whether a node's record says it takes no task: no room left, cordoned (`filch node
    cordon`/`drain`), in a start back-off or holding room for a starving task (then it
    takes only that one or higher ones: node/scheduling/reservation.py); a chain skips it."""
    return (node.cordoned or node.start_backoff or bool(node.reserved_task)
            or node.cpu_allocated_millis >= node.cpu_capacity_millis
            or node.memory_allocated_bytes >= node.memory_capacity_bytes)
