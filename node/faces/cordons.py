"""What CordonNode, UncordonNode and DrainNode do once the request is valid.

Any node answers: it writes the cordon key of the named node (node/etcd/cordons.py) and,
for a drain, follows the progress that node writes into it. The node itself does the work
(node/operations/cordon.py), so a client that goes away stops nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.errors import InvalidArgument, NodeNotFound, StoreUnavailable
from node.etcd.cordons import VersionedCordon
from node.etcd.store import Store

# `filch node drain` without --deadline: long enough for most batch tasks to end by
# themselves, short enough for a maintenance window.
DEFAULT_DRAIN_DEADLINE = 600.0
# A drain longer than this is a typo (a deadline of days holds the node's work hostage).
MAX_DRAIN_DEADLINE = 7 * 24 * 3600.0
# How often a drain's follower reads its progress (one small key: cheap).
PROGRESS_POLL = 0.5
# Past the deadline, how long a follower waits for a node that is not live (it resumes the
# drain when it restarts) before it says so.
GONE_GRACE = 30.0
# Write attempts when another writer moves the key in between.
CONFLICT_RETRIES = 5


def node_name(value: str) -> str:
    """A node name as the request gives it; InvalidArgument naming the field otherwise."""
    if not value:
        raise InvalidArgument("name", "is required: the node's name (`filch nodes`)")
    if not keys.NODE_NAME_PATTERN.match(value):
        raise InvalidArgument("name", f"{value[:80]!r} is not a node name: letters, digits, "
                              "'.', '_' and '-', at most 63")
    return value


def drain_deadline(seconds: float) -> float:
    """The drain's deadline in seconds (0: the default)."""
    if math.isnan(seconds) or seconds < 0 or seconds > MAX_DRAIN_DEADLINE:
        raise InvalidArgument("deadline_seconds", f"{seconds:g} is not between 0 and "
                              f"{MAX_DRAIN_DEADLINE:g} (7 days); 0 means the default (10m)")
    return seconds or DEFAULT_DRAIN_DEADLINE


class CordonService:
    """Cordon, uncordon and drain nodes by name."""

    def __init__(self, *, store: Store) -> None:
        self.store = store

    async def _live(self, name: str) -> None:
        if await self.store.name_holder(name) is None:
            raise NodeNotFound(name)

    async def cordon(self, name: str) -> pb.CordonNodeResponse:
        """Cordon a live node (idempotent: an existing cordon or drain is kept)."""
        await self._live(name)
        if await self.store.get_cordon(name) is None:
            cordon = pb.NodeCordon()
            cordon.cordoned_at.GetCurrentTime()
            # False: cordoned meanwhile by someone else, which is what was asked.
            await self.store.put_cordon(name, cordon, mod_revision=0)
        return pb.CordonNodeResponse(name=name, cordoned=True)

    async def uncordon(self, name: str) -> pb.CordonNodeResponse:
        """Delete the cordon (canceling a drain under way). A name without a live node but
        with a cordon (a node removed after its drain) is uncordoned too."""
        previous = await self.store.delete_cordon(name)
        if previous is None:
            await self._live(name)
        canceled = previous is not None and previous.drain and not previous.drain_done
        return pb.CordonNodeResponse(name=name, cordoned=False, drain_canceled=canceled)

    async def drain(self, name: str, deadline: float) -> AsyncIterator[pb.DrainNodeProgress]:
        """Start a drain (or join the one under way) and yield its progress whenever it
        changes, until it is done or canceled (the last message says which). A drain under
        way is followed even while its node restarts (it resumes it); a new one needs the
        node live."""
        found = await self.store.get_cordon(name)
        if found is None or not found.cordon.drain or found.cordon.drain_done:
            await self._live(name)
        drain_id = await self._start(name, deadline)
        said: pb.DrainNodeProgress | None = None
        while True:
            found = await self.store.get_cordon(name)
            progress = _progress(name, drain_id, found)
            if progress != said:
                said = progress
                yield progress
            if progress.done or progress.canceled:
                return
            if (time.time() > progress.deadline.ToNanoseconds() / 1e9 + GONE_GRACE
                    and await self.store.name_holder(name) is None):
                raise StoreUnavailable(f"node {name!r} is not live, so its drain waits: it "
                                       "resumes when the node starts again")
            await asyncio.sleep(PROGRESS_POLL)

    async def _start(self, name: str, deadline: float) -> int:
        for _ in range(CONFLICT_RETRIES):
            found = await self.store.get_cordon(name)
            if found is not None and found.cordon.drain and not found.cordon.drain_done:
                return found.cordon.drain_id     # one under way: follow it
            cordon = pb.NodeCordon(drain=True, drain_id=time.time_ns())
            if found is not None:
                cordon.cordoned_at.CopyFrom(found.cordon.cordoned_at)
            else:
                cordon.cordoned_at.GetCurrentTime()
            cordon.drain_deadline.FromNanoseconds(int((time.time() + deadline) * 1e9))
            if await self.store.put_cordon(name, cordon, mod_revision=(
                    found.mod_revision if found is not None else 0)):
                return cordon.drain_id
        raise StoreUnavailable(f"the cordon of {name!r} kept changing; retry")


def _progress(name: str, drain_id: int, found: VersionedCordon | None) -> pb.DrainNodeProgress:
    if found is None or found.cordon.drain_id != drain_id:
        return pb.DrainNodeProgress(name=name, canceled=True)
    cordon = found.cordon
    progress = pb.DrainNodeProgress(name=name, finished=cordon.finished,
                                    handed_back=cordon.handed_back, remaining=cordon.remaining,
                                    done=cordon.drain_done)
    progress.deadline.CopyFrom(cordon.drain_deadline)
    return progress
