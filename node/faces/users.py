"""Users, roles and their tokens (issue 21): add, change, rotate, remove, list, who am I.

A token is 256 random bits, prefixed so that a leaked one is recognisable (secret
scanners, logs); it is shown once, in the answer that made it, and etcd keeps only its
SHA-256 (node/etcd/users.py). Every node watches /user/, so a rotated or removed token
stops working everywhere within the watch's delay. User tokens need TLS and a cluster
token: on an open node (plain text, no token) there is nothing that tells callers apart.
"""

from __future__ import annotations

import math
import secrets

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import identity, keys, validation
from node.core.errors import Conflict, InvalidArgument, NotStarted, TaskNotFound, UserNotFound
from node.etcd.users import token_hash
from node.faces.service import TaskService

TOKEN_PREFIX = "filch_u_"
# A removed user's pending tasks are canceled this many at a time (each its own
# transaction, so a task stolen meanwhile is left to finish).
REMOVE_BATCH = 500
# SetUserRequest.fields names, and what each changes.
SET_FIELDS = ("role", "max_cpu", "max_memory", "max_pending", "max_priority")
NEEDS_TLS = ("user tokens need TLS and a cluster token: this node serves plain text to "
             "everyone as admin; make certificates and a token with `filch certs` and start "
             "the nodes with them")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def user_name(value: str, field: str = "name") -> str:
    """A valid user name (an owner name; "admin" is the cluster token's), or
    InvalidArgument naming field."""
    validation.owner(value, field)
    if value == identity.ADMIN:
        raise InvalidArgument(field, f"{identity.ADMIN!r} is reserved for the cluster token "
                                     "(the operators' credential); pick another name")
    return value


def role(value: int) -> pb.Role.ValueType:
    if value == pb.ROLE_UNSPECIFIED:
        return pb.ROLE_USER
    if value == pb.ROLE_USER:
        return pb.ROLE_USER
    if value == pb.ROLE_ADMIN:
        return pb.ROLE_ADMIN
    raise InvalidArgument("role", f"{value} is no role: give user or admin")


def quota(raw: pb.Quota) -> pb.Quota:
    """A valid quota (negative limits refused; a priority ceiling within the priorities)."""
    for field in ("max_cpu_millis", "max_memory_bytes"):
        if getattr(raw, field) < 0:
            raise InvalidArgument(f"quota.{field}", "must be 0 (no limit) or more")
    if raw.HasField("max_priority") and not \
            keys.MIN_PRIORITY <= raw.max_priority <= keys.MAX_PRIORITY:
        raise InvalidArgument("quota.max_priority", f"{raw.max_priority}: must be within "
                              f"{keys.MIN_PRIORITY}..{keys.MAX_PRIORITY}")
    return raw


def public(user: pb.User) -> pb.User:
    """The user as the API shows it: never its token hash."""
    shown = pb.User()
    shown.CopyFrom(user)
    shown.ClearField("token_hash")
    return shown


class UserService:
    """User management (admin only: the servicer checks node/faces/access.py first)."""

    def __init__(self, *, tasks: TaskService, open_node: bool) -> None:
        """open_node: this node has no cluster token (everyone is admin; no user tokens)."""
        self._tasks = tasks
        self._store = tasks.store
        self._open = open_node

    async def add(self, request: pb.AddUserRequest) -> pb.UserTokenResponse:
        """Create a user with a new token. Raises Conflict when the name is taken."""
        name = user_name(request.name)
        user = pb.User(name=name, role=role(request.role), quota=quota(request.quota))
        if self._open:
            raise NotStarted(NEEDS_TLS)
        token = new_token()
        user.token_hash = token_hash(token)
        user.created_at.GetCurrentTime()
        user.token_issued_at.CopyFrom(user.created_at)
        if not await self._store.add_user(user):
            raise Conflict(f"user {name} exists; `filch user set` changes it")
        return pb.UserTokenResponse(user=public(user), token=token)

    async def set(self, request: pb.SetUserRequest) -> pb.User:
        """Change the fields named in request.fields, nothing else."""
        name = user_name(request.name)
        unknown = [field for field in request.fields if field not in SET_FIELDS]
        if unknown or not request.fields:
            raise InvalidArgument("fields", f"name what to change, among {', '.join(SET_FIELDS)}"
                                  + (f" (not {', '.join(unknown)})" if unknown else ""))
        new_role = role(request.role) if "role" in request.fields else pb.ROLE_UNSPECIFIED
        limits = quota(request.quota)

        def change(user: pb.User) -> None:
            if "role" in request.fields:
                user.role = new_role
            if "max_cpu" in request.fields:
                user.quota.max_cpu_millis = limits.max_cpu_millis
            if "max_memory" in request.fields:
                user.quota.max_memory_bytes = limits.max_memory_bytes
            if "max_pending" in request.fields:
                user.quota.max_pending = limits.max_pending
            if "max_priority" in request.fields:
                if limits.HasField("max_priority"):
                    user.quota.max_priority = limits.max_priority
                else:
                    user.quota.ClearField("max_priority")

        changed = await self._store.change_user(name, change)
        if changed is None:
            raise UserNotFound(name)
        return public(changed)

    async def rotate(self, request: pb.RotateUserTokenRequest) -> pb.UserTokenResponse:
        """A new token; the old one stops working as soon as each node sees the change."""
        name = user_name(request.name)
        expires = request.expires_seconds
        if not math.isfinite(expires) or expires < 0:
            raise InvalidArgument("expires_seconds", f"{expires!r}: give 0 (never) or a "
                                  "duration in seconds")
        if self._open:
            raise NotStarted(NEEDS_TLS)
        token = new_token()

        def change(user: pb.User) -> None:
            user.token_hash = token_hash(token)
            user.token_issued_at.GetCurrentTime()
            if expires:
                user.token_expires_at.FromNanoseconds(
                    user.token_issued_at.ToNanoseconds() + int(expires * 1e9))
            else:
                user.ClearField("token_expires_at")

        changed = await self._store.change_user(name, change)
        if changed is None:
            raise UserNotFound(name)
        return pb.UserTokenResponse(user=public(changed), token=token)

    async def remove(self, request: pb.RemoveUserRequest) -> pb.RemoveUserResponse:
        """Delete the user (its token stops at once), then cancel its pending tasks; its
        running ones finish. Returns how many were canceled."""
        name = user_name(request.name)
        if await self._store.delete_user(name) is None:
            raise UserNotFound(name)
        why = f"canceled: user {name} was removed"
        canceled = 0
        tried: set[str] = set()
        while True:
            # A queued accounted task is in both indexes: each id once.
            ids = [task_id for task_id in dict.fromkeys(
                       await self._store.pending_task_ids(name, limit=REMOVE_BATCH)
                       + await self._store.queued_task_ids(name, limit=REMOVE_BATCH))
                   if task_id not in tried]
            if not ids:
                return pb.RemoveUserResponse(name=name, canceled=canceled)
            for task_id in ids:
                tried.add(task_id)
                try:
                    task = await self._tasks.cancel(task_id, why, pending_only=True)
                except TaskNotFound:
                    continue    # deleted meanwhile
                canceled += task.state == pb.TASK_STATE_CANCELED and task.message == why

    async def list(self) -> pb.ListUsersResponse:
        return pb.ListUsersResponse(users=[public(user)
                                           for user in await self._store.list_users()])


def who_am_i() -> pb.Identity:
    caller = identity.current()
    return pb.Identity(name=caller.name,
                       role=pb.ROLE_ADMIN if caller.is_admin else pb.ROLE_USER,
                       cluster_token=caller.cluster_token)
