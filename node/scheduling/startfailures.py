"""The back-off after node-side start failures: the "black hole" guard.

A node that cannot start tasks for reasons of its own (task network or /work setup,
runc itself; never the task's own command) finishes each stolen task at once, so it is
always the idlest node and would win most steals: one broken machine would fail most of
a cluster's work. After FAILURES_TO_BACK_OFF such failures in a row it steals nothing for
a back-off that doubles with each further failure (capped), says so in its node record,
and tries again when the back-off ends; a start that works resets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from node.core import metrics

log = logging.getLogger(__name__)

# Failures in a row before backing off: one can be bad luck (an address pool briefly
# exhausted), three in a row is the node.
FAILURES_TO_BACK_OFF = 3
# First back-off, and the cap: short enough that a fixed node is back within seconds,
# long enough at the cap that a broken one costs the cluster one task per 5 minutes.
FIRST_BACKOFF = 10.0
MAX_BACKOFF = 300.0


class StartBackoff:
    """Counts node-side start failures in a row; listeners hear each change of state."""

    def __init__(self, *, first: float = FIRST_BACKOFF, cap: float = MAX_BACKOFF,
                 threshold: int = FAILURES_TO_BACK_OFF) -> None:
        self._first = first
        self._cap = cap
        self._threshold = threshold
        self.failures = 0
        """Node-side start failures since the last start that worked."""
        self.last_failure = ""
        self.until = 0.0
        """time.time() the back-off ends (0: none)."""
        self._until_monotonic = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call listener (in the event loop) when a back-off starts or ends."""
        self._listeners.append(listener)

    @property
    def active(self) -> bool:
        return self._until_monotonic > time.monotonic()

    def failed(self, message: str) -> None:
        """A start failed for a node-side reason (message: what failed)."""
        metrics.NODE_SIDE_START_FAILURES.inc()
        self.failures += 1
        self.last_failure = message
        if self.failures < self._threshold:
            return
        seconds = min(self._cap, self._first * 2.0 ** min(self.failures - self._threshold, 32))
        self._until_monotonic = time.monotonic() + seconds
        self.until = time.time() + seconds
        log.error("%d task starts in a row failed for reasons of this node (last: %s): "
                  "stealing nothing for %.0f s", self.failures, message, seconds)
        metrics.START_BACKOFF.set(1)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._ended)
        self._notify()

    def succeeded(self) -> None:
        """A start worked: the node is fine, forget the failures."""
        if not self.failures:
            return
        published = self.failures >= self._threshold
        self.failures = 0
        self.last_failure = ""
        self._clear()
        if published:
            log.info("a task started: the start back-off is reset")
            self._notify()

    def _ended(self) -> None:
        # The node tries again (and publishes that); the count stays, so one more
        # failure backs off at once, for twice as long.
        log.info("start back-off over: stealing again")
        self._clear()
        self._notify()

    def _clear(self) -> None:
        self._until_monotonic = 0.0
        self.until = 0.0
        metrics.START_BACKOFF.set(0)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
