"""Fair share over time, the pure part: decay of past usage by the half-life, usage shares
(dominant-resource style) and the owner order the stealer sorts by."""

from __future__ import annotations

import math

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.scheduling.decay import Past, added, decayed_to, factor, order, usage_shares
from node.scheduling.fairshare import Candidate, Usage, owner_order, select, share

HOUR = 3600.0
CLUSTER = Usage(8000, 16 << 30)


def _record(cpu: float, memory: float, at: float) -> pb.DecayedUsage:
    record = pb.DecayedUsage(cpu_seconds=cpu, memory_gib_seconds=memory)
    record.updated_at.FromNanoseconds(int(at * 1e9))
    return record


def test_usage_halves_every_half_life() -> None:
    assert factor(0, HOUR) == 1.0
    assert factor(HOUR, HOUR) == pytest.approx(0.5)
    assert factor(3 * HOUR, HOUR) == pytest.approx(0.125)
    decayed = decayed_to(_record(800, 80, at=1000.0), 1000.0 + 2 * HOUR, HOUR)
    assert (decayed.cpu_seconds, decayed.memory_gib_seconds) == pytest.approx((200, 20))
    assert decayed.updated_at.ToNanoseconds() == int((1000.0 + 2 * HOUR) * 1e9)


def test_a_clock_behind_the_record_never_makes_usage_grow_nor_moves_it_back() -> None:
    decayed = decayed_to(_record(100, 0, at=5000.0), 4000.0, HOUR)
    assert decayed.cpu_seconds == 100
    assert decayed.updated_at.ToNanoseconds() == int(5000.0 * 1e9)


def test_added_decays_the_stored_value_to_now_then_adds_the_new_usage() -> None:
    new = added(_record(100, 10, at=0.0), cpu_seconds=30, memory_gib_seconds=3, now=HOUR,
                half_life=HOUR)
    assert (new.cpu_seconds, new.memory_gib_seconds) == pytest.approx((80, 8))
    first = added(pb.DecayedUsage(), cpu_seconds=5, memory_gib_seconds=1, now=HOUR,
                  half_life=HOUR)
    assert (first.cpu_seconds, first.memory_gib_seconds) == (5, 1)


def test_usage_share_is_the_larger_of_the_cpu_and_memory_fractions() -> None:
    records = {"cpu-heavy": _record(900, 10, at=0), "mem-heavy": _record(100, 90, at=0),
               "idle": _record(0, 0, at=0)}
    shares = usage_shares(records, 0.0, HOUR)
    assert shares == pytest.approx({"cpu-heavy": 0.9, "mem-heavy": 0.9, "idle": 0.0})
    assert usage_shares({"a": _record(0, 0, at=0)}, 0.0, HOUR) == {"a": 0.0}


def test_usage_share_decays_each_record_from_its_own_time() -> None:
    # a's 200 core-seconds are one half-life older than b's 100: equal now.
    shares = usage_shares({"a": _record(200, 0, at=0), "b": _record(100, 0, at=HOUR)},
                          HOUR, HOUR)
    assert shares == pytest.approx({"a": 0.5, "b": 0.5})


def test_order_mixes_current_and_past_share_by_the_usage_weight_over_the_weight() -> None:
    assert order(0.4, 0.8, weight=1, usage_weight=0.5) == pytest.approx(0.6)
    assert order(0.4, 0.8, weight=2, usage_weight=0.5) == pytest.approx(0.3)
    assert order(0.4, 0.8, weight=1, usage_weight=0.0) == pytest.approx(0.4)
    assert order(0.4, 0.8, weight=1, usage_weight=1.0) == pytest.approx(0.8)


def test_with_usage_weight_0_the_order_is_the_weighted_dominant_share_of_before() -> None:
    for held in (Usage(), Usage(3000, 1 << 30, 3), Usage(500, 12 << 30, 1)):
        for weight in (0.5, 1.0, 7.0):
            assert owner_order(held, CLUSTER, weight, 0.9, 0.0) == share(held, CLUSTER, weight)
    assert math.isfinite(owner_order(Usage(), Usage(), 1.0, 0.0, 0.5))


def _tasks(owner: str, count: int) -> list[Candidate]:
    return [Candidate(f"{owner}{number}", 0, owner, 1000, 1 << 30) for number in range(count)]


def test_an_owner_who_ran_a_burst_yields_to_one_who_ran_nothing() -> None:
    # Both hold nothing now and queue at one priority; burst comes first by name (the old
    # tie-break), but burst has all the past usage.
    candidates = _tasks("burst", 3) + _tasks("quiet", 3)
    past = Past({"burst": 1.0, "quiet": 0.0}, 0.5)
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=Usage(3000, 8 << 30),
                   limit=3, past=past)
    assert [pick.owner for pick in picks] == ["quiet", "quiet", "quiet"]
    # Without the past (usage-weight 0): the old order, by share then name.
    picks = select(candidates, usage={}, totals=CLUSTER, weights={}, free=Usage(3000, 8 << 30),
                   limit=3, past=Past({"burst": 1.0}, 0.0))
    assert [pick.owner for pick in picks] == ["burst", "quiet", "burst"]


def test_current_share_still_counts_so_the_quiet_owner_does_not_take_everything() -> None:
    # quiet already holds 6 of 8 cores (share 0.75 -> 0.375 mixed); burst's past share 0.5
    # mixes to 0.25: burst goes next although its past is larger.
    past = Past({"burst": 0.5, "quiet": 0.0}, 0.5)
    picks = select(_tasks("burst", 1) + _tasks("quiet", 1),
                   usage={"quiet": Usage(6000, 1 << 30, 6)}, totals=CLUSTER, weights={},
                   free=Usage(1000, 8 << 30), limit=1, past=past)
    assert [pick.owner for pick in picks] == ["burst"]
