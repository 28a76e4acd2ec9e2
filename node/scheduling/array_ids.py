"""The ids of an array's tasks: derived from the array id and the position
(keys.array_task_id), made in steps so a 100,000-task array never holds the event loop."""

from __future__ import annotations

import asyncio

from node.core import keys

# Tasks an array submit builds, writes or releases per step: the event loop is held for
# the Python part of one step only (~0.1 s), so that the node's lease keepalive, its
# steals and other calls go on while a 100,000-task array is written.
STEP = 2048

async def task_ids(array_id: str, count: int) -> list[str]:
    """The ids of an array's tasks in position order, made STEP at a time with the event
    loop let go in between (100,000 ids take a good part of a second)."""
    ids: list[str] = []
    for start in range(0, count, STEP):
        ids += [keys.array_task_id(array_id, position)
                for position in range(start, min(count, start + STEP))]
        await asyncio.sleep(0)
    return ids
