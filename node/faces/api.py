"""The gRPC servicer: validate input, call the services, map errors to status codes.

No business logic here. A client never sees UNKNOWN or a Python traceback: unexpected
errors are logged with their traceback and answered INTERNAL with a short message
(node/faces/rpc_wrap.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core import validation
from node.core.errors import Compacted, InvalidArgument, NotStarted
from node.faces import access, audit
from node.faces.audit import AuditLog, audited
from node.faces.cluster_settings import ClusterSettingsService
from node.faces.copy_store import CopyStore
from node.faces.cordons import CordonService, drain_deadline, node_name
from node.faces.events import EventService
from node.faces.logs import PROXIED_HEADER, LogService
from node.faces.owners import OwnerService, owner_name, owner_weight
from node.faces.rpc_wrap import Malformed, abort_call, count_call, safe_parser, unary
from node.faces.service import TaskService
from node.faces.sessions import SessionService, identity, session_id
from node.faces.users import UserService, who_am_i


def add_to_server(servicer: SchedulerServicer, server: grpc.aio.Server) -> None:
    """Register filch.v1.Scheduler like the generated add_SchedulerServicer_to_server, but
    with request parsers that turn undecodable bytes into INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["Scheduler"]
    handlers = {}
    for method in service.methods:
        parse = safe_parser(getattr(pb, method.input_type.name))
        output = getattr(pb, method.output_type.name)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.stream_unary_rpc_method_handler if method.client_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=parse,
                                     response_serializer=output.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))


