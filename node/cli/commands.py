"""The client commands: submit, status, ls, logs, cancel, nodes, and certs. Every call to
the node goes through node.client.Client, which the group puts in the context."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from node.cli.output import (
    EXIT_INTERRUPTED,
    CommandError,
    Progress,
    TaskOutput,
    array_exit_status,
    one_line,
    output_option,
    print_json,
    task_exit_status,
)
from node.cli.params import (
    ArrayParam,
    CpuParam,
    DurationParam,
    SizeParam,
    parse_env,
    split_retry_classes,
)
from node.core.errors import ClientError, InvalidArgument
from node.core.units import CPU_FORMS, DURATION_FORMS, SIZE_FORMS

if TYPE_CHECKING:
    # Types only: declaring and parsing the commands loads neither protobuf (~35 ms) nor
    # grpc (~100 ms); a command imports what it calls when it runs (tests/unit/
    # test_cli_imports.py keeps it so).
    from node._gen.filch.v1 import filch_pb2
    from node.client import Client

# node.core.states.STATE_BY_NAME and node.core.lifecycle.RETRY_CLASSES, spelled out here
# because both modules load the generated protobuf code; test_cli_imports.py checks that
# they agree.
STATE_NAMES = ("pending", "running", "complete", "canceled")
RETRY_CLASSES = ("failed", "oom", "timeout", "start-failed")

# What a wait returns: a task, or an array's tasks.
Waited = TypeVar("Waited")

# How long `filch cancel` waits for the node to stop a running task: past its cancel
# grace (SIGTERM -> SIGKILL, 5 s by default) with a wide margin for a loaded node.
CANCEL_WAIT = 60.0


def with_progress(wait: Callable[[Progress], Waited]) -> Waited:
    """Run a wait with its progress line on a terminal; Ctrl-C exits 130 (the work goes on)."""
    progress = Progress()
    try:
        return wait(progress)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    finally:
        progress.clear()


def wait_for(client: Client, task: filch_pb2.Task, until: Callable[[filch_pb2.Task], bool],
             limit: float | None = None) -> filch_pb2.Task:
    """Client.wait with the progress line."""
    return with_progress(lambda progress: client.wait(task.id, progress.show, until=until,
                                                      limit=limit, task=task))


def wait_for_array(client: Client, array_id: str) -> list[filch_pb2.Task]:
    """Client.wait_array with the progress line."""
    return with_progress(lambda progress: client.wait_array(array_id, progress.show_array))


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--cpu", type=CpuParam(), help=f"CPU request: {CPU_FORMS}.  [default: 0.1]")
@click.option("--mem", type=SizeParam(), metavar="SIZE",
              help=f"Memory limit: {SIZE_FORMS}.  [default: 128Mi]")
@click.option("--disk", type=SizeParam(), metavar="SIZE",
              help=f"Size limit of the task's /work: {SIZE_FORMS}.  "
                   "[default: the node's --default-disk]")
@click.option("--restart/--no-restart", default=True, show_default=True,
              help="Run the task again elsewhere if its node dies.")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", callback=parse_env,
              help="An environment variable for the task (repeatable).")
@click.option("--workdir", default="", metavar="DIR",
              help="Working directory inside the task (default: its own scratch dir).")
@click.option("--name", default="", help="A label for people; need not be unique.")
@click.option("--request-id", default="", metavar="ID",
              help="Idempotency key: submitting the same ID again returns the same task "
                   "(or completes the same array).")
@click.option("--network", type=click.Choice(["isolated", "none", "host"]),
              help="runc tasks: own namespace with NATed outbound access (isolated), loopback "
                   "only (none), or the host's network (host: only nodes started with "
                   "--allow-host-network run it).  [default: isolated]")
@click.option("--array", "array", type=ArrayParam(), metavar="START-END[:STEP]",
              help="One task per index (END included, at most 100,000), each with "
                   "FILCH_ARRAY_INDEX; prints the task ids in index order.")
@click.option("--after", "after", multiple=True, metavar="ID",
              help="Start only after task ID ended COMPLETE with exit code 0 (repeatable).")
@click.option("--after-any", "after_any", multiple=True, metavar="ID",
              help="Start only after task ID ended, however it ended (repeatable).")
@click.option("--after-array", "after_array", multiple=True, metavar="ARRAY_ID",
              help="Start only after every task of the array ended COMPLETE with exit "
                   "code 0 (repeatable).")
@click.option("--time-limit", type=DurationParam(), metavar="DURATION",
              help=f"Stop an attempt running longer ({DURATION_FORMS}): it ends TIMED_OUT.")
@click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True,
              metavar="N", help="Run the task again, up to N times, after a failure of a "
                                "class in --retry-on.")
@click.option("--retry-on", "retry_on", multiple=True, callback=split_retry_classes,
              metavar="CLASS[,CLASS]",
              help=f"Failure classes retried: {', '.join(RETRY_CLASSES)}.  "
                   "[default: all of them]")
@click.option("--retry-backoff", type=DurationParam(), metavar="DURATION",
              help="First retry's delay, doubling each time, with jitter.  [default: 1s]")
@click.option("--priority", type=click.IntRange(-1000, 1000), default=0, show_default=True,
              metavar="N", help="-1000..1000: among tasks that fit, the highest runs first.")
@click.option("--owner", default="", envvar="FILCH_OWNER", metavar="NAME",
              help="Whose work this is: the cluster is shared fairly between owners with "
                   "pending work.  [env FILCH_OWNER; default: default]")
@click.option("--constraint", "constraints", multiple=True, metavar="EXPR",
              help="Where it may run (repeatable; all must hold), over node labels and "
                   "capabilities: KEY=VALUE, KEY!=VALUE, 'KEY in (A,B)', KEY, !KEY.")
@click.option("--wait", is_flag=True,
              help="Wait for the task to finish and exit with its exit code.")
@click.option("-f", "--follow", is_flag=True,
              help="With --wait: stream the task's output meanwhile (every attempt).")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARG]...")
@click.pass_obj
def submit(
    client: Client, cpu: int | None, mem: int | None, disk: int | None, restart: bool,
    env: dict[str, str], workdir: str, name: str, request_id: str, network: str | None,
    array: tuple[int, int, int] | None, after: tuple[str, ...], after_any: tuple[str, ...],
    after_array: tuple[str, ...], time_limit: float | None, retries: int,
    retry_on: list[str], retry_backoff: float | None, priority: int, owner: str,
    constraints: tuple[str, ...], wait: bool, follow: bool, command: tuple[str, ...],
) -> None:
    """Queue CMD to run on whichever node has room; print its task id.

    With --wait, exit with the task's exit code: 137 when it ran out of memory,
    124 when it ran past --time-limit, 130 when canceled, 125 when it never ran to
    the end (could not start, node lost, a dependency failed). With --array, wait
    for every task and exit with the highest of their codes.

    \b
    Examples:
      filch submit --cpu 0.5 --mem 256Mi -- python3 train.py --epochs 3
      id=$(filch submit -- make test) && filch logs -f "$id"
      filch submit --array 1-100 -- sh -c 'echo "part $FILCH_ARRAY_INDEX"'
      filch submit --after "$id" --retries 2 --time-limit 10m -- ./report.sh
    """
    if follow and not wait:
        raise click.UsageError("--follow goes with --wait (use `filch logs -f ID` otherwise)")
    if array is not None and follow:
        raise click.UsageError("--follow streams one task's output; follow a task of the "
                               "array with `filch logs -f ID`")
    from node._gen.filch.v1 import filch_pb2
    from node.core.states import is_finished
    dependencies = [filch_pb2.Dependency(id=parent, kind=kind)
                    for parents, kind in ((after, filch_pb2.DEPENDENCY_KIND_SUCCESS),
                                          (after_any, filch_pb2.DEPENDENCY_KIND_ANY),
                                          (after_array, filch_pb2.DEPENDENCY_KIND_ARRAY))
                    for parent in parents]
    spec = filch_pb2.TaskSpec(
        command=command[0], args=command[1:], cpu_millis=cpu or 0, memory_bytes=mem or 0,
        disk_bytes=disk or 0, restart=restart, env=env, workdir=workdir, name=name,
        network=network or "", after=dependencies, time_limit_seconds=time_limit or 0,
        retries=retries, retry_on=retry_on, retry_backoff_seconds=retry_backoff or 0,
        priority=priority, owner=owner, constraints=constraints)
    if array is not None:
        start, end, step = array
        response = client.submit_array(spec, filch_pb2.ArraySpec(start=start, end=end,
                                                                  step=step),
                                       request_id=request_id)
        click.echo("\n".join(response.task_ids))
        if wait:
            status, failures = array_exit_status(wait_for_array(client, response.array_id))
            for line in failures:
                click.echo(line, err=True)
            raise click.exceptions.Exit(status)
        return
    task = client.submit(spec, request_id=request_id)
    click.echo(task.id)
    if not wait:
        return
    if follow:
        task = follow_task(client, task)
    else:
        task = wait_for(client, task, is_finished)
    status = task_exit_status(task)
    if status != 0:
        from node.faces import render
        click.echo(f"task {task.id} {render.outcome(task)}", err=True)
    raise click.exceptions.Exit(status)


def follow_task(client: Client, task: filch_pb2.Task) -> filch_pb2.Task:
    """Stream every attempt's output to stdout as it happens, until the task ends (after a
    retry or a requeue, the next attempt's); the final record. How an attempt ended is
    said on stderr when another follows. Ctrl-C exits 130 (the task goes on)."""
    from node._gen.filch.v1 import filch_pb2
    from node.core.states import is_finished
    from node.faces import records
    from node.faces.follow import follow
    stdout = TaskOutput()

    def attempt_end(current: filch_pb2.Task, attempt: int) -> None:
        if is_finished(current) and current.attempt <= attempt:
            return      # the last one: the exit status says how it ended
        ended = next((record for record in current.attempts if record.attempt == attempt),
                     None)
        how, then = "ended", ""
        if ended is not None:
            how = (f"exit code {ended.exit_code}" if ended.reason == filch_pb2.REASON_EXITED
                   else records.reason_name(ended.reason))
            # A retry's attempt record says so ("retry 1 of 3 in 1.6s after ..."); the task's
            # own message may already be the next attempt's.
            then = f"; {ended.message}" if ended.message else ""
        click.echo(f"filch: attempt {attempt} of task {current.id} ended ({how}){then}",
                   err=True)

    def missing(attempt: int, failure: ClientError) -> None:
        click.echo(f"filch: the output of attempt {attempt} cannot be read: "
                   f"{one_line(failure.message)}", err=True)

    try:
        return follow(client, task.id, stdout.write, on_attempt_end=attempt_end,
                      on_missing=missing, task=task)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    finally:
        stdout.close()


@click.command()
@click.argument("task_id", metavar="ID")
@output_option
@click.pass_obj
def status(client: Client, task_id: str, output: str) -> None:
    """Show one task in detail."""
    from node.faces import records, render
    task = client.get(task_id)
    if output == "json":
        print_json(records.task_to_dict(task))
    else:
        click.echo(render.task_detail(task))


@click.command(name="ls")
@click.option("--state", type=click.Choice(list(STATE_NAMES), case_sensitive=False),
              help="Only tasks in this state.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N tasks.")
@click.option("--array", "array_id", default="", metavar="ARRAY_ID",
              help="Only the tasks of this array, in index order.")
@output_option
@click.pass_obj
def list_tasks(client: Client, state: str | None, limit: int | None, array_id: str,
               output: str) -> None:
    """List tasks (all of them, unless --state, --array or --limit)."""
    if array_id and state:
        raise click.UsageError("--array lists every task of the array; leave out --state")
    from node.faces import records, render
    tasks = client.list(state, limit, array_id=array_id)
    if output == "json":
        print_json([records.task_to_dict(task) for task in tasks])
    elif tasks:
        click.echo(render.tasks_table(tasks))
    else:
        click.echo("no tasks" + (f" in state {state.upper()}" if state else "")
                   + (f" left of array {array_id}" if array_id else ""), err=True)


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the task ends.")
@click.option("--attempt", type=click.IntRange(min=0), default=0, metavar="N",
              help="Logs of attempt N (default: the latest).")
@click.argument("task_id", metavar="ID")
@click.pass_obj
def logs(client: Client, follow: bool, attempt: int, task_id: str) -> None:
    """Print a task's output (stdout and stderr, as the node recorded them)."""
    stdout = TaskOutput()
    try:
        for data in client.logs(task_id, follow, attempt):
            stdout.write(data)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    finally:
        stdout.close()


