"""Fair share over time: each owner's past usage, decayed by the cluster's half-life, and
the order the stealer sorts owners by (README, "Fair share over time").

Pure functions, no I/O. Past usage is what the nodes add to /usage/<owner> (a
DecayedUsage: CPU core-seconds and memory GiB-seconds, decayed to its updated_at); a value
read at time t is worth value x 2^(-(t - updated_at) / half_life) now, like Slurm's
PriorityDecayHalfLife.

An owner's usage share is dominant-resource style, as its current share is: the larger of
its fractions of every owner's decayed CPU and of every owner's decayed memory. That needs
no capacity to convert memory into CPU (the fleet that ran yesterday's work is not today's),
and charges a memory-heavy owner for memory as DRF does now. The order mixes both:

    order(o) = ((1 - w) * share(o) + w * usage_share(o)) / weight(o)

share(o) the current dominant share (unweighted), w the cluster's usage-weight (0..1).
With w = 0 it is exactly the weighted dominant share of before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from node._gen.filch.v1 import filch_pb2 as pb

GIB = float(1 << 30)


@dataclass(frozen=True)
class Past:
    """What the owner order needs of the past: usage shares (0..1) and their weight w."""

    shares: Mapping[str, float]
    weight: float = 0.0


NO_PAST = Past({}, 0.0)


def factor(age: float, half_life: float) -> float:
    """What one unit of usage age seconds old is worth now (1 for age <= 0: a clock of
    another node ahead of this one never makes usage grow)."""
    if age <= 0 or half_life <= 0 or math.isinf(half_life):
        return 1.0
    return float(2.0 ** (-age / half_life))


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def decayed_to(record: pb.DecayedUsage, now: float, half_life: float) -> pb.DecayedUsage:
    """record as it is worth at now (wall-clock seconds); updated_at becomes now, or stays
    where it is when it is ahead of now."""
    updated = _seconds(record.updated_at) if record.HasField("updated_at") else now
    keep = factor(now - updated, half_life)
    result = pb.DecayedUsage(cpu_seconds=record.cpu_seconds * keep,
                             memory_gib_seconds=record.memory_gib_seconds * keep)
    result.updated_at.FromNanoseconds(int(max(now, updated) * 1e9))
    return result


def added(record: pb.DecayedUsage, *, cpu_seconds: float, memory_gib_seconds: float,
          now: float, half_life: float) -> pb.DecayedUsage:
    """record decayed to now, plus usage accrued since the last flush (counted undecayed:
    a flush interval is seconds, a half-life at least a minute)."""
    result = decayed_to(record, now, half_life)
    result.cpu_seconds += cpu_seconds
    result.memory_gib_seconds += memory_gib_seconds
    return result


def usage_shares(records: Mapping[str, pb.DecayedUsage], now: float,
                 half_life: float) -> dict[str, float]:
    """Each owner's dominant fraction of every owner's decayed usage (all 0 when nobody
    has any)."""
    current = {owner: decayed_to(record, now, half_life) for owner, record in records.items()}
    cpu_total = sum(record.cpu_seconds for record in current.values())
    memory_total = sum(record.memory_gib_seconds for record in current.values())
    shares = {}
    for owner, record in current.items():
        fractions = [used / total for used, total in ((record.cpu_seconds, cpu_total),
                                                       (record.memory_gib_seconds, memory_total))
                     if total > 0]
        shares[owner] = max(fractions, default=0.0)
    return shares


def order(current_share: float, usage_share: float, *, weight: float,
          usage_weight: float) -> float:
    """The owner order (lowest goes first): current_share unweighted, weight > 0."""
    mixed = (1.0 - usage_weight) * current_share + usage_weight * usage_share
    return mixed / weight
