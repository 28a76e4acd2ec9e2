"""`filch agent`: its options, declared once -- one per node.core.config.Config field, the help
from the field's metadata -- and the command that runs a node."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NoReturn
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from node.cli.output import EXIT_USAGE, CommandError, one_line
from node.cli.params import SizeParam
from node.core import config as config_module
from node.core.errors import InvalidArgument
from node.core.units import format_size

# Config fields whose option is not spelled --field-name.
_OPTION_NAMES = {"config_file": "--config", "labels": "--label", "taints": "--taint"}
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
    "recovery_sweep_interval": "SECONDS",
    "steal_delay": "SECONDS",
    "cancel_grace": "SECONDS",
    "shutdown_grace": "SECONDS",
    "defrag_threshold": "SIZE",
    "max_log_bytes": "SIZE",
    "default_disk": "SIZE",
    "disk_capacity": "SIZE",
    "etcd_data_dir": "DIR",
    "metrics_listen": "HOST:PORT",
    "retention": "SECONDS",
    "log_retention": "SECONDS",
    "log_copies": "COUNT",
    "housekeeping_interval": "SECONDS",
    "compaction_interval": "SECONDS",
    "compaction_keep": "REVISIONS",
    "max_finished": "COUNT",
    "task_subnet": "CIDR",
    "submit_budget": "FRACTION",
    "task_deny": "CIDR",
    "task_allow": "CIDR",
    "labels": "KEY=VALUE",
    "taints": "KEY=VALUE",
}
_CHOICES = {"executor": ["runc", "process"], "initial_cluster_state": ["new", "existing"]}
_SIZE_FIELDS = frozenset(config_module.SIZE_FIELDS)
# Defaults computed on the machine at start-up, described rather than computed for --help.
_COMPUTED_DEFAULTS = {
    "name": "this host's name",
    "data_dir": "/var/lib/filch as root, else ~/.local/share/filch",
    "etcd_data_dir": "DATA_DIR/etcd",
    "disk_capacity": "auto",
    "cpus": "all cores",
    "memory": "all memory",
}
_CLICK_TYPES: dict[str, click.ParamType[Any]] = {
    "int": click.INT, "float": click.FLOAT, "str": click.STRING, "bool": click.BOOL}


def _default_text(field: dataclasses.Field[Any]) -> str:
    if field.name in _COMPUTED_DEFAULTS:
        return _COMPUTED_DEFAULTS[field.name]
    if field.default is dataclasses.MISSING:
        return ""
    if field.name in _SIZE_FIELDS:
        return format_size(field.default)
    return str(field.default) if field.default != "" else "none"


def config_options() -> list[click.Option]:
    """One option per Config field, its help the field's metadata["help"].

    No click defaults and no click envvars: config.load applies FILCH_* variables, the
    TOML file and the defaults itself, so flags must hold only what the user typed.
    """
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
        doc = one_line(field.metadata.get("help", ""))
        extra = [f"env: FILCH_{field.name.upper()}"]
        default = _default_text(field)
        if default and "(default:" not in doc:
            extra.insert(0, f"default: {default}")
        if str(field.type) == "bool":
            # A switch: given means true (FILCH_* and the TOML file can say false).
            options.append(click.Option([flag, field.name], is_flag=True, default=None,
                                        help=f"{doc}  [{'; '.join(extra)}]"))
            continue
        if field.name in config_module.LIST_FIELDS:
            # Repeatable; config.load joins the values with commas.
            options.append(click.Option(
                [flag, field.name], type=kind, multiple=True, default=None,
                metavar=_METAVARS.get(field.name), help=f"{doc}  [{'; '.join(extra)}]"))
            continue
        options.append(click.Option(
            [flag, field.name], type=kind, default=None, metavar=_METAVARS.get(field.name),
            help=f"{doc}  [{'; '.join(extra)}]"))
    return options


@click.command(name="agent")
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
    # Before anything starts or is written: a node that cannot isolate tasks as asked
    # refuses here, in one line (node/running/isolation.py).
    from node.running import isolation
    host = isolation.Host.probe(config)
    refused = isolation.refusal(config, host)
    if refused is not None:
        raise CommandError(refused, EXIT_USAGE)
    for warning in isolation.warnings(config, host):
        click.echo(f"filch agent: WARNING: {warning}", err=True)
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
    from node import agent
    from node.core.errors import MemberDataLost, RejoinFailed
    from node.etcd import failpoints

    try:
        failpoints.parse(os.environ.get(failpoints.ENVIRONMENT_VARIABLE, ""))
    except InvalidArgument as error:
        raise CommandError(str(error), EXIT_USAGE) from None
    try:
        status = agent.main(config, rejoin_via) if rejoin else agent.main(config)
    except (MemberDataLost, RejoinFailed) as error:
        raise CommandError(str(error)) from None
    ctx.exit(status)


agent_command.params.extend(config_options())
