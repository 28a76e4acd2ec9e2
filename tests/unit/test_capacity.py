"""The capacity ledger: reserve/release/fits/load, and the events it sets on a change."""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import capabilities
from node.core.capabilities import Capabilities
from node.scheduling.capacity import Allocation, Capacity
from node.scheduling.fairshare import Usage


def _spec(cpu_millis: int, memory_bytes: int, network: str = "") -> pb.TaskSpec:
    return pb.TaskSpec(command="true", cpu_millis=cpu_millis, memory_bytes=memory_bytes,
                       network=network)


def test_reserve_and_release_move_load_and_what_fits() -> None:
    capacity = Capacity(cpu_millis=2000, memory_bytes=1000)
    big = _spec(1500, 100)
    assert capacity.fits_free(big) and capacity.load() == 0
    capacity.reserve(big)
    assert capacity.load() == 0.75      # the larger of CPU (0.75) and memory (0.1)
    assert not capacity.fits_free(_spec(600, 1))
    assert capacity.fits_free(_spec(500, 900))
    capacity.release(big)
    assert capacity.load() == 0 and capacity.fits_free(_spec(2000, 1000))


def test_fits_ever_is_capacity_and_host_network_permission() -> None:
    capacity = Capacity(cpu_millis=2000, memory_bytes=1000)
    capacity.reserve(_spec(2000, 1000))
    assert capacity.fits_ever(_spec(2000, 1000))        # full now, not forever
    assert not capacity.fits_ever(_spec(2001, 1))
    assert not capacity.fits_ever(_spec(1, 1, network="host"))
    allowing = Capacity(cpu_millis=2000, memory_bytes=1000, allow_host_network=True)
    assert allowing.fits_ever(_spec(1, 1, network="host"))


def test_allocation_counts_running_attempts_until_they_end() -> None:
    capacity = Capacity(cpu_millis=2000, memory_bytes=1000)
    spec = _spec(500, 200)
    capacity.reserve(spec)
    capacity.started()
    assert capacity.allocation() == Allocation(500, 200, 1)
    capacity.ended(spec)
    assert capacity.allocation() == Allocation(0, 0, 0)


def test_every_change_sets_every_subscriber() -> None:
    capacity = Capacity(cpu_millis=2000, memory_bytes=1000)
    first, second = capacity.subscribe(), capacity.subscribe()
    capacity.reserve(_spec(1, 1))
    assert first.is_set() and second.is_set()
    first.clear()
    second.clear()
    capacity.release(_spec(1, 1))
    assert first.is_set() and second.is_set()


def test_stealing_is_counted_while_held() -> None:
    capacity = Capacity(cpu_millis=2000, memory_bytes=1000)
    assert not capacity.steals_in_flight
    with capacity.stealing(), capacity.stealing():
        assert capacity.steals_in_flight
    assert not capacity.steals_in_flight


def test_the_ledger_holds_what_each_owner_holds_until_released() -> None:
    capacity = Capacity(cpu_millis=4000, memory_bytes=8 << 30)
    first = pb.TaskSpec(cpu_millis=1000, memory_bytes=1 << 30, owner="alice")
    second = pb.TaskSpec(cpu_millis=500, memory_bytes=1 << 20)       # the default owner
    capacity.reserve(first)
    capacity.reserve(first)
    capacity.reserve(second)
    assert capacity.owners() == {"alice": Usage(2000, 2 << 30, 2),
                                 "default": Usage(500, 1 << 20, 1)}
    capacity.release(first)
    capacity.release(second)
    assert capacity.owners() == {"alice": Usage(1000, 1 << 30, 1)}


def test_disk_counts_the_tasks_size_or_the_enforced_default() -> None:
    enforced = Capabilities(initial={capabilities.DISK_ENFORCED: "true"})
    capacity = Capacity(cpu_millis=4000, memory_bytes=8 << 30, disk_bytes=100 << 20,
                        default_disk=30 << 20, capabilities=enforced)
    sized, unsized = pb.TaskSpec(disk_bytes=60 << 20), pb.TaskSpec()
    assert capacity.disk_of(sized) == 60 << 20 and capacity.disk_of(unsized) == 30 << 20
    capacity.reserve(sized)
    assert capacity.fits_free(unsized) and not capacity.fits_free(sized)
    assert capacity.load() == 0.6
    assert not capacity.fits_ever(pb.TaskSpec(disk_bytes=101 << 20))
    capacity.release(sized)
    assert capacity.allocation().disk_bytes == 0
    # Where sizes are not enforced the default is advisory: it counts nothing.
    advisory = Capacity(cpu_millis=4000, memory_bytes=8 << 30, disk_bytes=0,
                        default_disk=30 << 20, capabilities=Capabilities())
    assert advisory.disk_of(unsized) == 0 and advisory.fits_ever(unsized)
