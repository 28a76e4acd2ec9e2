"""Timing the steps of a runc attempt (filch_attempt_step_seconds{step} and
filch_attempt_step_cpu_seconds_total{step}), so a slow sandbox shows which step is slow.

Cheap on purpose (one os.times() and one perf_counter() at each end): it wraps every
attempt. The CPU figure is the agent process's plus its reaped children's (mkfs, ip, nft,
runc): exact for an attempt that overlaps no other, shared between overlapping ones, as a
per-process counter cannot tell whose await it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from node.core import metrics

BUNDLE = "bundle"
NETWORK = "network"
WORK = "work"
RUN = "run"
TEARDOWN = "teardown"
ETCD = "etcd"
STEPS = (BUNDLE, NETWORK, WORK, RUN, TEARDOWN, ETCD)


def _cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@contextmanager
def step(name: str) -> Iterator[None]:
    """Record the wall and CPU time of the block under `name`, also when it raises."""
    wall, cpu = time.perf_counter(), _cpu()
    try:
        yield
    finally:
        metrics.ATTEMPT_STEP.labels(name).observe(time.perf_counter() - wall)
        metrics.ATTEMPT_STEP_CPU.labels(name).inc(max(0.0, _cpu() - cpu))
