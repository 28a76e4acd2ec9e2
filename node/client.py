"""The one public client of a filch node's gRPC API: sync, for scripts, the CLI and the
HTTP face (whose gevent worker makes grpc cooperative: node/faces/http_worker.py).

    from node.client import Client, NotFound

    with Client("127.0.0.1:7070", ca="pki/ca.crt", token_file="pki/token") as filch:
        task = filch.submit(command="make", args=["test"], cpu="0.5", memory="256Mi")
        done = filch.wait(task.id)

Every failure is a ClientError (a subclass per common gRPC code), never a grpc.RpcError.
The error classes live in node/core/errors.py (one tree under FilchError); the names are
re-exported here, where the README publishes them.
"""

from __future__ import annotations

import builtins
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import keys, states
from node.core.array_pages import ArrayWatch
from node.core.client_defaults import DEFAULT_SERVER, DEFAULT_TIMEOUT
from node.core.errors import (
    ClientError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    PermissionDeniedError,
    Unauthenticated,
    Unavailable,
)
from node.core.limits import CLIENT_MAX_RECEIVE_BYTES
from node.core.polling import poll
from node.core.states import is_finished
from node.core.tls import Security
from node.core.units import parse_cpu, parse_size

# A submit the node answers with UNAVAILABLE is retried this long (an etcd election takes
# about a second; a lossy link can stall a commit for a few).
SUBMIT_RETRY_SECONDS = 15.0
SUBMIT_RETRY_PAUSE = 0.5
# An array submit's deadline adds a second per this many tasks: a loaded 3-node cluster
# writes several thousand per second (each task twice: held, then released), so this
# leaves a wide margin while a hung node still fails the call in minutes, not never.
ARRAY_SUBMIT_FLOOR_RATE = 500
# Added to the deadline of an array cancel: the node cancels up to 100,000 tasks in it.
ARRAY_CANCEL_EXTRA = 300.0
# The node caps a page at 1000 itself.
PAGE_SIZE = 1000

# on_progress(task, seconds waited, whether the node is not answering right now)
ProgressCallback = Callable[[pb.Task, float, bool], None]
# the same for an array's tasks (in index order)
ArrayProgressCallback = Callable[[list[pb.Task], float, bool], None]


_ERROR_TYPES: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


class LogCall:
    """A task's log as an iterator of bytes; cancel() ends it from another thread."""

    def __init__(self, *, call: Any, client: Client) -> None:
        self._call = call
        self._client = client

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._call:
                yield chunk.data
        except grpc.RpcError as error:
            raise self._client.error(error, None) from None

    def cancel(self) -> None:
        self._call.cancel()


