"""Admission counts bytes, and task output cannot drive a terminal (issue 16, items 5 and 8).

One small node (a 16 MiB etcd quota, the process executor: nothing here needs isolation)
serves both: an array far past the quota's byte budget is refused up front with the
numbers and nothing written, and a task that prints terminal escape sequences shows them
as text on a terminal (a pseudo-terminal here) and unchanged through a pipe.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import FILCH, Cluster
from tests.e2e.conftest import require_tools

# Small, so that a modest array passes 80% of it: 16 MiB -> submits stop at 12.8 MiB.
QUOTA = "16Mi"
# Five arguments of 100 kB (each under execve's 128 KiB per string), 40 tasks: each
# record is written held and released, ~38 MiB in all.
ARGS = ["x" * 100_000] * 5
TASKS = 40
# What the hostile task prints: retitle the window (OSC 0 ... BEL), clear the screen.
HOSTILE = r"printf '\033]0;pwned\007\033[2Jline\tend\n'"
# Seconds a CLI run on the pseudo-terminal may take before the test gives up on it.
PTY_TIMEOUT = 60


@pytest.fixture(scope="module")
def small_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tools()
    with Cluster(tmp_path_factory.mktemp("admission"), size=1, executor="process",
                 extra=("--etcd-quota-bytes", QUOTA)) as cluster:
        yield cluster


def test_an_array_past_the_byte_budget_is_refused_with_the_numbers(
        small_node: Cluster) -> None:
    before = small_node.cli("ls", "-o", "json", check=True).stdout
    refused = small_node.cli("submit", "--array", f"1-{TASKS}", "--", "true", *ARGS)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    message = " ".join(refused.stderr.split())
    assert f"this array of {TASKS} tasks would write ~38." in message, message
    assert ("MiB into etcd;" in message and "of the 16.0 MiB quota is in use and submits "
            "stop at 80% (12.8 MiB, --submit-budget): submit fewer or smaller tasks"
            in message), message
    # Nothing was written: the listing is what it was, and no array task exists.
    assert small_node.cli("ls", "-o", "json", check=True).stdout == before
    assert not [key for key in small_node.etcd_keys() if key.startswith("/array/")]
    # A small submit still goes through (and runs).
    task_id = small_node.cli("submit", "--", "true", check=True).stdout.strip()
    assert small_node.wait_finished([task_id])[0].reason == pb.REASON_EXITED


def _on_a_terminal(cluster: Cluster, *args: str) -> tuple[int, bytes, str]:
    """Run the CLI with stdout on a pseudo-terminal: (exit status, what the terminal got,
    stderr)."""
    controller, terminal = pty.openpty()
    env = dict(os.environ, FILCH_SERVER=cluster.nodes[0].address)
    process = subprocess.Popen([FILCH, *args], stdin=subprocess.DEVNULL, stdout=terminal,
                               stderr=subprocess.PIPE, env=env)
    os.close(terminal)
    received = b""
    deadline = time.monotonic() + PTY_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:     # EIO: the CLI exited and closed the terminal
                break
            if not chunk:
                break
            received += chunk
        status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        with process.stderr:
            errors = process.stderr.read().decode()
    return status, received, errors


def test_task_output_cannot_drive_the_terminal(small_node: Cluster) -> None:
    # submit --wait --follow streams the output as it happens...
    status, shown, errors = _on_a_terminal(small_node, "submit", "--wait", "--follow",
                                           "--", "sh", "-c", HOSTILE)
    assert status == 0, errors
    escaped = b"\\x1b]0;pwned\\x07\\x1b[2Jline\tend"
    assert escaped in shown, shown
    assert b"\x1b" not in shown and b"\x07" not in shown, shown
    # ...and `filch logs` prints it again afterwards, escaped the same way.
    finished = [task for task in small_node.stub().ListTasks(
        pb.ListTasksRequest(page_size=1000), timeout=10).tasks if task.spec.command == "sh"]
    assert len(finished) == 1, finished
    status, shown, errors = _on_a_terminal(small_node, "logs", finished[0].id)
    assert status == 0, errors
    assert escaped in shown and b"\x1b" not in shown and b"\x07" not in shown, shown
    # Through a pipe the bytes are the task's own, for files and other programs.
    piped = small_node.cli("logs", finished[0].id, check=True)
    assert "\x1b]0;pwned\x07\x1b[2Jline\tend\n" in piped.stdout
