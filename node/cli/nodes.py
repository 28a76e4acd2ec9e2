"""`filch node`: take a node out of service (cordon, drain) and back (uncordon)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from node.cli.output import CommandError, output_option, print_json
from node.cli.params import DurationParam

if TYPE_CHECKING:       # the RPC stack loads when a command runs, not for --help
    from node.client import Client


@click.group(name="node")
def node_group() -> None:
    """Cordon, drain and uncordon a node, by its name (`filch nodes`), from any node.

    A cordoned node steals nothing new; its running tasks go on. A cordon is kept by name,
    so it survives the node's restarts until `filch node uncordon`.
    """


@node_group.command(name="cordon")
@click.argument("name")
@output_option
@click.pass_obj
def cordon(client: Client, name: str, output: str) -> None:
    """Stop node NAME from taking new tasks (its running tasks go on)."""
    response = client.cordon_node(name)
    if output == "json":
        print_json({"name": response.name, "cordoned": True})
    else:
        click.echo(f"{response.name}: cordoned")


@node_group.command(name="uncordon")
@click.argument("name")
@output_option
@click.pass_obj
def uncordon(client: Client, name: str, output: str) -> None:
    """Let node NAME take tasks again; cancels a drain under way."""
    response = client.uncordon_node(name)
    if output == "json":
        print_json({"name": response.name, "cordoned": False,
                    "drain_canceled": response.drain_canceled})
    else:
        click.echo(f"{response.name}: uncordoned"
                   + (" (its drain was canceled)" if response.drain_canceled else ""))


@node_group.command(name="drain")
@click.argument("name")
@click.option("--deadline", type=DurationParam(), default=None, metavar="DURATION",
              help="How long running tasks may go on (default 10m); then the rest are "
                   "handed back as a lost node's would be (--restart decides).")
@output_option
@click.pass_obj
def drain(client: Client, name: str, deadline: float | None, output: str) -> None:
    """Cordon node NAME, let its tasks finish until the deadline, hand back the rest.

    Blocks until done and prints how many finished and how many were handed back; the
    node stays up and cordoned. The node does the work: if this command is interrupted
    the drain goes on (run it again to follow it; `filch node uncordon` cancels it).
    """
    if deadline is not None and deadline <= 0:
        raise click.BadParameter("must be more than 0", param_hint="'--deadline'")
    from node._gen.filch.v1 import filch_pb2 as pb

    tty = sys.stderr.isatty() and output != "json"
    last = pb.DrainNodeProgress(name=name)
    for progress in client.drain_node(name, deadline or 0.0):
        last = progress
        if tty and not (progress.done or progress.canceled):
            click.echo(f"\r{name}: {progress.remaining} running, {progress.finished} "
                       f"finished, deadline {progress.deadline.ToDatetime():%H:%M:%S} UTC",
                       err=True, nl=False)
    if tty:
        click.echo("", err=True)
    if last.canceled:
        raise CommandError(f"the drain of {name} was canceled (uncordoned, or drained "
                           "anew) before it ended")
    if not last.done:
        raise CommandError(f"the node answering stopped following the drain of {name}; "
                           "it goes on: run the command again to follow it")
    if output == "json":
        print_json({"name": name, "finished": last.finished, "handed_back": last.handed_back})
    else:
        click.echo(f"{name}: drained: {last.finished} finished, {last.handed_back} handed "
                   "back; it stays cordoned (`filch node uncordon` to use it again)")
