"""The log service against a real etcd, real log files and a real runner: an attempt's log
read from this node's disk, attempt 0 meaning the latest, an attempt that does not exist
refused naming the field, a follower that gets every byte the task wrote until it ended,
and an owner that is gone reported as such (UNAVAILABLE), not as a hang or an empty log."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.core.config import Config
from node.core.errors import InvalidArgument, OwnerUnavailable
from node.core.tls import Security
from node.etcd.store import Store
from node.faces.logs import LogService
from node.running.attempt_files import log_path
from node.running.runner import Runner
from node.running.runtime.process import ProcessExecutor
from node.scheduling.node_state import NodeState, Registration
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)

HERE = "127.0.0.1:7070"


def _node(store: Store, tmp_path: Path) -> tuple[NodeState, Runner, LogService]:
    """One node: its runner (process executor, not yet running) and its log service."""
    config = Config(name="here", data_dir=str(tmp_path), executor="process", listen=HERE,
                    shutdown_grace=0.2, cancel_grace=1.0)
    state = NodeState.for_config(config)
    runner = Runner(config=config, store=store, executor=ProcessExecutor(task_uid=None),
                    state=state)
    return state, runner, LogService(config=config, store=store, runner=runner,
                                     security=Security())


@contextlib.asynccontextmanager
async def _running(store: Store, state: NodeState, runner: Runner) -> AsyncIterator[None]:
    """The node registered and its runner running (only the test that runs a task needs
    it: the others read what the records and the disk say)."""
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    state.live.set()
    loop = asyncio.create_task(runner.run())
    await asyncio.sleep(0)      # run() enters its task group
    try:
        yield
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def _ran_twice(store: Store, data_dir: Path) -> str:
    """A finished task whose two attempts both ran on this node, each with its log file."""
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_COMPLETE,
                   reason=pb.REASON_EXITED, attempt=2, node_name="here", node_address=HERE,
                   spec=pb.TaskSpec(command="true", cpu_millis=100, memory_bytes=1 << 20))
    task.submitted_at.GetCurrentTime()
    task.finished_at.GetCurrentTime()
    for attempt in (1, 2):
        task.attempts.append(pb.AttemptRecord(attempt=attempt, node_name="here",
                                              node_address=HERE, reason=pb.REASON_EXITED))
        path = log_path(data_dir, task.id, attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"attempt {attempt} said this\n".encode())
    assert await store.transition(None, task) is not None
    return task.id


async def _read(logs: LogService, task_id: str, *, attempt: int = 0,
                follow: bool = False) -> bytes:
    return b"".join([chunk async for chunk in logs.stream(task_id, follow=follow,
                                                          attempt=attempt, proxied=False)])


async def test_attempt_0_is_the_latest_and_n_is_that_attempt(store: Store,
                                                              tmp_path: Path) -> None:
    _, _, logs = _node(store, tmp_path)
    task_id = await _ran_twice(store, tmp_path)
    assert await _read(logs, task_id) == b"attempt 2 said this\n"
    assert await _read(logs, task_id, attempt=2) == b"attempt 2 said this\n"
    assert await _read(logs, task_id, attempt=1) == b"attempt 1 said this\n"


async def test_an_attempt_that_does_not_exist_is_refused_naming_the_field(
        store: Store, tmp_path: Path) -> None:
    _, _, logs = _node(store, tmp_path)
    task_id = await _ran_twice(store, tmp_path)
    with pytest.raises(InvalidArgument) as refused:
        await _read(logs, task_id, attempt=3)
    assert refused.value.field == "attempt"
    assert str(refused.value) == (f"attempt: task {task_id} has no attempt 3: its attempts "
                                  "are 1-2")


async def test_follow_streams_every_byte_until_the_task_ends(store: Store,
                                                             tmp_path: Path) -> None:
    """The task writes a first line, waits for the test's go, writes a second and exits:
    the follower gets the first line while the task runs, then the second, then its end."""
    go = tmp_path / "go"
    state, runner, logs = _node(store, tmp_path)
    spec = pb.TaskSpec(command="sh", args=[
        "-c", f"echo first; while [ ! -e {go} ]; do sleep 0.02; done; echo second"],
        cpu_millis=100, memory_bytes=1 << 20)
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING, spec=spec)
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    async with _running(store, state, runner):
        queued = await store.get_task(task.id)
        assert queued is not None and state.registration is not None
        stolen = lifecycle.stolen(queued.task, state.registration.node_id, "here", HERE)
        token = await store.transition(queued, stolen, lease_id=state.registration.lease_id)
        assert token is not None
        state.capacity.reserve(stolen.spec)
        runner.launch(lifecycle.started(stolen, token))

        stream = logs.stream(task.id, follow=True, attempt=0, proxied=False)
        received = await anext(stream)
        assert received == b"first\n"           # live, before the task ended
        go.touch()
        async for chunk in stream:
            received += chunk
        assert received == b"first\nsecond\n"
        # The stream ended because the task did: its record says so.
        ended = await store.get_task(task.id)
        assert ended is not None
        assert (ended.task.state, ended.task.exit_code) == (pb.TASK_STATE_COMPLETE, 0)


async def test_an_owner_that_is_gone_is_reported_unavailable(store: Store,
                                                            tmp_path: Path) -> None:
    """The attempt runs on another node, which no longer answers (a port bound by this test
    and not listening refuses the connection): the service names the node and says why, as
    OwnerUnavailable, which the API answers with UNAVAILABLE."""
    _, _, logs = _node(store, tmp_path)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{closed.getsockname()[1]}"
        task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_RUNNING, attempt=1,
                       node_id=keys.new_node_id(), node_name="gone", node_address=gone,
                       spec=pb.TaskSpec(command="true", cpu_millis=100, memory_bytes=1 << 20))
        task.submitted_at.GetCurrentTime()
        assert await store.transition(None, task) is not None
        with pytest.raises(OwnerUnavailable) as unreachable:
            await asyncio.wait_for(_read(logs, task.id), 20)
    assert str(unreachable.value).startswith(
        f"node gone ({gone}), which ran attempt 1 of task {task.id}, cannot be reached")
