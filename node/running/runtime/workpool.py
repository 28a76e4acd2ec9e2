"""Freshly formatted /work images made ahead of the attempts that need them.

Why: making an image (sparse file + mkfs.ext4) was ~20-50 ms of every runc attempt's
start, mostly waiting on the disk, not CPU; made in the background it leaves the critical
path. Why fresh and not recycled: an image is formatted once, never mounted before it is
handed out, and deleted after its one attempt, so no task can see another's files by
construction (no wipe to get wrong). The pool lives in a root-only directory of the data
dir, beside the attempts (one file system: taking an image is a rename); it is bounded
(POOL_DEPTH images per size, POOL_SIZES sizes, one mkfs at a time) and removed at start-up
(reap_stale) and shutdown. Images are sparse: a ready one holds ~0.6 MB of metadata.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
from pathlib import Path

from node.core import metrics
from node.core.errors import ExecutorError
from node.running.runtime import scratch

log = logging.getLogger(__name__)

# Ready images kept per size: what a node starts in one burst before the refill catches up.
POOL_DEPTH = 4
# Sizes kept (the most recently asked for): tasks mostly use the node's --default-disk.
POOL_SIZES = 3


class WorkPool:
    """Ready, never-mounted /work images under `root`, by size, formatted for `uid`."""

    def __init__(self, *, root: Path, uid: int, reserve: int = 0,
                 depth: int = POOL_DEPTH) -> None:
        """Touches nothing until clear()."""
        self._root = root
        self._uid = uid
        self._reserve = reserve
        self._depth = depth
        self._ready: dict[int, list[Path]] = {}
        self._names = itertools.count()
        self._refill: asyncio.Task[None] | None = None
        self._open = False

    def clear(self) -> None:
        """Remove every image (an earlier run's too) and open the pool. Never raises: a
        pool that cannot be made stays closed, and attempts format their own images."""
        self._close_now()
        try:
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self._root, 0o700)     # tasks and other users never reach the images
        except OSError as exc:
            log.warning("no /work image pool in %s: %s", self._root, exc)
            return
        self._open = True

    async def close(self) -> None:
        """Stop the refill and remove every image. Never raises."""
        refill, self._refill = self._refill, None
        if refill is not None:
            refill.cancel()
            await asyncio.gather(refill, return_exceptions=True)
        self._close_now()

    def take(self, size: int) -> Path | None:
        """A ready image of `size` bytes (the caller moves it away at once and owns it),
        or None when none is ready; either way the pool refills in the background."""
        if not self._open:
            return None
        ready = self._ready.pop(size, [])
        self._ready[size] = ready            # the most recently asked size last
        image = ready.pop() if ready else None
        for old in list(self._ready)[:-POOL_SIZES]:
            for path in self._ready.pop(old):
                _unlink(path)
            metrics.WORK_POOL.labels(str(old)).set(0)
        metrics.WORK_POOL.labels(str(size)).set(len(ready))
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._fill(),
                                                                  name="work image pool")
        return image

    async def _fill(self) -> None:
        while self._open:
            wanting = [size for size, ready in self._ready.items() if len(ready) < self._depth]
            if not wanting:
                return
            size = wanting[-1]
            image = self._root / f"{size}-{next(self._names)}.img"
            try:
                await scratch.format_image(image, size, self._uid, self._reserve)
            except ExecutorError as exc:
                # A full disk, most likely: attempts format their own (and say why).
                log.warning("cannot fill the /work image pool: %s", exc)
                _unlink(image)
                return
            if not self._open or size not in self._ready:
                _unlink(image)
                return
            self._ready[size].append(image)
            metrics.WORK_POOL.labels(str(size)).set(len(self._ready[size]))

    def _close_now(self) -> None:
        self._open = False
        for size in self._ready:
            metrics.WORK_POOL.labels(str(size)).set(0)
        self._ready.clear()
        shutil.rmtree(self._root, ignore_errors=True)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
