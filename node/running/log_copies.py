"""Pushing copies of ended attempts' logs to peers, so that a log outlives its node.

When this node has written an attempt's end, the attempt goes into a bounded queue; a
worker pushes the (already capped) log file to the --log-copies live peers that rendezvous
hashing ranks first for that attempt (node/core/rendezvous.py), over the PutLogCopy RPC with
the cluster's TLS and token. Readers compute the same ranking, so nothing about the copies
is written to etcd. Off the critical path: the finish transaction never waits for a copy.

A failed push is retried with back-off for a while, then given up (counted). While this
node is the only live one its copies wait (not spending their tries) until a peer joins;
a queue that overflows drops the newest (counted): their logs stay here only. Copies still
queued when the agent stops are not pushed (their logs stay on this node's disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import metrics, rendezvous
from node.core.config import Config
from node.core.errors import FilchError, LogCopyRefused
from node.core.tls import Security
from node.etcd import failpoints
from node.etcd.store import Store
from node.running.attempt_files import log_path
from node.running.runtime.logcap import lock_for
from node.scheduling.node_state import NodeState

log = logging.getLogger(__name__)

# Ended attempts waiting for their copies: at ~100 bytes each, a burst of 10,000 short tasks
# ending together costs about a megabyte; past it the newest are not copied (counted).
QUEUE_LIMIT = 10_000

# Concurrent pushes: each reads one log file and streams it to one peer. Two keep a peer
# busy without letting copies compete with the tasks for this node's disk and network.
WORKERS = 2

# Bytes per PutLogCopy message: well under gRPC's 4 MiB message limit, few messages per log.
CHUNK_BYTES = 256 * 1024

# Retries of one copy: back-off doubling from RETRY_FIRST to RETRY_MAX, for up to
# GIVE_UP_AFTER seconds (a peer restarting, etcd electing a leader, a partition healing).
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
GIVE_UP_AFTER = 600.0

# How long the list of live nodes is reused: copies of a burst of ended attempts then cost
# one etcd read, and a peer that died within it is just a failed push that is retried.
NODES_TTL = 2.0

# A push's deadline: a 100 MiB log over a slow link still fits; a peer that hangs does not
# hold a worker forever.
PUSH_TIMEOUT = 300.0


@dataclass(frozen=True)
class Ended:
    """An attempt this node ran and whose end it wrote."""

    task_id: str
    attempt: int
    node_id: str
    """This node's registration that ran it (the receiver checks it against the record)."""
    ended_at: float
    """Wall-clock time of its end (for filch_log_copy_lag_seconds)."""
    queued_at: float


