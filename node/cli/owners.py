"""`filch owner`: fair-share weights and what each owner holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from node.cli.output import output_option, print_json

if TYPE_CHECKING:
    from node.client import Client


@click.group(name="owner")
def owner_group() -> None:
    """Fair share: owners, their weights and their share of the cluster.

    Among queued tasks of equal priority, nodes start those of the owner with the lowest
    order first: its dominant share (the larger of its CPU and memory fractions) mixed with
    its share of the decayed past usage by usage-weight, divided by its weight
    (`filch cluster show`), so owners with pending work converge to shares in their
    weights' ratio, and one that ran a burst lately yields to one that ran nothing.
    """


@owner_group.command(name="weight")
@click.argument("name")
@click.argument("weight", type=float, metavar="W")
@click.pass_obj
def set_weight(client: Client, name: str, weight: float) -> None:
    """Give owner NAME the weight W (above 0, at most 1000; everyone's default is 1)."""
    owner = client.set_owner_weight(name, weight)
    click.echo(f"{owner.name}: weight {owner.weight:g}")


@owner_group.command(name="ls")
@output_option
@click.pass_obj
def list_owners(client: Client, output: str) -> None:
    """List owners with a weight, queued, running or past work: share, decayed past usage
    (core-hours, GiB-hours), its share and the order (lowest goes first)."""
    from node.faces import records, render
    owners = client.owners()
    if output == "json":
        print_json([records.owner_to_dict(owner) for owner in owners])
    elif owners:
        click.echo(render.owners_table(owners))
    else:
        click.echo("no owners", err=True)