class EventCall:
    """The event stream as an iterator of WatchResponses (one per etcd revision); cancel()
    ends it from another thread."""

    def __init__(self, *, call: Any, client: Client) -> None:
        self._call = call
        self._client = client

    def __iter__(self) -> Iterator[pb.WatchResponse]:
        try:
            yield from self._call
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return  # cancel() ended it
            raise self._client.error(error, None) from None

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """Calls to one filch node. The channel is made on first use in each process (a gRPC
    channel must not cross a fork, and gunicorn forks its workers) and shared by threads."""

    def __init__(self, server: str = DEFAULT_SERVER, *, ca: str | Path | None = None,
                 token: str | None = None, token_file: str | Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        """ca: the cluster CA certificate file (TLS); token or token_file: the API bearer
        token, which needs TLS. Raises node.core.errors.InvalidArgument for an unreadable file."""
        security = Security.load(str(ca or ""), token_file=str(token_file or ""),
                                 token=token or "")
        if security.token and not security.tls:
            raise ValueError("a bearer token needs TLS: give the cluster CA too")
        self.server = server
        self.timeout = timeout
        self.security = security
        self._lock = threading.Lock()
        self._owner_pid = 0
        self._channel: grpc.Channel | None = None

    @classmethod
    def with_security(cls, server: str, security: Security, *,
                      timeout: float = DEFAULT_TIMEOUT) -> Client:
        """A client from credentials already loaded (the CLI's flags, the HTTP face's env)."""
        client = cls(server, timeout=timeout)
        client.security = security
        return client

    @classmethod
    def from_env(cls) -> Client:
        """FILCH_SERVER, FILCH_CA, FILCH_TOKEN_FILE or FILCH_TOKEN, FILCH_TIMEOUT."""
        env = os.environ
        return cls(env.get("FILCH_SERVER") or DEFAULT_SERVER, ca=env.get("FILCH_CA"),
                   token=env.get("FILCH_TOKEN"), token_file=env.get("FILCH_TOKEN_FILE"),
                   timeout=float(env.get("FILCH_TIMEOUT") or DEFAULT_TIMEOUT))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            # One inherited across a fork belongs to the parent: not ours to close.
            if self._channel is not None and self._owner_pid == os.getpid():
                self._channel.close()
            self._channel = None

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None or self._owner_pid != os.getpid():
                options = [("grpc.max_receive_message_length", CLIENT_MAX_RECEIVE_BYTES)]
                self._channel = (
                    grpc.secure_channel(self.server, self.security.channel_credentials(),
                                        options=options)
                    if self.security.tls else grpc.insecure_channel(self.server, options=options))
                self._owner_pid = os.getpid()
            return self._channel

    @property
    def _stub(self) -> pb_grpc.SchedulerStub:
        return pb_grpc.SchedulerStub(self.channel())

    # -- tasks ---------------------------------------------------------------------------------

    def submit(self, spec: pb.TaskSpec | None = None, *, request_id: str | None = None,
               **fields: Any) -> pb.Task:
        """Queue a task: a TaskSpec, or its fields as keywords (cpu and memory/disk also as
        text: cpu="0.5", memory="256Mi"). Retried while the node answers UNAVAILABLE, under
        one request id (a fresh UUIDv7 unless given), so a submit is never made twice."""
        if spec is None:
            spec = _spec(fields)
        elif fields:
            raise TypeError("give a TaskSpec or its fields, not both")
        request = pb.SubmitRequest(spec=spec, request_id=request_id or "")
        return self.submit_request(request).task

    def submit_array(self, spec: pb.TaskSpec, array: pb.ArraySpec, *,
                     request_id: str | None = None) -> pb.SubmitResponse:
        """Queue one task per index of array in one call (all or nothing, retried under one
        request id like submit); the response lists the task ids in index order."""
        request = pb.SubmitRequest(spec=spec, request_id=request_id or "", array=array)
        return self.submit_request(request)

    def submit_request(self, request: pb.SubmitRequest, *,
                       retry_for: float = SUBMIT_RETRY_SECONDS) -> pb.SubmitResponse:
        """Submit as given; the response says whether the task was created or matched."""
        if not request.request_id:
            # A UUIDv7: the node keeps its timestamp in the task id (keys.task_id_for_request),
            # so the task still queues in submission order.
            request.request_id = keys.new_task_id()
        deadline = time.monotonic() + retry_for
        timeout = self.timeout
        if request.HasField("array"):
            # Every task of an array is written in this one call: the deadline grows with it.
            span = request.array
            count = max(0, (span.end - span.start) // (span.step or 1) + 1)
            timeout += count / ARRAY_SUBMIT_FLOOR_RATE
        while True:
            try:
                response: pb.SubmitResponse = self._call(self._stub.Submit, request, timeout)
                return response
            except Unavailable as failure:
                # An unreachable node fails at once; one that answered may be mid-election.
                if not failure.reachable or time.monotonic() >= deadline:
                    raise
            time.sleep(SUBMIT_RETRY_PAUSE)

    def get(self, task_id: str) -> pb.Task:
        task: pb.Task = self._call(self._stub.GetTask, pb.GetTaskRequest(id=task_id))
        return task

    def cancel(self, task_id: str) -> pb.Task:
        response: pb.CancelResponse = self._call(self._stub.Cancel, pb.CancelRequest(id=task_id))
        return response.task

    def cancel_array(self, array_id: str, *, timeout: float | None = None) -> int:
        """Cancel every unfinished task of an array (held ones too); how many. timeout:
        this call's deadline (default: the client's, plus ARRAY_CANCEL_EXTRA: an array of
        100,000 tasks takes a while)."""
        response: pb.CancelResponse = self._call(
            self._stub.Cancel, pb.CancelRequest(array_id=array_id),
            self.timeout + ARRAY_CANCEL_EXTRA if timeout is None else timeout)
        return response.canceled

    def wait(self, task_id: str, on_progress: ProgressCallback | None = None, *,
             until: Callable[[pb.Task], bool] = is_finished,
             limit: float | None = None, task: pb.Task | None = None) -> pb.Task:
        """Poll until until(task) (default: finished) or limit seconds pass; the last record.

        on_progress is called every PROGRESS_TICK while waiting. A node that stops
        answering is ridden out for RECONNECT_GRACE seconds, then its error is raised.
        task: a record already in hand (say, from submit), checked before the first poll.
        """
        return poll(lambda: self.get(task_id), until, on_progress, limit,
                          task if task is not None else self.get(task_id))

    def wait_array(self, array_id: str, on_progress: ArrayProgressCallback | None = None, *,
                   limit: float | None = None) -> builtins.list[pb.Task]:
        """Poll until every task of the array has finished or limit seconds pass; its
        tasks as last seen, in index order. Like wait(), it rides out a node that stops
        answering. The array is listed whole once; after that a poll reads on from the
        first task not seen finished (finished is final), a page or two, and stops at
        the first page with an unfinished task (node/core/array_pages.py): a poll costs
        the same at 100 tasks or 100,000 (tasks past it keep their last state in the
        progress line until the poll reaches them)."""
        watch = ArrayWatch(lister=self, array_id=array_id, tasks=self.list(array_id=array_id))

        def finished(tasks: builtins.list[pb.Task]) -> bool:
            return watch.frontier >= len(tasks)

        return poll(watch.poll, finished, on_progress, limit, watch.tasks)

    def logs(self, task_id: str, follow: bool = False, attempt: int = 0) -> LogCall:
        """The task's output as it arrives (attempt 0: the latest). No deadline: a followed
        log lasts as long as the task, and a big one takes as long as it takes."""
        request = pb.StreamLogsRequest(id=task_id, follow=follow, attempt=attempt)
        return LogCall(call=self._stub.StreamLogs(request), client=self)

    def watch(self, since: int = 0, task_id: str = "") -> EventCall:
        """Task and node events of revisions > since (0: from now on), then follow. No
        deadline: it lasts until cancelled. OUT_OF_RANGE (a ClientError) when since was
        compacted: re-list, then watch from now on."""
        return EventCall(call=self._stub.Watch(pb.WatchRequest(since_revision=since,
                                                               task_id=task_id)),
                         client=self)

    def list(self, state: str | int | None = None, limit: int | None = None, *,
             array_id: str = "") -> list[pb.Task]:
        """Every task (in state, a name like "running" or a TaskState; or of one array,
        in index order), following page tokens until the end or limit tasks."""
        tasks: builtins.list[pb.Task] = []
        token = ""
        while limit is None or len(tasks) < limit:
            size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - len(tasks))
            page, next_token = self.list_page(state, size, token, array_id=array_id)
            tasks.extend(page)
            # A token that does not move would loop forever; treat it as the last page.
            if not next_token or next_token == token:
                break
            token = next_token
        return tasks if limit is None else tasks[:limit]

    def list_page(self, state: str | int | None, page_size: int, page_token: str = "", *,
                  array_id: str = "") -> tuple[builtins.list[pb.Task], str]:
        """One page of tasks (of one array, when array_id) and the token of the next
        ("" at the end)."""
        if isinstance(state, str):
            state = states.STATE_BY_NAME[state.lower()]
        request = pb.ListTasksRequest(state=state or 0,  # type: ignore[arg-type]
                                      page_size=page_size, page_token=page_token,
                                      array_id=array_id)
        response: pb.ListTasksResponse = self._call(self._stub.ListTasks, request)
        return list(response.tasks), response.next_page_token

    # -- the cluster ---------------------------------------------------------------------------

    def nodes(self, *, timeout: float | None = None) -> builtins.list[pb.Node]:
        response: pb.ListNodesResponse = self._call(
            self._stub.ListNodes, pb.ListNodesRequest(), timeout)
        return list(response.nodes)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The gRPC health status name of service ("" for the node): "SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self.channel())
        response = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service),
                              timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    # -- cordon and drain ----------------------------------------------------------------

    def cordon_node(self, name: str) -> pb.CordonNodeResponse:
        response: pb.CordonNodeResponse = self._call(self._stub.CordonNode,
                                                     pb.CordonNodeRequest(name=name))
        return response

    def uncordon_node(self, name: str) -> pb.CordonNodeResponse:
        response: pb.CordonNodeResponse = self._call(self._stub.UncordonNode,
                                                     pb.UncordonNodeRequest(name=name))
        return response

    def drain_node(self, name: str,
                   deadline: float = 0.0) -> Generator[pb.DrainNodeProgress, None, None]:
        """Start (or join) a drain and yield its progress until it is done or canceled.
        No call deadline: a drain lasts up to its own (the node enforces it)."""
        call = self._stub.DrainNode(pb.DrainNodeRequest(name=name, deadline_seconds=deadline))
        try:
            yield from call
        except grpc.RpcError as error:
            raise self.error(error, None) from None
        finally:
            call.cancel()

    # -- owners (fair share) -------------------------------------------------------------------

    def set_owner_weight(self, name: str, weight: float) -> pb.Owner:
        """Give an owner a fair-share weight (> 0, at most 1000; 1 is the default)."""
        owner: pb.Owner = self._call(self._stub.SetOwnerWeight,
                                     pb.SetOwnerWeightRequest(name=name, weight=weight))
        return owner

    def owners(self) -> builtins.list[pb.Owner]:
        """Every owner with a weight or with queued or running work, its usage and share."""
        response: pb.ListOwnersResponse = self._call(self._stub.ListOwners,
                                                     pb.ListOwnersRequest())
        return list(response.owners)

    # -- cluster settings (`filch cluster`) -------------------------------------------------

    def set_cluster_setting(self, key: str, value: str) -> pb.ClusterSettings:
        """Set a cluster-wide setting ("default" unsets it; admin only)."""
        settings: pb.ClusterSettings = self._call(
            self._stub.SetClusterSetting, pb.SetClusterSettingRequest(key=key, value=value))
        return settings

    def cluster_settings(self) -> pb.ClusterSettings:
        """The cluster-wide settings as stored (an unset field is its default)."""
        settings: pb.ClusterSettings = self._call(self._stub.GetClusterSettings,
                                                  pb.GetClusterSettingsRequest())
        return settings

    # -- web UI sessions (the HTTP face's sign-in) -------------------------------------------

    def create_session(self, identity: str) -> pb.CreateSessionResponse:
        """A new session for identity (the caller proves itself with the token)."""
        response: pb.CreateSessionResponse = self._call(
            self._stub.CreateSession, pb.CreateSessionRequest(identity=identity))
        return response

    def check_session(self, session_id: str) -> pb.Session:
        """The live session; raises NotFound (unknown, revoked, expired) or InvalidRequest."""
        session: pb.Session = self._call(self._stub.CheckSession,
                                         pb.CheckSessionRequest(session_id=session_id))
        return session

    def revoke_session(self, session_id: str) -> bool:
        """End a session on every node; False when there was no such session."""
        response: pb.RevokeSessionResponse = self._call(
            self._stub.RevokeSession, pb.RevokeSessionRequest(session_id=session_id))
        return response.revoked

    # -- errors --------------------------------------------------------------------------------

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        deadline = self.timeout if timeout is None else timeout
        try:
            return method(request, timeout=deadline)
        except grpc.RpcError as error:
            raise self.error(error, deadline) from None

    def error(self, error: grpc.RpcError, timeout: float | None) -> ClientError:
        """The typed error for a failed call."""
        code: grpc.StatusCode = error.code()
        details = " ".join((error.details() or "").split()) or code.name
        reachable = code != grpc.StatusCode.UNAVAILABLE or _is_ready(self.channel())
        kind = _ERROR_TYPES.get(code, ClientError)
        return kind(code, details, server=self.server, timeout=timeout, reachable=reachable)


