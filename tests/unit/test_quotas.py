"""Users' quotas, the pure parts: selection within an owner's remaining room, summing
charge keys, and the message of a task left queued at its owner's quota."""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.quota_txn import charge_sum
from node.scheduling.fairshare import Candidate, Usage, select
from node.scheduling.running_quota import quota_message

CLUSTER = Usage(8000, 16 << 30)
NODE = Usage(8000, 16 << 30)


def _task(task_id: str, owner: str = "alice", cpu: int = 500,
          memory: int = 1 << 30) -> Candidate:
    return Candidate(task_id, 0, owner, cpu, memory, 100)


def test_select_takes_only_what_fits_the_owners_room_counted_down_across_the_batch() -> None:
    candidates = [_task(f"a{number}") for number in range(4)] + [_task("b1", owner="bob")]
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=8,
                   owner_room={"alice": Usage(1000, 1 << 40)})
    assert sorted(pick.task_id for pick in picks) == ["a0", "a1", "b1"]


def test_a_task_larger_than_the_room_does_not_block_a_smaller_one_of_the_owner() -> None:
    candidates = [_task("big", cpu=800), _task("small", cpu=200)]
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=8,
                   owner_room={"alice": Usage(500, 1 << 40)})
    assert [pick.task_id for pick in picks] == ["small"]


def test_memory_room_binds_too_and_no_room_means_nothing() -> None:
    candidates = [_task("a0"), _task("a1")]
    assert [pick.task_id for pick in select(
        candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=8,
        owner_room={"alice": Usage(1 << 40, 1 << 30)})] == ["a0"]
    assert select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=8,
                  owner_room={"alice": Usage(0, 1 << 40)}) == []


def test_charge_keys_sum_to_the_owners_running_requests() -> None:
    found = charge_sum([keys.charge("alice", "t1", 500, 1 << 30),
                        keys.charge("alice", "t2", 250, 3 << 20)], 42)
    assert (found.cpu_millis, found.memory_bytes, found.running, found.revision) == (
        750, (1 << 30) + (3 << 20), 2, 42)
    assert keys.parse_charge(keys.charge("a-b.c", "t", 1, 2)) == ("a-b.c", "t", 1, 2)


def test_the_message_names_the_quota_that_binds() -> None:
    quota = pb.Quota(max_cpu_millis=4000, max_memory_bytes=2 << 30)
    assert quota_message("alice", quota, Usage(4000, 0), _task("t")) == \
        "owner alice at its CPU quota (4/4)"
    assert quota_message("alice", quota, Usage(1000, 2 << 30), _task("t")) == \
        "owner alice at its memory quota (2Gi/2Gi)"
    assert quota_message("alice", quota, Usage(1000, 0), _task("t")) is None
