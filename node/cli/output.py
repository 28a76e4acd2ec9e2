"""What the `filch` command prints: exit statuses, one-line errors, JSON, the wait spinner."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import click

from node.core.errors import ClientError

if TYPE_CHECKING:
    # Types only: --help and argument parsing must not load protobuf or grpc (tests/unit/
    # test_cli_imports.py); what prints a record imports them when it runs.
    from node._gen.filch.v1 import filch_pb2

EXIT_FAILURE = 1
EXIT_USAGE = 2
# What shells report for a process killed by a signal: 128 + the signal number.
EXIT_INTERRUPTED = 128 + 2  # SIGINT
EXIT_OOM_KILLED = 128 + 9  # SIGKILL, which is how the kernel's OOM killer ends it
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE: `filch ls | head` stopped reading
# Like `docker run`: the command never got to exit by itself (not started, node lost).
EXIT_NOT_RUN = 125
# timeout(1)'s status for a command it stopped at its time limit.
EXIT_TIMED_OUT = 124
# sysexits.h EX_NOPERM: the caller may not do this (another user's task, an admin call).
EXIT_NO_PERMISSION = 77


class CommandError(click.ClickException):
    """A failure the user can act on: shown as one "error: ..." line, then exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class TaskOutput:
    """Where a task's output goes (`logs`, `submit --wait --follow`): stdout byte for byte
    when piped or redirected, so files and pipes get what the task wrote; escaped when
    stdout is a terminal, so the task cannot drive it (retitle the window, clear the
    screen, rewrite earlier lines, answer-back sequences)."""

    def __init__(self, *, stream: BinaryIO | None = None, terminal: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        if terminal is None:
            terminal = self._stream.isatty()
        from node.faces import render
        self._escaper = render.OutputEscaper() if terminal else None

    def write(self, data: bytes) -> None:
        self._stream.write(self._escaper.escape(data) if self._escaper else data)
        self._stream.flush()

    def close(self) -> None:
        """The stream ended: a character cut at its very end is shown as its bytes."""
        if self._escaper is not None:
            self._stream.write(self._escaper.escape(b"", final=True))
            self._stream.flush()


def one_line(text: str) -> str:
    return " ".join(text.split())


def client_failure(error: ClientError) -> CommandError:
    """A failed call in the CLI's words, with the flag that would help."""
    # By name: comparing with grpc.StatusCode would load grpc on the way out.
    code = error.code.name
    if code == "INVALID_ARGUMENT":
        return CommandError(error.message, EXIT_USAGE)
    if code == "PERMISSION_DENIED":
        return CommandError(f"permission denied: {error.message}", EXIT_NO_PERMISSION)
    if code == "UNAVAILABLE" and not error.reachable:
        return CommandError(
            f"cannot reach filch at {error.server} ({error.message}); is the node running? "
            "set --server or FILCH_SERVER")
    if code == "UNAVAILABLE":
        # The node answered, but says it cannot serve (etcd has no quorum, say).
        return CommandError(f"filch at {error.server} is unavailable: {error.message}")
    if code == "DEADLINE_EXCEEDED":
        return CommandError(
            f"filch at {error.server} did not answer within {error.timeout or 0:g} s; "
            "raise --timeout (or FILCH_TIMEOUT) if the node is just slow")
    return CommandError(error.message)


def output_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-o", "--output", type=click.Choice(["table", "json"]), default="table",
        show_default=True, help="table for people, json for programs.")(function)


def print_json(data: Any) -> None:
    import json
    click.echo(json.dumps(data, indent=2))


