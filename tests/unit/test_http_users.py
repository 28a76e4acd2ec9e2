"""node/faces/http_users.py's body checks: a bad field is 400 naming it, before any call."""

from __future__ import annotations

from typing import Any

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core.errors import HttpError
from node.faces.http_users import user_fields, user_json


def test_a_user_body_becomes_role_quota_and_the_fields_named() -> None:
    role, quota, fields = user_fields({"role": "admin", "max_cpu": "1.5", "max_memory": "2Gi",
                                       "max_pending": 10, "max_priority": 5})
    assert role == pb.ROLE_ADMIN
    assert (quota.max_cpu_millis, quota.max_memory_bytes, quota.max_pending,
            quota.max_priority) == (1500, 2 * 1024**3, 10, 5)
    assert fields == ["role", "max_cpu", "max_memory", "max_pending", "max_priority"]
    # Only what is named changes (SetUser); 0 removes a limit.
    assert user_fields({"max_cpu": 0}) == (pb.ROLE_UNSPECIFIED, pb.Quota(), ["max_cpu"])


@pytest.mark.parametrize(("body", "field"), [
    ({"role": "root"}, "role"), ({"max_cpu": "lots"}, "max_cpu"), ({"max_cpu": True}, "max_cpu"),
    ({"max_memory": "1Qi"}, "max_memory"), ({"max_pending": -1}, "max_pending"),
    ({"max_pending": 1.5}, "max_pending"), ({"max_priority": "9"}, "max_priority"),
    ({"token_hash": "00"}, "token_hash"),
])
def test_a_bad_user_field_is_400_naming_it(body: dict[str, Any], field: str) -> None:
    with pytest.raises(HttpError) as refused:
        user_fields(body)
    assert refused.value.status == 400
    assert refused.value.message.startswith(f"{field}:")


def test_a_users_json_never_holds_its_token_hash() -> None:
    shown = user_json(pb.User(name="alice", role=pb.ROLE_USER, token_hash="ab" * 32))
    assert shown["name"] == "alice" and "ab" * 32 not in str(shown)
    assert shown["max_priority"] is None
