"""A lifecycle transaction's parts: the record a move starts from, the move, its status
key, and the compares and operations that keep record and status key together (design.md:
both change in one etcd transaction, fenced by the attempt's token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aetcd.rpc as rpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.limits import ETCD_KEY_OVERHEAD_BYTES, MOVE_KEYS_BYTES
from node.core.states import FINISHED


@dataclass(frozen=True)
class Versioned:
    """A Task record together with the etcd mod_revision it was read at."""

    task: pb.Task
    mod_revision: int


def status_key(task: pb.Task) -> bytes:
    """The status key a task record in this state is paired with."""
    if task.state == pb.TASK_STATE_PENDING:
        return keys.blocked(task.id) if task.hold != pb.HOLD_NONE else keys.queued(task.id)
    if task.state == pb.TASK_STATE_RUNNING:
        return keys.running(task.node_id, task.id)
    epoch = keys.epoch_ms(task.finished_at.seconds + task.finished_at.nanos / 1e9)
    if task.state == pb.TASK_STATE_COMPLETE:
        return keys.complete(epoch, task.id)
    if task.state == pb.TASK_STATE_CANCELED:
        return keys.canceled(epoch, task.id)
    raise ValueError(f"task {task.id} has no state")


def index_keys(task: pb.Task) -> set[bytes]:
    """The secondary keys (value "") that exist while the record is in this state: the
    priority queue key and its shard twin beside a queued key, and while a task waits for
    its dependencies (or for its array's submission, which may carry dependencies too)
    one key per parent, so that a parent's end finds its dependents with one range read.
    A task of an array also has its open-member key until it ends: "has the array ended"
    is a range of limit 1, whatever the array's size. While RUNNING: the running-task
    index key (/placed/<node-id>/<id>: not on the lease, so a dead node's tasks are one
    range read and recovery never scans every record). An accounted task (its owner is a
    user) also has its /pending/ key while PENDING and its /charge/ key while RUNNING."""
    index = ({keys.open_member(task.array_id, task.id)}
             if task.array_id and task.state not in FINISHED else set())
    owner = task.spec.owner or keys.DEFAULT_OWNER
    if task.state == pb.TASK_STATE_RUNNING:
        index.add(keys.placed(task.node_id, task.id))
        if task.accounted:
            index.add(keys.charge(owner, task.id, task.spec.cpu_millis, task.spec.memory_bytes))
        return index
    if task.state != pb.TASK_STATE_PENDING:
        return index
    if task.accounted:
        index.add(keys.pending(owner, task.id))
    if task.hold == pb.HOLD_NONE:
        return index | {keys.queue(task.spec.priority, owner, task.id),
                        keys.shard_queue(task.spec.priority, owner, task.id)}
    if task.hold in (pb.HOLD_DEPENDENCIES, pb.HOLD_ARRAY):
        return index | {keys.dependency(parent.id, task.id) for parent in task.spec.after}
    return index


def dependents_flags(move: Move) -> list[bytes]:
    """The /dependents/ flags a submit puts, one per parent of a task created held with
    dependencies: the writer of a parent's end learns from it, with one read, that
    someone waits (node/etcd/release_marks.py). Put, never compared: idempotent."""
    if move.old is not None or move.new.state != pb.TASK_STATE_PENDING \
            or move.new.hold not in (pb.HOLD_DEPENDENCIES, pb.HOLD_ARRAY):
        return []
    return sorted({keys.has_dependents(parent.id) for parent in move.new.spec.after})


def group_marks(added: set[bytes]) -> list[bytes]:
    """The group marks (keys.GROUPS) of the queue keys a move puts: a group that gets a key
    has its mark in the same transaction, so a reader of the marks finds every group that
    held a key at the revision it read them (node/scheduling/queue_view.py). Put, never
    compared; deleted only by a transaction that finds the group empty."""
    return sorted({keys.group_mark(*keys.parse_queue(key)[:2])
                   for key in added if key.startswith(keys.QUEUE)})


def move_bytes(move: Move) -> int:
    """What one move adds to a transaction, for limits.batches: its record and keys."""
    return (move.new.ByteSize() + MOVE_KEYS_BYTES
            + sum(len(key) + len(value) for key, value in move.also))


@dataclass(frozen=True)
class Move:
    """One task's transition, for transition_many (fields as in Store.transition)."""

    old: Versioned | None
    new: pb.Task
    fence: int = 0
    owner_gone: bool = False
    requires: tuple[bytes, ...] = ()
    """Keys that must exist for the move to happen (a submit's parents)."""
    also: tuple[tuple[bytes, bytes], ...] = ()
    """Keys put with the move when it happens and only then (a submit's audit entry)."""


def append_move(move: Move, lease_id: int, compare: list[Any], success: list[Any]) -> None:
    """Add one move's compares and operations: record and status key, always together."""
    old, new = move.old, move.new
    record_key = keys.task(new.id)
    new_status = status_key(new)
    old_status = b""
    if old is None:
        compare.append(key_compare(record_key, "version", 0))
    else:
        compare.append(key_compare(record_key, "mod_revision", old.mod_revision))
        old_status = status_key(old.task)
        if move.fence:
            compare.append(key_compare(old_status, "create_revision", move.fence))
        elif move.owner_gone:
            compare.append(key_compare(old_status, "version", 0))
        else:
            compare.append(key_compare(old_status, "version", 0, rpc.Compare.GREATER))
        if old_status != new_status:
            success.append(rpc.RequestOp(
                request_delete_range=rpc.DeleteRangeRequest(key=old_status)))
    if old_status != new_status:
        lease = lease_id if new.state == pb.TASK_STATE_RUNNING else 0
        success.append(rpc.RequestOp(
            request_put=rpc.PutRequest(key=new_status, value=b"", lease=lease)))
    for key in move.requires:
        compare.append(key_compare(key, "version", 0, rpc.Compare.GREATER))
    old_index = index_keys(old.task) if old is not None else set()
    new_index = index_keys(new)
    for key in sorted(old_index - new_index):
        success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key)))
    for key in sorted(new_index - old_index):
        success.append(rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=b"")))
    for key in [*dependents_flags(move), *group_marks(new_index - old_index)]:
        # Several moves of one transaction share a parent or a queue group: etcd refuses a
        # key put twice in one transaction.
        if not any(op.request_put.key == key for op in success if op.HasField("request_put")):
            success.append(rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=b"")))
    for key, value in move.also:
        success.append(rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value)))
    success.append(rpc.RequestOp(
        request_put=rpc.PutRequest(key=record_key, value=new.SerializeToString())))


