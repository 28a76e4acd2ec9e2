"""Metering for fair share over time against a real etcd: a node adds what its attempts
held (core-seconds, GiB-seconds) to the owner's decayed record, two nodes flushing one owner
at once both count (compare-and-put), what etcd refused is kept for the next flush, and the
owners listing shows decayed usage, usage share and order."""

from __future__ import annotations

import asyncio
import time

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.errors import StoreUnavailable
from node.etcd import usage_records
from node.etcd.cluster_settings import ClusterSettingsView
from node.etcd.store import Store, WatchEvent
from node.running.usage import UsageMeter
from node.scheduling.capacity import Capacity
from node.scheduling.fairshare import Usage
from node.scheduling.node_state import NodeState
from node.scheduling.shares import Shares
from tests.unit.etcd_fixture import require_etcd
from tests.unit.test_owners import Context, _servicer

require_etcd()

pytestmark = pytest.mark.timeout(60)

GIB = 1 << 30
HOUR = 3600.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _meter(store: Store, clock: Clock, wall: Clock,
           settings: ClusterSettingsView | None = None) -> tuple[UsageMeter, Capacity]:
    state = NodeState(Capacity(cpu_millis=8000, memory_bytes=16 * GIB))
    meter = UsageMeter(store=store, state=state, settings=settings or ClusterSettingsView(),
                       clock=wall, monotonic=clock)
    return meter, state.capacity


def _spec(owner: str, cpu_millis: int, memory_bytes: int) -> pb.TaskSpec:
    return pb.TaskSpec(command="x", owner=owner, cpu_millis=cpu_millis, memory_bytes=memory_bytes)


async def test_what_attempts_held_is_added_per_owner_in_core_and_gib_seconds(
        store: Store) -> None:
    clock, wall = Clock(100.0), Clock(1_000_000.0)
    meter, capacity = _meter(store, clock, wall)
    capacity.reserve(_spec("alice", 2000, 4 * GIB))
    meter.accrue()
    clock.now += 10
    capacity.reserve(_spec("bob", 500, GIB))
    meter.accrue()
    clock.now += 20
    capacity.release(_spec("alice", 2000, 4 * GIB))
    meter.accrue()
    clock.now += 100                          # nothing of alice's runs any more
    meter.accrue()
    await meter.flush()
    assert meter.pending == {}
    alice = (await usage_records.get_usage(store, "alice")).usage
    bob = (await usage_records.get_usage(store, "bob")).usage
    assert (alice.cpu_seconds, alice.memory_gib_seconds) == pytest.approx((60.0, 120.0))
    assert (bob.cpu_seconds, bob.memory_gib_seconds) == pytest.approx((60.0, 120.0))
    assert alice.updated_at.ToNanoseconds() == int(wall.now * 1e9)
    # Nothing accrued: the next flush writes nothing.
    revision = (await usage_records.get_usage(store, "alice")).mod_revision
    await meter.flush()
    assert (await usage_records.get_usage(store, "alice")).mod_revision == revision


async def test_the_stored_usage_decays_by_the_cluster_half_life_before_the_addition(
        store: Store) -> None:
    old = pb.DecayedUsage(cpu_seconds=1000, memory_gib_seconds=10)
    old.updated_at.FromNanoseconds(int(500_000.0 * 1e9))
    await usage_records.put_usage(store, "alice", old, 0)
    settings = ClusterSettingsView()
    settings.current = pb.ClusterSettings(usage_half_life_seconds=HOUR)
    clock, wall = Clock(0.0), Clock(500_000.0 + 2 * HOUR)
    meter, capacity = _meter(store, clock, wall, settings)
    capacity.reserve(_spec("alice", 1000, GIB))
    meter.accrue()
    clock.now += 5
    meter.accrue()
    await meter.flush()
    alice = (await usage_records.get_usage(store, "alice")).usage
    assert (alice.cpu_seconds, alice.memory_gib_seconds) == pytest.approx((255.0, 7.5))


async def test_two_nodes_flushing_one_owner_at_once_both_count(store: Store) -> None:
    meters = []
    for _ in range(4):
        clock = Clock(0.0)
        meter, capacity = _meter(store, clock, Clock(time.time()))
        capacity.reserve(_spec("alice", 1000, GIB))
        meter.accrue()
        clock.now += 7
        meter.accrue()
        meters.append(meter)
    await asyncio.gather(*(meter.flush() for meter in meters))
    alice = (await usage_records.get_usage(store, "alice")).usage
    assert alice.cpu_seconds == pytest.approx(28.0, rel=1e-6)


