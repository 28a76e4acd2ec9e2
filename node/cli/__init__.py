"""The `filch` command: submit, watch and cancel tasks over gRPC, list nodes, run a node.

Every failure ends as ONE line on stderr ("error: ...") and a non-zero exit status:
2 for a bad argument, 1 for anything else, 130 after Ctrl-C. Never a traceback
(FILCH_DEBUG=1 shows one for an unexpected error). stdout carries only results,
so `id=$(filch submit -- make test)` and `filch ls -o json | jq` just work.

This module is the group and its entry point; the commands are in commands.py and
agent_flags.py, what they print in output.py. It loads fast on purpose (issue 19: a CLI
that keeps up with sbatch): `agent` and its ~70 options are built only when `agent` runs
or its help is asked for, and nothing loads grpc or protobuf before a command calls the
node (lazy.py; tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from node.cli.audit import audit_command
from node.cli.cluster import cluster_group
from node.cli.commands import CLIENT_COMMANDS
from node.cli.events import events_command
from node.cli.lazy import AGENT_SHORT_HELP, LazyClient, check_security_files
from node.cli.nodes import node_group
from node.cli.output import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    CommandError,
    client_failure,
    one_line,
)
from node.cli.owners import owner_group
from node.cli.params import check_server
from node.cli.users import user_group, whoami_command
from node.core.client_defaults import DEFAULT_SERVER, DEFAULT_TIMEOUT
from node.core.errors import ClientError, InvalidArgument


def _usage_message(error: click.UsageError) -> str:
    message = error.format_message()
    # click capitalises its sentences; ours read "error: invalid value for ...".
    if message[:2].istitle():
        message = message[0].lower() + message[1:]
    if error.ctx is not None:
        message = message.rstrip(".") + f" (see '{error.ctx.command_path} --help')"
    return message


class FilchGroup(click.Group):
    """A click group whose every failure is one line on stderr and a meaningful status.

    `agent` is added on first use: its options are built from node.core.config, which
    loads grpc; the group's --help shows its one-line help from AGENT_SHORT_HELP.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.commands, "agent"])

    _listing = False

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "agent" and "agent" not in self.commands:
            if self._listing:
                return _AGENT_PLACEHOLDER
            from node.cli.agent_flags import agent_command
            self.add_command(agent_command)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

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
        except ClientError as error:
            failure = client_failure(error)
            status = _fail(failure.format_message(), failure.status)
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
    click.echo(f"error: {one_line(message)}", err=True)
    return status


def _silence_stdout() -> None:
    # The reader is gone: point stdout at /dev/null so the interpreter's final flush does
    # not raise a second BrokenPipeError at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@click.group(cls=FilchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", envvar="FILCH_SERVER", default=DEFAULT_SERVER, show_default=True,
              metavar="HOST:PORT", callback=check_server, help="The filch node to talk to.")
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
    token = os.environ.get("FILCH_TOKEN", "")
    try:
        tls, has_token = check_security_files(ca, token_file=token_file, token=token)
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from None
    if has_token and not tls:
        raise click.UsageError("a bearer token needs TLS: pass --ca (or FILCH_CA) too")
    # The gRPC client (and grpc itself) is made on the first call to the node.
    client = LazyClient(server=server, timeout=timeout, ca=ca, token_file=token_file,
                        token=token)
    ctx.obj = client
    ctx.call_on_close(client.close)


# What the group's --help lists for `agent` without building it.
_AGENT_PLACEHOLDER = click.Command("agent", help=AGENT_SHORT_HELP)

for _command in (*CLIENT_COMMANDS, events_command, owner_group, node_group, audit_command,
                 user_group, whoami_command, cluster_group):
    cli.add_command(_command)


def main() -> None:
    """The `filch` console script."""
    cli.main(prog_name="filch")
