"""The list-then-watch loop every controller in the agent uses (level-triggered)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from node.core.errors import Compacted, FilchError
from node.etcd.store import Store, WatchEvent

log = logging.getLogger(__name__)

# Back-off before re-watching after etcd became unreachable.
WATCH_RETRY = 0.5


def forever() -> bool:
    """The stop condition of a watch that never ends by itself."""
    return False


async def list_and_watch(store: Store, prefix: bytes, relist: Callable[[], Awaitable[None]],
                         handle: Callable[[WatchEvent], Awaitable[None]], *,
                         until: Callable[[], bool] = forever,
                         deletes_only: bool = False, range_end: bytes = b"") -> None:
    """Call relist(), then handle() for every change under prefix (or in [prefix,
    range_end)), until until() is true (checked after every event and before every
    re-watch). deletes_only: handle() sees deletions only (etcd drops the puts before
    sending them: Store.watch).

    After a broken stream the watch resumes at the last revision seen (inclusive, so a
    revision cut in half is delivered again: handlers must be idempotent). When that
    revision was compacted away, relist() runs again, so nothing is missed.
    """
    revision = 0
    while not until():
        try:
            if revision == 0:
                start = await store.current_revision() + 1
                await relist()
                revision = start    # only once listed: a failed relist runs again
            async for event in store.watch(prefix, revision, deletes_only=deletes_only,
                                           range_end=range_end):
                revision = event.revision
                await handle(event)
                if until():
                    return
        except Compacted as exc:
            log.info("watch on %r fell behind compaction (%s): re-listing", prefix, exc)
            revision = 0
        except FilchError as exc:
            log.info("watch on %r restarts: %s", prefix, exc)
            await asyncio.sleep(WATCH_RETRY)
