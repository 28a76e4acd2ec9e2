"""The records each lifecycle arrow produces (design.md, "Task lifecycle")."""

from __future__ import annotations

import time

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle, limits

NODE_ID = "6f1c2a9e-0d4b-4c1e-9a53-2b8f0e6d7c11"


def pending(*, restart: bool | None = True, attempt: int = 0) -> pb.Task:
    spec = pb.TaskSpec(command="/bin/true", cpu_millis=100, memory_bytes=128 << 20)
    if restart is not None:
        spec.restart = restart
    task = pb.Task(id=keys.new_task_id(), spec=spec, state=pb.TASK_STATE_PENDING,
                   attempt=attempt)
    task.submitted_at.GetCurrentTime()
    return task


def running(*, restart: bool | None = True, attempt: int = 0) -> pb.Task:
    return lifecycle.started(
        lifecycle.stolen(pending(restart=restart, attempt=attempt), NODE_ID, "n1",
                         "10.0.0.1:7070"),
        fencing_token=42)


def recent(stamp: Timestamp) -> bool:
    return abs(stamp.ToNanoseconds() / 1e9 - time.time()) < 60


# -- stolen / started --------------------------------------------------------------------


def test_stolen_starts_the_next_attempt_on_this_node() -> None:
    task = pending(attempt=2)
    task.message = "requeued after attempt 2: node lost"
    task.finished_at.GetCurrentTime()
    stolen = lifecycle.stolen(task, NODE_ID, "n1", "10.0.0.1:7070")
    assert stolen.state == pb.TASK_STATE_RUNNING
    assert stolen.attempt == 3
    assert (stolen.node_id, stolen.node_name, stolen.node_address) == \
        (NODE_ID, "n1", "10.0.0.1:7070")
    assert stolen.HasField("started_at") and recent(stolen.started_at)
    assert not stolen.HasField("finished_at")
    assert stolen.message == ""
    assert stolen.id == task.id and stolen.spec == task.spec
    assert stolen.submitted_at == task.submitted_at


def test_stolen_leaves_the_original_record_alone() -> None:
    task = pending()
    before = task.SerializeToString()
    lifecycle.stolen(task, NODE_ID, "n1", "10.0.0.1:7070")
    assert task.SerializeToString() == before


def test_first_steal_is_attempt_one() -> None:
    assert lifecycle.stolen(pending(), NODE_ID, "n1", "a:1").attempt == 1


def test_started_records_the_fencing_token() -> None:
    task = lifecycle.stolen(pending(), NODE_ID, "n1", "a:1")
    assert lifecycle.started(task, 1234).fencing_token == 1234
    assert task.fencing_token == 0


# -- finished ----------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "reason", "exit_code"), [
    (pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 0),
    (pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 3),
    (pb.TASK_STATE_COMPLETE, pb.REASON_OOM_KILLED, 137),
    (pb.TASK_STATE_CANCELED, pb.REASON_CANCELED, 0),
])
def test_finished_records_the_outcome(state: int, reason: int, exit_code: int) -> None:
    task = running()
    done = lifecycle.finished(task, state, reason, exit_code=exit_code, message="why")
    assert (done.state, done.reason, done.exit_code, done.message) == \
        (state, reason, exit_code, "why")
    assert done.HasField("finished_at") and recent(done.finished_at)
    assert done.node_id == NODE_ID and done.attempt == 1
    assert task.state == pb.TASK_STATE_RUNNING and not task.HasField("finished_at")


def test_finished_can_cancel_a_pending_task() -> None:
    done = lifecycle.finished(pending(), pb.TASK_STATE_CANCELED, pb.REASON_CANCELED)
    assert done.state == pb.TASK_STATE_CANCELED
    assert done.attempt == 0


# -- after_owner_lost --------------------------------------------------------------------


def test_owner_lost_requeues_a_restartable_task() -> None:
    task = running(restart=True, attempt=1)
    assert task.attempt == 2
    again = lifecycle.after_owner_lost(task, "node n1 lost its lease")
    assert again.state == pb.TASK_STATE_PENDING
    assert "attempt 2" in again.message
    assert "node n1 lost its lease" in again.message
    assert again.fencing_token == 0
    assert again.attempt == 2, "the attempt count survives; the next steal makes it 3"
    assert not again.HasField("finished_at")


def test_owner_lost_ends_a_non_restartable_task_as_node_lost() -> None:
    task = running(restart=False)
    lost = lifecycle.after_owner_lost(task, "node n1 lost its lease")
    assert lost.state == pb.TASK_STATE_COMPLETE
    assert lost.reason == pb.REASON_NODE_LOST
    assert lost.HasField("finished_at") and recent(lost.finished_at)
    assert "attempt 1" in lost.message
    assert "node n1 lost its lease" in lost.message


def test_requeued_then_stolen_is_a_fresh_attempt() -> None:
    again = lifecycle.after_owner_lost(running(restart=True), "lost")
    other = "0b7e2f55-1c3d-4e6a-8f90-a1b2c3d4e5f6"
    stolen = lifecycle.stolen(again, other, "n2", "10.0.0.2:7070")
    assert stolen.attempt == 2
    assert stolen.node_id == other
    assert stolen.message == ""


