"""The gRPC face in-process, over a real channel, with fake services behind it: bad
input is INVALID_ARGUMENT naming the field, each filch error its own code with its plain
message, and a client never sees UNKNOWN or a traceback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node._gen.filch.v1 import filch_pb2_grpc as pb_grpc
from node.core.errors import Overloaded, OwnerUnavailable, StoreFull, StoreUnavailable, TaskNotFound
from node.faces.api import SchedulerServicer, add_to_server

pytestmark = pytest.mark.timeout(60)

TASK_ID = "01a24fc9-a544-7001-a1d1-4c24566d916c"


class FakeTasks:
    """Raises whatever the test sets; records what reached it."""

    def __init__(self) -> None:
        self.raises: Exception | None = None
        self.asked: list[str] = []
        self.channel: Any = None

    async def get(self, task_id: str) -> pb.Task:
        self.asked.append(task_id)
        if self.raises is not None:
            raise self.raises
        return pb.Task(id=task_id)

    async def explain_pending(self, tasks: list[pb.Task]) -> None:
        pass

    async def submit(self, spec: pb.TaskSpec, request_id: str) -> tuple[pb.Task, bool]:
        self.asked.append(spec.command)
        return pb.Task(id=TASK_ID, spec=spec), True


class FakeLogs:
    async def stream(self, task_id: str, *, follow: bool, attempt: int,
                     proxied: bool) -> AsyncIterator[bytes]:
        yield b"first line\n"
        raise OwnerUnavailable("node b (10.0.0.2:7070), which holds the log, does not answer")


@pytest.fixture
async def api() -> AsyncIterator[tuple[pb_grpc.SchedulerStub, FakeTasks]]:
    tasks = FakeTasks()
    fake_tasks: Any = tasks
    fake_logs: Any = FakeLogs()
    fake_sessions: Any = object()
    server = grpc.aio.server()
    add_to_server(SchedulerServicer(tasks=fake_tasks, logs=fake_logs, sessions=fake_sessions,
                                    events=fake_sessions), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    tasks.channel = channel
    try:
        yield pb_grpc.SchedulerStub(channel), tasks
    finally:
        await channel.close()
        await server.stop(None)


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value.code(), raised.value.details() or ""


async def test_bad_input_is_invalid_argument_naming_the_field_and_reaches_nothing(
        api: tuple[pb_grpc.SchedulerStub, FakeTasks]) -> None:
    stub, tasks = api
    code, details = await _code(stub.GetTask(pb.GetTaskRequest(id="not-an-id")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("id:"), details
    code, details = await _code(stub.Submit(pb.SubmitRequest(spec=pb.TaskSpec())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "command" in details, details
    assert tasks.asked == []


async def test_undecodable_bytes_are_invalid_argument_not_internal(
        api: tuple[pb_grpc.SchedulerStub, FakeTasks]) -> None:
    _, tasks = api
    raw = tasks.channel.unary_unary(
        "/filch.v1.Scheduler/GetTask", request_serializer=lambda data: data,
        response_deserializer=pb.Task.FromString)
    code, details = await _code(raw(b"\xff\xff\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid filch.v1.GetTaskRequest" in details


@pytest.mark.parametrize(("error", "expected"), [
    (TaskNotFound(TASK_ID), grpc.StatusCode.NOT_FOUND),
    (StoreUnavailable("etcd: no quorum"), grpc.StatusCode.UNAVAILABLE),
    (StoreFull("etcd NOSPACE alarm"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Overloaded("pending tasks at the limit"), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
async def test_each_error_has_its_code_and_its_message(
        api: tuple[pb_grpc.SchedulerStub, FakeTasks], error: Exception,
        expected: grpc.StatusCode) -> None:
    stub, tasks = api
    tasks.raises = error
    code, details = await _code(stub.GetTask(pb.GetTaskRequest(id=TASK_ID)))
    assert (code, details) == (expected, str(error))


async def test_a_bug_is_internal_with_no_traceback_never_unknown(
        api: tuple[pb_grpc.SchedulerStub, FakeTasks], caplog: pytest.LogCaptureFixture) -> None:
    stub, tasks = api
    tasks.raises = KeyError("secret internals")
    code, details = await _code(stub.GetTask(pb.GetTaskRequest(id=TASK_ID)))
    assert code == grpc.StatusCode.INTERNAL
    assert details == "internal error (KeyError); the node's log has details"
    assert "secret internals" in caplog.text     # in the node's log, not the answer


async def test_a_log_owner_gone_mid_stream_is_unavailable_after_what_was_sent(
        api: tuple[pb_grpc.SchedulerStub, FakeTasks]) -> None:
    stub, _ = api
    received: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for chunk in stub.StreamLogs(pb.StreamLogsRequest(id=TASK_ID)):
            received.append(chunk.data)
    assert received == [b"first line\n"]
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "does not answer" in (raised.value.details() or "")
