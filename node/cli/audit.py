"""`filch audit`: who changed what, when and from where (node/faces/audit.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from node.cli.output import output_option, print_json
from node.cli.params import DurationParam

if TYPE_CHECKING:
    from node._gen.filch.v1 import filch_pb2 as pb
    from node.client import Client

# ListAudit's bounds (node/faces/audit.py loads grpc: not imported here).
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


def entry_to_dict(entry: pb.AuditEntry) -> dict[str, Any]:
    from node.faces.authn import role_name
    return {"time": entry.at.ToJsonString(), "user": entry.user, "role": role_name(entry.role),
            "address": entry.address, "via": entry.via, "action": entry.action,
            "target": entry.target, "detail": entry.detail, "node": entry.node}


@click.command(name="audit")
@click.option("--since", type=DurationParam(), default=None,
              help="Only entries of the last DURATION (e.g. 1h, 7d); default: all kept.")
@click.option("--user", default="", help="Only this user's entries (admin is the cluster token).")
@click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=DEFAULT_LIMIT,
              show_default=True, help="At most this many entries, newest first.")
@output_option
@click.pass_obj
def audit_command(client: Client, since: float | None, user: str, limit: int,
                  output: str) -> None:
    """The audit trail: every change made through the API (submit, cancel, cordon, drain,
    owner weights, users, cluster settings, web UI sign-ins), newest first, with who made
    it, from which address and through what. A user sees only its own entries.
    Entries are kept for the cluster's audit-retention (default 30 days), at most
    audit-max-entries (default 100,000)."""
    from node.faces import render
    response = client.list_audit(since_seconds=since or 0.0, user=user, limit=limit)
    if output == "json":
        print_json([entry_to_dict(entry) for entry in response.entries])
        return
    if not response.entries:
        click.echo("no audit entries", err=True)
        return
    rows = [(entry.at.ToJsonString(), entry.user, entry.address, entry.via, entry.action,
             entry.target, entry.detail) for entry in response.entries]
    click.echo(render.table(("TIME", "USER", "ADDRESS", "VIA", "ACTION", "TARGET", "DETAIL"),
                            rows))
    if response.truncated:
        click.echo(f"(more entries match: raise --limit, at most {MAX_LIMIT}, or narrow "
                   "--since)", err=True)