class LogCopier:
    """Pushes copies of this node's ended attempts' logs to the peers that should hold them."""

    def __init__(self, *, config: Config, store: Store, state: NodeState,
                 security: Security) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._security = security
        self._queue: asyncio.Queue[Ended] = asyncio.Queue(QUEUE_LIMIT)
        self._nodes: list[pb.Node] = []
        self._nodes_read = -NODES_TTL
        self._busy = 0

    def offer(self, task: pb.Task, attempt: int) -> None:
        """Queue copies of the attempt's log (its end was just written from this node).
        Never blocks; with --log-copies 0 does nothing."""
        if self._config.log_copies == 0:
            return
        ended_at = time.time()
        for record in task.attempts:
            if record.attempt == attempt and record.HasField("finished_at"):
                ended_at = record.finished_at.ToNanoseconds() / 1e9
        try:
            self._queue.put_nowait(Ended(task.id, attempt, task.node_id, ended_at,
                                         time.monotonic()))
        except asyncio.QueueFull:
            metrics.LOG_COPIES.labels("dropped").inc()
            log.warning("log copy queue full (%d): attempt %d of task %s stays on this node "
                        "only", QUEUE_LIMIT, attempt, task.id)
            return
        self._update_pending()

    async def run(self) -> None:
        """Push queued copies until cancelled (a copy in flight is abandoned)."""
        async with asyncio.TaskGroup() as group:
            for number in range(WORKERS):
                group.create_task(self._work(), name=f"log copier {number}")

    async def shutdown(self) -> None:
        """Nothing to undo: a copy not pushed leaves the log on this node only."""

    def _update_pending(self) -> None:
        metrics.LOG_COPIES_PENDING.set(self._queue.qsize() + self._busy)

    async def _work(self) -> None:
        while True:
            ended = await self._queue.get()
            self._busy += 1
            try:
                await self._copy(ended)
            finally:
                self._busy -= 1
                self._update_pending()

    async def _copy(self, ended: Ended) -> None:
        """Push one attempt's copies, retrying with back-off; count how it went."""
        path = log_path(self._config.path, ended.task_id, ended.attempt)
        delay = RETRY_FIRST
        deadline = time.monotonic() + GIVE_UP_AFTER
        while True:
            if not await asyncio.to_thread(path.exists):
                metrics.LOG_COPIES.labels("gone").inc()
                return
            try:
                targets = await self._targets(ended)
                if targets:
                    for node in targets:
                        await self._push(node, ended, path)
                    metrics.LOG_COPIES.labels("copied").inc()
                    metrics.LOG_COPY_LAG.observe(max(0.0, time.time() - ended.ended_at))
                    return
                # Alone: wait for a peer without spending the tries (level-triggered: the
                # node list is read again after the back-off).
                deadline = time.monotonic() + GIVE_UP_AFTER
            except LogCopyRefused as exc:
                metrics.LOG_COPIES.labels("refused").inc()
                log.warning("log copy of task %s attempt %d refused: %s", ended.task_id,
                            ended.attempt, exc)
                return
            except (FilchError, OSError, grpc.aio.AioRpcError) as exc:
                if time.monotonic() + delay > deadline:
                    metrics.LOG_COPIES.labels("gave_up").inc()
                    log.warning("gave up copying the log of task %s attempt %d: %s",
                                ended.task_id, ended.attempt, exc)
                    return
                log.info("log copy of task %s attempt %d failed (retried in %gs): %s",
                         ended.task_id, ended.attempt, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _targets(self, ended: Ended) -> list[pb.Node]:
        """The live peers that should hold this attempt's copies (rendezvous order)."""
        now = time.monotonic()
        if now - self._nodes_read >= NODES_TTL:
            self._nodes = await self._store.list_nodes()
            self._nodes_read = now
        registration = self._state.registration
        mine = {ended.node_id, registration.node_id if registration else ""}
        peers = {node.id: node for node in self._nodes if node.id not in mine}
        ranked = rendezvous.rank(ended.task_id, ended.attempt, peers)
        return [peers[node_id] for node_id in ranked[:self._config.log_copies]]

    async def _push(self, node: pb.Node, ended: Ended, path: Path) -> None:
        """Stream the log file to one peer. Raises LogCopyRefused (for good) or a
        transient error."""
        await failpoints.hit("log_copies.before_push")
        async with self._security.aio_channel(node.address) as channel:
            stub = pb_grpc.SchedulerStub(channel)
            try:
                await stub.PutLogCopy(_chunks(ended, path), timeout=PUSH_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.FAILED_PRECONDITION):
                    raise LogCopyRefused(f"node {node.name}: {exc.details()}") from exc
                raise


async def _chunks(ended: Ended, path: Path) -> AsyncIterator[pb.LogCopyChunk]:
    """The copy's messages: the first names the attempt. The file of an ended attempt no
    longer changes; the writer's lock is taken anyway, as readers do."""
    yield pb.LogCopyChunk(task_id=ended.task_id, attempt=ended.attempt, node_id=ended.node_id)
    def read(fd: int, at: int) -> bytes:
        with lock_for(path):
            return os.pread(fd, CHUNK_BYTES, at)

    offset = 0
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            data = await asyncio.to_thread(read, fd, offset)
            if not data:
                return
            offset += len(data)
            yield pb.LogCopyChunk(data=data)
    finally:
        os.close(fd)
