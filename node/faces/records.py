"""Task, node and owner records as plain values: names of states, reasons and holds, exit
codes, timestamps, and the dicts the JSON outputs show (`filch ... -o json`, /api/v1/).

No click and no I/O. The JSON field names are a public contract (scripts parse them): add
fields if you must, never rename or drop one. node/faces/render.py words the same records for
people.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypedDict

from google.protobuf.timestamp_pb2 import Timestamp

from node._gen.filch.v1 import filch_pb2
from node.core import lifecycle
from node.core.states import is_finished


class TaskDict(TypedDict):
    """A task as `filch status -o json` prints it."""

    id: str
    name: str
    state: str  # PENDING RUNNING COMPLETE CANCELED
    node_id: str
    node_address: str
    exit_code: int | None  # set only when the command itself ended (EXITED, OOM_KILLED)
    reason: str  # EXITED OOM_KILLED NODE_LOST CANCELED START_FAILED, or "" while unfinished
    message: str
    command: str
    args: list[str]
    cpu: float  # cores
    memory_bytes: int
    disk_bytes: int  # 0: the node's --default-disk
    restart: bool
    network: str  # isolated, none or host (runc tasks; process-executor tasks share the host's)
    attempt: int
    submitted_at: str | None  # RFC 3339, UTC, milliseconds
    started_at: str | None
    finished_at: str | None
    array_id: str | None  # the array this task belongs to
    array_index: int | None
    after: list[DependencyDict]
    hold: str | None  # PENDING only: DEPENDENCIES, ARRAY or RETRY while held back
    not_before: str | None  # hold RETRY: when it may run again
    time_limit_seconds: float  # 0: none
    retries: int
    retry_on: list[str]
    retry_backoff_seconds: float
    retries_used: int
    priority: int
    owner: str
    attempts: list[AttemptDict]  # every ended attempt, then the running one
    constraints: list[str]  # where it may run (submit --constraint)
    ahead: int | None  # status of a queued task: tasks ahead of it in the queue
    ahead_capped: bool  # ahead is a lower bound (why.AHEAD_CAP)
    reserved_node: str | None  # PENDING: the node holding room for it (no starvation)
    reserved_since: str | None


class DependencyDict(TypedDict):
    id: str
    kind: str  # success (--after), any (--after-any) or array (--after-array)


class AttemptDict(TypedDict):
    attempt: int
    node_id: str
    node_name: str
    started_at: str | None
    finished_at: str | None  # None while it runs
    exit_code: int | None
    reason: str
    message: str


class NodeDict(TypedDict):
    """A node as `filch nodes -o json` prints it."""

    id: str
    name: str
    address: str
    cpu_capacity: float  # cores
    memory_capacity_bytes: int
    cpu_allocated: float  # cores
    memory_allocated_bytes: int
    running: int
    etcd_leader: bool
    executor: str
    nospace: bool
    allow_host_network: bool
    disk_capacity_bytes: int
    disk_allocated_bytes: int
    capabilities: dict[str, str]
    labels: dict[str, str]  # --label
    taints: dict[str, str]  # --taint
    start_backoff: bool  # steals nothing after node-side start failures in a row
    start_backoff_until: str | None
    node_side_start_failures: int
    start_failure: str  # the last node-side start failure, while backed off
    cordoned: bool
    draining: bool
    drain_deadline: str  # RFC 3339 while draining, else ""
    reserved_task: str  # the task it holds room for (no starvation), else ""
    reserved_priority: int
    reserved_since: str | None


DEPENDENCY_KINDS = {filch_pb2.DEPENDENCY_KIND_SUCCESS: "success",
                    filch_pb2.DEPENDENCY_KIND_ANY: "any",
                    filch_pb2.DEPENDENCY_KIND_ARRAY: "array"}

# Only these reasons mean the command itself ended, so only they carry a real exit code.
REASONS_WITH_EXIT_CODE = frozenset({filch_pb2.REASON_EXITED, filch_pb2.REASON_OOM_KILLED})


def state_name(state: int) -> str:
    """"RUNNING" for TASK_STATE_RUNNING; a number from a newer server stays a number."""
    try:
        return filch_pb2.TaskState.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return str(state)


def reason_name(reason: int) -> str:
    """"OOM_KILLED" for REASON_OOM_KILLED, "" for unset."""
    if reason == filch_pb2.REASON_UNSPECIFIED:
        return ""
    try:
        return filch_pb2.Reason.Name(reason).removeprefix("REASON_")  # type: ignore[arg-type]
    except ValueError:
        return str(reason)


def exit_code(task: filch_pb2.Task) -> int | None:
    """The command's exit status, or None when it has not ended by itself."""
    if is_finished(task) and task.reason in REASONS_WITH_EXIT_CODE:
        return task.exit_code
    return None


