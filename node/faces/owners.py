"""Owners (fair share): set a weight, list every owner with its usage and share.

An owner's weight lives at /owner/<name>; its usage is what the node records say its
running tasks hold; its share is fairshare.share over the cluster's CPU and memory; its
decayed past usage is /usage/<name>, and its order what the stealers sort owners of one
priority by (node/scheduling/decay.py).
"""

from __future__ import annotations

import time

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, validation
from node.core.errors import InvalidArgument
from node.etcd import usage_records
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.quota_txn import pending_count
from node.etcd.store import Store
from node.etcd.users import UserDirectory
from node.scheduling.decay import decayed_to, usage_shares
from node.scheduling.fairshare import (
    DEFAULT_WEIGHT,
    MAX_WEIGHT,
    Usage,
    cluster_usage,
    owner_order,
    share,
    valid_weight,
)

# Owners with queued work one listing finds at most (one short range per (priority,
# owner) group of the queue): far more owners than a fair-share table is read for.
MAX_QUEUED_GROUPS = 1000


def owner_weight(value: float, field: str = "weight") -> float:
    """A valid weight (finite, > 0, <= MAX_WEIGHT), or InvalidArgument naming field."""
    if not valid_weight(value):
        raise InvalidArgument(field, f"{value!r} is not a weight: give a number above 0 and "
                                     f"at most {MAX_WEIGHT:g} (1 is everyone's default)")
    return value


def owner_name(value: str, field: str = "name") -> str:
    """A valid owner name, or InvalidArgument naming field."""
    return validation.owner(value, field)


class OwnerService:
    """Owner operations shared by the gRPC API and the HTTP face."""

    def __init__(self, *, store: Store, users: UserDirectory | None = None) -> None:
        self.store = store
        self.users = users

    async def set_weight(self, name: str, weight: float) -> pb.Owner:
        """Store name's weight (arguments already validated); returns the owner as listed."""
        await self.store.put_owner(pb.Owner(name=name, weight=weight))
        for owner in await self.list_owners():
            if owner.name == name:
                return owner
        return pb.Owner(name=name, weight=weight)

    async def list_owners(self) -> list[pb.Owner]:
        """Every owner with a weight, running work or queued work, in name order, with its
        usage summed over the node records and its weighted dominant share, its decayed past
        usage (decayed to now) and share of every owner's, and its order."""
        weights = {owner.name: owner.weight for owner in await self.store.list_owners()}
        nodes = await self.store.list_nodes()
        usage, totals = cluster_usage(nodes, None, {}, Usage())
        settings = ClusterSettingsView()
        await settings.relist(self.store)
        decayed = await usage_records.list_usage(self.store)
        now, half_life = time.time(), settings.usage_half_life
        past = usage_shares(decayed, now, half_life)
        names = set(weights) | set(usage) | await self._queued_owners() | set(decayed)
        owners = []
        for name in sorted(names):
            held = usage.get(name, Usage())
            weight = weights.get(name, DEFAULT_WEIGHT)
            owner = pb.Owner(
                name=name, weight=weight,
                usage=pb.OwnerUsage(cpu_millis=held.cpu_millis, memory_bytes=held.memory_bytes,
                                    running=held.running),
                share=share(held, totals, weight), usage_share=past.get(name, 0.0),
                order=owner_order(held, totals, weight, past.get(name, 0.0),
                                  settings.usage_weight))
            if name in decayed:
                owner.decayed.CopyFrom(decayed_to(decayed[name], now, half_life))
            owners.append(owner)
            await self._fill_quota(owner)
        return owners

    async def _fill_quota(self, owner: pb.Owner) -> None:
        """A user's quota and pending tasks (one count-only range), on its owner entry."""
        if self.users is None or not self.users.is_user(owner.name):
            return
        owner.user = True
        quota = self.users.quota(owner.name)
        if quota is not None:
            owner.quota.CopyFrom(quota)
        owner.pending, _ = await pending_count(self.store, owner.name)

    async def _queued_owners(self) -> set[str]:
        """Owners with a queued task: the first key of each (priority, owner) group of the
        priority index, then a jump past that group."""
        found: set[str] = set()
        start, end = keys.QUEUE, keys.prefix_end(keys.QUEUE)
        for _ in range(MAX_QUEUED_GROUPS):
            page = await self.store.list_page(start, end, limit=1)
            if not page.keys:
                break
            priority, owner, _ = keys.parse_queue(page.keys[0])
            found.add(owner)
            start = keys.prefix_end(keys.queue_group(priority, owner))
        return found
