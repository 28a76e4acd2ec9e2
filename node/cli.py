"""The `filch` command: submit, watch and cancel tasks over gRPC, list nodes, run a node.

Every failure ends as ONE line on stderr ("error: ...") and a non-zero exit status:
2 for a bad argument, 1 for anything else, 130 after Ctrl-C. Never a traceback
(FILCH_DEBUG=1 shows one for an unexpected error). stdout carries only results,
so `id=$(filch submit -- make test)` and `filch ls -o json | jq` just work.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import queue
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

import click
import grpc
from click.core import ParameterSource

from node import config as config_module
from node import keys, render
from node._gen.filch.v1 import filch_pb2, filch_pb2_grpc
from node.errors import InvalidArgument
from node.tls import Security
from node.units import CPU_FORMS, SIZE_FORMS, format_size, parse_cpu, parse_size

DEFAULT_SERVER = "127.0.0.1:7070"
# Per-RPC deadline: rides out an etcd leader election (~1 s) with room to spare, yet a hung
# node fails the command in seconds rather than never.
DEFAULT_TIMEOUT = 10.0

EXIT_FAILURE = 1
EXIT_USAGE = 2
# What shells report for a process killed by a signal: 128 + the signal number.
EXIT_INTERRUPTED = 128 + 2  # SIGINT
EXIT_OOM_KILLED = 128 + 9  # SIGKILL, which is how the kernel's OOM killer ends it
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE: `filch ls | head` stopped reading
# Like `docker run`: the command never got to exit by itself (not started, node lost).
EXIT_NOT_RUN = 125

# A submit the node answers with UNAVAILABLE is retried this long (an etcd election takes
# about a second; a lossy link can stall a commit for a few).
SUBMIT_RETRY_SECONDS = 15.0
SUBMIT_RETRY_PAUSE = 0.5

# Status polling while waiting: quick first looks catch short tasks, the cap keeps a
# long wait from hammering the node.
POLL_FIRST = 0.1
POLL_MAX = 1.0
# How long `filch cancel` waits for the node to stop a running task: past its cancel
# grace (SIGTERM -> SIGKILL, 5 s by default) with a wide margin for a loaded node.
CANCEL_WAIT = 60.0
# How long a wait rides out a node that stops answering (restart, leader election)
# before giving up.
RECONNECT_GRACE = 30.0
# Spinner redraw period: smooth enough to look alive, cheap enough not to matter.
SPINNER_TICK = 0.1

_STATES = {
    "pending": filch_pb2.TASK_STATE_PENDING,
    "running": filch_pb2.TASK_STATE_RUNNING,
    "complete": filch_pb2.TASK_STATE_COMPLETE,
    "canceled": filch_pb2.TASK_STATE_CANCELED,
}


# -- errors ----------------------------------------------------------------------------------


class CommandError(click.ClickException):
    """A failure the user can act on: shown as one "error: ..." line, then exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class RpcFailure(CommandError):
    """A gRPC call failed; transient ones (node unreachable, deadline) may be retried."""

    def __init__(self, message: str, code: Any, status: int = EXIT_FAILURE) -> None:
        super().__init__(message, status)
        self.code = code

    @property
    def transient(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _usage_message(error: click.UsageError) -> str:
    message = error.format_message()
    # click capitalises its sentences; ours read "error: invalid value for ...".
    if message[:2].istitle():
        message = message[0].lower() + message[1:]
    if error.ctx is not None:
        message = message.rstrip(".") + f" (see '{error.ctx.command_path} --help')"
    return message


class FilchGroup(click.Group):
    """A click group whose every failure is one line on stderr and a meaningful status."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            status = result if isinstance(result, int) else 0
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            status = error.exit_code
        except click.UsageError as error:
            status = _fail(_usage_message(error), error.exit_code)
        except CommandError as error:
            status = _fail(error.format_message(), error.status)
        except click.ClickException as error:
            status = _fail(error.format_message(), error.exit_code)
        except click.Abort:
            # Ctrl-C: the user knows what they did; say nothing more.
            status = EXIT_INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            status = EXIT_BROKEN_PIPE
        except Exception as error:
            if os.environ.get("FILCH_DEBUG"):
                raise
            status = _fail(f"unexpected {type(error).__name__}: {error} "
                           "(FILCH_DEBUG=1 shows the traceback)", EXIT_FAILURE)
        if standalone_mode:
            sys.exit(status)
        return status


def _fail(message: str, status: int) -> int:
    click.echo(f"error: {_one_line(message)}", err=True)
    return status


def _silence_stdout() -> None:
    # The reader is gone: point stdout at /dev/null so the interpreter's final flush does
    # not raise a second BrokenPipeError at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# -- the connection --------------------------------------------------------------------------


def open_channel(server: str, security: Security) -> Any:
    """The one place a gRPC channel is made: TLS and the bearer token when configured."""
    if security.tls:
        return grpc.secure_channel(server, security.channel_credentials())
    return grpc.insecure_channel(server)


def _channel_is_ready(channel: Any) -> bool:
    """Whether the channel holds a live connection right now (polled, never connects)."""
    states: queue.Queue[Any] = queue.Queue()
    callback = states.put
    channel.subscribe(callback, try_to_connect=False)
    try:
        # gRPC reports the current state from its polling thread within a millisecond.
        return bool(states.get(timeout=0.2) == grpc.ChannelConnectivity.READY)
    except queue.Empty:
        return False
    finally:
        channel.unsubscribe(callback)


class Session:
    """Calls to one filch node with the user's deadline; raises RpcFailure, never RpcError."""

    def __init__(self, server: str, timeout: float, security: Security | None = None) -> None:
        self.server = server
        self.timeout = timeout
        self.security = security or Security()
        self._channel: Any = None
        self._stub: Any = None

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    @property
    def stub(self) -> Any:
        if self._stub is None:
            self._channel = open_channel(self.server, self.security)
            self._stub = filch_pb2_grpc.SchedulerStub(self._channel)
        return self._stub

    def submit(self, request: filch_pb2.SubmitRequest) -> filch_pb2.Task:
        """Submit. When the node answers UNAVAILABLE (its etcd is mid-election or behind a
        lossy link) the submit is retried for a while under the request's idempotency key,
        so one that did land is not made twice. An unreachable node fails at once."""
        if not request.request_id:
            # A UUIDv7: the node keeps its timestamp in the task id (keys.task_id_for_request),
            # so the task still queues in submission order.
            request.request_id = keys.new_task_id()
        deadline = time.monotonic() + SUBMIT_RETRY_SECONDS
        while True:
            try:
                with self._translated_errors():
                    response: filch_pb2.SubmitResponse = self.stub.Submit(
                        request, timeout=self.timeout)
                return response.task
            except RpcFailure as failure:
                node_answered = _channel_is_ready(self._channel)
                if (failure.code != grpc.StatusCode.UNAVAILABLE or not node_answered
                        or time.monotonic() >= deadline):
                    raise
            time.sleep(SUBMIT_RETRY_PAUSE)

    def get_task(self, task_id: str) -> filch_pb2.Task:
        with self._translated_errors():
            task: filch_pb2.Task = self.stub.GetTask(
                filch_pb2.GetTaskRequest(id=task_id), timeout=self.timeout)
        return task

    def cancel(self, task_id: str) -> filch_pb2.Task:
        with self._translated_errors():
            response: filch_pb2.CancelResponse = self.stub.Cancel(
                filch_pb2.CancelRequest(id=task_id), timeout=self.timeout)
        return response.task

    def list_tasks(self, state: int, limit: int | None) -> list[filch_pb2.Task]:
        """Every task in state (0: all), following page tokens until done or limit reached."""
        tasks: list[filch_pb2.Task] = []
        token = ""
        while limit is None or len(tasks) < limit:
            page_size = 1000 if limit is None else min(1000, limit - len(tasks))
            request = filch_pb2.ListTasksRequest(
                state=state,  # type: ignore[arg-type]
                page_size=page_size, page_token=token)
            with self._translated_errors():
                response: filch_pb2.ListTasksResponse = self.stub.ListTasks(
                    request, timeout=self.timeout)
            tasks.extend(response.tasks)
            # A token that does not move would loop forever; treat it as the last page.
            if not response.next_page_token or response.next_page_token == token:
                break
            token = response.next_page_token
        return tasks if limit is None else tasks[:limit]

    def stream_logs(self, task_id: str, follow: bool, attempt: int) -> Iterator[bytes]:
        """The task's output as it arrives. No deadline: a followed log lasts as long as
        the task, and a big one takes as long as it takes."""
        request = filch_pb2.StreamLogsRequest(id=task_id, follow=follow, attempt=attempt)
        with self._translated_errors():
            for chunk in self.stub.StreamLogs(request):
                yield chunk.data

    def list_nodes(self) -> list[filch_pb2.Node]:
        with self._translated_errors():
            response: filch_pb2.ListNodesResponse = self.stub.ListNodes(
                filch_pb2.ListNodesRequest(), timeout=self.timeout)
        return list(response.nodes)

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as error:
            raise self._failure(error) from None

    def _failure(self, error: Any) -> RpcFailure:
        code = error.code()
        details = _one_line(error.details() or "") or code.name
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return RpcFailure(details, code, EXIT_USAGE)
        if code == grpc.StatusCode.UNAVAILABLE and not _channel_is_ready(self._channel):
            return RpcFailure(
                f"cannot reach filch at {self.server} ({details}); is the node running? "
                "set --server or FILCH_SERVER", code)
        if code == grpc.StatusCode.UNAVAILABLE:
            # The node answered, but says it cannot serve (etcd has no quorum, say).
            return RpcFailure(f"filch at {self.server} is unavailable: {details}", code)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RpcFailure(
                f"filch at {self.server} did not answer within {self.timeout:g} s; "
                "raise --timeout (or FILCH_TIMEOUT) if the node is just slow", code)
        return RpcFailure(details, code)


# -- waiting ---------------------------------------------------------------------------------


class Progress:
    """One self-erasing status line on stderr, drawn only when stderr is a terminal."""

    _FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    _ASCII_FRAMES = "|/-\\"

    def __init__(self, stream: TextIO | None = None) -> None:
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

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False


def _progress_text(task: filch_pb2.Task, elapsed: float, reconnecting: bool) -> str:
    state = render.state_name(task.state)
    if task.state == filch_pb2.TASK_STATE_RUNNING:
        state += f" on {render.node_label(task)}"
    elif task.message:
        state += f" ({task.message})"
    if reconnecting:
        state += " · reconnecting"
    return f"{state} · {elapsed:.1f}s"


def wait_for(
    session: Session,
    task: filch_pb2.Task,
    done: Callable[[filch_pb2.Task], bool],
    limit: float | None = None,
) -> filch_pb2.Task:
    """Poll the task until done(task) or limit seconds pass; return its last known record.

    Rides out an unreachable node for RECONNECT_GRACE seconds, then raises its RpcFailure.
    Ctrl-C ends the command with status 130 (the task itself goes on).
    """
    progress = Progress()
    start = time.monotonic()
    delay = POLL_FIRST
    next_poll = start + delay
    failing_since: float | None = None
    try:
        while not done(task):
            now = time.monotonic()
            if limit is not None and now - start >= limit:
                break
            if now >= next_poll:
                try:
                    task = session.get_task(task.id)
                    failing_since = None
                except RpcFailure as failure:
                    failing_since = failing_since or now
                    if not failure.transient or now - failing_since > RECONNECT_GRACE:
                        raise
                delay = min(delay * 2, POLL_MAX)
                next_poll = time.monotonic() + delay
                continue
            progress.draw(_progress_text(task, now - start, failing_since is not None))
            time.sleep(max(0.0, min(SPINNER_TICK, next_poll - now)))
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    finally:
        progress.clear()
    return task


def task_exit_status(task: filch_pb2.Task) -> int:
    """The status `filch submit --wait` exits with, shell conventions where they exist."""
    if task.state == filch_pb2.TASK_STATE_CANCELED or task.reason == filch_pb2.REASON_CANCELED:
        return EXIT_INTERRUPTED
    match task.reason:
        case filch_pb2.REASON_EXITED:
            if task.exit_code < 0:  # a process executor reports "killed by signal N" as -N
                return 128 - task.exit_code
            return min(task.exit_code, 255)
        case filch_pb2.REASON_OOM_KILLED:
            return EXIT_OOM_KILLED
        case filch_pb2.REASON_NODE_LOST | filch_pb2.REASON_START_FAILED:
            return EXIT_NOT_RUN
    return EXIT_FAILURE


# -- parameter types -------------------------------------------------------------------------


class SizeParam(click.ParamType[int]):
    """A size like 64Mi or 1G, as bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


class CpuParam(click.ParamType[int]):
    """CPU as cores (0.5) or millicores (500m), as millicores."""

    name = "cores"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_cpu(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


def _parse_env(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        env[key] = value
    return env


def _check_server(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if "://" in value:
        raise click.BadParameter(f"{value!r} is a URL; give HOST:PORT", ctx, param)
    return value


def _output_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-o", "--output", type=click.Choice(["table", "json"]), default="table",
        show_default=True, help="table for people, json for programs.")(function)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


# -- commands --------------------------------------------------------------------------------


@click.group(cls=FilchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", envvar="FILCH_SERVER", default=DEFAULT_SERVER, show_default=True,
              metavar="HOST:PORT", callback=_check_server, help="The filch node to talk to.")
@click.option("--timeout", envvar="FILCH_TIMEOUT", default=DEFAULT_TIMEOUT, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Deadline of each call to the node.")
@click.option("--ca", envvar="FILCH_CA", default="", metavar="FILE",
              help="The cluster CA certificate: talk TLS to the node (from `filch certs`).")
@click.option("--token-file", envvar="FILCH_TOKEN_FILE", default="", metavar="FILE",
              help="File with the API bearer token (or set FILCH_TOKEN to the token).")
@click.version_option(package_name="filch", prog_name="filch")
@click.pass_context
def cli(ctx: click.Context, server: str, timeout: float, ca: str, token_file: str) -> None:
    """filch: a peer-to-peer batch task scheduler.

    Submit a task to any node; whichever node has room runs it.
    """
    if ctx.invoked_subcommand in ("agent", "certs"):
        return      # they take no client settings; a missing CA file must not stop them
    try:
        security = Security.load(ca, token_file=token_file,
                                 token=os.environ.get("FILCH_TOKEN", ""))
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from None
    if security.token and not security.tls:
        raise click.UsageError("a bearer token needs TLS: pass --ca (or FILCH_CA) too")
    session = Session(server, timeout, security)
    ctx.obj = session
    ctx.call_on_close(session.close)


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--cpu", type=CpuParam(), help=f"CPU request: {CPU_FORMS}.  [default: 0.1]")
@click.option("--mem", type=SizeParam(), metavar="SIZE",
              help=f"Memory limit: {SIZE_FORMS}.  [default: 128Mi]")
@click.option("--disk", type=SizeParam(), metavar="SIZE",
              help=f"Size limit of the task's /work: {SIZE_FORMS}.  "
                   "[default: the node's --default-disk]")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Run the task again elsewhere if its node dies.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", callback=_parse_env,
              help="An environment variable for the task (repeatable).")
@click.option("--workdir", default="", metavar="DIR",
              help="Working directory inside the task (default: its own scratch dir).")
@click.option("--name", default="", help="A label for people; need not be unique.")
@click.option("--request-id", default="", metavar="ID",
              help="Idempotency key: submitting the same ID again returns the same task.")
@click.option("--network", type=click.Choice(["isolated", "none", "host"]),
              help="runc tasks: own namespace with NATed outbound access (isolated), loopback "
                   "only (none), or the host's network (host: only nodes started with "
                   "--allow-host-network run it).  [default: isolated]")
@click.option("--wait", is_flag=True,
              help="Wait for the task to finish and exit with its exit code.")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG]...")
@click.pass_obj
def submit(
    session: Session, cpu: int | None, mem: int | None, disk: int | None, restart: bool,
    env: dict[str, str], workdir: str, name: str, request_id: str, network: str | None,
    wait: bool, command: tuple[str, ...],
) -> None:
    """Queue CMD to run on whichever node has room; print its task id.

    With --wait, exit with the task's exit code: 137 when it ran out of memory,
    130 when canceled, 125 when it never ran to the end (could not start, node lost).

    \b
    Examples:
      filch submit --cpu 0.5 --mem 256Mi -- python3 train.py --epochs 3
      id=$(filch submit -- make test) && filch logs -f "$id"
    """
    spec = filch_pb2.TaskSpec(
        command=command[0], args=command[1:], cpu_millis=cpu or 0, memory_bytes=mem or 0,
        disk_bytes=disk or 0, restart=restart, env=env, workdir=workdir, name=name,
        network=network or "")
    task = session.submit(filch_pb2.SubmitRequest(spec=spec, request_id=request_id))
    click.echo(task.id)
    if not wait:
        return
    task = wait_for(session, task, render.is_finished)
    status = task_exit_status(task)
    if status != 0:
        click.echo(f"task {task.id} {render.outcome(task)}", err=True)
    raise click.exceptions.Exit(status)


@cli.command()
@click.argument("task_id", metavar="ID")
@_output_option
@click.pass_obj
def status(session: Session, task_id: str, output: str) -> None:
    """Show one task in detail."""
    task = session.get_task(task_id)
    if output == "json":
        _print_json(render.task_to_dict(task))
    else:
        click.echo(render.task_detail(task))


@cli.command(name="ls")
@click.option("--state", type=click.Choice(list(_STATES), case_sensitive=False),
              help="Only tasks in this state.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N tasks.")
@_output_option
@click.pass_obj
def list_tasks(session: Session, state: str | None, limit: int | None, output: str) -> None:
    """List tasks (all of them, unless --state or --limit)."""
    tasks = session.list_tasks(_STATES[state.lower()] if state else 0, limit)
    if output == "json":
        _print_json([render.task_to_dict(task) for task in tasks])
    elif tasks:
        click.echo(render.tasks_table(tasks))
    else:
        click.echo("no tasks" + (f" in state {state.upper()}" if state else ""), err=True)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the task ends.")
@click.option("--attempt", type=click.IntRange(min=0), default=0, metavar="N",
              help="Logs of attempt N (default: the latest).")
@click.argument("task_id", metavar="ID")
@click.pass_obj
def logs(session: Session, follow: bool, attempt: int, task_id: str) -> None:
    """Print a task's output (stdout and stderr, as the node recorded them)."""
    stdout = sys.stdout.buffer
    try:
        for data in session.stream_logs(task_id, follow, attempt):
            stdout.write(data)
            stdout.flush()
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@cli.command()
@click.option("--no-wait", is_flag=True, help="Return as soon as the cancel is recorded.")
@click.argument("task_id", metavar="ID")
@click.pass_obj
def cancel(session: Session, no_wait: bool, task_id: str) -> None:
    """Cancel a task and print the state it ends in.

    A running task gets SIGTERM, then SIGKILL after the node's grace period; this waits
    (at most 60 s) until it has stopped.
    """
    task = session.cancel(task_id)

    def stopped(current: filch_pb2.Task) -> bool:
        return current.state != filch_pb2.TASK_STATE_RUNNING

    if not no_wait:
        task = wait_for(session, task, stopped, limit=CANCEL_WAIT)
    click.echo(render.state_name(task.state))
    if not no_wait and not stopped(task):
        raise CommandError(
            f"task {task.id} still runs {CANCEL_WAIT:g} s after the cancel; "
            f"`filch status {task.id}` shows when it stops")


@cli.command()
@_output_option
@click.pass_obj
def nodes(session: Session, output: str) -> None:
    """List the live nodes, their capacity and what is allocated on them."""
    found = session.list_nodes()
    if output == "json":
        _print_json([render.node_to_dict(node) for node in found])
    elif found:
        click.echo(render.nodes_table(found))
    else:
        click.echo("no nodes", err=True)


# -- agent -----------------------------------------------------------------------------------

# Config fields whose option is not spelled --field-name.
_OPTION_NAMES = {"config_file": "--config"}
_METAVARS = {
    "listen": "HOST:PORT",
    "advertise": "HOST:PORT",
    "etcd_peer_url": "URL",
    "etcd_client_url": "URL",
    "etcd_endpoint": "URL",
    "initial_cluster": "NAME=URL,...",
    "etcd_binary": "PATH",
    "runc_binary": "PATH",
    "data_dir": "DIR",
    "config_file": "FILE",
    "cpus": "CORES",
    "memory": "SIZE",
    "etcd_quota_bytes": "SIZE",
    "etcd_heartbeat_ms": "MILLISECONDS",
    "etcd_election_timeout_ms": "MILLISECONDS",
    "task_uid": "UID",
    "lease_ttl": "SECONDS",
    "sweep_interval": "SECONDS",
    "steal_delay": "SECONDS",
    "cancel_grace": "SECONDS",
    "shutdown_grace": "SECONDS",
    "defrag_threshold": "SIZE",
    "max_log_bytes": "SIZE",
    "default_disk": "SIZE",
    "metrics_listen": "HOST:PORT",
    "retention": "SECONDS",
    "log_retention": "SECONDS",
    "housekeeping_interval": "SECONDS",
    "compaction_interval": "SECONDS",
    "compaction_keep": "REVISIONS",
    "max_finished": "COUNT",
    "task_subnet": "CIDR",
}
_CHOICES = {"executor": ["runc", "process"], "initial_cluster_state": ["new", "existing"]}
_SIZE_FIELDS = frozenset(config_module.SIZE_FIELDS)
# Defaults computed on the machine at start-up, described rather than computed for --help.
_COMPUTED_DEFAULTS = {
    "name": "this host's name",
    "data_dir": "/var/lib/filch as root, else ~/.local/share/filch",
    "cpus": "all cores",
    "memory": "all memory",
    "executor": "runc as root when installed, else process",
}
_CLICK_TYPES: dict[str, click.ParamType[Any]] = {
    "int": click.INT, "float": click.FLOAT, "str": click.STRING, "bool": click.BOOL}


def _field_docs() -> dict[str, str]:
    """Each Config field's attribute docstring (the string right below it), one line each."""
    tree = ast.parse(inspect.getsource(config_module))
    config_class = next(
        node for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == config_module.Config.__name__)
    docs = {}
    for statement, following in zip(config_class.body, config_class.body[1:], strict=False):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = _one_line(following.value.value)
    return docs


def _default_text(field: dataclasses.Field[Any]) -> str:
    if field.name in _COMPUTED_DEFAULTS:
        return _COMPUTED_DEFAULTS[field.name]
    if field.default is dataclasses.MISSING:
        return ""
    if field.name in _SIZE_FIELDS:
        return format_size(field.default)
    return str(field.default) if field.default != "" else "none"


def _config_options() -> list[click.Option]:
    """One option per Config field, its help the field's docstring.

    No click defaults and no click envvars: config.load applies FILCH_* variables, the
    TOML file and the defaults itself, so flags must hold only what the user typed.
    """
    docs = _field_docs()
    options = []
    for field in dataclasses.fields(config_module.Config):
        kind: click.ParamType[Any]
        if field.name in _SIZE_FIELDS:
            kind = SizeParam()
        elif field.name in _CHOICES:
            kind = click.Choice(_CHOICES[field.name])
        else:
            kind = _CLICK_TYPES[str(field.type)]
        flag = _OPTION_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        doc = docs.get(field.name, "")
        extra = [f"env: FILCH_{field.name.upper()}"]
        default = _default_text(field)
        if default and "(default:" not in doc:
            extra.insert(0, f"default: {default}")
        if str(field.type) == "bool":
            # A switch: given means true (FILCH_* and the TOML file can say false).
            options.append(click.Option([flag, field.name], is_flag=True, default=None,
                                        help=f"{doc}  [{'; '.join(extra)}]"))
            continue
        options.append(click.Option(
            [flag, field.name], type=kind, default=None, metavar=_METAVARS.get(field.name),
            help=f"{doc}  [{'; '.join(extra)}]"))
    return options


@cli.command(name="certs")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--node", "nodes", multiple=True, metavar="NAME=ADDR[,ADDR...]",
              help="Issue a certificate for this node, valid for these IPs / DNS names "
                   "(repeatable). 127.0.0.1 and localhost are always included.")
