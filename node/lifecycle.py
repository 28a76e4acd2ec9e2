"""The records each lifecycle arrow writes (design.md, "Task lifecycle"). Pure functions.

Store.transition writes them together with their status key; these only build them.
"""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.limits import MAX_MESSAGE_CHARS


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
    """-> COMPLETE or CANCELED now, with this reason."""
    new = _copy(task)
    new.state = state  # type: ignore[assignment]
    new.reason = reason  # type: ignore[assignment]
    new.exit_code = exit_code
    new.message = _cut(message)
    new.finished_at.GetCurrentTime()
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


def _cut(message: str) -> str:
    """A message short enough that the record stays within limits.RECORD_OVERHEAD_BYTES."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + " [...]"


# Failure classes --retry-on names, in the order help texts list them.
RETRY_CLASSES = ("failed", "oom", "timeout", "start-failed")


def failure_class(task: pb.Task) -> str | None:
    """The --retry-on class of how this attempt ended (validation.RETRY_CLASSES), or None
    for a success or an end that is never retried (canceled, node lost)."""
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
