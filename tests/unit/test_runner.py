"""The runner against a real etcd and the process executor: drain on shutdown hands
back what is still running — requeued (restart) or NODE_LOST (no restart); an attempt past
its time limit is stopped (TIMED_OUT); a retryable end is held, then queued again at its
not_before by the node that wrote it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, metrics
from node.core.config import Config
from node.etcd import failpoints
from node.etcd.store import Store
from node.running.runner import Runner
from node.running.runtime.base import AttemptSpec, Executor, ExitStatus
from node.running.runtime.process import ProcessExecutor
from node.scheduling.node_state import NodeState, Registration
from tests.unit.etcd_fixture import require_etcd

require_etcd()

pytestmark = pytest.mark.timeout(60)


async def _steal(store: Store, state: NodeState, runner: Runner, *, restart: bool = True,
                 spec: pb.TaskSpec | None = None, launch: bool = True) -> str:
    """Queue a task (default: a long one) and steal it for this node, as the stealer would
    (launch=False: a steal whose answer was lost, a running key without an attempt)."""
    spec = spec or pb.TaskSpec(command="sleep", args=["30"])
    spec.restart = restart
    spec.cpu_millis, spec.memory_bytes = 100, 1 << 20
    task = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING, spec=spec)
    task.submitted_at.GetCurrentTime()
    assert await store.transition(None, task) is not None
    queued = await store.get_task(task.id)
    assert queued is not None and state.registration is not None
    stolen = lifecycle.stolen(queued.task, state.registration.node_id, "n", "127.0.0.1:1")
    token = await store.transition(queued, stolen, lease_id=state.registration.lease_id)
    assert token is not None
    if launch:
        state.capacity.reserve(stolen.spec)
        runner.launch(lifecycle.started(stolen, token))
    return task.id


@contextlib.asynccontextmanager
async def _running(store: Store, tmp_path: Path, executor: Executor | None = None,
                   ) -> AsyncIterator[tuple[NodeState, Runner]]:
    """A registered node's runner, running (default: the process executor)."""
    config = Config(name="n", data_dir=str(tmp_path), executor="process",
                    shutdown_grace=0.2, cancel_grace=1.0)
    state = NodeState.for_config(config)
    state.registration = Registration(keys.new_node_id(), await store.grant_lease(60))
    state.live.set()
    runner = Runner(config=config, store=store,
                    executor=executor or ProcessExecutor(task_uid=None), state=state)
    loop = asyncio.create_task(runner.run())
    await asyncio.sleep(0)      # run() enters its task group
    try:
        yield state, runner
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def _until(store: Store, task_id: str, done: Callable[[pb.Task], bool]) -> pb.Task:
    """The task's record once done(record); the test's timeout bounds the wait."""
    while True:
        found = await store.get_task(task_id)
        assert found is not None
        if done(found.task):
            return found.task
        await asyncio.sleep(0.05)


async def test_an_attempt_past_its_time_limit_is_stopped_and_ends_timed_out(
        store: Store, tmp_path: Path) -> None:
    """The process executor: SIGTERM at the limit (sh exits on it here, before the grace)."""
    async with _running(store, tmp_path) as (state, runner):
        spec = pb.TaskSpec(command="sh", args=["-c", "echo started; sleep 30"],
                           time_limit_seconds=0.5)
        before = metrics.TIMEOUTS._value.get()
        task_id = await _steal(store, state, runner, spec=spec)
        started = time.monotonic()
        done = await _until(store, task_id, lambda task: task.state != pb.TASK_STATE_RUNNING)
        took = time.monotonic() - started
        assert (done.state, done.reason) == (pb.TASK_STATE_COMPLETE, pb.REASON_TIMED_OUT)
        assert done.message == "ran longer than its time limit of 0.5s"
        assert done.exit_code != 0
        # Stopped by the limit, not by the end of its 30 s sleep; the upper bound is loose
        # because a loaded 2-core machine (CI) can take seconds to run the stop.
        assert 0.5 <= took < 15, took
        assert [a.reason for a in done.attempts] == [pb.REASON_TIMED_OUT]
        assert metrics.TIMEOUTS._value.get() == before + 1
        assert not runner.runs(task_id)


async def test_a_retryable_end_is_held_then_queued_again_at_its_not_before(
        store: Store, tmp_path: Path) -> None:
    async with _running(store, tmp_path) as (state, runner):
        spec = pb.TaskSpec(command="sh", args=["-c", "exit 3"], retries=2,
                           retry_on=["failed"], retry_backoff_seconds=0.4)
        task_id = await _steal(store, state, runner, spec=spec)
        held = await _until(store, task_id, lambda task: task.state != pb.TASK_STATE_RUNNING)
        assert (held.state, held.hold, held.retries_used) == \
            (pb.TASK_STATE_PENDING, pb.HOLD_RETRY, 1)
        assert held.message.startswith("retry 1 of 2 in ") and \
            held.message.endswith("after exit code 3"), held.message
        assert f"/task/status/blocked/{task_id}".encode() in \
            await store.list_ids(keys.STATUS)
        queued = await _until(store, task_id, lambda task: task.hold == pb.HOLD_NONE)
        released_at = time.time()
        assert queued.state == pb.TASK_STATE_PENDING and queued.retries_used == 1
        # Released no earlier than not_before (clocks of one machine: a small tolerance).
        assert released_at >= held.not_before.ToNanoseconds() / 1e9 - 0.05
        assert await store.count(keys.queued("")) == 1