def certs_command(directory: str, nodes: tuple[str, ...]) -> None:
    """Create the cluster CA, node certificates and the API token in DIRECTORY.

    What exists is kept, what is missing is added: run it again to add a node. Then give
    each node --tls-ca DIR/ca.crt --tls-cert DIR/NAME.crt --tls-key DIR/NAME.key
    --api-token-file DIR/token, and clients --ca DIR/ca.crt --token-file DIR/token.
    """
    from pathlib import Path

    from node import certs
    try:
        requests = [certs.NodeRequest.parse(text) for text in nodes]
        created = certs.ensure(Path(directory), requests)
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from None
    for name in created:
        click.echo(str(Path(directory) / name))


@cli.command(name="agent")
# A one-off recovery action, not a setting: a flag only (no FILCH_* variable, no TOML key),
# so that it cannot stay switched on across restarts by accident.
@click.option("--rejoin", is_flag=True, default=False,
              help="This node's etcd data is lost: remove its old member from the cluster "
                   "through a healthy member, and join as a new member. Does nothing when "
                   "the data is intact; safe to repeat after a crash.")
@click.option("--rejoin-via", metavar="URL", default="",
              help="With --rejoin: the client URL of a healthy member to go through "
                   "(default: the client URLs the --initial-cluster peers advertise).")
