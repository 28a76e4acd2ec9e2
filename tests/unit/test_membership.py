"""Membership against a real etcd: registration, the node record, and the self-fence
deadline when renewals stop getting through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import capabilities
from node.core.capabilities import Capabilities
from node.core.config import Config
from node.etcd.store import Store
from node.running.membership import PUBLISH_DEBOUNCE, Membership
from node.scheduling.node_state import NodeState
from tests.unit.etcd_fixture import etcdctl, require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

TTL = 2


class Fences:
    """Stands in for the runner: records when it is fenced, and what the node looked like."""

    def __init__(self, state: NodeState) -> None:
        self._state = state
        self.at: list[float] = []
        self.live_then: list[bool] = []
        self.fenced = asyncio.Event()

    async def fence(self) -> None:
        self.at.append(time.monotonic())
        self.live_then.append(self._state.live.is_set() or self._state.registration is not None)
        self.fenced.set()


class Deadlines:
    """Stands in for the watchdog: records every fence deadline it is armed with."""

    def __init__(self) -> None:
        self.armed: list[float] = []

    async def arm(self, deadline: float) -> None:
        self.armed.append(deadline)

    def disarm(self) -> None:
        self.armed.append(0.0)


class Unrenewable(Store):
    """A store whose lease renewals never get an answer (a partition, a stuck leader).
    Records when each lease was asked for: etcd cannot expire it before that + its TTL."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint=endpoint)
        self.asked: list[float] = []

    async def grant_lease(self, ttl: int) -> int:
        self.asked.append(time.monotonic())
        return await super().grant_lease(ttl)

    async def keep_alive(self, lease_id: int) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.fixture
async def unrenewable(etcd: str) -> AsyncIterator[Unrenewable]:
    etcdctl(etcd, "del", "", "--prefix")
    opened = Unrenewable(endpoint=etcd)
    try:
        yield opened
    finally:
        await opened.close()


async def _running(membership: Membership) -> asyncio.Task[object]:
    task: asyncio.Task[object] = asyncio.create_task(membership.run())
    await asyncio.wait_for(membership.live.wait(), timeout=10)
    return task


async def _stop(task: asyncio.Task[object]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_blocked_renewals_fence_before_ttl_minus_margin(unrenewable: Unrenewable) -> None:
    config = Config(name="n", lease_ttl=TTL)
    state = NodeState.for_config(config)
    fences, deadlines = Fences(state), Deadlines()
    watchdog: Any = deadlines
    membership = Membership(config=config, store=unrenewable, state=state,
                            executor_name="process", runner=fences, watchdog=watchdog)
    task = await _running(membership)
    first = state.registration
    try:
        await asyncio.wait_for(fences.fenced.wait(), timeout=TTL + 2)
        # Not before the deadline it announced (TTL - margin from the renewal sent before
        # registering)...
        assert fences.at[0] >= deadlines.armed[0] > 0
        # ...and before etcd could expire the lease: no other node can have taken its
        # tasks yet.
        assert fences.at[0] < unrenewable.asked[0] + TTL
        assert fences.live_then == [False]      # stealing stopped before the kill
        # It registers again, as a new node.
        await asyncio.wait_for(membership.live.wait(), timeout=10)
        assert state.registration is not None and state.registration != first
    finally:
        await _stop(task)
    await membership.shutdown()
    await membership.shutdown()     # idempotent
    assert state.registration is None and not await unrenewable.list_nodes()


async def test_the_node_record_follows_the_capacity_ledger(store: Store) -> None:
    config = Config(name="n", lease_ttl=TTL, cpus=2, memory=1 << 30)
    state = NodeState.for_config(config)
    membership = Membership(config=config, store=store, state=state,
                            executor_name="process", runner=Fences(state))
    task = await _running(membership)
    try:
        state.capacity.reserve(pb.TaskSpec(cpu_millis=1500, memory_bytes=1 << 20,
                                           owner="alice"))
        for _ in range(100):     # published within PUBLISH_DEBOUNCE
            if [node for node in await store.list_nodes() if node.cpu_allocated_millis == 1500]:
                break
            await asyncio.sleep(0.05)
        [node] = await store.list_nodes()
        assert state.registration is not None and node.id == state.registration.node_id
        assert node.memory_allocated_bytes == 1 << 20
        # What each owner holds, for every stealer's fair share.
        assert dict(node.owners) == {"alice": pb.OwnerUsage(
            cpu_millis=1500, memory_bytes=1 << 20, running=1)}
    finally:
        await _stop(task)
        await membership.shutdown()


class CountingStore(Store):
    """Counts the node-record writes (every node watches them: each costs the cluster)."""

    puts = 0

    async def put_node(self, node: pb.Node, lease_id: int) -> None:
        self.puts += 1
        await super().put_node(node, lease_id)


async def test_the_node_record_is_rewritten_only_when_a_capability_changes(
        etcd: str) -> None:
    etcdctl(etcd, "del", "", "--prefix")
    store = CountingStore(endpoint=etcd)
    config = Config(name="n", lease_ttl=TTL)
    node_capabilities = Capabilities(initial={capabilities.NETWORK_ISOLATED: "true"})
    state = NodeState.for_config(config, capabilities=node_capabilities,
                                 disk_capacity=5 << 30)
    membership = Membership(config=config, store=store, state=state,
                            executor_name="runc", runner=Fences(state))
    task = await _running(membership)
    try:
        # Registration may be followed by one more write (the node's addresses, read once
        # registered): wait until the writes settle before counting.
        registered = -1
        while registered != store.puts:
            registered = store.puts
            await asyncio.sleep(PUBLISH_DEBOUNCE * 3)
        node_capabilities.set(capabilities.NETWORK_ISOLATED, "true")     # no change
        await asyncio.sleep(PUBLISH_DEBOUNCE * 3)
        assert store.puts == registered
        node_capabilities.set(capabilities.NETWORK_ISOLATED, "false")
        for _ in range(100):     # published within PUBLISH_DEBOUNCE
            [node] = await store.list_nodes()
            if node.capabilities[capabilities.NETWORK_ISOLATED] == "false":
                break
            await asyncio.sleep(0.05)
        assert node.capabilities[capabilities.NETWORK_ISOLATED] == "false"
        assert node.disk_capacity_bytes == 5 << 30
        assert store.puts == registered + 1
    finally:
        await _stop(task)
        await membership.shutdown()
        await store.close()
