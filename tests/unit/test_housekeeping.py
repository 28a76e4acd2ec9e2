"""Housekeeping against a real etcd: a failing task firewall step skips nothing else; two
nodes never defragment their members at once, and the lock of a node that died inside does
not block the others."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import array_pages, keys, lifecycle
from node.core.config import Config
from node.core.errors import ExecutorError
from node.etcd.store import Store
from node.etcd.txn import Move
from node.operations import housekeeping as housekeeping_module
from node.operations.housekeeping import COMPACTION_LOCK, Housekeeping
from node.scheduling.node_state import NodeState, Registration
from node.scheduling.stealer import Stealer
from tests.unit.etcd_fixture import etcdctl, require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


class NothingRuns:
    """Stands in for the runner: housekeeping asks it which logs are in use."""

    def runs(self, task_id: str) -> bool:
        return False

    def launch(self, task: pb.Task) -> None:
        raise AssertionError("housekeeping launches nothing")


async def _finished_task(store: Store) -> str:
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="true", cpu_millis=100, memory_bytes=1 << 20))
    assert await store.transition(None, task) is not None
    [old] = await store.get_tasks([task.id])
    done = lifecycle.finished(old.task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, exit_code=0)
    assert await store.transition(old, done) is not None
    return task.id


async def test_a_failing_firewall_step_skips_nothing_else(store: Store, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    async def firewall(addresses: list[str]) -> None:
        calls.append(addresses)
        raise ExecutorError("nft -f - failed: Error: No such file or directory")

    config = Config(name="a", data_dir=str(tmp_path), retention=0.0, compaction_interval=0.0,
                    compaction_keep=0)
    state = NodeState.for_config(config)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    runner: Any = NothingRuns()
    stealer = Stealer(config=config, store=store, state=state, runner=runner)
    housekeeping = Housekeeping(config=config, store=store, state=state, runner=runner,
                                stealer=stealer, firewall=firewall)
    task_id = await _finished_task(store)
    await asyncio.sleep(0.01)   # finished strictly before the retention cutoff
    errors = REGISTRY.get_sample_value("filch_task_firewall_errors_total") or 0.0
    compactions = REGISTRY.get_sample_value("filch_etcd_compactions_total") or 0.0

    await housekeeping.round()

    assert calls, "the firewall step did not run"
    # Retention and compaction ran all the same; the failure is counted.
    assert await store.get_tasks([task_id]) == []
    assert await store.count(keys.COMPLETE) == 0
    assert REGISTRY.get_sample_value("filch_etcd_compactions_total") == compactions + 1
    assert REGISTRY.get_sample_value("filch_task_firewall_errors_total") == errors + 1


class HeldDefragment(Store):
    """One node's connection whose defragment call, when held, waits for the test's release
    once it has begun: the node is kept inside its critical section, under the lock, for
    as long as the test needs (no sleeps)."""

    def __init__(self, *, endpoint: str, held: bool) -> None:
        super().__init__(endpoint=endpoint)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        if not held:
            self.release.set()
        self.defragmented = 0

    async def defragment(self) -> None:
        self.entered.set()
        await self.release.wait()
        await super().defragment()
        self.defragmented += 1


class NoStealing:
    """Stands in for the stealer: defragmentation never pauses it."""

    def pause(self, reason: str) -> None:
        raise AssertionError("defragmentation pauses no stealing")

    def resume(self, reason: str) -> None:
        raise AssertionError("defragmentation resumes no stealing")


@contextlib.asynccontextmanager
async def _node(etcd: str, store: Store, tmp_path: Path, name: str, *,
                held: bool) -> AsyncIterator[tuple[Housekeeping, HeldDefragment, Registration]]:
    """A registered node's housekeeping, on its own connection to the (shared) etcd."""
    connection = HeldDefragment(endpoint=etcd, held=held)
    config = Config(name=name, data_dir=str(tmp_path / name))
    state = NodeState.for_config(config)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    try:
        yield (Housekeeping(config=config, store=connection, state=state,
                            runner=NothingRuns(), stealer=NoStealing()),
               connection, state.registration)
    finally:
        connection.release.set()
        await connection.close()


def _lock_holder(etcd: str) -> str:
    return etcdctl(etcd, "get", keys.DEFRAG_LOCK.decode(), "--print-value-only").strip()


async def test_two_nodes_never_defragment_at_once(etcd: str, store: Store,
                                                  tmp_path: Path) -> None:
    async with _node(etcd, store, tmp_path, "a", held=True) as (first, first_etcd, first_node), \
            _node(etcd, store, tmp_path, "b", held=False) as (second, second_etcd, _):
        defrags = REGISTRY.get_sample_value("filch_etcd_defrags_total") or 0.0
        holding = asyncio.create_task(first.defragment())
        await first_etcd.entered.wait()
        assert _lock_holder(etcd) == first_node.node_id

        # The second node skips its defragmentation while the first is inside its own.
        assert await second.defragment() is False
        assert not second_etcd.entered.is_set()

        first_etcd.release.set()
        assert await holding is True
        assert _lock_holder(etcd) == ""          # released when done
        assert REGISTRY.get_sample_value("filch_etcd_defrags_total") == defrags + 1
        # With the lock free, the second node's next round defragments.
        assert await second.defragment() is True
        assert (first_etcd.defragmented, second_etcd.defragmented) == (1, 1)


