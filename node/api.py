"""The gRPC servicer: validate input, call the services, map errors to status codes.

No business logic here. A client never sees UNKNOWN or a Python traceback: unexpected
errors are logged with their traceback and answered INTERNAL with a short message.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from node import metrics, validation
from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.errors import (
    Conflict,
    FilchError,
    InvalidArgument,
    OwnerUnavailable,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
)
from node.logs import PROXIED_HEADER, LogService, NotStarted
from node.service import TaskService

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")

_CODES: list[tuple[type[FilchError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (TaskNotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (OwnerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (NotStarted, grpc.StatusCode.FAILED_PRECONDITION),
]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            await context.abort(code, str(exc))
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error ({type(exc).__name__}); the node's log has details")
    raise AssertionError("unreachable")


def _count(method: str, context: Any, started: float) -> None:
    code = context.code() or grpc.StatusCode.OK
    metrics.API_REQUESTS.labels(method, code.name).inc()
    metrics.API_LATENCY.labels(method).observe(time.monotonic() - started)


def _unary(method: Callable[[Any, Request, Any], Awaitable[Response]]
           ) -> Callable[[Any, Request, Any], Awaitable[Response]]:
    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: Any) -> Response:
        started = time.monotonic()
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped to a status code, never swallowed
            await _abort(context, exc)
        finally:
            _count(method.__name__, context, started)
    return wrapper


class SchedulerServicer(pb_grpc.SchedulerServicer):
    """filch.v1.Scheduler on this node."""

    def __init__(self, tasks: TaskService, logs: LogService) -> None:
        self._tasks = tasks
        self._logs = logs

    @_unary
    async def Submit(self, request: pb.SubmitRequest, context: Any) -> pb.SubmitResponse:
        spec = validation.spec(request.spec)
        request_id = validation.request_id(request.request_id)
        task, created = await self._tasks.submit(spec, request_id)
        return pb.SubmitResponse(task=task, created=created)

    @_unary
    async def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        task = await self._tasks.cancel(validation.task_id(request.id))
        return pb.CancelResponse(task=task)

    @_unary
    async def GetTask(self, request: pb.GetTaskRequest, context: Any) -> pb.Task:
        task = await self._tasks.get(validation.task_id(request.id))
        await self._tasks.explain_pending([task])
        return task

    @_unary
    async def ListTasks(self, request: pb.ListTasksRequest, context: Any) -> pb.ListTasksResponse:
        state = validation.state_filter(request.state)
        page_size = validation.page_size(request.page_size)
        tasks, token = await self._tasks.list_tasks(state, page_size, request.page_token)
        await self._tasks.explain_pending(tasks)
        return pb.ListTasksResponse(tasks=tasks, next_page_token=token)

    @_unary
    async def ListNodes(self, request: pb.ListNodesRequest, context: Any) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=await self._tasks.list_nodes())

    async def StreamLogs(self, request: pb.StreamLogsRequest,
                         context: Any) -> AsyncIterator[pb.LogChunk]:
        started = time.monotonic()
        try:
            task_id = validation.task_id(request.id)
            proxied = any(key == PROXIED_HEADER for key, _ in context.invocation_metadata() or ())
            async for data in self._logs.stream(task_id, follow=request.follow,
                                                attempt=request.attempt, proxied=proxied):
                yield pb.LogChunk(data=data)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped to a status code, never swallowed
            await _abort(context, exc)
        finally:
            _count("StreamLogs", context, started)
