"""Users' quotas at submit: which tasks are accounted, the priority ceiling, and the
pending quota, exact under concurrent submits on any nodes.

A task is accounted when its owner is a user (/user/<name>): its record carries
Task.accounted, and node/etcd/txn.py index_keys gives it a /pending/ key while PENDING and
a /charge/ key while RUNNING. Owners without a pending quota keep the group-committed
submit path and its cost; those with one are written by a transaction that compares
their /pending/ range (node/etcd/quota_txn.py), so two submits that both counted 9 of 10
cannot both be written.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.errors import PermissionDenied, QuotaExceeded, StoreUnavailable
from node.etcd.batch_write import cut
from node.etcd.quota_txn import create_guarded, pending_count
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned
from node.etcd.users import UserDirectory

log = logging.getLogger(__name__)

# Tries of one submit of an owner at its pending quota when other submits of the same
# owner keep landing first: each lost try means another submit was written, so a burst of
# N concurrent submits settles within N tries; past this the client is told to retry.
PENDING_TRIES = 50
# Random pause between tries (seconds): concurrent losers do not come back in lockstep.
PENDING_PAUSE = 0.01


def owner_of(spec: pb.TaskSpec) -> str:
    return spec.owner or keys.DEFAULT_OWNER


class SubmitQuotas:
    """The submit side of quotas; users None (unit tests, no directory): nobody is a user."""

    def __init__(self, *, store: Store, users: UserDirectory | None = None) -> None:
        self._store = store
        self._users = users

    @property
    def users(self) -> UserDirectory | None:
        return self._users

    def accounted(self, spec: pb.TaskSpec) -> bool:
        """Whether tasks of this spec count towards a user's quotas (its owner is a user)."""
        return self._users is not None and self._users.is_user(owner_of(spec))

    def check_priority(self, spec: pb.TaskSpec) -> None:
        """PermissionDenied when the spec's priority is above its owner's ceiling."""
        owner = owner_of(spec)
        quota = self._users.quota(owner) if self._users is not None else None
        if quota is not None and quota.HasField("max_priority") \
                and spec.priority > quota.max_priority:
            metrics.QUOTA_REFUSALS.labels(owner, "priority").inc()
            raise PermissionDenied(f"priority {spec.priority} is above {owner}'s ceiling "
                                   f"({quota.max_priority}): submit with --priority "
                                   f"{quota.max_priority} or lower, or ask an admin "
                                   f"(filch user set {owner} --max-priority N)")

    def max_pending(self, spec: pb.TaskSpec) -> int:
        """The owner's pending quota, 0 when it has none."""
        quota = self._users.quota(owner_of(spec)) if self._users is not None else None
        return quota.max_pending if quota is not None else 0

    async def create(self, move: Move) -> int | None:
        """Write a new PENDING task of an owner with a pending quota: its revision, or None
        when the move's own compare failed (the id exists, a parent is gone). Raises
        QuotaExceeded (nothing written) when the owner's pending tasks would pass it."""
        owner, limit = owner_of(move.new.spec), self.max_pending(move.new.spec)
        revisions = await self._create_counted([move], owner, limit, 1, [])
        return revisions[0]

    async def create_array(self, moves: Sequence[Move], *, still: int = 0) -> list[int | None]:
        """Write an array's held tasks (all of one owner with a pending quota) in
        transactions one after another, each compared with the owner's /pending/ range as
        last known (counted, or as this writer's previous transaction left it), so the
        owner never passes its quota even for a moment. When another submit of the owner
        lands in between and the rest no longer fits, what this call wrote is deleted and
        QuotaExceeded raised. still: the array's tasks left to write, these included
        (an array is written STEP tasks at a call; default len(moves)). Returns each
        move's revision (None: its compare failed)."""
        if not moves:
            return []
        owner, limit = owner_of(moves[0].new.spec), self.max_pending(moves[0].new.spec)
        runs = cut(moves)
        still = max(still, len(moves))
        written: list[Versioned] = []
        revisions: list[int | None] = [None] * len(moves)
        try:
            chunk = await self._create_counted(
                [moves[at] for at in runs[0]], owner, limit, still, written)
            for at, revision in zip(runs[0], chunk, strict=True):
                revisions[at] = revision
            left = still - len(runs[0])
            for run in runs[1:]:
                chunk = await self._create_counted([moves[at] for at in run], owner, limit,
                                                   left, written,
                                                   known=max(filter(None, revisions),
                                                             default=0))
                for at, revision in zip(run, chunk, strict=True):
                    revisions[at] = revision
                left -= len(run)
        except QuotaExceeded:
            if written and not await self._store.delete_tasks(written):
                # Changed meanwhile: the resolver's sweep deletes an abandoned array's
                # held tasks (node/scheduling/dependencies.py), an hour on.
                log.warning("%d held tasks of a refused array of %s are left to the "
                            "resolver's sweep", len(written), owner)
            raise
        return revisions

    async def _create_counted(self, moves: list[Move], owner: str, limit: int,
                              adding: int, written: list[Versioned], *,
                              known: int = 0) -> list[int | None]:
        """Write moves guarded by the owner's /pending/ range. adding: how many pending
        tasks this submit still adds (these moves and the rest of an array); known: a
        revision after which this writer alone wrote the owner's pending keys (0: count
        first). Appends what it wrote to written."""
        revision = known
        for _ in range(PENDING_TRIES):
            if not revision:
                count, revision = await pending_count(self._store, owner)
                metrics.OWNER_QUOTA_PENDING.labels(owner).set(limit)
                metrics.OWNER_PENDING.labels(owner).set(count)
                if count + adding > limit:
                    metrics.QUOTA_REFUSALS.labels(owner, "pending").inc()
                    raise QuotaExceeded(
                        f"owner {owner} has {count} pending tasks, its quota is {limit}"
                        f"{f' (this submit adds {adding})' if adding > 1 else ''}: "
                        "wait for some to start or ask an admin "
                        f"(filch user set {owner} --max-pending N)")
            outcome = await create_guarded(self._store, moves, owner, revision)
            if outcome.revision is not None:
                written += [Versioned(move.new, outcome.revision) for move in moves]
                return [outcome.revision] * len(moves)
            if not outcome.pending_changed:
                if len(moves) == 1:
                    return [None]
                # One move's own compare failed (an id an earlier try wrote): alone each,
                # each compared as the previous one left the range.
                alone: list[int | None] = []
                for at, move in enumerate(moves):
                    alone += await self._create_counted([move], owner, limit, adding - at,
                                                        written, known=revision)
                    revision = alone[-1] or revision
                return alone
            revision = 0
            await asyncio.sleep(random.uniform(0, PENDING_PAUSE))
        raise StoreUnavailable(f"other submits of {owner} kept landing first; retry")
