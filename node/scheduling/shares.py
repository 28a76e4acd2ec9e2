"""The owners' side of fair share as one node sees it: their weights (/owner/, watched) and
the gauges of each owner's share and running tasks."""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.etcd.store import Store, WatchEvent
from node.scheduling.fairshare import DEFAULT_WEIGHT, Usage, share


class Shares:
    """Owner weights from etcd, and the share gauges this node exports."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self._published: set[str] = set()      # owners in the share gauges

    async def relist(self, store: Store) -> None:
        self.weights = {owner.name: owner.weight for owner in await store.list_owners()}

    async def on_event(self, event: WatchEvent) -> None:
        name = keys.last_segment(event.key)
        if event.deleted:
            self.weights.pop(name, None)
        else:
            self.weights[name] = pb.Owner.FromString(event.value).weight

    def publish(self, usage: dict[str, Usage], totals: Usage) -> None:
        """Share and running tasks by owner, as this node sees the cluster; owners that
        hold nothing any more leave the gauges, except the default owner (its series always
        exists, from start-up: metrics.py), which reads 0."""
        for owner in self._published - set(usage):
            if owner == keys.DEFAULT_OWNER:
                metrics.OWNER_SHARE.labels(owner).set(0)
                metrics.OWNER_RUNNING.labels(owner).set(0)
                continue
            metrics.OWNER_SHARE.remove(owner)
            metrics.OWNER_RUNNING.remove(owner)
        for owner, held in usage.items():
            metrics.OWNER_SHARE.labels(owner).set(
                share(held, totals, self.weights.get(owner, DEFAULT_WEIGHT)))
            metrics.OWNER_RUNNING.labels(owner).set(held.running)
        self._published = set(usage)
