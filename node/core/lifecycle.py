"""The records each lifecycle arrow writes (design.md, "Task lifecycle"). Pure functions.

Store.transition writes them together with their status key; these only build them.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.limits import MAX_MESSAGE_CHARS

# Attempt history: the newest this many ended attempts are kept in the record (older ones
# are dropped, and the message says so). Each AttemptRecord is at most ~1.6 KiB (ids, a
# node name and address, two timestamps, a message cut to ATTEMPT_MESSAGE_CHARS), so the
# history adds at most ~32 KiB: with a message of MAX_MESSAGE_CHARS the record stays
# within limits.RECORD_OVERHEAD_BYTES (tests/unit/test_lifecycle.py checks the worst case).
# 20 is beyond any retry count people set in practice (Kubernetes' backoffLimit is 6).
MAX_ATTEMPT_RECORDS = 20
# An ended attempt's message (a start error, a node loss): enough for one error line.
ATTEMPT_MESSAGE_CHARS = 240


def _copy(task: pb.Task) -> pb.Task:
    new = pb.Task()
    new.CopyFrom(task)
    return new


def stolen(task: pb.Task, node_id: str, node_name: str, node_address: str) -> pb.Task:
    """PENDING -> RUNNING on this node, as the next attempt."""
    new = _copy(task)
    new.state = pb.TASK_STATE_RUNNING
    new.node_id, new.node_name, new.node_address = node_id, node_name, node_address
    new.attempt = task.attempt + 1
    new.message = ""
    new.started_at.GetCurrentTime()
    new.ClearField("finished_at")
    return new


def started(task: pb.Task, fencing_token: int) -> pb.Task:
    """The in-memory RUNNING record with the fencing token the steal transaction produced."""
    new = _copy(task)
    new.fencing_token = fencing_token
    return new


def finished(task: pb.Task, state: int, reason: int, *, exit_code: int = 0,
             message: str = "") -> pb.Task:
    """-> COMPLETE or CANCELED now, with this reason. A RUNNING task's attempt ends with
    it and joins the history."""
    new = _copy(task)
    new.state = state  # type: ignore[assignment]
    new.reason = reason  # type: ignore[assignment]
    new.exit_code = exit_code
    new.message = _cut(message)
    new.finished_at.GetCurrentTime()
    if task.state == pb.TASK_STATE_RUNNING:
        _record_attempt(task, new, reason, exit_code, message, new.finished_at)
    return new


def retried(task: pb.Task, reason: int, *, exit_code: int, backoff: float,
            why: str) -> pb.Task:
    """RUNNING -> PENDING, held (HOLD_RETRY) until now + backoff, one retry spent; the
    attempt joins the history with how it ended. why: the message of both ("retry 1 of 3
    in 1.6s after exit code 1"; retries.attempt_ended words it)."""
    new = _copy(task)
    now = Timestamp()
    now.GetCurrentTime()
    new.state = pb.TASK_STATE_PENDING
    new.hold = pb.HOLD_RETRY
    new.retries_used = task.retries_used + 1
    new.not_before.FromNanoseconds(now.ToNanoseconds() + int(backoff * 1e9))
    new.fencing_token = 0
    new.reason = pb.REASON_UNSPECIFIED
    new.exit_code = 0
    new.ClearField("finished_at")
    new.message = _cut(why)
    _record_attempt(task, new, reason, exit_code, why, now)
    return new


def released(task: pb.Task) -> pb.Task:
    """A held PENDING task (dependencies met, its array complete, its back-off over) into
    the queue: its blocked key becomes a queued key (txn.py moves the index keys)."""
    new = _copy(task)
    new.hold = pb.HOLD_NONE
    new.message = ""
    new.ClearField("not_before")
    return new


def requeued(task: pb.Task, why: str) -> pb.Task:
    """RUNNING -> PENDING again (the node was lost or shut down; restart=true)."""
    new = _copy(task)
    new.state = pb.TASK_STATE_PENDING
    new.message = _cut(f"requeued after attempt {task.attempt}: {why}")
    new.fencing_token = 0
    now = Timestamp()
    now.GetCurrentTime()
    _record_attempt(task, new, pb.REASON_NODE_LOST, 0, why, now)
    return new


def start_refused(task: pb.Task, node_name: str, why: str) -> pb.Task:
    """RUNNING -> PENDING again: the attempt could not start for a reason of its node (task
    network, /work, runc), not of the task; no retry is spent (node/running/runner.py)."""
    new = _copy(task)
    new.state = pb.TASK_STATE_PENDING
    new.message = _cut(f"requeued: attempt {task.attempt} could not start on node {node_name} "
                       f"(a problem of that node, not of the task): {why}")
    new.fencing_token = 0
    now = Timestamp()
    now.GetCurrentTime()
    _record_attempt(task, new, pb.REASON_START_FAILED, 0, why, now)
    return new


def lost(task: pb.Task, why: str) -> pb.Task:
    """The attempt's node was lost and the task may not run again: COMPLETE, NODE_LOST."""
    return finished(task, pb.TASK_STATE_COMPLETE, pb.REASON_NODE_LOST,
                    message=f"attempt {task.attempt} lost: {why}")


def too_large(task: pb.Task, limit: int) -> pb.Task:
    """The record `task`, which etcd refused at its size, made small enough to write: args
    and env (the only fields that can be that large) dropped, and a message saying so."""
    size = task.ByteSize()
    new = _copy(task)
    new.spec.ClearField("args")
    new.spec.ClearField("env")
    why = (f"the task record is {size} bytes, more than etcd takes in one request "
           f"({limit} bytes): its args and env were dropped.")
    new.message = _cut(f"{why} {task.message}" if task.message else why)
    return new


def _record_attempt(task: pb.Task, new: pb.Task, reason: int, exit_code: int, message: str,
                    finished_at: Timestamp) -> None:
    """Append task's current attempt, ended this way, to new's history: the one place
    every attempt end (finish, retry, requeue, NODE_LOST, cancel) records it. Only the
    newest MAX_ATTEMPT_RECORDS are kept; new's message says when older ones were dropped."""
    if task.attempt == 0 or any(kept.attempt == task.attempt for kept in new.attempts):
        return      # never started, or already recorded
    record = new.attempts.add(
        attempt=task.attempt, node_id=task.node_id, node_name=task.node_name,
        node_address=task.node_address, exit_code=exit_code,
        reason=reason,
        message=_cut(message, ATTEMPT_MESSAGE_CHARS))
    if task.HasField("started_at"):
        record.started_at.CopyFrom(task.started_at)
    record.finished_at.CopyFrom(finished_at)
    dropped = len(new.attempts) - MAX_ATTEMPT_RECORDS
    if dropped > 0:
        del new.attempts[:dropped]
    if new.attempts[0].attempt > 1:
        note = (f"(attempt history keeps the newest {MAX_ATTEMPT_RECORDS}: attempts 1-"
                f"{new.attempts[0].attempt - 1} were dropped)")
        # The note survives a message cut to length: it is what explains the gap.
        kept = _cut(new.message, MAX_MESSAGE_CHARS - len(note) - 8)
        new.message = f"{kept} {note}" if kept else note


def _cut(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message short enough that the record stays within limits.RECORD_OVERHEAD_BYTES."""
    if len(message) <= limit:
        return message
    return message[:limit] + " [...]"


# Failure classes --retry-on names, in the order help texts list them.
RETRY_CLASSES = ("failed", "oom", "timeout", "start-failed")


def failure_class(task: pb.Task | pb.AttemptRecord) -> str | None:
    """The --retry-on class of how this attempt ended (a finished record, or an attempt of
    the history), or None for a success or an end that is never retried (canceled, node
    lost: node loss is governed by spec.restart and spends no retry)."""
    if task.reason == pb.REASON_EXITED:
        return "failed" if task.exit_code != 0 else None
    return {pb.REASON_OOM_KILLED: "oom", pb.REASON_TIMED_OUT: "timeout",
            pb.REASON_START_FAILED: "start-failed"}.get(task.reason)


def restartable(spec: pb.TaskSpec) -> bool:
    """restart as the user meant it: unset means true."""
    return spec.restart if spec.HasField("restart") else True


def after_owner_lost(task: pb.Task, why: str) -> pb.Task:
    """What a RUNNING task becomes when its node is gone: requeued or NODE_LOST."""
    return requeued(task, why) if restartable(task.spec) else lost(task, why)
