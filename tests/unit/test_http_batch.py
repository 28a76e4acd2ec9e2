"""node.faces.http_batch through http_api.submit_request: the batch fields of a JSON submit body
become the SubmitRequest the daemon gets, and a wrong type is a 400 naming the field before
any call is made. (The same bodies against a live daemon: tests/unit/test_http.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.errors import HttpError
from node.faces.http_api import submit_request
from node.faces.http_batch import array_reply

PARENT = "01a21bce-b194-7000-994b-fef8376138b8"
OTHER = "01a21bce-b194-7000-994b-fef8376138b9"


def test_every_batch_field_reaches_the_spec() -> None:
    request = submit_request({
        "command": "sh", "args": ["-c", "echo $FILCH_ARRAY_INDEX"],
        "after": [PARENT, {"id": OTHER, "kind": "any"}, {"id": PARENT + "0", "kind": "array"},
                  {"id": OTHER + "0"}],
        "after_any": [OTHER + "1"], "after_array": [PARENT + "1"],
        "time_limit_seconds": 90, "retries": 3, "retry_on": ["failed", "oom"],
        "retry_backoff_seconds": "1m30s", "priority": -7, "owner": "alice",
        "array": {"start": 1, "end": 9, "step": 2}, "request_id": "r-1"})
    spec = request.spec
    assert [(parent.id, parent.kind) for parent in spec.after] == [
        (PARENT, pb.DEPENDENCY_KIND_SUCCESS), (OTHER, pb.DEPENDENCY_KIND_ANY),
        (PARENT + "0", pb.DEPENDENCY_KIND_ARRAY), (OTHER + "0", pb.DEPENDENCY_KIND_SUCCESS),
        (OTHER + "1", pb.DEPENDENCY_KIND_ANY), (PARENT + "1", pb.DEPENDENCY_KIND_ARRAY)]
    assert (spec.time_limit_seconds, spec.retries, list(spec.retry_on)) == \
        (90.0, 3, ["failed", "oom"])
    assert (spec.retry_backoff_seconds, spec.priority, spec.owner) == (90.0, -7, "alice")
    assert request.HasField("array")
    assert (request.array.start, request.array.end, request.array.step) == (1, 9, 2)
    assert request.request_id == "r-1"


def test_absent_batch_fields_leave_the_daemons_defaults() -> None:
    request = submit_request({"command": "true"})
    assert not request.HasField("array")
    assert request.spec == pb.TaskSpec(command="true")


@pytest.mark.parametrize(("body", "field"), [
    ({"after": PARENT}, "after"),
    ({"after": [7]}, "after[0]"),
    ({"after": [PARENT, {"kind": "any"}]}, "after[1].id"),
    ({"after": [{"id": ""}]}, "after[0].id"),
    ({"after": [{"id": PARENT, "kind": "sometimes"}]}, "after[0].kind"),
    ({"after": [{"id": PARENT, "knd": "any"}]}, "after[0].knd"),
    ({"after_any": PARENT}, "after_any"),
    ({"after_array": [PARENT, None]}, "after_array[1]"),
    ({"time_limit_seconds": True}, "time_limit_seconds"),
    ({"time_limit_seconds": "soon"}, "time_limit_seconds"),
    ({"time_limit_seconds": [5]}, "time_limit_seconds"),
    ({"time_limit_seconds": 10**400}, "time_limit_seconds"),
    ({"retries": "3"}, "retries"),
    ({"retries": 1.5}, "retries"),
    ({"retries": -1}, "retries"),
    ({"retries": 2**32}, "retries"),
    ({"retry_on": "failed"}, "retry_on"),
    ({"retry_on": ["failed", 1]}, "retry_on[1]"),
    ({"retry_backoff_seconds": {}}, "retry_backoff_seconds"),
    ({"priority": "high"}, "priority"),
    ({"priority": False}, "priority"),
    ({"priority": 2**31}, "priority"),
    ({"owner": 3}, "owner"),
    ({"array": "1-10"}, "array"),
    ({"array": {"start": 1}}, "array.end"),
    ({"array": {"end": 1}}, "array.start"),
    ({"array": {"start": "1", "end": 3}}, "array.start"),
    ({"array": {"start": 1, "end": 3, "step": 0.5}}, "array.step"),
    ({"array": {"start": 1, "end": 2**63}}, "array.end"),
    ({"array": {"start": 1, "end": 3, "stride": 2}}, "array.stride"),
    ({"hold": "DEPENDENCIES"}, "hold"),          # output only: not part of a spec
])
def test_wrong_types_are_400_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(HttpError) as raised:
        submit_request({"command": "true", **body})
    assert raised.value.status == 400
    assert raised.value.message.startswith(f"{field}:"), raised.value.message
    json.dumps(raised.value.message)  # the answer is plain JSON text


def test_an_array_answer_lists_its_id_and_task_ids_in_index_order() -> None:
    response = pb.SubmitResponse(task=pb.Task(id=PARENT), created=True, array_id=OTHER,
                                 task_ids=[PARENT, OTHER])
    answer = array_reply(response)
    assert answer["task"]["id"] == PARENT
    assert {key: answer[key] for key in ("array_id", "task_ids", "created")} == {
        "array_id": OTHER, "task_ids": [PARENT, OTHER], "created": True}
