"""Task logs: kept on the node that ran the attempt, streamed from any node.

The node that ran an attempt streams its log file from disk; any other node proxies the
request over gRPC to the owner's advertised address (design.md, "Logs"). When the owner is
gone, an ended attempt's log is read from a peer that holds a copy (node/faces/copy_finder.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import keys, metrics
from node.core.config import Config
from node.core.copy_paths import copy_path
from node.core.errors import (
    Compacted,
    FilchError,
    InvalidArgument,
    NotStarted,
    Overloaded,
    OwnerUnavailable,
    StoreUnavailable,
    TaskNotFound,
)
from node.core.lifecycle import MAX_ATTEMPT_RECORDS
from node.core.states import is_finished
from node.core.tls import Security
from node.etcd.store import Store
from node.faces.copy_finder import CopyFinder
from node.running.attempt_files import log_path
from node.running.runner import Runner
from node.running.runtime.logcap import Layout, lock_for, read_at

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024

# How often a follower looks for new output. Short enough to feel live in a terminal.
FOLLOW_POLL = 0.2

# Back-off after the watch on a pending task's record broke (etcd unreachable), before the
# record is read again.
WATCH_RETRY = 0.5

# A proxied request carries this metadata so that it is never proxied a second time.
PROXIED_HEADER = "filch-proxied"


class LogService:
    """Streams the log of a task's attempt from wherever it lives."""

    def __init__(self, *, config: Config, store: Store, runner: Runner,
                 security: Security) -> None:
        self._config = config
        self._store = store
        self._runner = runner
        self._security = security
        self._streams = 0
        self._copies = CopyFinder(config=config, store=store, security=security,
                                  proxied_header=PROXIED_HEADER)

    async def stream(self, task_id: str, *, follow: bool, attempt: int,
                     proxied: bool) -> AsyncIterator[bytes]:
        """Yield the log of one attempt (0: the latest); with follow, until it ends.

        Raises TaskNotFound, NotStarted, InvalidArgument (no such attempt),
        OwnerUnavailable (the owning node cannot be reached) or Overloaded (this node
        already serves --max-log-streams streams).
        """
        limit = self._config.max_log_streams
        if self._streams >= limit:
            raise Overloaded(f"node {self._config.name} already serves {self._streams} log "
                             f"streams (limit {limit}, --max-log-streams); retry later or "
                             "ask another node")
        self._streams += 1
        metrics.LOG_STREAMS.inc()
        try:
            async for chunk in self._stream(task_id, follow=follow, attempt=attempt,
                                            proxied=proxied):
                yield chunk
        finally:
            self._streams -= 1
            metrics.LOG_STREAMS.dec()

    async def _stream(self, task_id: str, *, follow: bool, attempt: int,
                      proxied: bool) -> AsyncIterator[bytes]:
        task = await self._wait_started(task_id, follow)
        if task is None:
            return      # finished without ever starting: there is no output
        attempt = attempt or task.attempt
        if attempt > task.attempt:
            raise InvalidArgument("attempt", f"task {task_id} has no attempt {attempt}: its "
                                  f"attempts are {_attempt_range(task)}")
        where = ran_on(task, attempt)
        path = log_path(self._config.path, task_id, attempt)
        layout = Layout.for_cap(self._config.max_log_bytes)
        copy = copy_path(self._config.path, task_id, attempt)
        if not path.exists() and copy.exists():
            # A copy is made only of an ended attempt: it no longer changes.
            async for chunk in read_file(copy, lambda: False, layout):
                yield chunk
            return
        if path.exists() or proxied or (where is not None
                                        and where.address == self._config.advertise_address):
            # Between the steal and the container start the file does not exist yet.
            while not path.exists() and self._runner.is_running(task_id, attempt):
                if not follow:
                    return
                await asyncio.sleep(FOLLOW_POLL)
            if not path.exists():
                raise TaskNotFound(f"{task_id} (the log of attempt {attempt} is no longer on "
                                   f"node {self._config.name})")
            async for chunk in read_file(path, lambda: follow and self._runner.is_running(
                    task_id, attempt), layout):
                yield chunk
            return
        if where is None:
            why: FilchError = OwnerUnavailable(
                f"attempt {attempt} of task {task_id} ran on another node, which the task's "
                f"history no longer names (it keeps the newest {MAX_ATTEMPT_RECORDS} "
                "attempts)")
        else:
            given = False
            try:
                async for chunk in self._proxy(task.id, where, attempt, follow):
                    given = True
                    yield chunk
                return
            except (OwnerUnavailable, TaskNotFound) as exc:
                if given:
                    raise
                why = exc
        async for chunk in self._copies.stream(task.id, attempt,
                                               where.node_id if where else "", why):
            yield chunk

    async def _wait_started(self, task_id: str, follow: bool) -> pb.Task | None:
        while True:
            found = await self._store.get_task(task_id)
            if found is None:
                raise TaskNotFound(task_id)
            task = found.task
            if task.attempt > 0:
                return task
            if is_finished(task):
                return None
            if not follow:
                raise NotStarted(f"task {task_id} has not started yet, so it has no log; "
                                 "use `filch logs -f` to wait for it")
            await self._changed(task_id, found.mod_revision)

    async def _changed(self, task_id: str, revision: int) -> None:
        """Return once the task's record changed after revision, or when the watch broke
        (the caller reads the record again either way). One etcd watch per waiting
        follower, and no requests while nothing happens: a pending task may wait hours."""
        try:
            # A task record's key is no prefix of any other key (ids have a fixed length).
            async for _ in self._store.watch(keys.task(task_id), revision + 1):
                return
        except Compacted:
            return      # it changed long ago: the next read shows how
        except StoreUnavailable as exc:
            log.info("watch of task %s restarts: %s", task_id, exc)
            await asyncio.sleep(WATCH_RETRY)

    async def _proxy(self, task_id: str, node: Place, attempt: int,
                     follow: bool) -> AsyncIterator[bytes]:
        where = f"node {node.name} ({node.address})"
        request = pb.StreamLogsRequest(id=task_id, follow=follow, attempt=attempt)
        try:
            async with self._security.aio_channel(node.address) as channel:
                stub = pb_grpc.SchedulerStub(channel)
                call = stub.StreamLogs(request, metadata=((PROXIED_HEADER, "1"),))
                async for chunk in call:
                    yield chunk.data
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise OwnerUnavailable(
                    f"{where}, which ran attempt {attempt} of task {task_id}, cannot be "
                    "reached (it is gone or down)") from exc
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise TaskNotFound(f"{task_id} (its log is gone from {where})") from exc
            raise OwnerUnavailable(f"{where} failed to stream the log: {exc.details()}") from exc


