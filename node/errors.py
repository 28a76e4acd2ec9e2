"""The exceptions filch raises across module boundaries. The API maps them to gRPC codes."""

from __future__ import annotations


class FilchError(Exception):
    """Base of every error filch raises on purpose."""


class InvalidArgument(FilchError):
    """The caller sent something malformed; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class TaskNotFound(FilchError):
    """No task has this id."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}; `filch ls` lists the known tasks")
        self.task_id = task_id


class Conflict(FilchError):
    """The request contradicts existing state (e.g. a request_id reused with another spec)."""


class StoreUnavailable(FilchError):
    """etcd cannot be reached or has no quorum; retrying later may succeed."""


class StoreFull(FilchError):
    """etcd raised its NOSPACE alarm; nothing new is accepted until housekeeping frees space."""


class OwnerUnavailable(FilchError):
    """The node that holds a task's logs cannot be reached."""


class Fenced(FilchError):
    """This node no longer owns the task: its write was rejected by the fencing compare."""


class ExecutorError(FilchError):
    """The task's container or process could not be started."""


class TooLarge(FilchError):
    """etcd or the channel refused a request or answer for its size; split the batch."""


class Overloaded(FilchError):
    """A load limit (pending tasks, log streams) is reached; retry later or raise it."""