async def test_a_lock_whose_holder_died_does_not_block_the_next_defragmentation(
        etcd: str, store: Store, tmp_path: Path) -> None:
    """The first node takes the lock and dies inside (its process hangs, never to unlock;
    its lease is revoked, as etcd does once the lease's TTL runs out): the lock goes with
    the lease, and the second node defragments."""
    async with _node(etcd, store, tmp_path, "a", held=True) as (first, first_etcd, first_node), \
            _node(etcd, store, tmp_path, "b", held=False) as (second, second_etcd, _):
        dead = asyncio.create_task(first.defragment())
        await first_etcd.entered.wait()
        assert _lock_holder(etcd) == first_node.node_id
        await store.revoke_lease(first_node.lease_id)

        assert await second.defragment() is True
        assert second_etcd.defragmented == 1
        dead.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dead


class CountingReads(Store):
    """A connection that counts the reads housekeeping's array check sends."""

    def __init__(self, *, endpoint: str) -> None:
        super().__init__(endpoint=endpoint)
        self.ranges = 0
        self.records_asked = 0

    async def list_page(self, start: bytes, end: bytes, *, limit: int) -> Any:
        self.ranges += 1
        return await super().list_page(start, end, limit=limit)

    async def get_tasks(self, task_ids: Any) -> Any:
        self.records_asked += len(task_ids)
        return await super().get_tasks(task_ids)


def test_an_array_position_is_read_back_from_its_member_id() -> None:
    array_id = keys.new_task_id()
    for position in (0, 1, 31, 32, 4095, 4096, 99_999, (1 << keys.ARRAY_POSITION_BITS) - 1):
        assert array_pages.member_position(keys.array_task_id(array_id, position)) \
            == position


async def test_the_array_check_reads_a_bounded_number_of_keys_not_every_member(
        etcd: str, store: Store, tmp_path: Path) -> None:
    """An array of 100,000 whose only task left is the last: found in a few keys-only
    ranges (not 100,000 record reads); once it is gone the array record goes too."""
    array_id = keys.new_task_id()
    last = pb.Task(id=keys.array_task_id(array_id, 99_999), state=pb.TASK_STATE_PENDING,
                   array_id=array_id, spec=pb.TaskSpec(command="true"))
    # Another task of the array's millisecond, inside its id interval: not a member.
    stranger = pb.Task(id=keys.array_task_id(keys.new_task_id(), 50_000),
                       state=pb.TASK_STATE_PENDING, spec=pb.TaskSpec(command="true"))
    stranger.id = last.id[:13] + stranger.id[13:]
    assert await store.transition_many([Move(None, last), Move(None, stranger)]) is not None
    assert await store.create_array(pb.Array(id=array_id, count=100_000))
    connection = CountingReads(endpoint=etcd)
    config = Config(name="a", data_dir=str(tmp_path))
    state = NodeState.for_config(config)
    keeper = Housekeeping(config=config, store=connection, state=state, runner=NothingRuns(),
                          stealer=NoStealing())
    try:
        await keeper.apply_retention()
        assert await store.get_array(array_id) is not None       # its last task is left
        assert connection.records_asked == 0
        assert connection.ranges <= 100_000 // housekeeping_module.ARRAY_WINDOW + 3
        # The next round starts where that one found a task: one range.
        connection.ranges = 0
        await keeper.apply_retention()
        assert connection.ranges == 1
        [found] = await store.get_tasks([last.id])
        await store.delete_tasks([found])
        await keeper.apply_retention()
        assert await store.get_array(array_id) is None
        assert await store.get_tasks([stranger.id])               # not touched
    finally:
        await connection.close()


async def test_one_node_at_a_time_compacts(store: Store, tmp_path: Path) -> None:
    """A compaction walks every key revision written since the last one (tens of seconds
    of etcd's time at a million tasks): the node holding /lock/compaction compacts, the
    others skip their turn, and a NOSPACE recovery compacts whoever it is."""

    async def firewall(addresses: list[str]) -> None:
        pass

    nodes = []
    for name in ("a", "b"):
        config = Config(name=name, data_dir=str(tmp_path / name), compaction_keep=0)
        state = NodeState.for_config(config)
        state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
        runner: Any = NothingRuns()
        nodes.append((state, Housekeeping(
            config=config, store=store, state=state, runner=runner,
            stealer=Stealer(config=config, store=store, state=state, runner=runner),
            firewall=firewall)))
    before = REGISTRY.get_sample_value("filch_etcd_compactions_total") or 0.0
    await _finished_task(store)
    await nodes[0][1].compact(0)
    await _finished_task(store)
    await nodes[1][1].compact(0)                # not the holder: skips
    assert REGISTRY.get_sample_value("filch_etcd_compactions_total") == before + 1
    assert await store.lock_holder(COMPACTION_LOCK) == nodes[0][0].registration.node_id
    await nodes[1][1].compact(0, urgent=True)   # NOSPACE: compacts all the same
    assert REGISTRY.get_sample_value("filch_etcd_compactions_total") == before + 2