class SchedulerServicer(pb_grpc.SchedulerServicer):
    """filch.v1.Scheduler on this node."""

    def __init__(self, *, tasks: TaskService, logs: LogService,
                 sessions: SessionService, events: EventService,
                 copies: CopyStore | None = None, audit: AuditLog | None = None,
                 users: UserService | None = None) -> None:
        """users: None on a node without user management (tests)."""
        self._tasks = tasks
        self._users = users
        self._logs = logs
        self._sessions = sessions
        self._events = events
        self._copies = copies
        self.audit = audit

    @unary
    @audited("submit", audit.submitted)
    async def Submit(self, request: pb.SubmitRequest, context: Any) -> pb.SubmitResponse:
        access.submit_owner(request.spec)     # before validation fills in the default owner
        spec = validation.spec(request.spec)
        request_id = validation.request_id(request.request_id)
        if request.HasField("array"):
            return await self._tasks.submit_array(spec, validation.array(request.array),
                                                  request_id)
        trail = self.audit
        task, created = await self._tasks.submit(spec, request_id, None if trail is None else (
            lambda task: trail.written_with("submit", audit.task_submitted(task))))
        if created and trail is not None:
            trail.counted("submit")
        return pb.SubmitResponse(task=task, created=created)

    @unary
    @audited("cancel", audit.canceled)
    async def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        if request.array_id:
            if request.id:
                raise InvalidArgument("array_id", "give a task id or an array id, not both")
            array_id = validation.task_id(request.array_id, "array_id")
            await access.require_own_array(self._tasks, array_id)
            count = await self._tasks.cancel_array(array_id)
            return pb.CancelResponse(canceled=count)
        task_id = validation.task_id(request.id)
        await access.require_own_task(self._tasks, task_id, "Cancel", "cancel")
        return pb.CancelResponse(task=await self._tasks.cancel(task_id))

    @unary
    async def GetTask(self, request: pb.GetTaskRequest, context: Any) -> pb.Task:
        task = await self._tasks.get(validation.task_id(request.id))
        await self._tasks.explain_pending([task])
        await self._tasks.place_in_queue(task)
        access.redact([task])
        return task

    @unary
    async def ListTasks(self, request: pb.ListTasksRequest, context: Any) -> pb.ListTasksResponse:
        state = validation.state_filter(request.state)
        page_size = validation.page_size(request.page_size)
        if request.array_id:
            if state != pb.TASK_STATE_UNSPECIFIED:
                raise InvalidArgument("state", "cannot be combined with array_id")
            tasks, token = await self._tasks.list_array(
                validation.task_id(request.array_id, "array_id"), page_size, request.page_token)
        else:
            tasks, token = await self._tasks.list_tasks(state, page_size, request.page_token)
        await self._tasks.explain_pending(tasks)
        access.redact(tasks)
        return pb.ListTasksResponse(tasks=tasks, next_page_token=token)

    @unary
    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=await self._tasks.list_nodes())

    async def StreamLogs(self, request: pb.StreamLogsRequest,
                         context: Any) -> AsyncIterator[pb.LogChunk]:
        started = time.monotonic()
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument("request", request.message)
            task_id = validation.task_id(request.id)
            # Checked here, on the node the caller reached: a proxied call to the node
            # holding the log runs with the cluster token (node/faces/logs.py).
            await access.require_own_task(self._tasks, task_id, "StreamLogs",
                                          "read the logs of")
            proxied = any(key == PROXIED_HEADER for key, _ in context.invocation_metadata() or ())
            async for data in self._logs.stream(task_id, follow=request.follow,
                                                attempt=request.attempt, proxied=proxied):
                yield pb.LogChunk(data=data)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped to a status code, never swallowed
            await abort_call(context, exc)
        finally:
            count_call("StreamLogs", context, started)

    async def Watch(self, request: pb.WatchRequest,
                    context: Any) -> AsyncIterator[pb.WatchResponse]:
        started = time.monotonic()
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument("request", request.message)
            if request.since_revision < 0:
                raise InvalidArgument("since_revision", f"{request.since_revision}: must be "
                                      "0 (from now on) or a revision a stream reported")
            task_id = validation.task_id(request.task_id, "task_id") if request.task_id else ""
            async for response in self._events.watch(request.since_revision, task_id):
                yield response
        except grpc.aio.AbortError:
            raise
        except Compacted as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, (
                f"revision {request.since_revision} is no longer in etcd's history (compacted "
                f"up to {exc.revision}): re-list (`filch ls`, `filch nodes`), then follow "
                "from now on (without --since)"))
        except Exception as exc:  # mapped to a status code, never swallowed
            await abort_call(context, exc)
        finally:
            count_call("Watch", context, started)

    @unary
    async def PutLogCopy(self, request: AsyncIterator[pb.LogCopyChunk],
                         context: Any) -> pb.LogCopyReceipt:
        """Internal: a peer's copy of an attempt's log (node/faces/copy_store.py)."""
        access.require_cluster_token("PutLogCopy", "store log copies")
        if self._copies is None:
            raise NotStarted("this node keeps no log copies")
        return pb.LogCopyReceipt(size=await self._copies.receive(request))

    # -- owners (fair share) -------------------------------------------------------------

    @unary
    @audited("owner-weight", audit.owner_weighted)
    async def SetOwnerWeight(self, request: pb.SetOwnerWeightRequest, context: Any) -> pb.Owner:
        access.require_admin("SetOwnerWeight", "set owner weights")
        name = owner_name(request.name)
        weight = owner_weight(request.weight)
        return await OwnerService(store=self._tasks.store).set_weight(name, weight)

    @unary
    async def ListOwners(self, request: pb.ListOwnersRequest,
                         context: Any) -> pb.ListOwnersResponse:
        owners = await OwnerService(store=self._tasks.store,
                                    users=self._tasks.quotas.users).list_owners()
        return pb.ListOwnersResponse(owners=owners)

    # -- cordon and drain (node/faces/cordons.py) ----------------------------------------

    @unary
    @audited("cordon", audit.cordoned)
    async def CordonNode(self, request: pb.CordonNodeRequest,
                         context: Any) -> pb.CordonNodeResponse:
        access.require_admin("CordonNode", "cordon nodes")
        return await CordonService(store=self._tasks.store).cordon(node_name(request.name))

    @unary
    @audited("uncordon", audit.uncordoned)
    async def UncordonNode(self, request: pb.UncordonNodeRequest,
                           context: Any) -> pb.CordonNodeResponse:
        access.require_admin("UncordonNode", "uncordon nodes")
        return await CordonService(store=self._tasks.store).uncordon(node_name(request.name))

    async def DrainNode(self, request: pb.DrainNodeRequest,
                        context: Any) -> AsyncIterator[pb.DrainNodeProgress]:
        started = time.monotonic()
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument("request", request.message)
            access.require_admin("DrainNode", "drain nodes")
            name = node_name(request.name)
            deadline = drain_deadline(request.deadline_seconds)
            async for progress in audit.audited_stream(self.audit, "drain", audit.drain_change(
                    name, deadline), CordonService(store=self._tasks.store).drain(name, deadline)):
                yield progress
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped to a status code, never swallowed
            await abort_call(context, exc)
        finally:
            count_call("DrainNode", context, started)

    # -- web UI sessions (the token guards these like every call) --------------------------

    @unary
    @audited("sign-in", audit.signed_in)
    async def CreateSession(self, request: pb.CreateSessionRequest,
                            context: Any) -> pb.CreateSessionResponse:
        access.require_cluster_token("CreateSession", "create web UI sessions")
        new_id, session = await self._sessions.create(identity(request.identity))
        return pb.CreateSessionResponse(session_id=new_id, session=session)

    @unary
    async def CheckSession(self, request: pb.CheckSessionRequest, context: Any) -> pb.Session:
        access.require_cluster_token("CheckSession", "check web UI sessions")
        return await self._sessions.check(session_id(request.session_id))

    @unary
    @audited("sign-out", audit.signed_out)
    async def RevokeSession(self, request: pb.RevokeSessionRequest,
                            context: Any) -> pb.RevokeSessionResponse:
        access.require_cluster_token("RevokeSession", "revoke web UI sessions")
        revoked = await self._sessions.revoke(session_id(request.session_id))
        return pb.RevokeSessionResponse(revoked=revoked)

    # -- users, cluster settings, audit (issue 21) ------------------------------------------

    @unary
    @audited("user-add", audit.user_added)
    async def AddUser(self, request: pb.AddUserRequest, context: Any) -> pb.UserTokenResponse:
        return await self._user_service("AddUser", "add users").add(request)

    @unary
    @audited("user-set", audit.user_set)
    async def SetUser(self, request: pb.SetUserRequest, context: Any) -> pb.User:
        return await self._user_service("SetUser", "change users").set(request)

    @unary
    @audited("user-token", audit.token_rotated)
    async def RotateUserToken(self, request: pb.RotateUserTokenRequest,
                              context: Any) -> pb.UserTokenResponse:
        return await self._user_service("RotateUserToken", "issue user tokens").rotate(request)

    @unary
    @audited("user-remove", audit.user_removed)
    async def RemoveUser(self, request: pb.RemoveUserRequest,
                         context: Any) -> pb.RemoveUserResponse:
        return await self._user_service("RemoveUser", "remove users").remove(request)

    @unary
    async def ListUsers(self, request: pb.ListUsersRequest, context: Any) -> pb.ListUsersResponse:
        return await self._user_service("ListUsers", "list users").list()

    @unary
    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.Identity:
        return who_am_i()

    @unary
    @audited("cluster-set", audit.setting_set)
    async def SetClusterSetting(self, request: pb.SetClusterSettingRequest,
                                context: Any) -> pb.ClusterSettings:
        access.require_admin("SetClusterSetting", "change cluster settings")
        return await ClusterSettingsService(store=self._tasks.store).set(request.key,
                                                                         request.value)

    @unary
    async def GetClusterSettings(self, request: pb.GetClusterSettingsRequest,
                                 context: Any) -> pb.ClusterSettings:
        return await ClusterSettingsService(store=self._tasks.store).get()

    @unary
    async def ListAudit(self, request: pb.ListAuditRequest, context: Any) -> pb.ListAuditResponse:
        if self.audit is None:
            raise NotStarted("this node keeps no audit trail")
        return await self.audit.list(request)

    def _user_service(self, method: str, what: str) -> UserService:
        """The user service, once the caller is known to be an admin."""
        access.require_admin(method, what)
        if self._users is None:
            raise NotStarted("this node does not manage users")
        return self._users
