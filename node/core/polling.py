"""Polling until something is done: the waits of node/client.py (a task, an array)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from node.core.errors import ClientError

# Status polling while waiting: quick first looks catch short tasks, the cap keeps a
# long wait from hammering the node.
POLL_FIRST = 0.1
POLL_MAX = 1.0
# How long a wait rides out a node that stops answering (restart, leader election).
RECONNECT_GRACE = 30.0
# How often a wait reports progress between polls: smooth enough for a spinner.
PROGRESS_TICK = 0.1

# What a wait polls: one task's record, or an array's.
Polled = TypeVar("Polled")


def poll(fetch: Callable[[], Polled], done: Callable[[Polled], bool],
         on_progress: Callable[[Polled, float, bool], None] | None,
         limit: float | None, current: Polled) -> Polled:
    """fetch() until done(what it returned) or limit seconds pass; the last answer.
    on_progress every PROGRESS_TICK meanwhile; a transient ClientError is ridden out for
    RECONNECT_GRACE seconds."""
    start = time.monotonic()
    delay = POLL_FIRST
    next_poll = start + delay
    failing_since: float | None = None
    while not done(current):
        now = time.monotonic()
        if limit is not None and now - start >= limit:
            break
        if now >= next_poll:
            try:
                current = fetch()
                failing_since = None
            except ClientError as failure:
                failing_since = failing_since or now
                if not failure.transient or now - failing_since > RECONNECT_GRACE:
                    raise
            took = time.monotonic() - now
            delay = max(min(delay * 2, POLL_MAX), 2 * took)
            next_poll = time.monotonic() + delay
            continue
        if on_progress is not None:
            on_progress(current, now - start, failing_since is not None)
        time.sleep(max(0.0, min(PROGRESS_TICK, next_poll - now)))
    return current
