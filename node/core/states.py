"""Which task states are final: the one definition every layer (store, scheduler, API,
CLI, logs) asks. A final task never changes state again; only housekeeping deletes it."""

from __future__ import annotations

from typing import Final

from node._gen.filch.v1 import filch_pb2 as pb

# The state names people type (`filch ls --state`, `?state=` on the HTTP API), one table.
STATE_BY_NAME: Final[dict[str, pb.TaskState.ValueType]] = {
    "pending": pb.TASK_STATE_PENDING,
    "running": pb.TASK_STATE_RUNNING,
    "complete": pb.TASK_STATE_COMPLETE,
    "canceled": pb.TASK_STATE_CANCELED,
}

FINISHED: Final[frozenset[int]] = frozenset({pb.TASK_STATE_COMPLETE, pb.TASK_STATE_CANCELED})


def is_finished(task: pb.Task) -> bool:
    """Whether the task has ended (COMPLETE or CANCELED) and will not run again."""
    return task.state in FINISHED