def _spec(fields: dict[str, Any]) -> pb.TaskSpec:
    """A TaskSpec from keywords; cpu, memory and disk may be text ("0.5", "256Mi")."""
    cpu = fields.pop("cpu", None)
    sizes = {name: fields.pop(name) for name in ("memory", "disk") if name in fields}
    spec = pb.TaskSpec(**fields)
    if cpu is not None:
        spec.cpu_millis = parse_cpu(str(cpu))
    for name, size in sizes.items():
        setattr(spec, f"{name}_bytes", size if isinstance(size, int) else parse_size(size))
    return spec


def _is_ready(channel: grpc.Channel) -> bool:
    """Whether the channel holds a live connection right now (polled, never connects)."""
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    callback = states.put
    channel.subscribe(callback, try_to_connect=False)
    try:
        # gRPC reports the current state from its polling thread within a millisecond.
        return states.get(timeout=0.2) == grpc.ChannelConnectivity.READY
    except queue.Empty:
        return False
    finally:
        channel.unsubscribe(callback)


# The README publishes these names from node.client: importable here, defined in
# node/core/errors.py.
__all__ = ["DEFAULT_SERVER", "DEFAULT_TIMEOUT", "Client", "ClientError", "DeadlineExceeded",
           "InvalidRequest", "LogCall", "NotFound", "PermissionDeniedError", "Unauthenticated",
           "Unavailable"]