async def test_drain_requeues_restartable_tasks_and_ends_the_others_node_lost(
        store: Store, tmp_path: Path) -> None:
    async with _running(store, tmp_path) as (state, runner):
        again = await _steal(store, state, runner, restart=True)
        lost = await _steal(store, state, runner, restart=False)
        assert runner.is_running(again, 1) and runner.is_running(lost, 1)
        await runner.shutdown()
        requeued, ended = await store.get_task(again), await store.get_task(lost)
        assert requeued is not None and requeued.task.state == pb.TASK_STATE_PENDING
        assert "shut down" in requeued.task.message
        assert ended is not None
        assert (ended.task.state, ended.task.reason) == (pb.TASK_STATE_COMPLETE,
                                                         pb.REASON_NODE_LOST)
        assert await store.count(keys.RUNNING) == 0
        # The stopped attempts write nothing over the hand-back and give their room back.
        changed = state.capacity.subscribe()
        while state.capacity.load() > 0:
            await changed.wait()
            changed.clear()
        assert not runner.runs(again) and not runner.runs(lost)
        await runner.shutdown()     # idempotent: nothing left
        after = await store.get_task(again)
        assert after is not None and after.mod_revision == requeued.mod_revision


async def test_drain_requeues_an_attempt_that_never_started_even_without_restart(
        store: Store, tmp_path: Path) -> None:
    """A restart=false attempt the drain stops before its container was started never
    ran: it goes back to the queue, not NODE_LOST (runner.before_start holds the start
    past the drain's grace)."""
    failpoints.configure("runner.before_start=1*sleep(30)")
    try:
        async with _running(store, tmp_path) as (state, runner):
            task_id = await _steal(store, state, runner, restart=False)
            await runner.shutdown()
            found = await store.get_task(task_id)
            assert found is not None
            assert found.task.state == pb.TASK_STATE_PENDING, found.task
            assert "shut down; it had not started" in found.task.message
            assert await store.count(keys.RUNNING) == 0
    finally:
        failpoints.configure("")


async def test_drain_hands_back_a_running_key_without_an_attempt_and_starts_nothing(
        store: Store, tmp_path: Path) -> None:
    """A steal committed for this node but never launched (its answer lost, or it landed
    as the drain began): the drain hands it back to the queue instead of leaving it to
    the lease expiry (restart=false: NODE_LOST without having run), and adoption during
    the drain starts nothing."""
    async with _running(store, tmp_path) as (state, runner):
        task_id = await _steal(store, state, runner, restart=False, launch=False)
        await runner.shutdown()
        found = await store.get_task(task_id)
        assert found is not None
        assert found.task.state == pb.TASK_STATE_PENDING, found.task
        assert await store.count(keys.RUNNING) == 0
        # The same key found by the sweep while draining: handed back, never launched.
        again = await _steal(store, state, runner, restart=False, launch=False)
        assert state.registration is not None
        await runner._check_owned(state.registration)
        assert not runner.runs(again)
        found = await store.get_task(again)
        assert found is not None and found.task.state == pb.TASK_STATE_PENDING, found.task


class _NeverCreated:
    """An executor whose every `runc run` fails before it creates the container: start()
    returns, the attempt ends not started (runc_created.py)."""

    name = "runc"
    WHY = "runc exited 1 before creating container c-a1: no space left on device"

    async def start(self, spec: AttemptSpec) -> _NeverCreated:
        return self

    async def wait(self) -> ExitStatus:
        return ExitStatus(exit_code=1, not_started=self.WHY)

    async def stop(self, grace: float) -> None:
        return None

    async def reap_stale(self) -> int:
        return 0


async def test_an_attempt_whose_container_was_never_created_is_requeued_even_without_restart(
        store: Store, tmp_path: Path) -> None:
    """Issue 22, bug B: not COMPLETE / EXITED / 1; handled as a NodeStartError from start()
    is: back to the queue, no retry spent, the node's start failures counted."""
    async with _running(store, tmp_path, _NeverCreated()) as (state, runner):
        task_id = await _steal(store, state, runner, restart=False)
        task = await _until(store, task_id, lambda task: task.state != pb.TASK_STATE_RUNNING)
        assert (task.state, task.retries_used) == (pb.TASK_STATE_PENDING, 0), task
        assert task.message == (f"requeued: attempt 1 could not start on node n (a problem "
                                f"of that node, not of the task): {_NeverCreated.WHY}")
        [attempt] = task.attempts
        assert (attempt.reason, attempt.message) == (pb.REASON_START_FAILED, _NeverCreated.WHY)
        assert (state.backoff.failures, state.backoff.last_failure) == (1, _NeverCreated.WHY)
