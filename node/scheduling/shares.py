"""The owners' side of fair share as one node sees it: their weights (/owner/, watched),
their decayed past usage (/usage/, watched) and the gauges of each owner's share, order,
decayed usage and running tasks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NoReturn

from prometheus_client import Gauge

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.etcd import usage_records
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.store import Store, WatchEvent
from node.etcd.watching import list_and_watch
from node.scheduling.decay import Past, decayed_to, usage_shares
from node.scheduling.fairshare import DEFAULT_WEIGHT, Usage, owner_order, share

# How long a computed order of the past serves (seconds): usage decays over a half-life of
# a minute at least, so in a second every share moves by under 2%, all alike.
PAST_REFRESH = 1.0


class Shares:
    """Owner weights and decayed usage from etcd, and the share gauges this node exports."""

    def __init__(self, *, settings: ClusterSettingsView | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.weights: dict[str, float] = {}
        self.decayed: dict[str, pb.DecayedUsage] = {}
        self._settings = settings if settings is not None else ClusterSettingsView()
        self._clock = clock
        self._published: set[str] = set()      # owners in the share gauges
        self._published_decayed: set[str] = set()
        # past() as last computed, with what it depends on: the stealer asks on every
        # pass, and decay over a second changes no order worth a recomputation.
        self._past: tuple[float, float, float, Past] | None = None

    async def watch(self, store: Store) -> NoReturn:
        """Follow /owner/ and /usage/ (until cancelled)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(list_and_watch(store, keys.OWNERS,
                                             lambda: self.relist(store), self.on_event))
            group.create_task(list_and_watch(store, keys.DECAYED_USAGE,
                                             lambda: self.relist_usage(store),
                                             self.on_usage_event))
        raise AssertionError("unreachable")

    async def relist(self, store: Store) -> None:
        self.weights = {owner.name: owner.weight for owner in await store.list_owners()}

    async def on_event(self, event: WatchEvent) -> None:
        name = keys.last_segment(event.key)
        if event.deleted:
            self.weights.pop(name, None)
        else:
            self.weights[name] = pb.Owner.FromString(event.value).weight

    async def relist_usage(self, store: Store) -> None:
        self.decayed = await usage_records.list_usage(store)
        self._past = None
        self._publish_decayed()

    async def on_usage_event(self, event: WatchEvent) -> None:
        name = event.key[len(keys.DECAYED_USAGE):].decode()
        if event.deleted:
            self.decayed.pop(name, None)
        else:
            self.decayed[name] = pb.DecayedUsage.FromString(event.value)
        self._past = None
        self._publish_decayed()

    def past(self) -> Past:
        """What select() needs of the past: usage shares now, and the usage weight."""
        weight, half_life, now = (self._settings.usage_weight, self._settings.usage_half_life,
                                  self._clock())
        if weight <= 0 or not self.decayed:
            return Past({}, weight)
        cached = self._past
        if (cached is not None and cached[:2] == (weight, half_life)
                and 0 <= now - cached[2] < PAST_REFRESH):
            return cached[3]
        past = Past(usage_shares(self.decayed, now, half_life), weight)
        self._past = (weight, half_life, now, past)
        return past

    def _publish_decayed(self) -> None:
        now, half_life = self._clock(), self._settings.usage_half_life
        for owner in self._published_decayed - set(self.decayed):
            if owner == keys.DEFAULT_OWNER:
                metrics.OWNER_DECAYED_CPU.labels(owner).set(0)
            else:
                _remove(metrics.OWNER_DECAYED_CPU, owner)
        for owner, record in self.decayed.items():
            metrics.OWNER_DECAYED_CPU.labels(owner).set(
                decayed_to(record, now, half_life).cpu_seconds)
        self._published_decayed = set(self.decayed)

    def publish(self, usage: dict[str, Usage], totals: Usage) -> None:
        """Share, order and running tasks by owner, as this node sees the cluster; owners
        that hold nothing any more leave the gauges, except the default owner (its series
        always exists, from start-up: metrics.py), which reads 0. The order is published
        for owners with past usage too (an idle owner's order is what its next task gets)."""
        past = self.past()
        ordered = set(usage) | set(self.decayed)
        for owner in self._published - ordered:
            if owner == keys.DEFAULT_OWNER:
                metrics.OWNER_SHARE.labels(owner).set(0)
                metrics.OWNER_RUNNING.labels(owner).set(0)
                metrics.OWNER_ORDER.labels(owner).set(0)
                continue
            for gauge in (metrics.OWNER_SHARE, metrics.OWNER_RUNNING, metrics.OWNER_ORDER):
                _remove(gauge, owner)
        for owner in ordered:
            held = usage.get(owner, Usage())
            weight = self.weights.get(owner, DEFAULT_WEIGHT)
            metrics.OWNER_SHARE.labels(owner).set(share(held, totals, weight))
            metrics.OWNER_RUNNING.labels(owner).set(held.running)
            metrics.OWNER_ORDER.labels(owner).set(owner_order(
                held, totals, weight, past.shares.get(owner, 0.0), past.weight))
        self._published = ordered
        self._publish_decayed()


def _remove(gauge: Gauge, owner: str) -> None:
    """Drop owner's series (absent already is fine: it may never have been set)."""
    try:
        gauge.remove(owner)
    except KeyError:
        pass