def written_bytes(move: Move) -> int:
    """What one move adds to etcd's database: every key it puts (key, value and etcd's
    per-revision overhead) and every key it deletes (a tombstone), until compaction."""
    compare: list[Any] = []
    success: list[Any] = []
    append_move(move, 0, compare, success)
    total = 0
    for op in success:
        if op.HasField("request_put"):
            total += len(op.request_put.key) + len(op.request_put.value)
        else:
            total += len(op.request_delete_range.key)
        total += ETCD_KEY_OVERHEAD_BYTES
    return total


def move_ops(move: Move) -> int:
    """What one move adds to the longer of a transaction's compare and operation lists
    (etcd's --max-txn-ops bounds each list; limits.MAX_TXN_OPS)."""
    compare: list[Any] = []
    success: list[Any] = []
    append_move(move, 0, compare, success)
    return max(len(compare), len(success))


def key_compare(key: bytes, target: str, value: int, result: int = 0,
                range_end: bytes = b"") -> Any:
    """An etcd Compare on one key (or every key of [key, range_end): an empty range
    compares as a key that does not exist): version, create_revision or mod_revision
    (EQUAL by default)."""
    targets = {"version": rpc.Compare.VERSION, "create_revision": rpc.Compare.CREATE,
               "mod_revision": rpc.Compare.MOD}
    return rpc.Compare(key=key, target=targets[target], result=result, range_end=range_end,
                       **{target: value})


def none_created_after(start: bytes, end: bytes, revision: int) -> Any:
    """A compare that holds while no key of [start, end) was written after revision (an
    empty range holds). For keys written once and never changed (the queue keys), their
    mod_revision is their creation."""
    return key_compare(start, "mod_revision", revision + 1, rpc.Compare.LESS, range_end=end)
