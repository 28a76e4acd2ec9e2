"""Retries by failure class: which class an attempt's end falls in, whether the task gets
another attempt, and how long it waits first. Pure functions (the random source is a
parameter, so tests pin it).

Node loss is no failure class: it stays governed by spec.restart (lifecycle.after_owner_lost)
and never spends a retry.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from node._gen.filch.v1 import filch_pb2 as pb

# The classes `--retry-on` accepts, in the order help texts list them.
FAILED = "failed"
OOM = "oom"
TIMEOUT = "timeout"
START_FAILED = "start-failed"
CLASSES = (FAILED, OOM, TIMEOUT, START_FAILED)

# A retry_backoff_seconds of 0 means this base: long enough that a failing task does not
# spin through its retries while whatever broke it (a full disk, a flapping service) is
# still broken, short enough that a flaky test costs a second.
DEFAULT_BACKOFF = 1.0
# No back-off exceeds this, however many retries are left: an hour is the longest a user
# would wait without looking, and a larger base * 2**n (n up to spec.retries) would
# otherwise put a task out of reach for days.
MAX_BACKOFF = 3600.0
# Jitter: a factor drawn from [JITTER_LOW, JITTER_HIGH), so that tasks that failed together
# (a whole array hitting one bad node) do not come back at the same instant.
JITTER_LOW = 0.5
JITTER_HIGH = 1.5


def failure_class(reason: int, exit_code: int) -> str | None:
    """The --retry-on class of an attempt that ended this way, or None for a success (exit
    code 0), a cancel or a node loss: those are never retried."""
    if reason == pb.REASON_EXITED:
        return FAILED if exit_code != 0 else None
    if reason == pb.REASON_OOM_KILLED:
        return OOM
    if reason == pb.REASON_TIMED_OUT:
        return TIMEOUT
    if reason == pb.REASON_START_FAILED:
        return START_FAILED
    return None


def should_retry(task: pb.Task, reason: int, exit_code: int) -> str | None:
    """The failure class when this attempt end is to be retried (its class is in
    spec.retry_on and retries are left), else None."""
    found = failure_class(reason, exit_code)
    if found is None or found not in task.spec.retry_on:
        return None
    return found if task.retries_used < task.spec.retries else None


def backoff(spec: pb.TaskSpec, retries_used: int,
            uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before the retry that follows `retries_used` earlier ones:
    base * 2**retries_used * uniform(0.5, 1.5), at most MAX_BACKOFF."""
    base = spec.retry_backoff_seconds if spec.retry_backoff_seconds > 0 else DEFAULT_BACKOFF
    # The exponent is bounded before it is used: 2**retries_used of a large count would
    # be a float overflow, and anything past the cap is the cap anyway.
    exponent = min(retries_used, 64)
    return min(base * 2.0 ** exponent * uniform(JITTER_LOW, JITTER_HIGH), MAX_BACKOFF)


def describe_end(reason: int, exit_code: int, *, time_limit: float = 0.0,
                 message: str = "") -> str:
    """An attempt's end as the tail of "retry 1 of 3 in 1.6s after ...": "exit code 1"."""
    if reason == pb.REASON_EXITED:
        return f"exit code {exit_code}"
    if reason == pb.REASON_OOM_KILLED:
        return "running out of memory"
    if reason == pb.REASON_TIMED_OUT:
        return f"running longer than its time limit of {seconds(time_limit)}"
    if reason == pb.REASON_START_FAILED:
        return "failing to start" + (f": {message}" if message else "")
    return pb.Reason.Name(reason).removeprefix("REASON_").lower()  # type: ignore[arg-type]


def seconds(value: float) -> str:
    """A duration as people write one in a message: "2s", "1.6s", "90s"."""
    return f"{value:.1f}s" if value < 10 and value != int(value) else f"{value:.0f}s"
