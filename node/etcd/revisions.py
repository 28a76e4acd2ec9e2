"""A watch delivered whole etcd revisions at a time: what the event stream needs so that a
client resuming from the last revision it saw gets neither a gap nor a duplicate."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from node.etcd.store import Store, WatchEvent

# Changes held between etcd's stream and a slow consumer before the watch pushes back
# (the pump then waits; etcd's watch buffers on its side).
PENDING_CHANGES = 10_000


@dataclass(frozen=True)
class Revision:
    """Every watched change one etcd revision (one transaction) made, in etcd's order."""

    revision: int
    changes: list[WatchEvent]


async def revisions(store: Store, start: bytes, end: bytes, start_revision: int, *,
                    prev_kv: bool = False) -> AsyncIterator[Revision]:
    """The changes in [start, end) from start_revision on, one complete revision at a time,
    in revision order, until the stream breaks.

    etcd never splits a revision across watch responses (filch never asks for fragments),
    and aetcd hands a response's events to its queue without yielding to the event loop in
    between. The pump below therefore moves whole responses into `pending`: whenever the
    consumer finds `pending` drained, the last revision it holds is complete.
    Raises what Store.watch raises (Compacted, StoreUnavailable). Cancelling the consumer
    cancels the watch.
    """
    pending: asyncio.Queue[WatchEvent | BaseException] = asyncio.Queue(PENDING_CHANGES)
    # True while the pump waits for room in a full `pending`: it may then be in the middle
    # of a response, so a drained `pending` does not mean a complete revision.
    stalled = False

    async def pump() -> None:
        nonlocal stalled
        try:
            async for change in store.watch(start, start_revision, range_end=end,
                                            prev_kv=prev_kv):
                if pending.full():
                    stalled = True
                    await pending.put(change)
                    stalled = False
                else:
                    pending.put_nowait(change)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it
            await pending.put(exc)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        held: list[WatchEvent] = []
        while True:
            item = await pending.get()
            batch = [item]
            while not pending.empty() and not isinstance(item, BaseException):
                item = pending.get_nowait()
                batch.append(item)
            for entry in batch:
                if isinstance(entry, BaseException):
                    # A broken stream: a revision still held may be incomplete; drop it so
                    # the caller resumes from the last revision it was given whole.
                    raise entry
                if held and entry.revision != held[0].revision:
                    yield Revision(held[0].revision, held)
                    held = []
                held.append(entry)
            if held and pending.empty() and not stalled:
                yield Revision(held[0].revision, held)
                held = []
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