@dataclass(frozen=True)
class Place:
    """The node an attempt ran on, as its record names it."""

    name: str
    address: str
    node_id: str = ""


def ran_on(task: pb.Task, attempt: int) -> Place | None:
    """Where this attempt of the task ran: its history entry, or the task's own node
    fields for the current attempt; None when the history no longer holds it."""
    for ended in task.attempts:
        if ended.attempt == attempt:
            return Place(ended.node_name, ended.node_address, ended.node_id)
    if attempt == task.attempt and task.node_address:
        return Place(task.node_name, task.node_address, task.node_id)
    return None


def _attempt_range(task: pb.Task) -> str:
    if task.attempt == 0:
        return "none yet"
    return "1" if task.attempt == 1 else f"1-{task.attempt}"


async def read_file(path: Path, follow: Callable[[], bool],
                    layout: Layout) -> AsyncIterator[bytes]:
    """Yield the log's content; while follow() is true, keep waiting for more.

    The agent may cut the middle of a live log (node/running/runtime/logcap.py): each read finds
    its place again from the output offset, so a follower that fell behind a cut gets a
    marker line for what it missed instead of repeated or garbled bytes.
    """
    def read(offset: int) -> tuple[bytes, int]:
        with lock_for(path):
            return read_at(stream.fileno(), offset, layout, CHUNK_BYTES)

    offset = 0
    with path.open("rb") as stream:
        while True:
            chunk, offset = await asyncio.to_thread(read, offset)
            if chunk:
                yield chunk
                continue
            if not follow():
                # The writer may have added its last bytes just before it ended.
                while True:
                    chunk, offset = await asyncio.to_thread(read, offset)
                    if not chunk:
                        return
                    yield chunk
            await asyncio.sleep(FOLLOW_POLL)