def timestamp_to_datetime(stamp: Timestamp) -> datetime:
    return datetime.fromtimestamp(stamp.seconds, UTC).replace(microsecond=stamp.nanos // 1000)


def format_timestamp(stamp: Timestamp) -> str:
    """RFC 3339 in UTC with milliseconds: "2026-11-27T07:10:00.123Z"."""
    moment = datetime.fromtimestamp(stamp.seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{stamp.nanos // 1_000_000:03d}Z"


def optional_timestamp(message: filch_pb2.Task | filch_pb2.AttemptRecord | filch_pb2.Node,
                        field: str) -> str | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    stamp: Timestamp = getattr(message, field)
    return format_timestamp(stamp)


def task_to_dict(task: filch_pb2.Task) -> TaskDict:
    """The task's JSON form: enum prefixes stripped, CPU in cores, unset times as None."""
    return {
        "id": task.id,
        "name": task.spec.name,
        "state": state_name(task.state),
        "node_id": task.node_id,
        "node_address": task.node_address,
        "exit_code": exit_code(task),
        "reason": reason_name(task.reason),
        "message": task.message,
        "command": task.spec.command,
        "args": list(task.spec.args),
        "cpu": task.spec.cpu_millis / 1000,
        "memory_bytes": task.spec.memory_bytes,
        "disk_bytes": task.spec.disk_bytes,
        "restart": lifecycle.restartable(task.spec),
        "network": task.spec.network or "isolated",
        "attempt": task.attempt,
        "submitted_at": optional_timestamp(task, "submitted_at"),
        "started_at": optional_timestamp(task, "started_at"),
        "finished_at": optional_timestamp(task, "finished_at"),
        "array_id": task.array_id or None,
        "array_index": task.array_index if task.array_id else None,
        "after": [{"id": parent.id, "kind": DEPENDENCY_KINDS.get(parent.kind, "success")}
                  for parent in task.spec.after],
        "hold": hold_name(task),
        "not_before": (optional_timestamp(task, "not_before")
                       if task.hold == filch_pb2.HOLD_RETRY else None),
        "time_limit_seconds": task.spec.time_limit_seconds,
        "retries": task.spec.retries,
        "retry_on": list(task.spec.retry_on),
        "retry_backoff_seconds": task.spec.retry_backoff_seconds,
        "retries_used": task.retries_used,
        "priority": task.spec.priority,
        "owner": task.spec.owner or "default",
        "attempts": [attempt_to_dict(attempt) for attempt in attempt_history(task)],
        "constraints": list(task.spec.constraints),
        "ahead": (task.ahead if task.state == filch_pb2.TASK_STATE_PENDING
                  and task.hold == filch_pb2.HOLD_NONE else None),
        "ahead_capped": task.ahead_capped,
        "reserved_node": task.reserved_node or None,
        "reserved_since": optional_timestamp(task, "reserved_since"),
    }


def hold_name(task: filch_pb2.Task) -> str | None:
    """"DEPENDENCIES" for a PENDING task held for its dependencies; None when not held."""
    if task.state != filch_pb2.TASK_STATE_PENDING or task.hold == filch_pb2.HOLD_NONE:
        return None
    try:
        return filch_pb2.Hold.Name(task.hold).removeprefix("HOLD_")
    except ValueError:
        return str(task.hold)


def attempt_history(task: filch_pb2.Task) -> list[filch_pb2.AttemptRecord]:
    """Every ended attempt, then the one running now (without finished_at)."""
    history = list(task.attempts)
    if task.state == filch_pb2.TASK_STATE_RUNNING and (
            not history or history[-1].attempt < task.attempt):
        history.append(filch_pb2.AttemptRecord(
            attempt=task.attempt, node_id=task.node_id, node_name=task.node_name,
            node_address=task.node_address, started_at=task.started_at))
    return history


def attempt_to_dict(attempt: filch_pb2.AttemptRecord) -> AttemptDict:
    ended = attempt.HasField("finished_at")
    return {
        "attempt": attempt.attempt,
        "node_id": attempt.node_id,
        "node_name": attempt.node_name,
        "started_at": optional_timestamp(attempt, "started_at"),
        "finished_at": optional_timestamp(attempt, "finished_at"),
        "exit_code": (attempt.exit_code if ended and attempt.reason in REASONS_WITH_EXIT_CODE
                      else None),
        "reason": reason_name(attempt.reason),
        "message": attempt.message,
    }


def node_to_dict(node: filch_pb2.Node) -> NodeDict:
    """The node's JSON form: CPU in cores, memory in bytes."""
    return {
        "id": node.id,
        "name": node.name,
        "address": node.address,
        "cpu_capacity": node.cpu_capacity_millis / 1000,
        "memory_capacity_bytes": node.memory_capacity_bytes,
        "cpu_allocated": node.cpu_allocated_millis / 1000,
        "memory_allocated_bytes": node.memory_allocated_bytes,
        "running": node.running,
        "etcd_leader": node.etcd_leader,
        "executor": node.executor,
        "nospace": node.nospace,
        "allow_host_network": node.allow_host_network,
        "disk_capacity_bytes": node.disk_capacity_bytes,
        "disk_allocated_bytes": node.disk_allocated_bytes,
        "capabilities": dict(sorted(node.capabilities.items())),
        "labels": dict(sorted(node.labels.items())),
        "taints": dict(sorted(node.taints.items())),
        "start_backoff": node.start_backoff,
        "start_backoff_until": (optional_timestamp(node, "start_backoff_until")
                                if node.start_backoff else None),
        "node_side_start_failures": node.node_side_start_failures,
        "start_failure": node.start_failure,
        "cordoned": node.cordoned,
        "draining": node.draining,
        "drain_deadline": node.drain_deadline.ToJsonString() if node.draining else "",
        "reserved_task": node.reserved_task,
        "reserved_priority": node.reserved_priority,
        "reserved_since": (optional_timestamp(node, "reserved_since")
                           if node.reserved_task else None),
    }


def owner_to_dict(owner: filch_pb2.Owner) -> dict[str, object]:
    """An owner's JSON form (`filch owner ls -o json`, GET /api/v1/owners): CPU in cores,
    memory in bytes, share as a fraction of the cluster (0..1, weighted); decayed past usage
    in core-seconds and GiB-seconds, its fraction of every owner's (0..1) and the order the
    stealers sort owners by (lowest first)."""
    return {
        "name": owner.name,
        "weight": owner.weight,
        "cpu": owner.usage.cpu_millis / 1000,
        "memory_bytes": owner.usage.memory_bytes,
        "running": owner.usage.running,
        "share": owner.share,
        "decayed_cpu_seconds": owner.decayed.cpu_seconds,
        "decayed_memory_gib_seconds": owner.decayed.memory_gib_seconds,
        "usage_share": owner.usage_share,
        "order": owner.order,
    }


def user_to_dict(user: filch_pb2.User) -> dict[str, object]:
    """A user's JSON form (`filch user ls -o json`): limits in cores and bytes, null where
    there is none; never its token hash."""
    quota = user.quota
    return {
        "name": user.name,
        "role": "admin" if user.role == filch_pb2.ROLE_ADMIN else "user",
        "max_cpu": quota.max_cpu_millis / 1000 if quota.max_cpu_millis else None,
        "max_memory_bytes": quota.max_memory_bytes or None,
        "max_pending": quota.max_pending or None,
        "max_priority": quota.max_priority if quota.HasField("max_priority") else None,
        "created_at": user.created_at.ToJsonString() if user.HasField("created_at") else "",
        "token_issued_at": (user.token_issued_at.ToJsonString()
                            if user.HasField("token_issued_at") else ""),
        "token_expires_at": (user.token_expires_at.ToJsonString()
                             if user.HasField("token_expires_at") else ""),
    }
