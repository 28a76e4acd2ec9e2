"""Users' running quotas in the steal: what an owner with a CPU or memory quota may still
start, read once per pass, and the compare that makes the steal transaction hold to it.

For each candidate owner with a running quota, a pass reads the owner's /charge/ range
(its RUNNING accounted tasks' requests, node/etcd/quota_txn.py) at revision R; fair share
then picks only what fits the remaining room (fairshare.select's owner_room, counted
down across the batch), and the steal transaction compares that no /charge/ key of the
owner was written after R. Of two nodes that both saw room for one more task, the second
commit fails its compare and reads again: the quota holds under concurrent steals. Owners
without a running quota cost nothing: no read, no compare.

A queued task left behind because its owner is at quota gets a message saying so, written
once (not on every pass); stealing it clears it (lifecycle.stolen).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.errors import FilchError
from node.core.units import format_size
from node.etcd.quota_txn import Charged, charged, unchanged_charges
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned
from node.etcd.users import UserDirectory
from node.scheduling.fairshare import Candidate, Usage

log = logging.getLogger(__name__)

# The room of a dimension without a limit (a CPU quota but no memory quota): more than any
# node has.
UNBOUNDED = 2**62

# Messages one pass writes at most: a pass reads a bounded number of candidates anyway;
# this bounds the writes of a pass that finds a whole read of them at quota.
MAX_MARKS_PER_PASS = 64


def message_prefix(owner: str) -> str:
    return f"owner {owner} at its "


def quota_message(owner: str, quota: pb.Quota, used: Usage, task: Candidate) -> str | None:
    """Why task waits for its owner's quota ("owner alice at its CPU quota (4/4)"), or None
    when it fits what the quota leaves."""
    if quota.max_cpu_millis and used.cpu_millis + task.cpu_millis > quota.max_cpu_millis:
        return (f"{message_prefix(owner)}CPU quota ({used.cpu_millis / 1000:g}/"
                f"{quota.max_cpu_millis / 1000:g})")
    if quota.max_memory_bytes and used.memory_bytes + task.memory_bytes > quota.max_memory_bytes:
        return (f"{message_prefix(owner)}memory quota ({format_size(used.memory_bytes)}/"
                f"{format_size(quota.max_memory_bytes)})")
    return None


class RunningQuotas:
    """One node's reads of its candidates' owners' charges, a pass at a time."""

    def __init__(self, *, store: Store, users: UserDirectory | None) -> None:
        self._store = store
        self._users = users
        self._charged: dict[str, Charged] = {}
        self._quotas: dict[str, pb.Quota] = {}

    def begin(self) -> None:
        """A new pass: every owner's charge is read again."""
        self._charged.clear()
        self._quotas.clear()

    async def read(self, candidates: Iterable[Candidate]) -> None:
        """Read the charge of each candidate owner with a running quota not read yet in
        this pass (one keys-only range each)."""
        if self._users is None:
            return
        for owner in {candidate.owner for candidate in candidates} - set(self._charged):
            quota = self._users.quota(owner)
            if quota is None or not (quota.max_cpu_millis or quota.max_memory_bytes):
                continue
            found = await charged(self._store, owner)
            self._charged[owner], self._quotas[owner] = found, quota
            metrics.OWNER_QUOTA_CPU.labels(owner).set(quota.max_cpu_millis)
            metrics.OWNER_QUOTA_MEMORY.labels(owner).set(quota.max_memory_bytes)
            metrics.OWNER_RUNNING_CPU.labels(owner).set(found.cpu_millis)
            metrics.OWNER_RUNNING_MEMORY.labels(owner).set(found.memory_bytes)

    def room(self) -> dict[str, Usage]:
        """What each owner read in this pass may still start (fairshare.select owner_room)."""
        return {owner: Usage(
            (quota.max_cpu_millis - found.cpu_millis) if quota.max_cpu_millis else UNBOUNDED,
            (quota.max_memory_bytes - found.memory_bytes) if quota.max_memory_bytes
            else UNBOUNDED)
            for owner, found in self._charged.items()
            for quota in (self._quotas[owner],)}

    def holds_back(self, task: pb.Task) -> bool:
        """Whether the last pass saw the task's owner without room for it under its running
        quota: such a task reserves no node (node/scheduling/reservation.py)."""
        owner = task.spec.owner or keys.DEFAULT_OWNER
        room = self.room().get(owner)
        return room is not None and (task.spec.cpu_millis > room.cpu_millis
                                     or task.spec.memory_bytes > room.memory_bytes)

    def guards(self, picks: Sequence[Candidate]) -> list[Any]:
        """The steal's compares: per picked owner with a quota, its charge unchanged."""
        return [unchanged_charges(owner, self._charged[owner].revision)
                for owner in sorted({pick.owner for pick in picks} & set(self._charged))]

    def at_quota(self, candidates: Sequence[Candidate],
                 picks: Sequence[Candidate]) -> dict[str, tuple[str, str]]:
        """The candidates left behind by their owner's quota: task id -> (owner, message)."""
        picked = {pick.task_id for pick in picks}
        used = {owner: Usage(found.cpu_millis, found.memory_bytes)
                for owner, found in self._charged.items()}
        for pick in picks:
            if pick.owner in used:
                used[pick.owner] = used[pick.owner].plus(pick.cpu_millis, pick.memory_bytes)
        waiting: dict[str, tuple[str, str]] = {}
        for candidate in candidates:
            if candidate.owner not in used or candidate.task_id in picked:
                continue
            message = quota_message(candidate.owner, self._quotas[candidate.owner],
                                    used[candidate.owner], candidate)
            if message is not None:
                waiting[candidate.task_id] = (candidate.owner, message)
        for owner in {owner for owner, _ in waiting.values()}:
            metrics.QUOTA_REFUSALS.labels(owner, "running").inc()
        return waiting

    async def mark(self, records: dict[str, Versioned],
                   waiting: dict[str, tuple[str, str]]) -> int:
        """Write each waiting task's message unless it already says its owner is at quota
        (once, not every pass); each task alone (another node may have moved it). Best
        effort: how many were written."""
        moves = []
        for task_id, (owner, message) in waiting.items():
            record = records.get(task_id)
            if record is None or message_prefix(owner) in record.task.message:
                continue
            task = pb.Task()
            task.CopyFrom(record.task)
            # What happened to it before (a requeue...) stays first, as why.py shows it.
            task.message = f"{record.task.message}; {message}" if record.task.message \
                else message
            moves.append(Move(record, task))
            if len(moves) >= MAX_MARKS_PER_PASS:
                break
        if not moves:
            return 0
        try:
            _, done = await self._store.transition_each(moves)
        except FilchError as exc:
            log.info("no quota message on %d waiting task(s): %s", len(moves), exc)
            return 0
        return sum(done)
