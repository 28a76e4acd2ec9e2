"""The sharded protocol of the stealing model (bench/model.py): chains of nodes, who hears
of which queue event, and what a watch response costs a node.

filch (node/scheduling/ranking.py): a task's shard (of 4,096, a hash of its id) belongs to
one node's contiguous slice (live nodes in id order); its *chain* is that owner and the
next WATCHERS - 1 nodes. Only the chain's nodes watch the shard, so a queue event (the
put at submit, the delete at the steal) reaches min(N, WATCHERS) nodes. Within the chain
the first node with room by the node records tries at once, the next a step later (step =
steal_delay + 2 x the node's moving average of read+steal time); a node outside the chain
finds the task at its next relist (every sweep_interval) and tries after MAX_RANK steps.
Node records go to every node, the cluster writing at most 10 a second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol


class _Recorded(Protocol):
    recorded_full: bool


def chain(owner: int, nodes: int, watchers: int) -> tuple[int, ...]:
    """The node indexes of a chain whose slice belongs to `owner`."""
    return tuple((owner + step) % nodes for step in range(min(watchers, nodes)))


def rank(nodes: Sequence[_Recorded], members: tuple[int, ...], me: int, max_rank: int) -> int:
    """me's place in the chain, nodes recorded full skipped; max_rank outside it."""
    place = 0
    for index in members:
        if index == me:
            return place
        if not nodes[index].recorded_full:
            place += 1
    return max_rank


def first_relist(visible: float, phase: float, interval: float) -> float:
    """When a node relisting at phase + k x interval first lists a task visible since then."""
    return phase + max(0, math.ceil((visible - phase) / interval - 1e-12)) * interval


def fan(batch: Sequence[tuple[str, tuple[int, ...] | None, object]], nodes: int
        ) -> tuple[dict[int, tuple[int, int]], int]:
    """Who receives what of one watch tick: node index -> (responses, events), and the
    deliveries etcd sends. An event carries its recipients (None: every node) and the
    transaction that wrote it: one response per node per transaction (the events of one
    transaction arrive together)."""
    txns: dict[int, set[object]] = {}
    events: dict[int, int] = {}
    deliveries = 0
    for _kind, members, txn in batch:
        targets = range(nodes) if members is None else members
        for index in targets:
            txns.setdefault(index, set()).add(txn)
            events[index] = events.get(index, 0) + 1
            deliveries += 1
    return {index: (len(txns[index]), events[index]) for index in txns}, deliveries
