"""Test-only fault injection: named points at precise lines that can sleep or fail.

A race window that is a few microseconds wide in production (between a commit and its
answer, while a container starts) is widened on purpose by a test, so the test hits it
every time instead of hoping a sleep lands in it. Points are switched on only through
the FILCH_FAILPOINTS environment variable, read once when the agent starts:

    FILCH_FAILPOINTS="runner.before_start=sleep(2);stealer.after_commit=1*error(deadline)"

Each entry is `name=[count*]action`; actions:
    sleep(seconds)   wait that long (the rest of the node keeps running)
    block(seconds)   hold the event loop that long, computing (nothing else on that loop
                     runs: a burst of synchronous work on a busy node)
    error(kind)      raise the error the code at that line would see from etcd or runc:
                     unavailable, deadline, leader (etcd "leader changed"), nospace,
                     executor, node (a node-side start failure: start back-off)
    off              nothing
`count*` limits the action to the first count hits; later hits do nothing.

With the variable unset, `hit()` returns after one test of an empty dict: free in
production.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

from node.core.errors import ExecutorError, InvalidArgument, NodeStartError
from node.etcd.etcd_errors import etcd_error

log = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "FILCH_FAILPOINTS"

# The error(kind) kinds, each as the (gRPC status, etcd message) the etcd client reports;
# store.etcd_error() maps them exactly as a real failure is mapped.
ETCD_ERRORS = {
    "unavailable": ("UNAVAILABLE", "failpoint: etcd member unreachable"),
    "deadline": ("DEADLINE_EXCEEDED", "Deadline Exceeded"),
    "leader": ("UNAVAILABLE", "etcdserver: leader changed"),
    "nospace": ("RESOURCE_EXHAUSTED", "etcdserver: mvcc: database space exceeded"),
}
KINDS = (*ETCD_ERRORS, "executor", "node")

# Longest sleep a failpoint may ask for: a typo must not hang a test run for hours.
MAX_SLEEP = 600.0

_ENTRY = re.compile(r"^(?P<name>[a-z_]+\.[a-z_]+)=(?:(?P<count>[0-9]+)\*)?"
                    r"(?P<action>sleep|block|error|off)(?:\((?P<argument>[^()]*)\))?$")


@dataclass
class Failpoint:
    """One configured point: what it does, and how many more times (None: always)."""

    action: str
    argument: str = ""
    remaining: int | None = None


_points: dict[str, Failpoint] = {}


def parse(text: str) -> dict[str, Failpoint]:
    """Parse a FILCH_FAILPOINTS value. Raises InvalidArgument naming the bad entry."""
    points: dict[str, Failpoint] = {}
    for entry in (part.strip() for part in text.split(";")):
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None:
            raise InvalidArgument(ENVIRONMENT_VARIABLE, f"{entry!r} is not "
                                  "name=[count*]sleep(seconds)|block(seconds)|error(kind)|off")
        action, argument = match["action"], match["argument"] or ""
        if action in ("sleep", "block"):
            try:
                seconds = float(argument)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds <= MAX_SLEEP:
                raise InvalidArgument(ENVIRONMENT_VARIABLE, f"{entry!r}: {action} takes "
                                      f"0..{MAX_SLEEP:.0f} seconds")
        elif action == "error" and argument not in KINDS:
            raise InvalidArgument(ENVIRONMENT_VARIABLE, f"{entry!r}: error kind must be one "
                                  f"of {', '.join(KINDS)}")
        elif action == "off" and argument:
            raise InvalidArgument(ENVIRONMENT_VARIABLE, f"{entry!r}: off takes no argument")
        count = int(match["count"]) if match["count"] is not None else None
        points[match["name"]] = Failpoint(action, argument, count)
    return points


def configure(text: str) -> None:
    """Replace the active failpoints (the agent calls this once, from the environment)."""
    points = parse(text)
    _points.clear()
    _points.update(points)
    if points:
        log.warning("FAILPOINTS ACTIVE (testing only): %s", text)


def active() -> dict[str, Failpoint]:
    """The configured failpoints, by name (a copy)."""
    return dict(_points)


async def hit(name: str) -> None:
    """Run the action configured for this point, if any.

    Raises the configured error (StoreUnavailable, StoreFull, ExecutorError). Cancelling
    a sleeping point cancels the sleep.
    """
    if not _points:
        return
    point = _points.get(name)
    if point is None or point.action == "off" or point.remaining == 0:
        return
    if point.remaining is not None:
        point.remaining -= 1
    # Tests await this line to know the window is open.
    log.warning("failpoint %s: %s(%s)", name, point.action, point.argument)
    if point.action == "sleep":
        await asyncio.sleep(float(point.argument))
        log.warning("failpoint %s: slept", name)
    elif point.action == "block":
        until = time.monotonic() + float(point.argument)
        while time.monotonic() < until:
            pass
        log.warning("failpoint %s: blocked the loop", name)
    else:
        raise error(point.argument)


def error(kind: str) -> Exception:
    """The exception error(kind) raises."""
    if kind == "executor":
        return ExecutorError("failpoint: the executor failed")
    if kind == "node":
        return NodeStartError("failpoint: this node could not set up the attempt")
    code, details = ETCD_ERRORS[kind]
    return etcd_error(code, details)