def task_exit_status(task: filch_pb2.Task) -> int:
    """The status `filch submit --wait` exits with, shell conventions where they exist."""
    from node._gen.filch.v1 import filch_pb2
    if task.reason == filch_pb2.REASON_DEPENDENCY_FAILED:
        return EXIT_NOT_RUN
    if task.state == filch_pb2.TASK_STATE_CANCELED or task.reason == filch_pb2.REASON_CANCELED:
        return EXIT_INTERRUPTED
    match task.reason:
        case filch_pb2.REASON_EXITED:
            if task.exit_code < 0:  # a process executor reports "killed by signal N" as -N
                return 128 - task.exit_code
            return min(task.exit_code, 255)
        case filch_pb2.REASON_OOM_KILLED:
            return EXIT_OOM_KILLED
        case filch_pb2.REASON_TIMED_OUT:
            return EXIT_TIMED_OUT
        case filch_pb2.REASON_NODE_LOST | filch_pb2.REASON_START_FAILED:
            return EXIT_NOT_RUN
    return EXIT_FAILURE


class Progress:
    """One self-erasing status line on stderr, drawn only when stderr is a terminal."""

    _FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    _ASCII_FRAMES = "|/-\\"

    def __init__(self, *, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty() and os.environ.get("TERM") != "dumb"
        self._frames = self._FRAMES
        try:
            self._FRAMES.encode(self._stream.encoding or "ascii")
        except (UnicodeEncodeError, LookupError):
            self._frames = self._ASCII_FRAMES
        self._tick = 0
        self._drawn = False

    def draw(self, text: str) -> None:
        if not self.enabled:
            return
        frame = self._frames[self._tick % len(self._frames)]
        self._tick += 1
        # A line wider than the terminal wraps, and \r then erases only its last part.
        width = shutil.get_terminal_size().columns - 1
        line = f"{frame} {text}"[:width]
        self._stream.write(f"\r{line}\033[K")
        self._stream.flush()
        self._drawn = True

    def show(self, task: filch_pb2.Task, elapsed: float, reconnecting: bool) -> None:
        """Client.wait's on_progress."""
        self.draw(progress_text(task, elapsed, reconnecting))

    def show_array(self, tasks: list[filch_pb2.Task], elapsed: float,
                   reconnecting: bool) -> None:
        """Client.wait_array's on_progress."""
        self.draw(array_progress_text(tasks, elapsed, reconnecting))

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False


def progress_text(task: filch_pb2.Task, elapsed: float, reconnecting: bool) -> str:
    from node._gen.filch.v1 import filch_pb2
    from node.faces import records, render
    state = records.state_name(task.state)
    if task.state == filch_pb2.TASK_STATE_RUNNING:
        state += f" on {render.node_label(task)}"
    elif task.message:
        state += f" ({task.message})"
    if reconnecting:
        state += " · reconnecting"
    return f"{state} · {elapsed:.1f}s"


def array_progress_text(tasks: list[filch_pb2.Task], elapsed: float, reconnecting: bool) -> str:
    from node._gen.filch.v1 import filch_pb2
    from node.core.states import is_finished
    finished = sum(is_finished(task) for task in tasks)
    running = sum(task.state == filch_pb2.TASK_STATE_RUNNING for task in tasks)
    text = f"{finished} of {len(tasks)} finished · {running} running"
    if reconnecting:
        text += " · reconnecting"
    return f"{text} · {elapsed:.1f}s"


# How many of an array's unsuccessful tasks `submit --wait --array` names on stderr.
ARRAY_FAILURES_NAMED = 3


def array_exit_status(tasks: list[filch_pb2.Task]) -> tuple[int, list[str]]:
    """The status `filch submit --wait --array` exits with: the highest of its tasks'
    (as `sbatch --wait` does for an array); and lines for stderr naming what failed."""
    from node.faces import render
    failed = [task for task in tasks if task_exit_status(task) != 0]
    if not failed:
        return 0, []
    lines = [f"{len(failed)} of {len(tasks)} tasks of the array did not succeed"]
    lines += [f"task {task.id} (index {task.array_index}) {render.outcome(task)}"
              for task in failed[:ARRAY_FAILURES_NAMED]]
    if len(failed) > ARRAY_FAILURES_NAMED:
        lines.append(f"... and {len(failed) - ARRAY_FAILURES_NAMED} more "
                     "(`filch ls --array ARRAY_ID` lists them all)")
    return max(task_exit_status(task) for task in failed), lines
