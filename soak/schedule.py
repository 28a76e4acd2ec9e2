"""The seeded fault schedule: which fault, when, for how long, on which node.

A schedule is a pure function of (seed, duration, topology), so a failing run is re-run
with the same faults at the same offsets (`--seed N`). Faults overlap (up to
MAX_CONCURRENT at once), but never two on one node, and never two network splits at once:
the heal of one must not undo the other.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

# Every kind the nemesis knows. "member" kinds need a node that runs an etcd member.
KINDS = (
    "kill_daemon",          # SIGKILL the agent; restarted at the end of the fault
    "kill_daemon_etcd",     # SIGKILL agent and etcd member; both restarted
    "pause_daemon",         # SIGSTOP the agent; SIGCONT at the end
    "pause_etcd",           # SIGSTOP the etcd member; SIGCONT at the end
    "partition_one",        # the node's eth0 goes down
    "partition_split",      # a 2|3 split of the five nodes (nftables drops both ways)
    "one_way",              # the node drops what one peer sends it (nftables, one way)
    "packet_loss",          # 20 % of what the node receives is dropped (iptables statistic)
    "leader_transfer",      # etcd leadership moves to another member (instant)
    "compact_defrag",       # compaction at the recorded revision + defrag of one member
    "disk_full",            # the small filesystem of the disk node is filled
    "drain",                # DrainNode on one node; uncordoned at the end
)
MEMBER_KINDS = frozenset({"kill_daemon_etcd", "pause_etcd", "leader_transfer", "compact_defrag"})
CLUSTER_KINDS = frozenset({"partition_split", "leader_transfer", "compact_defrag"})
INSTANT_KINDS = frozenset({"leader_transfer", "compact_defrag"})
# Relative weights of the random phase (after every kind ran once).
WEIGHTS = {"kill_daemon": 3, "kill_daemon_etcd": 2, "pause_daemon": 2, "pause_etcd": 2,
           "partition_one": 3, "partition_split": 2, "one_way": 2, "packet_loss": 2,
           "leader_transfer": 2, "compact_defrag": 2, "disk_full": 1, "drain": 1}
# Faults in force at once: overlap is the point, but with three members more than two
# at once mostly means "no quorum", which teaches nothing new.
MAX_CONCURRENT = 2
# Seconds a fault lasts: around the lease TTL (5 s), so some outlive it and some do not.
MIN_DURATION, MAX_DURATION = 2.0, 12.0
# Mean gap between fault starts.
MEAN_GAP = 3.5


@dataclass(frozen=True)
class Fault:
    """One fault: applied at `start` seconds into the fault phase, healed `duration` later."""

    kind: str
    start: float
    duration: float
    target: int            # node index (for partition_split: unused, see `group`)
    peer: int = -1          # one_way: the node whose packets the target drops
    group: tuple[int, ...] = ()   # partition_split: the two-node side

    @property
    def end(self) -> float:
        return self.start + self.duration

    def nodes(self) -> frozenset[int]:
        """The nodes this fault touches (kept apart from other faults' nodes)."""
        if self.kind in CLUSTER_KINDS:
            return frozenset()
        return frozenset({self.target} | ({self.peer} if self.peer >= 0 else set()))

    def describe(self) -> str:
        extra = (f" group {list(self.group)}" if self.group
                 else f" peer {self.peer}" if self.peer >= 0 else "")
        return (f"{self.kind} on node {self.target}{extra} at {self.start:.1f}s "
                f"for {self.duration:.1f}s")

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def make_schedule(*, seed: int, seconds: float, size: int, members: tuple[int, ...],
                  disk_node: int) -> list[Fault]:
    """Faults over [0, seconds): first every kind once in a seeded order, then random kinds
    by WEIGHTS. Every fault ends by `seconds`."""
    rng = random.Random(seed)
    first = list(KINDS)
    rng.shuffle(first)
    faults: list[Fault] = []
    clock = 1.0
    while clock < seconds - MIN_DURATION:
        kind = first.pop(0) if first else rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        duration = 0.0 if kind in INSTANT_KINDS else round(rng.uniform(MIN_DURATION,
                                                                       MAX_DURATION), 1)
        duration = min(duration, seconds - clock)
        fault = _place(rng, kind, clock, duration, size, members, disk_node, faults)
        if fault is not None:
            faults.append(fault)
        elif len(first) < len(KINDS) and kind not in first and not faults_of(faults, kind):
            first.insert(0, kind)       # every kind still runs once: retried at the next slot
        clock += round(rng.expovariate(1 / MEAN_GAP), 1) + 0.5
    return faults


def _place(rng: random.Random, kind: str, start: float, duration: float, size: int,
           members: tuple[int, ...], disk_node: int, faults: list[Fault]) -> Fault | None:
    """The fault of this kind at start on a node free then, or None when none is."""
    active = [f for f in faults if f.start <= start < f.end or
              (f.kind in INSTANT_KINDS and abs(f.start - start) < 0.5)]
    busy_window = [f for f in faults if f.start < start + duration and start < f.end]
    if len([f for f in active if f.kind not in INSTANT_KINDS]) >= MAX_CONCURRENT:
        return None
    busy = frozenset().union(*(f.nodes() for f in busy_window)) if busy_window else frozenset()
    if kind == "partition_split":
        if any(f.kind in ("partition_split", "partition_one", "one_way") for f in busy_window):
            return None
        group = tuple(sorted(rng.sample(range(size), 2)))
        return Fault(kind, start, duration, group[0], group=group)
    if kind in INSTANT_KINDS:
        return Fault(kind, start, 0.0, rng.choice(members))
    pool = [disk_node] if kind == "disk_full" else list(members) if kind in MEMBER_KINDS \
        else list(range(size))
    if kind in ("partition_one", "one_way") and any(f.kind == "partition_split"
                                                    for f in busy_window):
        return None
    free = [i for i in pool if i not in busy]
    if not free:
        return None
    target = rng.choice(free)
    if kind == "one_way":
        peers = [i for i in range(size) if i != target and i not in busy]
        if not peers:
            return None
        return Fault(kind, start, duration, target, peer=rng.choice(peers))
    return Fault(kind, start, duration, target)


def faults_of(faults: list[Fault], kind: str) -> list[Fault]:
    return [fault for fault in faults if fault.kind == kind]
