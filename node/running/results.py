"""Writing attempts' results behind their fence, through the group committer.

A result is written only while the attempt's running key is the one its steal created
(create_revision == fencing token). Results that end together share one transaction
(group_commit.py); one whose fence fails is retried alone there, so it never holds back
the others. A revoked attempt's result is dropped. After a write that timed out, a failed
compare may mean the earlier try landed: the record is read back to tell.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import lifecycle, metrics
from node.core.errors import FilchError, TooLarge
from node.core.limits import ETCD_MAX_REQUEST_BYTES
from node.etcd.group_commit import GroupCommitter
from node.etcd.store import Store
from node.etcd.txn import Move, Versioned
from node.running.runtime.base import Attempt

log = logging.getLogger(__name__)

# Back-off while etcd cannot take a result; the lease deadline bounds the retries (a
# fenced node's attempts are revoked, and their results dropped).
FINISH_RETRY = 0.5


@dataclass
class LocalAttempt:
    """An attempt running on this node."""

    task: pb.Task
    """The RUNNING record as the steal wrote it (its mod_revision is the fencing token)."""
    handle: Attempt | None = None
    revoked: bool = False
    """Set when the task was taken away (canceled, requeued): its result is not written."""
    grace: float | None = None
    """SIGTERM -> SIGKILL seconds for stopping a revoked attempt (the shortest asked for)."""
    stopping: bool = False
    """Set while a stop of the container is under way (sweeps do not start another)."""
    started: bool = False
    """Set as executor.start() is called: from then on the task may have run (a hand-back
    of one that never started requeues it even when restart=false)."""
    exited: bool = False
    """Set once the process has ended (its own finish then deletes the running key)."""
    ran_before: float = 0.0
    """Seconds of its time limit spent before this node started it (adopted attempts)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def token(self) -> int:
        return self.task.fencing_token

    def move(self, new: pb.Task) -> Move:
        """new written behind this attempt's fence."""
        return Move(Versioned(self.task, self.token), new, fence=self.token)


class ResultWriter:
    """Records attempts' ends: COMPLETE with their reason, or PENDING for a retry
    (retries.attempt_ended decides), or nothing when revoked."""

    def __init__(self, *, store: Store) -> None:
        self._store = store
        self._committer = GroupCommitter(store=store)

    async def write(self, local: LocalAttempt, new: pb.Task) -> bool:
        """Write new behind local's fence, retrying through etcd outages until it is
        recorded (True) or the attempt is no longer ours (False: fenced or revoked)."""
        while not local.revoked:
            try:
                written = await self._write_once(local, new)
            except FilchError as exc:
                log.warning("cannot record the end of task %s yet: %s", new.id, exc)
                await asyncio.sleep(FINISH_RETRY)
                continue
            if written:
                _count(new)
            else:
                metrics.FENCED_WRITES.inc()
                log.warning("task %s attempt %d: result rejected, this node no longer owns it",
                            new.id, new.attempt)
            return written
        return False

    async def _write_once(self, local: LocalAttempt, new: pb.Task) -> bool:
        """One try. A record etcd refuses at its size is written without its args and env
        (a permanent error, said in the message) rather than retried unchanged forever."""
        try:
            if await self._committer.transition(local.move(new)) is not None:
                return True
        except TooLarge:
            smaller = lifecycle.too_large(new, ETCD_MAX_REQUEST_BYTES)
            log.error("task %s: %s", new.id, smaller.message)
            if await self._committer.transition(local.move(smaller)) is not None:
                return True
        return await self._already_recorded(new)

    async def _already_recorded(self, new: pb.Task) -> bool:
        """After a failed compare: did an earlier try (that timed out) write this result?
        (A retry's record has no finished_at and no token: its new history entry, with
        that attempt's end time, tells it apart.)"""
        found = await self._store.get_task(new.id)
        return (found is not None and found.task.state == new.state
                and found.task.attempt == new.attempt
                and found.task.fencing_token == new.fencing_token
                and found.task.finished_at == new.finished_at
                and found.task.attempts[-1:] == new.attempts[-1:])


def _count(new: pb.Task) -> None:
    """The metrics of an attempt end just written: its reason, and a retry by class."""
    ended = new.attempts[-1] if new.attempts else None
    reason = ended.reason if ended is not None and ended.attempt == new.attempt else new.reason
    metrics.FINISHED.labels(pb.Reason.Name(reason)[len("REASON_"):]).inc()
    if new.state == pb.TASK_STATE_PENDING and new.hold == pb.HOLD_RETRY and ended is not None:
        failure = lifecycle.failure_class(ended)
        if failure is not None:
            metrics.RETRIES.labels(failure).inc()