@click.pass_context
def agent_command(ctx: click.Context, /, rejoin: bool, rejoin_via: str,
                  **options: Any) -> NoReturn:
    """Run a filch node in the foreground: etcd member, API, stealer and runner.

    Settings come from these flags, then FILCH_* environment variables, then the
    TOML file given by --config, then the defaults.
    """
    flags = {
        name: value for name, value in options.items()
        if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    try:
        config = config_module.load(flags)
    except InvalidArgument as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    if rejoin_via and not rejoin:
        raise click.UsageError("--rejoin-via needs --rejoin")
    if rejoin_via:
        parts = urlsplit(rejoin_via)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.UsageError(f"--rejoin-via: {rejoin_via!r} is not a URL like "
                                   "http://127.0.0.1:2379")
    if rejoin and not config.embedded_etcd:
        raise click.UsageError("--rejoin replaces this node's own etcd member; a node with "
                               "--etcd-endpoint has none")
    # Imported only now: it pulls in etcd and the runtimes, which the client commands
    # never need, and a bad flag is reported before any of that loads.
    from node import agent, failpoints
    from node.errors import MemberDataLost, RejoinFailed

    try:
        failpoints.parse(os.environ.get(failpoints.ENVIRONMENT_VARIABLE, ""))
    except InvalidArgument as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    try:
        status = agent.main(config, rejoin_via) if rejoin else agent.main(config)
    except (MemberDataLost, RejoinFailed) as error:
        raise CommandError(str(error)) from None
    ctx.exit(status)


agent_command.params.extend(_config_options())


def main() -> None:
    """The `filch` console script."""
    cli.main(prog_name="filch")
