"""The counts chore against a real etcd: one node counts for the cluster, the others read
one key; the holder's death hands the chore on; admission trusts the published counts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, validation
from node.core.config import Config
from node.core.errors import Overloaded
from node.etcd.store import Store
from node.etcd.txn import Move
from node.faces.service import TaskService
from node.operations.counts import COUNTS_BUDGET, COUNTS_LOCK, STALE_ROUNDS, CountsChore
from node.scheduling.admission import PendingLimit
from node.scheduling.conditions import DependencyCheck
from node.scheduling.node_state import NodeState, Registration
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

# The chore's round in these tests: published counts go stale in STALE_ROUNDS of them.
INTERVAL = 0.05


class CountingStore(Store):
    """A connection that counts the count-only ranges it sends (each one a walk of the
    range in etcd's index)."""

    def __init__(self, *, endpoint: str) -> None:
        super().__init__(endpoint=endpoint)
        self.counts = 0

    async def _range(self, start: bytes, end: bytes, **options: Any) -> Any:
        self.counts += bool(options.get("count_only"))
        return await super()._range(start, end, **options)


async def _queue(store: Store, how_many: int) -> None:
    tasks = [pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true")) for _ in range(how_many)]
    assert await store.transition_many([Move(None, task) for task in tasks]) is not None


async def test_one_node_counts_the_others_read_and_the_chore_moves_when_it_dies(
        etcd: str, store: Store) -> None:
    await _queue(store, 3)
    connections = [CountingStore(endpoint=etcd) for _ in range(3)]
    leases = [await store.grant_lease(60) for _ in range(3)]
    chores = []
    for connection, lease in zip(connections, leases, strict=True):
        state = NodeState.for_config(Config(name="n"))
        state.registration = Registration(keys.new_node_id(), lease)
        chores.append(CountsChore(store=connection, state=state, interval=INTERVAL))
    try:
        for _ in range(3):                  # three rounds on every node
            for chore in chores:
                counts = await chore.round()
                assert counts is not None and counts.queued == 3 and counts.pending == 3
        assert [chore.holding for chore in chores] == [True, False, False]
        # Only the holder ever counted: 5 states a round; the others read one key.
        assert [connection.counts for connection in connections] == [15, 0, 0]
        assert REGISTRY.get_sample_value("filch_queue_depth") == 3
        assert REGISTRY.get_sample_value("filch_tasks", {"state": "pending"}) == 3
        # The holder dies: its lease goes, with the lock; once the published counts are
        # stale (STALE_ROUNDS rounds), one of the others takes over.
        await store.revoke_lease(leases[0])
        await _queue(store, 2)
        for _ in range(100):                    # 5 s at most
            await asyncio.sleep(INTERVAL)
            for chore in chores[1:]:
                await chore.round()
            if any(chore.holding for chore in chores[1:]):
                break
        assert [chore.holding for chore in chores[1:]] == [True, False]
        counts = await chores[2].round()
        assert counts is not None and counts.queued == 5
        assert connections[2].counts == 0
        assert await store.lock_holder(COUNTS_LOCK) is not None
    finally:
        for connection in connections:
            await connection.close()


async def test_admission_reads_the_published_count_plus_its_own_admissions(
        etcd: str, store: Store) -> None:
    await _queue(store, 2)
    state = NodeState.for_config(Config(name="n"))
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    await CountsChore(store=store, state=state).round()
    connection = CountingStore(endpoint=etcd)
    try:
        now = [0.0]
        limit = PendingLimit(store=connection, limit=4, ttl=1.0, clock=lambda: now[0])
        async with limit.admit() as created:
            created()           # the 3rd, not in the published count
        now[0] += 1.0           # the count is read again: still the published 2, plus ours
        async with limit.admit() as created:
            created()
        now[0] += 1.0
        with pytest.raises(Exception, match="cluster has 4 pending tasks"):
            async with limit.admit():
                pass
        assert connection.counts == 0       # never counted itself: one get each time
    finally:
        await connection.close()


async def test_a_flood_at_one_node_stops_exactly_at_the_limit_with_published_counts(
        store: Store) -> None:
    """Writes the published count already holds (by revision) are not added twice; the
    ones after it are: the limit is exact at one node, as when it counted itself."""
    state = NodeState.for_config(Config(name="n"))
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    chore = CountsChore(store=store, state=state)
    service = TaskService(store=store, check=DependencyCheck(store=store), max_pending=4)
    service.admission.pending._ttl = 0.0        # read the published count at every submit
    admitted = 0
    for _ in range(6):
        await chore.round()                     # a count between every two submits
        try:
            await service.submit(validation.spec(pb.TaskSpec(command="true")))
            admitted += 1
        except Overloaded as refused:
            assert "cluster has 4 pending tasks (limit 4" in str(refused)
    assert admitted == 4
    assert await store.count(keys.QUEUED) == 4


async def test_dear_counts_are_spaced_out_and_others_wait_longer_before_taking_over(
        etcd: str, store: Store) -> None:
    """At a million tasks a count costs etcd ~0.3 s: the holder counts at most
    COUNTS_BUDGET of the time (up to COUNTS_MAX_INTERVAL apart) and publishes its spacing,
    so the other nodes do not judge its counts stale and start counting too."""
    await _queue(store, 1)
    holder_connection = CountingStore(endpoint=etcd)
    original = holder_connection.count_tasks

    async def slow_count(holder: str, every: float = 0.0) -> Any:
        await asyncio.sleep(0.2)            # as a count of a deep queue would take
        return await original(holder, every)
    holder_connection.count_tasks = slow_count  # type: ignore[method-assign]
    states = []
    for _ in range(2):
        state = NodeState.for_config(Config(name="n"))
        state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
        states.append(state)
    holder = CountsChore(store=holder_connection, state=states[0], interval=INTERVAL)
    other = CountsChore(store=store, state=states[1], interval=INTERVAL)
    try:
        await holder.round()
        assert holder.holding and holder.every == pytest.approx(0.2 / COUNTS_BUDGET, rel=0.3)
        published = await holder.round()
        assert published is not None and published.every == pytest.approx(holder.every, rel=0.3)
        # Well past STALE_ROUNDS of the reader's own interval, within the holder's spacing:
        # the reader does not take over.
        await asyncio.sleep(STALE_ROUNDS * INTERVAL * 2)
        await other.round()
        assert not other.holding
    finally:
        await holder_connection.close()