async def test_usage_etcd_refused_is_kept_for_the_next_flush(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(0.0)
    meter, capacity = _meter(store, clock, Clock(time.time()))
    capacity.reserve(_spec("alice", 1000, GIB))
    meter.accrue()
    clock.now += 10
    meter.accrue()

    async def down(*args: object) -> bool:
        raise StoreUnavailable("etcd is away")
    with monkeypatch.context() as patched:
        patched.setattr(usage_records, "put_usage", down)
        with pytest.raises(StoreUnavailable):
            await meter.flush()
    clock.now += 5
    meter.accrue()
    await meter.flush()
    alice = (await usage_records.get_usage(store, "alice")).usage
    assert alice.cpu_seconds == pytest.approx(15.0)


async def test_owners_list_and_stealer_view_show_decayed_usage_share_and_order(
        store: Store) -> None:
    now = time.time()
    for owner, cpu in (("burst", 3000.0), ("steady", 1000.0)):
        record = pb.DecayedUsage(cpu_seconds=cpu, memory_gib_seconds=cpu / 10)
        record.updated_at.FromNanoseconds(int(now * 1e9))
        await usage_records.put_usage(store, owner, record, 0)
    await store.put_owner(pb.Owner(name="steady", weight=2.0))
    response = await _servicer(store).ListOwners(pb.ListOwnersRequest(), Context())
    owners = {owner.name: owner for owner in response.owners}
    assert set(owners) == {"burst", "steady"}
    assert owners["burst"].decayed.cpu_seconds == pytest.approx(3000.0, rel=1e-3)
    assert owners["burst"].usage_share == pytest.approx(0.75, rel=1e-3)
    # Default usage-weight 0.5, nothing running now: order = 0.5 * usage share / weight.
    assert owners["burst"].order == pytest.approx(0.375, rel=1e-3)
    assert owners["steady"].order == pytest.approx(0.0625, rel=1e-3)
    # The stealer's view of the same records (watched), and its gauges.
    shares = Shares()
    await shares.relist_usage(store)
    assert shares.past().shares == pytest.approx({"burst": 0.75, "steady": 0.25}, rel=1e-3)
    assert metrics.OWNER_DECAYED_CPU.labels("burst")._value.get() == pytest.approx(3000.0,
                                                                                  rel=1e-3)
    shares.publish({}, Usage(8000, 16 * GIB))
    assert metrics.OWNER_ORDER.labels("burst")._value.get() == pytest.approx(0.375, rel=1e-3)
    # A record deleted (by an operator, etcdctl del) leaves the view and the gauges.
    await shares.on_usage_event(WatchEvent(deleted=True, key=keys.decayed_usage("burst"),
                                           value=b"", revision=1))
    assert set(shares.past().shares) == {"steady"}
    assert ("burst",) not in metrics.OWNER_DECAYED_CPU._metrics


async def test_the_loop_flushes_on_its_period_and_shutdown_writes_the_rest(
        store: Store) -> None:
    state = NodeState(Capacity(cpu_millis=8000, memory_bytes=16 * GIB))
    meter = UsageMeter(store=store, state=state, settings=ClusterSettingsView(),
                       flush_every=0.2)
    state.capacity.reserve(_spec("alice", 4000, GIB))
    loop = asyncio.create_task(meter.run())
    try:
        for _ in range(100):
            if (await usage_records.get_usage(store, "alice")).mod_revision:
                break
            await asyncio.sleep(0.05)
        flushed = (await usage_records.get_usage(store, "alice")).usage.cpu_seconds
        assert flushed > 0
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    await asyncio.sleep(0.1)        # held, and not flushed yet: shutdown writes it
    await meter.shutdown()
    assert (await usage_records.get_usage(store, "alice")).usage.cpu_seconds >= flushed + 0.4
    # On no lease: an owner's past outlives the node that ran its tasks.
    response = await store._range(keys.decayed_usage("alice"), b"")
    assert response.kvs[0].lease == 0


async def test_records_decayed_to_almost_nothing_are_pruned_and_others_kept(
        store: Store) -> None:
    settings = ClusterSettingsView()
    settings.current = pb.ClusterSettings(usage_half_life_seconds=HOUR)
    for owner, cpu in (("long-ago", 1000.0), ("lately", 5000.0)):
        record = pb.DecayedUsage(cpu_seconds=cpu, memory_gib_seconds=1.0)
        record.updated_at.FromNanoseconds(0)
        await usage_records.put_usage(store, owner, record, 0)
    # 12 half-lives later: 1000 -> 0.24 (pruned), 5000 -> 1.2 (kept).
    meter, _ = _meter(store, Clock(0.0), Clock(12 * HOUR), settings)
    assert await meter.prune() == 1
    assert set(await usage_records.list_usage(store)) == {"lately"}
    # A record another node wrote after the read is not deleted (compare).
    stale = (await usage_records.get_usage(store, "lately")).mod_revision
    await usage_records.put_usage(store, "lately", pb.DecayedUsage(cpu_seconds=9), stale)
    assert not await usage_records.delete_usage(store, "lately", stale)
