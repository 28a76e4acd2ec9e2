"""Following a task's output across its attempts (`filch submit --wait --follow`): each
attempt's log in turn, as it happens, until the task is finished."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import grpc

from node._gen.filch.v1 import filch_pb2 as pb
from node.client import Client
from node.core.errors import ClientError
from node.core.states import is_finished

# How often one attempt's log stream is opened again when it broke while the attempt still
# runs (a node restarting, a proxy hop failing), and the pause between: about as long as
# Client.wait rides out a node that stops answering (node/core/polling.py RECONNECT_GRACE).
FOLLOW_REOPENS = 30
FOLLOW_REOPEN_PAUSE = 1.0


def follow(client: Client, task_id: str, write: Callable[[bytes], None], *,
           on_attempt_end: Callable[[pb.Task, int], None] | None = None,
           on_missing: Callable[[int, ClientError], None] | None = None,
           task: pb.Task | None = None) -> pb.Task:
    """Stream the output of every attempt of the task, in order, as it happens (after
    a retry or a requeue, the next attempt's), until the task is finished; return its
    final record.

    write gets the output; on_attempt_end(task, n) is called once attempt n is over
    (with the record that shows how); on_missing(n, error) when attempt n's output
    cannot be read (its node is gone), after which following goes on with the next.
    """
    task = task if task is not None else client.get(task_id)
    attempt = 1
    while True:
        task = client.wait(task_id, until=functools.partial(_reached, attempt), task=task)
        if task.attempt < attempt:
            return task     # finished without (another) attempt
        _follow_attempt(client, task_id, attempt, write, on_missing)
        task = client.wait(task_id, until=functools.partial(_attempt_over, attempt))
        if on_attempt_end is not None:
            on_attempt_end(task, attempt)
        if is_finished(task) and task.attempt <= attempt:
            return task
        attempt += 1


def _follow_attempt(client: Client, task_id: str, attempt: int,
                    write: Callable[[bytes], None],
                    on_missing: Callable[[int, ClientError], None] | None) -> None:
    """Write one attempt's log until it ends. A stream that breaks while the attempt
    still runs is opened again, skipping what was already written."""
    written = 0
    for _ in range(FOLLOW_REOPENS):
        skip = written
        try:
            for data in client.logs(task_id, True, attempt):
                if skip:
                    data, skip = data[skip:], max(0, skip - len(data))
                if data:
                    write(data)
                    written += len(data)
            failure: ClientError | None = None
        except ClientError as error:
            failure = error
        # Done when the attempt is over and its stream ended by itself, or never gave
        # anything (its node is gone). One that broke midway is read to its end again.
        if _attempt_over(attempt, client.get(task_id)) and (failure is None or written == 0):
            if failure is not None and on_missing is not None:
                on_missing(attempt, failure)
            return
        time.sleep(FOLLOW_REOPEN_PAUSE)
    if on_missing is not None:
        on_missing(attempt, ClientError(
            grpc.StatusCode.UNAVAILABLE, f"the log stream of attempt {attempt} broke "
            f"{FOLLOW_REOPENS} times", server=client.server, timeout=None))


def _reached(attempt: int, task: pb.Task) -> bool:
    """follow(): attempt n has started, or the task finished without it."""
    return task.attempt >= attempt or is_finished(task)


def _attempt_over(attempt: int, task: pb.Task) -> bool:
    """follow(): attempt n has ended (the task finished, is waiting for another attempt,
    or is on a later one)."""
    return (task.attempt > attempt or is_finished(task)
            or task.state == pb.TASK_STATE_PENDING)
