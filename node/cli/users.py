"""`filch user` (admins: add, change, new token, remove, list users) and `filch whoami`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from node.cli.output import output_option, print_json
from node.cli.params import CpuParam, DurationParam, SizeParam

if TYPE_CHECKING:       # the RPC stack loads when a command runs, not for --help
    from node._gen.filch.v1 import filch_pb2 as pb
    from node.client import Client

NO_LIMIT = ("0", "none")
SHOWN_ONCE = ("this token is shown only now (etcd keeps only its hash): give it to the "
              "user, who sets FILCH_TOKEN to it (with --ca / FILCH_CA)")


class LimitParam(click.ParamType[int]):
    """A limit parsed by `inner`, or 0 for "0" / "none" (no limit)."""

    def __init__(self, *, inner: click.ParamType[int] | None = None) -> None:
        self.inner = inner
        self.name = inner.name if inner else "n"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) or str(value).lower() in NO_LIMIT:
            return 0 if not isinstance(value, int) else value
        if self.inner is not None:
            return self.inner.convert(value, param, ctx)
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is not a whole number (or none)", param, ctx)
        if number < 0:
            self.fail(f"{number} is below 0", param, ctx)
        return number


class PriorityLimitParam(click.ParamType[int | None]):
    """A priority ceiling, or None for "none" (no ceiling)."""

    name = "priority"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "none":
            return None
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not a priority (a whole number, or none)", param, ctx)


def quota_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((
            click.option("--role", type=click.Choice(["user", "admin"]), default=None,
                         help="user (default): its own tasks; admin: everything."),
            click.option("--max-cpu", type=LimitParam(inner=CpuParam()), default=None,
                         metavar="CORES", help="Most CPU its running tasks may hold (0: none)."),
            click.option("--max-memory", type=LimitParam(inner=SizeParam()), default=None,
                         metavar="SIZE",
                         help="Most memory its running tasks may hold (0: no limit)."),
            click.option("--max-pending", type=LimitParam(), default=None, metavar="N",
                         help="Most pending tasks at once (0: no limit)."),
            click.option("--max-priority", type=PriorityLimitParam(), default=None,
                         metavar="N", help="Highest priority it may submit with (none: any)."),
    )):
        function = option(function)
    return function


def _quota(pb_module: Any, max_cpu: int | None, max_memory: int | None,
           max_pending: int | None, max_priority: int | None) -> pb.Quota:
    quota = pb_module.Quota(max_cpu_millis=max_cpu or 0, max_memory_bytes=max_memory or 0,
                            max_pending=max_pending or 0)
    if max_priority is not None:
        quota.max_priority = max_priority
    return quota  # type: ignore[no-any-return]


def _role(pb_module: Any, role: str | None) -> int:
    return int(pb_module.ROLE_ADMIN if role == "admin" else pb_module.ROLE_USER)


@click.group(name="user")
def user_group() -> None:
    """Users: each has a token, a role and limits (admins only; `filch whoami`: anyone).

    A user's tasks are owned by it; it sees every task but only its own tasks' command,
    environment and logs, and cancels only its own tasks. User tokens need TLS.
    """


def _print_token(response: pb.UserTokenResponse, output: str) -> None:
    if output == "json":
        from node.faces import records
        print_json({"user": records.user_to_dict(response.user), "token": response.token})
        return
    click.echo(response.token)
    click.echo(SHOWN_ONCE, err=True)


@user_group.command(name="add")
@click.argument("name")
@quota_options
@output_option
@click.pass_obj
def add_user(client: Client, name: str, role: str | None, max_cpu: int | None,
             max_memory: int | None, max_pending: int | None, max_priority: int | None,
             output: str) -> None:
    """Add user NAME and print its token (once)."""
    from node._gen.filch.v1 import filch_pb2 as pb
    response = client.add_user(pb.AddUserRequest(
        name=name, role=_role(pb, role),  # type: ignore[arg-type]
        quota=_quota(pb, max_cpu, max_memory, max_pending, max_priority)))
    _print_token(response, output)


@user_group.command(name="set")
@click.argument("name")
@quota_options
@output_option
@click.pass_obj
def set_user(client: Client, name: str, role: str | None, max_cpu: int | None,
             max_memory: int | None, max_pending: int | None, max_priority: int | None,
             output: str) -> None:
    """Change user NAME: only the options given (0 or none removes a limit)."""
    from node._gen.filch.v1 import filch_pb2 as pb
    ctx = click.get_current_context()
    given = {field for field, param in (("role", "role"), ("max_cpu", "max_cpu"),
                                        ("max_memory", "max_memory"),
                                        ("max_pending", "max_pending"),
                                        ("max_priority", "max_priority"))
             if ctx.get_parameter_source(param) == click.core.ParameterSource.COMMANDLINE}
    if not given:
        raise click.UsageError("give what to change: --role, --max-cpu, --max-memory, "
                               "--max-pending or --max-priority")
    user = client.set_user(pb.SetUserRequest(
        name=name, role=_role(pb, role),  # type: ignore[arg-type]
        quota=_quota(pb, max_cpu, max_memory, max_pending, max_priority),
        fields=sorted(given)))
    _print_users([user], output, single=True)


@user_group.command(name="token")
@click.argument("name")
@click.option("--expires", type=DurationParam(), default=None, metavar="DURATION",
              help="The new token stops working after this long (default: never).")
@output_option
@click.pass_obj
def rotate_token(client: Client, name: str, expires: float | None, output: str) -> None:
    """Give user NAME a new token (printed once); its old token stops working at once."""
    if expires is not None and expires <= 0:
        raise click.BadParameter("must be more than 0", param_hint="'--expires'")
    _print_token(client.rotate_user_token(name, expires or 0.0), output)


@user_group.command(name="remove")
@click.argument("name")
@output_option
@click.pass_obj
def remove_user(client: Client, name: str, output: str) -> None:
    """Remove user NAME: its token stops working, its pending tasks are canceled, its
    running ones finish."""
    response = client.remove_user(name)
    if output == "json":
        print_json({"name": response.name, "canceled": response.canceled})
    else:
        click.echo(f"{response.name}: removed; {response.canceled} pending task(s) canceled")


@user_group.command(name="ls")
@output_option
@click.pass_obj
def list_users(client: Client, output: str) -> None:
    """List users, their roles and limits."""
    users = client.users()
    if not users and output != "json":
        click.echo("no users", err=True)
        return
    _print_users(users, output)


def _print_users(users: list[pb.User], output: str, *, single: bool = False) -> None:
    from node.faces import records
    rows = [records.user_to_dict(user) for user in users]
    if output == "json":
        print_json(rows[0] if single else rows)
        return
    from node.core.units import format_size

    def limit(value: object, shown: Callable[[Any], str] = str) -> str:
        return "-" if value is None else shown(value)
    click.echo(f"{'NAME':<20} {'ROLE':<6} {'MAX CPU':>8} {'MAX MEM':>9} {'MAX PEND':>9} "
               f"{'MAX PRIO':>9} TOKEN EXPIRES")
    for row in rows:
        click.echo(f"{row['name']!s:<20} {row['role']!s:<6} {limit(row['max_cpu']):>8} "
                   f"{limit(row['max_memory_bytes'], format_size):>9} "
                   f"{limit(row['max_pending']):>9} {limit(row['max_priority']):>9} "
                   f"{row['token_expires_at'] or 'never'}")


@click.command(name="whoami")
@output_option
@click.pass_obj
def whoami_command(client: Client, output: str) -> None:
    """Who the node takes you for: your user name and role (admin: the cluster token)."""
    from node._gen.filch.v1 import filch_pb2 as pb
    identity = client.whoami()
    role = "admin" if identity.role == pb.ROLE_ADMIN else "user"
    if output == "json":
        print_json({"name": identity.name, "role": role,
                    "cluster_token": identity.cluster_token})
    else:
        click.echo(f"{identity.name} ({role}"
                   + (", cluster token)" if identity.cluster_token else ")"))
