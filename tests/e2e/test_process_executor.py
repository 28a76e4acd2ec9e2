"""A node with the process executor: a submitted task's environment reaches it, after the
uid drop only, and its scratch and temporary directories are its own; a task's processes
die with it (cancel, agent SIGKILL) even after setsid or a double fork."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, wait_for
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


def _escapers(marker: str) -> str:
    """A task that leaves its process group twice (setsid; a double fork whose middle
    process exits, reparenting the grandchild), each holding marker in its command line."""
    hold = f"sleep 1000; : {marker}"
    return (f"setsid sh -c '{hold}' & (sh -c '{hold}' &) & "
            f"echo started; sleep 1000")


def _with_marker(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as stream:
                if marker.encode() in stream.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def marker() -> Iterator[str]:
    value = f"filch-escape-{uuid.uuid4().hex}"
    yield value
    for pid in _with_marker(value):   # whatever a failed test left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_escapers(cluster: Cluster, marker: str) -> str:
    task_id = cluster.submit("sh", "-c", _escapers(marker), restart=False)
    cluster.wait_state(task_id, (pb.TASK_STATE_RUNNING,))
    wait_for("both escaped processes", lambda: len(_with_marker(marker)) >= 2, timeout=30)
    return task_id


@pytest.mark.timeout(120)
def test_cancel_kills_what_left_the_process_group(process_node: Cluster, marker: str) -> None:
    task_id = _start_escapers(process_node, marker)
    process_node.cli("cancel", task_id, check=True)
    task = process_node.wait_finished([task_id])[0]
    assert task.state == pb.TASK_STATE_CANCELED
    # The attempt ended only once its cgroup was empty: nothing is left to wait for.
    assert _with_marker(marker) == [], "a setsid/double-forked process outlived the cancel"


@pytest.mark.timeout(120)
def test_the_watchdog_kills_what_left_the_process_group(marker: str) -> None:
    require_tools()
    if os.geteuid() != 0:
        pytest.skip("task cgroups need root")
    root = Path(tempfile.mkdtemp(prefix="filch-process-watchdog-"))
    root.chmod(0o755)
    try:
        with Cluster(root, size=1, executor="process") as cluster:
            _start_escapers(cluster, marker)
            cluster.nodes[0].kill_hard()      # the agent and its etcd member: power loss
            wait_for("the watchdog to kill the escaped processes",
                     lambda: not _with_marker(marker), timeout=30)
    finally:
        shutil.rmtree(root, ignore_errors=True)
