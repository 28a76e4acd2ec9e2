"""`filch cluster`: the cluster-wide settings every node reads (admin to change)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from node.cli.output import output_option, print_json

if TYPE_CHECKING:
    from node.client import Client


@click.group(name="cluster")
def cluster_group() -> None:
    """Cluster-wide settings, stored in etcd and read by every node.

    \b
    usage-half-life    past usage counts half after this long (default 7d, at least 1m)
    usage-weight       0..1: decayed past usage against current share (default 0.5)
    reserve-after      a top-priority task waiting this long gets a node (default 2m)
    audit-retention    audit entries are kept this long (default 30d, at least 1h)
    audit-max-entries  audit entries kept at most (default 100000, at least 100)
    """


@cluster_group.command(name="set")
@click.argument("key")
@click.argument("value")
@click.pass_obj
def set_setting(client: Client, key: str, value: str) -> None:
    """Set KEY to VALUE (a duration like 90s, 30m, 7d; a number); VALUE "default" unsets
    it. Admin only."""
    settings = client.set_cluster_setting(key, value)
    from node.faces.cluster_settings import effective, setting_of
    wanted = setting_of(key)
    for setting, current, default in effective(settings):
        if setting is wanted:
            click.echo(f"{setting.key} = {setting.show(current)}"
                       + (" (default)" if default else ""))


@cluster_group.command(name="show")
@output_option
@click.pass_obj
def show_settings(client: Client, output: str) -> None:
    """Every setting with its value and whether it is the default."""
    settings = client.cluster_settings()
    from node.faces.cluster_settings import settings_table, settings_to_dict
    if output == "json":
        print_json(settings_to_dict(settings))
    else:
        click.echo(settings_table(settings))
