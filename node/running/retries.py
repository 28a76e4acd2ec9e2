"""Retries by failure class: whether an attempt's end gets another attempt, and how long
it waits first (exponential back-off with jitter). The classes themselves are
lifecycle.RETRY_CLASSES / lifecycle.failure_class.

Node loss is no failure class: it stays governed by spec.restart (lifecycle.after_owner_lost)
and never spends a retry.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import lifecycle
from node.core.units import format_seconds

# A retry_backoff_seconds of 0 means this base: long enough that a failing task does not
# spin through its retries while whatever broke it (a full disk, a flapping service) is
# still broken, short enough that a flaky test costs a second.
DEFAULT_BACKOFF = 1.0
# No back-off exceeds this, however many retries are left: an hour is the longest a user
# would wait without looking, and base * 2**n for n up to spec.retries would otherwise put
# a task out of reach for days.
MAX_BACKOFF = 3600.0
# Jitter: a factor drawn from [JITTER_LOW, JITTER_HIGH), so that tasks that failed together
# (a whole array hitting one bad node) do not come back at the same instant.
JITTER_LOW = 0.5
JITTER_HIGH = 1.5


def attempt_ended(task: pb.Task, reason: int, *, exit_code: int = 0, message: str = "",
                  uniform: Callable[[float, float], float] = random.uniform) -> pb.Task:
    """What a RUNNING task becomes when its attempt ended by itself (exited, OOM, timed
    out, failed to start): PENDING held for a retry (HOLD_RETRY, not_before = now +
    backoff) when its failure class is in spec.retry_on and retries are left, else
    COMPLETE with this reason. Either way the attempt joins the history."""
    done = lifecycle.finished(task, pb.TASK_STATE_COMPLETE, reason, exit_code=exit_code,
                              message=message)
    failure = lifecycle.failure_class(done)
    if (failure is None or failure not in task.spec.retry_on
            or task.retries_used >= task.spec.retries):
        return done
    wait = backoff(task.spec, task.retries_used, uniform)
    how = describe_end(reason, exit_code, time_limit=task.spec.time_limit_seconds,
                       message=message)
    why = (f"retry {task.retries_used + 1} of {task.spec.retries} in "
           f"{format_seconds(round(wait, 1) if wait < 60 else round(wait))} after {how}")
    return lifecycle.retried(task, reason, exit_code=exit_code, backoff=wait, why=why)


def backoff(spec: pb.TaskSpec, retries_used: int,
            uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before the retry that follows `retries_used` earlier ones:
    base * 2**retries_used * uniform(0.5, 1.5), at most MAX_BACKOFF (base: the spec's
    retry_backoff_seconds, DEFAULT_BACKOFF when 0)."""
    base = spec.retry_backoff_seconds if spec.retry_backoff_seconds > 0 else DEFAULT_BACKOFF
    # The exponent is bounded before it is used: 2.0**n overflows a float past n = 1023,
    # and anything past the cap is the cap anyway.
    exponent = min(retries_used, 64)
    return min(base * 2.0 ** exponent * uniform(JITTER_LOW, JITTER_HIGH), MAX_BACKOFF)


def timed_out_message(limit: float) -> str:
    """The message of an attempt stopped at its time limit."""
    return f"ran longer than its time limit of {format_seconds(limit)}"


def describe_end(reason: int, exit_code: int, *, time_limit: float = 0.0,
                 message: str = "") -> str:
    """An attempt's end as the tail of "retry 1 of 3 in 1.6s after ...": "exit code 1"."""
    if reason == pb.REASON_EXITED:
        return f"exit code {exit_code}"
    if reason == pb.REASON_OOM_KILLED:
        return "running out of memory"
    if reason == pb.REASON_TIMED_OUT:
        return f"running longer than its time limit of {format_seconds(time_limit)}"
    if reason == pb.REASON_START_FAILED:
        return "failing to start" + (f": {message}" if message else "")
    return pb.Reason.Name(reason).removeprefix("REASON_").lower()  # type: ignore[arg-type]
