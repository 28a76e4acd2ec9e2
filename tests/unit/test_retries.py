"""Retries by failure class: which attempt ends are retried, and the back-off before."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, lifecycle
from node.running import retries

NODE_ID = "6f1c2a9e-0d4b-4c1e-9a53-2b8f0e6d7c11"


def running(*, retries_allowed: int = 3, retry_on: tuple[str, ...] = ("failed",),
            retries_used: int = 0, backoff: float = 0.0, time_limit: float = 0.0) -> pb.Task:
    spec = pb.TaskSpec(command="/bin/false", retries=retries_allowed, retry_on=retry_on,
                       retry_backoff_seconds=backoff, time_limit_seconds=time_limit)
    task = pb.Task(id=keys.new_task_id(), spec=spec, state=pb.TASK_STATE_PENDING,
                   retries_used=retries_used, attempt=retries_used)
    return lifecycle.started(lifecycle.stolen(task, NODE_ID, "n1", "10.0.0.1:7070"), 42)


def middle(low: float, high: float) -> float:
    """A jitter draw of exactly 1."""
    return (low + high) / 2


@pytest.mark.parametrize(("reason", "exit_code", "expected"), [
    (pb.REASON_EXITED, 1, "failed"),
    (pb.REASON_EXITED, -9, "failed"),
    (pb.REASON_EXITED, 0, None),
    (pb.REASON_OOM_KILLED, 137, "oom"),
    (pb.REASON_TIMED_OUT, 137, "timeout"),
    (pb.REASON_START_FAILED, 0, "start-failed"),
    (pb.REASON_NODE_LOST, 0, None),
    (pb.REASON_CANCELED, 0, None),
])
def test_failure_classes(reason: int, exit_code: int, expected: str | None) -> None:
    ended = pb.AttemptRecord(reason=reason, exit_code=exit_code)  # type: ignore[arg-type]
    assert lifecycle.failure_class(ended) == expected


def test_a_listed_failure_with_retries_left_is_held_for_a_retry() -> None:
    task = running(backoff=1.6)
    new = retries.attempt_ended(task, pb.REASON_EXITED, exit_code=1, uniform=middle)
    assert (new.state, new.hold) == (pb.TASK_STATE_PENDING, pb.HOLD_RETRY)
    assert new.retries_used == 1
    assert new.message == "retry 1 of 3 in 1.6s after exit code 1"
    assert new.fencing_token == 0 and not new.HasField("finished_at")
    wait = new.not_before.ToNanoseconds() - new.attempts[-1].finished_at.ToNanoseconds()
    assert wait == pytest.approx(1.6e9, abs=1e6)
    [ended] = new.attempts
    assert (ended.attempt, ended.node_id, ended.node_name, ended.node_address) == \
        (1, NODE_ID, "n1", "10.0.0.1:7070")
    assert (ended.reason, ended.exit_code) == (pb.REASON_EXITED, 1)
    assert ended.started_at == task.started_at


@pytest.mark.parametrize(("reason", "exit_code", "retry_on"), [
    (pb.REASON_OOM_KILLED, 137, ("failed",)),        # OOM is not "failed"
    (pb.REASON_EXITED, 0, ("failed",)),              # success
    (pb.REASON_EXITED, 2, ("oom", "timeout")),       # failed, but not listed
    (pb.REASON_TIMED_OUT, 143, ("failed",)),
])
def test_an_end_whose_class_is_not_listed_completes(reason: int, exit_code: int,
                                                     retry_on: tuple[str, ...]) -> None:
    new = retries.attempt_ended(running(retry_on=retry_on), reason, exit_code=exit_code)
    assert (new.state, new.reason, new.exit_code) == (pb.TASK_STATE_COMPLETE, reason, exit_code)
    assert new.retries_used == 0
    assert [ended.reason for ended in new.attempts] == [reason]


def test_retries_spent_complete_the_task() -> None:
    new = retries.attempt_ended(running(retries_used=3), pb.REASON_EXITED, exit_code=1)
    assert (new.state, new.reason, new.exit_code) == (pb.TASK_STATE_COMPLETE,
                                                       pb.REASON_EXITED, 1)


@pytest.mark.parametrize(("reason", "retry_on", "said"), [
    (pb.REASON_OOM_KILLED, ("oom",), "after running out of memory"),
    (pb.REASON_TIMED_OUT, ("timeout",), "after running longer than its time limit of 2s"),
    (pb.REASON_START_FAILED, ("start-failed",), "after failing to start: no such file"),
])
def test_every_class_can_be_retried(reason: int, retry_on: tuple[str, ...], said: str) -> None:
    task = running(retry_on=retry_on, time_limit=2)
    new = retries.attempt_ended(task, reason, exit_code=137, message="no such file",
                                uniform=middle)
    assert new.hold == pb.HOLD_RETRY
    assert new.message.endswith(said), new.message


def test_backoff_doubles_from_its_base_with_jitter_and_a_cap() -> None:
    spec = pb.TaskSpec(retry_backoff_seconds=2)
    assert [retries.backoff(spec, used, middle) for used in range(4)] == [2, 4, 8, 16]
    assert retries.backoff(spec, 0, lambda low, high: low) == 1.0
    assert retries.backoff(spec, 0, lambda low, high: high) == 3.0
    assert retries.backoff(pb.TaskSpec(), 0, middle) == retries.DEFAULT_BACKOFF
    assert retries.backoff(spec, 30, middle) == retries.MAX_BACKOFF
    assert retries.backoff(spec, 10_000, middle) == retries.MAX_BACKOFF     # no overflow


def test_backoff_draws_stay_within_the_jitter() -> None:
    spec = pb.TaskSpec(retry_backoff_seconds=1)
    draws = [retries.backoff(spec, 1) for _ in range(200)]
    assert all(1.0 <= draw < 3.0 for draw in draws)
    assert max(draws) - min(draws) > 0.5     # jittered, not constant
