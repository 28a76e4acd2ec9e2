"""A node with the process executor: a submitted task's environment reaches it, after the
uid drop only, and its scratch and temporary directories are its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster
from tests.e2e.conftest import require_tools

# The agent's default task uid.
TASK_UID = 65534

REPORT = 'id -u; echo "$GREETING|$FILCH_TASK_ID|$HOME|$TMPDIR"; ls -ld "$HOME" "$TMPDIR"'


@pytest.fixture(scope="module")
def process_node() -> Iterator[Cluster]:
    require_tools()
    if os.geteuid() != 0:
        pytest.skip("dropping to the task uid needs root")
    # Not tmp_path: pytest makes its parent 0700, which the task uid could not traverse
    # to reach its own directories (as it can under /var/lib/filch).
    root = Path(tempfile.mkdtemp(prefix="filch-process-node-"))
    root.chmod(0o755)
    try:
        with Cluster(root, size=1, executor="process") as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def markers() -> Iterator[Path]:
    # World-writable, so the task's uid may leave files too; not under pytest's 0700 tmp.
    path = Path(tempfile.mkdtemp(prefix="filch-ld-markers-"))
    path.chmod(0o1777)
    yield path
    for entry in path.iterdir():
        entry.unlink()
    path.rmdir()


@pytest.mark.timeout(120)
def test_submitted_env_acts_only_after_the_uid_drop(process_node: Cluster, markers: Path) -> None:
    # ld.so writes LD_DEBUG output to LD_DEBUG_OUTPUT.<pid> as whoever it runs as: a file
    # owned by root would mean a root-run process (setpriv) took the task's environment.
    env = {"GREETING": "hello world\nsecond line", "LD_DEBUG": "files",
           "LD_DEBUG_OUTPUT": str(markers / "ld")}
    task_id = process_node.submit("sh", "-c", REPORT, env=env, restart=False)
    task = process_node.wait_finished([task_id])[0]
    result = process_node.cli("logs", task_id)
    assert task.reason == pb.REASON_EXITED and task.exit_code == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0] == str(TASK_UID)
    assert lines[1] == "hello world"
    greeting_tail, got_id, home, tmpdir = lines[2].split("|")
    assert (greeting_tail, got_id) == ("second line", task_id)
    assert home.endswith("/work") and tmpdir.endswith("/tmp") and home != tmpdir
    assert all(line.startswith("drwx------") for line in lines[3:5]), lines
    owners = {entry.stat().st_uid for entry in markers.iterdir()}
    assert owners == {TASK_UID}, owners
