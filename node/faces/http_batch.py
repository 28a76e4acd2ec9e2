"""The batch fields of a JSON submit body (POST /api/v1/tasks): dependencies, time limit,
retries, priority, owner and arrays, spelled as records.task_to_dict prints them.

Like the rest of the HTTP face this checks types and units only, raising HttpError 400
naming the field; the daemon validates the values (node/core/validation.py) before anything
is written. Numbers are also kept inside what the protobuf field can carry, so a huge
number is a 400 naming the field and not a crash in the protobuf runtime.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.errors import HttpError
from node.core.units import DURATION_FORMS, parse_duration
from node.faces import records

# The body fields this module reads, besides the ones node/faces/http_api.py reads.
FIELDS = frozenset({"after", "after_any", "after_array", "time_limit_seconds", "retries",
                    "retry_on", "retry_backoff_seconds", "priority", "owner", "array"})

# The JSON spellings of a dependency's kind (records.DEPENDENCY_KINDS, reversed).
KINDS = {"success": pb.DEPENDENCY_KIND_SUCCESS, "any": pb.DEPENDENCY_KIND_ANY,
         "array": pb.DEPENDENCY_KIND_ARRAY}
_DEPENDENCY_KEYS = frozenset({"id", "kind"})
_ARRAY_KEYS = frozenset({"start", "end", "step"})

# What the protobuf fields hold: uint32 retries, int32 priority, int64 array indices.
_UINT32 = (0, 2**32 - 1)
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
# Beyond this an integer is no longer exact as a double (the protobuf field's type).
_MAX_EXACT = 2**53


def apply(body: Mapping[str, Any], spec: pb.TaskSpec) -> None:
    """Copy the batch fields of body into spec; HttpError 400 naming the first bad one."""
    spec.after.extend(dependencies(body.get("after")))
    # The CLI's spellings too: --after-any ID... and --after-array ARRAY_ID... as id lists.
    for field, kind in (("after_any", pb.DEPENDENCY_KIND_ANY),
                        ("after_array", pb.DEPENDENCY_KIND_ARRAY)):
        spec.after.extend(pb.Dependency(id=parent, kind=kind)
                          for parent in names(field, body.get(field)))
    spec.time_limit_seconds = seconds("time_limit_seconds", body.get("time_limit_seconds"))
    spec.retries = whole("retries", body.get("retries"), _UINT32)
    spec.retry_on.extend(names("retry_on", body.get("retry_on")))
    spec.retry_backoff_seconds = seconds("retry_backoff_seconds",
                                         body.get("retry_backoff_seconds"))
    spec.priority = whole("priority", body.get("priority"), _INT32)
    owner = body.get("owner")
    if owner is not None and not isinstance(owner, str):
        raise HttpError(400, f"owner: must be a string, not {json.dumps(owner)}")
    spec.owner = owner or ""


def dependencies(value: Any) -> list[pb.Dependency]:
    """`after`: a list of {"id": ID, "kind": "success"|"any"|"array"} (kind defaults to
    success, as --after) or plain id strings (success)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise HttpError(400, "after: must be a list of task ids or {\"id\", \"kind\"} "
                             f"objects, not {json.dumps(value)}")
    parents = []
    for index, item in enumerate(value):
        field = f"after[{index}]"
        if isinstance(item, str):
            parents.append(pb.Dependency(id=item, kind=pb.DEPENDENCY_KIND_SUCCESS))
            continue
        if not isinstance(item, dict):
            raise HttpError(400, f"{field}: must be a task id or an object "
                                 f"{{\"id\", \"kind\"}}, not {json.dumps(item)}")
        unknown = sorted(set(item) - _DEPENDENCY_KEYS)
        if unknown:
            raise HttpError(400, f"{field}.{unknown[0]}: unknown field (known: id, kind)")
        parent_id = item.get("id")
        if not isinstance(parent_id, str) or not parent_id:
            raise HttpError(400, f"{field}.id: must be a task id (or, with kind array, an "
                                 f"array id), not {json.dumps(parent_id)}")
        kind = item.get("kind", "success")
        if kind not in KINDS:
            raise HttpError(400, f"{field}.kind: must be one of {', '.join(KINDS)}, "
                                 f"not {json.dumps(kind)}")
        parents.append(pb.Dependency(id=parent_id, kind=KINDS[kind]))
    return parents


def seconds(field: str, value: Any) -> float:
    """A duration as a number of seconds or a string like "90s", "5m", "1h30m"; 0: none."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as error:
            raise HttpError(400, f"{field}: {error}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HttpError(400, f"{field}: must be a number of seconds or {DURATION_FORMS}, "
                             f"not {json.dumps(value)}")
    # Python's json reads NaN, Infinity and integers too large for a float.
    if (isinstance(value, int) and abs(value) > _MAX_EXACT) or not math.isfinite(value):
        raise HttpError(400, f"{field}: {value} is not a number of seconds")
    return float(value)


def whole(field: str, value: Any, bounds: tuple[int, int]) -> int:
    """A whole number (JSON integer) the protobuf field can hold; 0 when absent."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise HttpError(400, f"{field}: must be a whole number, not {json.dumps(value)}")
    low, high = bounds
    if not low <= value <= high:
        raise HttpError(400, f"{field}: {value} is out of range")
    return value


def names(field: str, value: Any) -> list[str]:
    """A list of strings (retry_on: failure class names)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise HttpError(400, f"{field}: must be a list of strings, not {json.dumps(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise HttpError(400, f"{field}[{index}]: must be a string, not {json.dumps(item)}")
    return list(value)


def array_spec(value: Any) -> pb.ArraySpec | None:
    """`array`: {"start": S, "end": E, "step": N} (END included, step defaults to 1) ->
    one task per index; None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise HttpError(400, "array: must be an object {\"start\", \"end\", \"step\"}, "
                             f"not {json.dumps(value)}")
    unknown = sorted(set(value) - _ARRAY_KEYS)
    if unknown:
        raise HttpError(400, f"array.{unknown[0]}: unknown field (known: start, end, step)")
    for required in ("start", "end"):
        if required not in value:
            raise HttpError(400, f"array.{required}: is required (END is included)")
    return pb.ArraySpec(start=whole("array.start", value["start"], _INT64),
                        end=whole("array.end", value["end"], _INT64),
                        step=whole("array.step", value.get("step"), _INT64))


def array_reply(response: pb.SubmitResponse) -> dict[str, Any]:
    """What an array submit answers: its id, its task ids in index order, whether this call
    created it (false: its request id matched), and its first task."""
    return {"array_id": response.array_id, "task_ids": list(response.task_ids),
            "created": response.created, "task": records.task_to_dict(response.task)}
