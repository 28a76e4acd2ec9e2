"""Selection of what a node steals: priority first, then dominant resource fairness."""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.scheduling.fairshare import Candidate, Usage, cluster_usage, select, share, valid_weight

CLUSTER = Usage(8000, 16 << 30)
NODE = Usage(2000, 4 << 30)


def _task(task_id: str, owner: str = "a", priority: int = 0, cpu: int = 1000,
          memory: int = 1 << 30, size: int = 100) -> Candidate:
    return Candidate(task_id, priority, owner, cpu, memory, size)


def _ids(picks: list[Candidate]) -> list[str]:
    return [pick.task_id for pick in picks]


def test_highest_priority_first_then_oldest() -> None:
    candidates = [_task("low1"), _task("low2"), _task("high1", priority=10),
                  _task("high2", priority=10)]
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=2)
    assert _ids(picks) == ["high1", "high2"]


def test_a_larger_higher_priority_task_that_does_not_fit_does_not_block_smaller_ones() -> None:
    candidates = [_task("big", priority=10, cpu=3000), _task("small-old-big", cpu=4000),
                  _task("small", cpu=500)]
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=4)
    assert _ids(picks) == ["small"]


def test_within_a_priority_the_owner_with_the_lowest_share_goes_next() -> None:
    # a holds half the cluster's CPU, b nothing: b's tasks first, until b catches up.
    usage = {"a": Usage(4000, 1 << 30, 4)}
    candidates = [_task(f"a{i}", "a", cpu=500, memory=1 << 20) for i in range(4)] + \
                 [_task(f"b{i}", "b", cpu=500, memory=1 << 20) for i in range(4)]
    picks = select(candidates, usage=usage, totals=CLUSTER, weights={}, free=NODE, limit=4)
    assert _ids(picks) == ["b0", "b1", "b2", "b3"]


def test_one_batch_spreads_over_owners_as_their_shares_grow() -> None:
    candidates = [_task(f"a{i}", "a", cpu=500, memory=1 << 20) for i in range(4)] + \
                 [_task(f"b{i}", "b", cpu=500, memory=1 << 20) for i in range(4)]
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=4)
    assert sorted(_ids(picks)) == ["a0", "a1", "b0", "b1"]


def test_the_dominant_resource_counts() -> None:
    # a uses little CPU but most memory: its share is its memory fraction.
    usage = {"a": Usage(500, 12 << 30, 1), "b": Usage(4000, 1 << 30, 4)}
    assert share(usage["a"], CLUSTER) == 0.75
    candidates = [_task("a0", "a", cpu=100, memory=1 << 20),
                  _task("b0", "b", cpu=100, memory=1 << 20)]
    picks = select(candidates, usage=usage, totals=CLUSTER, weights={}, free=NODE, limit=1)
    assert _ids(picks) == ["b0"]


def test_weights_divide_the_share() -> None:
    usage = {"a": Usage(2000, 0, 2), "b": Usage(3000, 0, 3)}
    candidates = [_task("a0", "a", cpu=100), _task("b0", "b", cpu=100)]
    assert _ids(select(candidates, usage=usage, totals=CLUSTER, weights={}, free=NODE,
                       limit=1)) == ["a0"]
    assert _ids(select(candidates, usage=usage, totals=CLUSTER, weights={"b": 3}, free=NODE,
                       limit=1)) == ["b0"]


def test_an_owner_whose_tasks_do_not_fit_gives_way_to_the_next() -> None:
    candidates = [_task("b-big", "b", cpu=3000), _task("a0", "a", cpu=1000)]
    usage = {"a": Usage(4000, 0, 4)}
    picks = select(candidates, usage=usage, totals=CLUSTER, weights={}, free=NODE, limit=4)
    assert _ids(picks) == ["a0"]


def test_limit_and_bytes_cut_the_batch() -> None:
    candidates = [_task(f"a{i}", cpu=10, memory=1, size=400) for i in range(10)]
    assert len(select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE,
                      limit=3)) == 3
    assert len(select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=10,
                      max_bytes=1000)) == 2
    # One record larger than the budget still goes alone (its write fails "too large").
    assert len(select([_task("huge", size=5000)], usage={}, totals=CLUSTER, weights={},
                      free=NODE, limit=10, max_bytes=1000)) == 1


def test_cluster_usage_takes_this_nodes_live_ledger_over_its_record() -> None:
    mine = pb.Node(id="me", cpu_capacity_millis=2000, memory_capacity_bytes=4 << 30)
    mine.owners["a"].CopyFrom(pb.OwnerUsage(cpu_millis=2000, memory_bytes=1, running=9))
    other = pb.Node(id="other", cpu_capacity_millis=6000, memory_capacity_bytes=12 << 30)
    other.owners["a"].CopyFrom(pb.OwnerUsage(cpu_millis=1000, memory_bytes=10, running=1))
    other.owners["b"].CopyFrom(pb.OwnerUsage(cpu_millis=3000, memory_bytes=20, running=3))
    usage, totals = cluster_usage([mine, other], "me", {"a": Usage(500, 5, 1)},
                                  Usage(2000, 4 << 30))
    assert totals == Usage(8000, 16 << 30, 0)
    assert usage == {"a": Usage(1500, 15, 2), "b": Usage(3000, 20, 3)}


def test_weights_must_be_positive_finite_and_bounded() -> None:
    assert valid_weight(1) and valid_weight(1000) and valid_weight(0.001)
    for bad in (0, -1, 1000.5, float("nan"), float("inf")):
        assert not valid_weight(bad)


def test_free_disk_counts_across_one_batch() -> None:
    candidates = [Candidate("a", 0, "a", 100, 1 << 20, 100, disk_bytes=60),
                  Candidate("b", 0, "a", 100, 1 << 20, 100, disk_bytes=60),
                  Candidate("c", 0, "a", 100, 1 << 20, 100, disk_bytes=40)]
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE, limit=4,
                   disk_free=100)
    assert _ids(picks) == ["a", "c"]
    # Not counted (None): every one fits.
    assert len(select(candidates, usage={}, totals=CLUSTER, weights={}, free=NODE,
                      limit=4)) == 3
