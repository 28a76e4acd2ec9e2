"""`filch events`: the cluster's task and node events as they happen (the Watch RPC)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from node.cli.output import EXIT_INTERRUPTED, CommandError, client_failure, output_option
from node.core.errors import ClientError

if TYPE_CHECKING:       # the RPC stack loads when the command runs, not for --help
    from node.client import Client

# The exit status when --since names a revision etcd no longer keeps: a script tells
# "re-list, then follow" apart from a failure (1) and a bad argument (2).
EXIT_COMPACTED = 4


@click.command(name="events")
@click.option("--since", type=click.IntRange(min=0), default=0, metavar="REVISION",
              help="Start after this revision (the first column, or a stream's last SSE id) "
                   "instead of now: resuming from the last one seen misses and repeats "
                   "nothing.")
@click.option("--task", "task_id", default="", metavar="ID", help="Only this task's events.")
@output_option
@click.pass_obj
def events_command(client: Client, since: int, task_id: str, output: str) -> None:
    """Print every task state change and node join, leave or change as it happens, one
    line each: revision type task_id state reason node_id node_name ("-" when empty;
    -o json: one JSON object per line). Runs until Ctrl-C (exit 130).

    Exits 4 when --since is older than etcd's history (compacted): re-list with
    `filch ls` / `filch nodes`, then follow from now on.
    """
    import grpc

    from node.faces.event_records import event_line, event_to_dict

    last = since
    call = client.watch(since, task_id)
    try:
        for response in call:
            for event in response.events:
                click.echo(json.dumps(event_to_dict(event)) if output == "json"
                           else event_line(event))
            last = response.revision
    except KeyboardInterrupt:
        call.cancel()
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except ClientError as error:
        if error.code == grpc.StatusCode.OUT_OF_RANGE:
            raise CommandError(error.message, EXIT_COMPACTED) from None
        failure = client_failure(error)
        resume = f"; resume with --since {last}" if last else ""
        raise CommandError(failure.format_message() + resume, failure.status) from None
    raise CommandError(f"the event stream ended{f'; resume with --since {last}' if last else ''}")
