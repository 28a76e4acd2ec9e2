"""Every exception filch raises on purpose: one small tree under FilchError. The API maps
them to gRPC codes; modules raise and catch these, never library errors. The client's
errors (ClientError and its subclasses) and the HTTP face's answers (HttpError, Refused)
belong to the same tree, so `except FilchError` catches every failure filch words."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Only a type here: the CLI's --help and argument parsing must not load grpc (~100 ms).
    import grpc


class FilchError(Exception):
    """Base of every error filch raises on purpose."""


class InvalidArgument(FilchError):
    """The caller sent something malformed; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.detail = problem


class TaskNotFound(FilchError):
    """No task has this id."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}; `filch ls` lists the known tasks")
        self.task_id = task_id


class SessionNotFound(FilchError):
    """No live web UI session has this id: never issued, signed out, or expired."""

    def __init__(self) -> None:
        super().__init__("session_id: no such session (signed out, expired or never "
                         "issued); sign in again")


class ArrayNotFound(TaskNotFound):
    """No array has this id (or its submission has not completed)."""

    def __init__(self, array_id: str) -> None:
        FilchError.__init__(self, f"no array with id {array_id!r} (an array exists once its "
                                  "submission completed)")
        self.task_id = array_id


class NodeNotFound(FilchError):
    """No live node has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no live node is named {name!r}; `filch nodes` lists them")
        self.name = name


class UserNotFound(FilchError):
    """No user has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no user is named {name!r}; `filch user ls` lists them")
        self.name = name


class PermissionDenied(FilchError):
    """The caller is known but may not do this (another user's task, an admin call):
    gRPC PERMISSION_DENIED, HTTP 403, the CLI's exit status 77. Nothing was changed."""


class NotAuthenticated(FilchError):
    """A call carries no credential this node accepts (answered UNAUTHENTICATED)."""


class QuotaExceeded(FilchError):
    """A submit past the owner's pending quota: RESOURCE_EXHAUSTED, nothing written."""


class NameTaken(FilchError):
    """Another live agent holds this node name: this agent refuses to start under it."""


class NotStarted(FilchError):
    """The task has no attempt yet, so there is no log to show."""


class Conflict(FilchError):
    """The request contradicts existing state (e.g. a request_id reused with another spec)."""


class StoreUnavailable(FilchError):
    """etcd cannot be reached or has no quorum; retrying later may succeed."""


class StoreFull(FilchError):
    """etcd raised its NOSPACE alarm; nothing new is accepted until housekeeping frees space."""


class Compacted(FilchError):
    """A read or watch asked for history etcd already compacted; re-list and watch again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted up to {revision}")
        self.revision = revision


class OwnerUnavailable(FilchError):
    """The node that holds a task's logs cannot be reached."""


class ExecutorError(FilchError):
    """The task's container or process could not be started."""


class NodeStartError(ExecutorError):
    """The node, not the task, failed to start it: task network, /work, runc itself."""


class RenewalsClosed(FilchError):
    """The renewal thread was closed (the agent shuts down) while work ran on it."""


class LogCopyRefused(FilchError):
    """A peer refused a log copy for good (the attempt's record says no): do not retry."""


class TooLarge(FilchError):
    """etcd or the channel refused a request or answer for its size; split the batch."""


class Overloaded(FilchError):
    """A load limit (pending tasks, log streams) is reached; retry later or raise it."""


class EtcdMemberError(FilchError):
    """The embedded etcd member could not be started; the message quotes etcd.log."""


class MemberDataLost(FilchError):
    """This node was an etcd member but its data dir is empty; it must rejoin as a new one."""


class RejoinFailed(FilchError):
    """`filch agent --rejoin` could not replace the old member (no healthy member, etc.)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# -- what the client raises (node/client.py re-exports these names) ------------------------

class ClientError(FilchError):
    """A call to a node failed (what node.client raises). code: the grpc.StatusCode;
    message: the node's words (one line).

    server, timeout: what was called and with which deadline, for callers that word
    their own message; reachable: for UNAVAILABLE, whether the node answered at all.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, server: str,
                 timeout: float | None, reachable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.server = server
        self.timeout = timeout
        self.reachable = reachable

    @property
    def transient(self) -> bool:
        """Worth another try later: the node or its etcd is away for now."""
        return self.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


class InvalidRequest(ClientError):
    """INVALID_ARGUMENT: the node refused a value; the message names it."""


class NotFound(ClientError):
    """NOT_FOUND: no such task (or attempt, or log yet)."""


class Unauthenticated(ClientError):
    """UNAUTHENTICATED: a missing or wrong bearer token."""


class PermissionDeniedError(ClientError):
    """PERMISSION_DENIED: the caller may not do this (the CLI exits 77)."""


class Unavailable(ClientError):
    """UNAVAILABLE: the node is unreachable (reachable=False) or cannot serve now."""


class DeadlineExceeded(ClientError):
    """DEADLINE_EXCEEDED: no answer within the timeout."""


# -- what the HTTP face answers --------------------------------------------------------------

class HttpError(FilchError):
    """A request that ends in an error status; the message becomes {"error": message}."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class Refused(HttpError):
    """A request the HTTP face's rules (node/faces/webauth.py) turn away: a status and a reason."""


class RequestReadTimeout(FilchError, TimeoutError):
    """A request's body did not arrive by its deadline (node/faces/http_wire.py answers 408); a
    TimeoutError too, so that it is caught with the socket's own timeouts."""


# -- the local API socket (node/core/local_socket.py) -----------------------------------------

class LocalCallRefused(FilchError):
    """The node's local socket turns a call away before the servicer sees it (another
    uid, a wrong token, a frame too big): code is the gRPC status name it answers."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LocalSocketUnreached(FilchError):
    """The CLI's call did not get an answer from the local socket (none, a stale one, a
    dropped connection): the CLI makes it over gRPC instead."""