@click.command()
@click.option("--no-wait", is_flag=True, help="Return as soon as the cancel is recorded.")
@click.option("--array", "array_id", default="", metavar="ARRAY_ID",
              help="Cancel every unfinished task of this array instead (print how many).")
@click.argument("task_id", metavar="ID", required=False, default="")
@click.pass_obj
def cancel(client: Client, no_wait: bool, array_id: str, task_id: str) -> None:
    """Cancel a task and print the state it ends in (or, with --array, every unfinished
    task of an array, and print how many were canceled).

    A running task gets SIGTERM, then SIGKILL after the node's grace period; this waits
    (at most 60 s) until it has stopped. An array's running tasks are not waited for.
    """
    if bool(array_id) == bool(task_id):
        raise click.UsageError("give a task ID or --array ARRAY_ID (one of them)")
    if array_id:
        click.echo(client.cancel_array(array_id))
        return
    from node._gen.filch.v1 import filch_pb2
    from node.faces import records
    task = client.cancel(task_id)

    def stopped(current: filch_pb2.Task) -> bool:
        return current.state != filch_pb2.TASK_STATE_RUNNING

    if not no_wait:
        task = wait_for(client, task, stopped, limit=CANCEL_WAIT)
    click.echo(records.state_name(task.state))
    if not no_wait and not stopped(task):
        raise CommandError(
            f"task {task.id} still runs {CANCEL_WAIT:g} s after the cancel; "
            f"`filch status {task.id}` shows when it stops")


@click.command()
@output_option
@click.pass_obj
def nodes(client: Client, output: str) -> None:
    """List the live nodes, their capacity and what is allocated on them."""
    from node.faces import records, render
    found = client.nodes()
    if output == "json":
        print_json([records.node_to_dict(node) for node in found])
    elif found:
        click.echo(render.nodes_table(found))
    else:
        click.echo("no nodes", err=True)


@click.command(name="certs")
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
    from node.operations import certs
    try:
        requests = [certs.NodeRequest.parse(text) for text in nodes]
        created = certs.ensure(Path(directory), requests)
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from None
    for name in created:
        click.echo(str(Path(directory) / name))


CLIENT_COMMANDS = (submit, status, list_tasks, logs, cancel, nodes, certs_command)
