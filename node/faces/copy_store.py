"""Receiving a peer's copy of an ended attempt's log (the PutLogCopy RPC's logic).

The token interceptor has already refused callers without the cluster's token. Here the
copy itself is checked before a byte is kept: the task id's format, the attempt's record
(it exists, it has ended, and the sender is the node that ran it, so a node cannot plant a
log for an attempt another node ran), and the size (never past this node's log cap). The
file is written beside its place and renamed into it when complete, so a reader never sees
half a copy, and a refused or broken push leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import validation
from node.core.config import Config
from node.core.copy_paths import copy_path
from node.core.errors import InvalidArgument, NotStarted, TaskNotFound
from node.etcd.store import Store


class CopyStore:
    """Keeps the log copies peers push to this node under its log-copies tree."""

    def __init__(self, *, config: Config, store: Store) -> None:
        self._config = config
        self._store = store

    async def receive(self, chunks: AsyncIterator[pb.LogCopyChunk | object]) -> int:
        """Check and store one copy; return its size in bytes.

        Raises InvalidArgument (malformed first message, a copy past the cap), TaskNotFound
        (no such task or attempt), NotStarted (the attempt has not ended, or another node
        ran it). Nothing is kept unless the whole copy arrived and passed.
        """
        first = await anext(aiter(chunks), None)
        if not isinstance(first, pb.LogCopyChunk):
            raise InvalidArgument("request", "a PutLogCopy stream starts with a LogCopyChunk "
                                  "naming task_id, attempt and node_id")
        task_id = validation.task_id(first.task_id, "task_id")
        if first.attempt < 1:
            raise InvalidArgument("attempt", "must be at least 1")
        ended_at = await self._check_ended(task_id, first.attempt, first.node_id)
        target = copy_path(self._config.path, task_id, first.attempt)
        part, out = await asyncio.to_thread(_open_part, target, first.attempt)
        try:
            with out:
                size = await self._write(out, first.data, 0)
                async for chunk in chunks:
                    if not isinstance(chunk, pb.LogCopyChunk):
                        raise InvalidArgument("request", "not a LogCopyChunk")
                    size = await self._write(out, chunk.data, size)
            await asyncio.to_thread(_publish, part, target, ended_at)
            return size
        finally:
            await asyncio.to_thread(_discard, part)

    async def _write(self, out: BinaryIO, data: bytes, size: int) -> int:
        size += len(data)
        cap = self._config.max_log_bytes
        if size > cap:
            raise InvalidArgument("data", f"the copy passes this node's log cap of {cap} "
                                  "bytes (--max-log-bytes): a log is never longer")
        await asyncio.to_thread(out.write, data)
        return size

    async def _check_ended(self, task_id: str, attempt: int, sender: str) -> float:
        """The attempt's end (seconds since the epoch), once its record shows it ended on
        the sender."""
        found = await self._store.get_task(task_id)
        if found is None:
            raise TaskNotFound(task_id)
        for record in found.task.attempts:
            if record.attempt == attempt:
                if record.node_id != sender or not sender:
                    raise NotStarted(f"attempt {attempt} of task {task_id} ran on node "
                                     f"{record.node_name}, not on the sender: only the node "
                                     "that ran an attempt copies its log")
                return record.finished_at.ToNanoseconds() / 1e9
        raise NotStarted(f"task {task_id} has no ended attempt {attempt} (it may still run): "
                         "a log is copied only once its attempt has ended")


def _open_part(target: Path, attempt: int) -> tuple[Path, BinaryIO]:
    """A new file beside target, unique per push (two pushes of one copy never mix)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{attempt}.", suffix=".part")
    return Path(name), os.fdopen(fd, "wb")


def _publish(part: Path, target: Path, ended_at: float) -> None:
    """Dated by the attempt's end, as the original is: retention then removes the copy
    when its origin removes the log, however late the copy arrived. The rename makes the
    whole copy readable at once."""
    os.utime(part, (ended_at, ended_at))
    os.replace(part, target)


def _discard(part: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
