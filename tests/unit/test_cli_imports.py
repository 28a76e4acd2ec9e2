"""`filch --help` and the parsing of every command's arguments load neither grpc nor
protobuf nor etcd's client (issue 19: a CLI that keeps up with sbatch; grpc alone costs
~100 ms of CPU on the bench machine, protobuf and the generated code ~35 ms).

Each check runs in a fresh interpreter, so what an earlier test imported does not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("grpc", "google.protobuf", "aetcd", "node._gen", "node.client", "prometheus_client")

# Parsed as a user would type them: the group's options, then the command's.
COMMAND_LINES = [
    ["submit", "--cpu", "0.5", "--mem", "256Mi", "--disk", "1Gi", "--env", "A=1",
     "--array", "1-10", "--after", "x", "--retries", "2", "--retry-on", "oom,failed",
     "--retry-backoff", "5s", "--time-limit", "10m", "--priority", "5", "--network", "none",
     "--wait", "--", "true"],
    ["status", "01a250e2-a892-728e-8d4a-9b30f8947ef5", "-o", "json"],
    ["ls", "--limit", "10", "--state", "running", "-o", "json"],
    ["logs", "-f", "--attempt", "1", "some-id"],
    ["cancel", "--no-wait", "some-id"],
    ["nodes", "-o", "json"],
    ["owner", "ls", "-o", "json"],
    ["owner", "weight", "alice", "2"],
    ["audit", "--since", "1h", "--user", "alice", "--limit", "5", "-o", "json"],
    ["user", "add", "alice", "--max-cpu", "2", "--max-memory", "4Gi", "--max-priority", "5"],
    ["user", "token", "alice", "--expires", "1h"],
    ["whoami", "-o", "json"],
    ["cluster", "show", "-o", "json"],
    ["cluster", "set", "usage-half-life", "7d"],
    ["certs", "/nonexistent/dir", "--node", "n1=127.0.0.1"],
]

PARSE_ONLY = """
import json, sys
import click
from node.cli import cli

heavy = json.loads(sys.argv[2])
loaded = {}
for args in json.loads(sys.argv[1]):
    ctx = cli.make_context("filch", list(args))
    command = cli
    while isinstance(command, click.Group):
        name, command, rest = command.resolve_command(ctx, ctx.protected_args + ctx.args)
        ctx = command.make_context(name, rest, parent=ctx)
    loaded[" ".join(args)] = sorted(m for m in sys.modules
                                    if any(m == h or m.startswith(h + ".") for h in heavy))
print(json.dumps(loaded))
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def _loaded_after(code: str, *args: str) -> object:
    result = _run(code, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


HELP = """
import json, sys
from node.cli import cli
try:
    cli.main(json.loads(sys.argv[1]), prog_name="filch")
except SystemExit:
    pass
heavy = json.loads(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules
                        if any(m == h or m.startswith(h + ".") for h in heavy))))
"""


@pytest.mark.parametrize("args", [["--help"], ["submit", "--help"], ["bogus"]], ids=" ".join)
def test_help_and_usage_errors_load_no_rpc_stack(args: list[str]) -> None:
    assert _loaded_after(HELP, json.dumps(args), json.dumps(HEAVY)) == []


def test_parsing_every_command_loads_no_rpc_stack() -> None:
    # One interpreter parses them all in turn: a module one command loads counts for the
    # ones after it too, which only makes the check stricter.
    lines = [["--timeout", "5", *args] for args in COMMAND_LINES]
    loaded = _loaded_after(PARSE_ONLY, json.dumps(lines), json.dumps(HEAVY))
    assert loaded == {" ".join(args): [] for args in lines}


def test_the_spelled_out_names_agree_with_their_sources() -> None:
    from node.cli import commands, lazy
    from node.cli.agent_flags import agent_command
    from node.client import DEFAULT_SERVER, DEFAULT_TIMEOUT
    from node.core import client_defaults, lifecycle, states

    assert commands.STATE_NAMES == tuple(states.STATE_BY_NAME)
    assert commands.RETRY_CLASSES == lifecycle.RETRY_CLASSES
    assert (client_defaults.DEFAULT_SERVER, client_defaults.DEFAULT_TIMEOUT) == \
        (DEFAULT_SERVER, DEFAULT_TIMEOUT)
    assert (agent_command.help or "").split("\n")[0] == lazy.AGENT_SHORT_HELP
    from node import client
    assert (lazy.SUBMIT_RETRY_SECONDS, lazy.SUBMIT_RETRY_PAUSE, lazy.PAGE_SIZE) == \
        (client.SUBMIT_RETRY_SECONDS, client.SUBMIT_RETRY_PAUSE, client.PAGE_SIZE)


def test_a_command_that_calls_the_node_still_reports_in_one_line(tmp_path: Path) -> None:
    # The lazily made client: an unreachable node is still one "error:" line, status 1.
    code = "from node.cli import main; main()"
    result = _run(code, "--server", "127.0.0.1:9", "--timeout", "2", "nodes")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach filch at 127.0.0.1:9")
    assert len(result.stderr.strip().splitlines()) == 1
    missing = tmp_path / "nope.crt"
    result = _run(code, "--ca", str(missing), "nodes")
    assert result.returncode == 2
    assert f"cannot read {missing}" in result.stderr
