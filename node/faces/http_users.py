"""The HTTP JSON API of users, cluster settings and the audit trail (issue 21), mirroring
`filch whoami`, `filch user ...`, `filch cluster ...` and `filch audit`. Each route is one
call to the daemon as the request's caller (request.daemon()): the daemon decides who may
(PERMISSION_DENIED -> 403) and validates the values (INVALID_ARGUMENT -> 400); here only
the JSON types and units are checked.

    GET    /api/v1/whoami                 {"name", "role", "cluster_token"}
    GET    /api/v1/users                  {"users": [...]}
    POST   /api/v1/users                  {"name", "role"?, "max_cpu"?, "max_memory"?,
                                           "max_pending"?, "max_priority"?}: 201
                                          {"user", "token"} (the token is shown only here)
    POST   /api/v1/users/<name>           the same fields but name, only those to change
    POST   /api/v1/users/<name>/token     {"expires"?: "7d" or seconds}: {"user", "token"}
    DELETE /api/v1/users/<name>           {"name", "canceled"} (its pending tasks)
    GET    /api/v1/cluster/settings       every setting that is set
    POST   /api/v1/cluster/settings       {"key", "value"} ("default" unsets it)
    GET    /api/v1/audit                  ?since=1h&user=NAME&limit=N, newest first
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.client import Client
from node.core.errors import HttpError, Refused
from node.core.units import CPU_FORMS, SIZE_FORMS, parse_cpu, parse_duration, parse_size
from node.faces.http_wire import Request, Response, failure, json_response

ROLES: Final[dict[str, pb.Role.ValueType]] = {"user": pb.ROLE_USER, "admin": pb.ROLE_ADMIN}
# The fields of a user body besides name; SetUserRequest.fields names the ones given.
USER_FIELDS: Final = ("role", "max_cpu", "max_memory", "max_pending", "max_priority")
# The audit's own cap on a page (ListAuditRequest.limit; 0 is its default, 1000).
MAX_AUDIT_LIMIT: Final = 100_000

Rpc = Callable[[pb_grpc.SchedulerStub], Callable[..., Any]]


def call(client: Client, rpc: Rpc, request: Message) -> Any:
    """One unary call through client (so as its caller); HttpError with the status the
    gRPC code maps to (http_wire.failure)."""
    try:
        return rpc(pb_grpc.SchedulerStub(client.channel()))(request, timeout=client.timeout)
    except grpc.RpcError as error:
        raise failure(client.error(error, client.timeout)) from None


class AgentUsers:
    """Who holds a user token, as the daemon sees it (webauth.TokenOwners): WhoAmI with the
    token as the caller's, so an expired, rotated or removed one is 401 at once."""

    def __init__(self, *, client: Client) -> None:
        self._client = client

    def name_of(self, token: str) -> str:
        try:
            me: pb.Identity = call(self._client.on_behalf(user_token=token),
                                   lambda stub: stub.WhoAmI, pb.WhoAmIRequest())
        except HttpError as error:
            if error.status == 401:
                raise Refused(401, "token: wrong token") from None
            raise Refused(error.status, f"sign-in: {error.message}") from None
        return me.name


class UsersApi:
    """The handlers; each takes the daemon as the caller from the request."""

    def whoami(self, request: Request, match: re.Match[str]) -> Response:
        me: pb.Identity = call(request.daemon(), lambda stub: stub.WhoAmI, pb.WhoAmIRequest())
        return json_response(200, {"name": me.name, "role": role_name(me.role),
                                   "cluster_token": me.cluster_token})

    def list_users(self, request: Request, match: re.Match[str]) -> Response:
        listed: pb.ListUsersResponse = call(request.daemon(), lambda stub: stub.ListUsers,
                                            pb.ListUsersRequest())
        return json_response(200, {"users": [user_json(user) for user in listed.users]})

    def add_user(self, request: Request, match: re.Match[str]) -> Response:
        body = _object(request)
        name = body.pop("name", None)
        if not isinstance(name, str) or not name:
            raise HttpError(400, "name: required: the user's name (its tasks' owner)")
        role, quota, _ = user_fields(body)
        added: pb.UserTokenResponse = call(request.daemon(), lambda stub: stub.AddUser,
                                           pb.AddUserRequest(name=name, role=role, quota=quota))
        return json_response(201, token_json(added),
                             [("Location", f"/api/v1/users/{added.user.name}")])

    def set_user(self, request: Request, match: re.Match[str]) -> Response:
        role, quota, fields = user_fields(_object(request))
        if not fields:
            raise HttpError(400, f"body: name at least one of {', '.join(USER_FIELDS)}")
        user: pb.User = call(request.daemon(), lambda stub: stub.SetUser, pb.SetUserRequest(
            name=match["name"], role=role, quota=quota, fields=fields))
        return json_response(200, user_json(user))

    def rotate_token(self, request: Request, match: re.Match[str]) -> Response:
        sent = request.environ.get("CONTENT_LENGTH") not in (None, "", "0")
        body = _object(request) if sent else {}
        if not set(body) <= {"expires"}:
            raise HttpError(400, 'body: must be a JSON object {"expires": DURATION} or empty')
        expires = body.get("expires")
        if expires is None:
            seconds = 0.0
        elif isinstance(expires, str):
            seconds = _duration("expires", expires)
        elif isinstance(expires, int | float) and not isinstance(expires, bool):
            seconds = float(expires)
        else:
            raise HttpError(400, f"expires: must be a duration like \"7d\" or seconds, not "
                                 f"{json.dumps(expires)}")
        rotated: pb.UserTokenResponse = call(
            request.daemon(), lambda stub: stub.RotateUserToken,
            pb.RotateUserTokenRequest(name=match["name"], expires_seconds=seconds))
        return json_response(200, token_json(rotated))

    def remove_user(self, request: Request, match: re.Match[str]) -> Response:
        removed: pb.RemoveUserResponse = call(request.daemon(), lambda stub: stub.RemoveUser,
                                              pb.RemoveUserRequest(name=match["name"]))
        return json_response(200, {"name": removed.name, "canceled": removed.canceled})

    def get_settings(self, request: Request, match: re.Match[str]) -> Response:
        settings: pb.ClusterSettings = call(request.daemon(),
                                            lambda stub: stub.GetClusterSettings,
                                            pb.GetClusterSettingsRequest())
        return json_response(200, message_json(settings))

    def set_setting(self, request: Request, match: re.Match[str]) -> Response:
        body = _object(request)
        if set(body) != {"key", "value"} or not all(isinstance(body[name], str | int | float)
                                                   for name in body):
            raise HttpError(400, 'body: must be a JSON object {"key": NAME, "value": VALUE}')
        settings: pb.ClusterSettings = call(
            request.daemon(), lambda stub: stub.SetClusterSetting,
            pb.SetClusterSettingRequest(key=str(body["key"]), value=str(body["value"])))
        return json_response(200, message_json(settings))

    def list_audit(self, request: Request, match: re.Match[str]) -> Response:
        since = request.param("since").strip()
        listed: pb.ListAuditResponse = call(
            request.daemon(), lambda stub: stub.ListAudit, pb.ListAuditRequest(
                since_seconds=_duration("since", since) if since else 0.0,
                user=request.param("user").strip(),
                limit=request.int_param("limit", MAX_AUDIT_LIMIT)))
        return json_response(200, {"entries": [message_json(entry) for entry in listed.entries],
                                   "truncated": listed.truncated})


