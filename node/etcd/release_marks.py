"""Release marks: the writer of a parent's end says so, once, for the one node that will
release its dependents (node/scheduling/dependencies.py).

Every path that ends tasks (a finish, a cancel, a hand-back as NODE_LOST, a dependency
failure, an array cancel, a time-out) commits through Store.transition_many, which calls
this after a successful commit. One read round trip per committed batch asks, for each
ended task, whether a /dependents/ flag names it or its array, and for each array whether
an open member is left (range of limit 1); a parent that ended and has dependents gets its
/release/ mark. So a task end nobody waits for costs one small read, and no other node
hears of it.

The mark's value is empty ("ended: decide the dependents"), or the id of an array member
that ended otherwise than COMPLETE exit 0: the array can no longer succeed, so its
dependents fail now, not when its last member ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd.rpc as rpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.core.states import FINISHED
from node.etcd.txn import Move


@dataclass
class Ends:
    """What one committed batch ended: task ids, and per array a failed member's id ("" when
    none failed)."""

    tasks: list[str] = field(default_factory=list)
    arrays: dict[str, str] = field(default_factory=dict)


def ok(task: pb.Task) -> bool:
    """Ended COMPLETE, by itself, with exit code 0 (conditions.ended_ok, for arrays)."""
    return (task.state == pb.TASK_STATE_COMPLETE and task.reason == pb.REASON_EXITED
            and task.exit_code == 0)


def ends(moves: Sequence[Move]) -> Ends:
    """The tasks these moves take into a final state (from a state that was not)."""
    found = Ends()
    for move in moves:
        if move.old is None or move.old.task.state in FINISHED \
                or move.new.state not in FINISHED:
            continue
        found.tasks.append(move.new.id)
        if move.new.array_id:
            failed = found.arrays.get(move.new.array_id, "")
            found.arrays[move.new.array_id] = failed or ("" if ok(move.new) else move.new.id)
    return found


def queries(ended: Ends) -> list[Any]:
    """The read operations (one read-only transaction): each flag, then each array's first
    open member."""
    ops = [_first(keys.has_dependents(task_id)) for task_id in ended.tasks]
    for array_id in ended.arrays:
        ops.append(_first(keys.has_dependents(array_id)))
        ops.append(_first(keys.open_members(array_id), keys.prefix_end(keys.open_members(
            array_id))))
    return ops


def marks(ended: Ends, responses: Sequence[Any]) -> dict[str, str]:
    """parent id -> mark value, from the answers to queries(ended), in their order."""
    found = [bool(response.response_range.kvs) for response in responses]
    result = {task_id: "" for task_id, flagged in zip(ended.tasks, found, strict=False)
              if flagged}
    answers = iter(found[len(ended.tasks):])
    for array_id, failed in ended.arrays.items():
        flagged, still_open = next(answers), next(answers)
        if flagged and (failed or not still_open):
            result[array_id] = failed
    return result


def puts(found: dict[str, str]) -> list[Any]:
    """The write operations that leave these marks (a put: a second end of one parent, or
    a failure after an end, only starts one more pass)."""
    return [rpc.RequestOp(request_put=rpc.PutRequest(key=keys.release(parent_id),
                                                     value=value.encode()))
            for parent_id, value in sorted(found.items())]


def _first(key: bytes, range_end: bytes = b"") -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end, limit=1,
                                                        keys_only=True))