def test_owner_lost_treats_unset_restart_as_true() -> None:
    task = running(restart=None)
    assert lifecycle.after_owner_lost(task, "lost").state == pb.TASK_STATE_PENDING


def test_a_record_too_large_to_write_loses_args_and_env_and_says_so() -> None:
    task = pb.Task(id="01a21bce-b194-7000-994b-fef8376138b8", state=pb.TASK_STATE_RUNNING,
                   spec=pb.TaskSpec(command="sh", name="big", args=["-c", "x" * 10_000],
                                    env={"BIG": "y" * 10_000}))
    done = lifecycle.finished(task, pb.TASK_STATE_COMPLETE, pb.REASON_START_FAILED)
    failed = lifecycle.too_large(done, 4096)
    assert failed.reason == pb.REASON_START_FAILED
    assert (failed.spec.command, failed.spec.name) == ("sh", "big")
    assert not failed.spec.args and not failed.spec.env
    assert failed.message.startswith(f"the task record is {done.ByteSize()} bytes")
    assert "4096" in failed.message and failed.message.endswith("dropped.")
    assert failed.ByteSize() < 1024


def test_messages_are_cut_to_keep_records_bounded() -> None:
    task = pb.Task(id="01a21bce-b194-7000-994b-fef8376138b8", state=pb.TASK_STATE_RUNNING)
    done = lifecycle.finished(task, pb.TASK_STATE_COMPLETE, pb.REASON_START_FAILED,
                              message="e" * (10 * limits.MAX_MESSAGE_CHARS))
    assert len(done.message) <= limits.MAX_MESSAGE_CHARS + 10


# -- attempt history -----------------------------------------------------------------------


def test_every_attempt_end_joins_the_history() -> None:
    """Finish, cancel, requeue and NODE_LOST each append the attempt that ended, with the
    node it ran on and how it ended; the next steal leaves the history alone."""
    requeued = lifecycle.after_owner_lost(running(restart=True), "node n1 lost its lease")
    [first] = requeued.attempts
    assert (first.attempt, first.node_id, first.node_name, first.node_address) == \
        (1, NODE_ID, "n1", "10.0.0.1:7070")
    assert first.reason == pb.REASON_NODE_LOST and "lost its lease" in first.message
    assert first.HasField("started_at") and recent(first.finished_at)
    other = "0b7e2f55-1c3d-4e6a-8f90-a1b2c3d4e5f6"
    second = lifecycle.started(lifecycle.stolen(requeued, other, "n2", "10.0.0.2:7070"), 7)
    assert list(second.attempts) == [first]
    done = lifecycle.finished(second, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, exit_code=3)
    assert [(a.attempt, a.node_name, a.reason, a.exit_code) for a in done.attempts] == \
        [(1, "n1", pb.REASON_NODE_LOST, 0), (2, "n2", pb.REASON_EXITED, 3)]
    assert done.attempts[-1].finished_at == done.finished_at
    canceled = lifecycle.finished(running(), pb.TASK_STATE_CANCELED, pb.REASON_CANCELED)
    assert [a.reason for a in canceled.attempts] == [pb.REASON_CANCELED]
    lost = lifecycle.after_owner_lost(running(restart=False), "gone")
    assert [a.reason for a in lost.attempts] == [pb.REASON_NODE_LOST]


def test_ending_a_task_that_never_ran_records_no_attempt() -> None:
    done = lifecycle.finished(pending(), pb.TASK_STATE_CANCELED, pb.REASON_DEPENDENCY_FAILED)
    assert not done.attempts


def test_the_history_keeps_the_newest_attempts_and_says_when_it_dropped_some() -> None:
    task = running()
    for _ in range(lifecycle.MAX_ATTEMPT_RECORDS + 4):
        again = lifecycle.after_owner_lost(task, "lost")
        task = lifecycle.started(lifecycle.stolen(again, NODE_ID, "n1", "a:1"), 1)
    done = lifecycle.finished(task, pb.TASK_STATE_COMPLETE, pb.REASON_EXITED)
    last = lifecycle.MAX_ATTEMPT_RECORDS + 5
    assert [a.attempt for a in done.attempts] == \
        list(range(last - lifecycle.MAX_ATTEMPT_RECORDS + 1, last + 1))
    assert "attempts 1-5 were dropped" in done.message


def test_a_full_history_of_the_largest_attempts_stays_within_the_record_overhead() -> None:
    """The worst case: every kept attempt with the longest node name, address and message,
    and the task's own message at its limit. ASCII: the limits count characters."""
    task = running()
    task.node_name = "n" * 253
    task.node_address = "a" * 260
    for _ in range(lifecycle.MAX_ATTEMPT_RECORDS + 1):
        again = lifecycle.after_owner_lost(task, "x" * limits.MAX_MESSAGE_CHARS)
        task = lifecycle.started(lifecycle.stolen(again, NODE_ID, "n" * 253, "a" * 260),
                                 2**62)
    done = lifecycle.finished(task, pb.TASK_STATE_COMPLETE, pb.REASON_START_FAILED,
                              exit_code=-(2**31), message="m" * limits.MAX_MESSAGE_CHARS)
    assert len(done.attempts) == lifecycle.MAX_ATTEMPT_RECORDS
    assert done.ByteSize() - done.spec.ByteSize() <= limits.RECORD_OVERHEAD_BYTES