def role_name(role: int) -> str:
    return "admin" if role == pb.ROLE_ADMIN else "user"


def user_json(user: pb.User) -> dict[str, Any]:
    """A user's JSON form; never its token hash (the daemon leaves it out; so does this)."""
    quota = user.quota
    return {
        "name": user.name, "role": role_name(user.role),
        "max_cpu": quota.max_cpu_millis / 1000 or None,
        "max_memory_bytes": quota.max_memory_bytes or None,
        "max_pending": quota.max_pending or None,
        "max_priority": quota.max_priority if quota.HasField("max_priority") else None,
        "token_expires_at": (user.token_expires_at.ToJsonString()
                             if user.HasField("token_expires_at") else None),
        "created_at": user.created_at.ToJsonString() if user.HasField("created_at") else None,
    }


def token_json(response: pb.UserTokenResponse) -> dict[str, Any]:
    return {"user": user_json(response.user), "token": response.token}


def message_json(message: Message) -> dict[str, Any]:
    """Settings and audit entries as the proto names them (unset settings left out)."""
    data: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return data


def user_fields(body: Mapping[str, Any]) -> tuple[pb.Role.ValueType, pb.Quota, list[str]]:
    """The role, quota and names of the fields a user body gives; HttpError 400 naming the
    first bad or unknown one."""
    unknown = sorted(set(body) - set(USER_FIELDS))
    if unknown:
        raise HttpError(400, f"{unknown[0]}: unknown field (known: name, "
                             f"{', '.join(USER_FIELDS)})")
    role: pb.Role.ValueType = pb.ROLE_UNSPECIFIED
    if "role" in body:
        if body["role"] not in ROLES:
            raise HttpError(400, f"role: must be \"user\" or \"admin\", not "
                                 f"{json.dumps(body['role'])}")
        role = ROLES[body["role"]]
    quota = pb.Quota()
    if "max_cpu" in body:
        quota.max_cpu_millis = _parsed("max_cpu", body["max_cpu"], parse_cpu, CPU_FORMS)
    if "max_memory" in body:
        quota.max_memory_bytes = _parsed("max_memory", body["max_memory"], parse_size,
                                         SIZE_FORMS)
    if "max_pending" in body:
        quota.max_pending = _whole("max_pending", body["max_pending"], low=0)
    if "max_priority" in body and body["max_priority"] is not None:
        quota.max_priority = _whole("max_priority", body["max_priority"], low=-(2**31))
    return role, quota, [name for name in USER_FIELDS if name in body]


def _object(request: Request) -> dict[str, Any]:
    body = request.json_body()
    if not isinstance(body, dict):
        raise HttpError(400, "body: must be a JSON object")
    return dict(body)


def _parsed(name: str, value: Any, parse: Callable[[str], int], forms: str) -> int:
    if value in (0, "0"):
        return 0  # no limit
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise HttpError(400, f"{name}: must be {forms}, not {json.dumps(value)}")
    try:
        return parse(str(value))
    except ValueError as error:
        raise HttpError(400, f"{name}: {error}") from None


def _whole(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**31:
        raise HttpError(400, f"{name}: must be a whole number from {low}, not "
                             f"{json.dumps(value)}")
    return value


def _duration(name: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise HttpError(400, f"{name}: {error}") from None
