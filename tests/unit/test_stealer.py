"""The stealer against a real etcd: a batch won or lost whole, and pausing with reasons."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import capabilities, keys, metrics
from node.core.capabilities import Capabilities
from node.core.config import Config
from node.etcd import failpoints
from node.etcd.store import Store
from node.etcd.txn import Versioned
from node.operations.housekeeping import Housekeeping
from node.scheduling import ranking
from node.scheduling.node_state import NodeState, Registration
from node.scheduling.queue_view import mark_groups
from node.scheduling.stealer import Stealer
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


class Launched:
    """Stands in for the runner: records what the stealer launches."""

    def __init__(self) -> None:
        self.tasks: list[pb.Task] = []

    def launch(self, task: pb.Task) -> None:
        self.tasks.append(task)


async def _node(store: Store, name: str) -> tuple[Stealer, NodeState, Launched]:
    config = Config(name=name, cpus=4, memory=8 << 30)
    state = NodeState.for_config(config)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    launched = Launched()
    return Stealer(config=config, store=store, state=state, runner=launched), state, launched


async def _queued(store: Store, count: int) -> list[Versioned]:
    for _ in range(count):
        task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                       spec=pb.TaskSpec(command="true", cpu_millis=500, memory_bytes=1 << 20))
        task.submitted_at.GetCurrentTime()
        assert await store.transition(None, task) is not None
    return await store.get_tasks([keys.last_segment(key)
                                  for key in await store.list_ids(keys.QUEUED)])


async def test_two_stealers_race_for_a_batch_one_wins_the_other_counts_a_loss(
        store: Store) -> None:
    records = await _queued(store, 3)
    nodes = [await _node(store, name) for name in ("a", "b")]
    for _, state, _ in nodes:
        for record in records:
            state.capacity.reserve(record.task.spec)
    lost_before = metrics.STEALS_LOST._value.get()
    outcomes = await asyncio.gather(*(stealer._steal(records, state.registration)
                                      for stealer, state, _ in nodes if state.registration))
    assert sorted(outcomes) == [False, True]
    winner, loser = (nodes[0], nodes[1]) if outcomes[0] else (nodes[1], nodes[0])
    assert len(winner[2].tasks) == 3 and not loser[2].tasks
    assert metrics.STEALS_LOST._value.get() - lost_before == 3
    # The loser released its reservations; the winner keeps them for its attempts.
    assert loser[1].capacity.load() == 0
    assert winner[1].capacity.allocation().cpu_millis == 1500
    running = await store.get_tasks([record.task.id for record in records])
    assert winner[1].registration is not None
    assert {record.task.node_id for record in running} == {winner[1].registration.node_id}
    assert await store.count(keys.RUNNING) == 3 and await store.count(keys.QUEUED) == 0


async def test_a_pass_steals_what_fits_and_leaves_the_rest(store: Store) -> None:
    await _queued(store, 3)
    stealer, state, launched = await _node(store, "a")
    state.capacity.reserve(pb.TaskSpec(cpu_millis=3000))   # room for two of the three
    await stealer._relist()
    assert await stealer._pass()
    assert len(launched.tasks) == 2 and state.capacity.load() == 1.0
    assert await store.count(keys.QUEUED) == 1
    assert not await stealer._pass()      # full: nothing more is tried


async def test_shutdown_waits_for_a_steal_in_flight_to_launch_its_tasks(store: Store) -> None:
    """A steal held between its commit and its launch (stealer.after_commit) when shutdown
    begins: shutdown returns only once its tasks are launched, so the runner's drain,
    which comes next, sees them; and no further steal is sent."""
    await _queued(store, 2)
    stealer, state, launched = await _node(store, "a")
    stealer._batch = 1
    await stealer._relist()
    failpoints.configure("stealer.after_commit=1*sleep(1)")
    try:
        changed = state.capacity.subscribe()    # set by the steal's reservation
        steal = asyncio.create_task(stealer._pass())
        while not state.capacity.steals_in_flight:
            await changed.wait()
            changed.clear()
        await stealer.shutdown()
        assert len(launched.tasks) == 1
        assert await steal
        assert not await stealer._pass()
        assert len(launched.tasks) == 1 and await store.count(keys.QUEUED) == 1
    finally:
        failpoints.configure("")


async def test_a_shutdown_pause_survives_a_nospace_recovery(store: Store,
                                                            tmp_path: Path) -> None:
    stealer, state, _ = await _node(store, "a")
    stealer.pause("nospace")
    stealer.pause("shutdown")
    # Housekeeping reads the registration (defrag lock) and what runs (old logs) only.
    runner: Any = Launched()
    housekeeping = Housekeeping(config=Config(name="a", data_dir=str(tmp_path)), store=store,
                                state=state, runner=runner, stealer=stealer)
    housekeeping.paused_for_space = True
    await housekeeping.round()      # etcd has space: the NOSPACE reason goes
    assert not housekeeping.paused_for_space
    assert stealer.paused
    stealer.resume("shutdown")
    assert not stealer.paused


async def test_stealing_waits_for_every_reason_to_go(store: Store) -> None:
    await _queued(store, 1)
    stealer, _, launched = await _node(store, "a")
    stealer.pause("nospace")
    await stealer._relist()
    assert not await stealer._pass()
    stealer.resume("nospace")
    assert await stealer._pass() and len(launched.tasks) == 1


async def _queue(store: Store, *, priority: int = 0, owner: str = "default",
                 cpu_millis: int = 500) -> str:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true", cpu_millis=cpu_millis, memory_bytes=1 << 20,
                                    priority=priority, owner=owner))
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    return task.id


async def test_a_steal_fails_while_a_higher_priority_task_it_has_not_seen_waits(
        store: Store) -> None:
    low = await _queue(store)
    stealer, state, launched = await _node(store, "a")
    await stealer._relist()            # the view: complete up to now, the low task only
    high = await _queue(store, priority=10)     # no watch runs: this node has not seen it
    lost_before = metrics.STEALS_LOST._value.get()
    assert not await stealer._pass()
    # The priority compare failed: nothing moved, the loss is counted, room given back.
    assert metrics.STEALS_LOST._value.get() - lost_before == 1
    assert not launched.tasks and state.capacity.load() == 0
    assert await store.count(keys.QUEUED) == 2 and await store.count(keys.QUEUE) == 2
    await stealer._relist()            # now seen: the high one goes first
    assert await stealer._pass()
    assert [task.id for task in launched.tasks][:1] == [high]
    assert {task.id for task in launched.tasks} <= {high, low}


async def test_a_seen_higher_priority_task_that_does_not_fit_now_does_not_block(
        store: Store) -> None:
    await _queue(store, priority=10, cpu_millis=4000)
    low = await _queue(store)
    stealer, state, launched = await _node(store, "a")
    state.capacity.reserve(pb.TaskSpec(cpu_millis=1000))
    await stealer._relist()
    assert await stealer._pass()
    assert [task.id for task in launched.tasks] == [low]


async def test_a_relist_reads_a_bounded_range_per_group(store: Store,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.scheduling.queue_view.GROUP_READ", 2)
    first = await _queue(store, priority=5, owner="a")
    deep = [await _queue(store, owner="a") for _ in range(5)]
    other = await _queue(store, owner="b")
    stealer, _, _ = await _node(store, "a")
    read: list[tuple[bytes, bytes]] = []
    original = store._range

    async def recorded(start: bytes, end: bytes, **kwargs: Any) -> Any:
        read.append((start, end))
        return await original(start, end, **kwargs)
    monkeypatch.setattr(store, "_range", recorded)
    monkeypatch.setattr(store._id_ranges, "_read", recorded)
    await stealer._relist()
    assert {group: stealer._queue.ids(group) for group in stealer._queue.groups} == {
        (5, "a"): [first], (0, "a"): deep[:2], (0, "b"): [other]}
    assert stealer._queue.truncated == {(0, "a")}
    # The groups come from their marks, and no read spans more than one group: etcd 3.4
    # walks a whole range before it applies the limit.
    assert read[0] == (keys.GROUPS, keys.prefix_end(keys.GROUPS))
    queue_reads = [(start, end) for start, end in read if start.startswith(keys.QUEUE)]
    assert queue_reads and all(
        end <= keys.prefix_end(keys.queue_group(*keys.parse_queue(start + b"x")[:2]))
        for start, end in queue_reads)


async def test_a_group_found_empty_loses_its_mark_and_queueing_puts_it_back(
        store: Store) -> None:
    task_id = await _queue(store, owner="a")
    mark = keys.group_mark(0, "a")
    assert await store.list_ids(keys.GROUPS) == [mark]
    stealer, _, launched = await _node(store, "a")
    await stealer._relist()
    assert await stealer._pass() and [task.id for task in launched.tasks] == [task_id]
    await stealer._relist()            # the group is empty now: its mark goes
    assert await store.list_ids(keys.GROUPS) == []
    again = await _queue(store, owner="a")
    assert await store.list_ids(keys.GROUPS) == [mark]
    await stealer._relist()
    assert again in stealer._queue.ids((0, "a"))


async def test_marks_missing_after_an_upgrade_are_put_by_mark_groups(store: Store) -> None:
    await _queue(store, priority=3, owner="a")
    await _queue(store, owner="b")
    for mark in await store.list_ids(keys.GROUPS):     # as written by an older agent
        await store._client.delete(mark)
    stealer, _, _ = await _node(store, "a")
    await stealer._relist()
    assert not stealer._queue.groups
    assert await mark_groups(store) == 2
    assert await mark_groups(store) == 0                # nothing to put: no new revision
    await stealer._relist()
    assert set(stealer._queue.groups) == {(3, "a"), (0, "b")}


async def test_an_owner_holding_nothing_leaves_the_share_gauges_but_the_default_stays_at_0(
        store: Store) -> None:
    await _queue(store, owner="alice")
    await _queue(store)
    stealer, state, launched = await _node(store, "a")
    await stealer._relist()
    assert await stealer._pass() and len(launched.tasks) == 2

    def running(owner: str) -> float | None:
        return REGISTRY.get_sample_value("filch_owner_running_tasks", {"owner": owner})

    stealer._shares.publish(*stealer._cluster_usage())   # what each sweep does
    assert running("alice") == 1 and running(keys.DEFAULT_OWNER) == 1
    for task in launched.tasks:
        state.capacity.release(task.spec)
    stealer._shares.publish(*stealer._cluster_usage())
    assert running("alice") is None          # owner names come and go: no series piles up
    assert running(keys.DEFAULT_OWNER) == 0  # the dashboards' default series stays
    assert REGISTRY.get_sample_value("filch_owner_dominant_share",
                                     {"owner": keys.DEFAULT_OWNER}) == 0


async def _queue_spec(store: Store, **spec: Any) -> str:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true", cpu_millis=100, memory_bytes=1 << 20,
                                    **spec))
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    return task.id


async def _capable_node(store: Store, **values: str) -> tuple[Stealer, NodeState, Launched]:
    config = Config(name="a", cpus=4, memory=8 << 30, default_disk=16 << 20)
    node_capabilities = Capabilities(initial={capabilities.EXECUTOR: "runc", **values})
    state = NodeState.for_config(config, capabilities=node_capabilities,
                                 disk_capacity=100 << 20)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    launched = Launched()
    return Stealer(config=config, store=store, state=state, runner=launched), state, launched


async def test_a_node_steals_no_isolated_task_while_its_firewall_is_unverified(
        store: Store) -> None:
    isolated = await _queue_spec(store)
    unisolated = await _queue_spec(store, network="none")
    stealer, state, launched = await _capable_node(
        store, **{capabilities.NETWORK_ISOLATED: "false", capabilities.DISK_ENFORCED: "true"})
    await stealer._relist()
    assert await stealer._pass()
    assert [task.id for task in launched.tasks] == [unisolated]
    assert not await stealer._pass()
    # The one call the task network makes when its policy is back: the task is taken.
    state.capabilities.set(capabilities.NETWORK_ISOLATED, "true")
    assert stealer._queue.refill.is_set()
    await stealer._relist()
    assert await stealer._pass()
    assert [task.id for task in launched.tasks] == [unisolated, isolated]


async def test_disk_counts_like_cpu_and_memory(store: Store) -> None:
    first = await _queue_spec(store, disk_bytes=60 << 20, network="none")
    await _queue_spec(store, disk_bytes=60 << 20, network="none")     # 120Mi > 100Mi
    await _queue_spec(store, disk_bytes=200 << 20, network="none")    # never fits
    unsized = await _queue_spec(store, network="none")                # the default, 16Mi
    stealer, state, launched = await _capable_node(
        store, **{capabilities.NETWORK_ISOLATED: "true", capabilities.DISK_ENFORCED: "true"})
    await stealer._relist()
    for _ in range(5):      # bounded: one steal or more per pass, four tasks
        if not await stealer._pass():
            break
    assert sorted(task.id for task in launched.tasks) == sorted([first, unsized])
    assert state.capacity.allocation().disk_bytes == (60 + 16) << 20
    assert await store.count(keys.QUEUED) == 2


async def test_a_node_that_cannot_enforce_sizes_takes_no_disk_task(store: Store) -> None:
    await _queue_spec(store, disk_bytes=1 << 20, network="none")
    unsized = await _queue_spec(store, network="none")
    stealer, state, launched = await _capable_node(
        store, **{capabilities.NETWORK_ISOLATED: "true", capabilities.DISK_ENFORCED: "false"})
    await stealer._relist()
    for _ in range(5):      # bounded: one steal or more per pass, four tasks
        if not await stealer._pass():
            break
    assert [task.id for task in launched.tasks] == [unsized]
    # The default size is advisory here: not counted.
    assert state.capacity.allocation().disk_bytes == 0


async def test_a_task_taken_from_a_batch_in_flight_fails_alone_the_rest_is_stolen(
        store: Store) -> None:
    """Node a's batch of three is held at stealer.before_commit while node b steals the
    middle one: a still steals the other two (each task is its own nested transaction;
    a flat transaction lost all three), b keeps its one, and nothing runs twice."""
    records = await _queued(store, 3)
    (a, a_state, a_launched), (b, b_state, b_launched) = [await _node(store, name)
                                                          for name in ("a", "b")]
    for record in records:
        a_state.capacity.reserve(record.task.spec)
    b_state.capacity.reserve(records[1].task.spec)
    lost_before = metrics.STEALS_LOST._value.get()
    failpoints.configure("stealer.before_commit=1*sleep(0.5)")
    try:
        assert a_state.registration is not None and b_state.registration is not None
        held = asyncio.create_task(a._steal(records, a_state.registration))
        await asyncio.sleep(0.1)       # a sleeps in the failpoint (its first hit)
        assert await b._steal([records[1]], b_state.registration)
        assert await held
    finally:
        failpoints.configure("")
    assert [task.id for task in a_launched.tasks] == [records[0].task.id, records[2].task.id]
    assert [task.id for task in b_launched.tasks] == [records[1].task.id]
    assert metrics.STEALS_LOST._value.get() - lost_before == 1
    assert a_state.capacity.allocation().cpu_millis == 1000      # the lost one given back
    stolen = {record.task.id: record.task.node_id
              for record in await store.get_tasks([record.task.id for record in records])}
    assert stolen == {records[0].task.id: a_state.registration.node_id,
                      records[1].task.id: b_state.registration.node_id,
                      records[2].task.id: a_state.registration.node_id}
    assert await store.count(keys.RUNNING) == 3 and await store.count(keys.QUEUED) == 0
    # Both attempts' fencing tokens are their own transactions' revisions.
    assert (a_launched.tasks[0].fencing_token == a_launched.tasks[1].fencing_token
            != b_launched.tasks[0].fencing_token)


async def test_in_a_larger_fleet_a_node_hears_only_its_shards_and_takes_the_rest_late(
        store: Store) -> None:
    """Ten nodes: this one watches the shards it is in the chain of (WATCHERS of ten) and
    hears no queue event of the others; a task of another chain, nobody taking it, is
    found by the relist and taken after MAX_RANK steps."""
    stealer, state, launched = await _node(store, "me")
    assert state.registration is not None
    me = state.registration.node_id
    lease = await store.grant_lease(60)
    for index in range(9):
        await store.put_node(pb.Node(id=keys.new_node_id(), name=f"other-{index}",
                                     cpu_capacity_millis=4000, memory_capacity_bytes=8 << 30),
                             lease)
    heard: list[bytes] = []
    original = stealer._on_event

    async def counting(event: Any) -> None:
        heard.append(event.key)
        await original(event)

    stealer._on_event = counting  # type: ignore[method-assign]
    state.live.set()
    runner = asyncio.create_task(stealer.run())
    try:
        for _ in range(100):
            if len(stealer._slices.members) == 10 and stealer._ranges != [(0, keys.SHARD_COUNT)]:
                break
            await asyncio.sleep(0.05)
        mine: list[str] = []
        theirs: list[str] = []
        while len(mine) < 3 or len(theirs) < 3:
            task_id = await _queue(store, cpu_millis=10)
            (mine if stealer._slices.rank(me, task_id) == 0 else
             theirs if stealer._slices.rank(me, task_id) == ranking.MAX_RANK else []).append(
                task_id)
        for _ in range(100):
            if {*mine, *theirs} <= {task.id for task in launched.tasks}:
                break
            await asyncio.sleep(0.1)
            stealer._queue.refill.set()       # the sweep's relist, sooner
        heard_ids = {keys.parse_shard_queue(key)[2] for key in heard}
        assert set(mine) <= heard_ids and not heard_ids & set(theirs)
        assert {task.id: task.attempt for task in launched.tasks if task.id in theirs} == {
            task_id: 1 for task_id in theirs}
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
